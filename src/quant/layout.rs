//! The packed KV block: T tokens of one KV head and one precision class in a fixed number
//! of bytes, ordered so the GPU decode kernel's 16-byte loads land in `mma` operand order.
//!
//! Full description with a worked example: `docs/KV_LAYOUT.md`. In short, a block's bytes
//! are `[K codes][V codes][K scale][K zero][V scale][V zero]`, each area 16-byte aligned.
//! FP8 (E4M3) blocks are `[K codes][V codes][K scale f32][V scale f32]`: one scale per block
//! and KV head for all of K and one for all of V.
//! Codes are grouped in tiles (8 tokens of K at 16 bits and INT4, 16 tokens otherwise); a
//! tile is split among the 32 lanes of a warp exactly as the `mma.m16n8k16` fragments
//! need them, and lane `L`'s `j`-th 32-bit word sits at
//! `(j / R) * 128 * R + L * 4 * R + (j % R) * 4` with `R = min(words per lane, 4)`, so
//! each warp-wide load reads `512` contiguous bytes (`R = 4`).

use super::int::{group_params, quantize_with, Bits, GroupParams};
use super::outliers;
use super::QuantError;
use half::f16;

/// Precision class of a block. Every token of a block has the same class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvClass {
    /// 16-bit keys and values (attention sinks, the residual window, 16-bit tags).
    F16,
    Int4,
    Int2,
    /// FP8 E4M3 codes with one fp32 scale per block for K and one for V (`amax / 448`).
    Fp8,
}

impl KvClass {
    /// In the kernel's class order (`CLASS_F16, CLASS_INT4, CLASS_INT2, CLASS_FP8`).
    pub const ALL: [KvClass; 4] = [KvClass::F16, KvClass::Int4, KvClass::Int2, KvClass::Fp8];

    /// Stored bits per code.
    pub fn bits(self) -> u32 {
        match self {
            KvClass::F16 => 16,
            KvClass::Int4 => 4,
            KvClass::Int2 => 2,
            KvClass::Fp8 => 8,
        }
    }

    fn int_bits(self) -> Option<Bits> {
        match self {
            KvClass::F16 | KvClass::Fp8 => None,
            KvClass::Int4 => Some(Bits::B4),
            KvClass::Int2 => Some(Bits::B2),
        }
    }

    /// Tokens per K tile: one `n8` tile of the `q·kᵀ` mma, or two for INT2 and FP8 (whose
    /// lane words cover two tokens).
    fn k_tile_tokens(self) -> usize {
        match self {
            KvClass::Int2 | KvClass::Fp8 => 16,
            _ => 8,
        }
    }
}

/// Geometry of one block of one KV head: class, token capacity, head dimension and the
/// per-token value group. Everything else (offsets, bytes) is derived here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockGeometry {
    pub class: KvClass,
    pub tokens: usize,
    pub head_dim: usize,
    /// Head-dimension elements per value scale/zero (ignored for `F16`).
    pub v_group: usize,
    /// Tokens per per-channel key scale/zero (INT4 and INT2; `tokens` unless set with
    /// `with_k_group`). The GPU kernels read one key group per block only.
    pub k_group: usize,
    /// Entries per key group of the key-outlier area (INT4 and INT2; 0 = none, the layout
    /// byte for byte without it): `docs/KV_LAYOUT.md`, "Key outliers". Only its bytes are
    /// built: `QuantizedBlock` leaves it zero (no outliers) and the kernels do not read it.
    pub k_outliers: usize,
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Byte offset of lane `lane`'s word `j` in a tile where each lane owns `nw` words.
fn lane_word_offset(lane: usize, j: usize, nw: usize) -> usize {
    let r = nw.min(4);
    (j / r) * 128 * r + lane * 4 * r + (j % r) * 4
}

impl BlockGeometry {
    pub fn new(
        class: KvClass,
        tokens: usize,
        head_dim: usize,
        v_group: usize,
    ) -> Result<Self, QuantError> {
        let err = |m: String| Err(QuantError::Layout(m));
        if head_dim == 0 || head_dim % 64 != 0 {
            return err(format!(
                "head_dim {head_dim} must be a positive multiple of 64"
            ));
        }
        if tokens == 0 || tokens % 16 != 0 {
            return err(format!(
                "block of {tokens} tokens: must be a positive multiple of 16"
            ));
        }
        if class.int_bits().is_some()
            && (v_group < 16 || head_dim % v_group != 0 || v_group % 16 != 0)
        {
            return err(format!(
                "value group {v_group} must be a multiple of 16 that divides head_dim {head_dim}"
            ));
        }
        Ok(BlockGeometry {
            class,
            tokens,
            head_dim,
            v_group,
            k_group: tokens,
            k_outliers: 0,
        })
    }

    /// The same block with an area of `n` key-outlier entries (4 bytes each) per key group
    /// after the V zeros (INT4 and INT2 only; 0 removes it).
    pub fn with_k_outliers(self, n: usize) -> Result<Self, QuantError> {
        if n > 0 && self.class.int_bits().is_none() {
            return Err(QuantError::Layout(format!(
                "key outliers in a {:?} block: INT4 and INT2 only",
                self.class
            )));
        }
        Ok(BlockGeometry {
            k_outliers: n,
            ..self
        })
    }

    /// Start of the key-outlier area (group `g`'s entries at `+ 4 * k_outliers * g`).
    pub fn k_outlier_offset(&self) -> usize {
        align16(self.v_zero_offset() + 2 * self.tokens * self.v_groups())
    }

    /// The same block with keys quantized per channel over groups of `k_group` tokens (a
    /// multiple of 16 dividing `tokens`; INT4 and INT2 only): finer key scales for
    /// `tokens / k_group` times the key scale bytes.
    pub fn with_k_group(self, k_group: usize) -> Result<Self, QuantError> {
        if k_group == self.tokens {
            return Ok(self);
        }
        if self.class.int_bits().is_none()
            || k_group == 0
            || k_group % 16 != 0
            || self.tokens % k_group != 0
        {
            return Err(QuantError::Layout(format!(
                "key group of {k_group} tokens in a {:?} block of {}: must be a multiple of 16 \
                 dividing the block (INT4 and INT2 only)",
                self.class, self.tokens
            )));
        }
        Ok(BlockGeometry { k_group, ..self })
    }

