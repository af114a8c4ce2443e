//! `triaxkv serve --gpu`: the engine's [`Backend`] over the GPU block pool. The model's
//! weights live on the device (bf16); every sequence owns blocks of one stacked pool
//! ([`SeqBlocks`]): new tokens go to its 16-bit stream, tokens leaving the window are
//! quantized into their tag's class, and when a new turn or agent step starts, tokens whose
//! recency class dropped are re-quantized (ageing) — the same bookkeeping `bench serve`
//! measures. One engine step runs every prompt chunk in one prefill pass and every decoding
//! sequence in one decode step; the logits of the rows the engine samples come back to the
//! host.
//!
//! The device sits behind [`Executor`]: [`GpuDevice`] on the GPU, or `HostCheck`, which
//! checks every request against the pool with no GPU (the CPU tests drive the whole server
//! through it).

use super::decode_attention::PagedLayout;
use super::decode_step::{DecodeStep, DeviceWeights, HostWeights, ModelShape};
use super::prefill_attention::PrefillCall;
use super::serve_bench::{
    estimate_slots, pool_layout_for, pool_tokens, Executor, GpuExec, HostCheck, StepRows,
    PREFILL_ROWS,
};
use super::{GpuContext, GpuError};
use crate::model::llama::Model;
use crate::paged::pool::{ClassMap, ClassTokens, Fp8Hold, Ops, SeqBlocks, SlotPool, F16_TOKENS};
use crate::quant::KvClass;
use crate::runtime::{Backend, BackendError, KvUsage, PoolOccupancy, Work};
use crate::tags::TokenTag;
use std::sync::{Arc, Mutex, MutexGuard};

/// Token moves one launch takes (more are split).
const MOVES_PER_LAUNCH: usize = 1024;

/// The GPU, owning the uploaded weights, one step's kernels and buffers and the stacked pool.
pub type GpuDevice = GpuExec<GpuContext, DecodeStep, DeviceWeights>;

/// What the pool holds per slot and how many slots there are.
/// What a pool is asked for: which class each token is stored at, its bytes (all layers),
/// and the value group and key group (tokens per per-channel key scale) of its INT4 and INT2
/// blocks.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub map: ClassMap,
    pub kv_memory: usize,
    pub v_group: usize,
    pub k_group: usize,
    /// What the pool holds in FP8 blocks.
    pub fp8: Fp8Hold,
}

impl PoolSpec {
    /// `map` in `kv_memory` bytes with 64-element value groups (the head's 128 lanes in two
    /// groups; a 64-wide head, zero-padded to 128, keeps its real lanes in one group).
    pub fn new(map: ClassMap, kv_memory: usize) -> Self {
        PoolSpec {
            map,
            kv_memory,
            v_group: 64,
            k_group: 64,
            fp8: Fp8Hold::default(),
        }
    }

