//! `triaxkv eval`: fidelity of profiles against the unquantized KV cache on trace files
//! (eval.json, eval.md, pareto.svg/.png), and `eval proxy`, the distortion-vs-KL check.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use triaxkv::eval::proxy::{self, ProxyOptions};
use triaxkv::eval::{evaluate, prepare_plans, report, EvalOptions, NamedProfile};
use triaxkv::model::load;
use triaxkv::profile::{ModelIdentity, Profile};
use triaxkv::trace::read_glob;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    /// GGUF file or safetensors directory [default: the bundled SmolLM2 from scripts/setup.sh].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Profiles to evaluate (triaxkv.profile/v1 JSON, made by `triaxkv allocate`).
    #[arg(long, required = true, num_args = 1.., value_name = "PROFILE")]
    profile: Vec<PathBuf>,
    /// Trace JSONL files, folders or glob patterns.
    #[arg(long, required = true, num_args = 1.., value_name = "GLOB")]
    traces: Vec<String>,
    /// Output folder: eval.json, eval.md, pareto.svg, pareto.png.
    #[arg(short = 'o', long = "out", required = true, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Replay at most N tokens of each trajectory (the model context is always the limit).
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Recorded tool-call steps regenerated greedily per trajectory (0 = none).
    #[arg(long, default_value_t = 2, value_name = "N")]
    tool_calls: usize,
    /// New tokens per tool-call generation at most.
    #[arg(long, default_value_t = 96, value_name = "N")]
    gen_tokens: usize,
    /// Assistant positions scored per trajectory, spread evenly (0 = all). Each scored token
    /// is replayed as a decode step so its 16-bit window is exact; scoring all of them costs
    /// about one forward per assistant token.
    #[arg(long, default_value_t = 128, value_name = "N")]
    positions: usize,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Quantize keys per channel over blocks of N tokens in every profile (its
    /// `cache.block_tokens`; the name gets `-kbN`): 128 measures what a GPU pool made with
    /// `bench serve --k-group 128` stores (INT2 keys grouped over the whole block).
    #[arg(long, value_name = "N")]
    key_block: Option<usize>,
    /// Quantize value groups with the least-squares range of a grid of cuts of [min, max]
    /// instead of min/max, in every profile (the name gets `-vclip`). An experiment: the GPU
    /// pool and `serve` quantize with min/max.
    #[arg(long)]
    value_clip: bool,
    /// Keep this fraction of every per-channel key block exactly (dense-and-sparse, as
    /// KVQuant; 4 bytes each, counted in the measured bits), quantizing the rest over the
    /// narrowed ranges, in every profile (the name gets `-koN`). An experiment: the GPU pool
    /// and `serve` hold no outliers.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    key_outliers: f64,
    /// Choose the key outliers over all KV heads of a group together (a head may take more
    /// than its share) instead of a fixed number per head as the packed layout stores them
    /// (the name gets `-pooled`). An experiment.
    #[arg(long)]
    key_outliers_pooled: bool,
    /// Per-channel keys wait for their key group in FP8 (E4M3, scale 1) instead of 16 bits
    /// and values are quantized from their E4M3 rounding, in every profile (the name gets
    /// `-wait8`): what `bench serve --wait fp8` stores.
    #[arg(long)]
    wait_fp8: bool,
    /// The attention sinks are held in FP8 (E4M3, scale 1) once out of the window, in every
    /// profile (the name gets `-sink8`): what `bench serve --sinks-fp8` stores.
    #[arg(long)]
    sinks_fp8: bool,
    /// Tokens of quantized classes are held in FP8 (E4M3, scale 1) while in the residual
    /// window too, in every profile (the name gets `-win8`; needs `--wait-fp8`): what `bench
    /// serve --window-fp8` stores.
    #[arg(long, requires = "wait_fp8")]
    window_fp8: bool,
}

#[derive(Debug, clap::Subcommand)]
enum EvalCommand {
    /// Does the calibration table's distortion predict end-to-end KL? Quantize one tag at a
    /// time and rank-correlate (proxy.md, proxy.json, proxy.svg/.png).
    Proxy(ProxyArgs),
    /// Does the GPU forward (bf16 weights, 16-bit paged cache) compute what the CPU forward
    /// computes? Top-1 agreement and KL at every position (gpu-forward.json, gpu-forward.md).
    GpuForward(GpuForwardArgs),
}

