//! `triaxkv bench decode-step`: time of one whole-model decode step (random bf16 weights of a
//! named shape, speed only) over a paged KV cache of each kind, split into attention and the
//! rest; JSON and a markdown table (`gpu::decode_step`).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use triaxkv::gpu::attention_bench::CacheKind;
use triaxkv::gpu::decode_step::{
    self, DecodeStepBenchConfig, DecodeStepReport, KvBuffers, ModelShape, RANDOM_WEIGHTS_NOTE,
};
use triaxkv::gpu::GpuContext;

#[derive(Debug, clap::Args)]
pub struct DecodeStepArgs {
    /// Model shape with random bf16 weights (speed only): llama3-8b, qwen3-8b or qwen3-32b.
    #[arg(long)]
    random_weights: String,
    /// Sequences per step, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [32])]
    batch: Vec<usize>,
    /// Cached tokens per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [32768])]
    context: Vec<usize>,
    /// Caches: bf16 (all 16-bit blocks; "f16" accepted: same bytes), mixed (4 sinks + 64-token
    /// window 16-bit, the rest INT2 with --mixed-int4 INT4), int2, int4, fp8.
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string(), "mixed".into()])]
    caches: Vec<String>,
    /// Share of INT4 among the tokens of `mixed` outside the sinks and window (0.05: the
    /// 2.5-bit profile).
    #[arg(long, default_value_t = 0.05)]
    mixed_int4: f64,
    /// Value group of the integer classes: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    v_group: usize,
    /// KV buffers: auto (one per layer when the whole model's cache fits, else one shared
    /// layer-sized cache read by every layer), distinct, shared.
    #[arg(long, default_value = "auto")]
    kv_buffers: String,
    /// Timed steps per shape (the median is reported).
    #[arg(long, default_value_t = 15)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the markdown table here (it is printed too).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn parse_cache(name: &str, mixed_int4: f64) -> Result<CacheKind> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "bf16" | "f16" | "fp16" => CacheKind::F16,
        "fp8" => CacheKind::Fp8,
        "int4" => CacheKind::Int4,
        "int2" => CacheKind::Int2,
        "mixed" => CacheKind::Mixed {
            int4_fraction: mixed_int4,
        },
        other => bail!("--caches: unknown cache {other:?} (bf16, mixed, int2, int4, fp8)"),
    })
}