    /// A profile's classes, stored with the value and key groups it was allocated for (a
    /// key group the kernels do not take is refused when the pool is made).
    pub fn of_profile(p: &crate::profile::Profile, kv_memory: usize) -> Self {
        PoolSpec {
            map: ClassMap::from_profile(p),
            kv_memory,
            v_group: p.cache.value_group,
            k_group: p.cache.block_tokens,
            fp8: Fp8Hold::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolShape {
    pub layout: PagedLayout,
    pub slot_bytes: usize,
    pub tokens: ClassTokens,
    /// Bytes a full block of each class needs (all layers), in `KvClass::ALL` order: a slot
    /// is as large as the largest.
    pub class_bytes: [usize; 4],
}

/// The engine's backend over a block pool on `E`.
pub struct GpuBackend<E> {
    device: Arc<Mutex<E>>,
    pool: Arc<Mutex<SlotPool>>,
    map: ClassMap,
    shape: PoolShape,
    /// The model's real K/V elements per token (all layers, K and V).
    elements_per_token: usize,
    layers: usize,
    vocab: usize,
    /// Rows of one device step at most (prompt chunks and decode tokens alike).
    max_rows: usize,
    describe: String,
}

/// A sequence's blocks; dropping it frees them.
pub struct GpuSeq {
    blocks: SeqBlocks,
    pool: Arc<Mutex<SlotPool>>,
}

/// A poisoned lock means a panic elsewhere mid-update; the pool's lists stay usable (every
/// slot is in exactly one of them), so carry on rather than cascade the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for GpuSeq {
    fn drop(&mut self) {
        let mut pool = lock(&self.pool);
        self.blocks.release(&mut pool);
        // Steps are synchronous and every device write is queued in stream order: a slot
        // handed out later is written after anything queued for this sequence.
        pool.commit();
    }
}

/// A new prefill or decode row group's bookkeeping for one work item.
struct Fed {
    work: usize,
    pos0: usize,
    f16_base: usize,
    targets: Vec<(u32, u32)>,
    /// Its one target is a token of an FP8 waiting block (`SeqBlocks::append_decode`).
    fp8: bool,
    logits: bool,
}

/// The (turn, step) a work item's tokens are generated toward: its newest token's.
fn now_of(tags: &[TokenTag]) -> (u32, u32) {
    tags.last().map_or((0, 0), |t| (t.turn, t.step))
}

fn class_label(c: KvClass) -> &'static str {
    match c {
        KvClass::F16 => "k16v16",
        KvClass::Int4 => "k4v4",
        KvClass::Int2 => "k2v2",
        KvClass::Fp8 => "fp8",
    }
}

impl GpuBackend<GpuDevice> {
    /// Upload `model` (weights rounded to bf16) and a pool as `spec` asks; steps of at most
    /// `max_rows` rows.
    pub fn open(
        gpu: GpuContext,
        name: &str,
        model: &Model,
        spec: PoolSpec,
        max_rows: usize,
        describe: &str,
    ) -> Result<Self, GpuError> {
        let shape = ModelShape::of_config(name, &model.config);
        shape.validate()?;
        let host = HostWeights::of_model(model)?;
        let w = DeviceWeights::upload(&gpu, &shape, &host)?;
        drop(host);
        let max_rows = max_rows.clamp(1, PREFILL_ROWS);
        let step = DecodeStep::new(&gpu, &shape, max_rows, spec.v_group)?;
        let pool = Self::pool_shape(&shape, &spec)?;
        let device = GpuExec::new(gpu, step, w, &pool.layout, MOVES_PER_LAUNCH, false)?;
        Ok(GpuBackend::new(
            device, &shape, pool, spec.map, max_rows, describe,
        ))
    }
}

impl GpuBackend<HostCheck> {
    /// The same backend over `HostCheck` (no GPU): every device request is checked.
    pub fn checked(shape: &ModelShape, spec: PoolSpec, max_rows: usize) -> Result<Self, GpuError> {
        let pool = Self::pool_shape(shape, &spec)?;
        Ok(GpuBackend::new(
            HostCheck::default(),
            shape,
            pool,
            spec.map,
            max_rows.clamp(1, PREFILL_ROWS),
            "host check",
        ))
    }
}

impl<E: Executor> GpuBackend<E> {
    fn pool_shape(shape: &ModelShape, spec: &PoolSpec) -> Result<PoolShape, GpuError> {
        let (layout, slot_bytes) =
            pool_layout_for(shape, spec.v_group, spec.k_group, spec.kv_memory, &spec.map)?;
        let class_bytes =
            KvClass::ALL.map(|c| layout.kv_heads * layout.geom(c).slab_bytes() * shape.layers);
        Ok(PoolShape {
            tokens: pool_tokens(&layout, &spec.map, spec.fp8),
            layout,
            slot_bytes,
            class_bytes,
        })
    }

