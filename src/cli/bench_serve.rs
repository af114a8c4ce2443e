//! `triaxkv bench serve-workload`: render agent traces into a serving workload (here, with
//! the tokenizer). `triaxkv bench serve`: replay it as concurrent multi-turn sessions on the
//! GPU from a fixed KV memory, one row per cache (`gpu::serve_bench`). `triaxkv bench
//! serve-plot`: the timelines of such runs as plots.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;
use triaxkv::eval::plot::{self, Line, Scatter};
use triaxkv::gpu::decode_attention::{K_GROUPS, V_GROUPS};
use triaxkv::gpu::decode_step::ModelShape;
use triaxkv::gpu::serve_bench::{
    self, BenchCache, ServeBenchConfig, ServeBenchRow, SessionOrder, TimelinePoint,
};
use triaxkv::gpu::GpuContext;
use triaxkv::paged::pool::{ClassMap, Fp8Hold};
use triaxkv::paged::workload::Workload;

/// Where tokens waiting for a key group are kept (`--wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    F16,
    Fp8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    Recorded,
    Shuffled,
}
use triaxkv::profile::Profile;
use triaxkv::quant::KvClass;
use triaxkv::trace::read_glob;
use triaxkv::trace::template::ChatTemplate;

#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// Trace files or folders.
    #[arg(long, num_args = 1.., required = true)]
    traces: Vec<String>,
    /// Model whose tokenizer and chat template render the traces (default: the bundled
    /// SmolLM2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens per session at most (later turns are dropped).
    #[arg(long, default_value_t = 16384)]
    max_context: usize,
    /// Reply tokens generated per turn at most (the rest of a longer reply is prefilled with
    /// the next turn).
    #[arg(long, default_value_t = 256)]
    max_gen: usize,
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

