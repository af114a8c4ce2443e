//! The evaluation run: per trajectory, one reference replay (kept in memory) and one replay
//! per profile compared against it, so N profiles cost N + 1 replays.

use super::metrics::{paired_mean_ci, Accumulator, Fidelity, PairedDiff, ReferenceRows};
use super::replay::{replay, EvalCache, Generated, ReplayConfig, ReplayPlan};
use super::toolcall::{parse_tool_calls, ParsedCall};
use super::EvalError;
use crate::kvcache::{QuantCache, QuantCacheConfig};
use crate::model::llama::DEFAULT_PREFILL_CHUNK;
use crate::model::load::LoadedModel;
use crate::model::tokenizer::Tokenizer;
use crate::profile::{ModelIdentity, Profile};
use crate::tags::RecencyUnit;
use crate::trace::read::TraceFile;
use crate::trace::render::render;
use crate::trace::template::ChatTemplate;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Replay at most this many tokens of a trajectory (the model context is always a limit).
    pub max_tokens: Option<usize>,
    /// Tool-call steps generated per trajectory (spread over it).
    pub tool_calls: usize,
    /// New tokens per generation at most.
    pub gen_tokens: usize,
    /// Scored positions per trajectory, spread over its assistant tokens (`None`: all).
    pub positions: Option<usize>,
    pub chunk: usize,
    pub progress: bool,
    /// Every profile's value groups quantized with least-squares ranges (`--value-clip`).
    pub value_clip: bool,
    /// Every profile's waiting keys (and values) rounded to FP8 (`--wait-fp8`).
    pub wait_fp8: bool,
    /// Every profile's sinks rounded to FP8 once out of the window (`--sinks-fp8`).
    pub sinks_fp8: bool,
    /// Every profile's window tokens of quantized classes rounded to FP8 (`--window-fp8`).
    pub window_fp8: bool,
    /// Fraction of every sealed per-channel key block kept exactly (`--key-outliers`).
    pub key_outliers: f64,
    /// Outliers chosen over all KV heads of a group together (`--key-outliers-pooled`).
    pub key_outliers_pooled: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_tokens: None,
            tool_calls: 2,
            gen_tokens: 96,
            positions: Some(128),
            chunk: DEFAULT_PREFILL_CHUNK,
            progress: false,
            value_clip: false,
            wait_fp8: false,
            sinks_fp8: false,
            window_fp8: false,
            key_outliers: 0.0,
            key_outliers_pooled: false,
        }
    }
}

/// A profile and the file it came from.
#[derive(Debug, Clone)]
pub struct NamedProfile {
    pub path: PathBuf,
    pub profile: Profile,
}

impl NamedProfile {
    /// Read, validate and check against `model` (errors name the file and the field).
    pub fn read(path: PathBuf, model: &ModelIdentity) -> Result<Self, EvalError> {
        let profile = Profile::read(&path)?;
        profile.check_model(&path, model)?;
        Ok(NamedProfile { path, profile })
    }
}

/// Render every trajectory of `files`, truncated to `max_tokens` (and the model context),
/// into replay plans. Returns the plans and notes on truncations and skipped trajectories.
pub fn prepare_plans(
    model: &LoadedModel,
    files: &[TraceFile],
    max_tokens: Option<usize>,
    positions: Option<usize>,
    tool_calls: usize,
) -> Result<(Vec<ReplayPlan>, Vec<String>), EvalError> {
    render_plans(model, files, max_tokens, positions, tool_calls, true)
}