#[derive(Debug, clap::Args)]
pub struct GpuForwardArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Trace JSONL files, folders or glob patterns.
    #[arg(long, num_args = 1.., value_name = "GLOB", default_values_t = ["traces/test".to_string()])]
    traces: Vec<String>,
    /// Tokens of each trajectory run through both forwards (every position is compared).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_tokens: usize,
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    out: PathBuf,
    /// Tokens per GPU prefill step.
    #[arg(long, default_value_t = 256, value_name = "N")]
    chunk: usize,
    /// The last N tokens of each trajectory run by GPU decode steps (the rest by prefill).
    #[arg(long, default_value_t = 64, value_name = "N")]
    decode_tail: usize,
    /// Exit non-zero when the total top-1 agreement is below this.
    #[arg(long, default_value_t = 0.995)]
    min_agreement: f64,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration folder holding sensitivity.parquet.
    #[arg(long, value_name = "DIR")]
    calib: PathBuf,
    #[arg(long, required = true, num_args = 1.., value_name = "GLOB")]
    traces: Vec<String>,
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    out: PathBuf,
    /// Bit width the single tag is quantized to.
    #[arg(long, default_value_t = 2)]
    bits: u8,
    #[arg(long, default_value_t = 2048, value_name = "N")]
    max_tokens: usize,
    /// The K most common tags (by token share in the table).
    #[arg(long, default_value_t = 6, value_name = "K")]
    tags: usize,
    /// Use at most N trajectories, spread over the trace set (0 = all).
    #[arg(long, default_value_t = 4, value_name = "N")]
    trajectories: usize,
    /// Assistant positions scored per trajectory, spread evenly (0 = all). Each scored token
    /// is replayed as a decode step so its 16-bit window is exact; scoring all of them costs
    /// about one forward per assistant token.
    #[arg(long, default_value_t = 128, value_name = "N")]
    positions: usize,
    #[arg(long)]
    threads: Option<usize>,
}

fn threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.command {
        Some(EvalCommand::Proxy(p)) => return run_proxy(p),
        Some(EvalCommand::GpuForward(g)) => return run_gpu_forward(g),
        None => {}
    }
    threads(args.threads)?;
    let Some(out) = args.out else {
        bail!("-o DIR is required");
    };
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    if args.tool_calls > 0 && args.gen_tokens == 0 {
        bail!("--gen-tokens must be at least 1 when --tool-calls is not 0");
    }
    if args.key_block == Some(0) {
        bail!("--key-block must be at least 1 token");
    }
    let files = read_glob(&args.traces).context("reading --traces")?;
    if files.iter().all(|f| f.trajectories.is_empty()) {
        bail!("no trajectories in {}", args.traces.join(" "));
    }
    // Every profile is read and validated before the model loads, and checked against it
    // before any replay.
    let read = args
        .profile
        .iter()
        .map(|p| {
            let mut profile = Profile::read(p)?;
            if let Some(k) = args.key_block {
                profile.cache.block_tokens = k;
                profile.name = format!("{}-kb{k}", profile.name);
            }
            if args.value_clip {
                profile.name = format!("{}-vclip", profile.name);
            }
            if args.key_outliers > 0.0 {
                profile.name = format!("{}-ko{}", profile.name, args.key_outliers);
            }
            if args.key_outliers_pooled {
                profile.name = format!("{}-pooled", profile.name);
            }
            if args.wait_fp8 {
                profile.name = format!("{}-wait8", profile.name);
            }
            if args.sinks_fp8 {
                profile.name = format!("{}-sink8", profile.name);
            }
            if args.window_fp8 {
                profile.name = format!("{}-win8", profile.name);
            }
            Ok((p.clone(), profile))
        })
        .collect::<Result<Vec<_>, triaxkv::profile::ProfileError>>()?;
    let model = load::load_or_default(args.model.as_deref()).context("loading the model")?;
    let identity = ModelIdentity::of(&model);
    let profiles = read
        .into_iter()
        .map(|(path, profile)| {
            profile.check_model(&path, &identity)?;
            Ok(NamedProfile { path, profile })
        })
        .collect::<Result<Vec<_>, triaxkv::profile::ProfileError>>()?;
    let opts = EvalOptions {
        max_tokens: args.max_tokens,
        tool_calls: args.tool_calls,
        gen_tokens: args.gen_tokens,
        positions: (args.positions > 0).then_some(args.positions),
        progress: true,
        value_clip: args.value_clip,
        wait_fp8: args.wait_fp8,
        sinks_fp8: args.sinks_fp8,
        window_fp8: args.window_fp8,
        key_outliers: args.key_outliers,
        key_outliers_pooled: args.key_outliers_pooled,
        ..EvalOptions::default()
    };
    let (plans, notes) = prepare_plans(
        &model,
        &files,
        opts.max_tokens,
        opts.positions,
        opts.tool_calls,
    )?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let tokens: usize = plans.iter().map(|p| p.replay_len()).sum();
    eprintln!(
        "evaluating {} profile(s) on {} trajectories ({tokens} tokens each replay) with {}",
        profiles.len(),
        plans.len(),
        model.name
    );
    let r = evaluate(&model, &plans, &profiles, &opts, notes)?;
    report::write(&r, &out)?;
    println!("{}", report::markdown(&r));
    println!(
        "wrote {}/{{eval.json,eval.md,pareto.svg,pareto.png}} in {:.1} s",
        out.display(),
        r.wall_s
    );
    Ok(())
}

