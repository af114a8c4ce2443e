//! The OpenAI chat-completions request: its fields, checks that name the offending field,
//! and conversion of its messages and tools into a trajectory the chat template renders.

use super::error::ApiError;
use crate::model::sampling::SamplingParams;
use crate::trace::schema::{parse_arguments, Message, MessageRole, Part, ToolCall, Trajectory};
use serde::Deserialize;
use serde_json::Value;

/// `POST /v1/chat/completions` body. Unknown fields are refused (400 naming them); known
/// fields this server cannot honour are refused when set to anything but their default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Any name is accepted; responses carry the served model's id.
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One message. `refusal`, `annotations`, `audio` and `function_call` are what clients echo
/// back from an earlier response; they must be null or empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub reasoning: Option<String>,
    #[serde(default)]
    pub refusal: Option<Value>,
    #[serde(default)]
    pub annotations: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionIn,
    /// Present in calls accumulated from a stream.
    #[serde(default)]
    pub index: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionIn {
    pub name: String,
    /// A JSON object as a string (OpenAI) or as an object.
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct Checked {
    pub conversation: Trajectory,
    /// `None`: as many as the context allows.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Parse `<tool_call>` blocks of the answer into `tool_calls`.
    pub parse_tools: bool,
}

/// Parse a body (already valid UTF-8) into a request; errors name the JSON path.
pub fn parse(body: &str) -> Result<ChatRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_str(body);
    let req: ChatRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request(format!("the request body is not valid JSON: {inner}"));
        }
        if path == "." {
            return ApiError::bad_request(format!("invalid request: {inner}"));
        }
        ApiError::bad_request(format!("invalid request: field `{path}`: {inner}")).param(path)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    Ok(req)
}

fn field(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).param(param)
}

impl ChatRequest {
    pub fn check(self) -> Result<Checked, ApiError> {
        let unsupported = |name: &str, what: &str| {
            field(
                name,
                format!("`{name}` {what} is not supported by this server"),
            )
        };
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "other than 1"));
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(unsupported("logprobs", "(true)"));
        }
        if self.frequency_penalty.is_some_and(|x| x != 0.0) {
            return Err(unsupported("frequency_penalty", "other than 0"));
        }
        if self.presence_penalty.is_some_and(|x| x != 0.0) {
            return Err(unsupported("presence_penalty", "other than 0"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias", "(non-empty)"));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(unsupported(
                    "response_format",
                    "other than {\"type\": \"text\"}",
                ));
            }
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((name, m)) if m < 1 => {
                return Err(field(name, format!("`{name}` must be at least 1, got {m}")))
            }
            Some((_, m)) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        // OpenAI's defaults: temperature 1, top_p 1.
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(field(
                "temperature",
                format!("`temperature` must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(field(
                "top_p",
                format!("`top_p` must be in (0, 1], got {top_p}"),
            ));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        let stop = match self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, v) in items.into_iter().enumerate() {
                    match v {
                        Value::String(s) => out.push(s),
                        _ => {
                            return Err(field(
                                &format!("stop[{i}]"),
                                "`stop` entries must be strings",
                            ))
                        }
                    }
                }
                if out.len() > 16 {
                    return Err(field("stop", "at most 16 stop strings"));
                }
                out
            }
            Some(_) => {
                return Err(field(
                    "stop",
                    "`stop` must be a string or a list of strings",
                ))
            }
        };
        let tools = self.tools.unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            let name = t
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
                return Err(field(
                    &format!("tools[{i}]"),
                    "each tool must be {\"type\": \"function\", \"function\": {\"name\": …, \"parameters\": …}}",
                ));
            }
        }
        let parse_tools =
            match &self.tool_choice {
                None | Some(Value::Null) => !tools.is_empty(),
                Some(Value::String(s)) if s == "auto" => !tools.is_empty(),
                Some(Value::String(s)) if s == "none" => false,
                Some(_) => return Err(field(
                    "tool_choice",
                    "only \"auto\" and \"none\" are supported (this server cannot force a call)",
                )),
            };
        if self.messages.is_empty() {
            return Err(field(
                "messages",
                "`messages` must hold at least one message",
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_message(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Checked {
            conversation: Trajectory {
                id: "request".into(),
                source: Value::Null,
                meta: Value::Null,
                tools,
                messages,
            },
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                seed,
            },
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            parse_tools,
        })
    }
}

