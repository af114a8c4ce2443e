//! Does the calibration table's attention distortion predict the model's output? Quantize one
//! tag at a time end to end (keys only, then values only, every layer), measure the mean KL of
//! next-token distributions, and rank-correlate it with the table's per-tag predictions.

use super::metrics::{pearson, spearman, Accumulator, ReferenceRows};
use super::plot::{self, Point, Scatter};
use super::replay::{replay, EvalCache, ReplayConfig, ReplayPlan};
use super::run::{prepare_plans, TrajectoryInfo};
use super::EvalError;
use crate::calibrate::{QuantizerSettings, SensitivityTable};
use crate::kvcache::{KvPolicy, PrecisionClass, QuantCache, QuantCacheConfig};
use crate::model::llama::DEFAULT_PREFILL_CHUNK;
use crate::model::load::LoadedModel;
use crate::profile::Kv;
use crate::quant::KeyMode;
use crate::tags::{RecencyUnit, Tag};
use crate::trace::read::TraceFile;
use crate::util::write_atomic;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub bits: u8,
    /// The K most common tags (by token share in the table) are measured.
    pub tags: usize,
    pub max_tokens: Option<usize>,
    /// Use at most this many trajectories, spread over the trace set.
    pub trajectories: Option<usize>,
    /// Scored positions per trajectory (`None`: every assistant position).
    pub positions: Option<usize>,
    pub chunk: usize,
    pub progress: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            bits: 2,
            tags: 6,
            max_tokens: Some(2048),
            trajectories: Some(4),
            positions: Some(128),
            chunk: DEFAULT_PREFILL_CHUNK,
            progress: false,
        }
    }
}

/// What the proxy check needs from a sensitivity table.
/// One table row of a (tag, K|V, bits): layer, distortion, trajectories that saw the tag.
pub type LayerRow = (usize, f64, usize);

#[derive(Debug, Clone)]
pub struct TableView {
    pub path: PathBuf,
    pub model_sha256: String,
    pub unit: RecencyUnit,
    pub sinks: usize,
    pub window: usize,
    pub quantizer: QuantizerSettings,
    /// (tag, kv, bits) -> (layer, distortion, trajectories that saw the tag) per row.
    pub distortion: BTreeMap<(Tag, Kv, u8), Vec<LayerRow>>,
    /// Mean quantizable tokens per decode query, per tag.
    pub tokens: BTreeMap<Tag, f64>,
    /// Largest `trajectories` of any row (the allocator's weight divides by it).
    pub max_trajectories: usize,
}

