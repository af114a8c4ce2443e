//! The CPU reference mixed-precision KV cache: each token stored at its (layer, tag)
//! precision class, attention sinks and a residual window kept at 16 bits (IEEE f16).
//!
//! New tokens enter the 16-bit window; a token leaving it goes to a block of its class
//! (codes plus fp16 scale/zero). Per-channel key groups need a full block: until a block has
//! `block_tokens` tokens its keys stay f16 (KIVI's residual), counted as 16-bit. When the
//! current (turn, step) moves, tokens whose class changes are re-quantized from their
//! dequantized values. A dense f32 mirror of the dequantized values makes `attend` the exact
//! FullCache math; `bytes()` counts only what a real cache stores.

use super::full::causal_attention;
use super::{KvCache, KvShape};
use crate::quant::int::quantize_with;
use crate::quant::layout::{e4m3_decode, e4m3_encode, E4M3_MAX};
use crate::quant::outliers;
use crate::quant::{
    clipped_group_params, fwht, group_params, Bits, GroupParams, KeyMode, QuantError,
};
use crate::tags::{RecencyUnit, Tag, TokenTag};
use half::f16;
use std::collections::HashMap;

/// Attention sinks: the first tokens, always 16-bit (DESIGN §4).
pub const DEFAULT_SINKS: usize = 4;
/// The residual window of the most recent tokens, always 16-bit.
pub const DEFAULT_WINDOW: usize = 64;
/// Stored bits meaning "keep at 16 bits".
pub const KEEP: u8 = 16;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("bit width {0} is not one of 2, 4, 8 or 16")]
    BadBits(u8),
    #[error("layer {layer} is outside the model's {layers} layers")]
    BadLayer { layer: usize, layers: usize },
}

/// (K bits, V bits) of a token: its precision class. 16 = kept at 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrecisionClass {
    pub k: u8,
    pub v: u8,
}

impl PrecisionClass {
    pub const FULL: PrecisionClass = PrecisionClass { k: KEEP, v: KEEP };

    pub fn new(k: u8, v: u8) -> Result<Self, PolicyError> {
        for b in [k, v] {
            if ![2, 4, 8, KEEP].contains(&b) {
                return Err(PolicyError::BadBits(b));
            }
        }
        Ok(PrecisionClass { k, v })
    }
}

/// Per layer and resolved tag, the precision class; a default for tags not listed.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPolicy {
    layers: Vec<HashMap<Tag, PrecisionClass>>,
    pub default: PrecisionClass,
}

impl KvPolicy {
    /// Every tag of every layer at `default`.
    pub fn uniform(num_layers: usize, default: PrecisionClass) -> Self {
        KvPolicy {
            layers: vec![HashMap::new(); num_layers],
            default,
        }
    }

    pub fn set(
        &mut self,
        layer: usize,
        tag: Tag,
        class: PrecisionClass,
    ) -> Result<(), PolicyError> {
        let layers = self.layers.len();
        let map = self
            .layers
            .get_mut(layer)
            .ok_or(PolicyError::BadLayer { layer, layers })?;
        map.insert(tag, class);
        Ok(())
    }