pub fn run(args: DecodeStepArgs) -> Result<()> {
    let Some(shape) = ModelShape::by_name(&args.random_weights) else {
        bail!(
            "--random-weights {:?}: known shapes are llama3-8b, qwen3-8b, qwen3-32b",
            args.random_weights
        );
    };
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs positive sizes, e.g. 8,32");
    }
    if args.context.is_empty() || args.context.contains(&0) {
        bail!("--context needs positive lengths, e.g. 4096,32768");
    }
    if !(0.0..=1.0).contains(&args.mixed_int4) {
        bail!(
            "--mixed-int4 {} is not a fraction in [0, 1]",
            args.mixed_int4
        );
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let kv_buffers = match args.kv_buffers.as_str() {
        "auto" => KvBuffers::Auto,
        "distinct" => KvBuffers::Distinct,
        "shared" => KvBuffers::Shared,
        other => bail!("--kv-buffers {other:?}: auto, distinct or shared"),
    };
    let caches = args
        .caches
        .iter()
        .map(|c| parse_cache(c, args.mixed_int4))
        .collect::<Result<Vec<_>>>()?;
    let cfg = DecodeStepBenchConfig {
        shape,
        batches: args.batch.clone(),
        contexts: args.context.clone(),
        caches,
        v_group: args.v_group,
        kv_buffers,
        warmup: args.warmup,
        iters: args.iters,
        ..Default::default()
    };
    let gpu = GpuContext::open(args.device).context("opening the GPU for bench decode-step")?;
    eprintln!(
        "{} ({}, {} SMs, {:.1} GB); {} {}: {:.2} GB of bf16 weights",
        gpu.name,
        gpu.arch(),
        gpu.multiprocessors,
        gpu.total_memory as f64 / 1e9,
        cfg.shape.name,
        RANDOM_WEIGHTS_NOTE,
        cfg.shape.weight_bytes() as f64 / 1e9
    );
    let report = decode_step::run(&gpu, &cfg, |r| {
        eprintln!(
            "{}",
            match r.step_ms {
                Some(ms) => format!(
                    "{:<6} {:>3} x {:>6} ({} KV): step {:8.2} ms, attention {:7.2} ms ({:4.1}%), \
                     without attention {:7.2} ms, {:8.0} tokens/s{}  [{RANDOM_WEIGHTS_NOTE}]",
                    r.cache,
                    r.batch,
                    r.context,
                    r.kv_buffers.as_deref().unwrap_or("?"),
                    ms,
                    r.attention_ms.unwrap_or(f64::NAN),
                    100.0 * r.attention_share.unwrap_or(f64::NAN),
                    r.no_attention_ms.unwrap_or(f64::NAN),
                    r.tokens_per_s.unwrap_or(f64::NAN),
                    if r.finite { "" } else { "  NON-FINITE LOGITS" }
                ),
                None => format!(
                    "{:<6} {:>3} x {:>6}: skipped: {}",
                    r.cache,
                    r.batch,
                    r.context,
                    r.skipped.as_deref().unwrap_or("?")
                ),
            }
        );
    })
    .context("bench decode-step")?;
    let md = markdown(&report);
    println!("{md}");
    if let Some(path) = &args.markdown {
        triaxkv::util::write_atomic(path, |w| w.write_all(md.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "decode-step",
            "note": RANDOM_WEIGHTS_NOTE,
            "engine": "triaxkv: cuBLAS bf16 GEMMs (f32 accumulate), kernels/layer_ops.cu, \
                       kernels/decode_step.cu, kernels/decode_attention.cu via cudarc + NVRTC",
            "report": report,
        });
        triaxkv::util::write_atomic(path, |w| {
            serde_json::to_writer_pretty(&mut *w, &doc)?;
            w.write_all(b"\n")
        })
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if report.rows.iter().any(|r| r.step_ms.is_some() && !r.finite) {
        bail!("some logits were not finite (see the table)");
    }
    Ok(())
}

fn gb(b: u64) -> String {
    format!("{:.2}", b as f64 / 1e9)
}

fn markdown(r: &DecodeStepReport) -> String {
    let m = &r.model;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Decode step, {} shape with **{}**: {} layers, hidden {}, {} query / {} KV heads of {}, \
         MLP {}, vocab {} ({:.2} GB bf16 weights); {} ({}, {:.1} GB). Median of {} steps \
         ({} warm-up), CUDA events over whole steps, 256 MB L2 flush before each; value group {}.\n",
        m.name,
        r.note,
        m.layers,
        m.hidden,
        m.q_heads,
        m.kv_heads,
        m.head_dim,
        m.intermediate,
        m.vocab,
        r.weight_bytes as f64 / 1e9,
        r.device,
        r.arch,
        r.device_memory_bytes as f64 / 1e9,
        r.iters,
        r.warmup,
        r.v_group
    );
    let _ = writeln!(
        s,
        "| cache | batch × context | KV buffers | step ms | attention ms (share) | step without \
         attention ms | tokens/s | KV bits | KV read / layer GB | KV pool / layer GB | KV pool, \
         model GB | model KV + weights fit |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let f = |x: Option<f64>, p: usize| x.map_or("–".to_string(), |v| format!("{v:.p$}"));
        let _ = writeln!(
            s,
            "| {} | {} × {} | {} | {} | {} ({}) | {} | {} | {:.2} | {} | {} | {} | {} |",
            row.cache,
            row.batch,
            ctx_label(row.context),
            row.kv_buffers.as_deref().unwrap_or("skipped"),
            f(row.step_ms, 2),
            f(row.attention_ms, 2),
            row.attention_share
                .map_or("–".into(), |v| format!("{:.0}%", 100.0 * v)),
            f(row.no_attention_ms, 2),
            f(row.tokens_per_s, 0),
            row.effective_bits,
            gb(row.kv_bytes_read_per_layer),
            gb(row.kv_pool_bytes_per_layer),
            gb(row.kv_pool_bytes_model),
            if row.model_cache_fits_with_weights {
                "yes"
            } else {
                "no"
            },
        );
    }
    // bf16 / mixed per shape.
    let t: HashMap<(String, usize, usize), f64> = r
        .rows
        .iter()
        .filter_map(|x| {
            x.step_ms
                .map(|v| ((x.cache.clone(), x.batch, x.context), v))
        })
        .collect();
    let mut shapes: Vec<(usize, usize)> = r.rows.iter().map(|x| (x.batch, x.context)).collect();
    shapes.dedup();
    let mut first = true;
    for (b, c) in shapes {
        let (Some(a), Some(x)) = (
            t.get(&("bf16".to_string(), b, c)),
            t.get(&("mixed".to_string(), b, c)),
        ) else {
            continue;
        };
        if first {
            let _ = writeln!(s, "\nStep time bf16 KV / mixed KV:\n");
            first = false;
        }
        let _ = writeln!(s, "- {b} × {}: {:.2}x", ctx_label(c), a / x);
    }
    let _ = writeln!(
        s,
        "\nNotes: {}. `shared` KV buffers: every layer reads one layer-sized cache (the whole \
         model's does not fit); each layer still reads all its KV bytes from HBM (a layer's cache \
         is far larger than the L2), so bytes read and time are those of distinct buffers. \
         Attention ms: per-layer CUDA events around the attention launches, summed; the step \
         without attention skips those launches. Excluded: {}. `model KV + weights fit`: the \
         whole model's pool plus the weights within the device's {:.1} GB.",
        r.note,
        r.excluded,
        r.device_memory_bytes as f64 / 1e9
    );
    s
}

fn ctx_label(c: usize) -> String {
    if c % 1024 == 0 {
        format!("{}k", c / 1024)
    } else {
        c.to_string()
    }
}
