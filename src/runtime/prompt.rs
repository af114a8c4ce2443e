//! A conversation rendered for generation: the model's chat template turns messages and
//! tool schemas into token ids with one tag per token (the same code calibration uses),
//! plus the tag the generated tokens get.

use crate::model::llama::Media;
use crate::model::tokenizer::Tokenizer;
use crate::model::vision::media_for;
use crate::model::vision::qwen2vl::VisionTower;
use crate::tags::{Modality, Role, TokenTag};
use crate::trace::render::{render, RenderError, RenderOptions};
use crate::trace::schema::Trajectory;
use crate::trace::template::{ChatTemplate, ImageTokens, TemplateError, IMAGE_PAD};
use std::path::Path;
use std::sync::Arc;

/// Renders conversations with one model's tokenizer and chat template.
#[derive(Clone)]
pub struct Prompter {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    /// A vision-language model's tower: image parts render as its vision tokens and become
    /// `Prompt::media`.
    vision: Option<Arc<VisionTower>>,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter")
            .field("template", &self.template.name())
            .field("vision", &self.vision.is_some())
            .finish()
    }
}

/// Token ids and tags of a conversation ending with the assistant header.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub tags: Vec<TokenTag>,
    /// The tag of every token the model generates: the answer of the current turn and step.
    pub gen_tag: TokenTag,
    /// Image features and multimodal positions, when a vision model's prompt holds images.
    pub media: Option<Arc<Media>>,
}

impl Prompter {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self, TemplateError> {
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        Ok(Prompter {
            tokenizer,
            template,
            vision: None,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Render images as `tower`'s vision tokens and compute their features.
    pub fn with_vision(mut self, tower: Arc<VisionTower>) -> Self {
        self.vision = Some(tower);
        self
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Render every message of `conv` (and its tools) followed by the assistant header.
    pub fn render(&self, conv: &Trajectory) -> Result<Prompt, RenderError> {
        let opts = RenderOptions {
            upto_step: None,
            add_generation_prompt: true,
            max_tokens: None,
            // A text-only model sees an image's alt text.
            images: self.vision.as_ref().map(|_| ImageTokens::qwen2_vl()),
        };
        let r = render(conv, &self.template, &self.tokenizer, &opts)?;
        let image_token = self.tokenizer.token_to_id(IMAGE_PAD);
        let media = match (&self.vision, image_token) {
            (Some(tower), Some(t)) if r.ids.contains(&t) => Some(Arc::new(
                media_for(tower, &conv.messages, Path::new("."), &r.ids, t)
                    .map_err(RenderError::Media)?,
            )),
            _ => None,
        };
        // Generated tokens belong to the assistant message the header opens (as `generate`).
        let last = r.tags.last().copied();
        let gen_tag = TokenTag {
            role: Role::Assistant,
            modality: Modality::Text,
            turn: last.map_or(0, |t| t.turn),
            step: last.map_or(1, |t| t.step),
        };
        Ok(Prompt {
            ids: r.ids,
            tags: r.tags,
            gen_tag,
            media,
        })
    }

    /// Ids that end the assistant's turn: the template's end-of-turn token and the
    /// tokenizer's end-of-sequence ids.
    pub fn end_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.eos_ids().to_vec();
        let end = match self.template {
            ChatTemplate::ChatMl { .. } => "<|im_end|>",
            ChatTemplate::Llama3 => "<|eot_id|>",
        };
        if let Some(id) = self.tokenizer.token_to_id(end) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}