    fn new(
        device: E,
        shape: &ModelShape,
        pool: PoolShape,
        map: ClassMap,
        max_rows: usize,
        describe: &str,
    ) -> Self {
        let slots = pool.layout.slots;
        GpuBackend {
            describe: format!(
                "gpu, kv {describe}, {slots} slots of {} KiB",
                pool.slot_bytes >> 10
            ),
            device: Arc::new(Mutex::new(device)),
            pool: Arc::new(Mutex::new(SlotPool::new(slots))),
            map,
            elements_per_token: shape.layers * shape.kv_heads * shape.head_dim * 2,
            layers: shape.layers,
            vocab: shape.vocab,
            max_rows,
            shape: pool,
        }
    }

    /// Bytes the engine may admit: the pool less a headroom for one step's growth (a new
    /// 16-bit block per decoding sequence and per prompt chunk, blocks being quantized) —
    /// what is left over preempts through `BackendError::OutOfBlocks`.
    pub fn admission_bytes(&self, step_tokens: usize, max_seqs: usize) -> Result<usize, String> {
        let headroom = step_tokens.div_ceil(F16_TOKENS) + 3 * max_seqs + 8;
        let slots = self.shape.layout.slots;
        if headroom * 2 > slots {
            return Err(format!(
                "a pool of {slots} slots of {} KiB is too small for steps of {step_tokens} \
                 tokens and {max_seqs} sequences (headroom {headroom} slots): raise \
                 --kv-memory",
                self.shape.slot_bytes >> 10
            ));
        }
        Ok((slots - headroom) * self.shape.slot_bytes)
    }

    /// Slots free and in all (tests, metrics).
    pub fn pool_slots(&self) -> (usize, usize) {
        let p = lock(&self.pool);
        (p.free(), p.total())
    }

    /// A clone of the pool's handle, to watch it after the backend moved into an engine.
    pub fn pool_handle(&self) -> Arc<Mutex<SlotPool>> {
        self.pool.clone()
    }

    /// A clone of the device's handle (a `HostCheck`'s counts, after the backend moved into
    /// an engine).
    pub fn device_handle(&self) -> Arc<Mutex<E>> {
        self.device.clone()
    }

    /// Age `w`'s blocks to its tokens' (turn, step) and append the tokens to its stream.
    fn feed(
        &self,
        pool: &mut SlotPool,
        ops: &mut Ops,
        index: usize,
        w: &mut Work<'_, GpuSeq>,
    ) -> Result<Fed, BackendError> {
        if w.media.is_some() {
            return Err(BackendError::Failed(
                "the GPU backend does not take images yet (serve vision models on the CPU)".into(),
            ));
        }
        if w.tokens.is_empty() || w.tokens.len() != w.tags.len() {
            return Err(BackendError::Failed(format!(
                "{} tokens with {} tags",
                w.tokens.len(),
                w.tags.len()
            )));
        }
        if w.tokens.len() > self.max_rows {
            return Err(BackendError::Failed(format!(
                "a chunk of {} tokens: at most {} per step",
                w.tokens.len(),
                self.max_rows
            )));
        }
        if let Some((index, &id)) = w
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.vocab)
        {
            return Err(BackendError::TokenOutOfRange {
                index,
                id,
                vocab: self.vocab,
            });
        }
        let blocks = &mut w.seq.blocks;
        let now = now_of(w.tags);
        if blocks
            .age(pool, &self.map, &self.shape.tokens, now, ops)
            .is_err()
        {
            blocks.release(pool);
            return Err(BackendError::OutOfBlocks);
        }
        let f16_base = blocks.f16_tokens();
        let pos0 = blocks.len();
        // A generated token (one, with logits) may go straight into an FP8 waiting block.
        let (targets, fp8) = match w.tags {
            [tag] if w.logits => {
                let (slot, tok, c) = blocks
                    .append_decode(pool, &self.map, &self.shape.tokens, *tag, ops)
                    .map_err(|_| BackendError::OutOfBlocks)?;
                (vec![(slot, tok)], c == KvClass::Fp8)
            }
            _ => (
                blocks
                    .append(pool, w.tags, ops)
                    .map_err(|_| BackendError::OutOfBlocks)?,
                false,
            ),
        };
        Ok(Fed {
            work: index,
            pos0,
            f16_base,
            targets,
            fp8,
            logits: w.logits,
        })
    }

