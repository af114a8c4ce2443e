//! From the sensitivity table to what the solvers see: one item per (layer, K|V, tag) with
//! its token share, weight and distortion per bit width, the cache settings the table was
//! measured with, and the memory accounting (what each bit width costs, what the 16-bit
//! sinks and window cost, how many elements the budget is spread over).

use super::AllocateError;
use crate::calibrate::table::{Provenance, SensitivityTable};
use crate::calibrate::QuantizerSettings;
use crate::kvcache::quantized::{QuantCacheConfig, KEEP};
use crate::profile::{CacheSettings, KeyModeName, Kv};
use crate::quant::{Bits, KeyMode, QuantSpec};
use crate::tags::{RecencyUnit, Tag};
use std::collections::{BTreeMap, BTreeSet};

/// One (layer, K|V, tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey {
    pub layer: usize,
    pub kv: Kv,
    pub tag: Tag,
}

/// What the table says about one item.
#[derive(Debug, Clone, PartialEq)]
pub struct TableItem {
    pub key: ItemKey,
    /// Mean quantizable tokens of the tag per decode query (the table's `tokens`).
    pub tokens: f64,
    /// Objective weight: the share of calibration trajectories whose decode queries saw
    /// the tag (`trajectories / max trajectories`). The table's distortion is averaged over
    /// the queries that saw the tag, so weighting by how often it is seen makes
    /// `sum_t w_t D_t` an estimate of the summed attention-output error of a typical query.
    pub weight: f64,
    /// Distortion per measured bit width (2, 4, 8).
    pub distortion: BTreeMap<u8, f64>,
}

/// The table, grouped into items, with the cache settings it was measured under.
#[derive(Debug, Clone)]
pub struct Sensitivity {
    pub items: Vec<TableItem>,
    /// Highest layer in the table + 1.
    pub layers: usize,
    /// Quantizer, sinks, window and recency unit of the calibration.
    pub cache: CacheSettings,
    /// Bit widths the table has rows for.
    pub measured: BTreeSet<u8>,
    pub provenance: Provenance,
}

/// Cache settings from a table's provenance columns.
pub fn cache_settings(p: &Provenance) -> Result<CacheSettings, AllocateError> {
    let q: QuantizerSettings = p.quantizer.parse()?;
    let unit = match p.recency_unit.as_str() {
        "turn" => RecencyUnit::Turn,
        "step" => RecencyUnit::Step,
        other => {
            return Err(AllocateError::Provenance(format!(
                "recency_unit {other:?} is not \"turn\" or \"step\""
            )))
        }
    };
    // Per-channel key groups are the cache's blocks (QuantCache quantizes a block's keys
    // together); per-token keys leave the block size to the cache default.
    let block_tokens = match q.key_mode {
        KeyMode::PerChannel => q.key_group,
        KeyMode::PerToken { .. } => QuantCacheConfig::default().block_tokens,
    };
    Ok(CacheSettings {
        key_mode: KeyModeName::from(q.key_mode),
        key_group: q.key_group,
        value_group: q.value_group,
        block_tokens,
        sinks: p.sinks,
        window: p.window,
        recency_unit: unit,
        hold_fp8: false,
        key_outliers: q.key_outliers(),
        key_outliers_pooled: q.key_outliers_pooled,
    })
}

/// Stored bits per element of K or V at `bits`, the fp16 scale and zero of each group
/// included (`QuantSpec::effective_bits`); 16 means kept in f16, with no scale.
pub fn effective_bits(cache: &CacheSettings, kv: Kv, bits: u8) -> Result<f64, AllocateError> {
    if bits == KEEP {
        return Ok(16.0);
    }
    let b = Bits::from_u32(bits as u32).map_err(|_| AllocateError::BadBits(bits))?;
    let group = match (kv, cache.key_mode) {
        (Kv::K, KeyModeName::PerChannel) => cache.block_tokens,
        (Kv::K, _) => cache.key_group,
        (Kv::V, _) => cache.value_group,
    };
    // A kept key outlier costs an fp16 value and a 16-bit index.
    let outliers = match (kv, cache.key_mode) {
        (Kv::K, KeyModeName::PerChannel) => 32.0 * cache.key_outliers,
        _ => 0.0,
    };
    Ok(QuantSpec { bits: b, group }.effective_bits() + outliers)
}