pub fn workload(args: WorkloadArgs) -> Result<()> {
    if args.max_context < 2 || args.max_gen == 0 {
        bail!("--max-context must be at least 2 and --max-gen at least 1");
    }
    let (tok, path) = super::trace_inspect::load_tokenizer(args.model.as_deref())?;
    let template = ChatTemplate::for_tokenizer(&tok)
        .with_context(|| format!("chat template of {}", path.display()))?;
    let files = read_glob(&args.traces)?;
    let w = Workload::build(
        &files,
        &template,
        &tok,
        &path.display().to_string(),
        args.max_context,
        args.max_gen,
    )?;
    w.write(&args.out)?;
    let (tokens, gen) = w.totals();
    let turns: usize = w.sessions.iter().map(|s| s.turns.len()).sum();
    eprintln!(
        "{}: {} sessions, {turns} turns, {tokens} tokens ({gen} generated)",
        args.out.display(),
        w.sessions.len()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The workload (`triaxkv bench serve-workload`).
    #[arg(long)]
    workload: PathBuf,
    /// Model shape with random bf16 weights (speed only): llama3-8b, qwen3-8b or qwen3-32b.
    #[arg(long, default_value = "llama3-8b")]
    random_weights: String,
    /// KV memory of every cache (all layers), e.g. 16GiB.
    #[arg(long, default_value = "16GiB", value_parser = super::serve::parse_size)]
    kv_memory: usize,
    /// Caches: bf16, fp8, int4, int2 (every token at that class once a block's worth has
    /// left 16 bits; no sinks or window) and profile (--profile's per-tag classes).
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string(), "fp8".into(), "int4".into(), "profile".into()])]
    caches: Vec<String>,
    /// Profiles for the `profile` cache, comma-separated: one cache each, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "profiles/triaxial-2.97.json"
    )]
    profile: Vec<PathBuf>,
    /// Concurrent clients (one session each at a time).
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Seconds per cache, and the first seconds left out of the statistics.
    #[arg(long, default_value_t = 90.0)]
    duration: f64,
    #[arg(long, default_value_t = 30.0)]
    warmup: f64,
    /// Prefill tokens per iteration (chunks of several sessions in one step; at most 2048).
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// Most sequences per decode step.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Run each iteration's prefill chunks and its decode rows as two device steps (two passes
    /// over the weights). By default they run as one step, whose time is reported as prefill.
    #[arg(long)]
    separate_steps: bool,
    /// Head-dimension elements per value scale and zero of the INT4 and INT2 blocks (32, 64
    /// or 128), for every cache of the run. Default: the profile's `cache.value_group` when
    /// the `profile` cache runs, else 64. Larger groups make smaller slots (INT2 at 128:
    /// 2.25 bits for K and V, `docs/KV_LAYOUT.md`) and coarser values.
    #[arg(long)]
    v_group: Option<usize>,
    /// Tokens per per-channel key scale group of the INT2 blocks (64 or 128; INT4 blocks hold
    /// 64), for every cache of the run. Default: the profile's `cache.block_tokens` when the
    /// `profile` cache runs (what it was calibrated and evaluated with), else 64. 128 makes
    /// 5% smaller INT2 slabs and coarser keys (`profiles/README.md`).
    #[arg(long)]
    k_group: Option<usize>,
    /// Where tokens waiting for an INT4/INT2 key group are kept until their group is
    /// quantized: 16-bit blocks, or FP8 (E4M3, scale 1) blocks of half the bytes per token
    /// (`paged::pool`, `docs/KV_LAYOUT.md`).
    #[arg(long, value_enum, default_value_t = Wait::F16)]
    wait: Wait,
    /// A quantizing cache keeps its attention sinks in the FP8 waiting blocks (E4M3, scale 1)
    /// once they leave the stream, not in a 16-bit block of their own per session; with
    /// `--wait fp8` no session then holds a 16-bit block beyond its stream (`eval
    /// --sinks-fp8` measures the fidelity).
    #[arg(long)]
    sinks_fp8: bool,
    /// With `--wait fp8` and a profile without a 16-bit window: generated tokens whose class
    /// waits in FP8 are written straight into the FP8 waiting blocks, and a session flushes
    /// its 16-bit stream block when it starts generating, so no decoding session holds one
    /// (`ClassTokens::decode_fp8`).
    #[arg(long)]
    decode_fp8: bool,
    /// With `--decode-fp8`: a profile's residual window is kept in the FP8 waiting blocks
    /// instead of the 16-bit stream (its newest tokens at 8 bits, not 16; a key group is
    /// quantized once its tokens are out of the window; `eval --window-fp8` measures the
    /// fidelity).
    #[arg(long, requires = "decode_fp8")]
    window_fp8: bool,
    /// Each client joins its first session at a random turn, its history sent as the first
    /// prompt (agents already under way when the server starts), so the resident sessions
    /// start near their steady mix instead of all at turn 0 and a shorter warm-up suffices.
    #[arg(long)]
    staggered_start: bool,
    /// The order clients take the sessions in: a fixed shuffle (seed `--order-seed`), so
    /// every stretch of the run mixes the sources as the workload does and caches that get
    /// through it at different speeds serve the same mix; or as recorded (file by file: a
    /// time window then compares different sources across caches).
    #[arg(long, value_enum, default_value_t = Order::Shuffled)]
    order: Order,
    /// Seed of the shuffled order (the same seed, the same order on every machine).
    #[arg(long, default_value_t = 0)]
    order_seed: u64,
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Run the caches at once on these GPUs (e.g. 0,1,2,3: cache i on the i-th, a device's
    /// caches in turn when there are more caches), one thread each, instead of one after
    /// another on `--device`: on identical GPUs the whole comparison takes one cache's time,
    /// so one run affords a long window per cache.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    devices: Vec<usize>,
    /// No GPU: run N scheduler iterations per cache against a host model of the device that
    /// checks every request (capacity, admission and preemption; times are host-only).
    #[arg(long, value_name = "N")]
    host_check: Option<usize>,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Folder for plots of each cache's timeline (decode tokens/s and resident sessions over
    /// time, warm-up included): timeline-decode.svg/.png, timeline-sessions.svg/.png.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// The GPU pool stores no key outliers: a profile that keeps them would be served without,
/// at fewer bits and more sessions than the profile promises, so it is refused.
pub(crate) fn refuse_key_outliers(p: &Profile) -> Result<()> {
    if p.cache.key_outliers > 0.0 {
        bail!(
            "profile {} keeps {:.2}% of its key groups exactly (cache.key_outliers, allocated \
             with --key-outliers): the GPU pool does not store key outliers yet; serve it on \
             the CPU, measure its capacity with `bench serve --host-check`, or allocate it again without \
             --key-outliers",
            p.name,
            100.0 * p.cache.key_outliers
        );
    }
    Ok(())
}

/// The caches `name` stands for: one, or one per profile for `profile`.
fn caches(name: &str, profiles: &[Profile], k_group: usize) -> Result<Vec<BenchCache>> {
    let uniform = |c| ClassMap::uniform(c, 0, 0);
    let map = match name.trim().to_ascii_lowercase().as_str() {
        "bf16" | "f16" => uniform(KvClass::F16),
        "fp8" => uniform(KvClass::Fp8),
        "int4" => uniform(KvClass::Int4),
        "int2" => uniform(KvClass::Int2),
        "profile" => {
            return Ok(profiles
                .iter()
                .map(|p| {
                    let map = ClassMap::from_profile(p);
                    let fit = map.fit(p);
                    if !fit.exact() {
                        eprintln!("note: profile {}: {fit}", p.name);
                    }
                    if let Some(n) = map.key_block_note(p, k_group) {
                        eprintln!("note: {n}");
                    }
                    if p.cache.hold_fp8 {
                        eprintln!(
                            "note: profile {} was allocated with --hold-fp8: its waiting tokens, \
                             sinks, generated tokens and window are held in FP8 whatever the \
                             FP8 flags say",
                            p.name
                        );
                    }
                    let name = format!("profile {}", p.name);
                    BenchCache {
                        name,
                        map,
                        hold_fp8: p.cache.hold_fp8,
                        key_outliers: p.cache.key_outliers,
                    }
                })
                .collect());
        }
        other => bail!("--caches: unknown cache {other:?} (bf16, fp8, int4, int2, profile)"),
    };
    Ok(vec![BenchCache {
        name: name.trim().to_ascii_lowercase(),
        map,
        hold_fp8: false,
        key_outliers: 0.0,
    }])
}

/// `--profile`, each read once, when the `profile` cache runs.
fn profiles(args: &ServeArgs) -> Result<Vec<Profile>> {
    let runs = args
        .caches
        .iter()
        .any(|c| c.trim().eq_ignore_ascii_case("profile"));
    if !runs {
        return Ok(Vec::new());
    }
    args.profile
        .iter()
        .map(|path| Ok(Profile::read(path)?))
        .collect()
}

/// What a quantizing cache's 16-bit blocks (and FP8 waiting blocks) held at its peak (the
/// stored bits above its packed classes'); `None` for a cache that keeps every token at 16 bits.
fn f16_breakdown(r: &ServeBenchRow) -> Option<String> {
    let u = &r.peak_f16;
    let f16 = u.stream_tokens + u.held_tokens.iter().sum::<usize>();
    if f16 >= r.peak_tokens {
        return None;
    }
    let blocks = u.stream_blocks + u.held_blocks;
    let mut line = format!(
        "- {}: at the peak ({} tokens), {} of {} slots in use were 16-bit ({:.1}%): {} stream \
         blocks of {} tokens, {} held blocks of {} sinks / 16-bit tags and {} / {} / {} tokens \
         waiting for an INT4 / INT2 / FP8 group",
        r.cache,
        r.peak_tokens,
        blocks,
        r.peak_slots_used,
        100.0 * blocks as f64 / r.peak_slots_used.max(1) as f64,
        u.stream_blocks,
        u.stream_tokens,
        u.held_blocks,
        u.held_tokens[0],
        u.held_tokens[1],
        u.held_tokens[2],
        u.held_tokens[3],
    );
    if u.wait_blocks > 0 {
        let _ = write!(
            line,
            "; {} FP8 waiting blocks ({:.1}% of the slots) of {} sinks and {} / {} tokens \
             waiting for an INT4 / INT2 group",
            u.wait_blocks,
            100.0 * u.wait_blocks as f64 / r.peak_slots_used.max(1) as f64,
            u.wait_tokens[0],
            u.wait_tokens[1],
            u.wait_tokens[2],
        );
    }
    let (b, t, cap) = (r.peak_packed_blocks, r.peak_packed_tokens, r.block_tokens);
    if b.iter().sum::<usize>() > 0 {
        // The room left in each class's open blocks, in slots' worth.
        let empty: f64 = (1..4)
            .map(|k| (b[k] * cap[k]).saturating_sub(t[k]) as f64 / cap[k].max(1) as f64)
            .sum();
        let _ = write!(
            line,
            "; {} / {} / {} packed INT4 / INT2 / FP8 blocks of {} / {} / {} tokens, the room \
             left in their open blocks {:.0} slots' worth ({:.1}% of the slots in use)",
            b[1],
            b[2],
            b[3],
            t[1],
            t[2],
            t[3],
            empty,
            100.0 * empty / r.peak_slots_used.max(1) as f64,
        );
    }
    Some(line)
}

type Column = (&'static str, &'static str, fn(&ServeBenchRow) -> String);

fn markdown(rows: &[ServeBenchRow], head: &str, timed: bool) -> String {
    let mut cols: Vec<Column> = vec![
        ("cache", "---", |r: &ServeBenchRow| r.cache.clone()),
        ("slots", "--:", |r: &ServeBenchRow| r.slots.to_string()),
        ("bits/elem", "--:", |r: &ServeBenchRow| {
            format!("{:.2}", r.effective_bits)
        }),
        ("peak sessions", "--:", |r: &ServeBenchRow| {
            r.peak_sessions.to_string()
        }),
        ("mean sessions", "--:", |r: &ServeBenchRow| {
            format!("{:.1}", r.mean_sessions)
        }),
        ("mean decode batch", "--:", |r: &ServeBenchRow| {
            format!("{:.1}", r.mean_decode_batch)
        }),
        ("mean pool use", "--:", |r: &ServeBenchRow| {
            format!("{:.1}%", 100.0 * r.mean_occupancy)
        }),
        ("mean tokens / session", "--:", |r: &ServeBenchRow| {
            format!("{:.0}", r.mean_tokens / r.mean_sessions.max(1e-9))
        }),
    ];
    let times: [Column; 4] = [
        ("decode tok/s", "--:", |r: &ServeBenchRow| {
            format!("{:.0}", r.decode_tokens_per_s)
        }),
        ("prefill tok/s", "--:", |r: &ServeBenchRow| {
            format!("{:.0}", r.prefill_tokens_per_s)
        }),
        ("TTFT p50 / p99 ms", "--", |r: &ServeBenchRow| {
            format!("{:.0} / {:.0}", r.ttft_p50_ms, r.ttft_p99_ms)
        }),
        ("ITL p50 / p99 ms", "--", |r: &ServeBenchRow| {
            format!("{:.1} / {:.1}", r.itl_p50_ms, r.itl_p99_ms)
        }),
    ];
    if timed {
        cols.extend(times);
    }
    let tail: [Column; 4] = [
        ("turns", "--:", |r: &ServeBenchRow| {
            r.turns_completed.to_string()
        }),
        ("preemptions", "--:", |r: &ServeBenchRow| {
            r.preemptions.to_string()
        }),
        ("recomputed tokens", "--:", |r: &ServeBenchRow| {
            r.recomputed_tokens.to_string()
        }),
        ("leaked slots", "--:", |r: &ServeBenchRow| {
            r.leaked_slots.to_string()
        }),
    ];
    cols.extend(tail);
    let line = |cells: Vec<String>| format!("| {} |", cells.join(" | "));
    let mut s = String::new();
    let _ = writeln!(s, "{head}\n");
    let _ = writeln!(
        s,
        "{}",
        line(cols.iter().map(|c| c.0.to_string()).collect())
    );
    let _ = writeln!(
        s,
        "{}",
        line(cols.iter().map(|c| c.1.to_string()).collect())
    );
    for r in rows {
        let _ = writeln!(s, "{}", line(cols.iter().map(|c| (c.2)(r)).collect()));
    }
    let _ = writeln!(s);
    for r in rows {
        if let Some(line) = f16_breakdown(r) {
            let _ = writeln!(s, "{line}");
        }
    }
    let spread: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let i = r.interval_sessions()?;
            Some(format!(
                "- {}: mean sessions of the {} ~10 s intervals past the warm-up {:.1}–{:.1}; \
                 their mean {:.1} ± {:.1} (standard error, intervals taken as independent)",
                r.cache, i.intervals, i.min, i.max, i.mean, i.std_err
            ))
        })
        .collect();
    if !spread.is_empty() {
        let _ = writeln!(s, "\n{}", spread.join("\n"));
    }
    // Caches run at once on several GPUs compare fairly only on identical ones.
    let models: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.device.as_deref())
        .map(|d| d.split_once(": ").map_or(d, |x| x.1))
        .collect();
    if models.len() > 1 {
        let on: Vec<String> = rows
            .iter()
            .map(|r| format!("{} on {}", r.cache, r.device.as_deref().unwrap_or("?")))
            .collect();
        let _ = writeln!(
            s,
            "\n- warning: the caches ran on different GPU models ({}): their speeds do not \
             compare",
            on.join(", ")
        );
    }
    if let Some(base) = rows.first() {
        let _ = writeln!(s);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        for r in &rows[1..] {
            let last = if timed {
                format!(
                    "{:.2}x decode tokens/s",
                    ratio(r.decode_tokens_per_s, base.decode_tokens_per_s)
                )
            } else {
                format!(
                    "{:.2}x turns in as many iterations",
                    ratio(r.turns_completed as f64, base.turns_completed as f64)
                )
            };
            // The intervals' relative standard errors, combined as independent.
            let err = match (r.interval_sessions(), base.interval_sessions()) {
                (Some(a), Some(b)) if a.mean > 0.0 && b.mean > 0.0 => {
                    let rel = ((a.std_err / a.mean).powi(2) + (b.std_err / b.mean).powi(2)).sqrt();
                    format!(" ± {:.2}", rel * ratio(r.mean_sessions, base.mean_sessions))
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "- {} vs {}: {:.2}x peak sessions, {:.2}x{err} mean sessions ({:.2}x mean \
                 tokens held), {last}",
                r.cache,
                base.cache,
                ratio(r.peak_sessions as f64, base.peak_sessions as f64),
                ratio(r.mean_sessions, base.mean_sessions),
                ratio(r.mean_tokens, base.mean_tokens),
            );
        }
    }
    s
}