    fn tables(&self, seqs: &[&SeqBlocks]) -> PagedLayout {
        let mut l = self.shape.layout.clone();
        l.seqs = seqs.len();
        for (i, b) in seqs.iter().enumerate() {
            for (class, slot, n) in b.table() {
                l.push(class, i, slot as usize, n);
            }
        }
        l.slots = self.shape.layout.slots;
        l
    }

    /// Run `decode` (one token each) and `chunks` (prompt chunks) in one device step — decode
    /// rows first, then the chunks' rows, one pass over the weights for both; the logits of
    /// the rows that want them, by work index.
    fn run_group(
        &self,
        dev: &mut E,
        batch: &[Work<'_, GpuSeq>],
        decode: &[Fed],
        chunks: &[Fed],
    ) -> Result<Vec<(usize, Vec<f32>)>, GpuError> {
        let seqs: Vec<&SeqBlocks> = decode
            .iter()
            .chain(chunks)
            .map(|f| &batch[f.work].seq.blocks)
            .collect();
        let l = self.tables(&seqs);
        let mut rows = StepRows::default();
        let mut calls = Vec::new();
        let mut want = Vec::new();
        for (i, f) in decode.iter().chain(chunks).enumerate() {
            let w = &batch[f.work];
            let n = f.targets.len();
            if i >= decode.len() {
                calls.push(PrefillCall {
                    seq: i,
                    f16_base: f.f16_base,
                    row0: rows.ids.len(),
                    rows: n,
                    sm_scale: 0.0,
                });
            }
            if f.logits {
                want.push((f.work, rows.ids.len() + n - 1));
            }
            rows.ids.extend(w.tokens.iter().map(|&t| t as i32));
            rows.pos.extend((f.pos0..f.pos0 + n).map(|p| p as i32));
            rows.slots.extend(f.targets.iter().map(|t| t.0 as i32));
            rows.toks.extend(f.targets.iter().map(|t| t.1 as i32));
            rows.fp8.extend(f.targets.iter().map(|_| i32::from(f.fp8)));
        }
        match (decode.len(), calls.is_empty()) {
            (0, _) => dev.prefill(&l, &rows, calls)?,
            (_, true) => dev.decode(&l, &rows)?,
            (d, false) => dev.mixed(&l, &rows, calls, d)?,
        }
        let rows: Vec<usize> = want.iter().map(|w| w.1).collect();
        let logits = dev.logits(&rows, self.vocab)?;
        Ok(want.into_iter().map(|w| w.0).zip(logits).collect())
    }

    /// The device steps of `tokens` (one row each) and `chunks`: one step for both when
    /// their rows fit `max` (the engine's steps do: it runs at most `--step-tokens` rows),
    /// else groups of chunks, then groups of tokens.
    fn steps(tokens: Vec<Fed>, chunks: Vec<Fed>, max: usize) -> Vec<(Vec<Fed>, Vec<Fed>)> {
        let rows: usize = tokens.iter().chain(&chunks).map(|f| f.targets.len()).sum();
        if rows <= max {
            if tokens.is_empty() && chunks.is_empty() {
                return Vec::new();
            }
            return vec![(tokens, chunks)];
        }
        Self::groups(chunks, max)
            .into_iter()
            .map(|g| (Vec::new(), g))
            .chain(
                Self::groups(tokens, max)
                    .into_iter()
                    .map(|g| (g, Vec::new())),
            )
            .collect()
    }

    /// Groups of consecutive items whose rows fit `max` (an item alone always fits: chunks
    /// are checked in `feed`).
    fn groups(items: Vec<Fed>, max: usize) -> Vec<Vec<Fed>> {
        let mut out: Vec<Vec<Fed>> = Vec::new();
        let mut rows = 0;
        for f in items {
            let n = f.targets.len();
            match out.last_mut() {
                Some(g) if rows + n <= max => {
                    rows += n;
                    g.push(f);
                }
                _ => {
                    rows = n;
                    out.push(vec![f]);
                }
            }
        }
        out
    }
}

impl<E: Executor + Send + 'static> Backend for GpuBackend<E> {
    type Seq = GpuSeq;

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn new_seq(&self) -> Result<GpuSeq, BackendError> {
        Ok(GpuSeq {
            blocks: SeqBlocks::new(),
            pool: self.pool.clone(),
        })
    }