    /// Per-channel key groups in the block.
    pub fn k_groups(&self) -> usize {
        self.tokens / self.k_group
    }

    /// The shipped defaults: INT2 blocks hold twice the tokens of INT4 blocks, and both fit
    /// the same slot (`docs/KV_LAYOUT.md` gives the arithmetic).
    pub fn default_for(class: KvClass, head_dim: usize) -> Result<Self, QuantError> {
        let tokens = match class {
            KvClass::F16 => 16,
            KvClass::Int4 => 64,
            KvClass::Int2 => 128,
            KvClass::Fp8 => 32,
        };
        BlockGeometry::new(class, tokens, head_dim, 64.min(head_dim))
    }

    fn k_words_per_lane(&self) -> usize {
        let d = self.head_dim;
        match self.class {
            KvClass::F16 | KvClass::Fp8 => d / 8,
            KvClass::Int4 | KvClass::Int2 => d / 32,
        }
    }

    fn v_words_per_lane(&self) -> usize {
        let d = self.head_dim;
        match self.class {
            KvClass::F16 => d / 4,
            KvClass::Fp8 => d / 8,
            KvClass::Int4 => d / 16,
            KvClass::Int2 => d / 32,
        }
    }

    pub fn k_tile_bytes(&self) -> usize {
        128 * self.k_words_per_lane()
    }

    pub fn v_tile_bytes(&self) -> usize {
        128 * self.v_words_per_lane()
    }

    pub fn k_bytes(&self) -> usize {
        self.tokens / self.class.k_tile_tokens() * self.k_tile_bytes()
    }

    pub fn v_bytes(&self) -> usize {
        self.tokens / 16 * self.v_tile_bytes()
    }

    pub fn v_groups(&self) -> usize {
        self.head_dim / self.v_group
    }

    pub fn v_offset(&self) -> usize {
        self.k_bytes()
    }

    /// Start of the K scales of key group 0 (`head_dim` fp16), followed by its K zeros at
    /// `+ 2 * head_dim`; group `g`'s scales and zeros follow at `+ 4 * head_dim * g`.
    /// FP8: the block's K scale (f32), then its V scale (f32) at `+ 4`.
    pub fn k_scale_offset(&self) -> usize {
        align16(self.v_offset() + self.v_bytes())
    }

    pub fn k_zero_offset(&self) -> usize {
        self.k_scale_offset() + 2 * self.head_dim
    }

    /// Start of the V scales, `[tokens / 2][v_groups][2]` fp16 (see `v_param_slot`).
    pub fn v_scale_offset(&self) -> usize {
        align16(self.k_scale_offset() + 4 * self.head_dim * self.k_groups())
    }

    /// Index (in fp16 units, from `k_scale_offset`) of the scale of key parameter `i`
    /// (`group * head_dim + channel`); its zero is `head_dim` further.
    fn k_param_slot(&self, i: usize) -> usize {
        (i / self.head_dim) * 2 * self.head_dim + i % self.head_dim
    }

    /// Start of the V zeros, laid out like the V scales.
    pub fn v_zero_offset(&self) -> usize {
        align16(self.v_scale_offset() + 2 * self.tokens * self.v_groups())
    }

    /// Index (in fp16 units) of the scale of `(token, group)` in the V scale area (and of its
    /// zero in the V zero area): tokens `2p` and `2p + 1` of a group sit side by side, so the
    /// kernel scales its `p·v` operand pair with one `half2` multiply.
    pub fn v_param_slot(&self, token: usize, group: usize) -> usize {
        (token / 2) * 2 * self.v_groups() + 2 * group + token % 2
    }

    /// Bytes of one block of one KV head, a multiple of 16.
    pub fn slab_bytes(&self) -> usize {
        match self.class {
            KvClass::F16 => self.k_bytes() + self.v_bytes(),
            KvClass::Fp8 => self.k_scale_offset() + 16,
            _ => align16(self.k_outlier_offset() + 4 * self.k_outliers * self.k_groups()),
        }
    }

    /// Average stored bits per K or V element of a full block, scales and zeros included.
    pub fn effective_bits(&self) -> f64 {
        (self.slab_bytes() * 8) as f64 / (2 * self.tokens * self.head_dim) as f64
    }

    /// Byte offset and bit shift of the code of key `(token, dim)` within the block.
    pub fn k_code_pos(&self, token: usize, dim: usize) -> (usize, u32) {
        let (c, w) = (dim / 16, dim % 16);
        let (t, b, hi) = ((w % 8) / 2, w / 8, w % 2);
        let nw = self.k_words_per_lane();
        match self.class {
            KvClass::F16 => {
                let (tile, g) = (token / 8, token % 8);
                let off = lane_word_offset(4 * g + t, 2 * c + b, nw);
                (tile * self.k_tile_bytes() + off + 2 * hi, 0)
            }
            KvClass::Int4 => {
                let (tile, g) = (token / 8, token % 8);
                let nib = (c % 2) * 2 + b + 4 * hi;
                let off = lane_word_offset(4 * g + t, c / 2, nw);
                (
                    tile * self.k_tile_bytes() + off + nib / 2,
                    4 * (nib % 2) as u32,
                )
            }
            KvClass::Int2 => {
                let (tile, rr) = (token / 16, token % 16);
                let (g, second) = (rr % 8, rr / 8);
                let per_token = self.head_dim / 64;
                let crumb = (c % 4) * 2 + b + 8 * hi;
                let off = lane_word_offset(4 * g + t, second * per_token + c / 4, nw);
                (
                    tile * self.k_tile_bytes() + off + crumb / 4,
                    2 * (crumb % 4) as u32,
                )
            }
            KvClass::Fp8 => {
                // Word (second, c) holds registers b0 (low 16 bits) and b1 of chunk c.
                let (tile, rr) = (token / 16, token % 16);
                let (g, second) = (rr % 8, rr / 8);
                let off = lane_word_offset(4 * g + t, second * (self.head_dim / 16) + c, nw);
                (tile * self.k_tile_bytes() + off + 2 * b + hi, 0)
            }
        }
    }

