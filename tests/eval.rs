//! `triaxkv eval` end to end on the bundled SmolLM2 (skipped with a message when it has not
//! been fetched) and the replay on a tiny random checkpoint: 16-bit profiles reproduce the
//! reference, INT2 does not, scored positions are exactly the assistant-predicting ones, a
//! tool-call generation leaves the replay untouched, and bad profiles are refused.

mod common;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use triaxkv::eval::replay::{replay, EvalCache, ReplayConfig, ReplayPlan, ToolCallStep};
use triaxkv::kvcache::{KvPolicy, PrecisionClass, QuantCache, QuantCacheConfig};
use triaxkv::model::llama::{Logits, Model};
use triaxkv::profile::{
    Budget, CacheSettings, KeyModeName, ModelIdentity, Profile, ProfileProvenance, SCHEMA,
};
use triaxkv::tags::{Modality, RecencyUnit, Role, TokenTag};
use triaxkv::trace::render::{render, RenderOptions};
use triaxkv::trace::template::ChatTemplate;
use triaxkv::trace::Trajectory;

use common::default_model as model_path;

/// A short agent trajectory: reasoning, a tool call, its result and an answer.
/// The default model's identity without dequantizing its weights.
fn identity(path: &Path) -> ModelIdentity {
    use sha2::{Digest, Sha256};
    let file = triaxkv::model::gguf::GgufFile::open(path).unwrap();
    let c = file.config().unwrap();
    ModelIdentity {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        sha256: Sha256::digest(file.bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        layers: c.num_layers,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    }
}

fn trajectory() -> Value {
    json!({
        "id": "short-agent",
        "source": "test",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "Do I need an umbrella in Paris today?"},
            {"role": "assistant", "content": "", "reasoning": "I should look up the weather for Paris.",
             "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Paris: light rain, 14 C, stopping at 17:00."},
            {"role": "assistant", "content": "Yes: light rain (14 C) until about 5 pm."},
            {"role": "user", "content": "Thanks! And tomorrow?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "c2", "name": "get_weather", "arguments": {"city": "Paris"}}]}
        ]
    })
}

/// The first five messages of [`trajectory`]: one tool-call step, few chunks to replay.
fn write_trace(dir: &Path) -> PathBuf {
    let mut t = trajectory();
    if let Some(m) = t["messages"].as_array_mut() {
        m.truncate(5);
    }
    let p = dir.join("short.jsonl");
    std::fs::write(&p, format!("{t}\n")).unwrap();
    p
}

fn profile(model: &ModelIdentity, name: &str, k: u8, v: u8) -> Profile {
    Profile {
        schema: SCHEMA.into(),
        name: name.into(),
        policy: format!("uniform-k{k}v{v}"),
        model: model.clone(),
        // A small window and blocks so most of a short trajectory is quantized.
        cache: CacheSettings {
            key_mode: KeyModeName::PerChannel,
            key_group: 16,
            value_group: 64,
            block_tokens: 16,
            sinks: 4,
            window: 16,
            recency_unit: RecencyUnit::Turn,
            hold_fp8: false,
            key_outliers: 0.0,
            key_outliers_pooled: false,
        },
        budget: Budget {
            asked_bits: None,
            achieved_bits: f64::from(k.max(v)),
            asked_bytes: None,
            context: None,
            batch: None,
        },
        bit_choices: vec![2, 4],
        default_k_bits: k,
        default_v_bits: v,
        assignments: Vec::new(),
        provenance: ProfileProvenance {
            calibration: None,
            calibration_sha256: None,
            solver: "none".into(),
            objective: None,
            solve_s: None,
            triaxkv_version: env!("CARGO_PKG_VERSION").into(),
            created_unix: 0,
            value_weight: None,
        },
    }
}

fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .arg("eval")
        .args(args)
        .output()
        .expect("the triaxkv binary runs")
}

