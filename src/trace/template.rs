//! Chat templates: how a model family lays out system, tools, turns, reasoning and tool calls,
//! as a list of text segments each carrying the tag its tokens get. Tokenizing is `render`'s job.
//!
//! Tagging rules (the same for every family):
//! - special tokens, role names, the newlines that belong to a header, end-of-turn tokens, the
//!   `<think>`/`<tool_call>`/`<tool_response>` wrappers and fixed boilerplate sentences (the
//!   "# Tools … <tools>" instructions, Llama's date lines) are `Template`;
//! - the system prompt and each tool's JSON schema are `System`;
//! - user text is `User`, reasoning text `Reasoning`, final-answer text `Assistant`, the whole
//!   call JSON (`{"name": …, "arguments": …}`) `ToolCall`, tool results `Observation`;
//! - an image part of a text-only model renders its `alt` text (or `[image]`) as `Observation`
//!   with modality text; the newline joining two parts of one message is `Template`.
//!
//! Reasoning renders as `<think>\n…\n</think>\n\n` before the content (Qwen3's layout) in every
//! assistant message, not only the last one: an agent's KV cache holds what it actually saw.

use crate::model::tokenizer::Tokenizer;
use crate::tags::{Modality, Role};
use crate::trace::schema::{Message, MessageRole, Part, ToolCall};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n…<|im_end|>\n`, with Qwen2.5's conventions for tools (SmolLM2, Qwen).
    ChatMl {
        /// System prompt the template inserts when a conversation has none.
        default_system: Option<String>,
    },
    /// Llama 3.1: header ids, `<|eot_id|>`, tools JSON in the system turn, results as `ipython`.
    Llama3,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "chat template not recognised (supported: ChatML `<|im_start|>`, Llama-3 \
         `<|start_header_id|>`); it begins: {excerpt:?}"
    )]
    Unknown { excerpt: String },
    #[error(
        "the tokenizer has no chat template and no `<|im_start|>` or `<|start_header_id|>` token"
    )]
    NoTemplate,
}

/// Where a segment sits inside its message; `render` turns these into token ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentPart {
    /// The role header (`<|im_start|>assistant\n`).
    Header,
    /// What follows the header up to and including the end-of-turn token: for an assistant
    /// message, exactly what the model generates.
    Body,
    /// Formatting after the end-of-turn token (ChatML's `\n`).
    Trailer,
}

/// One piece of rendered text and the tag of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub role: Role,
    pub modality: Modality,
    /// User turns so far (tool results are not new turns).
    pub turn: u32,
    /// Assistant messages so far, counting the one this segment belongs to.
    pub step: u32,
    /// Index of the trajectory message it renders; `None` for text the template adds on its
    /// own (BOS, a default system prompt, the generation prompt).
    pub message: Option<usize>,
    pub part: SegmentPart,
}

const QWEN_TOOLS_INTRO: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const QWEN_TOOLS_OUTRO: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
const LLAMA3_DATES: &str = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
const LLAMA3_TOOLS_INTRO: &str = "You have access to the following functions. To call a function, please respond with JSON for a function call.Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n";

impl ChatTemplate {
    /// Recognise the family of a Jinja chat template (GGUF `tokenizer.chat_template` or
    /// tokenizer_config.json), keeping the default system prompt a ChatML template inserts.
    pub fn detect(jinja: &str) -> Result<Self, TemplateError> {
        if jinja.contains("<|im_start|>") {
            Ok(ChatTemplate::ChatMl {
                default_system: chatml_default_system(jinja),
            })
        } else if jinja.contains("<|start_header_id|>") {
            Ok(ChatTemplate::Llama3)
        } else {
            Err(TemplateError::Unknown {
                excerpt: jinja.chars().take(120).collect(),
            })
        }
    }

    /// The template of a tokenizer: its Jinja template if it has one, else guessed from the
    /// special tokens of its vocabulary.
    pub fn for_tokenizer(tok: &Tokenizer) -> Result<Self, TemplateError> {
        if let Some(jinja) = tok.chat_template() {
            return Self::detect(jinja);
        }
        if tok.token_to_id("<|im_start|>").is_some() {
            Ok(ChatTemplate::ChatMl {
                default_system: None,
            })
        } else if tok.token_to_id("<|start_header_id|>").is_some() {
            Ok(ChatTemplate::Llama3)
        } else {
            Err(TemplateError::NoTemplate)
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => "chatml",
            ChatTemplate::Llama3 => "llama3",
        }
    }

    /// Special tokens the layout writes; each must be one token of the vocabulary, or the
    /// rendered ids would silently differ from the model's.
    pub fn special_tokens(&self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl { .. } => &["<|im_start|>", "<|im_end|>"],
            ChatTemplate::Llama3 => &[
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
        }
    }

    /// Lay out `messages` (with the trajectory's `tools` schemas) as tagged segments.
    pub fn segments(
        &self,
        tools: &[Value],
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Vec<Segment> {
        self.segments_with_images(tools, messages, add_generation_prompt, None)
    }

    /// [`segments`](Self::segments) where image parts become vision tokens (`images`: a
    /// vision-language model's layout) rather than their alt text.
    pub fn segments_with_images(
        &self,
        tools: &[Value],
        messages: &[Message],
        add_generation_prompt: bool,
        images: Option<ImageTokens>,
    ) -> Vec<Segment> {
        let mut e = Emitter {
            images,
            ..Emitter::default()
        };
        match self {
            ChatTemplate::ChatMl { default_system } => {
                chatml(&mut e, default_system.as_deref(), tools, messages)
            }
            ChatTemplate::Llama3 => llama3(&mut e, tools, messages),
        }
        if add_generation_prompt {
            e.message = None;
            e.part = SegmentPart::Header;
            e.step += 1;
            let header = match self {
                ChatTemplate::ChatMl { .. } => "<|im_start|>assistant\n",
                ChatTemplate::Llama3 => "<|start_header_id|>assistant<|end_header_id|>\n\n",
            };
            e.push(header, Role::Template);
        }
        e.out
    }
}

/// The literal system prompt a ChatML template writes when the conversation has none:
/// the text of a `<|im_start|>system\n…<|im_end|>` string literal (not one built from
/// `message['content']`).
fn chatml_default_system(jinja: &str) -> Option<String> {
    let jinja = jinja.replace("\\n", "\n");
    let marker = "<|im_start|>system\n";
    let mut rest = jinja.as_str();
    while let Some(pos) = rest.find(marker) {
        rest = &rest[pos + marker.len()..];
        let Some(end) = rest.find("<|im_end|>") else {
            break;
        };
        let candidate = &rest[..end];
        let is_literal = !candidate.is_empty()
            && !candidate.contains(['\'', '"', '{', '}', '+'])
            && !candidate.contains("message");
        if is_literal {
            return Some(candidate.to_string());
        }
    }
    None
}

#[derive(Debug)]
struct Emitter {
    out: Vec<Segment>,
    turn: u32,
    step: u32,
    message: Option<usize>,
    part: SegmentPart,
    /// Images render as vision tokens (a vision-language model) instead of their alt text.
    images: Option<ImageTokens>,
}

impl Default for Emitter {
    fn default() -> Self {
        Emitter {
            out: Vec::new(),
            turn: 0,
            step: 0,
            message: None,
            part: SegmentPart::Header,
            images: None,
        }
    }
}

impl Emitter {
    fn push(&mut self, text: impl Into<String>, role: Role) {
        self.push_modal(text, role, Modality::Text);
    }

    fn push_modal(&mut self, text: impl Into<String>, role: Role, modality: Modality) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        self.out.push(Segment {
            text,
            role,
            modality,
            turn: self.turn,
            step: self.step,
            message: self.message,
            part: self.part,
        });
    }

    /// Start message `index`: advance the turn/step counters and open its header.
    fn begin(&mut self, index: usize, role: MessageRole) {
        match role {
            MessageRole::User => self.turn += 1,
            MessageRole::Assistant => self.step += 1,
            MessageRole::System | MessageRole::Tool => {}
        }
        self.message = Some(index);
        self.part = SegmentPart::Header;
    }
}

/// How a vision-language model writes an image: `<|vision_start|>`, one `<|image_pad|>`
/// per merged patch of the resized image, `<|vision_end|>` (Qwen2-VL).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageTokens {
    pub patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
}

pub const VISION_START: &str = "<|vision_start|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const VISION_END: &str = "<|vision_end|>";

impl ImageTokens {
    pub fn qwen2_vl() -> Self {
        let p = crate::model::vision::PreprocessConfig::default();
        ImageTokens {
            patch_size: p.patch_size,
            merge_size: p.merge_size,
            min_pixels: p.min_pixels,
            max_pixels: p.max_pixels,
        }
    }

    /// Image tokens of a `width × height` image (after the processor's resize).
    pub fn count(&self, width: usize, height: usize) -> Result<usize, String> {
        let f = self.patch_size * self.merge_size;
        let (h, w) = crate::model::vision::preprocess::smart_resize(
            height,
            width,
            f,
            self.min_pixels,
            self.max_pixels,
        )
        .map_err(|e| e.to_string())?;
        Ok((h / f) * (w / f))
    }
}

/// A piece of a message's content: text, its role and modality.
type Piece = (String, Role, Modality);

/// A message's content as pieces: text parts carry `role`; image parts are vision tokens
/// tagged `role` and modality image when `images` is given, else their alt text as an
/// observation; parts are joined by a template newline.
fn content_pieces(msg: &Message, role: Role, images: Option<&ImageTokens>) -> Vec<Piece> {
    let mut out = Vec::new();
    for (i, part) in msg.content.iter().enumerate() {
        if i > 0 {
            out.push(("\n".to_string(), Role::Template, Modality::Text));
        }
        match part {
            Part::Text { text } => out.push((text.clone(), role, Modality::Text)),
            Part::Image {
                width, height, alt, ..
            } => {
                let n = images.and_then(|t| t.count(*width as usize, *height as usize).ok());
                match n {
                    Some(n) => {
                        out.push((VISION_START.to_string(), role, Modality::Image));
                        out.push((IMAGE_PAD.repeat(n), role, Modality::Image));
                        out.push((VISION_END.to_string(), role, Modality::Image));
                    }
                    None => {
                        let alt = alt.as_deref().filter(|a| !a.trim().is_empty());
                        out.push((
                            alt.unwrap_or("[image]").to_string(),
                            Role::Observation,
                            Modality::Text,
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Jinja's `| trim` applied to the concatenation of pieces.
fn trim_pieces(mut pieces: Vec<Piece>) -> Vec<Piece> {
    while let Some(first) = pieces.first_mut() {
        let t = first.0.trim_start().to_string();
        if t.is_empty() {
            pieces.remove(0);
        } else {
            first.0 = t;
            break;
        }
    }
    while let Some(last) = pieces.last_mut() {
        let t = last.0.trim_end().to_string();
        if t.is_empty() {
            pieces.pop();
        } else {
            last.0 = t;
            break;
        }
    }
    pieces
}

fn emit_pieces(e: &mut Emitter, pieces: Vec<Piece>) {
    for (text, role, modality) in pieces {
        e.push_modal(text, role, modality);
    }
}

/// Reasoning and answer of an assistant message: the `reasoning` field, or a leading
/// `<think>…</think>` inside the first text part.
fn split_reasoning(msg: &Message) -> (Option<String>, Vec<Piece>) {
    let mut pieces = content_pieces(msg, Role::Assistant, None);
    if let Some(r) = &msg.reasoning {
        return (Some(r.clone()), pieces);
    }
    if let Some((first, Role::Assistant, _)) = pieces.first() {
        let body = first.trim_start();
        if let Some(after_open) = body.strip_prefix("<think>") {
            if let Some(close) = after_open.find("</think>") {
                let reasoning = after_open[..close].to_string();
                let rest = after_open[close + "</think>".len()..].to_string();
                pieces[0].0 = rest;
                return (Some(reasoning), pieces);
            }
        }
    }
    (None, pieces)
}

/// `<think>\n{reasoning}\n</think>\n\n{content}` as Qwen3 writes it (newlines at the edges
/// of the reasoning stripped, leading newlines of the content stripped). Returns whether
/// there was content besides the reasoning: only then does a tool call start on a new line.
fn emit_reasoning_and_content(e: &mut Emitter, msg: &Message, trim: bool) -> bool {
    let (reasoning, mut pieces) = split_reasoning(msg);
    if let Some(r) = reasoning {
        e.push("<think>\n", Role::Template);
        e.push(r.trim_matches('\n'), Role::Reasoning);
        e.push("\n</think>\n\n", Role::Template);
        if let Some(first) = pieces.first_mut() {
            first.0 = first.0.trim_start_matches('\n').to_string();
        }
    }
    if trim {
        pieces = trim_pieces(pieces);
    }
    let has_content = pieces.iter().any(|(t, _, _)| !t.is_empty());
    emit_pieces(e, pieces);
    has_content
}

fn chatml(e: &mut Emitter, default_system: Option<&str>, tools: &[Value], messages: &[Message]) {
    let first_is_system = messages
        .first()
        .is_some_and(|m| m.role == MessageRole::System);
    // The system turn: the first system message, else the template's default; tools join it.
    if first_is_system || !tools.is_empty() || (default_system.is_some() && !messages.is_empty()) {
        if first_is_system {
            e.begin(0, MessageRole::System);
        }
        e.push("<|im_start|>system\n", Role::Template);
        e.part = SegmentPart::Body;
        let mut has_text = false;
        if first_is_system {
            let pieces = content_pieces(&messages[0], Role::System, e.images.as_ref());
            has_text = pieces.iter().any(|(t, _, _)| !t.is_empty());
            emit_pieces(e, pieces);
        } else if let Some(d) = default_system {
            e.push(d, Role::System);
            has_text = !d.is_empty();
        }
        if !tools.is_empty() {
            if has_text {
                e.push("\n\n", Role::Template);
            }
            e.push(QWEN_TOOLS_INTRO, Role::Template);
            for tool in tools {
                e.push("\n", Role::Template);
                e.push(py_json(tool, None), Role::System);
            }
            e.push(QWEN_TOOLS_OUTRO, Role::Template);
        }
        e.push("<|im_end|>", Role::Template);
        e.part = SegmentPart::Trailer;
        e.push("\n", Role::Template);
    }
    let skip = usize::from(first_is_system);
    for (i, msg) in messages.iter().enumerate().skip(skip) {
        e.begin(i, msg.role);
        match msg.role {
            MessageRole::System | MessageRole::User => {
                let role = if msg.role == MessageRole::User {
                    Role::User
                } else {
                    Role::System
                };
                e.push(
                    format!("<|im_start|>{}\n", msg.role.as_str()),
                    Role::Template,
                );
                e.part = SegmentPart::Body;
                let pieces = content_pieces(msg, role, e.images.as_ref());
                emit_pieces(e, pieces);
                e.push("<|im_end|>", Role::Template);
                e.part = SegmentPart::Trailer;
                e.push("\n", Role::Template);
            }
            MessageRole::Assistant => {
                e.push("<|im_start|>assistant\n", Role::Template);
                e.part = SegmentPart::Body;
                let mut wrote = emit_reasoning_and_content(e, msg, false);
                for call in &msg.tool_calls {
                    if wrote {
                        e.push("\n", Role::Template);
                    }
                    e.push("<tool_call>\n", Role::Template);
                    e.push(call_json(call, "arguments"), Role::ToolCall);
                    e.push("\n</tool_call>", Role::Template);
                    wrote = true;
                }
                e.push("<|im_end|>", Role::Template);
                e.part = SegmentPart::Trailer;
                e.push("\n", Role::Template);
            }
            MessageRole::Tool => {
                // Consecutive tool results share one user turn (Qwen2.5).
                let prev_is_tool = i > 0 && messages[i - 1].role == MessageRole::Tool;
                let next_is_tool = messages
                    .get(i + 1)
                    .is_some_and(|m| m.role == MessageRole::Tool);
                if !prev_is_tool {
                    e.push("<|im_start|>user", Role::Template);
                }
                e.part = SegmentPart::Body;
                e.push("\n<tool_response>\n", Role::Template);
                let pieces = content_pieces(msg, Role::Observation, e.images.as_ref());
                emit_pieces(e, pieces);
                e.push("\n</tool_response>", Role::Template);
                if !next_is_tool {
                    e.push("<|im_end|>", Role::Template);
                    e.part = SegmentPart::Trailer;
                    e.push("\n", Role::Template);
                }
            }
        }
    }
}

fn llama3(e: &mut Emitter, tools: &[Value], messages: &[Message]) {
    e.push("<|begin_of_text|>", Role::Template);
    let first_is_system = messages
        .first()
        .is_some_and(|m| m.role == MessageRole::System);
    if first_is_system {
        e.begin(0, MessageRole::System);
    }
    e.push(
        "<|start_header_id|>system<|end_header_id|>\n\n",
        Role::Template,
    );
    e.part = SegmentPart::Body;
    if !tools.is_empty() {
        e.push("Environment: ipython\n", Role::Template);
    }
    e.push(LLAMA3_DATES, Role::Template);
    if !tools.is_empty() {
        e.push(LLAMA3_TOOLS_INTRO, Role::Template);
        for tool in tools {
            e.push(py_json(tool, Some(4)), Role::System);
            e.push("\n\n", Role::Template);
        }
    }
    if first_is_system {
        let pieces = content_pieces(&messages[0], Role::System, e.images.as_ref());
        emit_pieces(e, trim_pieces(pieces));
    }
    e.push("<|eot_id|>", Role::Template);

    let skip = usize::from(first_is_system);
    for (i, msg) in messages.iter().enumerate().skip(skip) {
        e.begin(i, msg.role);
        let header = match msg.role {
            MessageRole::Tool => "ipython",
            other => other.as_str(),
        };
        e.push(
            format!("<|start_header_id|>{header}<|end_header_id|>\n\n"),
            Role::Template,
        );
        e.part = SegmentPart::Body;
        match msg.role {
            MessageRole::System => {
                let pieces = content_pieces(msg, Role::System, e.images.as_ref());
                emit_pieces(e, trim_pieces(pieces))
            }
            MessageRole::User => {
                let pieces = content_pieces(msg, Role::User, e.images.as_ref());
                emit_pieces(e, trim_pieces(pieces))
            }
            MessageRole::Assistant => {
                // Llama 3.1's template drops text next to a call and allows one call per
                // message; an agent's context holds both, so text comes first and several
                // calls are written one per line.
                let mut wrote = emit_reasoning_and_content(e, msg, true);
                for call in &msg.tool_calls {
                    if wrote {
                        e.push("\n", Role::Template);
                    }
                    e.push(call_json(call, "parameters"), Role::ToolCall);
                    wrote = true;
                }
            }
            MessageRole::Tool => {
                let pieces = content_pieces(msg, Role::Observation, e.images.as_ref());
                emit_pieces(e, pieces)
            }
        }
        e.push("<|eot_id|>", Role::Template);
    }
}

/// `{"name": "NAME", "<args_key>": ARGS}` exactly as the Jinja templates concatenate it.
fn call_json(call: &ToolCall, args_key: &str) -> String {
    format!(
        "{{\"name\": \"{}\", \"{}\": {}}}",
        call.name,
        args_key,
        py_json(&call.arguments, None)
    )
}

/// JSON as Python's `json.dumps(v, ensure_ascii=False, indent=indent)` writes it, which is what
/// Hugging Face's `tojson` filter produces: `", "` and `": "` separators, keys in order.
pub fn py_json(v: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py_json(&mut out, v, indent, 0);
    out
}

fn write_py_json(out: &mut String, v: &Value, indent: Option<usize>, level: usize) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_py_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_string(out, k);
                out.push_str(": ");
                write_py_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

fn write_py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn detects_smollm2_default_system() {
        let t = ChatTemplate::detect(SMOLLM2).unwrap();
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: Some(
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
                )
            }
        );
        // Escaped newlines (as in tokenizer_config.json sources) read the same.
        let escaped = SMOLLM2.replace('\n', "\\n");
        assert_eq!(ChatTemplate::detect(&escaped).unwrap(), t);
    }

    #[test]
    fn template_built_from_content_has_no_default() {
        let jinja = "{{'<|im_start|>system\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(
            ChatTemplate::detect(jinja).unwrap(),
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        assert_eq!(
            ChatTemplate::detect("<|start_header_id|>").unwrap(),
            ChatTemplate::Llama3
        );
        assert!(ChatTemplate::detect("[INST]").is_err());
    }

    #[test]
    fn python_json_layout() {
        let v = json!({"a": [1, "x\"\n\u{1}é"], "b": {}, "c": {"d": null}});
        assert_eq!(
            py_json(&v, None),
            r#"{"a": [1, "x\"\n\u0001é"], "b": {}, "c": {"d": null}}"#
        );
        assert_eq!(
            py_json(&json!({"a": [1, 2], "b": {}}), Some(4)),
            "{\n    \"a\": [\n        1,\n        2\n    ],\n    \"b\": {}\n}"
        );
    }

    #[test]
    fn inline_think_is_split() {
        let msg: Message = serde_json::from_value(json!({
            "role": "assistant", "content": "<think>plan</think>\n\nanswer"
        }))
        .unwrap();
        let (r, pieces) = split_reasoning(&msg);
        assert_eq!(r.as_deref(), Some("plan"));
        assert_eq!(
            pieces,
            vec![("\n\nanswer".to_string(), Role::Assistant, Modality::Text)]
        );
    }
}