    /// Byte offset and bit shift of the code of value `(token, dim)` within the block
    /// (the values are stored as `Vᵀ` A-fragments of the `o = p·v` mma).
    pub fn v_code_pos(&self, token: usize, dim: usize) -> (usize, u32) {
        let (m, w) = (dim / 16, dim % 16);
        let (g, row_hi) = (w % 8, w / 8);
        let (tile, rr) = (token / 16, token % 16);
        let (t, hi, tok_hi) = ((rr % 8) / 2, rr % 2, rr / 8);
        let a = row_hi + 2 * tok_hi;
        let lane = 4 * g + t;
        let nw = self.v_words_per_lane();
        let base = self.v_offset() + tile * self.v_tile_bytes();
        match self.class {
            KvClass::F16 => (base + lane_word_offset(lane, 4 * m + a, nw) + 2 * hi, 0),
            // Word 2m + a / 2 holds registers a = 0, 2 (low 16 bits) and a = 1, 3.
            KvClass::Fp8 => (
                base + lane_word_offset(lane, 2 * m + a / 2, nw) + 2 * (a % 2) + hi,
                0,
            ),
            KvClass::Int4 => {
                let nib = a + 4 * hi;
                (
                    base + lane_word_offset(lane, m, nw) + nib / 2,
                    4 * (nib % 2) as u32,
                )
            }
            KvClass::Int2 => {
                let crumb = (m % 2) * 4 + a + 8 * hi;
                (
                    base + lane_word_offset(lane, m / 2, nw) + crumb / 4,
                    2 * (crumb % 4) as u32,
                )
            }
        }
    }
}

/// Contents of one block before packing. Slots at and after `len` are zero (codes, scales,
/// zeros and 16-bit values alike): the kernel masks their scores, and zeros there keep
/// `0 * value` finite.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedBlock {
    pub geom: BlockGeometry,
    /// Valid tokens, `<= geom.tokens`.
    pub len: usize,
    pub data: BlockData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BlockData {
    /// `[tokens][head_dim]` keys and values.
    F16 { k: Vec<f16>, v: Vec<f16> },
    /// E4M3 codes `[tokens][head_dim]`; a value is `e4m3_decode(code) * scale`.
    Fp8 {
        k_codes: Vec<u8>,
        v_codes: Vec<u8>,
        k_scale: f32,
        v_scale: f32,
    },
    /// Codes `[tokens][head_dim]`, one per byte; per-channel K parameters `[head_dim]`;
    /// per-token V parameters `[tokens][v_groups]`; key-outlier entries
    /// `[k_groups][geom.k_outliers]` (`quant::outliers::entry`, unused ones 0).
    Int {
        k_codes: Vec<u8>,
        v_codes: Vec<u8>,
        k_params: Vec<GroupParams>,
        v_params: Vec<GroupParams>,
        k_outliers: Vec<u32>,
    },
}

const ZERO_PARAMS: GroupParams = GroupParams {
    scale: f16::ZERO,
    zero: f16::ZERO,
};

impl QuantizedBlock {
    /// Quantize `len` tokens of keys and values, each `[len][head_dim]` row-major.
    pub fn quantize(geom: BlockGeometry, k: &[f32], v: &[f32]) -> Result<Self, QuantError> {
        let d = geom.head_dim;
        if k.len() != v.len() || k.len() % d != 0 || k.len() / d > geom.tokens {
            return Err(QuantError::Shape(format!(
                "block of {} tokens × {d}: got {} key and {} value elements",
                geom.tokens,
                k.len(),
                v.len()
            )));
        }
        let len = k.len() / d;
        let slots = geom.tokens * d;
        let data = match geom.class.int_bits() {
            None if geom.class == KvClass::Fp8 => {
                let (k_codes, k_scale) = fp8_encode_all(k, slots, "key")?;
                let (v_codes, v_scale) = fp8_encode_all(v, slots, "value")?;
                BlockData::Fp8 {
                    k_codes,
                    v_codes,
                    k_scale,
                    v_scale,
                }
            }
            None => {
                let mut kh = vec![f16::ZERO; slots];
                let mut vh = vec![f16::ZERO; slots];
                for (i, (&a, &b)) in k.iter().zip(v).enumerate() {
                    kh[i] = to_f16(a, i)?;
                    vh[i] = to_f16(b, i)?;
                }
                BlockData::F16 { k: kh, v: vh }
            }
            Some(bits) => {
                let mut k_codes = vec![0u8; slots];
                let mut v_codes = vec![0u8; slots];
                let mut k_params = vec![ZERO_PARAMS; geom.k_groups() * d];
                let mut v_params = vec![ZERO_PARAMS; geom.tokens * geom.v_groups()];
                let no = geom.k_outliers;
                let mut k_outliers = vec![0u32; geom.k_groups() * no];
                for (gi, r0) in (0..len).step_by(geom.k_group).enumerate() {
                    let rows = r0..len.min(r0 + geom.k_group);
                    let cols: Vec<Vec<f32>> = (0..d)
                        .map(|c| rows.clone().map(|r| k[r * d + c]).collect())
                        .collect();
                    if no > 0 {
                        // What is kept must still be a finite fp16 value: the same check as
                        // without outliers.
                        for (c, col) in cols.iter().enumerate() {
                            group_params(col, bits).map_err(|e| at("key channel", c, e))?;
                        }
                    }
                    let kept = outliers::choose(&cols, no);
                    let mut entries = Vec::with_capacity(no);
                    for (c, col) in cols.iter().enumerate() {
                        let p = group_params(&outliers::inliers(col, &kept[c]), bits)
                            .map_err(|e| at("key channel", c, e))?;
                        k_params[gi * d + c] = p;
                        for (i, (x, r)) in col.iter().zip(rows.clone()).enumerate() {
                            let q = quantize_with(*x, p, bits);
                            k_codes[r * d + c] = q;
                            if kept[c].contains(&i) {
                                let delta = f16::from_f32(x - p.dequantize(q));
                                entries.push(outliers::entry(r, c, d, delta));
                            }
                        }
                    }
                    // Sorted by token (then channel), as the decode kernel scans them.
                    entries.sort_unstable_by_key(|&e| e >> 16);
                    k_outliers[gi * no..gi * no + entries.len()].copy_from_slice(&entries);
                }
                let g = geom.v_group;
                for r in 0..len {
                    for gi in 0..geom.v_groups() {
                        let x = &v[r * d + gi * g..r * d + (gi + 1) * g];
                        let p = group_params(x, bits).map_err(|e| at("value token", r, e))?;
                        v_params[r * geom.v_groups() + gi] = p;
                        for (i, &xv) in x.iter().enumerate() {
                            v_codes[r * d + gi * g + i] = quantize_with(xv, p, bits);
                        }
                    }
                }
                BlockData::Int {
                    k_codes,
                    v_codes,
                    k_params,
                    v_params,
                    k_outliers,
                }
            }
        };
        Ok(QuantizedBlock { geom, len, data })
    }