impl Sensitivity {
    pub fn from_table(t: &SensitivityTable) -> Result<Self, AllocateError> {
        if t.rows.is_empty() {
            return Err(AllocateError::EmptyTable);
        }
        let cache = cache_settings(&t.provenance)?;
        let max_traj = t
            .rows
            .iter()
            .map(|r| r.trajectories)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut items: BTreeMap<ItemKey, TableItem> = BTreeMap::new();
        let mut measured = BTreeSet::new();
        for r in &t.rows {
            let kv = match r.kv {
                "k" => Kv::K,
                _ => Kv::V,
            };
            let key = ItemKey {
                layer: r.layer,
                kv,
                tag: r.tag,
            };
            measured.insert(r.bits);
            let item = items.entry(key).or_insert_with(|| TableItem {
                key,
                tokens: r.tokens,
                weight: r.trajectories as f64 / max_traj as f64,
                distortion: BTreeMap::new(),
            });
            item.distortion.insert(r.bits, r.distortion);
        }
        let layers = items.keys().map(|k| k.layer).max().unwrap_or(0) + 1;
        Ok(Sensitivity {
            items: items.into_values().collect(),
            layers,
            cache,
            measured,
            provenance: t.provenance.clone(),
        })
    }
}

/// Memory per decode query under one cache geometry, in "token rows" (one token's K or V
/// of one layer: kv_heads × head_dim elements, a factor common to everything here).
#[derive(Debug, Clone, PartialEq)]
pub struct Accounting {
    /// Per item (same order as `Sensitivity::items`): its quantized tokens per query.
    pub tokens: Vec<f64>,
    /// Token rows of every (layer, K|V) per query: what the budget is averaged over.
    pub total: f64,
    /// Bits of the sinks and window tokens per query (16 each, or 8 held in FP8).
    pub fixed: f64,
    /// Tokens per query (mean over (layer, K|V)) and how many of them are 16-bit.
    pub context: f64,
    pub protected: f64,
}

impl Accounting {
    /// Average bits per element when the items cost `cost` in all.
    pub fn bits(&self, cost: f64) -> f64 {
        (self.fixed + cost) / self.total
    }
}

