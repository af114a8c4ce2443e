//! `triaxkv allocate`: solve for the bits of each (layer, K|V, tag) under a memory budget
//! (or build a baseline policy) from a sensitivity table, print the assignment, write the
//! profile.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::PathBuf;
use triaxkv::allocate::{allocate, report, BudgetSpec, Calibration, Policy, Request, Solver};
use triaxkv::calibrate::SensitivityTable;
use triaxkv::model::load;
use triaxkv::profile::ModelIdentity;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    /// One bit width per (layer, K|V, tag), solved under the budget.
    Triaxial,
    /// Solved, with one bit width per (layer, K|V, role).
    RoleOnly,
    /// Solved, with one bit width per (layer, K|V, recency bucket).
    RecencyOnly,
    /// Solved, with one bit width per (layer, K|V, modality).
    ModalityOnly,
    /// Solved, with one bit width per (layer, K|V).
    LayerOnly,
    /// Solved, with one bit width per tag for all layers, K and V alike (what
    /// `serve --gpu` stores exactly).
    TagOnly,
    /// Solved, with one bit width per (tag, K|V) for all layers (keys and values apart).
    TagKv,
    /// Every token at INT4: no sinks, no 16-bit window.
    UniformInt4,
    /// Every token at INT2: no sinks, no 16-bit window.
    UniformInt2,
    /// INT4 with KIVI's 128-token 16-bit window, no sinks.
    Kivi4,
    /// INT2 with KIVI's 128-token 16-bit window, no sinks.
    Kivi2,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Triaxial => Policy::Triaxial,
            PolicyArg::RoleOnly => Policy::RoleOnly,
            PolicyArg::RecencyOnly => Policy::RecencyOnly,
            PolicyArg::ModalityOnly => Policy::ModalityOnly,
            PolicyArg::LayerOnly => Policy::LayerOnly,
            PolicyArg::TagOnly => Policy::TagOnly,
            PolicyArg::TagKv => Policy::TagKv,
            PolicyArg::UniformInt4 => Policy::UniformInt4,
            PolicyArg::UniformInt2 => Policy::UniformInt2,
            PolicyArg::Kivi4 => Policy::Kivi4,
            PolicyArg::Kivi2 => Policy::Kivi2,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SolverArg {
    /// good_lp + microlp after Lagrangian reduced-cost fixing.
    Ilp,
    /// The exact Pareto-frontier DP (cross-check).
    Dp,
    /// good_lp + microlp on the whole problem, no fixing (slow; for comparison).
    IlpFull,
}

#[derive(Debug, clap::Args)]
pub struct AllocateArgs {
    /// Calibration folder (with sensitivity.parquet or .csv) or the table file itself.
    #[arg(long, value_name = "DIR|FILE")]
    calib: PathBuf,
    /// Average effective bits per K/V element (e.g. 2.75; scales, sinks and window
    /// included), or bytes (e.g. 2GiB, 512MiB, 3GB) with --context and --batch.
    #[arg(long, value_name = "B")]
    budget: Option<String>,
    /// Output profile (JSON, written atomically).
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "triaxial")]
    policy: PolicyArg,
    /// Bit widths to choose from (2, 4, 8, 16); 8 needs a table calibrated with 8.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    bits: Vec<u8>,
    /// Tokens per sequence: required with a budget in bytes; with a budget in bits it
    /// replaces the calibration mix's mean context (tag shares are kept).
    #[arg(long, value_name = "N")]
    context: Option<usize>,
    /// Sequences sharing a budget in bytes.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Profile name [default: POLICY-BUDGET, or POLICY for fixed baselines].
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_enum, default_value = "ilp")]
    solver: SolverArg,
    /// Factor on the objective weight of value items (values' attention distortion is
    /// numerically smaller than keys' for the same end-to-end damage; see profiles/README.md).
    #[arg(long, value_name = "W", default_value_t = 1.0)]
    value_weight: f64,
    /// 16-bit sink tokens at the start of every sequence [default: the calibration's; 0 for
    /// the uniform and KIVI baselines].
    #[arg(long, value_name = "N")]
    sinks: Option<usize>,
    /// Newest tokens kept at 16 bits [default: the calibration's; 0 for uniform, 128 for
    /// KIVI]. A smaller window frees memory for more sessions at a fidelity cost that
    /// `triaxkv eval` measures (the objective reuses the calibrated distortions).
    #[arg(long, value_name = "N")]
    window: Option<usize>,
    /// Hold the sinks, the window and the tokens waiting for a key group in FP8 (E4M3 at
    /// scale 1) instead of 16 bits: the budget charges the sinks and window at 8 bits, the
    /// profile records it (`cache.hold_fp8`), and `eval`, `serve` and `bench serve` hold it so
    /// without flags.
    #[arg(long)]
    hold_fp8: bool,
    /// With --policy tag-only or tag-kv: one bit width per tag in each of N contiguous
    /// bands of layers (of nearly equal size) instead of one for all layers.
    #[arg(long, value_name = "N")]
    layer_bands: Option<usize>,
    /// Keep this fraction of every per-channel key group's elements exactly (dense-and-sparse
    /// keys, e.g. 0.005; 4 bytes each, charged to the keys): the profile records it and
    /// `eval` and `serve` (CPU) hold them. Not stored by the GPU pool yet.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    key_outliers: f64,
    /// Choose a key group's outliers over all its KV heads together (as many in all), as
    /// `eval --key-outliers-pooled` did: recorded in the profile.
    #[arg(long)]
    key_outliers_pooled: bool,
    /// The calibrated model (GGUF file or safetensors folder), for its identity and shape
    /// [default: the bundled SmolLM2 from scripts/setup.sh].
    #[arg(long)]
    model: Option<PathBuf>,
}

fn sha256_file(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub fn run(args: AllocateArgs) -> Result<()> {
    let budget = args
        .budget
        .as_deref()
        .map(str::parse::<BudgetSpec>)
        .transpose()?;
    let file = SensitivityTable::locate(&args.calib)?;
    let table = SensitivityTable::read(&file)?;
    let sha256 = sha256_file(&file)?;
    let info = load::inspect(args.model.as_deref()).context("reading the model's identity")?;
    let model = ModelIdentity {
        name: info.name,
        sha256: info.sha256,
        layers: info.config.num_layers,
        kv_heads: info.config.num_kv_heads,
        head_dim: info.config.head_dim,
    };
    let req = Request {
        policy: args.policy.into(),
        budget,
        bits: args.bits,
        context: args.context,
        batch: args.batch,
        solver: match args.solver {
            SolverArg::Ilp => Solver::Ilp,
            SolverArg::Dp => Solver::Dp,
            SolverArg::IlpFull => Solver::IlpFull,
        },
        name: args.name,
        value_weight: args.value_weight,
        sinks: args.sinks,
        window: args.window,
        hold_fp8: args.hold_fp8,
        layer_bands: args.layer_bands,
        key_outliers: args.key_outliers,
        key_outliers_pooled: args.key_outliers_pooled,
    };
    let calibration = Calibration {
        path: file.display().to_string(),
        sha256,
    };
    let outcome = allocate(&table, &calibration, &model, &req)
        .with_context(|| format!("allocating from {}", file.display()))?;
    outcome
        .profile
        .write(&args.out)
        .with_context(|| format!("writing the profile {}", args.out.display()))?;
    // The profile is written; a closed stdout (`| head`) must not turn that into a failure.
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", report::render(&outcome));
    let _ = writeln!(out, "wrote {}", args.out.display());
    Ok(())
}