    /// Dequantized keys and values of the valid tokens, each `[len][head_dim]`.
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let d = self.geom.head_dim;
        let n = self.len * d;
        match &self.data {
            BlockData::F16 { k, v } => (
                k[..n].iter().map(|x| x.to_f32()).collect(),
                v[..n].iter().map(|x| x.to_f32()).collect(),
            ),
            BlockData::Fp8 {
                k_codes,
                v_codes,
                k_scale,
                v_scale,
            } => (
                k_codes[..n]
                    .iter()
                    .map(|&c| e4m3_decode(c) * k_scale)
                    .collect(),
                v_codes[..n]
                    .iter()
                    .map(|&c| e4m3_decode(c) * v_scale)
                    .collect(),
            ),
            BlockData::Int {
                k_codes,
                v_codes,
                k_params,
                v_params,
                k_outliers,
            } => {
                let ng = self.geom.v_groups();
                let kg = self.geom.k_group;
                let mut kd: Vec<f32> = (0..n)
                    .map(|i| k_params[(i / d / kg) * d + i % d].dequantize(k_codes[i]))
                    .collect();
                for &e in k_outliers {
                    let (r, c, delta) = outliers::read(e, d);
                    if r < self.len {
                        kd[r * d + c] += delta.to_f32();
                    }
                }
                let vd = (0..n)
                    .map(|i| {
                        let (r, c) = (i / d, i % d);
                        v_params[r * ng + c / self.geom.v_group].dequantize(v_codes[i])
                    })
                    .collect();
                (kd, vd)
            }
        }
    }

    /// The block's bytes, exactly `geom.slab_bytes()` long.
    pub fn pack(&self) -> Vec<u8> {
        let g = &self.geom;
        let d = g.head_dim;
        let mut out = vec![0u8; g.slab_bytes()];
        match &self.data {
            BlockData::F16 { k, v } => {
                for r in 0..g.tokens {
                    for c in 0..d {
                        let (ko, _) = g.k_code_pos(r, c);
                        out[ko..ko + 2].copy_from_slice(&k[r * d + c].to_le_bytes());
                        let (vo, _) = g.v_code_pos(r, c);
                        out[vo..vo + 2].copy_from_slice(&v[r * d + c].to_le_bytes());
                    }
                }
            }
            BlockData::Fp8 {
                k_codes,
                v_codes,
                k_scale,
                v_scale,
            } => {
                for r in 0..g.tokens {
                    for c in 0..d {
                        out[g.k_code_pos(r, c).0] = k_codes[r * d + c];
                        out[g.v_code_pos(r, c).0] = v_codes[r * d + c];
                    }
                }
                let at = g.k_scale_offset();
                out[at..at + 4].copy_from_slice(&k_scale.to_le_bytes());
                out[at + 4..at + 8].copy_from_slice(&v_scale.to_le_bytes());
            }
            BlockData::Int {
                k_codes,
                v_codes,
                k_params,
                v_params,
                k_outliers,
            } => {
                let at = g.k_outlier_offset();
                for (i, e) in k_outliers.iter().enumerate() {
                    out[at + 4 * i..at + 4 * i + 4].copy_from_slice(&e.to_le_bytes());
                }
                for r in 0..g.tokens {
                    for c in 0..d {
                        let (ko, ks) = g.k_code_pos(r, c);
                        out[ko] |= k_codes[r * d + c] << ks;
                        let (vo, vs) = g.v_code_pos(r, c);
                        out[vo] |= v_codes[r * d + c] << vs;
                    }
                }
                put_params(
                    &mut out,
                    g.k_scale_offset(),
                    g.k_zero_offset(),
                    k_params,
                    |i| g.k_param_slot(i),
                );
                let ng = g.v_groups();
                let slot = |i: usize| g.v_param_slot(i / ng, i % ng);
                put_params(
                    &mut out,
                    g.v_scale_offset(),
                    g.v_zero_offset(),
                    v_params,
                    slot,
                );
            }
        }
        out
    }

    /// Read a block back from its bytes; `len` valid tokens (not stored in the block:
    /// the block table carries it).
    pub fn unpack(geom: BlockGeometry, bytes: &[u8], len: usize) -> Result<Self, QuantError> {
        if bytes.len() != geom.slab_bytes() || len > geom.tokens {
            return Err(QuantError::Layout(format!(
                "{:?} block of {} tokens needs {} bytes and len <= {}, got {} bytes and len {len}",
                geom.class,
                geom.tokens,
                geom.slab_bytes(),
                geom.tokens,
                bytes.len()
            )));
        }
        let d = geom.head_dim;
        let slots = geom.tokens * d;
        let data = match geom.class.int_bits() {
            None if geom.class == KvClass::Fp8 => {
                let mut k_codes = vec![0u8; slots];
                let mut v_codes = vec![0u8; slots];
                for r in 0..geom.tokens {
                    for c in 0..d {
                        k_codes[r * d + c] = bytes[geom.k_code_pos(r, c).0];
                        v_codes[r * d + c] = bytes[geom.v_code_pos(r, c).0];
                    }
                }
                let f32_at = |o: usize| {
                    f32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
                };
                let at = geom.k_scale_offset();
                BlockData::Fp8 {
                    k_codes,
                    v_codes,
                    k_scale: f32_at(at),
                    v_scale: f32_at(at + 4),
                }
            }
            None => {
                let half_at = |o: usize| f16::from_le_bytes([bytes[o], bytes[o + 1]]);
                let mut k = vec![f16::ZERO; slots];
                let mut v = vec![f16::ZERO; slots];
                for r in 0..geom.tokens {
                    for c in 0..d {
                        k[r * d + c] = half_at(geom.k_code_pos(r, c).0);
                        v[r * d + c] = half_at(geom.v_code_pos(r, c).0);
                    }
                }
                BlockData::F16 { k, v }
            }
            Some(bits) => {
                let mask = bits.max_code();
                let mut k_codes = vec![0u8; slots];
                let mut v_codes = vec![0u8; slots];
                for r in 0..geom.tokens {
                    for c in 0..d {
                        let (ko, ks) = geom.k_code_pos(r, c);
                        k_codes[r * d + c] = (bytes[ko] >> ks) & mask;
                        let (vo, vs) = geom.v_code_pos(r, c);
                        v_codes[r * d + c] = (bytes[vo] >> vs) & mask;
                    }
                }
                let k_params = get_params(
                    bytes,
                    geom.k_scale_offset(),
                    geom.k_zero_offset(),
                    geom.k_groups() * d,
                    |i| geom.k_param_slot(i),
                );
                let ng = geom.v_groups();
                let slot = |i: usize| geom.v_param_slot(i / ng, i % ng);
                let nv = geom.tokens * ng;
                let v_params =
                    get_params(bytes, geom.v_scale_offset(), geom.v_zero_offset(), nv, slot);
                let at = geom.k_outlier_offset();
                let k_outliers = (0..geom.k_groups() * geom.k_outliers)
                    .map(|i| {
                        let o = at + 4 * i;
                        u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
                    })
                    .collect();
                BlockData::Int {
                    k_codes,
                    v_codes,
                    k_params,
                    v_params,
                    k_outliers,
                }
            }
        };
        Ok(QuantizedBlock { geom, len, data })
    }
}