fn table_err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Table {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read the sensitivity table of a calibration folder (or file).
pub fn read_table(path: &Path) -> Result<TableView, EvalError> {
    let t = SensitivityTable::read(path)?;
    let file = SensitivityTable::locate(path)?;
    let p = &t.provenance;
    let unit = match p.recency_unit.as_str() {
        "turn" => RecencyUnit::Turn,
        "step" => RecencyUnit::Step,
        other => {
            return Err(table_err(
                &file,
                format!("column `recency_unit`: {other:?} is not turn or step"),
            ))
        }
    };
    let quantizer = p
        .quantizer
        .parse::<QuantizerSettings>()
        .map_err(|e| table_err(&file, format!("column `quantizer`: {e}")))?;
    let mut view = TableView {
        path: file,
        model_sha256: p.model_sha256.clone(),
        unit,
        sinks: p.sinks,
        window: p.window,
        quantizer,
        distortion: BTreeMap::new(),
        tokens: BTreeMap::new(),
        max_trajectories: 0,
    };
    for r in &t.rows {
        let kv = if r.kv == "k" { Kv::K } else { Kv::V };
        view.distortion
            .entry((r.tag, kv, r.bits))
            .or_default()
            .push((r.layer, r.distortion, r.trajectories));
        let n = view.tokens.entry(r.tag).or_insert(0.0);
        *n = n.max(r.tokens);
        view.max_trajectories = view.max_trajectories.max(r.trajectories);
    }
    Ok(view)
}

/// The cache settings a table was measured with.
fn cache_config(t: &TableView) -> QuantCacheConfig {
    let q = t.quantizer;
    QuantCacheConfig {
        sinks: t.sinks,
        window: t.window,
        block_tokens: match q.key_mode {
            KeyMode::PerChannel => q.key_group,
            KeyMode::PerToken { .. } => QuantCacheConfig::default().block_tokens,
        },
        key_mode: q.key_mode,
        key_group: q.key_group,
        value_group: q.value_group,
        unit: t.unit,
        value_clip: false,
        wait_fp8: false,
        sinks_fp8: false,
        window_fp8: false,
        key_outliers: 0.0,
        key_outliers_pooled: false,
    }
}

/// Share of the scored positions whose cache holds at least one quantizable token of `tag`
/// (outside the sinks and the window), on `plan`.
pub fn exposure(
    plan: &ReplayPlan,
    tag: Tag,
    unit: RecencyUnit,
    sinks: usize,
    window: usize,
) -> f64 {
    if plan.positions.is_empty() {
        return 0.0;
    }
    let seen = plan
        .positions
        .iter()
        .filter(|&&p| {
            let now = plan.tags[p];
            let end = (p + 1).saturating_sub(window);
            (sinks..end).any(|j| plan.tags[j].at(unit, now.turn, now.step) == tag)
        })
        .count();
    seen as f64 / plan.positions.len() as f64
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyPoint {
    pub tag: String,
    pub kv: Kv,
    /// The table's token share of the tag.
    pub tokens: f64,
    /// Layers with a row for this (tag, kv, bits).
    pub layers: usize,
    /// Σ over layers of the table's distortion.
    pub predicted_sum: f64,
    /// Σ over layers of distortion × the allocator's objective weight
    /// (`trajectories / max trajectories` of the row).
    pub predicted_allocator_weighted: f64,
    /// Σ over layers of distortion × share of scored positions that see the tag here.
    pub predicted_exposure_weighted: f64,
    pub exposure: f64,
    pub mean_kl: f64,
    pub top1: f64,
    pub positions: usize,
    pub effective_bits: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Correlation {
    pub predictor: String,
    pub n: usize,
    pub spearman: f64,
    /// Pearson of log10(prediction) and log10(KL), over points where both are positive.
    pub pearson_log: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyReport {
    pub model: String,
    pub calib: String,
    pub bits: u8,
    pub trajectories: Vec<TrajectoryInfo>,
    pub points: Vec<ProxyPoint>,
    pub correlations: Vec<Correlation>,
    pub reference_tokens_per_s: f64,
    pub wall_s: f64,
    pub notes: Vec<String>,
}

/// One way of predicting a point's KL from the table.
type Predictor = fn(&ProxyPoint) -> f64;

fn correlation(name: &str, pred: &[f64], kl: &[f64]) -> Correlation {
    let logs: (Vec<f64>, Vec<f64>) = pred
        .iter()
        .zip(kl)
        .filter(|(p, k)| **p > 0.0 && **k > 0.0)
        .map(|(p, k)| (p.log10(), k.log10()))
        .unzip();
    Correlation {
        predictor: name.into(),
        n: pred.len(),
        spearman: spearman(pred, kl),
        pearson_log: pearson(&logs.0, &logs.1),
    }
}

/// Up to `max` of `items` spread evenly, keeping order.
fn spread<T: Clone>(items: &[T], max: Option<usize>) -> Vec<T> {
    match max {
        Some(m) if m < items.len() => (0..m)
            .map(|i| items[(i * items.len()) / m].clone())
            .collect(),
        _ => items.to_vec(),
    }
}

/// Run the proxy check on `files` with the table in `calib_dir`.
pub fn proxy_check(
    model: &LoadedModel,
    calib_dir: &Path,
    files: &[TraceFile],
    opts: &ProxyOptions,
) -> Result<ProxyReport, EvalError> {
    let t0 = Instant::now();
    let table = read_table(calib_dir)?;
    if table.model_sha256 != model.sha256 {
        return Err(table_err(
            &table.path,
            format!(
                "calibrated for model sha256 {}, not {} ({}); calibrate this model first",
                table.model_sha256, model.sha256, model.name
            ),
        ));
    }
    if ![2, 4, 8].contains(&opts.bits) {
        return Err(EvalError::Option(format!(
            "--bits {} is not 2, 4 or 8",
            opts.bits
        )));
    }
    let shape = model.model.kv_shape();
    let qcfg = cache_config(&table);
    let (all_plans, mut notes) = prepare_plans(model, files, opts.max_tokens, opts.positions, 0)?;
    let plans = spread(&all_plans, opts.trajectories);
    if plans.len() < all_plans.len() {
        notes.push(format!(
            "{} of {} trajectories used (--trajectories)",
            plans.len(),
            all_plans.len()
        ));
    }

    // The K most common tags that have rows for both K and V at these bits and occur
    // (outside sinks and window) at some scored position of these traces: a tag the traces
    // never expose has KL 0 by construction and would say nothing about the proxy.
    let total_positions: usize = plans.iter().map(|p| p.positions.len()).sum();
    let exposure_of = |tag: Tag| {
        plans
            .iter()
            .map(|p| {
                exposure(p, tag, table.unit, table.sinks, table.window) * p.positions.len() as f64
            })
            .sum::<f64>()
            / total_positions.max(1) as f64
    };
    let mut tags: Vec<(Tag, f64)> = table
        .tokens
        .iter()
        .filter(|(t, _)| {
            [Kv::K, Kv::V]
                .iter()
                .all(|&kv| table.distortion.contains_key(&(**t, kv, opts.bits)))
        })
        .map(|(t, n)| (*t, *n))
        .collect();
    tags.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut exposures = BTreeMap::new();
    let mut kept = Vec::new();
    for (tag, n) in tags {
        if kept.len() == opts.tags {
            break;
        }
        let e = exposure_of(tag);
        if e > 0.0 {
            exposures.insert(tag, e);
            kept.push((tag, n));
        } else {
            notes.push(format!(
                "{tag} (token share {n:.1} in the table) never occurs outside sinks and window \
                 at a scored position of these traces: skipped"
            ));
        }
    }
    let tags = kept;
    if tags.is_empty() {
        return Err(table_err(
            &table.path,
            format!("no tag has rows at {} bits", opts.bits),
        ));
    }
    let variants: Vec<(Tag, f64, Kv)> = tags
        .iter()
        .flat_map(|&(t, n)| [(t, n, Kv::K), (t, n, Kv::V)])
        .collect();

    let cfg = ReplayConfig {
        chunk: opts.chunk,
        gen_tokens: 0,
        eos: Vec::new(),
    };
    let vocab = model.model.config.vocab_size;
    let mp = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = mp.add(ProgressBar::new(
        (plans.len() * (variants.len() + 1)) as u64,
    ));
    if let Ok(s) = ProgressStyle::with_template(
        "replays [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
    ) {
        overall.set_style(s.progress_chars("=> "));
    }

    let mut accs: Vec<Accumulator> = variants.iter().map(|_| Accumulator::default()).collect();
    let mut bits_num = vec![0.0f64; variants.len()];
    let mut bits_den = vec![0.0f64; variants.len()];
    let (mut ref_s, mut ref_tokens) = (0.0, 0usize);
    let mut infos = Vec::new();
    for plan in &plans {
        overall.set_message(plan.id.clone());
        let targets: Vec<u32> = plan.positions.iter().map(|&p| plan.ids[p + 1]).collect();
        let mut reference = ReferenceRows::new(vocab);
        let mut cache = EvalCache::Full(model.model.new_cache());
        let r = replay(
            &model.model,
            plan,
            &mut cache,
            &cfg,
            &mut |i, row| reference.push(row, targets[i]),
            &mut |_| {},
        );
        drop(cache);
        overall.inc(1);
        ref_s += r.replay_s;
        ref_tokens += r.fed;
        infos.push(TrajectoryInfo {
            id: plan.id.clone(),
            file: plan.file.clone(),
            tokens: r.fed,
            rendered_tokens: plan.rendered_tokens,
            truncated: plan.truncated,
            positions: plan.positions.len(),
            assistant_positions: plan.assistant_positions,
            tool_call_steps: 0,
            image_tokens: plan.image_tokens(r.fed),
        });
        for (vi, &(tag, _, kv)) in variants.iter().enumerate() {
            let mut policy = KvPolicy::uniform(shape.num_layers, PrecisionClass::FULL);
            let class = match kv {
                Kv::K => PrecisionClass::new(opts.bits, 16),
                Kv::V => PrecisionClass::new(16, opts.bits),
            }
            .map_err(|e| EvalError::Option(e.to_string()))?;
            for l in 0..shape.num_layers {
                policy
                    .set(l, tag, class)
                    .map_err(|e| EvalError::Option(e.to_string()))?;
            }
            let qc = QuantCache::new(shape, policy, qcfg).map_err(|source| EvalError::Cache {
                path: table.path.clone(),
                source,
            })?;
            let mut cache = EvalCache::Quant(Box::new(qc));
            let acc = &mut accs[vi];
            let r = replay(
                &model.model,
                plan,
                &mut cache,
                &cfg,
                &mut |i, row| acc.add(&reference, i, row, targets[i]),
                &mut |_| {},
            );
            overall.inc(1);
            if let Some(b) = r.bits {
                bits_num[vi] += b.weighted_bytes;
                bits_den[vi] += b.weighted_elements;
            }
        }
    }
    overall.finish_and_clear();

    let points: Vec<ProxyPoint> = variants
        .iter()
        .enumerate()
        .map(|(vi, &(tag, tokens, kv))| {
            let rows = &table.distortion[&(tag, kv, opts.bits)];
            let sum: f64 = rows.iter().map(|(_, d, _)| d).sum();
            let max_t = table.max_trajectories.max(1) as f64;
            let weighted: f64 = rows.iter().map(|(_, d, n)| d * *n as f64 / max_t).sum();
            let exp = exposures.get(&tag).copied().unwrap_or(0.0);
            let f = accs[vi].summary();
            ProxyPoint {
                tag: tag.to_string(),
                kv,
                tokens,
                layers: rows.len(),
                predicted_sum: sum,
                predicted_allocator_weighted: weighted,
                predicted_exposure_weighted: sum * exp,
                exposure: exp,
                mean_kl: f.mean_kl,
                top1: f.top1,
                positions: f.positions,
                effective_bits: if bits_den[vi] > 0.0 {
                    8.0 * bits_num[vi] / bits_den[vi]
                } else {
                    f64::NAN
                },
            }
        })
        .collect();
    let kl: Vec<f64> = points.iter().map(|p| p.mean_kl).collect();
    let mut correlations = Vec::new();
    let predictors: [(&str, Predictor); 3] = [
        ("sum over layers of distortion", |p| p.predicted_sum),
        ("… × allocator weight (trajectories share)", |p| {
            p.predicted_allocator_weighted
        }),
        ("… × exposure on these traces", |p| {
            p.predicted_exposure_weighted
        }),
    ];
    for (scope, keep) in [
        ("K and V", None),
        ("K only", Some(Kv::K)),
        ("V only", Some(Kv::V)),
    ] {
        let idx: Vec<usize> = (0..points.len())
            .filter(|&i| keep.is_none_or(|k| points[i].kv == k))
            .collect();
        let y: Vec<f64> = idx.iter().map(|&i| kl[i]).collect();
        for (name, f) in predictors {
            let x: Vec<f64> = idx.iter().map(|&i| f(&points[i])).collect();
            correlations.push(correlation(&format!("{scope}: {name}"), &x, &y));
        }
    }
    Ok(ProxyReport {
        model: model.name.clone(),
        calib: calib_dir.display().to_string(),
        bits: opts.bits,
        trajectories: infos,
        points,
        correlations,
        reference_tokens_per_s: ref_tokens as f64 / ref_s.max(1e-9),
        wall_s: t0.elapsed().as_secs_f64(),
        notes,
    })
}

fn verdict(rho: f64) -> &'static str {
    if rho.is_nan() {
        "undefined"
    } else if rho >= 0.8 {
        "strong"
    } else if rho >= 0.5 {
        "moderate"
    } else {
        "weak"
    }
}

pub fn markdown(r: &ProxyReport) -> String {
    let mut s = String::new();
    let positions: usize = r.trajectories.iter().map(|t| t.positions).sum();
    let tokens: usize = r.trajectories.iter().map(|t| t.tokens).sum();
    let _ = writeln!(s, "# Does attention distortion predict end-to-end KL?\n");
    let _ = writeln!(
        s,
        "Model `{}`, table `{}`, INT{}. For each tag, a policy quantizes only that tag's keys \
         (or only its values) in every layer, everything else 16-bit; the trajectories are \
         replayed end to end and the mean KL(f32 reference ‖ policy) of next-token \
         distributions is taken over {positions} assistant positions ({} trajectories, {tokens} \
         tokens). K and V are measured separately because the table rates them separately, \
         their distortions differ by orders of magnitude, and the allocator picks their bits \
         independently: a joint K+V point would hide whether the V column ranks anything. \
         Wall time {:.0} s.\n",
        r.model,
        r.calib,
        r.bits,
        r.trajectories.len(),
        r.wall_s
    );
    let _ = writeln!(
        s,
        "| tag | kv | token share | Σ_l distortion | × allocator weight | × exposure | exposure | mean KL | top-1 | bits (measured) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.points {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.3e} | {:.3e} | {:.3e} | {:.2} | {:.3e} | {:.2}% | {:.3} |",
            p.tag,
            p.kv.as_str(),
            p.tokens,
            p.predicted_sum,
            p.predicted_allocator_weighted,
            p.predicted_exposure_weighted,
            p.exposure,
            p.mean_kl,
            100.0 * p.top1,
            p.effective_bits
        );
    }
    let _ = writeln!(
        s,
        "\n| predictor | points | Spearman | Pearson (log–log) | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in &r.correlations {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {} |",
            c.predictor,
            c.n,
            c.spearman,
            c.pearson_log,
            verdict(c.spearman)
        );
    }
    let _ = writeln!(
        s,
        "\n`exposure` is the share of scored positions whose cache holds a quantizable token of \
         the tag (outside sinks and window) on these traces; the table's distortion is averaged \
         only over the queries that see the tag, so the end-to-end mean over all positions \
         scales with it. Verdict: Spearman ≥ 0.8 strong, ≥ 0.5 moderate, else weak."
    );
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// Write proxy.json, proxy.md, proxy.svg and proxy.png into `dir`, atomically.
pub fn write(r: &ProxyReport, dir: &Path) -> Result<(), EvalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    let json = dir.join("proxy.json");
    write_atomic(&json, |w| {
        serde_json::to_writer_pretty(&mut *w, r).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })
    .map_err(io(&json))?;
    let md = dir.join("proxy.md");
    let text = markdown(r);
    write_atomic(&md, |w| w.write_all(text.as_bytes())).map_err(io(&md))?;
    let scatter = Scatter {
        title: format!(
            "{}: table distortion vs end-to-end KL (INT{})",
            r.model, r.bits
        ),
        x_label: "Σ over layers of the table's distortion (log)".into(),
        y_label: "mean KL, one tag quantized (log)".into(),
        log_x: true,
        log_y: true,
        points: r
            .points
            .iter()
            .map(|p| Point {
                x: p.predicted_sum,
                y: p.mean_kl,
                label: format!("{} {}", p.tag, p.kv.as_str()),
            })
            .collect(),
        lines: Vec::new(),
    };
    let (svg, png) = (dir.join("proxy.svg"), dir.join("proxy.png"));
    plot::write(&scatter, &svg, &png).map_err(io(&svg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Recency, Role, TokenTag};

    #[test]
    fn exposure_counts_positions_that_see_the_tag_outside_the_window() {
        let t = |role, turn| TokenTag {
            role,
            modality: Modality::Text,
            turn,
            step: 0,
        };
        // 0..4 sinks (system), 4..10 user turn 1, 10..30 assistant turn 1, 30..40 user turn 2.
        let mut tags = vec![t(Role::System, 0); 4];
        tags.extend(vec![t(Role::User, 1); 6]);
        tags.extend(vec![t(Role::Assistant, 1); 20]);
        tags.extend(vec![t(Role::User, 2); 10]);
        let plan = ReplayPlan {
            id: "x".into(),
            file: "f".into(),
            ids: vec![0; 40],
            tags,
            positions: vec![12, 20, 35],
            assistant_positions: 3,
            tool_calls: Vec::new(),
            rendered_tokens: 40,
            truncated: false,
            media: None,
        };
        let user = |recency| Tag {
            recency,
            modality: Modality::Text,
            role: Role::User,
        };
        // Window 8: position 12 sees columns 4..5 (user, current); 20 sees 4..13; 35 sees
        // 4..28, where the turn-1 user tokens are now `previous`.
        let e = exposure(&plan, user(Recency::Current), RecencyUnit::Turn, 4, 8);
        assert!((e - 2.0 / 3.0).abs() < 1e-12, "{e}");
        let e = exposure(&plan, user(Recency::Previous), RecencyUnit::Turn, 4, 8);
        assert!((e - 1.0 / 3.0).abs() < 1e-12, "{e}");
        // A window wider than the context hides everything.
        assert_eq!(
            exposure(&plan, user(Recency::Current), RecencyUnit::Turn, 4, 64),
            0.0
        );
    }

    #[test]
    fn spread_picks_evenly() {
        assert_eq!(spread(&[1, 2, 3, 4, 5, 6], Some(3)), vec![1, 3, 5]);
        assert_eq!(spread(&[1, 2], Some(3)), vec![1, 2]);
        assert_eq!(spread(&[1, 2], None), vec![1, 2]);
    }
}
