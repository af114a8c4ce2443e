//! `triaxkv serve` over loopback with raw HTTP: the bundled SmolLM2 on the CPU backend
//! (greedy answers equal `triaxkv generate`, streaming, concurrency, cancellation, bad
//! input, API key, SIGTERM drain), and a scripted backend for tool calls, stop strings and
//! preemption. Tests needing the model skip with a message when it has not been fetched.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use triaxkv::model::llama::Model;
use triaxkv::model::tokenizer::Tokenizer;
use triaxkv::runtime::{
    Backend, BackendError, CpuBackend, CpuKv, Engine, EngineConfig, KvUsage, Prompter, Work,
};
use triaxkv::serve::{BackgroundServer, ServerOptions};
use triaxkv::tags::TokenTag;

// ---------------------------------------------------------------- raw HTTP

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A refused body may close the connection before it is all written.
    let _ = s.write_all(body);
    s
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = send_request(addr, method, path, headers, body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

fn chat(addr: SocketAddr, body: &Value) -> Response {
    http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    )
}

fn metrics(addr: SocketAddr) -> String {
    let r = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).to_string()
}

/// The value of one Prometheus sample (`name` with its labels, as written).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

fn wait_for(addr: SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let m = metrics(addr);
        if ok(&m) {
            return m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

// ---------------------------------------------------------------- servers

struct Shared {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    name: String,
}

fn shared() -> Option<&'static Shared> {
    static S: OnceLock<Option<Shared>> = OnceLock::new();
    S.get_or_init(|| {
        let p = triaxkv::model::load::default_model_path();
        if !p.exists() {
            eprintln!(
                "skipping: the default model is not at {} (run scripts/setup.sh)",
                p.display()
            );
            return None;
        }
        let m = triaxkv::model::load::load(&p).expect("the default model loads");
        Some(Shared {
            model: Arc::new(m.model),
            tokenizer: Arc::new(m.tokenizer),
            name: m.name,
        })
    })
    .as_ref()
}

fn start<B: Backend>(
    backend: B,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    options: ServerOptions,
) -> BackgroundServer {
    let prompter = Prompter::new(tokenizer).expect("chat template");
    let engine = Engine::start(backend, prompter, "test-model".into(), config).expect("engine");
    BackgroundServer::start(engine, options, "127.0.0.1:0".parse().unwrap()).expect("server")
}

fn model_server(
    kv: CpuKv,
    config: EngineConfig,
    options: ServerOptions,
) -> Option<BackgroundServer> {
    let s = shared()?;
    let config = EngineConfig {
        max_context: s
            .model
            .config
            .max_position_embeddings
            .min(config.max_context),
        ..config
    };
    let _ = &s.name;
    Some(start(
        CpuBackend::new(s.model.clone(), kv),
        s.tokenizer.clone(),
        config,
        options,
    ))
}

fn content(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------- tests with SmolLM2

#[test]
fn greedy_answer_equals_generate_and_stream_equals_non_stream() {
    let no_reuse = EngineConfig {
        max_prefix_entries: 0,
        ..EngineConfig::default()
    };
    let Some(server) = model_server(CpuKv::F32, no_reuse, ServerOptions::default()) else {
        return;
    };
    let prompt = "What is the capital of France?";
    let req = json!({"messages": user(prompt), "max_tokens": 8, "temperature": 0});
    let r = chat(server.addr, &req);
    let answer = content(&r);
    let usage = &r.json()["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 8);

    let out = Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .args(["generate", "--prompt", prompt, "--max-tokens", "8"])
        .output()
        .expect("generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answer, generated.strip_suffix('\n').unwrap_or(&generated));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("; {completion} generated in")),
        "generate made another number of tokens than {completion}: {stderr}"
    );

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let s = chat(server.addr, &sreq);
    assert_eq!(s.status, 200);
    assert!(s
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = s.sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer);
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(
        finish,
        vec![r.json()["choices"][0]["finish_reason"].as_str().unwrap()]
    );
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        completion
    );
    server.stop().unwrap();
}

#[test]
fn bad_requests_get_openai_errors() {
    let opts = ServerOptions {
        max_body_bytes: 4096,
        ..ServerOptions::default()
    };
    let cfg = EngineConfig {
        max_context: 64,
        ..EngineConfig::default()
    };
    let Some(server) = model_server(CpuKv::F16, cfg, opts) else {
        return;
    };
    let a = server.addr;
    let post = |body: &[u8]| http(a, "POST", "/v1/chat/completions", &[], body);
    let cases: Vec<(&str, Response, u16, Option<&str>)> = vec![
        ("malformed JSON", post(b"{\"messages\": ["), 400, None),
        (
            "invalid UTF-8",
            post(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"),
            400,
            None,
        ),
        (
            "unknown field",
            post(br#"{"messages":[{"role":"user","content":"hi"}],"bogus":1}"#),
            400,
            Some("bogus"),
        ),
        (
            "negative max_tokens",
            post(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":-5}"#),
            400,
            Some("max_tokens"),
        ),
        ("missing messages", post(br#"{"model":"x"}"#), 400, None),
        (
            "bad role",
            post(br#"{"messages":[{"role":"robot","content":"hi"}]}"#),
            400,
            Some("messages[0].role"),
        ),
        ("huge body", post(&vec![b' '; 6000]), 413, None),
        (
            "long context",
            post(
                json!({"messages": user(&"word ".repeat(80))})
                    .to_string()
                    .as_bytes(),
            ),
            400,
            Some("messages"),
        ),
        (
            "no route",
            http(a, "GET", "/v2/nothing", &[], b""),
            404,
            None,
        ),
    ];
    for (what, r, status, param) in cases {
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let e = r.json();
        let err = &e["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {e}"
        );
        assert!(
            err["type"].is_string() && err.get("param").is_some() && err.get("code").is_some(),
            "{what}: {e}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}: {e}");
        }
    }
    // The context error says what to change.
    let r = post(
        json!({"messages": user(&"word ".repeat(80))})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // Nothing was admitted, and the server still answers.
    let m = metrics(a);
    assert_eq!(metric(&m, "triaxkv_requests_total"), 0.0);
    assert_eq!(http(a, "GET", "/health", &[], b"").status, 200);
    server.stop().unwrap();
}

#[test]
fn api_key_guards_the_v1_routes() {
    let opts = ServerOptions {
        api_key: Some("sekrit".into()),
        ..ServerOptions::default()
    };
    let Some(server) = model_server(CpuKv::F16, EngineConfig::default(), opts) else {
        return;
    };
    let a = server.addr;
    let r = http(a, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = http(
        a,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        &[],
        json!({"messages": user("hi")}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 401);
    let r = http(
        a,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer sekrit")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "test-model");
    assert_eq!(http(a, "GET", "/health", &[], b"").status, 200);
    server.stop().unwrap();
}

/// Eight clients at once on a mixed-precision cache: all answer; afterwards no sequence is
/// live and the only KV bytes left are the kept prefixes'.
#[test]
fn eight_concurrent_clients_finish_and_free_their_caches() {
    let Some(s) = shared() else { return };
    let layers = s.model.config.num_layers;
    let policy = triaxkv::kvcache::KvPolicy::uniform(
        layers,
        triaxkv::kvcache::PrecisionClass::new(4, 2).unwrap(),
    );
    let kv = CpuKv::Mixed {
        policy,
        config: triaxkv::kvcache::QuantCacheConfig::default(),
    };
    let Some(server) = model_server(kv, EngineConfig::default(), ServerOptions::default()) else {
        return;
    };
    let a = server.addr;
    // A system prompt long enough that tokens leave the 16-bit window.
    let system = "You are a terse assistant. ".repeat(15);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let system = system.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": format!("Say the number {i}.")}],
                    "max_tokens": 6, "temperature": 0.7, "seed": i,
                });
                let r = chat(a, &body);
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                r.json()["usage"]["completion_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap() > 0);
    }
    let m = wait_for(a, "an idle engine", |m| {
        metric(m, "triaxkv_live_sequences") == 0.0
    });
    assert_eq!(
        metric(&m, "triaxkv_requests_finished_total{reason=\"stop\"}")
            + metric(&m, "triaxkv_requests_finished_total{reason=\"length\"}"),
        8.0
    );
    assert_eq!(metric(&m, "triaxkv_queue_depth"), 0.0);
    assert_eq!(metric(&m, "triaxkv_kv_bytes{owner=\"live\"}"), 0.0);
    let kept = metric(&m, "triaxkv_kv_bytes{owner=\"prefix_cache\"}");
    let entries = metric(&m, "triaxkv_prefix_cache_entries");
    assert!(kept > 0.0 && (1.0..=8.0).contains(&entries), "{m}");
    // Packed 4/2-bit codes are in use: fewer than 16 bits per element.
    let bits = metric(&m, "triaxkv_kv_effective_bits");
    assert!(bits > 2.0 && bits < 16.0, "effective bits {bits}");
    assert!(
        metric(&m, "triaxkv_kv_token_layers{class=\"k4v2\"}") > 0.0,
        "{m}"
    );
    assert!(metric(&m, "triaxkv_generated_tokens_total") >= 8.0);
    server.stop().unwrap();
}

/// The second turn of a conversation reuses the first turn's cache.
#[test]
fn next_turn_reuses_the_kept_prefix() {
    let Some(server) = model_server(
        CpuKv::F16,
        EngineConfig::default(),
        ServerOptions::default(),
    ) else {
        return;
    };
    let a = server.addr;
    let first = json!({"messages": user("Name a fruit."), "max_tokens": 6, "temperature": 0});
    let r1 = chat(a, &first);
    let answer = content(&r1);
    let p1 = r1.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let second = json!({
        "messages": [{"role": "user", "content": "Name a fruit."},
                     {"role": "assistant", "content": answer},
                     {"role": "user", "content": "Another one?"}],
        "max_tokens": 4, "temperature": 0,
    });
    let r2 = chat(a, &second);
    assert_eq!(r2.status, 200);
    let cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= p1,
        "reused {cached} tokens, the first prompt alone had {p1}"
    );
    let m = metrics(a);
    assert_eq!(
        metric(&m, "triaxkv_prefix_cache_lookups_total{result=\"hit\"}"),
        1.0
    );
    server.stop().unwrap();
}

/// Read an SSE response until its first content chunk; returns the open stream.
fn open_stream(addr: SocketAddr, body: &Value) -> BufReader<TcpStream> {
    let s = send_request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
        if line.contains("\"content\"") && !line.contains("\"content\":\"\"") {
            return r;
        }
    }
}

#[test]
fn disconnects_cancel_and_a_full_queue_answers_429() {
    let cfg = EngineConfig {
        max_live: 1,
        max_queue: 1,
        ..EngineConfig::default()
    };
    let story = "and then ".repeat(300);
    let Some((server, _)) = scripted_server(&story, cfg, 100, 20) else {
        return;
    };
    let a = server.addr;
    let long =
        json!({"messages": user("Tell me a long story."), "max_tokens": 500, "stream": true});
    let first = open_stream(a, &long);
    // A second request waits in the queue (one live sequence at most)...
    let waiting =
        std::thread::spawn(move || chat(a, &json!({"messages": user("Hi!"), "max_tokens": 3})));
    wait_for(a, "a queued request", |m| {
        metric(m, "triaxkv_queue_depth") == 1.0
    });
    // ...so a third is refused.
    let r = chat(a, &json!({"messages": user("Hello?"), "max_tokens": 3}));
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Hanging up on the stream cancels it and frees its cache; the queued one then runs.
    drop(first);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200);
    let m = wait_for(a, "the cancellation", |m| {
        metric(m, "triaxkv_requests_finished_total{reason=\"cancelled\"}") == 1.0
    });
    assert!(metric(&m, "triaxkv_generated_tokens_total") < 500.0);

    // A non-streaming client that hangs up is cancelled too.
    let body = json!({"messages": user("Another story."), "max_tokens": 500});
    let s = send_request(
        a,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    wait_for(a, "a live sequence", |m| {
        metric(m, "triaxkv_live_sequences") == 1.0
    });
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    let m = wait_for(a, "the second cancellation", |m| {
        metric(m, "triaxkv_requests_finished_total{reason=\"cancelled\"}") == 2.0
            && metric(m, "triaxkv_live_sequences") == 0.0
    });
    assert_eq!(metric(&m, "triaxkv_kv_bytes{owner=\"live\"}"), 0.0);
    assert!(metric(&m, "triaxkv_generated_tokens_total") < 1000.0);
    server.stop().unwrap();
}

/// The binary prints its address for `--port 0`, and SIGTERM lets an open stream finish.
#[test]
fn binary_serves_and_drains_on_sigterm() {
    if shared().is_none() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .args(["serve", "--port", "0", "--kv", "f32"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let body = json!({"messages": user("Count from one to ten."), "max_tokens": 12, "temperature": 0, "stream": true});
    let mut stream = open_stream(addr, &body);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    // The chunked body ends with the last event, then the zero-size chunk.
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    let t = Instant::now();
    let code = loop {
        if let Some(c) = child.try_wait().unwrap() {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

// ---------------------------------------------------------------- scripted backend

/// Answers every prompt with the same scripted tokens (one-hot logits), so tool calls,
/// stop strings, cancellation and memory pressure can be tested exactly and fast.
struct Scripted {
    script: Vec<u32>,
    end: u32,
    /// `<|im_start|>assistant\n`: the answer starts after its last occurrence.
    header: Vec<u32>,
    vocab: usize,
    bytes_per_token: usize,
    delay: Duration,
}

struct ScriptedSeq {
    ids: Vec<u32>,
}

impl Backend for Scripted {
    type Seq = ScriptedSeq;
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn new_seq(&self) -> Result<ScriptedSeq, BackendError> {
        Ok(ScriptedSeq { ids: Vec::new() })
    }
    fn len(&self, s: &ScriptedSeq) -> usize {
        s.ids.len()
    }
    fn truncate(&self, s: &mut ScriptedSeq, len: usize) {
        s.ids.truncate(len);
    }
    fn usage(&self, s: &ScriptedSeq) -> KvUsage {
        KvUsage {
            half: s.ids.len() * self.bytes_per_token,
            elements: s.ids.len() * self.bytes_per_token / 2,
            ..KvUsage::default()
        }
    }
    fn class_tokens(&self, s: &ScriptedSeq) -> Vec<(String, usize)> {
        vec![("k16v16".into(), s.ids.len())]
    }
    fn estimate_bytes(&self, tags: &[TokenTag]) -> usize {
        tags.len() * self.bytes_per_token
    }
    fn forward(&self, w: Work<'_, ScriptedSeq>) -> Result<Vec<f32>, BackendError> {
        std::thread::sleep(self.delay);
        let s = w.seq;
        s.ids.extend_from_slice(w.tokens);
        if !w.logits {
            return Ok(Vec::new());
        }
        let h = self.header.len();
        let answer_start = (0..=s.ids.len().saturating_sub(h))
            .rev()
            .find(|&i| s.ids[i..].starts_with(&self.header))
            .map_or(s.ids.len(), |i| i + h);
        let next = self
            .script
            .get(s.ids.len() - answer_start)
            .copied()
            .unwrap_or(self.end);
        // Certain even when sampled at temperature 1 (OpenAI's default).
        let mut logits = vec![-100.0; self.vocab];
        logits[next as usize] = 100.0;
        Ok(logits)
    }
}

fn scripted_server(
    text: &str,
    config: EngineConfig,
    bytes_per_token: usize,
    delay_ms: u64,
) -> Option<(BackgroundServer, Arc<Tokenizer>)> {
    let tok = shared()?.tokenizer.clone();
    let backend = Scripted {
        script: tok.encode(text).unwrap(),
        end: tok.token_to_id("<|im_end|>").unwrap(),
        header: tok.encode("<|im_start|>assistant\n").unwrap(),
        vocab: tok.vocab_size(),
        bytes_per_token,
        delay: Duration::from_millis(delay_ms),
    };
    let config = EngineConfig {
        max_prefix_entries: 0,
        ..config
    };
    Some((
        start(backend, tok.clone(), config, ServerOptions::default()),
        tok,
    ))
}

#[test]
fn tool_calls_are_parsed_in_both_modes() {
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let Some((server, _)) = scripted_server(call, EngineConfig::default(), 100, 1) else {
        return;
    };
    let a = server.addr;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let with_tools =
        json!({"messages": user("Weather in Paris?"), "tools": tools, "max_tokens": 64});
    let r = chat(a, &with_tools);
    assert_eq!(r.status, 200);
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let tc = &choice["message"]["tool_calls"][0];
    assert_eq!(tc["type"], "function");
    assert_eq!(tc["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(tc["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(tc["id"].as_str().unwrap().starts_with("call_"));
    // The tool schemas are in the prompt.
    let plain = chat(
        a,
        &json!({"messages": user("Weather in Paris?"), "max_tokens": 64}),
    );
    let p_tools = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let p_plain = plain.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(p_tools > p_plain + 50, "{p_tools} vs {p_plain}");
    // Without tools the text is returned as is.
    assert_eq!(content(&plain), call);

    let mut s = with_tools.clone();
    s["stream"] = json!(true);
    let r = chat(a, &s);
    let events = r.sse();
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0][0]["function"]["name"], "get_weather");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    server.stop().unwrap();
}

#[test]
fn stop_strings_cut_the_answer() {
    let Some((server, _)) = scripted_server(
        "Hello there. STOP and more text",
        EngineConfig::default(),
        100,
        1,
    ) else {
        return;
    };
    let r = chat(
        server.addr,
        &json!({"messages": user("hi"), "stop": ["STOP", "zzz"]}),
    );
    assert_eq!(content(&r), "Hello there. ");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    let r = chat(
        server.addr,
        &json!({"messages": user("hi"), "max_tokens": 2}),
    );
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    let mut streamed = json!({"messages": user("hi"), "stop": "STOP", "stream": true});
    let s = chat(server.addr, &streamed);
    let text: String = s
        .sse()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Hello there. ");
    streamed["stop"] = json!(5);
    assert_eq!(chat(server.addr, &streamed).status, 400);
    server.stop().unwrap();
}

/// Two sequences that together outgrow the KV memory: the newer is preempted, recomputed
/// later, and both still get the whole answer; nothing stays allocated.
#[test]
fn memory_pressure_preempts_and_recomputes() {
    let text = &"one two three four five six seven eight nine ten ".repeat(15);
    let Some(tok) = shared().map(|s| s.tokenizer.clone()) else {
        return;
    };
    let script_len = tok.encode(text).unwrap().len();
    let prompt_len = Prompter::new(tok.clone())
        .unwrap()
        .render(&serde_json::from_value(json!({"id": "x", "messages": user("hi")})).unwrap())
        .unwrap()
        .ids
        .len();
    // Room for both prompts plus headroom at admission and for one whole answer, not two.
    let bpt = 1000;
    let kv_memory = bpt * (2 * (prompt_len + 16) + script_len);
    let cfg = EngineConfig {
        kv_memory,
        ..EngineConfig::default()
    };
    let (server, _) = scripted_server(text, cfg, bpt, 2).unwrap();
    let a = server.addr;
    let clients: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                content(&chat(
                    a,
                    &json!({"messages": user("hi"), "max_tokens": 1000}),
                ))
            })
        })
        .collect();
    for c in clients {
        assert_eq!(&c.join().unwrap(), text);
    }
    let m = wait_for(a, "an idle engine", |m| {
        metric(m, "triaxkv_live_sequences") == 0.0
    });
    assert!(metric(&m, "triaxkv_preemptions_total") >= 1.0, "{m}");
    assert_eq!(metric(&m, "triaxkv_kv_bytes{owner=\"live\"}"), 0.0);
    assert_eq!(metric(&m, "triaxkv_queue_depth"), 0.0);
    server.stop().unwrap();
}

/// The whole HTTP server over the GPU backend's block pool with `HostCheck` standing in for
/// the device (every zero / move / quantize / prefill / decode request checked against the
/// pool; its logits make token `(7·id + 3) mod vocab` greedy after `id`): 12 concurrent
/// clients of three-turn conversations with a long system prompt (tokens leave the window
/// into INT2/INT4 blocks) in a pool that cannot hold them all. Every answer is the token chain
/// the logits dictate (so each sequence read its own rows), later turns reuse kept prefixes,
/// no request fails (a sequence the pool cannot grow is preempted and recomputed; the run
/// prints how many), and once the server stops the pool is whole again.
#[test]
fn gpu_pool_backend_serves_http_with_every_request_checked() {
    gpu_pool_http("profiles/triaxial-2.97.json", false);
}

/// The same with a window-0 profile whose generated tokens go straight into the FP8 waiting
/// blocks (`serve --gpu --wait-fp8 --sinks-fp8 --decode-fp8`): kept prefixes are cut back off
/// the end of those blocks.
#[test]
fn gpu_pool_backend_serves_http_with_fp8_decode() {
    gpu_pool_http("profiles/tag-only-2.55-w0.json", true);
}

/// And with a profile allocated with `--hold-fp8` (a 32-token window kept in the FP8 waiting
/// blocks): no flags needed, the pool holds it as allocated.
#[test]
fn gpu_pool_backend_serves_http_with_an_fp8_window() {
    gpu_pool_http("profiles/tag-only-2.57-w32-fp8.json", true);
}

fn gpu_pool_http(profile: &str, fp8: bool) {
    use triaxkv::gpu::decode_step::ModelShape;
    use triaxkv::gpu::serve_bench::HostCheck;
    use triaxkv::gpu::{GpuBackend, PoolSpec};
    use triaxkv::paged::pool::Fp8Hold;
    let Some(s) = shared() else { return };
    let profile = triaxkv::profile::Profile::read(std::path::Path::new(profile))
        .expect("the shipped profile");
    let shape = ModelShape::of_config("smol", &s.model.config);
    // Slots of this pool: 3 KV heads × 30 layers × the largest class's slab.
    let spec = PoolSpec {
        fp8: Fp8Hold {
            wait: fp8,
            sinks: fp8,
            decode: fp8,
            window: false,
        }
        .or_hold(profile.cache.hold_fp8),
        ..PoolSpec::of_profile(&profile, 110 << 20)
    };
    let backend = GpuBackend::checked(&shape, spec, 256).unwrap();
    let device = backend.device_handle();
    let pool = backend.pool_handle();
    let (free0, total) = backend.pool_slots();
    assert_eq!(free0, total);
    let config = EngineConfig {
        kv_memory: backend.admission_bytes(256, 8).unwrap(),
        max_live: 8,
        prefill_chunk: 96,
        step_tokens: 256,
        ..EngineConfig::default()
    };
    let prompter = Prompter::new(s.tokenizer.clone()).unwrap();
    let end_ids = prompter.end_ids();
    let server = start(
        backend,
        s.tokenizer.clone(),
        config,
        ServerOptions::default(),
    );
    let a = server.addr;
    let vocab = s.tokenizer.vocab_size();
    let system = "You are a careful coding agent working in a large repository. ".repeat(12);
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let (system, prompter, end_ids) = (system.clone(), prompter.clone(), end_ids.clone());
            std::thread::spawn(move || {
                let mut messages = vec![
                    json!({"role": "system", "content": system}),
                    json!({"role": "user", "content": format!("Task {i}: list the files.")}),
                ];
                for turn in 0..3 {
                    let body =
                        json!({"messages": messages, "max_tokens": 12 + i, "temperature": 0});
                    let req =
                        serde_json::from_value(json!({"id": "x", "messages": messages})).unwrap();
                    let ids = prompter.render(&req).unwrap().ids;
                    let mut want = Vec::new();
                    let mut last = *ids.last().unwrap();
                    while want.len() < 12 + i {
                        last = HostCheck::next_token(last, vocab);
                        if end_ids.contains(&last) {
                            break;
                        }
                        want.push(last);
                    }
                    let r = chat(a, &body);
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let got = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
                    assert_eq!(got as usize, want.len(), "client {i} turn {turn}");
                    let text = content(&r);
                    messages.push(json!({"role": "assistant", "content": text}));
                    let listing = format!("file_{i}_{turn}.rs ").repeat(20);
                    messages.push(json!({"role": "user", "content": format!("ls: {listing}")}));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let m = wait_for(a, "an idle engine", |m| {
        metric(m, "triaxkv_live_sequences") == 0.0
    });
    assert_eq!(metric(&m, "triaxkv_kv_bytes{owner=\"live\"}"), 0.0);
    assert_eq!(
        metric(&m, "triaxkv_requests_finished_total{reason=\"error\"}"),
        0.0
    );
    // The pool and the engine's accounting agree: the slots in use are the kept prefixes'.
    let used = metric(&m, "triaxkv_kv_pool_slots{state=\"used\"}");
    let slot_bytes = metric(&m, "triaxkv_kv_pool_slot_bytes");
    assert_eq!(
        used * slot_bytes,
        metric(&m, "triaxkv_kv_bytes{owner=\"prefix_cache\"}"),
        "{m}"
    );
    assert!(used > 0.0, "no prefix kept: {m}");
    let frag = metric(&m, "triaxkv_kv_fragmentation");
    assert!(frag > 0.0 && frag < 1.0, "fragmentation {frag}");
    // Hits depend on which kept prefixes memory pressure evicted first (timing): at least one.
    assert!(
        metric(&m, "triaxkv_prefix_cache_reused_tokens_total") > 0.0,
        "{m}"
    );
    assert!(
        metric(&m, "triaxkv_kv_token_layers{class=\"k2v2\"}") > 0.0,
        "{m}"
    );
    eprintln!(
        "pool backend: {} preemptions, {} prefix hits, {} slots",
        metric(&m, "triaxkv_preemptions_total"),
        metric(&m, "triaxkv_prefix_cache_lookups_total{result=\"hit\"}"),
        total
    );
    server.stop().unwrap();
    // The engine (and its kept prefixes) are gone: every slot is free again.
    let p = pool.lock().unwrap();
    assert_eq!(p.free(), p.total(), "slots leaked");
    // Generated tokens went straight into FP8 waiting blocks only when asked to.
    let d = device.lock().unwrap();
    eprintln!(
        "pool backend: {} generated tokens appended in FP8, {} waiting blocks trimmed",
        d.fp8_appends, d.trimmed
    );
    assert_eq!(d.fp8_appends > 0, fp8, "{} FP8 appends", d.fp8_appends);
}