    fn len(&self, seq: &GpuSeq) -> usize {
        seq.blocks.len()
    }

    fn truncate(&self, seq: &mut GpuSeq, len: usize) {
        let mut dev = lock(&self.device);
        let mut pool = lock(&self.pool);
        let mut ops = Ops::default();
        seq.blocks.truncate(&mut pool, len, &mut ops);
        if !ops.is_empty() && dev.pool_ops(&self.shape.layout, &ops).is_err() {
            // The blocks' state is unknown: recompute rather than trust them.
            seq.blocks.release(&mut pool);
        }
        pool.commit();
    }

    fn usage(&self, seq: &GpuSeq) -> KvUsage {
        // Slots are as large as the largest class the pool uses: bytes held are slots held.
        let c = seq.blocks.counts();
        let b = self.shape.slot_bytes;
        let held = c.blocks.iter().sum::<usize>() * b;
        // What the tokens need at their class's full-block density.
        let filled: usize = (0..4)
            .map(|k| c.tokens[k] * self.shape.class_bytes[k] / self.shape.tokens.capacity[k])
            .sum();
        KvUsage {
            half: c.blocks[0] * b,
            packed: c.blocks[1..].iter().sum::<usize>() * b,
            params: 0,
            full: 0,
            elements: seq.blocks.len() * self.elements_per_token,
            unfilled: held.saturating_sub(filled),
        }
    }

    fn class_tokens(&self, seq: &GpuSeq) -> Vec<(String, usize)> {
        let c = seq.blocks.counts();
        KvClass::ALL
            .iter()
            .zip(c.tokens)
            .filter(|(_, n)| *n > 0)
            .map(|(&k, n)| (class_label(k).to_string(), n * self.layers))
            .collect()
    }

    fn pool(&self) -> Option<PoolOccupancy> {
        let (free, slots) = self.pool_slots();
        Some(PoolOccupancy {
            slots,
            free,
            slot_bytes: self.shape.slot_bytes,
        })
    }

    fn estimate_bytes(&self, tags: &[TokenTag]) -> usize {
        estimate_slots(&self.map, &self.shape.tokens, tags, now_of(tags)) * self.shape.slot_bytes
    }

    fn forward(&self, work: Work<'_, GpuSeq>) -> Result<Vec<f32>, BackendError> {
        self.step(vec![work])
            .pop()
            .unwrap_or_else(|| Err(BackendError::Failed("empty step".into())))
    }