/// Accounting for a cache keeping `sinks + window` tokens at `protected_bits` (16, or 8 held
/// in FP8). A query's context is `context`, or the calibration mix's mean (the table's
/// quantizable tokens plus its own sinks and window); the quantized rest is split between
/// tags in the table's proportions.
pub fn accounting(
    s: &Sensitivity,
    sinks: usize,
    window: usize,
    context: Option<usize>,
    protected_bits: f64,
) -> Accounting {
    let mut by_group: BTreeMap<(usize, Kv), f64> = BTreeMap::new();
    for it in &s.items {
        *by_group.entry((it.key.layer, it.key.kv)).or_insert(0.0) += it.tokens;
    }
    let calib_protected = (s.cache.sinks + s.cache.window) as f64;
    let mut share: BTreeMap<(usize, Kv), (f64, f64)> = BTreeMap::new();
    let (mut total, mut fixed, mut ctx_sum, mut prot_sum) = (0.0, 0.0, 0.0, 0.0);
    for (&g, &n) in &by_group {
        let t = context.map(|c| c as f64).unwrap_or(n + calib_protected);
        let p = ((sinks + window) as f64).min(t);
        total += t;
        fixed += protected_bits * p;
        ctx_sum += t;
        prot_sum += p;
        share.insert(g, (n, t - p));
    }
    let tokens = s
        .items
        .iter()
        .map(|it| {
            let (n, q) = share[&(it.key.layer, it.key.kv)];
            if n > 0.0 {
                it.tokens / n * q
            } else {
                0.0
            }
        })
        .collect();
    let groups = by_group.len().max(1) as f64;
    Accounting {
        tokens,
        total,
        fixed,
        context: ctx_sum / groups,
        protected: prot_sum / groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::table::Row;
    use crate::tags::{Modality, Recency, Role};

    fn table() -> SensitivityTable {
        let tag = |role| Tag {
            recency: Recency::Current,
            modality: Modality::Text,
            role,
        };
        let mut rows = Vec::new();
        for (role, tokens, traj) in [(Role::User, 30.0, 4), (Role::System, 10.0, 2)] {
            for kv in ["k", "v"] {
                for (bits, d) in [(2u8, 0.1), (4, 0.01)] {
                    rows.push(Row {
                        layer: 0,
                        kv,
                        tag: tag(role),
                        bits,
                        tokens,
                        distortion: d,
                        distortion_ci: None,
                        trajectories: traj,
                    });
                }
            }
        }
        SensitivityTable {
            rows,
            provenance: Provenance {
                model: "m".into(),
                model_sha256: "s".into(),
                traces_hash: "t".into(),
                quantizer: "k=per_channel/g64 v=per_token/g32 scale+zero=fp16".into(),
                recency_unit: "step".into(),
                sinks: 4,
                window: 6,
            },
        }
    }

    #[test]
    fn items_weights_and_settings_come_from_the_table() {
        let s = Sensitivity::from_table(&table()).unwrap();
        assert_eq!(s.items.len(), 4);
        assert_eq!(s.layers, 1);
        assert_eq!(s.cache.block_tokens, 64);
        assert_eq!(s.cache.value_group, 32);
        assert_eq!(s.cache.recency_unit, RecencyUnit::Step);
        let sys = s
            .items
            .iter()
            .find(|i| i.key.tag.role == Role::System)
            .unwrap();
        assert_eq!(sys.weight, 0.5);
        assert_eq!(sys.distortion[&4], 0.01);
        assert_eq!(effective_bits(&s.cache, Kv::K, 2).unwrap(), 2.5);
        assert_eq!(effective_bits(&s.cache, Kv::V, 2).unwrap(), 3.0);
        assert_eq!(effective_bits(&s.cache, Kv::V, 16).unwrap(), 16.0);
        assert!(effective_bits(&s.cache, Kv::V, 3).is_err());
    }

    #[test]
    fn accounting_counts_protected_tokens_at_16_bits() {
        let s = Sensitivity::from_table(&table()).unwrap();
        // The mix: 40 quantizable + 10 protected tokens per query, for K and for V.
        let a = accounting(&s, 4, 6, None, 16.0);
        assert_eq!(a.total, 100.0);
        assert_eq!(a.fixed, 16.0 * 20.0);
        assert_eq!(a.tokens.iter().sum::<f64>(), 80.0);
        // No sinks or window: the 10 protected tokens are quantized too, in proportion.
        let a = accounting(&s, 0, 0, None, 16.0);
        assert_eq!(a.fixed, 0.0);
        assert!((a.tokens.iter().sum::<f64>() - 100.0).abs() < 1e-12);
        // A stated context of 1000 tokens: 990 quantized, split 3:1 between user and system.
        let a = accounting(&s, 4, 6, Some(1000), 16.0);
        assert_eq!(a.total, 2000.0);
        let user = s
            .items
            .iter()
            .position(|i| i.key.tag.role == Role::User)
            .unwrap();
        assert!((a.tokens[user] - 990.0 * 0.75).abs() < 1e-9);
        // A context shorter than sinks + window is all 16-bit.
        let a = accounting(&s, 4, 6, Some(8), 16.0);
        assert_eq!((a.fixed, a.tokens.iter().sum::<f64>()), (16.0 * 16.0, 0.0));
        // Held in FP8 they cost half, and the quantized tokens are the same.
        let (a, b) = (
            accounting(&s, 4, 6, None, 16.0),
            accounting(&s, 4, 6, None, 8.0),
        );
        assert_eq!((b.fixed, &b.tokens), (a.fixed / 2.0, &a.tokens));
    }
}