fn run_proxy(args: ProxyArgs) -> Result<()> {
    threads(args.threads)?;
    if args.max_tokens == 0 || args.tags == 0 {
        bail!("--max-tokens and --tags must be at least 1");
    }
    let files = read_glob(&args.traces).context("reading --traces")?;
    if files.iter().all(|f| f.trajectories.is_empty()) {
        bail!("no trajectories in {}", args.traces.join(" "));
    }
    let model = load::load_or_default(args.model.as_deref()).context("loading the model")?;
    let opts = ProxyOptions {
        bits: args.bits,
        tags: args.tags,
        max_tokens: Some(args.max_tokens),
        trajectories: (args.trajectories > 0).then_some(args.trajectories),
        positions: (args.positions > 0).then_some(args.positions),
        progress: true,
        ..ProxyOptions::default()
    };
    let r = proxy::proxy_check(&model, &args.calib, &files, &opts)?;
    proxy::write(&r, &args.out)?;
    println!("{}", proxy::markdown(&r));
    println!(
        "wrote {}/{{proxy.json,proxy.md,proxy.svg,proxy.png}} in {:.1} s",
        args.out.display(),
        r.wall_s
    );
    Ok(())
}

fn run_gpu_forward(args: GpuForwardArgs) -> Result<()> {
    use triaxkv::eval::gpu_forward;
    threads(args.threads)?;
    if args.max_tokens == 0 || args.chunk == 0 {
        bail!("--max-tokens and --chunk must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.min_agreement) {
        bail!("--min-agreement must be within 0..=1");
    }
    let files = read_glob(&args.traces).context("reading --traces")?;
    if files.iter().all(|f| f.trajectories.is_empty()) {
        bail!("no trajectories in {}", args.traces.join(" "));
    }
    let gpu = triaxkv::gpu::GpuContext::open(0).context("opening the GPU")?;
    let model = load::load_or_default(args.model.as_deref()).context("loading the model")?;
    let (plans, notes) =
        triaxkv::eval::render_plans(&model, &files, Some(args.max_tokens), None, 0, false)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let total: usize = plans.iter().map(|p| p.ids.len()).sum();
    eprintln!(
        "comparing the GPU and CPU forwards of {} on {} trajectories ({total} positions) on {}",
        model.name,
        plans.len(),
        gpu.name
    );
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} positions {msg}",
        )
        .context("progress bar template")?,
    );
    let opts = gpu_forward::GpuForwardOptions {
        chunk: args.chunk,
        decode_tail: args.decode_tail,
    };
    let r = gpu_forward::compare(&gpu, &model, &plans, opts, |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let md = gpu_forward::markdown(&r);
    let json = serde_json::to_string_pretty(&r).context("serialising the report")?;
    let write = |name: &str, text: &str| -> Result<()> {
        let path = args.out.join(name);
        triaxkv::util::write_atomic(&path, |w| w.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))
    };
    write("gpu-forward.json", &json)?;
    write("gpu-forward.md", &md)?;
    println!("{md}");
    println!("wrote {}/gpu-forward.{{json,md}}", args.out.display());
    if r.total.top1_agreement < args.min_agreement {
        bail!(
            "top-1 agreement {:.4} is below --min-agreement {}",
            r.total.top1_agreement,
            args.min_agreement
        );
    }
    Ok(())
}