pub fn run(args: ServeArgs) -> Result<()> {
    let Some(shape) = ModelShape::by_name(&args.random_weights) else {
        bail!(
            "--random-weights {:?}: known shapes are llama3-8b, qwen3-8b, qwen3-32b",
            args.random_weights
        );
    };
    if let Some(d) = args
        .devices
        .iter()
        .enumerate()
        .find_map(|(i, d)| args.devices[..i].contains(d).then_some(d))
    {
        bail!(
            "--devices lists device {d} twice: caches sharing a GPU at once would slow each other"
        );
    }
    if args.decode_fp8 && args.wait != Wait::Fp8 {
        bail!(
            "--decode-fp8 writes generated tokens into the FP8 waiting blocks: it needs --wait fp8"
        );
    }
    if args.clients == 0 || args.chunk == 0 || args.max_batch == 0 {
        bail!("--clients, --chunk and --max-batch must be at least 1");
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0 && args.warmup < args.duration) {
        bail!("--warmup must be below --duration (seconds)");
    }
    let profiles = profiles(&args)?;
    let v_group = v_group(&args, &profiles)?;
    let k_group = k_group(&args, &profiles)?;
    let work = Workload::read(&args.workload)?;
    let mut caches = Vec::new();
    for c in &args.caches {
        caches.extend(self::caches(c, &profiles, k_group)?);
    }
    if args.host_check.is_none() {
        // The host check sizes the outlier area; the kernels do not fill or read it yet.
        for p in &profiles {
            refuse_key_outliers(p)?;
        }
    }
    let mut cfg = ServeBenchConfig {
        shape,
        kv_memory: args.kv_memory,
        caches,
        clients: args.clients,
        chunk: args.chunk,
        max_batch: args.max_batch,
        duration_s: args.duration,
        warmup_s: args.warmup,
        v_group,
        k_group,
        fp8: Fp8Hold {
            wait: args.wait == Wait::Fp8,
            sinks: args.sinks_fp8,
            decode: args.decode_fp8,
            window: args.window_fp8,
        },
        staggered_start: args.staggered_start,
        seed: 0x5eed,
        order: match args.order {
            Order::Recorded => SessionOrder::Recorded,
            Order::Shuffled => SessionOrder::Shuffled(args.order_seed),
        },
        fused_step: !args.separate_steps,
    };
    let (tokens, gen) = work.totals();
    if let Some(n) = args.host_check {
        if n == 0 {
            bail!("--host-check needs at least 1 iteration");
        }
        cfg.duration_s = f64::MAX;
        cfg.warmup_s = 0.0;
        let head = format!(
            "bench serve --host-check {n}: no GPU, every device request checked; {} shape, \
             {:.1} GiB KV per cache, {} clients over {} recorded sessions ({tokens} tokens, \
             {gen} generated per pass, {}), chunk {}{}, value group {}, key group {}; \
             sessions, bits and preemptions after {n} iterations (times and tokens/s are host \
             bookkeeping, not speed)",
            cfg.shape.name,
            cfg.kv_memory as f64 / (1u64 << 30) as f64,
            cfg.clients,
            work.sessions.len(),
            order_note(&cfg),
            cfg.chunk,
            steps(&cfg),
            cfg.v_group,
            cfg.k_group
        );
        eprintln!("{head}");
        let rows = serve_bench::run_host_check(&cfg, &work, n, |m| eprintln!("{m}"))?;
        return report(&rows, &head, &args, false);
    }
    let first = args.devices.first().copied().unwrap_or(args.device);
    let gpu = GpuContext::open(first).context("opening the GPU for bench serve")?;
    let on = match args.devices.len() {
        0 | 1 => gpu.name.clone(),
        n => format!(
            "{n} GPUs ({} first; caches run at once, cache i on device {:?}[i % {n}])",
            gpu.name, args.devices
        ),
    };
    let head = format!(
        "bench serve on {on} ({}): {} with random bf16 weights (speed only), {:.1} GiB KV per \
         cache, {} clients over {} recorded sessions ({tokens} tokens, {gen} generated per \
         pass, {}), chunk {}{}, value group {}, key group {}, {:.0} s per cache, the first \
         {:.0} s not counted",
        gpu.arch(),
        cfg.shape.name,
        cfg.kv_memory as f64 / (1u64 << 30) as f64,
        cfg.clients,
        work.sessions.len(),
        order_note(&cfg),
        cfg.chunk,
        steps(&cfg),
        cfg.v_group,
        cfg.k_group,
        cfg.duration_s,
        cfg.warmup_s
    );
    eprintln!("{head}");
    let rows = if args.devices.is_empty() {
        serve_bench::run(&gpu, &cfg, &work, |m| eprintln!("{m}"))?
    } else {
        drop(gpu);
        serve_bench::run_parallel(&args.devices, &cfg, &work, |m| eprintln!("{m}"))?
    };
    report(&rows, &head, &args, true)
}

