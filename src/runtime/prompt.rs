//! A conversation rendered for generation: the model's chat template turns messages and
//! tool schemas into token ids with one tag per token (the same code calibration uses),
//! plus the tag the generated tokens get.

use crate::model::tokenizer::Tokenizer;
use crate::tags::{Modality, Role, TokenTag};
use crate::trace::render::{render, RenderError, RenderOptions};
use crate::trace::schema::Trajectory;
use crate::trace::template::{ChatTemplate, TemplateError};
use std::sync::Arc;

/// Renders conversations with one model's tokenizer and chat template.
#[derive(Debug, Clone)]
pub struct Prompter {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
}

/// Token ids and tags of a conversation ending with the assistant header.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub tags: Vec<TokenTag>,
    /// The tag of every token the model generates: the answer of the current turn and step.
    pub gen_tag: TokenTag,
}

impl Prompter {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self, TemplateError> {
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        Ok(Prompter {
            tokenizer,
            template,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
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
            // The server's models are text-only: images render as their alt text.
            images: None,
        };
        let r = render(conv, &self.template, &self.tokenizer, &opts)?;
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
