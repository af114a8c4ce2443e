//! The integer program of DESIGN §7: bits per (layer, K|V, tag) under a memory budget, its
//! exact DP cross-check, and the baseline policies, all written as `triaxkv.profile/v1`.

pub mod budget;
pub mod dp;
pub mod ilp;
pub mod lagrange;
pub mod mckp;
pub mod policy;
pub mod problem;
pub mod report;

pub use budget::BudgetSpec;
pub use ilp::SolveStats;
pub use mckp::{Choice, Mckp, Selection};
pub use policy::Policy;

use crate::calibrate::table::SensitivityTable;
use crate::calibrate::ParseQuantizerError;
use crate::kvcache::quantized::KEEP;
use crate::profile::{
    Assignment, Budget, KeyModeName, Kv, ModelIdentity, Profile, ProfileProvenance, SCHEMA,
};
use problem::{accounting, effective_bits, ItemKey, Sensitivity};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    #[error("the sensitivity table has no rows")]
    EmptyTable,
    #[error("sensitivity table provenance: {0}")]
    Quantizer(#[from] ParseQuantizerError),
    #[error("sensitivity table provenance: {0}")]
    Provenance(String),
    #[error(
        "the table was calibrated on {table_model} (sha256 {table_sha}), not on {model} \
         (sha256 {model_sha}): pass the calibrated model with --model, or calibrate this one"
    )]
    ModelMismatch {
        table_model: String,
        table_sha: String,
        model: String,
        model_sha: String,
    },
    #[error("the table has layer {layer}, the model only {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("bit width {0} is not one of 2, 4, 8, 16")]
    BadBits(u8),
    #[error("no bit widths to choose from")]
    NoBits,
    #[error(
        "--hold-fp8 holds the tokens waiting for a per-channel key group in FP8: the table's \
         keys are grouped per token"
    )]
    HoldFp8KeyMode,
    #[error(
        "the table has no rows at {missing:?} bits (it measured {measured:?}); re-run \
         `triaxkv calibrate --bits` with them, or leave them out of --bits (16 needs no rows)"
    )]
    MissingBits { missing: Vec<u8>, measured: Vec<u8> },
    #[error("the table has no {bits}-bit row for layer {layer} {kv} {tag}")]
    MissingItemBits {
        layer: usize,
        kv: &'static str,
        tag: crate::tags::Tag,
        bits: u8,
    },
    #[error("--policy {0} solves under a budget: give --budget (bits like 2.75, or bytes like 2GiB with --context and --batch)")]
    BudgetRequired(Policy),
    #[error("{0}")]
    BudgetOptions(String),
    #[error(
        "--layer-bands {bands}: applies to --policy tag-only or tag-kv (the others choose per \
         layer already), and must be between 1 and the model's {layers} layers"
    )]
    LayerBands { bands: usize, layers: usize },
    #[error(
        "budget {budget:.4} bits per element is below the smallest feasible, {floor:.4} \
         (every tag at {lowest} bits, the {protected:.0} sink and window tokens per query at \
         {protected_bits})"
    )]
    Infeasible {
        budget: f64,
        floor: f64,
        lowest: u8,
        protected: f64,
        protected_bits: f64,
    },
    /// Internal: a solver was handed a problem where nothing fits (the caller reports the floor).
    #[error("no selection fits the capacity")]
    NothingFits,
    #[error("solver: {0}")]
    Solver(String),
    #[error("the DP frontier grew past {states} states; use --solver ilp")]
    DpTooLarge { states: usize },
}

/// Which exact solver runs the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Solver {
    /// good_lp + microlp after Lagrangian reduced-cost fixing (the default).
    Ilp,
    /// good_lp + microlp on the whole problem (to measure what the fixing saves).
    IlpFull,
    /// The Pareto-frontier DP with Lagrangian pruning.
    Dp,
}

impl Solver {
    pub fn as_str(self) -> &'static str {
        match self {
            Solver::Ilp => "microlp",
            Solver::IlpFull => "microlp-full",
            Solver::Dp => "dp",
        }
    }
}

