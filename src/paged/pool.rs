//! The host side of the GPU block pool: free slots, each sequence's block tables per
//! precision class, and the device work (zero, move, quantize) that keeps them true.
//!
//! A slot is one block in every layer (the stacked pool of `DeviceCache::allocate_layers`:
//! every layer holds the same tokens, with one class per tag in all layers). A sequence's
//! tokens live in exactly one block each:
//! - **stream**: 16-bit blocks of the newest tokens, in order (the residual window);
//! - **hold**: 16-bit blocks of the tokens out of the stream that are not packed: 16-bit-class
//!   tokens (sinks, 16-bit tags) and tokens waiting for a key group of their class (per-channel
//!   key scales need the group's tokens at once), of any classes together, dense (all blocks
//!   full but one);
//! - **wait** (only with `ClassTokens::wait_fp8` or `fp8_sinks`): FP8 blocks (fixed scale
//!   `HOLD_FP8_SCALE`) of the tokens waiting for an INT4/INT2 key group instead of the 16-bit
//!   hold: half the bytes of what waits, dense like the hold; with `fp8_sinks` the sinks too,
//!   so no sequence keeps a 16-bit block for its 4 sinks; with `decode_fp8` generated tokens
//!   that wait in FP8 are written there directly (`append_decode`) once the stream is flushed,
//!   and with `fp8_window` the residual window of such tokens is held there too (a key group
//!   is quantized only once its tokens are out of the window);
//! - **packed[c]**: quantized blocks of class `c`, all full but the last, which holds whole
//!   key groups.
//!
//! Full stream blocks that have left the window join the held blocks (relabelled, no copy).
//! A class with a key group's worth held (`ClassTokens::fill`) has it quantized (`Quantize`)
//! into its open block, or a new one; a held block that gives up a token is freed and its
//! other tokens are moved to the end of the held (or waiting) blocks, so at most 63 tokens per
//! class (plus the 16-bit ones) wait, in as few blocks as they fill. Moves of one pass never
//! read what another writes (they run in parallel).
//! When the (turn, step) being generated moves (recency aging), a packed block holding a token
//! whose class changed is decoded token by token back to 16 bits and its tokens planned like
//! held ones; a held token only changes the class it waits for (no move).
//! Slots freed during a pass are reusable only after the pass's device work is queued
//! (`SlotPool::commit`), so no device write lands in a block still being read. A pass holds
//! at most one `age` or `settle` of a sequence: the second could move a token the first
//! moves, and a pass's moves run in parallel.

use crate::gpu::decode_attention::class_index;
use crate::quant::layout::KvClass;
use crate::tags::{RecencyUnit, Tag, TokenTag};
use std::collections::HashMap;

/// Tokens of a 16-bit block (`BlockGeometry::default_for(F16)`).
pub const F16_TOKENS: usize = 16;

/// The scale of the FP8 blocks tokens wait in (`ClassTokens::wait_fp8`): one for every block,
/// since a block gains tokens one pass at a time and a scale fitted to its first tokens would
/// clip later ones. 1.0 is what FP8 KV caches use without calibrated scales (E4M3 holds
/// |x| up to 448 at 3 mantissa bits); a waiting token is re-quantized to INT4/INT2 from it.
pub const HOLD_FP8_SCALE: f32 = 1.0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("the block pool is out of free slots ({total} in all)")]
    OutOfSlots { total: usize },
}

/// Which tokens outside a quantizing pool's packed blocks are held in its FP8 blocks (E4M3 at
/// `HOLD_FP8_SCALE`) instead of 16-bit ones, as asked for (`ClassTokens` applies them where the
/// class map allows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fp8Hold {
    /// Tokens waiting for an INT4/INT2 key group (`ClassTokens::wait_fp8`).
    pub wait: bool,
    /// The attention sinks (`ClassTokens::fp8_sinks`).
    pub sinks: bool,
    /// Generated tokens, written there directly (`ClassTokens::decode_fp8`).
    pub decode: bool,
    /// The residual window (`ClassTokens::fp8_window`).
    pub window: bool,
}

impl Fp8Hold {
    /// Everything: how a profile allocated with `--hold-fp8` is stored.
    pub const ALL: Fp8Hold = Fp8Hold {
        wait: true,
        sinks: true,
        decode: true,
        window: true,
    };

    /// `self`, or `ALL` for a profile allocated with `--hold-fp8` (`CacheSettings::hold_fp8`).
    pub fn or_hold(self, hold_fp8: bool) -> Self {
        if hold_fp8 {
            Self::ALL
        } else {
            self
        }
    }
}

/// Block capacity in tokens per class, and the tokens quantized into a block at once, in
/// `KvClass::ALL` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassTokens {
    pub capacity: [usize; 4],
    /// INT4/INT2: a key group (per-channel key scales need its tokens together; values are
    /// per token), so a block fills group by group and held tokens wait for one group, not a
    /// block. FP8 (one scale per block) and 16-bit: the whole block.
    pub fill: [usize; 4],
    /// Tokens waiting for an INT4/INT2 key group wait in FP8 blocks, not 16-bit ones.
    pub wait_fp8: bool,
    /// The first `fp8_sinks` positions (the attention sinks) are kept in the FP8 waiting
    /// blocks once out of the stream, not in a 16-bit block of their own (with `wait_fp8`
    /// that block held only them: 4 tokens in a 16-token slot per sequence). 0: 16-bit.
    pub fp8_sinks: usize,
    /// With `wait_fp8` and no 16-bit window: a generated token whose class waits in FP8 is
    /// written straight into the waiting blocks (`SeqBlocks::append_decode`), and a sequence
    /// that decodes flushes its stream (`settle` with `flush`), so no decoding sequence keeps a
    /// 16-bit block of ~8 tokens for its newest ones.
    pub decode_fp8: bool,
    /// With `decode_fp8`: the map's residual window is kept in the FP8 waiting blocks, not the
    /// 16-bit stream. Full stream blocks leave at once (INT4/INT2 tokens to the waiting
    /// blocks), generated tokens go there directly, and a class's key group is quantized only
    /// from tokens out of the window: the newest `window` tokens at 8 bits instead of 16.
    pub fp8_window: bool,
}

impl Default for ClassTokens {
    /// The GPU pool's default blocks: INT2 holds 128 tokens in two 64-token key groups.
    fn default() -> Self {
        ClassTokens {
            capacity: [F16_TOKENS, 64, 128, 32],
            fill: [F16_TOKENS, 64, 64, 32],
            wait_fp8: false,
            fp8_sinks: 0,
            decode_fp8: false,
            fp8_window: false,
        }
    }
}

impl ClassTokens {
    pub fn of(&self, c: KvClass) -> usize {
        self.capacity[class_index(c)]
    }

    pub fn fill_of(&self, c: KvClass) -> usize {
        self.fill[class_index(c)]
    }

    /// Whether a token of class `c` out of the stream, not packed, waits in an FP8 block.
    pub fn waits_fp8(&self, c: KvClass) -> bool {
        self.wait_fp8 && matches!(c, KvClass::Int4 | KvClass::Int2)
    }

    /// Whether the token at `pos`, of class `c`, out of the stream and not packed, is kept
    /// in an FP8 block (waiting for its key group, or a sink with `fp8_sinks`).
    fn in_fp8(&self, pos: u32, c: KvClass) -> bool {
        (pos as usize) < self.fp8_sinks || self.waits_fp8(c)
    }

    /// Whether generated tokens may skip the 16-bit stream under `map` (`decode_fp8`; a
    /// 16-bit window keeps the newest tokens in the stream unless it is in FP8,
    /// `fp8_window`, and only INT4/INT2 tokens wait).
    pub fn decodes_fp8(&self, map: &ClassMap) -> bool {
        self.decode_fp8
            && self.wait_fp8
            && (map.window == 0 || self.fp8_window)
            && (map.uses(KvClass::Int4) || map.uses(KvClass::Int2))
    }

    /// Whether `map`'s residual window is held in the FP8 waiting blocks (`fp8_window`, where
    /// generated tokens go there: `decodes_fp8`).
    pub fn window_in_fp8(&self, map: &ClassMap) -> bool {
        self.fp8_window && map.window > 0 && self.decodes_fp8(map)
    }
}

/// Free slots of the pool.
#[derive(Debug, Clone)]
pub struct SlotPool {
    total: usize,
    free: Vec<u32>,
    pending: Vec<u32>,
}

