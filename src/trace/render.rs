//! Render a trajectory through a chat template into token ids with one exact tag per token.
//! The whole text is tokenized once (ids equal llama.cpp's); each token takes the tag of the
//! template segment holding its first byte.

use crate::model::tokenizer::{Tokenizer, TokenizerError};
use crate::tags::TokenTag;
use crate::trace::schema::Part;
use crate::trace::schema::{MessageRole, Trajectory};
use crate::trace::template::{
    ChatTemplate, ImageTokens, SegmentPart, IMAGE_PAD, VISION_END, VISION_START,
};
use std::ops::Range;

#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Stop before the N-th (0-based) assistant message: the context its generation sees.
    pub upto_step: Option<usize>,
    /// End with the assistant header, ready for generation.
    pub add_generation_prompt: bool,
    /// Keep at most this many tokens (a prefix); `Rendered::truncated` says when it cut.
    pub max_tokens: Option<usize>,
    /// Render image parts as vision tokens with this layout (a vision-language model); `None`
    /// renders their alt text.
    pub images: Option<ImageTokens>,
}

/// The tokens of one trajectory message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpan {
    /// Index into `Trajectory::messages`.
    pub index: usize,
    pub role: MessageRole,
    /// All its tokens, header and trailer included.
    pub tokens: Range<usize>,
    /// After the header, up to and including the end-of-turn token. For an assistant message
    /// these are the tokens the model generates: the positions calibration and eval score.
    pub body: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub ids: Vec<u32>,
    pub tags: Vec<TokenTag>,
    /// Byte range of each token in `text`.
    pub offsets: Vec<(usize, usize)>,
    pub messages: Vec<MessageSpan>,
    pub truncated: bool,
}

impl Rendered {
    /// Token ranges of the assistant messages' bodies, in order.
    pub fn assistant_bodies(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.messages
            .iter()
            .filter(|m| m.role == MessageRole::Assistant)
            .map(|m| m.body.clone())
    }