fn order_note(cfg: &ServeBenchConfig) -> String {
    let order = match cfg.order {
        SessionOrder::Recorded => "taken in recorded order".to_string(),
        SessionOrder::Shuffled(seed) => format!("taken in a shuffled order, seed {seed}"),
    };
    if cfg.staggered_start {
        format!("{order}, the first at a random turn")
    } else {
        order
    }
}

/// `--v-group`, else the profiles' value group when the profile cache runs, else 64.
fn v_group(args: &ServeArgs, profiles: &[Profile]) -> Result<usize> {
    let groups: Vec<usize> = profiles.iter().map(|p| p.cache.value_group).collect();
    let g = run_group(args.v_group, &groups, &V_GROUPS, "value group", "--v-group")?;
    for p in groups.iter().filter(|&&p| p != g) {
        eprintln!(
            "note: --v-group {g} stores the profile's classes with value groups of {g}; \
             it was allocated for groups of {p}"
        );
    }
    Ok(g)
}

/// `--k-group`, else the profiles' key blocks when the profile cache runs, else 64 (a
/// profile made for other key blocks gets `ClassMap::key_block_note`).
fn k_group(args: &ServeArgs, profiles: &[Profile]) -> Result<usize> {
    let blocks: Vec<usize> = profiles.iter().map(|p| p.cache.block_tokens).collect();
    run_group(args.k_group, &blocks, &K_GROUPS, "key group", "--k-group")
}