/// What to allocate.
#[derive(Debug, Clone)]
pub struct Request {
    pub policy: Policy,
    pub budget: Option<BudgetSpec>,
    /// Bit widths to choose from (2, 4, 8, 16).
    pub bits: Vec<u8>,
    /// Tokens per sequence the budget is stated for (required for a budget in bytes).
    pub context: Option<usize>,
    pub batch: Option<usize>,
    pub solver: Solver,
    pub name: Option<String>,
    /// Multiplies the objective weight of every value item: puts value distortion on the
    /// keys' scale of end-to-end damage (1.0 = the table as measured).
    pub value_weight: f64,
    /// 16-bit sink tokens and newest-token window of the profile's cache, replacing the
    /// policy's (the calibration's, or the fixed baseline's own).
    pub sinks: Option<usize>,
    pub window: Option<usize>,
    /// The sinks, window and waiting tokens held in FP8 (`CacheSettings::hold_fp8`): the
    /// sinks and window charged at 8 bits.
    pub hold_fp8: bool,
    /// For `tag-only` / `tag-kv`: split the layers into this many contiguous bands of
    /// (nearly) equal size, each with its own bit width per tag (None or 1: one band).
    pub layer_bands: Option<usize>,
    /// Fraction of each per-channel key group kept exactly (`CacheSettings::key_outliers`).
    pub key_outliers: f64,
    /// Those outliers chosen over a group's KV heads together
    /// (`CacheSettings::key_outliers_pooled`).
    pub key_outliers_pooled: bool,
}

/// The sensitivity table solved over, for the profile's provenance.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub path: String,
    pub sha256: String,
}

/// One item's outcome, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignedItem {
    pub key: ItemKey,
    /// Quantized tokens per query under the profile's cache.
    pub tokens: f64,
    pub bits: u8,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub profile: Profile,
    pub items: Vec<AssignedItem>,
    pub stats: SolveStats,
    /// The budget in bits per element (converted from bytes when given so).
    pub budget_bits: Option<f64>,
    /// The smallest average bits the policy can reach (its floor).
    pub floor_bits: f64,
    /// Tokens per query and how many of them are 16-bit, as accounted.
    pub context: f64,
    pub protected: f64,
    pub notes: Vec<String>,
}

fn kv_str(kv: Kv) -> &'static str {
    kv.as_str()
}