#[test]
fn sixteen_bit_reproduces_the_reference_and_int2_does_not() {
    let Some(mp) = model_path() else { return };
    let id = identity(&mp);
    let dir = tempfile::tempdir().unwrap();
    let trace = write_trace(dir.path());
    let (p16, p2) = (dir.path().join("p16.json"), dir.path().join("p2.json"));
    profile(&id, "sixteen", 16, 16).write(&p16).unwrap();
    profile(&id, "int2", 2, 2).write(&p2).unwrap();
    let out = dir.path().join("out");
    let s = |p: &Path| p.display().to_string();
    let o = eval(&[
        "--model",
        &s(&mp),
        "--profile",
        &s(&p16),
        &s(&p2),
        "--traces",
        &s(&trace),
        "-o",
        &s(&out),
        "--tool-calls",
        "1",
        "--gen-tokens",
        "3",
        "--positions",
        "8",
        "--threads",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "eval failed: {stderr}");
    for f in ["eval.json", "eval.md", "pareto.svg", "pareto.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let (a, b) = (&r["profiles"][0], &r["profiles"][1]);
    let f = |p: &Value, k: &str| p["fidelity"][k].as_f64().unwrap();
    assert_eq!(f(a, "positions"), 8.0, "{a}");
    // f16 storage of K/V against the f32 reference: rounding only.
    assert!(
        f(a, "mean_kl") <= 1e-6,
        "16-bit mean KL {}",
        f(a, "mean_kl")
    );
    assert_eq!(f(a, "top1"), 1.0);
    assert!(f(b, "mean_kl") > 1e-3, "INT2 mean KL {}", f(b, "mean_kl"));
    assert!(f(b, "p95_kl") > 0.0 && f(b, "max_kl") >= f(b, "p95_kl"));
    assert!((f(a, "ref_ppl") - f(b, "ref_ppl")).abs() < 1e-9);
    // Per-position KL, for paired comparisons: one value per scored position, whose mean is
    // the trajectory's.
    let t = &b["per_trajectory"][0];
    let kls: Vec<f64> = t["kl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(kls.len() as f64, t["positions"].as_f64().unwrap());
    let mean = kls.iter().sum::<f64>() / kls.len() as f64;
    assert!((mean - t["mean_kl"].as_f64().unwrap()).abs() < 1e-12, "{t}");
    assert_eq!(a["effective_bits"].as_f64(), Some(16.0));
    let bits2 = b["effective_bits"].as_f64().unwrap();
    assert!(bits2 > 2.0 && bits2 < 16.0, "{bits2}");
    assert_eq!(a["tool_calls"]["steps"].as_u64(), Some(1));
    assert_eq!(a["tool_calls"]["identical"].as_u64(), Some(1));
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(
        md.contains("| sixteen |") && md.contains("| int2 |"),
        "{md}"
    );
    // INT2 against 16-bit at the same positions: the difference of the means, worse in
    // every trajectory.
    let d = &r["paired"][0];
    assert_eq!(d["profile"].as_str(), Some("int2"), "{d}");
    assert_eq!(d["against"].as_str(), Some("sixteen"));
    let diff = d["mean"].as_f64().unwrap();
    assert!(
        (diff - (f(b, "mean_kl") - f(a, "mean_kl"))).abs() < 1e-9,
        "{d}"
    );
    assert!(diff > 0.0 && d["ci95"].as_f64().unwrap() >= 0.0, "{d}");
    assert_eq!(d["lower_in"].as_u64(), Some(0));
    assert!(
        md.contains("## Against sixteen position by position"),
        "{md}"
    );
    assert!(std::fs::read_to_string(out.join("pareto.svg"))
        .unwrap()
        .contains(">int2<"));
    // --key-block replaces the profile's key blocks (and names it so): 64-token blocks keep
    // more keys staged at 16 bits on this short trace than the profile's 16 (value clipping
    // does not change the bits).
    let out64 = dir.path().join("out64");
    let o = eval(&[
        "--model",
        &s(&mp),
        "--profile",
        &s(&p2),
        "--traces",
        &s(&trace),
        "-o",
        &s(&out64),
        "--tool-calls",
        "0",
        "--positions",
        "8",
        "--threads",
        "1",
        "--key-block",
        "64",
        "--value-clip",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r64: Value =
        serde_json::from_str(&std::fs::read_to_string(out64.join("eval.json")).unwrap()).unwrap();
    let c = &r64["profiles"][0];
    // --value-clip changes how value ranges are chosen, not the format (bits): named so.
    assert_eq!(c["name"].as_str(), Some("int2-kb64-vclip"), "{c}");
    assert_eq!(r64["options"]["value_clip"].as_bool(), Some(true));
    assert_eq!(r64["paired"].as_array().map(|a| a.len()), Some(0));
    let bits64 = c["effective_bits"].as_f64().unwrap();
    assert!(bits64 > bits2, "{bits64} vs {bits2}");
    let o = eval(&[
        "--profile",
        &s(&p2),
        "--traces",
        &s(&trace),
        "-o",
        &s(&out64),
        "--key-block",
        "0",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--key-block"));
}

#[test]
fn bad_profiles_are_refused_before_any_replay() {
    let Some(mp) = model_path() else { return };
    let id = identity(&mp);
    let dir = tempfile::tempdir().unwrap();
    let trace = write_trace(dir.path());
    let out = dir.path().join("out");
    let s = |p: &Path| p.display().to_string();
    let run = |p: &Path| {
        eval(&[
            "--model",
            &s(&mp),
            "--profile",
            &s(p),
            "--traces",
            &s(&trace),
            "-o",
            &s(&out),
        ])
    };

    let mut other = id.clone();
    other.sha256 = "0".repeat(64);
    other.name = "another-model".into();
    let foreign = dir.path().join("foreign.json");
    profile(&other, "foreign", 4, 4).write(&foreign).unwrap();
    let o = run(&foreign);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("foreign.json") && e.contains("another-model") && e.contains("re-run calibrate"),
        "{e}"
    );

    let mut v = serde_json::to_value(profile(&id, "bad", 4, 4)).unwrap();
    v["default_v_bits"] = json!(3);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    let o = run(&bad);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("default_v_bits"), "{e}");

    v["default_v_bits"] = json!(4);
    v["schema"] = json!("triaxkv.profile/v0");
    std::fs::write(&bad, v.to_string()).unwrap();
    let o = run(&bad);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("triaxkv.profile/v0"),
        "{e}"
    );
    assert!(!out.exists(), "no output on error");
}

#[test]
fn scored_positions_are_exactly_the_assistant_predicting_ones() {
    let Some(mp) = model_path() else { return };
    let tok = triaxkv::model::tokenizer::Tokenizer::from_gguf_path(&mp).unwrap();
    let template = ChatTemplate::for_tokenizer(&tok).unwrap();
    let traj: Trajectory = serde_json::from_value(trajectory()).unwrap();
    let r = render(&traj, &template, &tok, &RenderOptions::default()).unwrap();
    let plan = ReplayPlan::new("f", &traj, &r, usize::MAX, None, 8);
    let predicted: BTreeSet<usize> = plan.positions.iter().map(|p| p + 1).collect();

    // Every reasoning, tool-call and answer token is predicted...
    for (t, tag) in r.tags.iter().enumerate() {
        if matches!(tag.role, Role::Reasoning | Role::ToolCall | Role::Assistant) {
            assert!(
                predicted.contains(&t),
                "token {t} ({:?}) not scored",
                tag.role
            );
        }
    }
    // ...and each run of predicted tokens is one whole assistant message after its header,
    // up to and including its end-of-turn token.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &t in &predicted {
        match runs.last_mut() {
            Some((_, e)) if *e == t => *e = t + 1,
            _ => runs.push((t, t + 1)),
        }
    }
    assert_eq!(runs.len(), 3, "one run per assistant message: {runs:?}");
    for &(a, b) in &runs {
        let before = &r.text[..r.offsets[a].0];
        let body = &r.text[r.offsets[a].0..r.offsets[b - 1].1];
        assert!(before.ends_with("<|im_start|>assistant\n"), "{before:?}");
        assert!(body.ends_with("<|im_end|>"), "{body:?}");
        assert!(!body.contains("<|im_start|>"), "{body:?}");
    }
    // The two tool-call steps start right after their headers.
    assert_eq!(plan.tool_calls.len(), 2);
    assert_eq!(plan.tool_calls[0].start, runs[0].0);
    assert_eq!(plan.tool_calls[1].start, runs[2].0);
    assert_eq!(plan.tool_calls[1].recorded[0].name, "get_weather");

    // Truncated inside the second answer: scoring stops where the tokens do.
    let cut = runs[1].0 + 5;
    let short = ReplayPlan::new("f", &traj, &r, cut, None, 8);
    assert!(short.truncated);
    assert_eq!(short.positions.last(), Some(&(cut - 2)));
    assert_eq!(short.tool_calls.len(), 1);
}

fn tiny_model() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let (config, weights) = triaxkv::model::safetensors::load_dir(&dir).unwrap();
    Model { config, weights }
}

#[test]
fn generating_a_tool_call_leaves_the_replay_untouched() {
    let model = tiny_model();
    let shape = model.kv_shape();
    let n = 160;
    let tags: Vec<TokenTag> = (0..n)
        .map(|i| TokenTag {
            role: [Role::System, Role::User, Role::Observation, Role::Assistant][(i / 13) % 4],
            modality: Modality::Text,
            turn: (i / 50) as u32,
            step: (i / 30) as u32,
        })
        .collect();
    let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 300) as u32).collect();
    let positions: Vec<usize> = (40..70).chain(104..130).chain(150..159).collect();
    let mut plan = ReplayPlan {
        id: "tiny".into(),
        file: "-".into(),
        ids,
        tags,
        assistant_positions: positions.len(),
        positions,
        tool_calls: Vec::new(),
        rendered_tokens: n,
        truncated: false,
        media: None,
    };
    let cfg = ReplayConfig {
        chunk: 32,
        gen_tokens: 40,
        eos: Vec::new(),
    };
    let qcfg = QuantCacheConfig {
        window: 8,
        block_tokens: 16,
        value_group: 16,
        key_group: 16,
        ..QuantCacheConfig::default()
    };
    let new_cache = || {
        EvalCache::Quant(Box::new(
            QuantCache::new(
                shape,
                KvPolicy::uniform(shape.num_layers, PrecisionClass::new(2, 2).unwrap()),
                qcfg,
            )
            .unwrap(),
        ))
    };
    let run = |plan: &ReplayPlan| {
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut cache = new_cache();
        let r = replay(
            &model,
            plan,
            &mut cache,
            &cfg,
            &mut |_, row| rows.push(row.to_vec()),
            &mut |_| {},
        );
        (rows, r)
    };
    let (plain, _) = run(&plan);
    plan.tool_calls = vec![ToolCallStep {
        message: 0,
        start: 105,
        recorded: Vec::new(),
    }];
    let (with_gen, r) = run(&plan);
    assert_eq!(r.generations.len(), 1);
    assert_eq!(r.generations[0].ids.len(), 40);
    assert_eq!(plain.len(), plan.positions.len());
    assert!(plain == with_gen, "the replay must not see the generation");
    let bits = r.bits.unwrap().effective_bits();
    assert!(bits > 2.0 && bits < 16.0, "{bits}");

    // What the fork avoids: generating on the live cache and truncating back changes what
    // the later positions see: the per-channel key block holding positions 100..105 was
    // sealed with generated tokens in it (105 is chosen so that block is not already full of
    // recorded tokens when generation starts).
    let mut live = new_cache();
    let mut rows = Vec::new();
    for r in plan.chunks(cfg.chunk) {
        if r.start == 105 {
            let tag = plan.tags[105];
            for _ in 0..40 {
                model.forward(&[5], &[tag], live.kv(), Logits::None);
            }
            live.kv().truncate(105);
        }
        let t = plan.tags[r.start];
        live.set_now(t.turn, t.step);
        let scored = plan.positions.contains(&(r.end - 1));
        let want = if scored { Logits::Last } else { Logits::None };
        let l = model.forward(&plan.ids[r.clone()], &plan.tags[r.clone()], live.kv(), want);
        if scored {
            rows.push(l);
        }
    }
    assert_eq!(rows.len(), plain.len());
    assert!(rows[..30] == plain[..30], "identical before the generation");
    assert!(
        rows[30..] != plain[30..],
        "truncating the live cache changes later positions"
    );
}
