//! Tags are exact: hand-made conversations rendered through each chat template, checked run
//! by run (role, decoded text), with turn/step counters, message spans and the upto-step cut.

use serde_json::json;
use triaxkv::model::tokenizer::{BpeVocab, Tokenizer};
use triaxkv::tags::{Modality, Role};
use triaxkv::trace::render::{render, RenderError, RenderOptions, Rendered};
use triaxkv::trace::template::ChatTemplate;
use triaxkv::trace::{MessageRole, Trajectory};

const SPECIALS: [&str; 7] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// GPT-2's byte-to-symbol map.
fn byte_symbols() -> Vec<String> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![String::new(); 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).map(String::from).unwrap();
    }
    out
}

/// A byte-level BPE with every byte, the templates' special tokens and a few merges that
/// cross nothing but ordinary text, so boundaries are exact and the test always runs.
fn tiny_tokenizer() -> Tokenizer {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut token_types = vec![3; SPECIALS.len()];
    tokens.extend(byte_symbols());
    token_types.extend([1; 256]);
    for t in ["Ġa", "in", "Ġin", "ĊĊ"] {
        tokens.push(t.to_string());
        token_types.push(1);
    }
    // Qwen2-VL's vision tokens, after every other id (the other tests' ids stay put).
    for t in ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"] {
        tokens.push(t.to_string());
        token_types.push(3);
    }
    Tokenizer::from_vocab(BpeVocab {
        tokens,
        token_types,
        merges: ["Ġ a", "i n", "Ġ in", "Ċ Ċ"].map(String::from).to_vec(),
        pre: "smollm".into(),
        eos_id: Some(2),
        ..BpeVocab::default()
    })
    .unwrap()
}

fn default_model_tokenizer() -> Option<Tokenizer> {
    let path = triaxkv::model::load::default_model_path();
    if !path.exists() {
        eprintln!(
            "skipping the SmolLM2 half: {} not present (run scripts/setup.sh)",
            path.display()
        );
        return None;
    }
    Some(Tokenizer::from_gguf_path(&path).unwrap())
}