    fn step(&self, mut batch: Vec<Work<'_, GpuSeq>>) -> Vec<Result<Vec<f32>, BackendError>> {
        let mut out: Vec<Result<Vec<f32>, BackendError>> =
            (0..batch.len()).map(|_| Ok(Vec::new())).collect();
        let mut dev = lock(&self.device);
        let mut pool = lock(&self.pool);
        let mut ops = Ops::default();
        let (mut chunks, mut tokens) = (Vec::new(), Vec::new());
        for (i, w) in batch.iter_mut().enumerate() {
            match self.feed(&mut pool, &mut ops, i, w) {
                Ok(f) if f.targets.len() > 1 => chunks.push(f),
                Ok(f) => tokens.push(f),
                Err(e) => out[i] = Err(e),
            }
        }
        let queued = dev
            .pool_ops(&self.shape.layout, &ops)
            .map_err(|e| e.to_string());
        pool.commit();
        let mut ran: Vec<usize> = Vec::new();
        for (decode, chunks) in Self::steps(tokens, chunks, self.max_rows) {
            let r = match &queued {
                Ok(()) => self
                    .run_group(&mut dev, &batch, &decode, &chunks)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            let group = decode.iter().chain(&chunks);
            match r {
                Ok(logits) => {
                    ran.extend(group.map(|f| f.work));
                    for (i, l) in logits {
                        out[i] = Ok(l);
                    }
                }
                Err(e) => {
                    for f in group {
                        out[f.work] = Err(BackendError::Failed(e.clone()));
                    }
                }
            }
        }
        // Settle what ran: full window blocks held, held key groups quantized; a sequence
        // about to generate flushes its stream when its tokens go to FP8 blocks (the last
        // token's tag stands for the next one's).
        let mut ops = Ops::default();
        for i in ran {
            let w = &mut batch[i];
            let blocks = &mut w.seq.blocks;
            let flush = w.logits
                && w.tags
                    .last()
                    .is_some_and(|t| blocks.decodes_into_fp8(&self.map, &self.shape.tokens, t));
            if blocks
                .settle(&mut pool, &self.map, &self.shape.tokens, flush, &mut ops)
                .is_err()
            {
                blocks.release(&mut pool);
                out[i] = Err(BackendError::OutOfBlocks);
            }
        }
        if let Err(e) = dev
            .pool_ops(&self.shape.layout, &ops)
            .and_then(|_| dev.sync())
        {
            // Blocks may hold anything now: no sequence of this step can go on.
            for (i, w) in batch.iter_mut().enumerate() {
                w.seq.blocks.release(&mut pool);
                out[i] = Err(BackendError::Failed(e.to_string()));
            }
        }
        pool.commit();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Recency, Role, Tag};
    use std::collections::HashMap;

    fn tag(role: Role, turn: u32) -> TokenTag {
        TokenTag::text(role, turn)
    }

    /// Observations INT4 while current, everything else INT2 past 4 sinks and a 32-token window.
    fn mixed() -> ClassMap {
        let mut classes = HashMap::new();
        for r in Recency::ALL {
            if r == Recency::Current {
                let t = Tag {
                    role: Role::Observation,
                    modality: Modality::Text,
                    recency: r,
                };
                classes.insert(t, KvClass::Int4);
            }
        }
        ClassMap {
            classes,
            default: KvClass::Int2,
            sinks: 4,
            window: 32,
            unit: crate::tags::RecencyUnit::Turn,
        }
    }

    /// A conversation: system prompt, then per turn a user message, a reply and a tool
    /// result; ids from `seed` so sequences differ.
    fn conversation(seed: u32, turns: u32) -> (Vec<u32>, Vec<TokenTag>, Vec<usize>) {
        let (mut ids, mut tags, mut reply_starts) = (Vec::new(), Vec::new(), Vec::new());
        let push = |ids: &mut Vec<u32>, tags: &mut Vec<TokenTag>, r: Role, n: u32, t: u32| {
            for k in 0..n {
                ids.push((seed * 131 + k * 17 + t * 7) % 1000);
                tags.push(tag(r, t));
            }
        };
        push(&mut ids, &mut tags, Role::System, 90 + seed * 5, 0);
        for t in 1..=turns {
            push(&mut ids, &mut tags, Role::User, 30 + seed, t);
            reply_starts.push(ids.len());
            push(&mut ids, &mut tags, Role::Assistant, 20, t);
            push(&mut ids, &mut tags, Role::Observation, 70 + 3 * seed, t);
        }
        (ids, tags, reply_starts)
    }

    struct Client {
        seq: Option<GpuSeq>,
        ids: Vec<u32>,
        tags: Vec<TokenTag>,
        /// Tokens the client has sent so far (prompts and replies up to its current turn).
        upto: usize,
        replies: Vec<usize>,
        turn: usize,
    }

    /// The backend driven as the engine drives it — prompt chunks and decode tokens of several
    /// sequences in one step, ageing at new turns, prefix reuse by truncation, preemption when
    /// the pool runs out — with every device request checked: logits come back for the right
    /// rows, every sequence's blocks stay consistent, and the pool is whole at the end.
    #[test]
    fn engine_like_steps_are_checked_and_the_pool_never_leaks() {
        engine_like(false, false, false, false);
    }

    /// The same with tokens waiting for a key group in FP8 blocks (`serve --wait-fp8`).
    #[test]
    fn engine_like_steps_with_fp8_waiting_never_leak() {
        engine_like(true, false, false, false);
    }

    /// And with the sinks in them too (`serve --wait-fp8 --sinks-fp8`).
    #[test]
    fn engine_like_steps_with_fp8_sinks_never_leak() {
        engine_like(true, true, false, false);
    }

    /// And with generated tokens written straight into the FP8 waiting blocks, no 16-bit
    /// window (`serve --wait-fp8 --sinks-fp8 --decode-fp8`): prefix reuse cuts them back out.
    #[test]
    fn engine_like_steps_with_fp8_decode_never_leak() {
        engine_like(true, true, true, false);
    }

    /// And with a 32-token window kept in the FP8 waiting blocks (`serve --wait-fp8
    /// --sinks-fp8 --decode-fp8 --window-fp8`, or a `--hold-fp8` profile).
    #[test]
    fn engine_like_steps_with_an_fp8_window_never_leak() {
        engine_like(true, true, true, true);
    }

    fn engine_like(wait_fp8: bool, sinks_fp8: bool, decode_fp8: bool, window_fp8: bool) {
        let mut shape = ModelShape::llama3_8b();
        shape.vocab = 1000;
        let slot = shape.layers * shape.kv_heads * 9728;
        // Small enough to preempt: sinks in FP8 blocks need fewer slots, no window fewer.
        let slots = match (sinks_fp8, decode_fp8) {
            (_, true) => 40,
            (true, false) => 50,
            (false, false) => 60,
        };
        // Free slots a new sequence waits for: a window-0 session needs far fewer.
        let admit_free = if decode_fp8 { 12 } else { 30 };
        let map = ClassMap {
            window: if decode_fp8 && !window_fp8 { 0 } else { 32 },
            ..mixed()
        };
        let spec = PoolSpec {
            fp8: Fp8Hold {
                wait: wait_fp8,
                sinks: sinks_fp8,
                decode: decode_fp8,
                window: window_fp8,
            },
            ..PoolSpec::new(map, slots * slot)
        };
        let backend = GpuBackend::checked(&shape, spec, 96).unwrap();
        let tokens = backend.shape.tokens;
        let mut clients: Vec<Client> = (0..6)
            .map(|i| {
                let (ids, tags, replies) = conversation(i, 4);
                Client {
                    seq: None,
                    upto: replies[0],
                    ids,
                    tags,
                    replies,
                    turn: 0,
                }
            })
            .collect();
        let (mut preempted, mut truncated, mut steps) = (0, 0, 0);
        let mut waited_fp8 = false;
        let mut sinks_in_fp8 = false;
        while clients.iter().any(|c| c.turn < c.replies.len()) {
            steps += 1;
            assert!(steps < 5000, "no progress");
            // Admission, roughly: one new sequence per step while a session's worth is free.
            if let Some(c) = clients
                .iter_mut()
                .find(|c| c.seq.is_none() && c.turn < c.replies.len())
            {
                if backend.pool_slots().0 >= admit_free {
                    c.seq = Some(backend.new_seq().unwrap());
                }
            }
            // The engine's step: a decode token for sequences one short of their target,
            // prompt chunks of at most 40 for the others.
            let mut plan = Vec::new();
            let batch: Vec<Work<'_, GpuSeq>> = clients
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| c.turn < c.replies.len())
                .filter_map(|(i, c)| {
                    let seq = c.seq.as_mut()?;
                    let fed = seq.blocks.len();
                    let end = (fed + 40).min(c.upto);
                    plan.push((i, fed, end));
                    Some(Work {
                        seq,
                        tokens: &c.ids[fed..end],
                        tags: &c.tags[fed..end],
                        logits: end == c.upto,
                        media: None,
                    })
                })
                .collect();
            let results = backend.step(batch);
            for (&(i, fed, end), r) in plan.iter().zip(results) {
                let c = &mut clients[i];
                match r {
                    Err(BackendError::OutOfBlocks) => {
                        preempted += 1;
                        c.seq = None; // dropped: its blocks go back to the pool
                        continue;
                    }
                    Err(e) => panic!("client {i}: {e}"),
                    Ok(l) => {
                        let seq = c.seq.as_ref().unwrap();
                        assert_eq!(
                            seq.blocks.len(),
                            end,
                            "client {i} after feeding {fed}..{end}"
                        );
                        seq.blocks.check(&tokens).unwrap();
                        let u = backend.usage(seq);
                        assert!(u.unfilled < u.total(), "{u:?}");
                        if end < c.upto {
                            assert!(l.is_empty());
                            continue;
                        }
                        let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
                        assert_eq!(
                            best as u32,
                            HostCheck::next_token(c.ids[end - 1], 1000),
                            "client {i}: logits of another row"
                        );
                    }
                }
                // Teacher-forced: the reply's tokens are the recorded ones.
                let reply_end = c.replies[c.turn] + 20;
                if c.upto < reply_end {
                    c.upto += 1;
                } else {
                    c.turn += 1;
                    if c.turn < c.replies.len() {
                        c.upto = c.replies[c.turn];
                        // The next request resends the history re-rendered: its last tokens
                        // differ, so the kept cache is cut a little (as prefix reuse does).
                        let seq = c.seq.as_mut().unwrap();
                        let keep = seq.blocks.len() - 3;
                        backend.truncate(seq, keep);
                        let kept = backend.len(seq);
                        assert!(kept == keep || kept == 0, "kept {kept} of {keep}");
                        seq.blocks.check(&tokens).unwrap();
                        let u = seq.blocks.f16_use();
                        waited_fp8 |= u.wait_blocks > 0;
                        sinks_in_fp8 |= u.wait_tokens[0] > 0;
                        truncated += 1;
                    } else {
                        c.seq = None; // finished
                    }
                }
            }
        }
        let (free, total) = backend.pool_slots();
        assert_eq!(free, total, "slots leaked");
        let dev = lock(&backend.device);
        assert!(dev.quantized > 20, "{} blocks quantized", dev.quantized);
        assert!(dev.moved > 0, "no token aged");
        // Prompt chunks with decode tokens in one step where their rows fit 96, alone where
        // not.
        assert!(
            dev.prefills > 0 && dev.decodes > 0 && dev.mixed > 0,
            "{} prefill, {} decode, {} fused steps",
            dev.prefills,
            dev.decodes,
            dev.mixed
        );
        eprintln!(
            "{} prefill, {} decode, {} fused steps",
            dev.prefills, dev.decodes, dev.mixed
        );
        assert!(truncated >= 18, "{truncated} truncations");
        // Generated tokens went to FP8 blocks, and prefix reuse cut some back out of them.
        assert_eq!(
            dev.fp8_appends > 0,
            decode_fp8,
            "{} FP8 appends",
            dev.fp8_appends
        );
        assert_eq!(
            dev.trimmed > 0,
            decode_fp8,
            "{} blocks trimmed",
            dev.trimmed
        );
        assert_eq!(waited_fp8, wait_fp8, "tokens waited in FP8 blocks");
        assert_eq!(sinks_in_fp8, sinks_fp8, "sinks kept in FP8 blocks");
        assert!(
            preempted > 0,
            "the pool never ran out: the test is not small enough"
        );
    }

    /// Admission leaves room for a step's growth; a pool too small for that is refused.
    #[test]
    fn admission_keeps_headroom() {
        let shape = ModelShape::llama3_8b();
        let slot = shape.layers * shape.kv_heads * 9728;
        let b = GpuBackend::checked(&shape, PoolSpec::new(mixed(), 1000 * slot), 512).unwrap();
        let bytes = b.admission_bytes(512, 64).unwrap();
        assert!(bytes < 1000 * slot && bytes > 700 * slot, "{bytes}");
        assert!(b.admission_bytes(4096, 256).is_err());
    }
}
