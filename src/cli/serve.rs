//! `triaxkv serve`: load a model (and a profile), start the engine and the OpenAI-compatible
//! HTTP server, print the bound address, and drain on SIGINT/SIGTERM.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use triaxkv::gpu::{GpuBackend, GpuContext, PoolSpec};
use triaxkv::model::load;
use triaxkv::paged::pool::{ClassMap, Fp8Hold};
use triaxkv::profile::{ModelIdentity, Profile};
use triaxkv::quant::KvClass;
use triaxkv::runtime::{CpuBackend, CpuKv, Engine, EngineConfig, Prompter};
use triaxkv::serve::{self, ServerOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvMode {
    /// The f32 reference cache (what `triaxkv generate` uses).
    F32,
    /// Every token at 16 bits.
    F16,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// GGUF file or safetensors directory (default: the bundled SmolLM2 from scripts/setup.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A `triaxkv allocate` profile: store each (layer, K|V, tag) at its bits.
    #[arg(long, conflicts_with = "kv")]
    profile: Option<PathBuf>,
    /// KV cache precision when no --profile is given.
    #[arg(long, value_enum, default_value = "f16")]
    kv: KvMode,
    /// Run on the GPU (CUDA device 0): bf16 weights, the paged block pool of --kv-memory
    /// bytes, one class per tag from --profile (else every token 16-bit).
    #[arg(long)]
    gpu: bool,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port; the bound address is printed on stdout.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long)]
    api_key: Option<String>,
    /// KV bytes all sequences and kept prefixes may hold (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    kv_memory: usize,
    /// Requests waiting for admission before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Sequences generating at once.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Prompt plus generated tokens per request (default: the model's context length).
    #[arg(long)]
    max_context: Option<usize>,
    /// Prompt tokens read per scheduler step.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Rows one scheduler step runs at most (decode tokens plus prompt chunks): lower means
    /// steadier decoding while long prompts are read, higher means faster prompt reading.
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Finished conversations kept for prefix reuse (0 turns reuse off).
    #[arg(long, default_value_t = 64)]
    prefix_cache_entries: usize,
    /// Largest request body (e.g. 8MiB).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_body: usize,
    /// Model id listed by /v1/models (default: the model file's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// With --profile: tokens waiting for an INT4/INT2 key group wait in FP8 (E4M3, scale 1)
    /// instead of 16 bits — half the bytes of what waits, at the fidelity `eval --wait-fp8`
    /// measures.
    #[arg(long)]
    wait_fp8: bool,
    /// With --profile: the attention sinks are kept in FP8 (E4M3, scale 1) once out of the
    /// 16-bit stream, in the FP8 waiting blocks on the GPU (no 16-bit block per session for
    /// them), at the fidelity `eval --sinks-fp8` measures.
    #[arg(long)]
    sinks_fp8: bool,
    /// With --gpu, --wait-fp8 and a profile without a 16-bit window: generated tokens whose
    /// class waits in FP8 are written straight into the FP8 waiting blocks, and a sequence
    /// flushes its 16-bit stream block when its prompt is in, so no decoding sequence holds a
    /// 16-bit block (the CPU cache already stores such tokens coarser).
    #[arg(long)]
    decode_fp8: bool,
    /// With --wait-fp8 (and on the GPU --decode-fp8): the profile's residual window holds its
    /// INT4/INT2 tokens in FP8 (E4M3, scale 1) instead of 16 bits, at the fidelity `eval
    /// --window-fp8` measures; on the GPU the window lives in the FP8 waiting blocks.
    #[arg(long, requires = "wait_fp8")]
    window_fp8: bool,
}