fn agent_trace() -> Trajectory {
    serde_json::from_value(json!({
        "id": "hand/1",
        "source": "test",
        "tools": [{"type": "function", "function": {"name": "search_flights",
            "description": "Find flights.",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}],
        "messages": [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Book a flight to Paris."},
            {"role": "assistant", "content": "", "reasoning": "Need flights first.",
             "tool_calls": [{"id": "c1", "name": "search_flights", "arguments": {"to": "PAR"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"flights\": 2}"},
            {"role": "assistant", "content": "Two flights found."}
        ]
    }))
    .unwrap()
}

/// Maximal runs of the same role, decoded.
fn role_runs(r: &Rendered, tok: &Tokenizer) -> Vec<(Role, String)> {
    let mut out: Vec<(Role, Vec<u32>)> = Vec::new();
    for (id, tag) in r.ids.iter().zip(&r.tags) {
        match out.last_mut() {
            Some((role, ids)) if *role == tag.role => ids.push(*id),
            _ => out.push((tag.role, vec![*id])),
        }
    }
    out.into_iter()
        .map(|(role, ids)| (role, tok.decode(&ids).unwrap()))
        .collect()
}

fn owned(v: &[(Role, &str)]) -> Vec<(Role, String)> {
    v.iter().map(|(r, s)| (*r, s.to_string())).collect()
}

const TOOL_JSON: &str = r#"{"type": "function", "function": {"name": "search_flights", "description": "Find flights.", "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}"#;
const CALL_QWEN: &str = r#"{"name": "search_flights", "arguments": {"to": "PAR"}}"#;

fn chatml_expected() -> Vec<(Role, String)> {
    use Role::*;
    let outro = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n";
    owned(&[
        (Template, "<|im_start|>system\n"),
        (System, "You are an agent."),
        (
            Template,
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        ),
        (System, TOOL_JSON),
        (Template, outro),
        (User, "Book a flight to Paris."),
        (Template, "<|im_end|>\n<|im_start|>assistant\n<think>\n"),
        (Reasoning, "Need flights first."),
        (Template, "\n</think>\n\n<tool_call>\n"),
        (ToolCall, CALL_QWEN),
        (
            Template,
            "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n",
        ),
        (Observation, "{\"flights\": 2}"),
        (
            Template,
            "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        ),
        (Assistant, "Two flights found."),
        (Template, "<|im_end|>\n"),
    ])
}

fn check_chatml(tok: &Tokenizer) {
    let traj = agent_trace();
    let tpl = ChatTemplate::ChatMl {
        default_system: Some("Default.".into()),
    };
    let r = render(&traj, &tpl, tok, &RenderOptions::default()).unwrap();
    assert_eq!(role_runs(&r, tok), chatml_expected());
    assert_eq!(r.ids, tok.encode(&r.text).unwrap(), "one tokenization");
    assert!(!r.truncated);
    assert!(r.tags.iter().all(|t| t.modality == Modality::Text));

    // Counters: the user message opens turn 1; each assistant message opens a step; the
    // tool result stays in turn 1, step 1.
    let at = |needle: &str| {
        let byte = r.text.find(needle).unwrap();
        let i = r.offsets.iter().position(|o| o.0 >= byte).unwrap();
        (r.tags[i].role, r.tags[i].turn, r.tags[i].step)
    };
    assert_eq!(at("You are an agent."), (Role::System, 0, 0));
    assert_eq!(at("Book a flight"), (Role::User, 1, 0));
    assert_eq!(at("Need flights"), (Role::Reasoning, 1, 1));
    assert_eq!(at("{\"flights\""), (Role::Observation, 1, 1));
    assert_eq!(at("Two flights"), (Role::Assistant, 1, 2));

    // Message spans: every message, in order; an assistant body is exactly what the model
    // generates (after the header, through <|im_end|>).
    let roles: Vec<(usize, MessageRole)> = r.messages.iter().map(|m| (m.index, m.role)).collect();
    assert_eq!(
        roles,
        vec![
            (0, MessageRole::System),
            (1, MessageRole::User),
            (2, MessageRole::Assistant),
            (3, MessageRole::Tool),
            (4, MessageRole::Assistant),
        ]
    );
    let bodies: Vec<String> = r
        .assistant_bodies()
        .map(|b| tok.decode(&r.ids[b]).unwrap())
        .collect();
    assert_eq!(
        bodies,
        vec![
            format!("<think>\nNeed flights first.\n</think>\n\n<tool_call>\n{CALL_QWEN}\n</tool_call><|im_end|>"),
            "Two flights found.<|im_end|>".to_string(),
        ]
    );
    let last = r.messages.last().unwrap();
    assert_eq!(last.tokens.end, r.ids.len());
    assert_eq!(
        tok.decode(&r.ids[last.tokens.clone()]).unwrap(),
        "<|im_start|>assistant\nTwo flights found.<|im_end|>\n"
    );
    for w in r.messages.windows(2) {
        assert_eq!(
            w[0].tokens.end, w[1].tokens.start,
            "spans tile the messages"
        );
    }

    // upto_step 1: the context of the second assistant message, ending in the header that
    // belongs to step 2.
    let opts = RenderOptions {
        upto_step: Some(1),
        add_generation_prompt: true,
        max_tokens: None,
        images: None,
    };
    let cut = render(&traj, &tpl, tok, &opts).unwrap();
    assert!(cut
        .text
        .ends_with("\n</tool_response><|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(
        cut.ids[..],
        r.ids[..cut.ids.len()],
        "a prefix of the full render"
    );
    let last = cut.tags.last().unwrap();
    assert_eq!((last.role, last.turn, last.step), (Role::Template, 1, 2));
    assert_eq!(cut.messages.len(), 4);
    let at0 = render(
        &traj,
        &tpl,
        tok,
        &RenderOptions {
            upto_step: Some(0),
            ..RenderOptions::default()
        },
    )
    .unwrap();
    assert!(at0.text.ends_with("Book a flight to Paris.<|im_end|>\n"));
    let err = render(
        &traj,
        &tpl,
        tok,
        &RenderOptions {
            upto_step: Some(2),
            ..RenderOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::StepOutOfRange {
                step: 2,
                steps: 2,
                ..
            }
        ),
        "{err}"
    );

    // max_tokens keeps a prefix and says so.
    let short = render(
        &traj,
        &tpl,
        tok,
        &RenderOptions {
            max_tokens: Some(10),
            ..RenderOptions::default()
        },
    )
    .unwrap();
    assert!(short.truncated);
    assert_eq!(short.ids[..], r.ids[..10]);
    assert_eq!(short.tags.len(), 10);
    assert!(short.messages.iter().all(|m| m.tokens.end <= 10));
}

#[test]
fn chatml_tags_are_exact_on_tiny_tokenizer() {
    check_chatml(&tiny_tokenizer());
}

#[test]
fn chatml_tags_are_exact_on_smollm2() {
    let Some(tok) = default_model_tokenizer() else {
        return;
    };
    let tpl = ChatTemplate::for_tokenizer(&tok).unwrap();
    assert_eq!(
        tpl,
        ChatTemplate::ChatMl {
            default_system: Some(
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
            )
        }
    );
    check_chatml(&tok);
}

#[test]
fn chatml_default_system_merged_tools_and_images() {
    let tok = tiny_tokenizer();
    let traj: Trajectory = serde_json::from_value(json!({
        "id": "hand/2",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look."},
                {"type": "image", "path": "a.png", "width": 8, "height": 8, "alt": "A red button."}]},
            {"role": "assistant", "content": "<think>two calls</think>Checking.",
             "tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]},
            {"role": "tool", "content": "ra"},
            {"role": "tool", "content": [{"type": "image", "path": "b.png", "width": 8, "height": 8}]},
            {"role": "user", "content": "Thanks."}
        ]
    }))
    .unwrap();
    let tpl = ChatTemplate::ChatMl {
        default_system: Some("Default.".into()),
    };
    let r = render(&traj, &tpl, &tok, &RenderOptions::default()).unwrap();
    use Role::*;
    assert_eq!(
        role_runs(&r, &tok),
        owned(&[
            (Template, "<|im_start|>system\n"),
            (System, "Default."),
            (Template, "<|im_end|>\n<|im_start|>user\n"),
            (User, "Look."),
            (Template, "\n"),
            (Observation, "A red button."),
            (Template, "<|im_end|>\n<|im_start|>assistant\n<think>\n"),
            (Reasoning, "two calls"),
            (Template, "\n</think>\n\n"),
            (Assistant, "Checking."),
            (Template, "\n<tool_call>\n"),
            (ToolCall, r#"{"name": "a", "arguments": {}}"#),
            (Template, "\n</tool_call>\n<tool_call>\n"),
            (ToolCall, r#"{"name": "b", "arguments": {"x": 1}}"#),
            // Two tool results share one user turn.
            (
                Template,
                "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
            ),
            (Observation, "ra"),
            (Template, "\n</tool_response>\n<tool_response>\n"),
            (Observation, "[image]"),
            (Template, "\n</tool_response><|im_end|>\n<|im_start|>user\n"),
            (User, "Thanks."),
            (Template, "<|im_end|>\n"),
        ])
    );
    // The default system prompt belongs to no message; the second user message is turn 2.
    assert_eq!(r.messages[0].index, 0);
    assert_eq!(r.messages[0].role, MessageRole::User);
    let last = r.tags.last().unwrap();
    assert_eq!((last.turn, last.step), (2, 1));
    let first_tool = &r.messages[2];
    assert_eq!(
        tok.decode(&r.ids[first_tool.tokens.clone()]).unwrap(),
        "<|im_start|>user\n<tool_response>\nra\n</tool_response>"
    );
}

#[test]
fn llama3_tags_are_exact() {
    let tok = tiny_tokenizer();
    let r = render(
        &agent_trace(),
        &ChatTemplate::Llama3,
        &tok,
        &RenderOptions {
            add_generation_prompt: false,
            ..RenderOptions::default()
        },
    )
    .unwrap();
    use Role::*;
    let tool_json_indented = "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"search_flights\",\n        \"description\": \"Find flights.\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"to\": {\n                    \"type\": \"string\"\n                }\n            }\n        }\n    }\n}";
    assert_eq!(
        role_runs(&r, &tok),
        owned(&[
            (
                Template,
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou have access to the following functions. To call a function, please respond with JSON for a function call.Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
            ),
            (System, tool_json_indented),
            (Template, "\n\n"),
            (System, "You are an agent."),
            (
                Template,
                "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            ),
            (User, "Book a flight to Paris."),
            (
                Template,
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
            ),
            (Reasoning, "Need flights first."),
            (Template, "\n</think>\n\n"),
            (ToolCall, r#"{"name": "search_flights", "parameters": {"to": "PAR"}}"#),
            (
                Template,
                "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
            ),
            (Observation, "{\"flights\": 2}"),
            (
                Template,
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            (Assistant, "Two flights found."),
            (Template, "<|eot_id|>"),
        ])
    );
    let bodies: Vec<String> = r
        .assistant_bodies()
        .map(|b| tok.decode(&r.ids[b]).unwrap())
        .collect();
    assert_eq!(bodies[1], "Two flights found.<|eot_id|>");
    let last = r.tags.last().unwrap();
    assert_eq!((last.turn, last.step), (1, 2));
}

#[test]
fn missing_special_tokens_are_an_error() {
    // A vocabulary without Llama-3's header tokens cannot render that template faithfully.
    let tok = Tokenizer::from_vocab(BpeVocab {
        tokens: byte_symbols(),
        pre: "smollm".into(),
        ..BpeVocab::default()
    })
    .unwrap();
    let err = render(
        &agent_trace(),
        &ChatTemplate::Llama3,
        &tok,
        &RenderOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("<|begin_of_text|>"), "{err}");
}

/// With a vision-language layout an image part is `<|vision_start|>`, one `<|image_pad|>` per
/// merged patch of the resized image (512×384 → 392×504 → 14×18 = 252), `<|vision_end|>`,
/// all tagged modality image with the carrying message's role; without it, the alt text.
/// An image the processor cannot take is an error naming the message and part.
#[test]
fn image_parts_render_as_vision_tokens_for_a_vision_model() {
    use triaxkv::trace::template::ImageTokens;
    let tok = tiny_tokenizer();
    let traj: Trajectory = serde_json::from_value(json!({
        "id": "img", "messages": [
            {"role": "user", "content": "Open the page."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "name": "screenshot", "arguments": {}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image", "path": "x.png", "width": 512, "height": 384,
                 "alt": "a page"}]},
        ]
    }))
    .unwrap();
    let tpl = ChatTemplate::ChatMl {
        default_system: None,
    };
    let opts = RenderOptions {
        images: Some(ImageTokens::qwen2_vl()),
        ..RenderOptions::default()
    };
    let r = render(&traj, &tpl, &tok, &opts).unwrap();
    let pad = tok.token_to_id("<|image_pad|>").unwrap();
    let image: Vec<usize> = (0..r.ids.len())
        .filter(|&i| r.tags[i].modality == Modality::Image)
        .collect();
    assert_eq!(image.len(), 252 + 2);
    assert_eq!(r.ids.iter().filter(|&&id| id == pad).count(), 252);
    assert_eq!(
        r.ids[image[0]],
        tok.token_to_id("<|vision_start|>").unwrap()
    );
    assert_eq!(
        r.ids[*image.last().unwrap()],
        tok.token_to_id("<|vision_end|>").unwrap()
    );
    assert!(
        image.windows(2).all(|w| w[1] == w[0] + 1),
        "one contiguous run"
    );
    assert!(image.iter().all(|&i| r.tags[i].role == Role::Observation));
    assert!(!r.text.contains("a page"));

    let plain = render(&traj, &tpl, &tok, &RenderOptions::default()).unwrap();
    assert!(plain.text.contains("a page"));
    assert!(plain.tags.iter().all(|t| t.modality == Modality::Text));

    let mut tiny = traj.clone();
    if let triaxkv::trace::schema::Part::Image { width, .. } = &mut tiny.messages[2].content[1] {
        *width = 10;
    }
    let e = render(&tiny, &tpl, &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("message 2, part 1"), "{e}");
}
