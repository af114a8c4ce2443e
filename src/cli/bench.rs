//! `triaxkv bench cpu`: prefill and decode tokens/s of the f32 CPU forward pass at several
//! context lengths on real trace text, as JSON and a markdown table.
//! `triaxkv bench attention`: the GPU decode-attention kernel per batch × context × cache
//! (`bench_attention.rs`).
//! `triaxkv bench decode-step`: a whole-model GPU decode step (`bench_decode_step.rs`).
//! `triaxkv bench serve-workload` / `serve`: concurrent agent sessions on the GPU
//! (`bench_serve.rs`).

use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::path::PathBuf;
use std::time::Instant;
use triaxkv::kvcache::{KvCache, KvShape};
use triaxkv::model::llama::{Logits, DEFAULT_PREFILL_CHUNK};
use triaxkv::model::load;
use triaxkv::model::sampling::argmax;
use triaxkv::tags::{Modality, Role, TokenTag};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of the CPU forward pass (f32 weights, f32 KV cache).
    Cpu(CpuArgs),
    /// GPU decode attention over packed KV caches: µs per call, GB/s against the measured
    /// read bandwidth, speedups over 16-bit, FP8 and (given --sdpa) PyTorch SDPA.
    Attention(super::bench_attention::AttentionArgs),
    /// One whole-model GPU decode step (random bf16 weights of a named shape: speed only)
    /// over a paged KV cache per kind: step time, attention share, tokens/s, KV bytes.
    DecodeStep(super::bench_decode_step::DecodeStepArgs),
    /// Render agent traces into a serving workload for `bench serve` (needs the tokenizer).
    ServeWorkload(super::bench_serve::WorkloadArgs),
    /// Concurrent multi-turn agent sessions served on the GPU from a fixed KV memory, per
    /// cache: sessions held, decode tokens/s, time to first token, inter-token latency.
    Serve(super::bench_serve::ServeArgs),
    /// Plots of `bench serve --json` timelines (several runs together): decode tokens/s and
    /// resident sessions over time per cache.
    ServePlot(super::bench_serve::PlotArgs),
}

#[derive(Debug, clap::Args)]
pub struct CpuArgs {
    /// GGUF file or safetensors directory (default: the bundled SmolLM2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Trace JSONL whose message text fills the context.
    #[arg(long, default_value = "traces/calib")]
    traces: PathBuf,
    /// Context lengths to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 2048, 8192])]
    contexts: Vec<usize>,
    /// Decode steps timed after each prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Prefill chunk length.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Cpu(args) => cpu(args),
        BenchCommand::Attention(args) => super::bench_attention::run(args),
        BenchCommand::DecodeStep(args) => super::bench_decode_step::run(args),
        BenchCommand::ServeWorkload(args) => super::bench_serve::workload(args),
        BenchCommand::Serve(args) => super::bench_serve::run(args),
        BenchCommand::ServePlot(args) => super::bench_serve::plot(args),
    }
}

#[derive(serde::Serialize)]
struct Row {
    context: usize,
    prefill_tokens_per_s: f64,
    prefill_seconds: f64,
    /// Part of the prefill spent in the KV cache's attention (the rest: projections, MLP,
    /// norms, RoPE).
    prefill_attention_seconds: f64,
    decode_tokens: usize,
    decode_tokens_per_s: f64,
}