/// `512MiB`, `2GiB`, `1.5G`, `1000000`: binary units (KiB/MiB/GiB, K/M/G) and decimal
/// ones (KB/MB/GB).
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult) as usize)
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.prefill_chunk == 0 || args.max_seqs == 0 {
        bail!("--prefill-chunk and --max-seqs must be at least 1");
    }
    if args.wait_fp8 && args.profile.is_none() {
        bail!("--wait-fp8 needs --profile: without one no token waits for a key group");
    }
    if args.sinks_fp8 && args.profile.is_none() {
        bail!("--sinks-fp8 needs --profile: without one every token is 16-bit");
    }
    if args.decode_fp8 && !(args.gpu && args.wait_fp8) {
        bail!(
            "--decode-fp8 writes generated tokens into the GPU pool's FP8 waiting blocks: it \
             needs --gpu and --wait-fp8"
        );
    }
    if args.window_fp8 && args.gpu && !args.decode_fp8 {
        bail!(
            "--window-fp8 keeps the window in the GPU pool's FP8 waiting blocks, where generated \
             tokens go: with --gpu it needs --decode-fp8"
        );
    }
    let t = Instant::now();
    let loaded = load::load_or_default(args.model.as_deref())?;
    let identity = ModelIdentity::of(&loaded);
    let kv = match &args.profile {
        Some(path) => {
            let profile = Profile::read(path)?;
            profile.check_model(path, &identity)?;
            CpuKv::Mixed {
                policy: profile
                    .to_policy()
                    .with_context(|| format!("profile {}", path.display()))?,
                config: profile.cache.cache_config().with_fp8(
                    args.wait_fp8,
                    args.sinks_fp8,
                    args.window_fp8,
                ),
            }
        }
        None => match args.kv {
            KvMode::F32 => CpuKv::F32,
            KvMode::F16 => CpuKv::F16,
        },
    };
    let max_context = args
        .max_context
        .unwrap_or(loaded.model.config.max_position_embeddings);
    let tokenizer = Arc::new(loaded.tokenizer);
    let mut prompter =
        Prompter::new(tokenizer).with_context(|| format!("model {}", loaded.name))?;
    if let Some(tower) = loaded.vision {
        // Images in requests become the model's vision tokens and features.
        prompter = prompter.with_vision(Arc::new(tower));
    }
    let config = EngineConfig {
        kv_memory: args.kv_memory,
        max_queue: args.max_queue,
        max_live: args.max_seqs,
        prefill_chunk: args.prefill_chunk,
        step_tokens: args.step_tokens,
        max_context,
        max_prefix_entries: args.prefix_cache_entries,
    };
    let engine = if args.gpu {
        if prompter.has_vision() {
            bail!("--gpu does not serve vision models yet: drop --gpu to serve it on the CPU");
        }
        if args.kv == KvMode::F32 && args.profile.is_none() {
            bail!("--gpu stores keys and values at 16 bits or a profile's classes: --kv f32 is CPU only");
        }
        let (spec, label) = match &args.profile {
            Some(path) => {
                let p = Profile::read(path)?;
                super::bench_serve::refuse_key_outliers(&p)?;
                // A `hold_fp8` profile is stored as it was allocated without the flags.
                let fp8 = Fp8Hold {
                    wait: args.wait_fp8,
                    sinks: args.sinks_fp8,
                    decode: args.decode_fp8,
                    window: args.window_fp8,
                };
                let spec = PoolSpec {
                    fp8: fp8.or_hold(p.cache.hold_fp8),
                    ..PoolSpec::of_profile(&p, args.kv_memory)
                };
                if args.decode_fp8 && p.cache.window > 0 && !spec.fp8.window {
                    eprintln!(
                        "note: profile {} keeps its newest {} tokens at 16 bits: --decode-fp8 \
                         changes nothing without --window-fp8",
                        p.name, p.cache.window
                    );
                }
                let fit = spec.map.fit(&p);
                if !fit.exact() {
                    eprintln!("warning: profile {}: {fit}", p.name);
                }
                if let Some(n) = spec.map.key_block_note(&p, spec.k_group) {
                    eprintln!("note: {n}");
                }
                (spec, p.name.clone())
            }
            None => (
                PoolSpec::new(ClassMap::uniform(KvClass::F16, 0, 0), args.kv_memory),
                "f16".to_string(),
            ),
        };
        let gpu = GpuContext::open(0).context("opening the GPU (drop --gpu to serve on the CPU)")?;
        let rows = args.step_tokens.max(args.prefill_chunk).max(args.max_seqs);
        let backend = GpuBackend::open(
            gpu,
            &loaded.name,
            &loaded.model,
            spec,
            rows,
            &label,
        )
        .context("loading the model onto the GPU")?;
        let config = EngineConfig {
            kv_memory: backend
                .admission_bytes(args.step_tokens, args.max_seqs)
                .map_err(anyhow::Error::msg)?,
            ..config
        };
        Engine::start(backend, prompter, loaded.name.clone(), config)
    } else {
        let backend = CpuBackend::new(Arc::new(loaded.model), kv);
        Engine::start(backend, prompter, loaded.name.clone(), config)
    }
    .context("starting the engine thread")?;
    let options = ServerOptions {
        api_key: args.api_key,
        max_body_bytes: args.max_body,
        model_id: args.served_model_name,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound: SocketAddr = listener.local_addr()?;
        eprintln!(
            "[model {} loaded in {:.1} s; {}; KV memory {} MiB; context {max_context}]",
            loaded.name,
            t.elapsed().as_secs_f64(),
            engine.describe(),
            args.kv_memory >> 20,
        );
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")?;
        out.flush()?;
        drop(out);
        serve::serve(listener, engine.clone(), options, async {
            serve::shutdown_signal().await;
            eprintln!("[shutting down: no new connections; finishing open requests]");
        })
        .await
        .context("serving HTTP")
    });
    engine.shutdown();
    eprintln!("[stopped]");
    result
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
