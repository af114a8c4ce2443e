//! The CPU backend: the f32 reference forward pass over one cache per sequence — the f32
//! [`FullCache`], or a [`QuantCache`] at all-16-bit or at a profile's mixed precision.

use super::backend::{Backend, BackendError, KvUsage, Work};
use super::cpu_batch::{forward_batch, BatchItem};
use crate::kvcache::quantized::KEEP;
use crate::kvcache::QuantCacheConfig;
use crate::kvcache::{FullCache, KvCache, KvPolicy, KvShape, PrecisionClass, QuantCache};
use crate::model::llama::{Logits, Model};
use crate::quant::KeyMode;
use crate::tags::TokenTag;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// How the CPU backend stores keys and values.
#[derive(Debug, Clone)]
pub enum CpuKv {
    /// The f32 reference cache: exactly what `triaxkv generate` uses.
    F32,
    /// Every token at 16 bits (IEEE f16).
    F16,
    /// A profile's per-(layer, tag) precision classes.
    Mixed {
        policy: KvPolicy,
        config: QuantCacheConfig,
    },
}

impl CpuKv {
    pub fn name(&self) -> &'static str {
        match self {
            CpuKv::F32 => "f32",
            CpuKv::F16 => "f16",
            CpuKv::Mixed { .. } => "profile",
        }
    }
}

pub enum CpuSeq {
    Full(FullCache),
    Quant(QuantCache),
}

impl CpuSeq {
    fn kv(&mut self) -> &mut dyn KvCache {
        match self {
            CpuSeq::Full(c) => c,
            CpuSeq::Quant(c) => c,
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in the forward pass".into())
}

pub struct CpuBackend {
    model: Arc<Model>,
    kv: CpuKv,
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, kv: CpuKv) -> Self {
        CpuBackend { model, kv }
    }

    fn shape(&self) -> KvShape {
        self.model.kv_shape()
    }
}

impl Backend for CpuBackend {
    type Seq = CpuSeq;