/// As [`prepare_plans`], keeping trajectories with no assistant token within the limit when
/// `skip_unscored` is false (for checks that compare every position, not assistant ones).
pub fn render_plans(
    model: &LoadedModel,
    files: &[TraceFile],
    max_tokens: Option<usize>,
    positions: Option<usize>,
    tool_calls: usize,
    skip_unscored: bool,
) -> Result<(Vec<ReplayPlan>, Vec<String>), EvalError> {
    let template = ChatTemplate::for_tokenizer(&model.tokenizer)
        .map_err(|e| EvalError::Option(format!("chat template of {}: {e}", model.name)))?;
    let context = model.model.config.max_position_embeddings.max(1);
    let limit = max_tokens.map_or(context, |m| m.min(context));
    let mut plans = Vec::new();
    let mut notes = Vec::new();
    let mut any = false;
    for f in files {
        for traj in &f.trajectories {
            any = true;
            let terr = |msg: String| EvalError::Trajectory {
                id: traj.id.clone(),
                file: f.path.clone(),
                msg,
            };
            let rendered = render(traj, &template, &model.tokenizer, &model.render_options())
                .map_err(|e| terr(e.to_string()))?;
            let file = f.path.display().to_string();
            let mut plan = ReplayPlan::new(&file, traj, &rendered, limit, positions, tool_calls);
            let dir = f.path.parent().unwrap_or(std::path::Path::new("."));
            plan.media = model
                .media(&traj.messages, dir, &rendered.ids)
                .map_err(terr)?;
            model
                .model
                .check_tokens(&plan.ids)
                .map_err(|e| terr(format!("model/trace mismatch: {e}")))?;
            if plan.truncated {
                notes.push(format!(
                    "{} ({file}): truncated from {} to {} tokens ({})",
                    traj.id,
                    plan.rendered_tokens,
                    plan.ids.len(),
                    if max_tokens.is_some_and(|m| m < context) {
                        "--max-tokens"
                    } else {
                        "model context"
                    }
                ));
            }
            if plan.positions.is_empty() && skip_unscored {
                notes.push(format!(
                    "{} ({file}): no assistant token within {} tokens; skipped",
                    traj.id,
                    plan.ids.len()
                ));
                continue;
            }
            plans.push(plan);
        }
    }
    if !any {
        return Err(EvalError::NoTrajectories);
    }
    if plans.is_empty() {
        return Err(EvalError::NothingToScore);
    }
    Ok((plans, notes))
}

/// Tool-call outcomes of one cache over the generated steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ToolCallStats {
    /// Steps generated.
    pub steps: usize,
    /// Steps whose generation parses as tool calls.
    pub parsed: usize,
    /// Steps where the reference's generation parses (the denominator of `matches`).
    pub ref_parsed: usize,
    /// Parsed calls (names and arguments) equal to the reference's parsed calls.
    pub matches: usize,
    /// Generations token-for-token identical to the reference's (over all steps).
    pub identical: usize,
    /// Generations that reached the end-of-turn token within the cap.
    pub finished: usize,
}

impl ToolCallStats {
    /// `matches / ref_parsed` (None when the reference parsed nothing).
    pub fn match_rate(&self) -> Option<f64> {
        (self.ref_parsed > 0).then(|| self.matches as f64 / self.ref_parsed as f64)
    }
}