/// Solve (or build) `req.policy` over `table` for `model`; nothing is written.
pub fn allocate(
    table: &SensitivityTable,
    calibration: &Calibration,
    model: &ModelIdentity,
    req: &Request,
) -> Result<Outcome, AllocateError> {
    let mut sens = Sensitivity::from_table(table)?;
    if !(req.value_weight.is_finite() && req.value_weight > 0.0) {
        return Err(AllocateError::BudgetOptions(format!(
            "--value-weight {}: must be a positive number",
            req.value_weight
        )));
    }
    for item in sens.items.iter_mut().filter(|i| i.key.kv == Kv::V) {
        item.weight *= req.value_weight;
    }
    let prov = &sens.provenance;
    if prov.model_sha256 != model.sha256 {
        return Err(AllocateError::ModelMismatch {
            table_model: prov.model.clone(),
            table_sha: prov.model_sha256.clone(),
            model: model.name.clone(),
            model_sha: model.sha256.clone(),
        });
    }
    if sens.layers > model.layers {
        return Err(AllocateError::LayerOutOfRange {
            layer: sens.layers - 1,
            layers: model.layers,
        });
    }
    let mut notes = Vec::new();

    // The budget in bits per element.
    let budget_bits = match (req.budget, req.context, req.batch) {
        (None, _, Some(_)) => {
            return Err(AllocateError::BudgetOptions(
                "--batch applies only to a budget in bytes".into(),
            ))
        }
        (None, _, None) => None,
        (Some(BudgetSpec::Bits(_)), _, Some(_)) => {
            return Err(AllocateError::BudgetOptions(
                "--batch applies only to a budget in bytes (e.g. --budget 2GiB)".into(),
            ))
        }
        (Some(BudgetSpec::Bits(b)), _, None) => Some(b),
        (Some(BudgetSpec::Bytes(n)), Some(ctx), Some(batch)) if ctx > 0 && batch > 0 => {
            Some(budget::bits_for_bytes(n, model, ctx, batch))
        }
        (Some(BudgetSpec::Bytes(_)), _, _) => {
            return Err(AllocateError::BudgetOptions(
                "a budget in bytes needs --context N and --batch N (both > 0)".into(),
            ))
        }
    };
    if let Some(0) = req.context {
        return Err(AllocateError::BudgetOptions("--context must be > 0".into()));
    }

    let bands = req.layer_bands.unwrap_or(1);
    if bands != 1
        && (!matches!(req.policy, Policy::TagOnly | Policy::TagKv)
            || bands == 0
            || bands > model.layers)
    {
        return Err(AllocateError::LayerBands {
            bands,
            layers: model.layers,
        });
    }

    let fixed = req.policy.fixed_bits();
    let mut bits: Vec<u8> = match fixed {
        Some(b) => vec![b],
        None => req.bits.clone(),
    };
    bits.sort_unstable();
    bits.dedup();
    if bits.is_empty() {
        return Err(AllocateError::NoBits);
    }
    if let Some(&b) = bits.iter().find(|&&b| ![2, 4, 8, KEEP].contains(&b)) {
        return Err(AllocateError::BadBits(b));
    }
    let missing: Vec<u8> = bits
        .iter()
        .copied()
        .filter(|&b| b != KEEP && !sens.measured.contains(&b))
        .collect();
    if !missing.is_empty() {
        return Err(AllocateError::MissingBits {
            missing,
            measured: sens.measured.iter().copied().collect(),
        });
    }
    for it in &sens.items {
        if let Some(&b) = bits
            .iter()
            .find(|&&b| b != KEEP && !it.distortion.contains_key(&b))
        {
            return Err(AllocateError::MissingItemBits {
                layer: it.key.layer,
                kv: kv_str(it.key.kv),
                tag: it.key.tag,
                bits: b,
            });
        }
    }

    let mut cache = sens.cache.clone();
    let (sinks, window) = req.policy.protected(cache.sinks, cache.window);
    let (sinks, window) = (req.sinks.unwrap_or(sinks), req.window.unwrap_or(window));
    if (sinks, window) != (cache.sinks, cache.window) {
        let held = if req.hold_fp8 { "FP8" } else { "16-bit" };
        notes.push(format!(
            "{} keeps {sinks} sinks and a {window}-token {held} window (calibrated with {} and {} \
             at 16 bits): its objective reuses the table's distortions, an estimate",
            req.policy, cache.sinks, cache.window
        ));
    }
    cache.sinks = sinks;
    cache.window = window;
    if req.hold_fp8 && cache.key_mode != KeyModeName::PerChannel {
        return Err(AllocateError::HoldFp8KeyMode);
    }
    cache.hold_fp8 = req.hold_fp8;
    // A table calibrated with outliers measured its keys with them: the profile keeps them
    // (and their pooling) unless --key-outliers names another fraction.
    let calibrated = cache.key_outliers;
    let (key_outliers, pooled) = if req.key_outliers == 0.0 {
        (
            calibrated,
            cache.key_outliers_pooled || req.key_outliers_pooled,
        )
    } else {
        (req.key_outliers, req.key_outliers_pooled)
    };
    if pooled && key_outliers == 0.0 {
        return Err(AllocateError::BudgetOptions(
            "--key-outliers-pooled pools key outliers: give --key-outliers F (or a table \
             calibrated with them)"
                .into(),
        ));
    }
    if key_outliers != 0.0 {
        if !(0.0..=0.25).contains(&key_outliers) {
            return Err(AllocateError::BudgetOptions(format!(
                "--key-outliers {key_outliers}: must be a fraction between 0 and 0.25"
            )));
        }
        if cache.key_mode != KeyModeName::PerChannel {
            return Err(AllocateError::BudgetOptions(
                "--key-outliers keeps elements of per-channel key groups: the table's keys are \
                 grouped per token"
                    .into(),
            ));
        }
        let calibrated_pooled = cache.key_outliers_pooled;
        let measured = if calibrated == key_outliers && calibrated_pooled == pooled {
            "the table's distortions were measured with them".to_string()
        } else if calibrated == 0.0 {
            "the objective reuses the table's distortions, measured without outliers: an \
             estimate"
                .to_string()
        } else {
            format!(
                "the objective reuses the table's distortions, measured with {:.2}%{}: an \
                 estimate",
                100.0 * calibrated,
                if calibrated_pooled {
                    " pooled"
                } else {
                    " per head"
                }
            )
        };
        notes.push(format!(
            "{:.2}% of every key group kept exactly{} (+{:.3} bits per quantized key element); \
             {measured}. The GPU pool does not store outliers yet",
            100.0 * key_outliers,
            if pooled {
                ", chosen over its KV heads together"
            } else {
                ""
            },
            32.0 * key_outliers
        ));
    }
    cache.key_outliers = key_outliers;
    cache.key_outliers_pooled = pooled;
    let protected_bits = if req.hold_fp8 { 8.0 } else { 16.0 };
    let acc = accounting(&sens, sinks, window, req.context, protected_bits);
    let eff = |kv: Kv, b: u8| effective_bits(&cache, kv, b);
    let value = |i: usize, b: u8| -> f64 {
        let it = &sens.items[i];
        if b == KEEP {
            0.0
        } else {
            it.weight * it.distortion.get(&b).copied().unwrap_or(f64::NAN)
        }
    };

    let started = Instant::now();
    let (item_bits, stats, floor_bits, solver) = match fixed {
        Some(b) => {
            if budget_bits.is_some() {
                notes.push(format!(
                    "{} has fixed bits; --budget is not used by it",
                    req.policy
                ));
            }
            let mut cost = 0.0;
            for (i, it) in sens.items.iter().enumerate() {
                cost += acc.tokens[i] * eff(it.key.kv, b)?;
            }
            let floor = acc.bits(cost);
            (
                vec![b; sens.items.len()],
                SolveStats::default(),
                floor,
                "none",
            )
        }
        None => {
            let budget = budget_bits.ok_or(AllocateError::BudgetRequired(req.policy))?;
            // One knapsack item per group of items that must share a bit width.
            let mut groups: BTreeMap<policy::GroupKey, Vec<usize>> = BTreeMap::new();
            for (i, it) in sens.items.iter().enumerate() {
                let mut g = req.policy.group(&it.key);
                if bands > 1 {
                    g.layer = policy::layer_band(it.key.layer, bands, model.layers);
                }
                groups.entry(g).or_default().push(i);
            }
            let groups: Vec<Vec<usize>> = groups.into_values().collect();
            let mut items = Vec::with_capacity(groups.len());
            for members in &groups {
                let mut choices = Vec::with_capacity(bits.len());
                for &b in &bits {
                    let mut c = Choice {
                        cost: 0.0,
                        value: 0.0,
                    };
                    for &m in members {
                        c.cost += acc.tokens[m] * eff(sens.items[m].key.kv, b)?;
                        c.value += value(m, b);
                    }
                    choices.push(c);
                }
                items.push(choices);
            }
            let p = Mckp {
                items,
                capacity: budget * acc.total - acc.fixed,
            };
            let floor = acc.bits(p.cheapest().cost);
            let lowest = bits[0];
            let infeasible = || AllocateError::Infeasible {
                budget,
                floor,
                lowest,
                protected: acc.protected,
                protected_bits,
            };
            if !p.fits(&p.cheapest()) {
                return Err(infeasible());
            }
            let solved = match req.solver {
                Solver::Ilp => ilp::solve_ilp(&p, true),
                Solver::IlpFull => ilp::solve_ilp(&p, false),
                Solver::Dp => dp::solve_dp(&p, true),
            };
            let (sel, stats) = match solved {
                Err(AllocateError::NothingFits) => return Err(infeasible()),
                other => other?,
            };
            let mut item_bits = vec![0u8; sens.items.len()];
            for (g, members) in groups.iter().enumerate() {
                for &m in members {
                    item_bits[m] = bits[sel.choice[g]];
                }
            }
            (item_bits, stats, floor, req.solver.as_str())
        }
    };
    let solve_s = started.elapsed().as_secs_f64();

    let mut cost = 0.0;
    let mut objective = 0.0;
    for (i, it) in sens.items.iter().enumerate() {
        cost += acc.tokens[i] * eff(it.key.kv, item_bits[i])?;
        objective += value(i, item_bits[i]);
    }
    let achieved = acc.bits(cost);

    // Tags the table never saw get the width most of the K (V) tokens got.
    let default_bits = |kv: Kv| -> u8 {
        let mut share: BTreeMap<u8, f64> = BTreeMap::new();
        for (i, it) in sens.items.iter().enumerate() {
            if it.key.kv == kv {
                *share.entry(item_bits[i]).or_insert(0.0) += acc.tokens[i];
            }
        }
        share
            .into_iter()
            .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(b, _)| b)
            .unwrap_or(bits[bits.len() - 1])
    };

    let name = req
        .name
        .clone()
        .unwrap_or_else(|| match (fixed, req.budget) {
            (None, Some(b)) => format!("{}-{b}", req.policy),
            _ => req.policy.to_string(),
        });
    let (asked_bytes, context, batch) = match req.budget {
        Some(BudgetSpec::Bytes(n)) if fixed.is_none() => (Some(n), req.context, req.batch),
        _ => (None, req.context, None),
    };
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let items: Vec<AssignedItem> = sens
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| AssignedItem {
            key: it.key,
            tokens: acc.tokens[i],
            bits: item_bits[i],
        })
        .collect();
    let profile = Profile {
        schema: SCHEMA.into(),
        name,
        policy: req.policy.to_string(),
        model: model.clone(),
        cache,
        budget: Budget {
            asked_bits: if fixed.is_none() { budget_bits } else { None },
            achieved_bits: achieved,
            asked_bytes,
            context,
            batch,
        },
        bit_choices: bits.clone(),
        default_k_bits: default_bits(Kv::K),
        default_v_bits: default_bits(Kv::V),
        assignments: items
            .iter()
            .map(|a| Assignment {
                layer: a.key.layer,
                kv: a.key.kv,
                recency: a.key.tag.recency,
                modality: a.key.tag.modality,
                role: a.key.tag.role,
                bits: a.bits,
            })
            .collect(),
        provenance: ProfileProvenance {
            calibration: Some(calibration.path.clone()),
            calibration_sha256: Some(calibration.sha256.clone()),
            solver: solver.into(),
            objective: Some(objective),
            solve_s: fixed.is_none().then_some(solve_s),
            triaxkv_version: env!("CARGO_PKG_VERSION").into(),
            created_unix,
            value_weight: (req.value_weight != 1.0).then_some(req.value_weight),
        },
    };
    Ok(Outcome {
        profile,
        items,
        stats,
        budget_bits: if fixed.is_none() { budget_bits } else { None },
        floor_bits,
        context: acc.context,
        protected: acc.protected,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Up to 6 items of up to 4 choices; costs are sometimes whole numbers so that ties
    /// (equal costs, duplicate choices) occur; the capacity ranges from below the cheapest
    /// selection to above the dearest.
    fn instance() -> impl Strategy<Value = Mckp> {
        let choice =
            (prop::bool::ANY, 0.5f64..20.0, 0.0f64..10.0).prop_map(|(round, c, v)| Choice {
                cost: if round { c.round() } else { c },
                value: if round { v.round() } else { v },
            });
        (
            prop::collection::vec(prop::collection::vec(choice, 1..=4), 1..=6),
            -0.1f64..1.1,
        )
            .prop_map(|(items, f)| {
                let lo: f64 = items
                    .iter()
                    .map(|i| i.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min))
                    .sum();
                let hi: f64 = items
                    .iter()
                    .map(|i| i.iter().map(|c| c.cost).fold(0.0, f64::max))
                    .sum();
                Mckp {
                    items,
                    capacity: lo + f * (hi - lo).max(1.0),
                }
            })
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-12
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn ilp_and_dp_reach_the_exhaustive_optimum(p in instance()) {
            let truth = p.brute_force();
            let runs = [
                ("ilp", ilp::solve_ilp(&p, true)),
                ("ilp-full", ilp::solve_ilp(&p, false)),
                ("dp", dp::solve_dp(&p, true)),
                ("dp-unpruned", dp::solve_dp(&p, false)),
            ];
            for (name, run) in runs {
                match (&truth, run) {
                    (None, Err(AllocateError::NothingFits)) => {}
                    (Some(t), Ok((s, _))) => {
                        prop_assert!(p.fits(&s), "{name}: cost {} over {}", s.cost, p.capacity);
                        prop_assert!(
                            close(s.objective, t.objective),
                            "{name}: objective {} but the optimum is {}", s.objective, t.objective
                        );
                    }
                    (t, r) => prop_assert!(false, "{name}: {r:?} vs exhaustive {t:?}"),
                }
            }
            if let (Some(t), Some(r)) = (&truth, lagrange::relax(&p)) {
                prop_assert!(r.bound <= t.objective + 1e-9 * t.objective.abs() + 1e-12);
                prop_assert!(p.fits(&r.incumbent));
            }
        }
    }

    /// Instances of 40-80 items, large enough for reduced-cost fixing to leave more items
    /// open than a small core, checked against the unpruned DP.
    fn larger_instance() -> impl Strategy<Value = Mckp> {
        let item = (
            1.0f64..200.0,
            prop::collection::vec((0.5f64..3.0, 0.0f64..1.0), 2..=4),
        )
            .prop_map(|(tokens, opts)| {
                // Costlier choices get lower values, as bit widths do.
                let mut v = 1.0;
                let mut c = 0.0;
                opts.into_iter()
                    .map(|(dc, f)| {
                        c += dc * tokens;
                        v *= 0.05 + 0.5 * f;
                        Choice {
                            cost: c,
                            value: v * tokens,
                        }
                    })
                    .collect::<Vec<_>>()
            });
        (prop::collection::vec(item, 40..=80), 0.05f64..0.95).prop_map(|(items, f)| {
            let lo: f64 = items.iter().map(|i| i[0].cost).sum();
            let hi: f64 = items.iter().map(|i| i[i.len() - 1].cost).sum();
            Mckp {
                items,
                capacity: lo + f * (hi - lo),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn ilp_with_a_core_step_matches_the_dp_on_larger_instances(p in larger_instance()) {
            let (dp, _) = dp::solve_dp(&p, false).unwrap();
            for core in [4, 16, ilp::CORE_ITEMS] {
                let (s, _) = ilp::solve_ilp_with_core(&p, true, core).unwrap();
                prop_assert!(p.fits(&s));
                prop_assert!(close(s.objective, dp.objective), "core {core}: {} vs dp {}", s.objective, dp.objective);
            }
            let (pruned, _) = dp::solve_dp(&p, true).unwrap();
            prop_assert!(close(pruned.objective, dp.objective));
        }
    }

    #[test]
    fn core_step_runs_on_a_large_instance_and_stays_exact() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let items: Vec<Vec<Choice>> = (0..400)
            .map(|_| {
                let tokens = 1.0 + 100.0 * rnd();
                let d2 = rnd();
                [(2.5, d2), (4.5, d2 * 0.1 * rnd()), (16.0, 0.0)]
                    .map(|(b, d)| Choice {
                        cost: b * tokens,
                        value: d * tokens,
                    })
                    .to_vec()
            })
            .collect();
        let lo: f64 = items.iter().map(|i| i[0].cost).sum();
        let p = Mckp {
            items,
            capacity: lo * 1.3,
        };
        let (s, stats) = ilp::solve_ilp_with_core(&p, true, 16).unwrap();
        assert_eq!(stats.core_items, 16, "the core step must run: {stats:?}");
        let (d, _) = dp::solve_dp(&p, true).unwrap();
        assert!(
            p.fits(&s) && close(s.objective, d.objective),
            "{} vs {}",
            s.objective,
            d.objective
        );
    }

    #[test]
    fn equal_costs_and_values_tie_without_error() {
        let c = |cost, value| Choice { cost, value };
        let p = Mckp {
            items: vec![
                vec![c(1.0, 1.0), c(1.0, 1.0)],
                vec![c(2.0, 0.0), c(1.0, 0.0)],
            ],
            capacity: 2.0,
        };
        for s in [
            ilp::solve_ilp(&p, true).unwrap().0,
            ilp::solve_ilp(&p, false).unwrap().0,
            dp::solve_dp(&p, true).unwrap().0,
        ] {
            assert_eq!((s.objective, s.cost), (1.0, 2.0));
        }
    }
}