fn is_empty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl ChatMessage {
    fn into_message(self, i: usize) -> Result<Message, ApiError> {
        let p = |f: &str| format!("messages[{i}].{f}");
        let role = match self.role.as_str() {
            "system" | "developer" => MessageRole::System,
            "user" => MessageRole::User,
            "assistant" => MessageRole::Assistant,
            "tool" => MessageRole::Tool,
            other => {
                return Err(field(
                    &p("role"),
                    format!("unknown role {other:?} (system, developer, user, assistant, tool)"),
                ))
            }
        };
        for (name, v) in [
            ("refusal", &self.refusal),
            ("annotations", &self.annotations),
            ("audio", &self.audio),
            ("function_call", &self.function_call),
        ] {
            if !is_empty(v) {
                return Err(field(
                    &p(name),
                    format!("`{name}` is not supported in input messages"),
                ));
            }
        }
        let content = content_parts(self.content, &p("content"))?;
        let mut tool_calls = Vec::new();
        let calls = self.tool_calls.unwrap_or_default();
        if !calls.is_empty() && role != MessageRole::Assistant {
            return Err(field(
                &p("tool_calls"),
                "only assistant messages carry tool calls",
            ));
        }
        for (j, c) in calls.into_iter().enumerate() {
            let fp = p(&format!("tool_calls[{j}].function.arguments"));
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(field(
                    &p(&format!("tool_calls[{j}].type")),
                    "must be \"function\"",
                ));
            }
            let arguments = match c.function.arguments {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(Value::String(s)) => parse_arguments(&s).map_err(|m| field(&fp, m))?,
                Some(v @ Value::Object(_)) => v,
                Some(_) => return Err(field(&fp, "must be a JSON object or a string holding one")),
            };
            tool_calls.push(ToolCall {
                id: c.id.unwrap_or_default(),
                name: c.function.name,
                arguments,
            });
        }
        if role == MessageRole::Tool && self.tool_call_id.is_none() && self.name.is_none() {
            return Err(field(
                &p("tool_call_id"),
                "tool messages need `tool_call_id`",
            ));
        }
        Ok(Message {
            role,
            content,
            reasoning: self.reasoning_content.or(self.reasoning),
            tool_calls,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// `content` as a string, null, or a list of `{"type": "text", "text": …}` parts.
fn content_parts(content: Option<Value>, param: &str) -> Result<Vec<Part>, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![Part::Text { text }]),
        Some(Value::Array(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(k, part)| {
                let pp = format!("{param}[{k}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => Ok(Part::Text {
                            text: t.to_string(),
                        }),
                        None => Err(field(&pp, "a text part needs a string `text`")),
                    },
                    Some("image_url") => image_part(&part, &pp),
                    Some(kind @ ("input_audio" | "file")) => Err(field(
                        &pp,
                        format!(
                            "`{kind}` parts are not supported: the server reads text and images"
                        ),
                    )),
                    _ => Err(field(
                        &pp,
                        "content parts must be {\"type\": \"text\", \"text\": …}",
                    )),
                }
            })
            .collect(),
        Some(_) => Err(field(
            param,
            "`content` must be a string, null or a list of parts",
        )),
    }
}