/// The reference's own tool-call outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ReferenceToolCalls {
    pub steps: usize,
    pub parsed: usize,
    /// Parsed calls equal to the calls recorded in the trace.
    pub matches_recorded: usize,
    pub finished: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryInfo {
    pub id: String,
    pub file: String,
    /// Tokens fed (up to the last scored position).
    pub tokens: usize,
    pub rendered_tokens: usize,
    pub truncated: bool,
    /// Scored positions, of `assistant_positions`.
    pub positions: usize,
    pub assistant_positions: usize,
    pub tool_call_steps: usize,
    /// Image tokens fed (a vision-language model's images; 0 for a text-only model).
    #[serde(default)]
    pub image_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceSummary {
    pub cache: &'static str,
    pub replay_s: f64,
    pub tokens_per_s: f64,
    pub generate_s: f64,
    pub generated_tokens: usize,
    pub tool_calls: ReferenceToolCalls,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryFidelity {
    pub id: String,
    pub positions: usize,
    pub mean_kl: f64,
    pub top1: f64,
    pub effective_bits: f64,
    /// KL at each scored position, in replay order (the same positions for every profile,
    /// so two profiles can be compared position by position).
    pub kl: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProfileResult {
    pub name: String,
    pub policy: String,
    pub path: String,
    pub recency_unit: RecencyUnit,
    /// What the profile says it achieves on the calibration mix.
    pub profile_bits: f64,
    /// Measured: stored bits per K/V element (scales, sinks, window and staged keys
    /// included), averaged over the scored positions (each position weighs the cache as it
    /// was after its chunk).
    pub effective_bits: f64,
    /// Measured at the end of each trajectory's replay, averaged over trajectories.
    pub final_bits: f64,
    pub fidelity: Fidelity,
    pub tool_calls: ToolCallStats,
    pub per_trajectory: Vec<TrajectoryFidelity>,
    pub replay_s: f64,
    pub tokens_per_s: f64,
    pub generate_s: f64,
    /// First quantization error met (those tokens were kept at 16 bits).
    pub quant_errors: Vec<String>,
    /// K/V roundings to FP8 at scale 1 (`--wait-fp8`, `--sinks-fp8`) and how many were
    /// beyond ±448 and clipped, over every trajectory.
    #[serde(skip_serializing_if = "is_zero")]
    pub fp8_rounded: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub fp8_clipped: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalOptionsOut {
    pub max_tokens: Option<usize>,
    pub tool_calls: usize,
    pub gen_tokens: usize,
    pub positions: Option<usize>,
    pub chunk: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub value_clip: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wait_fp8: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sinks_fp8: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub window_fp8: bool,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub key_outliers: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub key_outliers_pooled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub model_sha256: String,
    pub options: EvalOptionsOut,
    pub trajectories: Vec<TrajectoryInfo>,
    pub reference: ReferenceSummary,
    pub profiles: Vec<ProfileResult>,
    /// Every profile after the first against the first, position by position.
    pub paired: Vec<PairedDiff>,
    pub notes: Vec<String>,
    pub wall_s: f64,
}

/// Each profile after the first against the first, over the positions both scored.
pub fn paired_against_first(profiles: &[ProfileResult]) -> Vec<PairedDiff> {
    let Some((first, rest)) = profiles.split_first() else {
        return Vec::new();
    };
    let kls = |p: &ProfileResult| -> Vec<f64> {
        p.per_trajectory.iter().flat_map(|t| t.kl.clone()).collect()
    };
    let base = kls(first);
    rest.iter()
        .filter_map(|p| {
            let (mean, ci95) = paired_mean_ci(&base, &kls(p))?;
            let pairs = || first.per_trajectory.iter().zip(&p.per_trajectory);
            Some(PairedDiff {
                profile: p.name.clone(),
                against: first.name.clone(),
                positions: base.len(),
                mean,
                ci95,
                lower_in: pairs().filter(|(a, b)| b.mean_kl < a.mean_kl).count(),
                trajectories: pairs().count(),
            })
        })
        .collect()
}

fn bar(mp: &MultiProgress, len: u64, template: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Parse generated ids as tool calls (`None`: no parseable call).
fn parsed(tok: &Tokenizer, g: &Generated) -> Option<Vec<ParsedCall>> {
    let text = tok.decode(&g.ids).ok()?;
    parse_tool_calls(&text)
}

/// Per-profile running totals.
#[derive(Default)]
struct Totals {
    acc: Accumulator,
    tool: ToolCallStats,
    per_traj: Vec<TrajectoryFidelity>,
    bytes: f64,
    elements: f64,
    final_bits: Vec<f64>,
    replay_s: f64,
    tokens: usize,
    generate_s: f64,
    errors: Vec<String>,
    fp8_rounded: usize,
    fp8_clipped: usize,
}

/// Evaluate `profiles` on `plans` against the f32 reference cache.
fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

pub fn evaluate(
    model: &LoadedModel,
    plans: &[ReplayPlan],
    profiles: &[NamedProfile],
    opts: &EvalOptions,
    notes: Vec<String>,
) -> Result<EvalReport, EvalError> {
    let t0 = Instant::now();
    let shape = model.model.kv_shape();
    let vocab = model.model.config.vocab_size;
    let policies = profiles
        .iter()
        .map(|p| {
            let base = p.profile.cache.cache_config();
            let cfg = QuantCacheConfig {
                value_clip: opts.value_clip,
                // `--key-outliers` replaces the profile's own fraction.
                key_outliers: if opts.key_outliers > 0.0 {
                    opts.key_outliers
                } else {
                    base.key_outliers
                },
                key_outliers_pooled: opts.key_outliers_pooled || base.key_outliers_pooled,
                ..base.with_fp8(opts.wait_fp8, opts.sinks_fp8, opts.window_fp8)
            };
            Ok((p.profile.to_policy()?, cfg))
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    // Check every profile builds a cache before the long work starts.
    for (p, (policy, cfg)) in profiles.iter().zip(&policies) {
        QuantCache::new(shape, policy.clone(), *cfg).map_err(|source| EvalError::Cache {
            path: p.path.clone(),
            source,
        })?;
    }
    let cfg = ReplayConfig {
        chunk: opts.chunk,
        gen_tokens: opts.gen_tokens,
        eos: model.tokenizer.eos_ids().to_vec(),
    };
    let tok = &model.tokenizer;

    let mp = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let all = bar(
        &mp,
        (plans.len() * (profiles.len() + 1)) as u64,
        "replays [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
    );
    let tokens_bar = bar(
        &mp,
        1,
        "  {prefix:12} [{bar:30}] {pos}/{len} tokens {per_sec}",
    );

    let mut totals: Vec<Totals> = profiles.iter().map(|_| Totals::default()).collect();
    let mut ref_tool = ReferenceToolCalls::default();
    let (mut ref_s, mut ref_tokens, mut ref_gen_s, mut ref_gen_tokens) = (0.0, 0usize, 0.0, 0);
    let mut infos = Vec::new();
    for plan in plans {
        let targets: Vec<u32> = plan.positions.iter().map(|&p| plan.ids[p + 1]).collect();
        all.set_message(plan.id.clone());
        tokens_bar.set_length(plan.replay_len() as u64);
        tokens_bar.set_position(0);
        tokens_bar.set_prefix("reference");
        let mut reference = ReferenceRows::new(vocab);
        let mut cache = EvalCache::Full(model.model.new_cache());
        let r = replay(
            &model.model,
            plan,
            &mut cache,
            &cfg,
            &mut |i, row| reference.push(row, targets[i]),
            &mut |d| tokens_bar.set_position(d as u64),
        );
        drop(cache);
        all.inc(1);
        ref_s += r.replay_s;
        ref_tokens += r.fed;
        ref_gen_s += r.generate_s;
        ref_gen_tokens += r.generated_tokens;
        let ref_gens = r.generations;
        let ref_calls: Vec<Option<Vec<ParsedCall>>> =
            ref_gens.iter().map(|g| parsed(tok, g)).collect();
        for (g, c) in ref_gens.iter().zip(&ref_calls) {
            ref_tool.steps += 1;
            ref_tool.finished += usize::from(g.finished);
            if let Some(c) = c {
                ref_tool.parsed += 1;
                if *c == plan.tool_calls[g.step].recorded {
                    ref_tool.matches_recorded += 1;
                }
            }
        }
        infos.push(TrajectoryInfo {
            id: plan.id.clone(),
            file: plan.file.clone(),
            tokens: r.fed,
            rendered_tokens: plan.rendered_tokens,
            truncated: plan.truncated,
            positions: plan.positions.len(),
            assistant_positions: plan.assistant_positions,
            tool_call_steps: ref_gens.len(),
            image_tokens: plan.image_tokens(r.fed),
        });

        for ((p, (policy, qcfg)), tot) in profiles.iter().zip(&policies).zip(&mut totals) {
            tokens_bar.set_prefix(p.profile.name.clone());
            tokens_bar.set_position(0);
            let qc = QuantCache::new(shape, policy.clone(), *qcfg).map_err(|source| {
                EvalError::Cache {
                    path: p.path.clone(),
                    source,
                }
            })?;
            let mut cache = EvalCache::Quant(Box::new(qc));
            let mut acc = Accumulator::default();
            let r = replay(
                &model.model,
                plan,
                &mut cache,
                &cfg,
                &mut |i, row| acc.add(&reference, i, row, targets[i]),
                &mut |d| tokens_bar.set_position(d as u64),
            );
            drop(cache);
            all.inc(1);
            let bits = r.bits.unwrap_or_default();
            let s = acc.summary();
            tot.per_traj.push(TrajectoryFidelity {
                id: plan.id.clone(),
                positions: s.positions,
                mean_kl: s.mean_kl,
                top1: s.top1,
                effective_bits: bits.effective_bits(),
                kl: acc.kls.clone(),
            });
            tot.acc.merge(&acc);
            tot.bytes += bits.weighted_bytes;
            tot.elements += bits.weighted_elements;
            tot.final_bits.push(bits.last.effective_bits());
            tot.replay_s += r.replay_s;
            tot.tokens += r.fed;
            tot.generate_s += r.generate_s;
            if let Some(e) = r.quant_error {
                tot.errors.push(format!("{}: {e}", plan.id));
            }
            tot.fp8_rounded += r.fp8_clipping.0;
            tot.fp8_clipped += r.fp8_clipping.1;
            for g in &r.generations {
                let Some(i) = ref_gens.iter().position(|x| x.step == g.step) else {
                    continue;
                };
                let t = &mut tot.tool;
                t.steps += 1;
                t.finished += usize::from(g.finished);
                t.identical += usize::from(g.ids == ref_gens[i].ids);
                let mine = parsed(tok, g);
                t.parsed += usize::from(mine.is_some());
                if let Some(want) = &ref_calls[i] {
                    t.ref_parsed += 1;
                    t.matches += usize::from(mine.as_ref() == Some(want));
                }
            }
        }
    }
    tokens_bar.finish_and_clear();
    all.finish_and_clear();

    let profiles_out: Vec<ProfileResult> = profiles
        .iter()
        .zip(totals)
        .map(|(p, t)| ProfileResult {
            name: p.profile.name.clone(),
            policy: p.profile.policy.clone(),
            path: p.path.display().to_string(),
            recency_unit: p.profile.cache.recency_unit,
            profile_bits: p.profile.budget.achieved_bits,
            effective_bits: if t.elements > 0.0 {
                8.0 * t.bytes / t.elements
            } else {
                f64::NAN
            },
            final_bits: t.final_bits.iter().sum::<f64>() / t.final_bits.len().max(1) as f64,
            fidelity: t.acc.summary(),
            tool_calls: t.tool,
            per_trajectory: t.per_traj,
            replay_s: t.replay_s,
            tokens_per_s: t.tokens as f64 / t.replay_s.max(1e-9),
            generate_s: t.generate_s,
            quant_errors: t.errors,
            fp8_rounded: t.fp8_rounded,
            fp8_clipped: t.fp8_clipped,
        })
        .collect();
    Ok(EvalReport {
        model: model.name.clone(),
        model_sha256: model.sha256.clone(),
        options: EvalOptionsOut {
            max_tokens: opts.max_tokens,
            tool_calls: opts.tool_calls,
            gen_tokens: opts.gen_tokens,
            positions: opts.positions,
            chunk: opts.chunk,
            value_clip: opts.value_clip,
            wait_fp8: opts.wait_fp8,
            sinks_fp8: opts.sinks_fp8,
            window_fp8: opts.window_fp8,
            key_outliers: opts.key_outliers,
            key_outliers_pooled: opts.key_outliers_pooled,
        },
        trajectories: infos,
        reference: ReferenceSummary {
            cache: "f32 (unquantized)",
            replay_s: ref_s,
            tokens_per_s: ref_tokens as f64 / ref_s.max(1e-9),
            generate_s: ref_gen_s,
            generated_tokens: ref_gen_tokens,
            tool_calls: ref_tool,
        },
        paired: paired_against_first(&profiles_out),
        profiles: profiles_out,
        notes,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}