impl SlotPool {
    pub fn new(total: usize) -> Self {
        SlotPool {
            total,
            free: (0..total as u32).rev().collect(),
            pending: Vec::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Slots free now (not counting those freed in the current pass).
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Slots held by sequences.
    pub fn used(&self) -> usize {
        self.total - self.free.len() - self.pending.len()
    }

    fn alloc(&mut self) -> Result<u32, PoolError> {
        self.free
            .pop()
            .ok_or(PoolError::OutOfSlots { total: self.total })
    }

    fn release(&mut self, slot: u32) {
        self.pending.push(slot);
    }

    /// The pass's device work is queued: slots it freed may be handed out again.
    pub fn commit(&mut self) {
        self.free.append(&mut self.pending);
    }
}

/// Which class a token is stored at: 16-bit for the first `sinks` tokens and the newest
/// `window`; otherwise its tag's class, resolved against the (turn, step) being generated.
#[derive(Debug, Clone)]
pub struct ClassMap {
    pub classes: HashMap<Tag, KvClass>,
    pub default: KvClass,
    pub sinks: usize,
    pub window: usize,
    pub unit: RecencyUnit,
}

impl ClassMap {
    /// Every token at `class`, with `sinks` and `window` 16-bit.
    pub fn uniform(class: KvClass, sinks: usize, window: usize) -> Self {
        ClassMap {
            classes: HashMap::new(),
            default: class,
            sinks,
            window,
            unit: RecencyUnit::Turn,
        }
    }

    pub fn class(&self, pos: usize, tag: &TokenTag, now: (u32, u32)) -> KvClass {
        if pos < self.sinks {
            return KvClass::F16;
        }
        let t = tag.at(self.unit, now.0, now.1);
        self.classes.get(&t).copied().unwrap_or(self.default)
    }

    /// One class per tag for every layer, K and V alike (the GPU block holds both), from a
    /// profile's per-(layer, K|V, tag) bits: the class whose bits are nearest the tag's mean
    /// over layers and K/V (ties to the wider); the profile's sinks, window and recency unit.
    pub fn from_profile(p: &crate::profile::Profile) -> Self {
        fn class_of(bits: f64) -> KvClass {
            [KvClass::F16, KvClass::Fp8, KvClass::Int4, KvClass::Int2]
                .into_iter()
                .min_by(|a, b| {
                    let da = (a.bits() as f64 - bits).abs();
                    let db = (b.bits() as f64 - bits).abs();
                    da.total_cmp(&db)
                })
                .unwrap_or(KvClass::F16)
        }
        let mut sums: HashMap<Tag, (f64, usize)> = HashMap::new();
        for a in &p.assignments {
            let e = sums.entry(a.tag()).or_default();
            e.0 += a.bits as f64;
            e.1 += 1;
        }
        let slots = 2 * p.model.layers.max(1);
        let fill = (p.default_k_bits as f64 + p.default_v_bits as f64) / 2.0;
        let classes = sums
            .into_iter()
            .map(|(t, (sum, n))| {
                // Layers or K/V the profile leaves out take its default bits.
                let mean = (sum + fill * slots.saturating_sub(n) as f64) / slots.max(n) as f64;
                (t, class_of(mean))
            })
            .collect();
        ClassMap {
            classes,
            default: class_of(fill),
            sinks: p.cache.sinks,
            window: p.cache.window,
            unit: p.cache.recency_unit,
        }
    }

    /// How far `from_profile(p)` is from `p`: its (layer, K|V, tag) entries served at more or
    /// fewer bits than the profile gives them. Zero for a `tag-only` profile.
    pub fn fit(&self, p: &crate::profile::Profile) -> ProfileFit {
        let mut f = ProfileFit {
            entries: p.assignments.len(),
            ..Default::default()
        };
        for a in &p.assignments {
            let served = self.classes.get(&a.tag()).copied().unwrap_or(self.default);
            let served = served.bits() as u8;
            if served > a.bits {
                f.raised += 1;
            } else if served < a.bits {
                f.lowered += 1;
            }
        }
        f
    }

    /// Why a pool storing INT2 keys per channel over `k_group` tokens (INT4 over its 64-token
    /// blocks, or fewer) differs from what `p` was allocated and evaluated with (its
    /// `cache.block_tokens`). `None` when they agree.
    pub fn key_block_note(&self, p: &crate::profile::Profile, k_group: usize) -> Option<String> {
        let tokens = ClassTokens::default();
        let differs: Vec<String> = [KvClass::Int4, KvClass::Int2]
            .into_iter()
            .map(|c| (c, k_group.min(tokens.of(c))))
            .filter(|&(c, g)| self.uses(c) && g != p.cache.block_tokens)
            .map(|(c, g)| format!("{c:?} over {g} tokens"))
            .collect();
        (!differs.is_empty()).then(|| {
            format!(
                "profile {} quantizes keys per channel over {} tokens; this pool stores {} \
                 (`eval --key-block` measures other groups)",
                p.name,
                p.cache.block_tokens,
                differs.join(" and ")
            )
        })
    }

    pub fn uses(&self, c: KvClass) -> bool {
        self.default == c || self.classes.values().any(|&x| x == c)
    }

    /// Whether any token can leave 16 bits.
    pub fn quantizes(&self) -> bool {
        self.default != KvClass::F16 || self.classes.values().any(|&c| c != KvClass::F16)
    }
}

/// Entries of a profile a `ClassMap` serves at other bits than the profile's (`ClassMap::fit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProfileFit {
    pub entries: usize,
    pub raised: usize,
    pub lowered: usize,
}

impl ProfileFit {
    pub fn exact(&self) -> bool {
        self.raised == 0 && self.lowered == 0
    }
}

impl std::fmt::Display for ProfileFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exact() {
            return write!(
                f,
                "all {} entries served at the profile's bits",
                self.entries
            );
        }
        write!(
            f,
            "the GPU pool keeps one class per tag for every layer and K/V alike: {} of {} \
             (layer, K|V, tag) entries are served at fewer bits than the profile's and {} at \
             more (a profile made with `allocate --policy tag-only` fits exactly)",
            self.lowered, self.entries, self.raised
        )
    }
}

/// One token copied (and dequantized) from any block into a 16-bit block, or an FP8 block
/// of waiting tokens (`dst_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub src_slot: u32,
    pub src_class: KvClass,
    pub src_tok: u32,
    pub dst_slot: u32,
    pub dst_class: KvClass,
    pub dst_tok: u32,
}

/// Tokens `src` (slot, class, token) of any blocks, in order, quantized into packed block
/// `dst_slot` as its tokens `start..` (`start > 0`: appended after whole key groups already
/// there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantize {
    pub class: KvClass,
    pub dst_slot: u32,
    pub start: u32,
    pub src: Vec<(u32, KvClass, u32)>,
}

/// Device work of one pass, run in this order: zero new 16-bit slots, moves, quantizes.
#[derive(Debug, Clone, Default)]
pub struct Ops {
    pub zero: Vec<u32>,
    pub moves: Vec<Move>,
    pub quantize: Vec<Quantize>,
    /// FP8 waiting blocks (slot, tokens) cut back to their first tokens (`SeqBlocks::truncate`):
    /// no device work (later tokens are written over what is left past them), but a model of
    /// the device's blocks must know.
    pub trim: Vec<(u32, u32)>,
}

impl Ops {
    pub fn is_empty(&self) -> bool {
        self.zero.is_empty()
            && self.moves.is_empty()
            && self.quantize.is_empty()
            && self.trim.is_empty()
    }

    /// Queue quantizing `src` into `dst_slot` from token `start`; a job of this pass already
    /// filling the block's tokens before `start` takes them, so no two jobs name one block
    /// (the kernel reads a block it appends to).
    fn quantize_into(
        &mut self,
        class: KvClass,
        dst_slot: u32,
        start: u32,
        src: Vec<(u32, KvClass, u32)>,
    ) {
        if let Some(q) =
            self.quantize.iter_mut().rev().find(|q| {
                q.dst_slot == dst_slot && q.start as usize + q.src.len() == start as usize
            })
        {
            q.src.extend(src);
            return;
        }
        self.quantize.push(Quantize {
            class,
            dst_slot,
            start,
            src,
        });
    }
}

/// A token as a pass plans it: where it is at the start of the pass (slot, class, token),
/// and its position.
type Planned = ((u32, KvClass, u32), u32);

#[derive(Debug, Clone)]
struct Block {
    slot: u32,
    /// Positions of the block's tokens, by token index in the block.
    pos: Vec<u32>,
}

/// One sequence's blocks.
#[derive(Debug, Clone, Default)]
pub struct SeqBlocks {
    tags: Vec<TokenTag>,
    stream: Vec<Block>,
    /// 16-bit blocks of the tokens out of the stream not packed: 16-bit-class tokens and
    /// tokens waiting for a key group of their class, of any class together.
    hold: Vec<Block>,
    /// FP8 blocks of tokens waiting for an INT4/INT2 key group (`ClassTokens::wait_fp8`).
    wait: Vec<Block>,
    packed: [Vec<Block>; 4],
    now: (u32, u32),
    /// Each position's class at `now` (cached: settling looks at held tokens every pass).
    class_at: Vec<KvClass>,
}

/// Where a sequence's 16-bit tokens are: the stream, and the held blocks with their tokens by
/// the class they wait for (`F16`: sinks and 16-bit tags, which stay). What the stored bits
/// above the packed classes' are made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct F16Use {
    pub stream_blocks: usize,
    pub stream_tokens: usize,
    pub held_blocks: usize,
    /// In `KvClass::ALL` order.
    pub held_tokens: [usize; 4],
    /// FP8 blocks of waiting tokens (`ClassTokens::wait_fp8`) and their tokens by class.
    #[serde(default)]
    pub wait_blocks: usize,
    #[serde(default)]
    pub wait_tokens: [usize; 4],
}