fn cpu(args: CpuArgs) -> Result<()> {
    if args.contexts.is_empty() || args.contexts.contains(&0) {
        bail!("--contexts needs positive lengths, e.g. 512,2048,8192");
    }
    let started = Instant::now();
    let loaded = load::load_or_default(args.model.as_deref())?;
    let load_s = started.elapsed().as_secs_f64();
    let model = &loaded.model;
    let longest = args.contexts.iter().copied().max().unwrap_or(0);
    let ids = context_tokens(&args.traces, &loaded.tokenizer, longest)?;
    eprintln!(
        "model {} loaded in {load_s:.1} s; {} rayon threads; {} profile",
        loaded.name,
        rayon::current_num_threads(),
        profile()
    );

    let tag = TokenTag {
        role: Role::Observation,
        modality: Modality::Text,
        turn: 0,
        step: 0,
    };
    let tags = vec![tag; longest];
    let mut rows = Vec::new();
    for &ctx in &args.contexts {
        let mut timed = TimedCache {
            inner: model.new_cache(),
            attend_s: Cell::new(0.0),
        };
        let t = Instant::now();
        let logits = model.prefill(
            &ids[..ctx],
            &tags[..ctx],
            &mut timed,
            Logits::Last,
            args.chunk,
            &mut |_| {},
        );
        let prefill_s = t.elapsed().as_secs_f64();
        let attention_s = timed.attend_s.get();
        let mut cache = timed.inner;
        let mut next = argmax(&logits);
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            let l = model.forward(&[next], &[tag], &mut cache, Logits::Last);
            next = argmax(&l);
        }
        let decode_s = t.elapsed().as_secs_f64();
        debug_assert_eq!(cache.len(0), ctx + args.decode_tokens);
        let row = Row {
            context: ctx,
            prefill_tokens_per_s: ctx as f64 / prefill_s,
            prefill_seconds: prefill_s,
            prefill_attention_seconds: attention_s,
            decode_tokens: args.decode_tokens,
            decode_tokens_per_s: args.decode_tokens as f64 / decode_s.max(1e-9),
        };
        eprintln!(
            "context {ctx}: prefill {:.1} tok/s ({:.0}% in attention), decode {:.1} tok/s",
            row.prefill_tokens_per_s,
            100.0 * attention_s / prefill_s.max(1e-9),
            row.decode_tokens_per_s
        );
        rows.push(row);
    }

    println!("| context | prefill tok/s | prefill in attention | decode tok/s |");
    println!("|--------:|--------------:|---------------------:|-------------:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.0}% | {:.1} |",
            r.context,
            r.prefill_tokens_per_s,
            100.0 * r.prefill_attention_seconds / r.prefill_seconds.max(1e-9),
            r.decode_tokens_per_s
        );
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "cpu",
            "engine": "triaxkv f32 forward, f32 KV cache",
            "model": loaded.name,
            "model_sha256": loaded.sha256,
            "threads": rayon::current_num_threads(),
            "profile": profile(),
            "prefill_chunk": args.chunk,
            "load_seconds": load_s,
            "results": rows,
        });
        triaxkv::util::write_atomic(path, |w| {
            serde_json::to_writer_pretty(&mut *w, &doc)?;
            w.write_all(b"\n")
        })
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// A KV cache that adds up the wall time its attention takes.
struct TimedCache<C> {
    inner: C,
    attend_s: Cell<f64>,
}

impl<C: KvCache> KvCache for TimedCache<C> {
    fn shape(&self) -> KvShape {
        self.inner.shape()
    }

    fn len(&self, layer: usize) -> usize {
        self.inner.len(layer)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tags: &[TokenTag]) {
        self.inner.append(layer, k, v, tags)
    }

    fn attend(&self, layer: usize, q: &[f32], out: &mut [f32]) {
        let t = Instant::now();
        self.inner.attend(layer, q, out);
        self.attend_s
            .set(self.attend_s.get() + t.elapsed().as_secs_f64());
    }

    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

/// At least `n` token ids of real conversation text: the messages of the traces under
/// `path` (a JSONL file or a folder of them) as ChatML-like text, repeated if short.
fn context_tokens(
    path: &std::path::Path,
    tok: &triaxkv::model::tokenizer::Tokenizer,
    n: usize,
) -> Result<Vec<u32>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("jsonl"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut text = String::new();
    for f in &files {
        for traj in triaxkv::trace::read_jsonl(f)? {
            for m in &traj.messages {
                text.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role.as_str(),
                    m.text()
                ));
            }
        }
    }
    if text.is_empty() {
        bail!(
            "{} holds no message text to fill the context with (pass --traces FILE.jsonl)",
            path.display()
        );
    }
    let once = tok.encode(&text).context("tokenizing the trace text")?;
    if once.is_empty() {
        bail!("{} tokenized to nothing", path.display());
    }
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        ids.extend_from_slice(&once[..once.len().min(n - ids.len())]);
    }
    Ok(ids)
}