/// Largest finite E4M3 magnitude (`0x7e`); `0x7f` / `0xff` are NaN and never written.
pub const E4M3_MAX: f32 = 448.0;

/// Value of an E4M3 (OCP FP8, "fn": no infinities) code: sign, 4 exponent bits (bias 7),
/// 3 mantissa bits; NaN for `0x7f` / `0xff`.
pub fn e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((code >> 3) & 0xf, code & 7);
    if e == 0xf && m == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m as f32 / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
    };
    sign * mag
}

/// Nearest E4M3 code, ties to even (the rounding of `cvt.rn.satfinite.e4m3x2.f32`),
/// saturating at ±448. `x` must be finite.
pub fn e4m3_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Codes 0..=0x7e are ordered by magnitude: find the neighbours and round.
    let (mut lo, mut hi) = (0u8, 0x7e_u8);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if e4m3_decode(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - e4m3_decode(lo), e4m3_decode(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    if code == 0 {
        0 // no negative zero: the packer's unused slots are zero bytes too
    } else {
        sign | code
    }
}

/// E4M3 codes of `x` (padded with zero codes to `slots`) and the scale `amax / 448`
/// (0 for an all-zero input, whose codes are then all zero).
fn fp8_encode_all(x: &[f32], slots: usize, what: &str) -> Result<(Vec<u8>, f32), QuantError> {
    let mut amax = 0f32;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return Err(at(what, i, QuantError::OutOfRange { index: i, value: v }));
        }
        amax = amax.max(v.abs());
    }
    let scale = amax / E4M3_MAX;
    let mut codes = vec![0u8; slots];
    if scale > 0.0 {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = e4m3_encode(v / scale);
        }
    }
    Ok((codes, scale))
}

fn to_f16(x: f32, index: usize) -> Result<f16, QuantError> {
    let h = f16::from_f32(x);
    if h.is_finite() {
        Ok(h)
    } else {
        Err(QuantError::OutOfRange { index, value: x })
    }
}

fn at(what: &str, i: usize, e: QuantError) -> QuantError {
    QuantError::Shape(format!("{what} {i}: {e}"))
}

fn put_params(
    out: &mut [u8],
    scale_at: usize,
    zero_at: usize,
    p: &[GroupParams],
    slot: impl Fn(usize) -> usize,
) {
    for (i, gp) in p.iter().enumerate() {
        let s = 2 * slot(i);
        out[scale_at + s..scale_at + s + 2].copy_from_slice(&gp.scale.to_le_bytes());
        out[zero_at + s..zero_at + s + 2].copy_from_slice(&gp.zero.to_le_bytes());
    }
}