    fn describe(&self) -> String {
        format!("cpu, kv {}", self.kv.name())
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn new_seq(&self) -> Result<CpuSeq, BackendError> {
        let shape = self.shape();
        let quant = |policy: KvPolicy, config: QuantCacheConfig| {
            QuantCache::new(shape, policy, config)
                .map(CpuSeq::Quant)
                .map_err(|e| BackendError::Cache(e.to_string()))
        };
        match &self.kv {
            CpuKv::F32 => Ok(CpuSeq::Full(FullCache::new(shape))),
            // Nothing is quantized: groups only need to fit the head (tiny test models).
            CpuKv::F16 => quant(
                KvPolicy::uniform(shape.num_layers, PrecisionClass::FULL),
                QuantCacheConfig {
                    key_group: QuantCacheConfig::default().key_group.min(shape.head_dim),
                    value_group: QuantCacheConfig::default().value_group.min(shape.head_dim),
                    ..QuantCacheConfig::default()
                },
            ),
            CpuKv::Mixed { policy, config } => quant(policy.clone(), *config),
        }
    }

    fn len(&self, seq: &CpuSeq) -> usize {
        match seq {
            CpuSeq::Full(c) => c.len(0),
            CpuSeq::Quant(c) => c.len(0),
        }
    }

    fn truncate(&self, seq: &mut CpuSeq, len: usize) {
        seq.kv().truncate(len);
    }

    fn usage(&self, seq: &CpuSeq) -> KvUsage {
        match seq {
            CpuSeq::Full(c) => {
                let s = self.shape();
                let elements = 2 * s.num_layers * s.num_kv_heads * s.head_dim * c.len(0);
                KvUsage {
                    full: 4 * elements,
                    elements,
                    ..KvUsage::default()
                }
            }
            CpuSeq::Quant(c) => {
                let b = c.bytes();
                KvUsage {
                    packed: b.packed,
                    params: b.params,
                    half: b.half,
                    full: 0,
                    elements: b.elements,
                    // Grown token by token: no block space sits empty.
                    unfilled: 0,
                }
            }
        }
    }

    fn class_tokens(&self, seq: &CpuSeq) -> Vec<(String, usize)> {
        match seq {
            CpuSeq::Full(c) => vec![("f32".into(), c.len(0) * self.shape().num_layers)],
            CpuSeq::Quant(c) => {
                let mut by: HashMap<PrecisionClass, usize> = HashMap::new();
                for l in 0..self.shape().num_layers {
                    for (class, n) in c.class_counts(l) {
                        *by.entry(class).or_insert(0) += n;
                    }
                }
                let mut out: Vec<(String, usize)> = by
                    .into_iter()
                    .map(|(c, n)| (format!("k{}v{}", c.k, c.v), n))
                    .collect();
                out.sort();
                out
            }
        }
    }

    fn estimate_bytes(&self, tags: &[TokenTag]) -> usize {
        let s = self.shape();
        match &self.kv {
            CpuKv::F32 => 4 * 2 * s.num_layers * s.num_kv_heads * s.head_dim * tags.len(),
            CpuKv::F16 => 2 * 2 * s.num_layers * s.num_kv_heads * s.head_dim * tags.len(),
            CpuKv::Mixed { policy, config } => estimate_quant_bytes(s, policy, config, tags),
        }
    }

    fn forward(&self, w: Work<'_, CpuSeq>) -> Result<Vec<f32>, BackendError> {
        self.step(vec![w])
            .pop()
            .unwrap_or_else(|| Err(BackendError::Failed("empty step".into())))
    }

    /// Every sequence's rows in one batched forward pass (weights read once per step).
    fn step(&self, batch: Vec<Work<'_, CpuSeq>>) -> Vec<Result<Vec<f32>, BackendError>> {
        let mut results: Vec<Option<Result<Vec<f32>, BackendError>>> =
            (0..batch.len()).map(|_| None).collect();
        let mut items = Vec::with_capacity(batch.len());
        let mut ran = Vec::with_capacity(batch.len());
        for (i, w) in batch.into_iter().enumerate() {
            if let Err(e) = self.model.check_tokens(w.tokens) {
                results[i] = Some(Err(BackendError::TokenOutOfRange {
                    index: e.index,
                    id: e.id,
                    vocab: e.vocab,
                }));
                continue;
            }
            if w.tags.len() != w.tokens.len() {
                results[i] = Some(Err(BackendError::Failed(format!(
                    "{} tags for {} tokens",
                    w.tags.len(),
                    w.tokens.len()
                ))));
                continue;
            }
            if let Some(media) = w.media {
                // Image features and multimodal positions: this sequence runs on its own.
                let start = self.len(w.seq);
                let want = if w.logits { Logits::Last } else { Logits::None };
                let model = &self.model;
                let cache = w.seq.kv();
                let out = catch_unwind(AssertUnwindSafe(|| {
                    model.prefill_media(
                        w.tokens,
                        w.tags,
                        media,
                        start,
                        cache,
                        want,
                        usize::MAX,
                        &mut |_| {},
                    )
                }));
                results[i] = Some(out.map_err(|p| BackendError::Failed(panic_message(p))));
                continue;
            }
            items.push(BatchItem {
                cache: w.seq.kv(),
                tokens: w.tokens,
                tags: w.tags,
                logits: w.logits,
            });
            ran.push(i);
        }
        let model = &self.model;
        // The forward pass asserts its invariants; a broken one fails this step's sequences
        // (their caches are then dropped), not the server.
        match catch_unwind(AssertUnwindSafe(|| forward_batch(model, &mut items))) {
            Ok(outs) => {
                for (i, o) in ran.into_iter().zip(outs) {
                    results[i] = Some(Ok(o));
                }
            }
            Err(p) => {
                let msg = panic_message(p);
                for i in ran {
                    results[i] = Some(Err(BackendError::Failed(msg.clone())));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::Failed("not run".into()))))
            .collect()
    }
}

/// Bytes a [`QuantCache`] holds once it stores exactly `tags`, recency resolved at the last
/// tag's turn and step (the unit being generated): sinks and the residual window at 16
/// bits, every other token at its class, per-channel keys of a class's unfilled block
/// still at 16 bits. Mirrors `QuantCache::bytes`.
pub fn estimate_quant_bytes(
    s: KvShape,
    policy: &KvPolicy,
    cfg: &QuantCacheConfig,
    tags: &[TokenTag],
) -> usize {
    let row = s.num_kv_heads * s.head_dim;
    let n = tags.len();
    let half_token = 2 * 2 * row;
    let settled_end = n.saturating_sub(cfg.window);
    let quantizable = cfg.sinks.min(settled_end)..settled_end;
    let sixteen = n - quantizable.len();
    let Some(last) = tags.last() else { return 0 };
    let packed = |bits: u8| (row * bits as usize).div_ceil(8);
    let mut total = 0usize;
    for l in 0..s.num_layers {
        total += sixteen * half_token;
        let mut counts: HashMap<PrecisionClass, usize> = HashMap::new();
        for t in &tags[quantizable.clone()] {
            let class = policy.get(l, t.at(cfg.unit, last.turn, last.step));
            *counts.entry(class).or_insert(0) += 1;
        }
        for (class, c) in counts {
            total += match (class.k, cfg.key_mode) {
                (KEEP, _) => 2 * row * c,
                (k, KeyMode::PerChannel) => {
                    let sealed = c / cfg.block_tokens;
                    let staged = c - sealed * cfg.block_tokens;
                    sealed * (cfg.block_tokens * packed(k) + 4 * row) + staged * 2 * row
                }
                (k, KeyMode::PerToken { .. }) => c * (packed(k) + 4 * (row / cfg.key_group)),
            };
            total += match class.v {
                KEEP => 2 * row * c,
                v => c * (packed(v) + 4 * (row / cfg.value_group)),
            };
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Role, Tag};
    use rand::{Rng, SeedableRng};

    fn tag(role: Role, turn: u32) -> TokenTag {
        TokenTag::text(role, turn)
    }

    /// The estimate equals what a `QuantCache` holding the same tokens counts, for
    /// per-channel and per-token keys and a policy mixing 2, 4, 8 and 16 bits.
    #[test]
    fn quant_estimate_matches_the_cache() {
        let s = KvShape {
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 64,
        };
        let mut policy = KvPolicy::uniform(2, PrecisionClass::new(4, 2).unwrap());
        for t in Tag::all() {
            if t.role == Role::User {
                policy
                    .set(0, t, PrecisionClass::new(2, 8).unwrap())
                    .unwrap();
            }
            if t.role == Role::System {
                policy
                    .set(1, t, PrecisionClass::new(KEEP, 4).unwrap())
                    .unwrap();
            }
        }
        let mut tags = Vec::new();
        for i in 0..700 {
            let role = [Role::System, Role::User, Role::Assistant][i % 3];
            tags.push(tag(role, 1 + (i / 300) as u32));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for key_mode in [KeyMode::PerChannel, KeyMode::PerToken { rotate: false }] {
            let cfg = QuantCacheConfig {
                key_mode,
                key_group: 32,
                ..QuantCacheConfig::default()
            };
            let mut cache = QuantCache::new(s, policy.clone(), cfg).unwrap();
            let kv: Vec<f32> = (0..tags.len() * 64)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect();
            for l in 0..2 {
                cache.append(l, &kv, &kv, &tags);
            }
            assert_eq!(
                estimate_quant_bytes(s, &policy, &cfg, &tags),
                cache.bytes().total(),
                "{key_mode:?}"
            );
        }
    }
}
