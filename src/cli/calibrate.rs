//! `triaxkv calibrate`: measure per-tag attention distortion on trace files and write the
//! sensitivity table, summary and heatmap (or compare quantizer settings).

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use triaxkv::calibrate::run::compare_quantizers;
use triaxkv::calibrate::{calibrate, CalibrateOptions, Protected, QuantizerSettings};
use triaxkv::model::load;
use triaxkv::quant::KeyMode;
use triaxkv::tags::RecencyUnit;
use triaxkv::trace::read_glob;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UnitArg {
    Turn,
    Step,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeyModeArg {
    #[value(name = "per-channel")]
    Channel,
    #[value(name = "per-token")]
    Token,
    #[value(name = "per-token-hadamard")]
    TokenHadamard,
}

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// GGUF file or safetensors directory [default: the bundled SmolLM2 from scripts/setup.sh].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Trace JSONL files, folders or glob patterns.
    #[arg(long, required = true, num_args = 1.., value_name = "GLOB")]
    traces: Vec<String>,
    /// Output folder: sensitivity.parquet/.csv, summary.md, heatmap.svg/.png, cache/.
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    out: PathBuf,
    /// Replay at most N tokens of each trajectory (the model context is always the limit).
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Bit widths to measure, from 2, 4, 8.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    bits: Vec<u8>,
    /// Recency counted in user turns or agent steps.
    #[arg(long, value_enum, default_value = "turn")]
    recency_unit: UnitArg,
    /// Decode positions measured per trajectory, spread over its assistant tokens.
    #[arg(long, default_value_t = 96, value_name = "N")]
    queries: usize,
    #[arg(long, value_enum, default_value = "per-channel")]
    key_mode: KeyModeArg,
    /// Tokens per key group (per-channel) or head-dim elements per key group (per-token).
    #[arg(long, default_value_t = 64)]
    key_group: usize,
    /// Head-dim elements per value group.
    #[arg(long, default_value_t = 64)]
    value_group: usize,
    #[arg(long, default_value_t = triaxkv::kvcache::quantized::DEFAULT_SINKS)]
    sinks: usize,
    #[arg(long, default_value_t = triaxkv::kvcache::quantized::DEFAULT_WINDOW)]
    window: usize,
    /// Dense-and-sparse keys: keep this fraction of each per-channel key group's elements
    /// (per KV head) out of the quantization, as `eval --key-outliers` and profiles allocated
    /// with `--key-outliers` store them (0 to 0.25).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    key_outliers: f64,
    /// Choose a key group's outliers over all its KV heads together (`eval
    /// --key-outliers-pooled`).
    #[arg(long, requires = "key_outliers")]
    key_outliers_pooled: bool,
    /// Instead of the table: compare key modes and group sizes by their mean distortion and
    /// write DIR/quantizer_comparison.md.
    #[arg(long)]
    compare_quantizers: bool,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    if args.queries == 0 {
        bail!("--queries must be at least 1");
    }
    if !(0.0..=0.25).contains(&args.key_outliers) {
        bail!(
            "--key-outliers {}: must be a fraction between 0 and 0.25",
            args.key_outliers
        );
    }
    if args.key_outliers > 0.0 && !matches!(args.key_mode, KeyModeArg::Channel) {
        bail!(
            "--key-outliers keeps elements of per-channel key groups: use --key-mode per-channel"
        );
    }
    if args.key_outliers > 0.0 && args.compare_quantizers {
        bail!("--key-outliers and --compare-quantizers: the comparison measures plain quantizers");
    }
    let files = read_glob(&args.traces).context("reading --traces")?;
    if files.iter().all(|f| f.trajectories.is_empty()) {
        bail!("no trajectories in {}", args.traces.join(" "));
    }
    let model = load::load_or_default(args.model.as_deref()).context("loading the model")?;
    let opts = CalibrateOptions {
        out_dir: args.out.clone(),
        max_tokens: args.max_tokens,
        max_queries: args.queries,
        bits: args.bits.clone(),
        unit: match args.recency_unit {
            UnitArg::Turn => RecencyUnit::Turn,
            UnitArg::Step => RecencyUnit::Step,
        },
        quantizer: QuantizerSettings {
            key_mode: match args.key_mode {
                KeyModeArg::Channel => KeyMode::PerChannel,
                KeyModeArg::Token => KeyMode::PerToken { rotate: false },
                KeyModeArg::TokenHadamard => KeyMode::PerToken { rotate: true },
            },
            key_group: args.key_group,
            value_group: args.value_group,
            key_outliers_ppm: (args.key_outliers * 1e6).round() as u32,
            key_outliers_pooled: args.key_outliers_pooled,
        },
        protected: Protected {
            sinks: args.sinks,
            window: args.window,
        },
        progress: true,
        ..CalibrateOptions::default()
    };
    let n: usize = files.iter().map(|f| f.trajectories.len()).sum();
    eprintln!(
        "calibrating {} ({} layers) on {n} trajectories from {} file(s); bits {:?}; {}",
        model.name,
        model.model.config.num_layers,
        files.len(),
        opts.bits,
        opts.quantizer
    );
    if args.compare_quantizers {
        let cmp = compare_quantizers(&model, &files, &opts)?;
        println!("{cmp}");
        println!(
            "written to {}",
            args.out.join("quantizer_comparison.md").display()
        );
        return Ok(());
    }
    let report = calibrate(&model, &files, &opts)?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    println!(
        "{} rows from {} trajectories ({} cached) in {:.1} s; replay {} tokens at {:.0} tokens/s",
        report.table.rows.len(),
        report.results.len(),
        report.cached,
        report.wall_s,
        report.replayed_tokens,
        report.tokens_per_s()
    );
    println!(
        "wrote {}/{{sensitivity.parquet,sensitivity.csv,summary.md,heatmap.svg,heatmap.png}}",
        args.out.display()
    );
    Ok(())
}