    /// Maximal runs of tokens with the same tag, as (tag, token range).
    pub fn runs(&self) -> Vec<(TokenTag, Range<usize>)> {
        let mut out: Vec<(TokenTag, Range<usize>)> = Vec::new();
        for (i, tag) in self.tags.iter().enumerate() {
            match out.last_mut() {
                Some((t, r)) if t == tag => r.end = i + 1,
                _ => out.push((*tag, i..i + 1)),
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A vision model could not turn the rendered images into its inputs.
    #[error("{0}")]
    Media(String),
    #[error("trajectory {id}: --upto-step {step} asks for assistant message #{step} (0-based), but it has {steps}")]
    StepOutOfRange {
        id: String,
        step: usize,
        steps: usize,
    },
    #[error(
        "the {template} template needs `{token}` as one special token, but the tokenizer lacks it"
    )]
    MissingSpecial {
        template: &'static str,
        token: &'static str,
    },
    #[error("trajectory {id}: {err}")]
    Tokenizer { id: String, err: TokenizerError },
    #[error("trajectory {id}: message {message}, part {part}: image: {msg}")]
    Image {
        id: String,
        message: usize,
        part: usize,
        msg: String,
    },
    #[error("trajectory {id}: token {index} has byte offset {offset} outside the {len}-byte text")]
    BadOffset {
        id: String,
        index: usize,
        offset: usize,
        len: usize,
    },
}

pub fn render(
    traj: &Trajectory,
    template: &ChatTemplate,
    tok: &Tokenizer,
    opts: &RenderOptions,
) -> Result<Rendered, RenderError> {
    for &token in template.special_tokens() {
        if tok.token_to_id(token).is_none_or(|id| !tok.is_special(id)) {
            return Err(RenderError::MissingSpecial {
                template: template.name(),
                token,
            });
        }
    }
    let messages = match opts.upto_step {
        None => &traj.messages[..],
        Some(step) => {
            let mut assistants = traj
                .messages
                .iter()
                .enumerate()
                .filter(|(_, m)| m.role == MessageRole::Assistant);
            let steps = assistants.clone().count();
            match assistants.nth(step) {
                Some((i, _)) => &traj.messages[..i],
                None => {
                    return Err(RenderError::StepOutOfRange {
                        id: traj.id.clone(),
                        step,
                        steps,
                    })
                }
            }
        }
    };
    if let Some(layout) = &opts.images {
        for token in [VISION_START, IMAGE_PAD, VISION_END] {
            if tok.token_to_id(token).is_none_or(|id| !tok.is_special(id)) {
                return Err(RenderError::MissingSpecial {
                    template: "qwen2-vl image",
                    token,
                });
            }
        }
        for (mi, m) in messages.iter().enumerate() {
            for (pi, part) in m.content.iter().enumerate() {
                if let Part::Image { width, height, .. } = part {
                    layout
                        .count(*width as usize, *height as usize)
                        .map_err(|msg| RenderError::Image {
                            id: traj.id.clone(),
                            message: mi,
                            part: pi,
                            msg,
                        })?;
                }
            }
        }
    }
    let segments = template.segments_with_images(
        &traj.tools,
        messages,
        opts.add_generation_prompt,
        opts.images,
    );

    let mut text = String::new();
    let mut starts = Vec::with_capacity(segments.len());
    for s in &segments {
        starts.push(text.len());
        text.push_str(&s.text);
    }
    let (mut ids, mut offsets) =
        tok.encode_with_offsets(&text)
            .map_err(|err| RenderError::Tokenizer {
                id: traj.id.clone(),
                err,
            })?;

    let mut tags = Vec::with_capacity(ids.len());
    for (index, &(first, _)) in offsets.iter().enumerate() {
        if first >= text.len() {
            return Err(RenderError::BadOffset {
                id: traj.id.clone(),
                index,
                offset: first,
                len: text.len(),
            });
        }
        // Segments are non-empty, so the last start <= first is the segment holding it.
        let seg = &segments[starts.partition_point(|&s| s <= first) - 1];
        tags.push(TokenTag {
            role: seg.role,
            modality: seg.modality,
            turn: seg.turn,
            step: seg.step,
        });
    }

    // Byte ranges of each message and of its body, then the tokens starting inside them.
    let mut spans: Vec<(usize, Range<usize>, Option<Range<usize>>)> = Vec::new();
    for (s, &start) in segments.iter().zip(&starts) {
        let Some(index) = s.message else { continue };
        let bytes = start..start + s.text.len();
        if spans.last().is_none_or(|(i, _, _)| *i != index) {
            spans.push((index, bytes.clone(), None));
        }
        if let Some((_, all, body)) = spans.last_mut() {
            all.end = bytes.end;
            if s.part == SegmentPart::Body {
                let b = body.get_or_insert(bytes.clone());
                b.end = bytes.end;
            }
        }
    }
    let token_at = |byte: usize| offsets.partition_point(|&(first, _)| first < byte);
    let mut message_spans: Vec<MessageSpan> = spans
        .into_iter()
        .map(|(index, all, body)| {
            let tokens = token_at(all.start)..token_at(all.end);
            let body = match body {
                Some(b) => token_at(b.start)..token_at(b.end),
                None => tokens.end..tokens.end,
            };
            MessageSpan {
                index,
                role: traj.messages[index].role,
                tokens,
                body,
            }
        })
        .collect();

    let mut truncated = false;
    if let Some(max) = opts.max_tokens {
        if ids.len() > max {
            truncated = true;
            text.truncate(offsets[max].0);
            ids.truncate(max);
            tags.truncate(max);
            offsets.truncate(max);
            message_spans.retain(|m| m.tokens.start < max);
            for m in &mut message_spans {
                m.tokens.end = m.tokens.end.min(max);
                m.body.start = m.body.start.min(max);
                m.body.end = m.body.end.min(max);
            }
        }
    }
    Ok(Rendered {
        text,
        ids,
        tags,
        offsets,
        messages: message_spans,
        truncated,
    })
}