impl std::ops::AddAssign for F16Use {
    fn add_assign(&mut self, o: Self) {
        self.stream_blocks += o.stream_blocks;
        self.stream_tokens += o.stream_tokens;
        self.held_blocks += o.held_blocks;
        self.wait_blocks += o.wait_blocks;
        for (a, b) in self.held_tokens.iter_mut().zip(o.held_tokens) {
            *a += b;
        }
        for (a, b) in self.wait_tokens.iter_mut().zip(o.wait_tokens) {
            *a += b;
        }
    }
}

/// Tokens and blocks of one sequence by where they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqCounts {
    /// Tokens per class (16-bit: stream and held; FP8: packed and waiting).
    pub tokens: [usize; 4],
    /// Blocks per class (16-bit: stream and held; FP8: packed and waiting).
    pub blocks: [usize; 4],
}

impl SeqBlocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    pub fn now(&self) -> (u32, u32) {
        self.now
    }

    fn f16_lists(&self) -> impl Iterator<Item = &Block> {
        self.hold.iter().chain(self.stream.iter())
    }

    /// 16-bit tokens in table order (held, stream): what precedes a new chunk.
    pub fn f16_tokens(&self) -> usize {
        self.f16_lists().map(|b| b.pos.len()).sum()
    }

    pub fn counts(&self) -> SeqCounts {
        let mut c = SeqCounts::default();
        for b in self.f16_lists() {
            c.tokens[0] += b.pos.len();
            c.blocks[0] += 1;
        }
        for k in 1..4 {
            c.tokens[k] = self.packed[k].iter().map(|b| b.pos.len()).sum();
            c.blocks[k] = self.packed[k].len();
        }
        let fp8 = class_index(KvClass::Fp8);
        c.tokens[fp8] += self.wait.iter().map(|b| b.pos.len()).sum::<usize>();
        c.blocks[fp8] += self.wait.len();
        c
    }

    /// The 16-bit blocks and what they hold, with classes at `self.now`.
    pub fn f16_use(&self) -> F16Use {
        let mut u = F16Use {
            stream_blocks: self.stream.len(),
            stream_tokens: self.stream.iter().map(|b| b.pos.len()).sum(),
            held_blocks: self.hold.len(),
            ..Default::default()
        };
        let class = |p: u32| {
            class_index(
                self.class_at
                    .get(p as usize)
                    .copied()
                    .unwrap_or(KvClass::F16),
            )
        };
        for &p in self.hold.iter().flat_map(|b| &b.pos) {
            u.held_tokens[class(p)] += 1;
        }
        u.wait_blocks = self.wait.len();
        for &p in self.wait.iter().flat_map(|b| &b.pos) {
            u.wait_tokens[class(p)] += 1;
        }
        u
    }

    /// Packed blocks and their tokens per class (`KvClass::ALL` order; 16-bit: none): with
    /// the classes' capacities, the room left in each class's open block.
    pub fn packed_use(&self) -> ([usize; 4], [usize; 4]) {
        let mut blocks = [0; 4];
        let mut tokens = [0; 4];
        for (k, list) in self.packed.iter().enumerate().skip(1) {
            blocks[k] = list.len();
            tokens[k] = list.iter().map(|b| b.pos.len()).sum();
        }
        (blocks, tokens)
    }

    /// Slots held.
    pub fn slots(&self) -> usize {
        self.counts().blocks.iter().sum()
    }

    /// The block tables of this sequence, `(class, slot, tokens)` in table order: the 16-bit
    /// blocks (held, then the stream, so a chunk just appended is last), the FP8 waiting
    /// blocks, then each packed class.
    pub fn table(&self) -> Vec<(KvClass, u32, usize)> {
        let mut t: Vec<(KvClass, u32, usize)> = self
            .f16_lists()
            .map(|b| (KvClass::F16, b.slot, b.pos.len()))
            .collect();
        t.extend(
            self.wait
                .iter()
                .map(|b| (KvClass::Fp8, b.slot, b.pos.len())),
        );
        for (k, list) in self.packed.iter().enumerate().skip(1) {
            t.extend(list.iter().map(|b| (KvClass::ALL[k], b.slot, b.pos.len())));
        }
        t
    }

    /// Append `tags` as the next tokens into the stream (new 16-bit blocks zeroed by `ops`):
    /// their (slot, token) targets. On `OutOfSlots` nothing was appended.
    pub fn append(
        &mut self,
        pool: &mut SlotPool,
        tags: &[TokenTag],
        ops: &mut Ops,
    ) -> Result<Vec<(u32, u32)>, PoolError> {
        let room = self.stream.last().map_or(0, |b| F16_TOKENS - b.pos.len());
        let need = tags.len().saturating_sub(room).div_ceil(F16_TOKENS);
        if pool.free() < need {
            return Err(PoolError::OutOfSlots {
                total: pool.total(),
            });
        }
        let mut out = Vec::with_capacity(tags.len());
        for tag in tags {
            if self.stream.last().is_none_or(|b| b.pos.len() == F16_TOKENS) {
                let slot = pool.alloc()?;
                ops.zero.push(slot);
                self.stream.push(Block {
                    slot,
                    pos: Vec::new(),
                });
            }
            let pos = self.tags.len() as u32;
            self.tags.push(*tag);
            if let Some(b) = self.stream.last_mut() {
                out.push((b.slot, b.pos.len() as u32));
                b.pos.push(pos);
            }
        }
        Ok(out)
    }

    /// Whether generated token `tag`, appended next, goes straight into the FP8 waiting
    /// blocks once the stream is flushed (`ClassTokens::decodes_fp8` and its class waits in
    /// FP8): what `settle`'s `flush` asks for.
    pub fn decodes_into_fp8(&self, map: &ClassMap, tokens: &ClassTokens, tag: &TokenTag) -> bool {
        let pos = self.tags.len();
        tokens.decodes_fp8(map) && tokens.in_fp8(pos as u32, map.class(pos, tag, self.now))
    }

    /// Append one generated token: straight into the FP8 waiting blocks when its class waits
    /// there and the stream is empty (`ClassTokens::decodes_fp8`; a new block is zeroed by
    /// `ops`), else into the stream. Its (slot, token) target and the class written there
    /// (`Fp8` or `F16`). On `OutOfSlots` nothing was appended.
    pub fn append_decode(
        &mut self,
        pool: &mut SlotPool,
        map: &ClassMap,
        tokens: &ClassTokens,
        tag: TokenTag,
        ops: &mut Ops,
    ) -> Result<(u32, u32, KvClass), PoolError> {
        let pos = self.tags.len();
        let fp8 = self.stream.is_empty() && self.decodes_into_fp8(map, tokens, &tag);
        if !fp8 {
            let t = self.append(pool, &[tag], ops)?;
            let (slot, tok) = t.first().copied().ok_or(PoolError::OutOfSlots {
                total: pool.total(),
            })?;
            return Ok((slot, tok, KvClass::F16));
        }
        let cap = tokens.of(KvClass::Fp8);
        // Into the first waiting block with room (the list is dense), else a new one.
        let at = match self.wait.iter().position(|b| b.pos.len() < cap) {
            Some(i) => i,
            None => {
                let slot = pool.alloc()?;
                ops.zero.push(slot);
                self.wait.push(Block {
                    slot,
                    pos: Vec::with_capacity(cap),
                });
                self.wait.len() - 1
            }
        };
        self.tags.push(tag);
        let b = &mut self.wait[at];
        b.pos.push(pos as u32);
        Ok((b.slot, b.pos.len() as u32 - 1, KvClass::Fp8))
    }

    /// Bring the blocks up to date: full stream blocks out of the window join the held
    /// 16-bit tokens, and every class with a key group's worth held has it quantized. With
    /// `flush` (a sequence about to generate tokens that `decodes_into_fp8`) the newest stream
    /// block leaves too, so its generated tokens go straight into the FP8 waiting blocks.
    pub fn settle(
        &mut self,
        pool: &mut SlotPool,
        map: &ClassMap,
        tokens: &ClassTokens,
        flush: bool,
        ops: &mut Ops,
    ) -> Result<(), PoolError> {
        let n = self.tags.len();
        self.cache_classes(map);
        let flush = flush && tokens.decodes_fp8(map);
        // With the window in FP8 full stream blocks leave at once; the window is kept from
        // the key groups instead.
        let window = if tokens.window_in_fp8(map) {
            0
        } else {
            map.window
        };
        let mut leaving = 0;
        // The newest block stays, unless flushed: the next tokens append to it.
        while leaving + usize::from(!flush) < self.stream.len() {
            let b = &self.stream[leaving];
            let last = b.pos.last().copied().unwrap_or(0) as usize;
            if !flush && (b.pos.len() < F16_TOKENS || last + window >= n) {
                break;
            }
            leaving += 1;
        }
        let quant_end = n.saturating_sub(map.window);
        if leaving == 0 && !self.wait_group_ready(tokens, quant_end) {
            // Classes change only when ageing, and a pass leaves less than a key group of
            // each class held (generated tokens that wait in FP8 may complete one): nothing
            // to do.
            return Ok(());
        }
        if !map.quantizes() {
            self.hold.extend(self.stream.drain(..leaving));
            return Ok(());
        }
        self.rebalance(pool, tokens, ops, leaving, &[], quant_end)
    }

    /// Extend the class cache over positions appended since (classes at `self.now`).
    fn cache_classes(&mut self, map: &ClassMap) {
        self.class_at.truncate(self.tags.len());
        for p in self.class_at.len()..self.tags.len() {
            let c = map.class(p, &self.tags[p], self.now);
            self.class_at.push(c);
        }
    }

    /// Whether the FP8 waiting blocks hold a key group's worth of some class before
    /// `quant_end` (generated tokens, `append_decode`, join them without a pass, and with the
    /// window in FP8 tokens leave it without one). Classes cached.
    fn wait_group_ready(&self, tokens: &ClassTokens, quant_end: usize) -> bool {
        if !tokens.decode_fp8 || self.wait.is_empty() {
            return false;
        }
        let mut per = [0usize; 4];
        for &p in self.wait.iter().flat_map(|b| &b.pos) {
            if (p as usize) < quant_end {
                per[class_index(self.class_at[p as usize])] += 1;
            }
        }
        (1..4).any(|k| per[k] >= tokens.fill[k])
    }

    /// Generation moves to (turn, step): every packed block holding a token whose class
    /// changed is decoded back to 16 bits (its tokens re-quantized if a key group's worth of
    /// their new class is held). A waiting token needs no move unless its new class waits in the
    /// other list (16-bit or FP8): only the class it waits for changed.
    pub fn age(
        &mut self,
        pool: &mut SlotPool,
        map: &ClassMap,
        tokens: &ClassTokens,
        now: (u32, u32),
        ops: &mut Ops,
    ) -> Result<(), PoolError> {
        if now == self.now {
            return Ok(());
        }
        self.now = now;
        self.class_at.clear();
        self.cache_classes(map);
        let mut stale = Vec::new();
        for (k, list) in self.packed.iter().enumerate().skip(1) {
            for (i, b) in list.iter().enumerate() {
                if b.pos
                    .iter()
                    .any(|&p| self.class_at[p as usize] != KvClass::ALL[k])
                {
                    stale.push((k, i));
                }
            }
        }
        let quant_end = self.tags.len().saturating_sub(map.window);
        self.rebalance(pool, tokens, ops, 0, &stale, quant_end)
    }

    /// Re-plan the tokens out of the stream not packed: the held blocks with a token waiting
    /// for a key group, the FP8 waiting blocks, the first `leaving` stream blocks and the
    /// packed blocks `stale` (class index, block index), with `class_at` current. Per class,
    /// whole key groups of its tokens before `quant_end` (out of the residual window; oldest
    /// first) are quantized; a block that loses a
    /// token, or holds one that belongs in the other list (16-bit or FP8 waiting), is freed
    /// and its other tokens moved to the end of their list, so both stay dense. Planned
    /// first: on `OutOfSlots` nothing changed.
    fn rebalance(
        &mut self,
        pool: &mut SlotPool,
        tokens: &ClassTokens,
        ops: &mut Ops,
        leaving: usize,
        stale: &[(usize, usize)],
        quant_end: usize,
    ) -> Result<(), PoolError> {
        let class_at = &self.class_at;
        let to_wait = |p: u32| tokens.in_fp8(p, class_at[p as usize]);
        let wait_cap = tokens.of(KvClass::Fp8);
        // Candidate blocks: held ones with a token waiting for a key group or kept in FP8
        // (held blocks of 16-bit tokens only stay as they are), waiting, leaving, stale; where
        // each sits.
        let waiting: Vec<usize> = (0..self.hold.len())
            .filter(|&i| {
                self.hold[i]
                    .pos
                    .iter()
                    .any(|&p| class_at[p as usize] != KvClass::F16 || to_wait(p))
            })
            .collect();
        let mut cands: Vec<(&Block, KvClass)> = waiting
            .iter()
            .map(|&i| (&self.hold[i], KvClass::F16))
            .chain(self.wait.iter().map(|b| (b, KvClass::Fp8)))
            .chain(self.stream[..leaving].iter().map(|b| (b, KvClass::F16)))
            .collect();
        let held = cands.len();
        cands.extend(
            stale
                .iter()
                .map(|&(k, i)| (&self.packed[k][i], KvClass::ALL[k])),
        );
        // Per class, the (block, token) of its tokens in order; whole key groups are taken.
        let mut groups: [Vec<(usize, usize)>; 4] = Default::default();
        for (bi, (b, _)) in cands.iter().enumerate() {
            for (ti, &p) in b.pos.iter().enumerate() {
                if (p as usize) < quant_end {
                    groups[class_index(class_at[p as usize])].push((bi, ti));
                }
            }
        }
        groups[0].clear();
        let mut picked: Vec<Vec<bool>> = cands
            .iter()
            .map(|(b, _)| vec![false; b.pos.len()])
            .collect();
        for (k, group) in groups.iter_mut().enumerate().skip(1) {
            let fill = tokens.fill[k];
            group.truncate(group.len() / fill * fill);
            for &(bi, ti) in group.iter() {
                picked[bi][ti] = true;
            }
        }
        // A block stays (no copy) when it gives up no token and each of its tokens belongs in
        // its list: an FP8 block holds only tokens that wait in FP8, a 16-bit one none.
        let kept: Vec<bool> = (0..cands.len())
            .map(|bi| {
                let (b, c) = cands[bi];
                bi < held
                    && !picked[bi].contains(&true)
                    && b.pos.iter().all(|&p| to_wait(p) == (c == KvClass::Fp8))
            })
            .collect();
        let token = |bi: usize, ti: usize| {
            let (b, c) = cands[bi];
            ((b.slot, c, ti as u32), b.pos[ti])
        };
        // To place at the end of their list: the unpicked tokens of every freed block.
        let (to_wait_list, to_hold): (Vec<Planned>, Vec<Planned>) = (0..cands.len())
            .filter(|&bi| !kept[bi])
            .flat_map(|bi| (0..cands[bi].0.pos.len()).map(move |ti| (bi, ti)))
            .filter(|&(bi, ti)| !picked[bi][ti])
            .map(|(bi, ti)| token(bi, ti))
            .partition(|&(_, pos)| to_wait(pos));
        let jobs: Vec<Vec<Planned>> = groups
            .iter()
            .map(|g| g.iter().map(|&(bi, ti)| token(bi, ti)).collect())
            .collect();
        let freed: Vec<u32> = (0..cands.len())
            .filter(|&bi| !kept[bi])
            .map(|bi| cands[bi].0.slot)
            .collect();
        let kept_hold: Vec<bool> = {
            let mut k = vec![true; self.hold.len()];
            for (wi, &i) in waiting.iter().enumerate() {
                k[i] = kept[wi];
            }
            k
        };
        let first_leaving = waiting.len() + self.wait.len();
        let kept_wait = kept[waiting.len()..first_leaving].to_vec();
        let kept_leaving = kept[first_leaving..held].to_vec();

        // Slots needed: blocks of each list past the room of those kept, packed blocks past
        // each class's open one.
        let room = |list: &[Block], keep: &[bool], cap: usize| -> usize {
            list.iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(b, _)| cap - b.pos.len())
                .sum()
        };
        let mut need = to_hold
            .len()
            .saturating_sub(room(&self.hold, &kept_hold, F16_TOKENS))
            .div_ceil(F16_TOKENS)
            + to_wait_list
                .len()
                .saturating_sub(room(&self.wait, &kept_wait, wait_cap))
                .div_ceil(wait_cap);
        for (k, job) in jobs.iter().enumerate().skip(1) {
            if job.is_empty() {
                continue;
            }
            let cap = tokens.capacity[k];
            let stale_last = stale
                .iter()
                .any(|&(sk, si)| sk == k && si + 1 == self.packed[k].len());
            let open = match self.packed[k].last() {
                Some(b) if !stale_last => cap - b.pos.len(),
                _ => 0,
            };
            need += job.len().saturating_sub(open).div_ceil(cap);
        }
        if pool.free() < need {
            return Err(PoolError::OutOfSlots {
                total: pool.total(),
            });
        }

        // Apply: the kept blocks stay (no copy), the freed ones go.
        let mut stale_sorted = stale.to_vec();
        stale_sorted.sort_unstable_by(|a, b| b.cmp(a));
        for (k, i) in stale_sorted {
            self.packed[k].remove(i);
        }
        let mut keep = kept_hold.into_iter();
        self.hold.retain(|_| keep.next().unwrap_or(true));
        let mut keep = kept_wait.into_iter();
        self.wait.retain(|_| keep.next().unwrap_or(true));
        let mut keep = kept_leaving.into_iter();
        let left: Vec<Block> = self.stream.drain(..leaving).collect();
        self.hold
            .extend(left.into_iter().filter(|_| keep.next().unwrap_or(false)));
        for slot in freed {
            pool.release(slot);
        }
        // Moves (origins only: a move never reads what another writes) into each list's room,
        // then new blocks.
        place(&mut self.hold, KvClass::F16, F16_TOKENS, to_hold, pool, ops)?;
        place(
            &mut self.wait,
            KvClass::Fp8,
            wait_cap,
            to_wait_list,
            pool,
            ops,
        )?;
        // Quantize from the origins (the gather decodes any class; a freed stale block is
        // reusable only after this pass's quantize has read it).
        for (k, job) in jobs.into_iter().enumerate().skip(1) {
            let class = KvClass::ALL[k];
            let (cap, fill) = (tokens.capacity[k], tokens.fill[k]);
            for group in job.chunks(fill) {
                let src = group.iter().map(|&((s, c, t), _)| (s, c, t)).collect();
                // Into the last block while it has room (it holds whole fills), else a new one.
                if self.packed[k].last().is_none_or(|b| b.pos.len() >= cap) {
                    let slot = pool.alloc()?;
                    self.packed[k].push(Block {
                        slot,
                        pos: Vec::with_capacity(cap),
                    });
                }
                let last = self.packed[k].len() - 1;
                let dst = &mut self.packed[k][last];
                let start = dst.pos.len() as u32;
                dst.pos.extend(group.iter().map(|&(_, pos)| pos));
                ops.quantize_into(class, dst.slot, start, src);
            }
        }
        Ok(())
    }

    /// Keep only the first `len` tokens (prefix reuse) when every later token is still in
    /// the stream (16-bit, in order) or at the end of an FP8 waiting block (generated tokens,
    /// `ClassTokens::decode_fp8`, are appended there in order); otherwise free every block.
    /// Waiting blocks cut back are named in `ops.trim`. Returns the tokens kept.
    pub fn truncate(&mut self, pool: &mut SlotPool, len: usize, ops: &mut Ops) -> usize {
        if len >= self.len() {
            return self.len();
        }
        let cut = |p: &u32| *p as usize >= len;
        // Where each waiting block's cut tokens start: they must be its last ones.
        let first_cut = |b: &Block| b.pos.iter().position(cut).unwrap_or(b.pos.len());
        let in_stream = self
            .stream
            .iter()
            .flat_map(|b| &b.pos)
            .filter(|p| cut(p))
            .count();
        let mut in_wait = 0;
        for b in &self.wait {
            let k = first_cut(b);
            if !b.pos[k..].iter().all(cut) {
                in_wait = usize::MAX;
                break;
            }
            in_wait += b.pos.len() - k;
        }
        if in_wait == usize::MAX || in_stream + in_wait != self.len() - len {
            self.release(pool);
            return 0;
        }
        let mut kept = Vec::with_capacity(self.wait.len());
        for mut b in std::mem::take(&mut self.wait) {
            match first_cut(&b) {
                0 => pool.release(b.slot),
                k if k == b.pos.len() => kept.push(b),
                k => {
                    b.pos.truncate(k);
                    ops.trim.push((b.slot, k as u32));
                    kept.push(b);
                }
            }
        }
        self.wait = kept;
        // The stream is in position order: its cut tokens are its tail.
        while self
            .stream
            .last()
            .is_some_and(|b| b.pos.first().is_some_and(|&p| p as usize >= len))
        {
            if let Some(b) = self.stream.pop() {
                pool.release(b.slot);
            }
        }
        if let Some(b) = self.stream.last_mut() {
            b.pos.retain(|&p| (p as usize) < len);
        }
        self.tags.truncate(len);
        self.class_at.truncate(len);
        len
    }

    /// Free every block (the sequence ends or is preempted).
    pub fn release(&mut self, pool: &mut SlotPool) {
        let lists = std::iter::once(std::mem::take(&mut self.stream))
            .chain(std::iter::once(std::mem::take(&mut self.hold)))
            .chain(std::iter::once(std::mem::take(&mut self.wait)))
            .chain(self.packed.iter_mut().map(std::mem::take))
            .collect::<Vec<_>>();
        for b in lists.into_iter().flatten() {
            pool.release(b.slot);
        }
        self.tags.clear();
        self.class_at.clear();
        self.now = (0, 0);
    }

    /// Every token in exactly one block, every block within its capacity (tests).
    pub fn check(&self, tokens: &ClassTokens) -> Result<(), String> {
        let mut seen = vec![false; self.tags.len()];
        let mut lists: Vec<(KvClass, &Block)> =
            self.f16_lists().map(|b| (KvClass::F16, b)).collect();
        lists.extend(self.wait.iter().map(|b| (KvClass::Fp8, b)));
        for (k, l) in self.packed.iter().enumerate() {
            lists.extend(l.iter().map(|b| (KvClass::ALL[k], b)));
        }
        for (c, b) in lists {
            if b.pos.is_empty() || b.pos.len() > tokens.of(c) {
                return Err(format!(
                    "{c:?} block in slot {} holds {}",
                    b.slot,
                    b.pos.len()
                ));
            }
            for &p in &b.pos {
                let s = seen
                    .get_mut(p as usize)
                    .ok_or(format!("position {p} of {}", self.tags.len()))?;
                if std::mem::replace(s, true) {
                    return Err(format!("position {p} in two blocks"));
                }
            }
        }
        match seen.iter().position(|s| !s) {
            Some(p) => Err(format!("position {p} in no block")),
            None => Ok(()),
        }
    }
}