/// An `image_url` part: a `data:` URI of a PNG, JPEG or WebP image, decoded here so a bad
/// image is a 400 naming the part. Remote URLs are refused (the server fetches nothing). A
/// vision model sees the image as its vision tokens and features; a text-only model sees a
/// placeholder observation (`[image]`, the part's alt text).
fn image_part(part: &Value, pp: &str) -> Result<Part, ApiError> {
    use base64::Engine;
    let url = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| field(pp, "an image_url part needs `image_url.url`"))?;
    let p = format!("{pp}.image_url.url");
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(field(
            &p,
            "only `data:` URIs are accepted: the server fetches no remote images",
        ));
    };
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(field(&p, "a data: URI needs a `,` before its payload"));
    };
    if !meta.ends_with(";base64") {
        return Err(field(&p, "the image must be base64-encoded (`;base64,`)"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| field(&p, format!("invalid base64: {e}")))?;
    let img = crate::model::vision::decode(&bytes).map_err(|e| field(&p, e.to_string()))?;
    Ok(Part::Image {
        path: None,
        data: Some(url.to_string()),
        width: img.width(),
        height: img.height(),
        alt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Checked, ApiError> {
        parse(body)?.check()
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            check(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = check(r#"{"messages":[{"role":"user","content":"hi"}],"bogus":1}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        let e = check(r#"{"messages":[{"role":"robot","content":"hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = check(r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        let e = check(r#"{"messages":[{"role":"user","content":[{"type":"input_audio"}]}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        let e = check(r#"{"messages":[{"role":"user","content":"hi"}], "temperature": 3}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = check(r#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = check(r#"{"messages":[{"role":"user","content":"hi"}]} x"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = check(r#"{"messages":[{"role":"user","content":"hi"}], "n": 2}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
    }

    #[test]
    fn messages_and_tool_calls_convert() {
        let c = check(
            r#"{"model":"x","messages":[
                {"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"weather?"}]},
                {"role":"assistant","content":null,"refusal":null,"tool_calls":[
                    {"id":"c1","type":"function","function":{"name":"get","arguments":"{\"city\":\"Oslo\"}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"sunny"}],
              "tools":[{"type":"function","function":{"name":"get","parameters":{}}}],
              "stop":"END","max_completion_tokens":5,"temperature":0,"seed":3}"#,
        )
        .unwrap();
        let m = &c.conversation.messages;
        assert_eq!(m[0].role, MessageRole::System);
        assert_eq!(m[1].text(), "weather?");
        assert_eq!(m[2].tool_calls[0].arguments["city"], "Oslo");
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(c.max_tokens, Some(5));
        assert_eq!(c.stop, vec!["END".to_string()]);
        assert!(c.parse_tools);
        assert_eq!(c.sampling.temperature, 0.0);
        assert_eq!(c.sampling.seed, 3);
    }

    fn image_request(url: &str) -> String {
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}]})
        .to_string()
    }

    #[test]
    fn image_url_parts_take_data_uris_only() {
        use base64::Engine;
        let mut png = Vec::new();
        image::RgbImage::new(3, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let ok = check(&image_request(&format!("data:image/png;base64,{b64}"))).unwrap();
        let parts = &ok.conversation.messages[0].content;
        assert!(
            matches!(
                parts[1],
                Part::Image {
                    width: 3,
                    height: 2,
                    ..
                }
            ),
            "{parts:?}"
        );
        let at = Some("messages[0].content[1].image_url.url");
        let e = check(&image_request("https://example.com/a.png")).unwrap_err();
        assert_eq!(e.param.as_deref(), at);
        assert!(e.message.contains("remote"), "{}", e.message);
        let e = check(&image_request("data:image/png;base64,!!!")).unwrap_err();
        assert_eq!(e.param.as_deref(), at);
        let gif = base64::engine::general_purpose::STANDARD.encode(b"GIF89a\x01\x00\x01\x00");
        let e = check(&image_request(&format!("data:image/gif;base64,{gif}"))).unwrap_err();
        assert!(
            e.message.contains("unsupported image format"),
            "{}",
            e.message
        );
        let cut = base64::engine::general_purpose::STANDARD.encode(&png[..png.len() / 2]);
        let e = check(&image_request(&format!("data:image/png;base64,{cut}"))).unwrap_err();
        assert!(e.message.contains("cannot decode"), "{}", e.message);
    }
}