/// One pool-wide group size for the run: `flag`, else the profiles' (which must agree), else
/// 64; refused unless the kernels take it.
fn run_group(
    flag: Option<usize>,
    of_profiles: &[usize],
    allowed: &[usize],
    what: &str,
    option: &str,
) -> Result<usize> {
    if flag.is_none() && of_profiles.windows(2).any(|w| w[0] != w[1]) {
        bail!(
            "--profile: the profiles were made for {what}s {of_profiles:?}; one run stores \
             every cache with one (pick it with {option})"
        );
    }
    let g = flag.or(of_profiles.first().copied()).unwrap_or(64);
    if !allowed.contains(&g) {
        bail!("{what} {g}: the kernels take {allowed:?} ({option})");
    }
    Ok(g)
}

/// How an iteration's prefill chunks and decode rows run (`--separate-steps`).
fn steps(cfg: &ServeBenchConfig) -> String {
    let steps = if cfg.fused_step {
        ", prefill chunks and decode rows fused in one step"
    } else {
        ", prefill and decode in separate steps"
    };
    let window = if cfg.fp8.window {
        ", the window in FP8"
    } else {
        ""
    };
    let wait = match (cfg.fp8.wait, cfg.fp8.sinks, cfg.fp8.decode) {
        (false, false, _) => "",
        (false, true, _) => ", sinks in FP8",
        (true, false, false) => ", tokens waiting for a key group in FP8",
        (true, true, false) => ", tokens waiting for a key group and sinks in FP8",
        (true, false, true) => {
            ", tokens waiting for a key group in FP8, generated ones written there directly"
        }
        (true, true, true) => {
            ", tokens waiting for a key group and sinks in FP8, generated ones written there \
             directly"
        }
    };
    format!("{steps}{wait}{window}")
}