/// Move `tokens` (origin, position) to the end of `list` (blocks of `class`, `cap` tokens):
/// into the room of its last blocks, then new zeroed ones.
fn place(
    list: &mut Vec<Block>,
    class: KvClass,
    cap: usize,
    tokens: Vec<Planned>,
    pool: &mut SlotPool,
    ops: &mut Ops,
) -> Result<(), PoolError> {
    let mut next = 0;
    for ((src_slot, src_class, src_tok), pos) in tokens {
        while next < list.len() && list[next].pos.len() == cap {
            next += 1;
        }
        if next == list.len() {
            let slot = pool.alloc()?;
            ops.zero.push(slot);
            list.push(Block {
                slot,
                pos: Vec::with_capacity(cap),
            });
        }
        let b = &mut list[next];
        ops.moves.push(Move {
            src_slot,
            src_class,
            src_tok,
            dst_slot: b.slot,
            dst_class: class,
            dst_tok: b.pos.len() as u32,
        });
        b.pos.push(pos);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Recency, Role};

    /// The pool's bytes as the device would hold them: per slot, the position each token
    /// index carries and the class it was written as.
    #[derive(Default)]
    struct Device {
        blocks: HashMap<u32, (KvClass, Vec<Option<u32>>)>,
    }

    impl Device {
        fn run(&mut self, ops: &Ops) {
            // A zeroed slot is any class's empty block; its first write says which.
            for &s in &ops.zero {
                self.blocks.insert(s, (KvClass::F16, vec![None; 128]));
            }
            for &(s, n) in &ops.trim {
                let b = self.blocks.get_mut(&s).expect("trim of an unknown slot");
                assert_eq!(b.0, KvClass::Fp8, "trim of a {:?} block", b.0);
                for v in &mut b.1[n as usize..] {
                    *v = None;
                }
            }
            // Moves run in parallel on the GPU: none may read what another writes.
            let written: std::collections::HashSet<(u32, u32)> =
                ops.moves.iter().map(|m| (m.dst_slot, m.dst_tok)).collect();
            for m in &ops.moves {
                assert!(
                    !written.contains(&(m.src_slot, m.src_tok)),
                    "a move reads slot {} token {} another move of the pass writes",
                    m.src_slot,
                    m.src_tok
                );
                let (c, src) = &self.blocks[&m.src_slot];
                assert_eq!(
                    *c, m.src_class,
                    "move reads slot {} as the wrong class",
                    m.src_slot
                );
                let v = src[m.src_tok as usize].expect("move reads an empty token");
                let dst = self
                    .blocks
                    .get_mut(&m.dst_slot)
                    .expect("move into an unzeroed slot");
                if dst.0 != m.dst_class {
                    assert!(dst.1.iter().all(|v| v.is_none()), "move into another class");
                    dst.0 = m.dst_class;
                }
                assert!(matches!(m.dst_class, KvClass::F16 | KvClass::Fp8));
                dst.1[m.dst_tok as usize] = Some(v);
            }
            for q in &ops.quantize {
                let vals: Vec<Option<u32>> = q
                    .src
                    .iter()
                    .map(|&(s, sc, t)| {
                        let (c, b) = &self.blocks[&s];
                        assert_eq!(*c, sc, "quantize reads slot {s} as the wrong class");
                        b[t as usize]
                    })
                    .collect();
                assert!(
                    vals.iter().all(|v| v.is_some()),
                    "quantize reads an empty token"
                );
                if q.start == 0 {
                    self.blocks.insert(q.dst_slot, (q.class, vals));
                } else {
                    let (c, b) = self
                        .blocks
                        .get_mut(&q.dst_slot)
                        .expect("append to an unwritten slot");
                    assert_eq!(*c, q.class, "append to another class");
                    assert_eq!(b.len(), q.start as usize, "append after a gap");
                    b.extend(vals);
                }
            }
        }

        fn append(&mut self, targets: &[(u32, u32)], first: usize) {
            for (i, &(s, t)) in targets.iter().enumerate() {
                let b = self
                    .blocks
                    .get_mut(&s)
                    .expect("append into an unzeroed slot");
                b.1[t as usize] = Some((first + i) as u32);
            }
        }

        /// A generated token written into `class` (16-bit or FP8) at (slot, token).
        fn append_decode(&mut self, (slot, tok, class): (u32, u32, KvClass), pos: usize) {
            let b = self
                .blocks
                .get_mut(&slot)
                .expect("append into an unzeroed slot");
            if b.0 != class {
                assert!(b.1.iter().all(|v| v.is_none()), "append into another class");
                b.0 = class;
            }
            assert!(b.1[tok as usize].is_none(), "append over a token");
            b.1[tok as usize] = Some(pos as u32);
        }

        /// Every table entry reads back the positions the host says it holds.
        fn check(&self, seq: &SeqBlocks) {
            let mut lists: Vec<(KvClass, &Block)> =
                seq.f16_lists().map(|b| (KvClass::F16, b)).collect();
            lists.extend(seq.wait.iter().map(|b| (KvClass::Fp8, b)));
            for (k, l) in seq.packed.iter().enumerate() {
                lists.extend(l.iter().map(|b| (KvClass::ALL[k], b)));
            }
            for (c, b) in lists {
                let (dc, vals) = &self.blocks[&b.slot];
                assert_eq!(*dc, c, "slot {} holds another class", b.slot);
                for (i, &p) in b.pos.iter().enumerate() {
                    assert_eq!(vals[i], Some(p), "slot {} token {i}", b.slot);
                }
            }
        }
    }

    /// Age `seq` to (`turn`, `turn`), the pass's work run on `dev`.
    fn age_pass(
        seq: &mut SeqBlocks,
        pool: &mut SlotPool,
        dev: &mut Device,
        map: &ClassMap,
        tokens: &ClassTokens,
        turn: u32,
    ) {
        let mut ops = Ops::default();
        seq.age(pool, map, tokens, (turn, turn), &mut ops)
            .expect("room");
        dev.run(&ops);
        pool.commit();
    }

    /// Append `tags` to `seq` and settle, each pass's work run on `dev`; both checked after.
    /// The settle pass's work.
    fn append_settle(
        seq: &mut SeqBlocks,
        pool: &mut SlotPool,
        dev: &mut Device,
        map: &ClassMap,
        tokens: &ClassTokens,
        tags: &[TokenTag],
    ) -> Ops {
        let mut ops = Ops::default();
        let first = seq.len();
        let t = seq.append(pool, tags, &mut ops).expect("room");
        dev.run(&ops);
        dev.append(&t, first);
        let mut ops = Ops::default();
        seq.settle(pool, map, tokens, false, &mut ops)
            .expect("room");
        dev.run(&ops);
        pool.commit();
        seq.check(tokens).expect("consistent");
        dev.check(seq);
        ops
    }

    fn tag(role: Role, turn: u32, step: u32) -> TokenTag {
        TokenTag {
            role,
            modality: Modality::Text,
            turn,
            step,
        }
    }

    /// Observations INT2 once older, INT4 while current/previous; system 16-bit; the rest INT4.
    fn map() -> ClassMap {
        let mut classes = HashMap::new();
        for r in Recency::ALL {
            let obs = match r {
                Recency::Current | Recency::Previous => KvClass::Int4,
                _ => KvClass::Int2,
            };
            for (role, c) in [(Role::Observation, obs), (Role::System, KvClass::F16)] {
                classes.insert(
                    Tag {
                        role,
                        modality: Modality::Text,
                        recency: r,
                    },
                    c,
                );
            }
        }
        ClassMap {
            classes,
            default: KvClass::Int4,
            sinks: 4,
            window: 64,
            unit: RecencyUnit::Turn,
        }
    }

    /// A few sequences take turns appending runs of tags, settling and ageing; the device
    /// model checks every move and quantize reads what the host expects, and the pool
    /// balances throughout and returns to full when they end.
    #[test]
    fn tables_match_device_and_the_pool_never_leaks() {
        churn(ClassTokens::default());
    }

    /// The same with waiting tokens in FP8 blocks: classes that change with age move tokens
    /// between the 16-bit hold and the FP8 waiting blocks.
    #[test]
    fn fp8_waiting_blocks_match_device_and_never_leak() {
        churn(ClassTokens {
            wait_fp8: true,
            ..Default::default()
        });
    }

    /// And with the sinks kept in the FP8 waiting blocks.
    #[test]
    fn fp8_sinks_match_device_and_never_leak() {
        churn(ClassTokens {
            wait_fp8: true,
            fp8_sinks: 4,
            ..Default::default()
        });
    }

    fn churn(tokens: ClassTokens) {
        let map = map();
        let mut pool = SlotPool::new(4096);
        let mut dev = Device::default();
        let mut seqs = vec![SeqBlocks::new(), SeqBlocks::new(), SeqBlocks::new()];
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for turn in 1..=12u32 {
            for (si, seq) in seqs.iter_mut().enumerate() {
                age_pass(seq, &mut pool, &mut dev, &map, &tokens, turn);
                for _ in 0..3 {
                    let role = [Role::System, Role::User, Role::Observation, Role::Assistant]
                        [(next() % 4) as usize];
                    let n = 1 + (next() % 150) as usize + si;
                    let tags = vec![tag(role, turn, turn); n];
                    append_settle(seq, &mut pool, &mut dev, &map, &tokens, &tags);
                }
            }
            let held: usize = seqs.iter().map(|s| s.slots()).sum();
            assert_eq!(pool.used(), held, "turn {turn}");
        }
        // Old observations ended up INT2, some tokens INT4, system prompts 16-bit.
        let c = seqs[0].counts();
        assert!(
            c.tokens[2] > 0 && c.tokens[1] > 0 && c.tokens[0] > 0,
            "{c:?}"
        );
        let u = seqs[0].f16_use();
        if tokens.wait_fp8 {
            assert!(u.wait_blocks > 0, "{u:?}");
            assert_eq!(u.held_tokens[1] + u.held_tokens[2], 0, "{u:?}");
        } else {
            assert_eq!(u.wait_blocks, 0, "{u:?}");
        }
        // The sinks are out of the stream: in an FP8 block with `fp8_sinks`, else 16-bit
        // (with the system prompt's 16-bit tokens).
        assert_eq!(u.wait_tokens[0], tokens.fp8_sinks, "{u:?}");
        assert!(u.held_tokens[0] >= 4 - tokens.fp8_sinks, "{u:?}");
        for s in &mut seqs {
            s.release(&mut pool);
        }
        pool.commit();
        assert_eq!(pool.free(), pool.total());
    }

    /// Generated tokens go straight into the FP8 waiting blocks (`ClassTokens::decode_fp8`):
    /// a decoding sequence flushes its stream and holds no 16-bit block, the device model
    /// reads back every token, key groups complete from the waiting blocks alone, prefix
    /// reuse cuts generated tokens back out of them, and the pool returns to full.
    #[test]
    fn decoded_tokens_wait_in_fp8_blocks_and_never_leak() {
        decode_fp8_churn(0, false);
    }

    /// The same with a 64-token window kept in the FP8 waiting blocks
    /// (`ClassTokens::fp8_window`): no stream block either, and no token of the window is
    /// ever packed, while every key group out of it is.
    #[test]
    fn an_fp8_window_waits_in_fp8_blocks_and_never_leaks() {
        decode_fp8_churn(64, true);
    }

    /// Whether `seq` packs a token of its newest `window` or leaves a key group's worth of a
    /// class out of the window waiting.
    fn window_kept(seq: &SeqBlocks, tokens: &ClassTokens, window: usize) -> Result<(), String> {
        let end = seq.len().saturating_sub(window);
        for (k, list) in seq.packed.iter().enumerate() {
            if let Some(p) = list
                .iter()
                .flat_map(|b| &b.pos)
                .find(|&&p| p as usize >= end)
            {
                return Err(format!(
                    "{:?} packs position {p} of {}",
                    KvClass::ALL[k],
                    seq.len()
                ));
            }
        }
        let mut per = [0usize; 4];
        for &p in seq.wait.iter().flat_map(|b| &b.pos) {
            if (p as usize) < end {
                per[class_index(seq.class_at[p as usize])] += 1;
            }
        }
        match (1..4).find(|&k| per[k] >= tokens.fill[k]) {
            Some(k) => Err(format!(
                "{} {:?} tokens out of the window wait",
                per[k],
                KvClass::ALL[k]
            )),
            None => Ok(()),
        }
    }

    fn decode_fp8_churn(window: usize, fp8_window: bool) {
        let tokens = ClassTokens {
            wait_fp8: true,
            fp8_sinks: 4,
            decode_fp8: true,
            fp8_window,
            ..Default::default()
        };
        let map = ClassMap { window, ..map() };
        assert!(tokens.decodes_fp8(&map));
        assert_eq!(tokens.window_in_fp8(&map), window > 0);
        let mut pool = SlotPool::new(4096);
        let mut dev = Device::default();
        let mut seqs = vec![SeqBlocks::new(), SeqBlocks::new()];
        let (mut fp8_decoded, mut groups_from_wait, mut cut_in_wait) = (0, 0, 0);
        for turn in 1..=10u32 {
            for (si, seq) in seqs.iter_mut().enumerate() {
                age_pass(seq, &mut pool, &mut dev, &map, &tokens, turn);
                let role = [Role::User, Role::Observation][(turn as usize + si) % 2];
                let n = 20 + 37 * si + 11 * turn as usize;
                append_settle(
                    seq,
                    &mut pool,
                    &mut dev,
                    &map,
                    &tokens,
                    &vec![tag(role, turn, turn); n],
                );
                window_kept(seq, &tokens, window).expect("the window in FP8");
                // The prompt is in: flush, then generate one token per pass.
                for i in 0..(30 + 17 * si) {
                    let mut ops = Ops::default();
                    seq.settle(&mut pool, &map, &tokens, true, &mut ops)
                        .expect("room");
                    dev.run(&ops);
                    pool.commit();
                    assert_eq!(seq.f16_use().stream_blocks, 0, "turn {turn} token {i}");
                    let mut ops = Ops::default();
                    let pos = seq.len();
                    let t = seq
                        .append_decode(
                            &mut pool,
                            &map,
                            &tokens,
                            tag(Role::Assistant, turn, turn),
                            &mut ops,
                        )
                        .expect("room");
                    assert_eq!(t.2, KvClass::Fp8, "an INT4 assistant token waits in FP8");
                    fp8_decoded += 1;
                    dev.run(&ops);
                    dev.append_decode(t, pos);
                    pool.commit();
                    seq.check(&tokens).expect("consistent");
                    dev.check(seq);
                    let mut ops = Ops::default();
                    seq.settle(&mut pool, &map, &tokens, true, &mut ops)
                        .expect("room");
                    groups_from_wait += ops.quantize.len();
                    dev.run(&ops);
                    pool.commit();
                    seq.check(&tokens).expect("consistent");
                    dev.check(seq);
                    window_kept(seq, &tokens, window).expect("the window in FP8");
                }
                // Prefix reuse cuts the last generated tokens out of their waiting blocks
                // (or, when a key group took them, frees everything).
                let mut ops = Ops::default();
                let keep = seq.len() - 3;
                let kept = seq.truncate(&mut pool, keep, &mut ops);
                assert!(kept == keep || kept == 0, "kept {kept} of {keep}");
                cut_in_wait += usize::from(kept == keep && !ops.trim.is_empty());
                dev.run(&ops);
                pool.commit();
                seq.check(&tokens).expect("consistent");
                dev.check(seq);
            }
            let held: usize = seqs.iter().map(|s| s.slots()).sum();
            assert_eq!(pool.used(), held, "turn {turn}");
        }
        assert!(
            fp8_decoded > 500 && groups_from_wait > 0 && cut_in_wait > 5,
            "{fp8_decoded} {groups_from_wait} {cut_in_wait}"
        );
        // Without `decode_fp8` the same token goes into the stream.
        let mut seq = SeqBlocks::new();
        let mut ops = Ops::default();
        let plain = ClassTokens {
            decode_fp8: false,
            ..tokens
        };
        let t = seq
            .append_decode(
                &mut pool,
                &map,
                &plain,
                tag(Role::Assistant, 1, 1),
                &mut ops,
            )
            .expect("room");
        assert_eq!((t.2, seq.f16_use().stream_tokens), (KvClass::F16, 1));
        seq.release(&mut pool);
        for s in &mut seqs {
            s.release(&mut pool);
        }
        pool.commit();
        assert_eq!(pool.free(), pool.total());
    }

    /// Held INT2 tokens wait for one 64-token key group, not a 128-token block: groups are
    /// appended to the open block, and groups of one pass into one block are one job.
    #[test]
    fn int2_blocks_fill_a_key_group_at_a_time() {
        let tokens = ClassTokens::default();
        let map = ClassMap::uniform(KvClass::Int2, 0, 0);
        let mut pool = SlotPool::new(64);
        let mut dev = Device::default();
        let mut seq = SeqBlocks::new();
        let mut step = |seq: &mut SeqBlocks, n: usize| {
            let tags = vec![tag(Role::User, 1, 1); n];
            append_settle(seq, &mut pool, &mut dev, &map, &tokens, &tags)
                .quantize
                .iter()
                .map(|q| (q.dst_slot, q.start, q.src.len()))
                .collect::<Vec<_>>()
        };
        // 80 tokens: four full stream blocks leave (the newest stays), one key group.
        let first = step(&mut seq, 80);
        assert_eq!(first.len(), 1);
        let (slot, start, n) = first[0];
        assert_eq!((start, n), (0, 64));
        // 64 more: the second group goes into the same block.
        assert_eq!(step(&mut seq, 64), vec![(slot, 64, 64)]);
        let c = seq.counts();
        assert_eq!((c.tokens[2], c.blocks[2]), (128, 1));
        // 208 more: a new block with both of its groups in one job, then an open block.
        let jobs = step(&mut seq, 208);
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        assert_eq!(
            (jobs[0].1, jobs[0].2, jobs[1].1, jobs[1].2),
            (0, 128, 0, 64)
        );
        assert!(jobs[0].0 != jobs[1].0 && jobs[0].0 != slot);
        let c = seq.counts();
        assert_eq!((c.tokens[2], c.blocks[2]), (320, 3));
        // The open block has one key group's room left.
        assert_eq!(seq.packed_use(), ([0, 0, 3, 0], [0, 0, 320, 0]));
        // The old format (fill = block) stages 128 before quantizing.
        let whole = ClassTokens {
            fill: tokens.capacity,
            ..tokens
        };
        let mut other = SeqBlocks::new();
        let mut ops = Ops::default();
        other
            .append(&mut pool, &vec![tag(Role::User, 1, 1); 80], &mut ops)
            .expect("room");
        other
            .settle(&mut pool, &map, &whole, false, &mut ops)
            .expect("room");
        assert!(ops.quantize.is_empty());
        other.release(&mut pool);
        seq.release(&mut pool);
        pool.commit();
        assert_eq!(pool.free(), pool.total());
    }

    /// 60 passes of 7–19 tokens, alternating current observations (INT2) and user tokens
    /// (INT4) after 4 sinks, `each` called after every pass with its work.
    fn alternate(
        tokens: &ClassTokens,
        mut each: impl FnMut(usize, &SeqBlocks, &Ops),
    ) -> (SeqBlocks, SlotPool) {
        let mut map = ClassMap::uniform(KvClass::Int4, 4, 0);
        map.classes.insert(
            Tag {
                role: Role::Observation,
                modality: Modality::Text,
                recency: Recency::Current,
            },
            KvClass::Int2,
        );
        let mut pool = SlotPool::new(256);
        let mut dev = Device::default();
        let mut seq = SeqBlocks::new();
        for i in 0..60 {
            let role = if i % 2 == 0 {
                Role::Observation
            } else {
                Role::User
            };
            let tags = vec![tag(role, 1, 1); 7 + i % 13];
            let ops = append_settle(&mut seq, &mut pool, &mut dev, &map, tokens, &tags);
            each(i, &seq, &ops);
        }
        let c = seq.counts();
        assert!(c.tokens[1] >= 4 * 64 && c.tokens[2] >= 4 * 64, "{c:?}");
        (seq, pool)
    }

    /// Tokens waiting for a key group share 16-bit blocks whatever their class, with the
    /// sinks: the held blocks stay dense (all full but one), and quantizing a group moves the
    /// other tokens of the blocks it empties, never one token twice in a pass.
    #[test]
    fn held_tokens_of_any_class_share_dense_blocks() {
        let tokens = ClassTokens::default();
        let mut moved = 0;
        let (mut seq, mut pool) = alternate(&tokens, |i, seq, ops| {
            moved += ops.moves.len();
            let held: usize = seq.hold.iter().map(|b| b.pos.len()).sum();
            assert_eq!(seq.hold.len(), held.div_ceil(F16_TOKENS), "pass {i}");
            // The sinks and less than a key group of each class.
            assert!(held < 4 + 63 + 63, "pass {i}: {held} held");
        });
        assert!(moved > 0, "groups were quantized out of mixed blocks");
        let (c, u) = (seq.counts(), seq.f16_use());
        assert_eq!(u.wait_blocks, 0);
        assert_eq!(u.held_tokens[0], 4, "the sinks stay: {u:?}");
        assert!(u.held_tokens[1] < 64 && u.held_tokens[2] < 64, "{u:?}");
        assert_eq!(u.held_tokens[3], 0);
        assert_eq!(
            u.held_tokens.iter().sum::<usize>() + u.stream_tokens,
            c.tokens[0]
        );
        assert_eq!(u.held_blocks + u.stream_blocks, c.blocks[0]);
        seq.release(&mut pool);
        pool.commit();
        assert_eq!(pool.free(), pool.total());
    }

    /// With FP8 waiting, the sinks stay in a 16-bit block and the tokens waiting for a key
    /// group of either class share dense FP8 blocks of 32; quantizing reads them as FP8.
    #[test]
    fn waiting_tokens_share_dense_fp8_blocks() {
        dense_fp8_waiting(0);
    }

    /// With `fp8_sinks` the sinks join them, and no 16-bit block is held at all.
    #[test]
    fn fp8_sinks_leave_no_16_bit_block() {
        dense_fp8_waiting(4);
    }

    fn dense_fp8_waiting(fp8_sinks: usize) {
        let tokens = ClassTokens {
            wait_fp8: true,
            fp8_sinks,
            ..Default::default()
        };
        let mut from_fp8 = 0;
        let (mut seq, mut pool) = alternate(&tokens, |i, seq, ops| {
            from_fp8 += ops
                .quantize
                .iter()
                .flat_map(|q| &q.src)
                .filter(|s| s.1 == KvClass::Fp8)
                .count();
            let u = seq.f16_use();
            let waiting = u.wait_tokens.iter().sum::<usize>();
            assert_eq!(u.wait_blocks, waiting.div_ceil(32), "pass {i}: {u:?}");
            assert!(
                u.wait_tokens[1] < 64 && u.wait_tokens[2] < 64,
                "pass {i}: {u:?}"
            );
            assert_eq!(
                u.held_tokens[1..],
                [0, 0, 0],
                "pass {i}: only the sinks held"
            );
            // Sinks: 16-bit in at most one block, or FP8 and no 16-bit block once out of the
            // stream.
            assert!(u.wait_tokens[0] <= fp8_sinks, "pass {i}: {u:?}");
            if fp8_sinks > 0 {
                assert_eq!(u.held_blocks, 0, "pass {i}: {u:?}");
                let out = seq.len() - u.stream_tokens;
                assert_eq!(u.wait_tokens[0], out.min(4), "pass {i}: {u:?}");
            } else {
                assert!(
                    u.held_tokens[0] <= 4 && u.held_blocks <= 1,
                    "pass {i}: {u:?}"
                );
            }
        });
        assert!(from_fp8 > 0, "groups were quantized out of FP8 blocks");
        seq.release(&mut pool);
        pool.commit();
        assert_eq!(pool.free(), pool.total());
    }

    /// A settle that cannot get the slots it needs changes nothing: the caller may release
    /// the sequence (or retry) without a leak.
    #[test]
    fn out_of_slots_settles_nothing() {
        let tokens = ClassTokens::default();
        let map = ClassMap::uniform(KvClass::Int2, 4, 0);
        // 6 stream blocks: 5 leave (4 sinks, 76 INT2 tokens: a key group), which needs a
        // packed block and a held one for the sinks and the other 12.
        let mut pool = SlotPool::new(6);
        let mut seq = SeqBlocks::new();
        let mut ops = Ops::default();
        seq.append(&mut pool, &vec![tag(Role::User, 1, 1); 90], &mut ops)
            .expect("room");
        assert_eq!(pool.free(), 0);
        let (table, n) = (seq.table(), seq.len());
        let mut ops = Ops::default();
        assert_eq!(
            seq.settle(&mut pool, &map, &tokens, false, &mut ops),
            Err(PoolError::OutOfSlots { total: 6 })
        );
        assert!(ops.is_empty());
        assert_eq!((seq.table(), seq.len(), pool.free()), (table, n, 0));
        seq.check(&tokens).expect("consistent");
        seq.release(&mut pool);
        pool.commit();
        assert_eq!(pool.free(), 6);
    }

    #[test]
    fn out_of_slots_appends_nothing() {
        let mut pool = SlotPool::new(2);
        let mut seq = SeqBlocks::new();
        let mut ops = Ops::default();
        let tags = vec![tag(Role::User, 1, 1); 40];
        assert_eq!(
            seq.append(&mut pool, &tags, &mut ops),
            Err(PoolError::OutOfSlots { total: 2 })
        );
        assert!(seq.is_empty() && ops.is_empty() && pool.free() == 2);
        seq.append(&mut pool, &tags[..32], &mut ops)
            .expect("two blocks");
        assert_eq!(pool.free(), 0);
    }

    /// A shipped profile maps to one class per tag: the nearest to its mean bits over layers
    /// and K/V (triaxial-2.97: the current assistant turn at 3.17 bits → INT4, the rest
    /// within 2.03–2.7 → INT2); sinks, window and recency unit come along.
    #[test]
    fn a_profile_maps_to_one_class_per_tag() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/triaxial-2.97.json");
        let p = crate::profile::Profile::read(&path).expect("shipped profile");
        let map = ClassMap::from_profile(&p);
        let tag = |role, recency| Tag {
            role,
            modality: Modality::Text,
            recency,
        };
        assert_eq!(
            map.classes.get(&tag(Role::Assistant, Recency::Current)),
            Some(&KvClass::Int4)
        );
        for t in [
            tag(Role::Assistant, Recency::Older),
            tag(Role::Observation, Recency::Current),
            tag(Role::ToolCall, Recency::Current),
            tag(Role::System, Recency::Older),
        ] {
            assert_eq!(map.classes.get(&t), Some(&KvClass::Int2), "{t:?}");
        }
        assert_eq!(map.default, KvClass::Int2);
        assert_eq!((map.sinks, map.window), (p.cache.sinks, p.cache.window));
        // Sinks stay 16-bit whatever the tag.
        let tt = TokenTag {
            role: Role::Assistant,
            modality: Modality::Text,
            turn: 3,
            step: 3,
        };
        assert_eq!(map.class(0, &tt, (3, 3)), KvClass::F16);
        assert_eq!(map.class(100, &tt, (3, 3)), KvClass::Int4);
        assert_eq!(
            map.class(100, &tt, (5, 5)),
            KvClass::Int2,
            "two turns later"
        );
    }

    /// The triaxial profile's per-layer choices do not survive one class per tag (most of its
    /// INT4 keys are served at INT2) and the fit says so; a tag-only profile fits exactly,
    /// with the INT4 tags it chose.
    #[test]
    fn the_fit_counts_entries_served_at_other_bits() {
        let read = |name: &str| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
            crate::profile::Profile::read(&path).expect("shipped profile")
        };
        let tri = read("profiles/triaxial-2.97.json");
        let fit = ClassMap::from_profile(&tri).fit(&tri);
        assert_eq!(fit.entries, tri.assignments.len());
        let int4 = tri.assignments.iter().filter(|a| a.bits == 4).count();
        assert!(fit.lowered > 0 && fit.lowered <= int4, "{fit:?}");
        assert!(
            fit.raised > 0,
            "current assistant: INT2 layers served at INT4"
        );
        assert!(!fit.exact() && fit.to_string().contains("tag-only"));

        let tag_only = read("profiles/tag-only-2.97.json");
        let map = ClassMap::from_profile(&tag_only);
        let fit = map.fit(&tag_only);
        assert!(fit.exact(), "{fit}");
        assert!(map.classes.values().any(|&c| c == KvClass::Int4));
        assert!(map.classes.values().any(|&c| c == KvClass::Int2));

        // Made for 64-token key blocks: a pool grouping INT2 keys over 128 differs.
        assert_eq!(map.key_block_note(&tag_only, 64), None);
        let note = map.key_block_note(&tag_only, 128).expect("64 vs 128");
        assert!(
            note.contains("Int2 over 128") && !note.contains("Int4"),
            "{note}"
        );
        let mut p128 = tag_only.clone();
        p128.cache.block_tokens = 128;
        let note = map
            .key_block_note(&p128, 128)
            .expect("64-token INT4 blocks");
        assert!(
            note.contains("Int4 over 64") && !note.contains("Int2"),
            "{note}"
        );
        let f16 = ClassMap::uniform(KvClass::F16, 0, 0);
        assert_eq!(f16.key_block_note(&tag_only, 128), None);
    }

    #[test]
    fn a_16_bit_map_never_moves_tokens() {
        let mut pool = SlotPool::new(64);
        let mut seq = SeqBlocks::new();
        let map = ClassMap::uniform(KvClass::F16, 0, 0);
        let mut ops = Ops::default();
        seq.append(&mut pool, &vec![tag(Role::User, 1, 1); 300], &mut ops)
            .expect("room");
        seq.settle(&mut pool, &map, &ClassTokens::default(), false, &mut ops)
            .expect("room");
        seq.age(&mut pool, &map, &ClassTokens::default(), (3, 3), &mut ops)
            .expect("room");
        assert!(ops.moves.is_empty() && ops.quantize.is_empty());
        assert_eq!(seq.slots(), 19);
        assert!(!map.quantizes());
    }
}