fn get_params(
    bytes: &[u8],
    scale_at: usize,
    zero_at: usize,
    n: usize,
    slot: impl Fn(usize) -> usize,
) -> Vec<GroupParams> {
    let h = |o: usize| f16::from_le_bytes([bytes[o], bytes[o + 1]]);
    (0..n)
        .map(|i| GroupParams {
            scale: h(scale_at + 2 * slot(i)),
            zero: h(zero_at + 2 * slot(i)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn geoms() -> Vec<BlockGeometry> {
        let mut out = Vec::new();
        for d in [64, 128, 256] {
            for class in KvClass::ALL {
                out.push(BlockGeometry::default_for(class, d).unwrap());
            }
            out.push(BlockGeometry::new(KvClass::Int2, 32, d, 32).unwrap());
            out.push(BlockGeometry::new(KvClass::Int4, 16, d, d).unwrap());
        }
        out
    }

    /// The key-outlier area: 4 bytes per entry and key group after the V zeros, nothing
    /// when empty (the layout is unchanged), INT4/INT2 only.
    #[test]
    fn key_outlier_area_follows_the_v_zeros() {
        let g = BlockGeometry::default_for(KvClass::Int2, 128)
            .unwrap()
            .with_k_group(64)
            .unwrap();
        assert_eq!(g.with_k_outliers(0).unwrap(), g);
        assert_eq!(g.k_outlier_offset(), g.slab_bytes());
        let o = g.with_k_outliers(41).unwrap();
        assert_eq!(g.slab_bytes(), 10240);
        assert_eq!(
            o.slab_bytes(),
            10240 + (4 * 41 * 2usize).next_multiple_of(16)
        );
        assert_eq!(o.k_outlier_offset(), g.slab_bytes());
        assert!(o.effective_bits() > g.effective_bits());
        for c in [KvClass::F16, KvClass::Fp8] {
            let f = BlockGeometry::default_for(c, 128).unwrap();
            assert!(f.with_k_outliers(1).is_err());
            assert_eq!(f.with_k_outliers(0).unwrap(), f);
        }
    }

    /// Every code has its own bits: no two (token, dim, K|V) share a byte and shift, and all
    /// lie inside their areas.
    #[test]
    fn code_positions_are_a_bijection() {
        for g in geoms() {
            let bits = g.class.bits() as usize;
            let mut seen = HashSet::new();
            for r in 0..g.tokens {
                for c in 0..g.head_dim {
                    let (ko, ks) = g.k_code_pos(r, c);
                    assert!(ko < g.v_offset(), "{g:?} K ({r},{c})");
                    assert!(
                        seen.insert((ko * 8 + ks as usize) / bits),
                        "{g:?} K ({r},{c}) reused"
                    );
                    let (vo, vs) = g.v_code_pos(r, c);
                    assert!(
                        vo >= g.v_offset() && vo < g.v_offset() + g.v_bytes(),
                        "{g:?} V ({r},{c})"
                    );
                    assert!(
                        seen.insert((vo * 8 + vs as usize) / bits),
                        "{g:?} V ({r},{c}) reused"
                    );
                }
            }
            assert_eq!(
                seen.len() * bits,
                8 * (g.k_bytes() + g.v_bytes()),
                "{g:?} leaves holes"
            );
            assert_eq!(g.slab_bytes() % 16, 0);
        }
    }

    #[test]
    fn default_int2_and_int4_blocks_hold_twice_the_tokens_in_similar_bytes() {
        let i4 = BlockGeometry::default_for(KvClass::Int4, 128).unwrap();
        let i2 = BlockGeometry::default_for(KvClass::Int2, 128).unwrap();
        let f = BlockGeometry::default_for(KvClass::F16, 128).unwrap();
        assert_eq!(i2.tokens, 2 * i4.tokens);
        assert_eq!(i4.slab_bytes(), 9216);
        assert_eq!(i2.slab_bytes(), 9728);
        assert_eq!(f.slab_bytes(), 8192);
        // K: bits + 32/tokens (per-channel groups over the block), V: bits + 32/64.
        assert!((i4.effective_bits() - 4.5).abs() < 1e-12);
        assert!((i2.effective_bits() - (2.25 + 2.5) / 2.0).abs() < 1e-12);
        assert_eq!(f.effective_bits(), 16.0);
    }

    /// Golden bytes: D = 64, 16-token blocks. Hand-derived from the layout rules in
    /// docs/KV_LAYOUT.md, independent of `k_code_pos`/`v_code_pos`.
    #[test]
    fn golden_bytes_int4() {
        let g = BlockGeometry::new(KvClass::Int4, 16, 64, 64).unwrap();
        let mut k_codes = vec![0u8; 16 * 64];
        let mut v_codes = vec![0u8; 16 * 64];
        // Token 0, dims 0,1,8,9 -> lane 0 word 0, nibbles 0,4,1,5.
        k_codes[0] = 1;
        k_codes[1] = 2;
        k_codes[8] = 3;
        k_codes[9] = 4;
        // Token 0, dims 16,17 -> lane 0 word 0 nibbles 2,6; dim 32 -> word 1 nibble 0.
        k_codes[16] = 5;
        k_codes[17] = 6;
        k_codes[32] = 7;
        // Token 1, dim 2 -> lane 4*1 + 1 = 5, word 0 nibble 0: byte 5*8 = 40.
        k_codes[64 + 2] = 15;
        // V token 0 dim 0 -> lane 0 word m=0 nibble a=0; token 1 dim 0 -> nibble 4;
        // token 8 dim 0 -> a=2 nibble 2; token 0 dim 8 -> g=0,row_hi=1, a=1 nibble 1.
        v_codes[0] = 9;
        v_codes[64] = 10;
        v_codes[8 * 64] = 11;
        v_codes[8] = 12;
        // V token 2 dim 17 -> lane 4*1+1=5, m=1, a=0, nibble 0: word 1 of lane 5.
        v_codes[2 * 64 + 17] = 13;
        let p = GroupParams {
            scale: f16::from_f32(0.5),
            zero: f16::from_f32(-1.0),
        };
        let mut k_params = vec![ZERO_PARAMS; 64];
        k_params[0] = p;
        let mut v_params = vec![ZERO_PARAMS; 16];
        v_params[1] = p;
        let block = QuantizedBlock {
            geom: g,
            len: 16,
            data: BlockData::Int {
                k_codes,
                v_codes,
                k_params,
                v_params,
                k_outliers: Vec::new(),
            },
        };
        let bytes = block.pack();
        assert_eq!(bytes.len(), 512 + 512 + 128 + 128 + 32 + 32);
        // K: 8-token tiles of 256 bytes; lane L's 2 words at L*8.
        assert_eq!(&bytes[0..8], &[0x31, 0x05, 0x42, 0x06, 0x07, 0, 0, 0]);
        assert_eq!(&bytes[40..44], &[0x0f, 0, 0, 0]);
        assert!(bytes[8..40].iter().all(|&b| b == 0));
        // V at 512: one 16-token tile of 512 bytes; lane L's 4 words (m = 0..3) at L*16.
        assert_eq!(&bytes[512..516], &[0xc9, 0x0b, 0x0a, 0x00]);
        assert_eq!(&bytes[512 + 5 * 16 + 4..512 + 5 * 16 + 8], &[0x0d, 0, 0, 0]);
        // K scale/zero of channel 0 at 1024 / 1152; V scale/zero of (token 1, group 0)
        // at 1280 + 2 / 1312 + 2. fp16 0.5 = 0x3800, -1.0 = 0xbc00.
        assert_eq!(&bytes[1024..1026], &[0x00, 0x38]);
        assert_eq!(&bytes[1152..1154], &[0x00, 0xbc]);
        assert_eq!(&bytes[1282..1284], &[0x00, 0x38]);
        assert_eq!(&bytes[1314..1316], &[0x00, 0xbc]);
        let back = QuantizedBlock::unpack(g, &bytes, 16).unwrap();
        assert_eq!(back, block);
    }

    #[test]
    fn golden_bytes_int2() {
        let g = BlockGeometry::new(KvClass::Int2, 16, 64, 64).unwrap();
        let mut k_codes = vec![0u8; 16 * 64];
        let mut v_codes = vec![0u8; 16 * 64];
        // K token 0 dims 0,1 -> lane 0 word 0 crumbs 0, 8; dim 8 -> crumb 1;
        // token 8 dim 0 -> lane 0 word 1 crumb 0; token 0 dim 48 -> chunk 3 -> crumb 6.
        k_codes[0] = 1;
        k_codes[1] = 2;
        k_codes[8] = 3;
        k_codes[8 * 64] = 3;
        k_codes[48] = 2;
        // V token 0 dim 0 -> lane 0 word 0 crumb 0; token 1 dim 0 -> crumb 8;
        // token 0 dim 16 -> m=1 -> crumb 4; token 9 dim 24 -> m=1,g=0,row_hi=1, t=0, hi=1,
        // tok_hi=1 -> a=3, crumb 4+3+8=15.
        v_codes[0] = 3;
        v_codes[64] = 1;
        v_codes[16] = 2;
        v_codes[9 * 64 + 24] = 3;
        let block = QuantizedBlock {
            geom: g,
            len: 16,
            data: BlockData::Int {
                k_codes,
                v_codes,
                k_params: vec![ZERO_PARAMS; 64],
                v_params: vec![ZERO_PARAMS; 16],
                k_outliers: Vec::new(),
            },
        };
        let bytes = block.pack();
        // K tile of 16 tokens = 256 bytes, lane L's 2 words at L*8.
        assert_eq!(&bytes[0..8], &[0x0d, 0x20, 0x02, 0x00, 0x03, 0, 0, 0]);
        // V at 256: lane L's 2 words at L*8.
        assert_eq!(&bytes[256..260], &[0x03, 0x02, 0x01, 0xc0]);
        assert_eq!(QuantizedBlock::unpack(g, &bytes, 16).unwrap(), block);
    }

    /// A block with key outliers: entries sorted by token in each group's area (after the V
    /// zeros), the corrected keys nearer the input than without them, bytes that read back
    /// to the same block, and no change at all with an empty area.
    #[test]
    fn key_outliers_pack_and_correct_the_keys() {
        let d = 64;
        let g = BlockGeometry::new(KvClass::Int2, 32, d, 64)
            .unwrap()
            .with_k_group(16)
            .unwrap();
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut k: Vec<f32> = (0..30 * d).map(|_| next()).collect();
        let v: Vec<f32> = (0..30 * d).map(|_| next()).collect();
        k[3 * d + 5] = 9.0; // group 0
        k[20 * d + 40] = -7.0; // group 1
        let plain = QuantizedBlock::quantize(g, &k, &v).unwrap();
        let go = g.with_k_outliers(4).unwrap();
        let b = QuantizedBlock::quantize(go, &k, &v).unwrap();
        let BlockData::Int { k_outliers, .. } = &b.data else {
            panic!("an INT2 block")
        };
        assert_eq!(k_outliers.len(), 2 * 4);
        let read: Vec<(usize, usize)> = k_outliers
            .iter()
            .map(|&e| {
                let (r, c, _) = outliers::read(e, d);
                (r, c)
            })
            .collect();
        assert!(
            read[..4].contains(&(3, 5)) && read[4..].contains(&(20, 40)),
            "{read:?}"
        );
        for grp in read.chunks(4) {
            assert!(grp.windows(2).all(|w| w[0].0 <= w[1].0), "{read:?}");
            assert!(grp.iter().all(|&(r, _)| r < 30));
        }
        // The two spiked channels: their other values get a narrow range.
        let err = |blk: &QuantizedBlock| -> f32 {
            let kd = blk.dequantize().0;
            (0..30)
                .flat_map(|r| [r * d + 5, r * d + 40])
                .map(|i| (kd[i] - k[i]).powi(2))
                .sum()
        };
        assert!(
            err(&b) < 0.1 * err(&plain),
            "{} vs {}",
            err(&b),
            err(&plain)
        );
        let (kd, vd) = b.dequantize();
        assert!((kd[3 * d + 5] - 9.0).abs() < 8e-3 && (kd[20 * d + 40] + 7.0).abs() < 8e-3);
        assert_eq!(vd, plain.dequantize().1, "values do not change");
        let bytes = b.pack();
        assert_eq!(bytes.len(), go.slab_bytes());
        let at = go.k_outlier_offset();
        assert_eq!(&bytes[at..at + 4], &k_outliers[0].to_le_bytes());
        assert_eq!(QuantizedBlock::unpack(go, &bytes, 30).unwrap(), b);
        // An empty area changes nothing: the bytes of the layout without it.
        assert_eq!(
            QuantizedBlock::quantize(g.with_k_outliers(0).unwrap(), &k, &v)
                .unwrap()
                .pack(),
            plain.pack()
        );
    }

    #[test]
    fn e4m3_codec_matches_the_format() {
        for (code, value) in [
            (0x00u8, 0.0f32),
            (0x38, 1.0),
            (0x7e, 448.0),
            (0x01, 2f32.powi(-9)),
            (0x08, 2f32.powi(-6)),
            (0xc0, -2.0),
            (0x39, 1.125),
        ] {
            assert_eq!(e4m3_decode(code), value, "code {code:#x}");
            assert_eq!(e4m3_encode(value), code, "value {value}");
        }
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
        // Ties go to the even mantissa; out-of-range values saturate; no negative zero.
        assert_eq!(e4m3_encode(1.0625), 0x38);
        assert_eq!(e4m3_encode(1.1875), 0x3a);
        assert_eq!(e4m3_encode(1e6), 0x7e);
        assert_eq!(e4m3_encode(-1e6), 0xfe);
        assert_eq!(e4m3_encode(-1e-9), 0x00);
        // Every finite code round-trips.
        for c in (0u8..=0xff).filter(|c| c & 0x7f != 0x7f && *c != 0x80) {
            assert_eq!(e4m3_encode(e4m3_decode(c)), c);
        }
    }

    /// Golden bytes: FP8, D = 64, 32-token block. Hand-derived from docs/KV_LAYOUT.md.
    #[test]
    fn golden_bytes_fp8() {
        let g = BlockGeometry::new(KvClass::Fp8, 32, 64, 64).unwrap();
        assert_eq!(g.k_bytes(), 2048);
        assert_eq!(g.slab_bytes(), 4096 + 16);
        let mut k_codes = vec![0u8; 32 * 64];
        let mut v_codes = vec![0u8; 32 * 64];
        // K tile = 16 tokens x 64 B = 1024 B; lane L's 8 words: j / 4 * 512 + L * 16 + j % 4 * 4,
        // word j = second * 4 + c. Token 0 dims 0, 1 -> lane 0 word 0 bytes 0, 1 (b0);
        // dims 8, 9 -> bytes 2, 3 (b1); dim 16 -> c = 1, word 1 (byte 4).
        k_codes[0] = 0x11;
        k_codes[1] = 0x12;
        k_codes[8] = 0x13;
        k_codes[9] = 0x14;
        k_codes[16] = 0x15;
        // Token 8 dim 0 -> second 1, word 4 -> byte 512. Token 3 dim 2 -> lane 13 byte 208.
        k_codes[8 * 64] = 0x16;
        k_codes[3 * 64 + 2] = 0x17;
        // Token 16 dim 0: second K tile at 1024.
        k_codes[16 * 64] = 0x18;
        // V at 2048, 16-token tiles of 1024 B. Token 0 dim 0 -> lane 0, m 0, a 0: byte 0;
        // token 1 -> hi, byte 1; dim 8 -> a 1: byte 2; token 8 -> a 2: word 1, byte 4;
        // dim 16 -> m 1: word 2, byte 8.
        v_codes[0] = 0x21;
        v_codes[64] = 0x22;
        v_codes[8] = 0x23;
        v_codes[8 * 64] = 0x24;
        v_codes[16] = 0x25;
        let block = QuantizedBlock {
            geom: g,
            len: 32,
            data: BlockData::Fp8 {
                k_codes,
                v_codes,
                k_scale: 0.5,
                v_scale: -0.25,
            },
        };
        let bytes = block.pack();
        assert_eq!(&bytes[0..8], &[0x11, 0x12, 0x13, 0x14, 0x15, 0, 0, 0]);
        assert_eq!(bytes[512], 0x16);
        assert_eq!(bytes[13 * 16], 0x17);
        assert_eq!(bytes[1024], 0x18);
        assert_eq!(
            &bytes[2048..2048 + 12],
            &[0x21, 0x22, 0x23, 0, 0x24, 0, 0, 0, 0x25, 0, 0, 0]
        );
        assert_eq!(&bytes[4096..4100], &0.5f32.to_le_bytes());
        assert_eq!(&bytes[4100..4104], &(-0.25f32).to_le_bytes());
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 10 + 2 + 4);
        assert_eq!(QuantizedBlock::unpack(g, &bytes, 32).unwrap(), block);
    }

    #[test]
    fn unpack_rejects_wrong_sizes() {
        let g = BlockGeometry::default_for(KvClass::Int4, 64).unwrap();
        assert!(QuantizedBlock::unpack(g, &[0u8; 10], 1).is_err());
        assert!(QuantizedBlock::unpack(g, &vec![0u8; g.slab_bytes()], g.tokens + 1).is_err());
        assert!(BlockGeometry::new(KvClass::Int4, 24, 128, 64).is_err());
        assert!(BlockGeometry::new(KvClass::Int4, 64, 96, 32).is_err());
        assert!(BlockGeometry::new(KvClass::Int2, 64, 128, 48).is_err());
    }

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Key groups of 64 tokens in a 128-token INT2 block: twice the key scale bytes (2.5
    /// bits for keys and values at value groups of 64), the areas still disjoint, and keys
    /// whose range drifts along the block come back closer than with one group.
    #[test]
    fn finer_key_groups_cost_scale_bytes_and_follow_the_keys() {
        let one = BlockGeometry::default_for(KvClass::Int2, 128).unwrap();
        let two = one.with_k_group(64).unwrap();
        assert_eq!((one.k_groups(), two.k_groups()), (1, 2));
        assert_eq!((one.slab_bytes(), two.slab_bytes()), (9728, 10240));
        assert_eq!(two.effective_bits(), 2.5);
        assert_eq!(two.v_scale_offset(), two.k_scale_offset() + 4 * 128 * 2);
        assert_eq!(one.with_k_group(128).unwrap(), one);
        for bad in [0, 48, 256] {
            assert!(one.with_k_group(bad).is_err(), "{bad}");
        }
        let f16 = BlockGeometry::default_for(KvClass::F16, 128).unwrap();
        assert!(f16.with_k_group(8).is_err());
        // Channel c of token r: 0.01 r (a drift over the block) plus noise in [-0.5, 0.5).
        let d = 128;
        let noise = lcg(128 * d, 7);
        let k: Vec<f32> = (0..128 * d)
            .map(|i| 0.01 * (i / d) as f32 + noise[i] / 4.0)
            .collect();
        let err = |g: BlockGeometry| {
            let b = QuantizedBlock::quantize(g, &k, &k).unwrap();
            let back = QuantizedBlock::unpack(g, &b.pack(), 128).unwrap();
            assert_eq!(back, b);
            let (kd, _) = back.dequantize();
            k.iter().zip(&kd).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
        };
        let (e1, e2) = (err(one), err(two));
        assert!(e2 < 0.8 * e1, "two groups {e2} vs one {e1}");
    }

    proptest! {
        #[test]
        fn pack_unpack_is_identity_and_dequantize_is_bounded(
            class in prop::sample::select(KvClass::ALL.to_vec()),
            d in prop::sample::select(vec![64usize, 128]),
            fill in 0usize..=128,
            seed in any::<u64>(),
            key_groups in prop::sample::select(vec![1usize, 2, 4]),
        ) {
            let mut g = BlockGeometry::default_for(class, d).unwrap();
            if class.int_bits().is_some() {
                g = g.with_k_group(g.tokens / key_groups).unwrap();
            }
            let len = fill.min(g.tokens);
            let k = lcg(len * d, seed);
            let v = lcg(len * d, seed ^ 0x9e37);
            let block = QuantizedBlock::quantize(g, &k, &v).unwrap();
            let bytes = block.pack();
            prop_assert_eq!(bytes.len(), g.slab_bytes());
            let back = QuantizedBlock::unpack(g, &bytes, len).unwrap();
            prop_assert_eq!(&back, &block);
            let (kd, vd) = back.dequantize();
            // Inputs lie in [-2, 2): one step is 4 / (2^b - 1); fp16 adds a little.
            let step = match class {
                KvClass::F16 | KvClass::Fp8 => 0.0,
                KvClass::Int4 => 4.0 / 15.0,
                KvClass::Int2 => 4.0 / 3.0,
            };
            for (a, b) in k.iter().zip(&kd).chain(v.iter().zip(&vd)) {
                // E4M3 keeps 3 mantissa bits: half a step is 1/16 of |x| (subnormals below
                // 2^-6 * scale <= 2^-6 * 2 / 448 add an absolute 2^-10 * scale).
                let tol = if class == KvClass::Fp8 { a.abs() / 16.0 + 1e-5 } else { step / 2.0 + 2e-3 };
                prop_assert!((a - b).abs() <= tol, "{class:?} {a} vs {b}");
            }
        }
    }
}