fn report(rows: &[ServeBenchRow], head: &str, args: &ServeArgs, timed: bool) -> Result<()> {
    let md = markdown(rows, head, timed);
    println!("{md}");
    if let Some(p) = &args.json {
        let json = serde_json::json!({"setup": head, "rows": rows});
        triaxkv::util::write_atomic(p, |w| {
            serde_json::to_writer_pretty(&mut *w, &json).map_err(std::io::Error::other)
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.markdown {
        triaxkv::util::write_atomic(p, |w| w.write_all(md.as_bytes()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &args.plot {
        if rows.iter().any(|r| !r.timeline.is_empty()) {
            write_plots(rows, head, dir)?;
        } else {
            eprintln!("note: no timeline points (runs shorter than 10 s): no plots");
        }
    }
    if rows.iter().any(|r| r.leaked_slots > 0) {
        bail!("blocks leaked: the pool was not whole after every session ended");
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// `bench serve --json` files: every cache's timeline in one plot.
    #[arg(required = true, num_args = 1..)]
    json: Vec<PathBuf>,
    /// Folder for timeline-decode.svg/.png and timeline-sessions.svg/.png.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

#[derive(serde::Deserialize)]
struct BenchFile {
    setup: String,
    rows: Vec<ServeBenchRow>,
}

/// `bench serve-plot`: the timelines of several `bench serve` runs (e.g. caches run in
/// separate calls) drawn together.
pub fn plot(args: PlotArgs) -> Result<()> {
    let mut rows = Vec::new();
    let mut setup = String::new();
    for path in &args.json {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let f: BenchFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a `bench serve --json` file", path.display()))?;
        if let Some(r) = f.rows.iter().find(|r| r.timeline.is_empty()) {
            bail!(
                "{}: cache {:?} has no timeline (bench serve from before the timeline, or a \
                 run shorter than 10 s)",
                path.display(),
                r.cache
            );
        }
        if setup.is_empty() {
            setup = f.setup;
        }
        rows.extend(f.rows.into_iter().map(|r| (r, run_name(path, &args.json))));
    }
    // A cache drawn from several runs keeps them apart in the legend by the run's name.
    let rows: Vec<ServeBenchRow> = rows
        .iter()
        .map(|(r, run)| {
            let mut r = r.clone();
            if rows.iter().filter(|(o, _)| o.cache == r.cache).count() > 1 {
                r.cache = format!("{} ({run})", r.cache);
            }
            r
        })
        .collect();
    write_plots(&rows, &setup, &args.out)?;
    eprintln!(
        "wrote timeline-decode.svg/.png and timeline-sessions.svg/.png into {}",
        args.out.display()
    );
    Ok(())
}

/// A run's name in a legend: its file's folder, or its file's stem when the files share one.
fn run_name(path: &std::path::Path, all: &[PathBuf]) -> String {
    let name = |p: Option<&std::ffi::OsStr>| p.map(|n| n.to_string_lossy().into_owned());
    let shared = all.iter().all(|p| p.parent() == path.parent());
    let folder = name(path.parent().and_then(|d| d.file_name())).filter(|_| !shared);
    folder
        .or_else(|| name(path.file_stem()))
        .unwrap_or_else(|| path.display().to_string())
}

/// Decode tokens/s and resident sessions over time, one line per cache.
fn timeline_plots(rows: &[ServeBenchRow]) -> [Scatter; 2] {
    let lines = |f: fn(&TimelinePoint) -> f64| -> Vec<Line> {
        rows.iter()
            .map(|r| Line {
                label: r.cache.clone(),
                points: r.timeline.iter().map(|p| (p.t_s, f(p))).collect(),
            })
            .collect()
    };
    let plot = |title: &str, y: &str, lines: Vec<Line>| Scatter {
        title: title.into(),
        x_label: "seconds since the cache's run started (warm-up included)".into(),
        y_label: y.into(),
        log_x: false,
        log_y: false,
        points: Vec::new(),
        lines,
    };
    [
        plot(
            "bench serve: decode tokens/s over the last ~10 s",
            "decode tokens/s",
            lines(|p| p.decode_tokens_per_s),
        ),
        plot(
            "bench serve: sessions with their cache resident over the last ~10 s",
            "resident sessions (interval mean; at the point in older runs)",
            lines(|p| {
                if p.mean_sessions > 0.0 {
                    p.mean_sessions
                } else {
                    p.resident as f64
                }
            }),
        ),
    ]
}

fn write_plots(rows: &[ServeBenchRow], setup: &str, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let [decode, sessions] = timeline_plots(rows);
    for (s, name) in [(decode, "timeline-decode"), (sessions, "timeline-sessions")] {
        let (svg, png) = (
            dir.join(format!("{name}.svg")),
            dir.join(format!("{name}.png")),
        );
        plot::write(&s, &svg, &png).with_context(|| format!("writing {}", svg.display()))?;
    }
    let note = dir.join("timeline.txt");
    triaxkv::util::write_atomic(&note, |w| writeln!(w, "{setup}"))
        .with_context(|| format!("writing {}", note.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timed report gives each cache's spread over its measured intervals and the ratio's
    /// error from them.
    #[test]
    fn report_gives_the_interval_spread_and_the_ratio_error() {
        let row = |cache: &str, means: &[f64]| ServeBenchRow {
            cache: cache.into(),
            mean_sessions: means.iter().sum::<f64>() / means.len() as f64,
            timeline: means
                .iter()
                .map(|&m| TimelinePoint {
                    mean_sessions: m,
                    measured: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let rows = [
            row("fp8", &[36.0, 40.0, 38.0, 34.0, 42.0]),
            row("profile", &[112.0, 116.0, 114.0, 110.0, 118.0]),
        ];
        let md = markdown(&rows, "head", true);
        assert!(
            md.contains("- fp8: mean sessions of the 5 ~10 s intervals past the warm-up 34.0–42.0"),
            "{md}"
        );
        // 3.00x; relative errors 1.41/38 and 1.41/114 combined: ± 0.12.
        assert!(md.contains("3.00x ± 0.12 mean sessions"), "{md}");
        assert!(!md.contains("warning"), "{md}");
        // Parallel runs on two GPU models are flagged; on one model they are not.
        let on = |mut r: ServeBenchRow, d: &str| {
            r.device = Some(d.into());
            r
        };
        let same = [
            on(rows[0].clone(), "0: NVIDIA H200"),
            on(rows[1].clone(), "1: NVIDIA H200"),
        ];
        assert!(!markdown(&same, "head", true).contains("warning"));
        let mixed = [
            on(rows[0].clone(), "0: NVIDIA H200"),
            on(rows[1].clone(), "1: NVIDIA H100 80GB HBM3"),
        ];
        let md = markdown(&mixed, "head", true);
        assert!(
            md.contains("warning: the caches ran on different GPU models"),
            "{md}"
        );
    }
}