    pub fn get(&self, layer: usize, tag: Tag) -> PrecisionClass {
        self.layers
            .get(layer)
            .and_then(|m| m.get(&tag))
            .copied()
            .unwrap_or(self.default)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Geometry and grouping of a [`QuantCache`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantCacheConfig {
    pub sinks: usize,
    pub window: usize,
    /// Tokens per block; also the per-channel key group.
    pub block_tokens: usize,
    pub key_mode: KeyMode,
    /// Head-dimension elements per key group (per-token key mode only).
    pub key_group: usize,
    pub value_group: usize,
    pub unit: RecencyUnit,
    /// Value groups' ranges by least squared error (`clipped_group_params`) rather than
    /// min/max: `eval --value-clip` only (the GPU quantizer and profiles use min/max).
    pub value_clip: bool,
    /// Per-channel keys wait for their block in FP8 (E4M3 at scale 1) instead of 16 bits, and
    /// values are quantized from their E4M3 rounding: what a GPU pool holding waiting tokens
    /// in FP8 blocks stores (`bench serve --wait fp8`, `paged::pool::HOLD_FP8_SCALE`).
    pub wait_fp8: bool,
    /// The sinks are held as the E4M3 rounding (scale 1) of their values once out of the
    /// window, at one byte per element: what a GPU pool keeping them in its FP8 waiting blocks
    /// stores (`bench serve --sinks-fp8`, `paged::pool::ClassTokens::fp8_sinks`).
    pub sinks_fp8: bool,
    /// Tokens of a quantized class hold the E4M3 rounding (scale 1) of their values while in
    /// the residual window too, at one byte per element (requires `wait_fp8`): what a GPU pool
    /// that keeps the window in its FP8 waiting blocks stores (`bench serve --window-fp8`,
    /// `paged::pool::ClassTokens::fp8_window`). Sinks follow `sinks_fp8`; 16-bit tags stay
    /// 16-bit.
    pub window_fp8: bool,
    /// Dense-and-sparse keys (`quant::outliers`): in each sealed per-channel key block and KV
    /// head, `outliers::per_group(key_outliers, ..)` elements, those whose removal narrows
    /// their channel's range most, keep an fp16 correction (4 bytes each with their index, as
    /// the packed layout stores them) and the rest are quantized over the narrowed range.
    pub key_outliers: f64,
    /// The key group's outliers are chosen over all its KV heads together (as many in all as
    /// per head times the heads; a head may take more than its share) instead of a fixed
    /// number per head: `eval --key-outliers-pooled`, an experiment (the packed layout keeps
    /// a fixed number per head).
    pub key_outliers_pooled: bool,
}

impl Default for QuantCacheConfig {
    fn default() -> Self {
        QuantCacheConfig {
            sinks: DEFAULT_SINKS,
            window: DEFAULT_WINDOW,
            block_tokens: 64,
            key_mode: KeyMode::PerChannel,
            key_group: 64,
            value_group: 64,
            unit: RecencyUnit::Turn,
            value_clip: false,
            wait_fp8: false,
            sinks_fp8: false,
            window_fp8: false,
            key_outliers: 0.0,
            key_outliers_pooled: false,
        }
    }
}

impl QuantCacheConfig {
    /// `self` with the FP8 holding asked for added to what it has (a `hold_fp8` profile's
    /// config has all three already): `wait_fp8`, `sinks_fp8`, `window_fp8`.
    pub fn with_fp8(self, wait: bool, sinks: bool, window: bool) -> Self {
        QuantCacheConfig {
            wait_fp8: self.wait_fp8 || wait,
            sinks_fp8: self.sinks_fp8 || sinks,
            window_fp8: self.window_fp8 || window,
            ..self
        }
    }
}

/// One side (K or V) of one token.
#[derive(Debug, Clone)]
enum Coded {
    Half(Vec<f16>),
    /// Codes `[kv_heads * head_dim]`, one per byte here (packed size is what `bytes` counts);
    /// per-token group parameters, or empty when the block's per-channel parameters apply.
    Int {
        codes: Vec<u8>,
        params: Vec<GroupParams>,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    pos: usize,
    k: Coded,
    v: Coded,
    /// Key elements a dense-and-sparse seal corrects: (channel, `δ = x - x̂`).
    k_out: Vec<(u16, f16)>,
}

#[derive(Debug, Clone)]
struct Block {
    class: PrecisionClass,
    entries: Vec<Entry>,
    /// Per-channel key parameters `[kv_heads * head_dim]` once the block is sealed.
    k_channel: Option<Vec<GroupParams>>,
}

/// Where a token lives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loc {
    /// 16-bit (sink, window, or a 16/16 class): values in `half`.
    Half,
    Block(usize),
}

#[derive(Debug, Clone, Default)]
struct Layer {
    tags: Vec<TokenTag>,
    loc: Vec<Loc>,
    /// 16-bit K and V per token at `Loc::Half` (empty otherwise).
    half: Vec<(Vec<f16>, Vec<f16>)>,
    /// Whether the token's `half` values are an E4M3 rounding held at one byte each
    /// (`window_fp8`).
    fp8: Vec<bool>,
    blocks: Vec<Option<Block>>,
    free: Vec<usize>,
    /// The block of each class still taking tokens.
    open: HashMap<PrecisionClass, usize>,
    /// Positions below this have left the residual window.
    settled: usize,
    now: (u32, u32),
    /// Dequantized K and V, `[len, kv_heads * head_dim]`.
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Mixed-precision KV cache (see the module comment). `Clone` forks a sequence (eval
/// generates a tool call on a copy so the teacher-forced replay goes on untouched).
#[derive(Debug, Clone)]
pub struct QuantCache {
    shape: KvShape,
    policy: KvPolicy,
    cfg: QuantCacheConfig,
    layers: Vec<Layer>,
    /// The first error met while quantizing (the `KvCache` trait cannot return one).
    error: Option<QuantError>,
    /// K/V roundings to FP8 (`wait_fp8`, `sinks_fp8`; a token re-placed after ageing is
    /// rounded again) and those beyond E4M3's ±448, clipped as the GPU's `cvt.rn.satfinite`
    /// clips them (scale 1).
    fp8_rounded: usize,
    fp8_clipped: usize,
}

/// `x` as an FP8 block holds it at scale 1 (E4M3, saturating), counting it and its clipping.
fn fp8_round(x: f32, rounded: &mut usize, clipped: &mut usize) -> f32 {
    *rounded += 1;
    *clipped += usize::from(x.abs() > E4M3_MAX);
    e4m3_decode(e4m3_encode(x))
}

/// Bytes held by a cache, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheBytes {
    /// Packed integer codes.
    pub packed: usize,
    /// fp16 scales and zeros.
    pub params: usize,
    /// 16-bit keys and values (sinks, window, staged keys, 16-bit classes); staged keys at
    /// one byte with `wait_fp8`.
    pub half: usize,
    /// K and V elements stored (tokens × layers × kv_heads × head_dim × 2).
    pub elements: usize,
}

impl CacheBytes {
    pub fn total(&self) -> usize {
        self.packed + self.params + self.half
    }

    /// Stored bits per K or V element, scales and 16-bit parts included.
    pub fn effective_bits(&self) -> f64 {
        if self.elements == 0 {
            return 0.0;
        }
        self.total() as f64 * 8.0 / self.elements as f64
    }
}

fn bits_of(b: u8) -> Result<Bits, QuantError> {
    Bits::from_u32(b as u32)
}

impl QuantCache {
    pub fn new(
        shape: KvShape,
        policy: KvPolicy,
        cfg: QuantCacheConfig,
    ) -> Result<Self, QuantError> {
        let hd = shape.head_dim;
        if policy.num_layers() != shape.num_layers {
            return Err(QuantError::Shape(format!(
                "policy has {} layers, the model {}",
                policy.num_layers(),
                shape.num_layers
            )));
        }
        let bad_group = |g: usize| g == 0 || hd % g != 0;
        if bad_group(cfg.value_group)
            || (matches!(cfg.key_mode, KeyMode::PerToken { .. }) && bad_group(cfg.key_group))
        {
            return Err(QuantError::BadGroup {
                group: cfg.value_group.min(cfg.key_group),
                len: hd,
            });
        }
        if cfg.block_tokens == 0 {
            return Err(QuantError::Shape("blocks of 0 tokens".into()));
        }
        if matches!(cfg.key_mode, KeyMode::PerToken { rotate: true }) && !hd.is_power_of_two() {
            return Err(QuantError::NotPowerOfTwo(hd));
        }
        if cfg.window_fp8 && !(cfg.wait_fp8 && cfg.key_mode == KeyMode::PerChannel) {
            return Err(QuantError::Shape(
                "an FP8 window needs per-channel keys waiting in FP8 (wait_fp8)".into(),
            ));
        }
        Ok(QuantCache {
            shape,
            policy,
            cfg,
            layers: vec![Layer::default(); shape.num_layers],
            error: None,
            fp8_rounded: 0,
            fp8_clipped: 0,
        })
    }

    pub fn config(&self) -> &QuantCacheConfig {
        &self.cfg
    }

    /// K/V roundings to FP8 so far (waiting keys and values, sinks) and how many were beyond
    /// ±448 and clipped: what a fixed FP8 scale of 1 costs on this model.
    pub fn fp8_clipping(&self) -> (usize, usize) {
        (self.fp8_rounded, self.fp8_clipped)
    }

    /// The first quantization error met (a non-finite or out-of-fp16-range value); tokens it
    /// concerned were kept at 16 bits.
    pub fn error(&self) -> Option<&QuantError> {
        self.error.as_ref()
    }

    fn row(&self) -> usize {
        self.shape.num_kv_heads * self.shape.head_dim
    }

    /// Set the turn and step being generated: recency is resolved against them, and tokens
    /// whose precision class changes are re-quantized from their current values. `append`
    /// advances them on its own when new tokens carry a later turn or step.
    pub fn set_now(&mut self, turn: u32, step: u32) {
        for l in 0..self.layers.len() {
            self.layers[l].now = (turn, step);
            self.reclassify(l);
        }
    }

    fn class_of(&self, l: usize, pos: usize) -> PrecisionClass {
        let layer = &self.layers[l];
        let (turn, step) = layer.now;
        self.policy
            .get(l, layer.tags[pos].at(self.cfg.unit, turn, step))
    }

    fn current_class(&self, l: usize, pos: usize) -> PrecisionClass {
        match self.layers[l].loc[pos] {
            Loc::Half => PrecisionClass::FULL,
            Loc::Block(b) => self.layers[l].blocks[b]
                .as_ref()
                .map_or(PrecisionClass::FULL, |blk| blk.class),
        }
    }

    fn reclassify(&mut self, l: usize) {
        let start = self.cfg.sinks;
        for pos in start..self.layers[l].settled {
            let want = self.class_of(l, pos);
            if want != self.current_class(l, pos) {
                self.remove(l, pos);
                self.place(l, pos, want);
            }
        }
    }

    /// Take `pos` out of its block (its values stay in the mirror).
    fn remove(&mut self, l: usize, pos: usize) {
        let layer = &mut self.layers[l];
        if let Loc::Block(b) = layer.loc[pos] {
            let mut empty = false;
            if let Some(blk) = layer.blocks[b].as_mut() {
                blk.entries.retain(|e| e.pos != pos);
                empty = blk.entries.is_empty();
            }
            if empty {
                let class = layer.blocks[b].as_ref().map(|blk| blk.class);
                layer.blocks[b] = None;
                layer.free.push(b);
                if let Some(c) = class {
                    if layer.open.get(&c) == Some(&b) {
                        layer.open.remove(&c);
                    }
                }
            }
        }
        layer.loc[pos] = Loc::Half;
        layer.half[pos] = (Vec::new(), Vec::new());
        layer.fp8[pos] = false;
    }

    /// Store `pos` (whose values are in the mirror) in `class`, quantizing from the mirror.
    fn place(&mut self, l: usize, pos: usize, class: PrecisionClass) {
        if let Err(e) = self.try_place(l, pos, class) {
            self.error.get_or_insert(e);
            self.store_half(l, pos);
        }
    }

    /// Sink `pos` out of the window with `sinks_fp8` (or a window token, `round_window_fp8`):
    /// its 16-bit values become their E4M3 rounding (exact in f16), as the GPU pool's FP8
    /// waiting blocks hold them.
    fn round_to_fp8(&mut self, l: usize, pos: usize) {
        let row = self.row();
        let layer = &mut self.layers[l];
        let (k, v) = &mut layer.half[pos];
        for (h, x) in k.iter_mut().chain(v.iter_mut()).zip(
            layer.k[pos * row..(pos + 1) * row]
                .iter_mut()
                .chain(layer.v[pos * row..(pos + 1) * row].iter_mut()),
        ) {
            *x = fp8_round(h.to_f32(), &mut self.fp8_rounded, &mut self.fp8_clipped);
            *h = f16::from_f32(*x);
        }
    }

    /// Window token `pos` with `window_fp8`: its 16-bit values become their E4M3 rounding (exact
    /// in f16), held at one byte per element, as the GPU pool's FP8 waiting blocks hold it.
    fn round_window_fp8(&mut self, l: usize, pos: usize) {
        if self.layers[l].fp8[pos] {
            return;
        }
        self.round_to_fp8(l, pos);
        self.layers[l].fp8[pos] = true;
    }

    fn store_half(&mut self, l: usize, pos: usize) {
        let row = self.row();
        let layer = &mut self.layers[l];
        let k: Vec<f16> = layer.k[pos * row..(pos + 1) * row]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let v: Vec<f16> = layer.v[pos * row..(pos + 1) * row]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        write_back(&mut layer.k[pos * row..(pos + 1) * row], &k);
        write_back(&mut layer.v[pos * row..(pos + 1) * row], &v);
        layer.half[pos] = (k, v);
        layer.loc[pos] = Loc::Half;
        layer.fp8[pos] = false;
    }

    fn try_place(&mut self, l: usize, pos: usize, class: PrecisionClass) -> Result<(), QuantError> {
        if class == PrecisionClass::FULL {
            self.store_half(l, pos);
            return Ok(());
        }
        let (row, hd) = (self.row(), self.shape.head_dim);
        let cfg = self.cfg;
        let per_channel = cfg.key_mode == KeyMode::PerChannel;
        let layer = &mut self.layers[l];
        let mut kx = layer.k[pos * row..(pos + 1) * row].to_vec();
        let mut vx = layer.v[pos * row..(pos + 1) * row].to_vec();
        if cfg.wait_fp8 && per_channel && class.k != KEEP {
            // The GPU pool's waiting FP8 block holds both; the group is quantized from it.
            for x in kx.iter_mut().chain(vx.iter_mut()) {
                *x = fp8_round(*x, &mut self.fp8_rounded, &mut self.fp8_clipped);
            }
        }
        let k = if class.k == KEEP || per_channel {
            // Per-channel keys wait at 16 bits until their block is full.
            Coded::Half(kx.iter().map(|&x| f16::from_f32(x)).collect())
        } else {
            let rotate = matches!(cfg.key_mode, KeyMode::PerToken { rotate: true });
            encode_tokens(&kx, hd, cfg.key_group, bits_of(class.k)?, rotate, false)?
        };
        let v = if class.v == KEEP {
            Coded::Half(vx.iter().map(|&x| f16::from_f32(x)).collect())
        } else {
            encode_tokens(
                &vx,
                hd,
                cfg.value_group,
                bits_of(class.v)?,
                false,
                cfg.value_clip,
            )?
        };
        let b = match layer.open.get(&class) {
            Some(&b) => b,
            None => {
                let blk = Block {
                    class,
                    entries: Vec::with_capacity(cfg.block_tokens),
                    k_channel: None,
                };
                let b = match layer.free.pop() {
                    Some(b) => {
                        layer.blocks[b] = Some(blk);
                        b
                    }
                    None => {
                        layer.blocks.push(Some(blk));
                        layer.blocks.len() - 1
                    }
                };
                layer.open.insert(class, b);
                b
            }
        };
        let full = {
            let blk = layer.blocks[b]
                .as_mut()
                .ok_or_else(|| QuantError::Layout(format!("open block {b} is missing")))?;
            blk.entries.push(Entry {
                pos,
                k,
                v,
                k_out: Vec::new(),
            });
            blk.entries.len() >= cfg.block_tokens
        };
        layer.loc[pos] = Loc::Block(b);
        layer.half[pos] = (Vec::new(), Vec::new());
        layer.fp8[pos] = false;
        if full {
            layer.open.remove(&class);
            if per_channel && class.k != KEEP {
                let bits = bits_of(class.k)?;
                seal_per_channel(layer, b, row, bits, hd, cfg)?;
            }
        }
        // The mirror now holds exactly what the store decodes to.
        let (kd, vd) = decode_entry(layer, b, pos, hd, cfg)?;
        layer.k[pos * row..(pos + 1) * row].copy_from_slice(&kd);
        layer.v[pos * row..(pos + 1) * row].copy_from_slice(&vd);
        Ok(())
    }

    /// Dequantize every token of `layer` from the store (not the mirror):
    /// `[len, kv_heads * head_dim]` keys and values.
    pub fn dequantize(&self, l: usize) -> Result<(Vec<f32>, Vec<f32>), QuantError> {
        let row = self.row();
        let layer = &self.layers[l];
        let len = layer.tags.len();
        let (mut k, mut v) = (vec![0.0; len * row], vec![0.0; len * row]);
        for pos in 0..len {
            let (kd, vd) = match layer.loc[pos] {
                Loc::Half => {
                    let (hk, hv) = &layer.half[pos];
                    (
                        hk.iter().map(|x| x.to_f32()).collect(),
                        hv.iter().map(|x| x.to_f32()).collect(),
                    )
                }
                Loc::Block(b) => decode_entry(layer, b, pos, self.shape.head_dim, self.cfg)?,
            };
            k[pos * row..(pos + 1) * row].copy_from_slice(&kd);
            v[pos * row..(pos + 1) * row].copy_from_slice(&vd);
        }
        Ok((k, v))
    }

    /// Bytes held: packed codes, fp16 scales/zeros, and 16-bit values.
    pub fn bytes(&self) -> CacheBytes {
        let row = self.row();
        let hd = self.shape.head_dim;
        let mut out = CacheBytes::default();
        for layer in &self.layers {
            out.elements += 2 * row * layer.tags.len();
            // Sinks out of the window at one byte with `sinks_fp8`.
            let fp8 = if self.cfg.sinks_fp8 {
                self.cfg.sinks.min(layer.settled)
            } else {
                0
            };
            out.half += layer
                .half
                .iter()
                .enumerate()
                .map(|(p, (k, v))| {
                    let bytes = if p < fp8 || layer.fp8[p] { 1 } else { 2 };
                    bytes * (k.len() + v.len())
                })
                .sum::<usize>();
            for blk in layer.blocks.iter().flatten() {
                if blk.k_channel.is_some() {
                    out.params += 4 * row;
                }
                for e in &blk.entries {
                    out.params += 4 * e.k_out.len();
                    for (c, bits) in [(&e.k, blk.class.k), (&e.v, blk.class.v)] {
                        match c {
                            // A staged key waits in FP8 with `wait_fp8`.
                            Coded::Half(x) if self.cfg.wait_fp8 && bits != KEEP => {
                                out.half += x.len()
                            }
                            Coded::Half(x) => out.half += 2 * x.len(),
                            Coded::Int { codes, params } => {
                                out.packed += (codes.len() * bits as usize).div_ceil(8);
                                out.params += 4 * params.len();
                            }
                        }
                    }
                }
            }
            let _ = hd;
        }
        out
    }

    /// Number of tokens of `layer` stored in each precision class (16/16 included).
    pub fn class_counts(&self, l: usize) -> HashMap<PrecisionClass, usize> {
        let mut out = HashMap::new();
        for pos in 0..self.layers[l].tags.len() {
            *out.entry(self.current_class(l, pos)).or_insert(0) += 1;
        }
        out
    }
}

fn write_back(dst: &mut [f32], src: &[f16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Quantize one token's `[kv_heads * head_dim]` row in groups of `group` along each head
/// (after a per-head Hadamard rotation when asked).
fn encode_tokens(
    x: &[f32],
    hd: usize,
    group: usize,
    bits: Bits,
    rotate: bool,
    clip: bool,
) -> Result<Coded, QuantError> {
    let mut y = x.to_vec();
    if rotate {
        y.chunks_mut(hd).try_for_each(fwht)?;
    }
    let mut codes = vec![0u8; y.len()];
    let mut params = Vec::with_capacity(y.len() / group);
    for (chunk, out) in y.chunks(group).zip(codes.chunks_mut(group)) {
        let p = if clip {
            clipped_group_params(chunk, bits)?
        } else {
            group_params(chunk, bits)?
        };
        for (c, &v) in out.iter_mut().zip(chunk) {
            *c = quantize_with(v, p, bits);
        }
        params.push(p);
    }
    Ok(Coded::Int { codes, params })
}

/// Quantize a full block's staged 16-bit keys per channel (one scale/zero per channel),
/// correcting some of its elements (`QuantCacheConfig::key_outliers`).
fn seal_per_channel(
    layer: &mut Layer,
    b: usize,
    row: usize,
    bits: Bits,
    head_dim: usize,
    cfg: QuantCacheConfig,
) -> Result<(), QuantError> {
    let Some(blk) = layer.blocks[b].as_mut() else {
        return Ok(());
    };
    let rows = blk.entries.len();
    let cols: Vec<Vec<f32>> = (0..row)
        .map(|c| {
            blk.entries
                .iter()
                .map(|e| match &e.k {
                    Coded::Half(h) => h[c].to_f32(),
                    Coded::Int { .. } => 0.0,
                })
                .collect()
        })
        .collect();
    // The packed layout keeps a fixed number per key group and KV head.
    let n = outliers::per_group(cfg.key_outliers, rows, head_dim);
    let kept = if cfg.key_outliers_pooled {
        outliers::choose(&cols, n * (row / head_dim.max(1)))
    } else {
        let mut kept = Vec::with_capacity(row);
        for head in cols.chunks(head_dim.max(1)) {
            kept.extend(outliers::choose(head, n));
        }
        kept
    };
    let mut params = Vec::with_capacity(row);
    let mut codes = vec![vec![0u8; row]; rows];
    for (c, col) in cols.iter().enumerate() {
        let p = group_params(&outliers::inliers(col, &kept[c]), bits)?;
        for (r, &x) in col.iter().enumerate() {
            codes[r][c] = quantize_with(x, p, bits);
        }
        params.push(p);
    }
    for (r, (e, c)) in blk.entries.iter_mut().zip(codes).enumerate() {
        e.k_out = (0..row)
            .filter(|&ch| kept[ch].contains(&r))
            .map(|ch| {
                let x = cols[ch][r];
                (ch as u16, f16::from_f32(x - params[ch].dequantize(c[ch])))
            })
            .collect();
        e.k = Coded::Int {
            codes: c,
            params: Vec::new(),
        };
    }
    blk.k_channel = Some(params);
    // Re-decode every key of the block into the mirror.
    let positions: Vec<usize> = blk.entries.iter().map(|e| e.pos).collect();
    for pos in positions {
        let (kd, _) = decode_entry(layer, b, pos, 0, QuantCacheConfig::default())?;
        layer.k[pos * row..(pos + 1) * row].copy_from_slice(&kd);
    }
    Ok(())
}

fn decode(c: &Coded, channel: Option<&[GroupParams]>, hd: usize, rotate: bool) -> Vec<f32> {
    match c {
        Coded::Half(h) => h.iter().map(|x| x.to_f32()).collect(),
        Coded::Int { codes, params } if params.is_empty() => {
            let ch = channel.unwrap_or(&[]);
            codes
                .iter()
                .enumerate()
                .map(|(i, &q)| ch.get(i).map_or(0.0, |p| p.dequantize(q)))
                .collect()
        }
        Coded::Int { codes, params } => {
            let group = codes.len() / params.len();
            let mut y: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &q)| params[i / group].dequantize(q))
                .collect();
            if rotate {
                // hd was checked to be a power of two at construction.
                for h in y.chunks_mut(hd) {
                    let _ = fwht(h);
                }
            }
            y
        }
    }
}

fn decode_entry(
    layer: &Layer,
    b: usize,
    pos: usize,
    hd: usize,
    cfg: QuantCacheConfig,
) -> Result<(Vec<f32>, Vec<f32>), QuantError> {
    let blk = layer.blocks[b]
        .as_ref()
        .ok_or_else(|| QuantError::Layout(format!("block {b} is missing")))?;
    let e = blk
        .entries
        .iter()
        .find(|e| e.pos == pos)
        .ok_or_else(|| QuantError::Layout(format!("token {pos} is not in block {b}")))?;
    let rotate = matches!(cfg.key_mode, KeyMode::PerToken { rotate: true });
    let mut k = decode(&e.k, blk.k_channel.as_deref(), hd, rotate);
    for &(c, d) in &e.k_out {
        k[c as usize] += d.to_f32();
    }
    let v = decode(&e.v, None, hd, false);
    Ok((k, v))
}

impl KvCache for QuantCache {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self, layer: usize) -> usize {
        self.layers[layer].tags.len()
    }

    fn append(&mut self, l: usize, k: &[f32], v: &[f32], tags: &[TokenTag]) {
        let row = self.row();
        assert_eq!(k.len(), tags.len() * row, "append: k has the wrong length");
        assert_eq!(v.len(), tags.len() * row, "append: v has the wrong length");
        {
            let layer = &mut self.layers[l];
            for (i, t) in tags.iter().enumerate() {
                let kh: Vec<f16> = k[i * row..(i + 1) * row]
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
                let vh: Vec<f16> = v[i * row..(i + 1) * row]
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
                layer.k.extend(kh.iter().map(|x| x.to_f32()));
                layer.v.extend(vh.iter().map(|x| x.to_f32()));
                layer.half.push((kh, vh));
                layer.fp8.push(false);
                layer.loc.push(Loc::Half);
                layer.tags.push(*t);
            }
        }
        let (turn, step) = self.layers[l].now;
        let nt = tags.iter().map(|t| t.turn).max().unwrap_or(0).max(turn);
        let ns = tags.iter().map(|t| t.step).max().unwrap_or(0).max(step);
        if (nt, ns) != (turn, step) {
            self.layers[l].now = (nt, ns);
            self.reclassify(l);
        }
        // Tokens that left the residual window go to their class.
        let len = self.layers[l].tags.len();
        if self.cfg.window_fp8 {
            let first = self.layers[l].settled.max(self.cfg.sinks);
            for pos in first..len {
                if self.class_of(l, pos).k != KEEP {
                    self.round_window_fp8(l, pos);
                }
            }
        }
        let end = len.saturating_sub(self.cfg.window);
        let settled = self.layers[l].settled;
        for pos in settled.max(self.cfg.sinks)..end {
            let class = self.class_of(l, pos);
            self.place(l, pos, class);
        }
        if self.cfg.sinks_fp8 {
            for pos in settled.min(self.cfg.sinks)..end.min(self.cfg.sinks) {
                self.round_to_fp8(l, pos);
            }
        }
        self.layers[l].settled = settled.max(end);
    }

    fn attend(&self, l: usize, q: &[f32], out: &mut [f32]) {
        let layer = &self.layers[l];
        causal_attention(self.shape, &layer.k, &layer.v, q, out);
    }

    fn truncate(&mut self, len: usize) {
        let row = self.row();
        for l in 0..self.layers.len() {
            let n = self.layers[l].tags.len();
            for pos in (len..n).rev() {
                self.remove(l, pos);
            }
            let layer = &mut self.layers[l];
            layer.tags.truncate(len);
            layer.loc.truncate(len);
            layer.half.truncate(len);
            layer.fp8.truncate(len);
            layer.k.truncate(len * row);
            layer.v.truncate(len * row);
            layer.settled = layer.settled.min(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::FullCache;
    use crate::tags::{Modality, Recency, Role};
    use rand::{Rng, SeedableRng};

    fn shape() -> KvShape {
        KvShape {
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
        }
    }

    fn tags(n: usize) -> Vec<TokenTag> {
        (0..n)
            .map(|p| TokenTag {
                role: [Role::System, Role::User, Role::Observation, Role::Assistant][(p / 9) % 4],
                modality: Modality::Text,
                turn: (p / 40) as u32,
                step: (p / 25) as u32,
            })
            .collect()
    }

    fn mixed_policy(layers: usize) -> KvPolicy {
        let mut p = KvPolicy::uniform(layers, PrecisionClass::new(4, 4).unwrap());
        for r in Recency::ALL {
            let tag = |role| Tag {
                recency: r,
                modality: Modality::Text,
                role,
            };
            p.set(
                0,
                tag(Role::Observation),
                PrecisionClass::new(2, 2).unwrap(),
            )
            .unwrap();
            p.set(1, tag(Role::System), PrecisionClass::new(16, 2).unwrap())
                .unwrap();
            p.set(1, tag(Role::User), PrecisionClass::new(8, 16).unwrap())
                .unwrap();
        }
        p.set(
            0,
            Tag {
                recency: Recency::Older,
                modality: Modality::Text,
                role: Role::Assistant,
            },
            PrecisionClass::FULL,
        )
        .unwrap();
        p
    }

    fn fill(cache: &mut dyn KvCache, n: usize, chunk: usize, seed: u64) -> Vec<f32> {
        let s = cache.shape();
        let row = s.num_kv_heads * s.head_dim;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = tags(n);
        let mut last_q = Vec::new();
        let mut done = 0;
        while done < n {
            let m = chunk.min(n - done);
            for l in 0..s.num_layers {
                let k: Vec<f32> = (0..m * row)
                    .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                    .collect();
                let v: Vec<f32> = (0..m * row)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                cache.append(l, &k, &v, &t[done..done + m]);
            }
            last_q = (0..m * s.num_heads * s.head_dim)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect();
            done += m;
        }
        last_q
    }

    /// With `wait_fp8`, keys waiting for their block are the E4M3 rounding of what came in
    /// (16-bit without); a sealed block quantizes from those.
    #[test]
    fn waiting_keys_hold_their_fp8_rounding() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let policy = KvPolicy::uniform(s.num_layers, PrecisionClass::new(2, 2).unwrap());
        let k: Vec<f32> = (0..8 * row)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let v: Vec<f32> = (0..8 * row).map(|i| (i as f32 * 0.11).cos()).collect();
        for wait_fp8 in [false, true] {
            let cfg = QuantCacheConfig {
                sinks: 0,
                window: 0,
                block_tokens: 16,
                wait_fp8,
                ..QuantCacheConfig::default()
            };
            let mut c = QuantCache::new(s, policy.clone(), cfg).unwrap();
            c.append(0, &k, &v, &tags(8));
            let (kd, _) = c.dequantize(0).unwrap();
            for (&got, &x) in kd.iter().zip(&k) {
                // Tokens come in at 16 bits (the window; the GPU's stream blocks).
                let x16 = f16::from_f32(x).to_f32();
                let want = if wait_fp8 {
                    e4m3_decode(e4m3_encode(x16))
                } else {
                    x16
                };
                assert_eq!(got, want, "wait_fp8 {wait_fp8}: x {x}");
            }
        }
    }

    /// With `sinks_fp8` the sinks keep 16 bits while in the window and hold their E4M3
    /// rounding, at one byte per element, once out of it; the other tokens are untouched.
    #[test]
    fn sinks_hold_their_fp8_rounding_out_of_the_window() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let policy = KvPolicy::uniform(s.num_layers, PrecisionClass::FULL);
        let k: Vec<f32> = (0..10 * row)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let v: Vec<f32> = (0..10 * row).map(|i| (i as f32 * 0.11).cos()).collect();
        let cfg = QuantCacheConfig {
            sinks: 4,
            window: 3,
            sinks_fp8: true,
            ..QuantCacheConfig::default()
        };
        let mut c = QuantCache::new(s, policy, cfg).unwrap();
        let x16 = |x: f32| f16::from_f32(x).to_f32();
        let fp8 = |x: f32| e4m3_decode(e4m3_encode(x16(x)));
        // 5 tokens, window 3: sinks 0 and 1 are out of it.
        c.append(0, &k[..5 * row], &v[..5 * row], &tags(5));
        let (kd, vd) = c.dequantize(0).unwrap();
        for i in 0..5 * row {
            let want = |x: f32| if i < 2 * row { fp8(x) } else { x16(x) };
            assert_eq!((kd[i], vd[i]), (want(k[i]), want(v[i])), "element {i}");
        }
        assert_eq!(c.bytes().half, 2 * row * (2 + 2 * 3));
        // 5 more: every sink is out, tokens 4.. stay 16-bit (the policy is 16-bit).
        c.append(0, &k[5 * row..], &v[5 * row..], &tags(5));
        let (kd, vd) = c.dequantize(0).unwrap();
        for i in 0..10 * row {
            let want = |x: f32| if i < 4 * row { fp8(x) } else { x16(x) };
            assert_eq!((kd[i], vd[i]), (want(k[i]), want(v[i])), "element {i}");
        }
        assert_eq!(c.bytes().half, 2 * row * (4 + 2 * 6));
        assert!(
            (0..4 * row).any(|i| fp8(k[i]) != x16(k[i])),
            "the test values are not all FP8-exact"
        );
    }

    /// With `window_fp8` a window token of a quantized class holds its E4M3 rounding at one
    /// byte per element; a 16-bit tag's stays 16-bit; without `wait_fp8` it is refused.
    #[test]
    fn window_tokens_of_quantized_classes_hold_their_fp8_rounding() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let mut policy = KvPolicy::uniform(s.num_layers, PrecisionClass::new(2, 2).unwrap());
        for r in Recency::ALL {
            let system = Tag {
                recency: r,
                modality: Modality::Text,
                role: Role::System,
            };
            policy.set(0, system, PrecisionClass::FULL).unwrap();
        }
        let k: Vec<f32> = (0..12 * row)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let v: Vec<f32> = (0..12 * row).map(|i| (i as f32 * 0.11).cos()).collect();
        let cfg = QuantCacheConfig {
            sinks: 0,
            window: 16,
            wait_fp8: true,
            window_fp8: true,
            ..QuantCacheConfig::default()
        };
        let mut c = QuantCache::new(s, policy.clone(), cfg).unwrap();
        // Positions 0..9 are system tokens (16-bit), 9..12 user tokens (INT2): all in the window.
        c.append(0, &k, &v, &tags(12));
        let x16 = |x: f32| f16::from_f32(x).to_f32();
        let fp8 = |x: f32| e4m3_decode(e4m3_encode(x16(x)));
        let (kd, vd) = c.dequantize(0).unwrap();
        for i in 0..12 * row {
            let want = |x: f32| if i < 9 * row { x16(x) } else { fp8(x) };
            assert_eq!((kd[i], vd[i]), (want(k[i]), want(v[i])), "element {i}");
        }
        assert_eq!(c.bytes().half, 2 * row * (2 * 9 + 3));
        assert!(
            (9 * row..12 * row).any(|i| fp8(k[i]) != x16(k[i])),
            "the test values are not all FP8-exact"
        );
        let plain = QuantCacheConfig {
            window_fp8: false,
            ..cfg
        };
        let mut p = QuantCache::new(s, policy.clone(), plain).unwrap();
        p.append(0, &k, &v, &tags(12));
        assert_eq!(p.bytes().half, 2 * row * 2 * 12);
        let no_wait = QuantCacheConfig {
            wait_fp8: false,
            ..cfg
        };
        assert!(QuantCache::new(s, policy, no_wait).is_err());
    }

    /// FP8 at scale 1 clips beyond ±448, as the GPU's saturating conversion does; the cache
    /// counts its FP8 roundings and the clipped ones.
    #[test]
    fn fp8_roundings_count_the_clipped_values() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let policy = KvPolicy::uniform(s.num_layers, PrecisionClass::FULL);
        let cfg = QuantCacheConfig {
            sinks: 2,
            window: 0,
            sinks_fp8: true,
            ..QuantCacheConfig::default()
        };
        let mut c = QuantCache::new(s, policy, cfg).unwrap();
        let mut k = vec![1.0f32; 3 * row];
        k[1] = 1000.0;
        k[row + 2] = -500.0;
        k[2 * row] = 9000.0; // not a sink: stays 16-bit
        let v = vec![0.5f32; 3 * row];
        c.append(0, &k, &v, &tags(3));
        assert_eq!(c.fp8_clipping(), (2 * 2 * row, 2));
        let (kd, _) = c.dequantize(0).unwrap();
        assert_eq!((kd[1], kd[row + 2], kd[2 * row]), (448.0, -448.0, 9000.0));
    }

    /// `value_clip` changes only the values, and on bell-shaped values lowers their INT2
    /// reconstruction error.
    #[test]
    fn value_clip_lowers_int2_value_error_and_leaves_keys() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let n = 300;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut bell =
            |amp: f32| -> f32 { (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * amp };
        let k: Vec<f32> = (0..n * row).map(|_| bell(2.0)).collect();
        let v: Vec<f32> = (0..n * row).map(|_| bell(1.0)).collect();
        let t = tags(n);
        let policy = KvPolicy::uniform(s.num_layers, PrecisionClass::new(2, 2).unwrap());
        let run = |clip: bool| {
            let cfg = QuantCacheConfig {
                value_clip: clip,
                ..QuantCacheConfig::default()
            };
            let mut c = QuantCache::new(s, policy.clone(), cfg).unwrap();
            for l in 0..s.num_layers {
                c.append(l, &k, &v, &t);
            }
            assert!(c.error().is_none());
            c.dequantize(0).unwrap()
        };
        let ((k0, v0), (k1, v1)) = (run(false), run(true));
        assert_eq!(k0, k1, "keys do not change");
        let err = |x: &[f32]| -> f64 {
            x.iter()
                .zip(&v)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        assert!(err(&v1) < 0.9 * err(&v0), "{} vs {}", err(&v1), err(&v0));
    }

    /// Dense-and-sparse keys: a few extreme key elements kept out of the quantization leave
    /// the other elements of their channels a narrower range (lower INT2 key error), decode
    /// to within their correction's fp16 rounding, and are counted at 4 bytes each; values do
    /// not change.
    #[test]
    fn key_outliers_narrow_their_channels_and_are_corrected() {
        let s = shape();
        let row = s.num_kv_heads * s.head_dim;
        let n = 300;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut k: Vec<f32> = (0..n * row).map(|_| rng.random::<f32>() - 0.5).collect();
        let v: Vec<f32> = (0..n * row).map(|_| rng.random::<f32>() - 0.5).collect();
        // One spike per channel and 64 consecutive tokens.
        for (i, x) in k.iter_mut().enumerate() {
            if (i / row) % 64 == (i % row) % 64 {
                *x = 12.0;
            }
        }
        let t = tags(n);
        let policy = KvPolicy::uniform(s.num_layers, PrecisionClass::new(2, 2).unwrap());
        let run = |outliers: f64| {
            let cfg = QuantCacheConfig {
                key_outliers: outliers,
                ..QuantCacheConfig::default()
            };
            let mut c = QuantCache::new(s, policy.clone(), cfg).unwrap();
            c.append(0, &k, &v, &t);
            assert!(c.error().is_none());
            let (kd, vd) = c.dequantize(0).unwrap();
            (kd, vd, c.bytes())
        };
        let ((k0, v0, b0), (k1, v1, b1)) = (run(0.0), run(1.0 / 64.0));
        assert_eq!(v0, v1, "values do not change");
        let err = |x: &[f32]| -> f64 {
            x.iter()
                .zip(&k)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        assert!(err(&k1) < 0.1 * err(&k0), "{} vs {}", err(&k1), err(&k0));
        // Spikes in sealed blocks are corrected to within the fp16 rounding of their δ; the
        // others are 16-bit (sinks, window, staged).
        for (i, (&a, &b)) in k1.iter().zip(&k).enumerate() {
            if b == 12.0 {
                assert!((a - 12.0).abs() < 8e-3, "spike {i} decodes to {a}");
            }
        }
        // 300 tokens, 4 sinks, a 64-token window: 3 sealed blocks of 64, one kept element
        // per channel each.
        let sealed = (n - DEFAULT_SINKS - DEFAULT_WINDOW) / 64;
        assert_eq!(b1.params - b0.params, 4 * sealed * row);
        assert_eq!((b1.packed, b1.half), (b0.packed, b0.half));
    }

    /// The CPU cache and the packed block (what the GPU pool stores) keep the same key
    /// outliers and decode a sealed block's keys to the same bits.
    #[test]
    fn key_outliers_match_the_packed_block() {
        use crate::quant::{BlockGeometry, KvClass, QuantizedBlock};
        let s = KvShape {
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 64,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut k: Vec<f32> = (0..64 * 64).map(|_| rng.random::<f32>() - 0.5).collect();
        let v: Vec<f32> = (0..64 * 64).map(|_| rng.random::<f32>() - 0.5).collect();
        for i in (0..k.len()).step_by(97) {
            k[i] *= 20.0;
        }
        // The cache stages keys at 16 bits before sealing them.
        let k16: Vec<f32> = k.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let cfg = QuantCacheConfig {
            sinks: 0,
            window: 0,
            key_outliers: 0.005,
            ..QuantCacheConfig::default()
        };
        let policy = KvPolicy::uniform(1, PrecisionClass::new(2, 2).unwrap());
        let mut c = QuantCache::new(s, policy, cfg).unwrap();
        c.append(0, &k, &v, &tags(64));
        assert!(c.error().is_none());
        let n = outliers::per_group(0.005, 64, 64);
        assert_eq!(n, 21);
        let g = BlockGeometry::new(KvClass::Int2, 64, 64, 64)
            .unwrap()
            .with_k_outliers(n)
            .unwrap();
        let b = QuantizedBlock::quantize(g, &k16, &v).unwrap();
        assert_eq!(c.dequantize(0).unwrap().0, b.dequantize().0);
        // K scale+zero per channel, V scale+zero per token (one group), 4 bytes per outlier.
        assert_eq!(c.bytes().params, 4 * 64 + 4 * 64 + 4 * n);
    }

    #[test]
    fn attend_equals_dequantize_then_attend() {
        for mode in [
            KeyMode::PerChannel,
            KeyMode::PerToken { rotate: true },
            KeyMode::PerToken { rotate: false },
        ] {
            let cfg = QuantCacheConfig {
                window: 16,
                block_tokens: 16,
                key_mode: mode,
                key_group: 32,
                ..QuantCacheConfig::default()
            };
            let mut c = QuantCache::new(shape(), mixed_policy(2), cfg).unwrap();
            let q = fill(&mut c, 200, 37, 1);
            // Move generation on so recency re-buckets (and re-quantizes) older tokens.
            c.set_now(9, 12);
            assert!(c.error().is_none());
            for l in 0..2 {
                let (k, v) = c.dequantize(l).unwrap();
                let mut want = vec![0.0; q.len()];
                causal_attention(shape(), &k, &v, &q, &mut want);
                let mut got = vec![0.0; q.len()];
                c.attend(l, &q, &mut got);
                assert_eq!(got, want, "{mode:?} layer {l}");
                let counts = c.class_counts(l);
                assert!(counts.len() >= 3, "layer {l}: classes {counts:?}");
            }
        }
    }

    #[test]
    fn all_16_bit_policy_matches_full_cache_within_f16() {
        let mut c = QuantCache::new(
            shape(),
            KvPolicy::uniform(2, PrecisionClass::FULL),
            QuantCacheConfig::default(),
        )
        .unwrap();
        let mut f = FullCache::new(shape());
        let q = fill(&mut c, 150, 50, 4);
        fill(&mut f, 150, 50, 4);
        for l in 0..2 {
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            c.attend(l, &q, &mut a);
            f.attend(l, &q, &mut b);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-3, "layer {l}: {worst}");
            assert!(worst > 0.0, "f16 storage should round something");
        }
        let bytes = c.bytes();
        assert_eq!(bytes.half, 2 * 150 * 2 * 2 * 64 * 2);
        assert_eq!((bytes.packed, bytes.params), (0, 0));
        assert_eq!(bytes.effective_bits(), 16.0);
    }

    #[test]
    fn bytes_account_codes_scales_and_window() {
        let s = KvShape {
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
        };
        let cfg = QuantCacheConfig {
            sinks: 4,
            window: 8,
            block_tokens: 16,
            key_mode: KeyMode::PerChannel,
            key_group: 64,
            value_group: 32,
            unit: RecencyUnit::Turn,
            value_clip: false,
            wait_fp8: false,
            sinks_fp8: false,
            window_fp8: false,
            key_outliers: 0.0,
            key_outliers_pooled: false,
        };
        let mut c = QuantCache::new(
            s,
            KvPolicy::uniform(1, PrecisionClass::new(2, 4).unwrap()),
            cfg,
        )
        .unwrap();
        let one = vec![
            TokenTag {
                role: Role::User,
                modality: Modality::Text,
                turn: 1,
                step: 0,
            };
            44
        ];
        let k: Vec<f32> = (0..44 * 64).map(|i| (i % 7) as f32 * 0.1).collect();
        c.append(0, &k, &k, &one);
        // 44 tokens: 4 sinks + 8 window at 16 bits; 32 out: two sealed blocks of 16.
        let b = c.bytes();
        assert_eq!(b.half, (4 + 8) * 64 * 2 * 2);
        assert_eq!(b.packed, 32 * 64 * 2 / 8 + 32 * 64 * 4 / 8);
        assert_eq!(b.params, 2 * 64 * 4 + 32 * 2 * 4);
        assert_eq!(b.elements, 44 * 64 * 2);
        // Two more tokens: the third block is open, so its two keys wait at 16 bits.
        c.append(0, &k[..128], &k[..128], &one[..2]);
        let b2 = c.bytes();
        assert_eq!(b2.half, b.half + 2 * 64 * 2);
        assert_eq!(b2.packed, b.packed + 2 * 64 * 4 / 8);
        // Rewinding keeps what was already quantized: 4 sinks at 16 bits, 6 tokens in block 0.
        c.truncate(10);
        assert_eq!(c.len(0), 10);
        let b3 = c.bytes();
        assert_eq!(b3.half, 4 * 64 * 2 * 2);
        assert_eq!(b3.packed, 6 * 64 * 2 / 8 + 6 * 64 * 4 / 8);
        assert!(b3.effective_bits() < 16.0);
    }

    #[test]
    fn bad_policy_bits_are_rejected() {
        assert!(PrecisionClass::new(3, 4).is_err());
        let mut p = KvPolicy::uniform(1, PrecisionClass::FULL);
        let tag = Tag {
            recency: Recency::Current,
            modality: Modality::Text,
            role: Role::User,
        };
        assert!(p.set(3, tag, PrecisionClass::FULL).is_err());
    }
}
