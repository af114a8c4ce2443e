//! Asymmetric integer quantization of one group: an fp16 scale and an fp16 zero (the group
//! minimum) shared by the group's elements, codes of 2, 4 or 8 bits.

use super::QuantError;
use half::f16;

/// Integer bit widths the quantizers support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bits {
    B2,
    B4,
    B8,
}

impl Bits {
    pub const ALL: [Bits; 3] = [Bits::B2, Bits::B4, Bits::B8];

    pub fn get(self) -> u32 {
        match self {
            Bits::B2 => 2,
            Bits::B4 => 4,
            Bits::B8 => 8,
        }
    }

    pub fn from_u32(bits: u32) -> Result<Bits, QuantError> {
        match bits {
            2 => Ok(Bits::B2),
            4 => Ok(Bits::B4),
            8 => Ok(Bits::B8),
            other => Err(QuantError::UnsupportedBits(other)),
        }
    }

    /// Largest code, `2^bits - 1`.
    pub fn max_code(self) -> u8 {
        ((1u32 << self.get()) - 1) as u8
    }
}

/// Scale and zero of one group, stored as fp16 exactly as the packed layout holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    pub scale: f16,
    pub zero: f16,
}

impl GroupParams {
    pub fn dequantize(self, code: u8) -> f32 {
        code as f32 * self.scale.to_f32() + self.zero.to_f32()
    }
}

/// Smallest fp16 not below `x` (x finite, >= 0): rounding the scale up keeps the group
/// maximum inside the top code, so no element is clamped by the fp16 rounding.
fn f16_round_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Scale and zero for a group: `zero` is the minimum, `scale = (max - min) / (2^b - 1)`.
/// A constant group gets scale 0 and decodes exactly to its (fp16) value.
pub fn group_params(x: &[f32], bits: Bits) -> Result<GroupParams, QuantError> {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_finite() || v.abs() > f16::MAX.to_f32() {
            return Err(QuantError::OutOfRange { index: i, value: v });
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if x.is_empty() {
        return Ok(GroupParams {
            scale: f16::ZERO,
            zero: f16::ZERO,
        });
    }
    let p = range_params(lo, hi, bits);
    if !p.scale.is_finite() {
        return Err(QuantError::OutOfRange {
            index: 0,
            value: hi - p.zero.to_f32(),
        });
    }
    Ok(p)
}

/// `q = clamp(round((x - zero) / scale), 0, 2^b - 1)`.
pub fn quantize_with(x: f32, p: GroupParams, bits: Bits) -> u8 {
    let s = p.scale.to_f32();
    if s == 0.0 {
        return 0;
    }
    let q = ((x - p.zero.to_f32()) / s).round();
    q.clamp(0.0, bits.max_code() as f32) as u8
}

/// Quantize one group into `codes` (one code per byte, unpacked); returns its parameters.
pub fn quantize_group(x: &[f32], bits: Bits, codes: &mut [u8]) -> Result<GroupParams, QuantError> {
    debug_assert_eq!(x.len(), codes.len());
    let p = group_params(x, bits)?;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = quantize_with(v, p, bits);
    }
    Ok(p)
}

/// Quantize then dequantize a slice in groups of `group` consecutive elements (the last
/// group may be shorter): the f32 values a quantized cache would hand back.
pub fn fake_quantize(x: &mut [f32], bits: Bits, group: usize) -> Result<(), QuantError> {
    fake_quantize_by(x, bits, group, group_params)
}

/// [`fake_quantize`] with [`clipped_group_params`].
pub fn fake_quantize_clipped(x: &mut [f32], bits: Bits, group: usize) -> Result<(), QuantError> {
    fake_quantize_by(x, bits, group, clipped_group_params)
}

fn fake_quantize_by(
    x: &mut [f32],
    bits: Bits,
    group: usize,
    params: fn(&[f32], Bits) -> Result<GroupParams, QuantError>,
) -> Result<(), QuantError> {
    if group == 0 {
        return Err(QuantError::BadGroup {
            group,
            len: x.len(),
        });
    }
    for chunk in x.chunks_mut(group) {
        let p = params(chunk, bits)?;
        requantize(
            chunk,
            p.scale.to_f32(),
            p.zero.to_f32(),
            bits.max_code() as f32,
        );
    }
    Ok(())
}

/// Fractions of a group's range `fake_quantize_clipped` tries cutting off its bottom and,
/// independently, its top.
pub const CLIP_GRID: [f32; 5] = [0.0, 0.1, 0.2, 0.3, 0.45];

/// Scale and zero of the range `[lo, hi]` (finite, in fp16 range; the scale may overflow).
fn range_params(lo: f32, hi: f32, bits: Bits) -> GroupParams {
    let zero = f16::from_f32(lo);
    // Measure the range from the rounded zero so the top element still fits.
    let range = (hi - zero.to_f32()).max(0.0);
    let scale = if range == 0.0 {
        f16::ZERO
    } else {
        f16_round_up(range / bits.max_code() as f32)
    };
    GroupParams { scale, zero }
}

/// [`group_params`] with the range cut to the [`CLIP_GRID`] narrowing of the group's
/// [min, max] (bottom and top cut apart) that has the least squared error; what falls
/// outside clamps to the end codes. The same scale + zero format, chosen by error rather
/// than by the extremes.
pub fn clipped_group_params(x: &[f32], bits: Bits) -> Result<GroupParams, QuantError> {
    let full = group_params(x, bits)?;
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = hi - lo;
    if x.is_empty() || span == 0.0 {
        return Ok(full);
    }
    let max_code = bits.max_code() as f32;
    let mut trial = Vec::with_capacity(x.len());
    let mut best = (f64::INFINITY, full);
    let cuts = CLIP_GRID
        .iter()
        .flat_map(|&b| CLIP_GRID.iter().map(move |&t| (b, t)));
    for (b, t) in cuts {
        let p = if b == 0.0 && t == 0.0 {
            full
        } else {
            range_params(lo + b * span, hi - t * span, bits)
        };
        trial.clear();
        trial.extend_from_slice(x);
        requantize(&mut trial, p.scale.to_f32(), p.zero.to_f32(), max_code);
        let err: f64 = trial
            .iter()
            .zip(x)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        if err < best.0 {
            best = (err, p);
        }
    }
    Ok(best.1)
}

/// `dequantize(quantize_with(v))` for every element, bit for bit, with the group's fp16
/// parameters converted once (calibration fake-quantizes every K/V of every layer; per
/// element conversions and `roundf` calls made that a third of its measuring time).
fn requantize(x: &mut [f32], scale: f32, zero: f32, max_code: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("sse4.1") {
            #[target_feature(enable = "sse4.1")]
            unsafe fn wide(x: &mut [f32], scale: f32, zero: f32, max_code: f32) {
                requantize_body(x, scale, zero, max_code)
            }
            // SAFETY: the CPU supports the feature `wide` was compiled for (SSE4.1 only
            // lets `round` compile to an instruction; the arithmetic is unchanged).
            return unsafe { wide(x, scale, zero, max_code) };
        }
    }
    requantize_body(x, scale, zero, max_code)
}

#[inline(always)]
fn requantize_body(x: &mut [f32], scale: f32, zero: f32, max_code: f32) {
    if scale == 0.0 {
        // quantize_with gives code 0.
        x.fill(0.0 * scale + zero);
        return;
    }
    for v in x.iter_mut() {
        // The clamped, rounded code is an integer-valued f32: the same number `as u8` gives.
        let code = ((*v - zero) / scale).round().clamp(0.0, max_code);
        *v = code * scale + zero;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The clipped search never does worse than min/max (it tries it), and at INT2 does
    /// better on a group with one outlier.
    #[test]
    fn clipping_never_raises_the_squared_error() {
        let mut s = 3u64;
        let x: Vec<f32> = (0..512)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i == 10 {
                    2.0
                } else {
                    u
                }
            })
            .collect();
        let sse = |y: &[f32], from: usize| -> f64 {
            y[from..from + 64]
                .iter()
                .zip(&x[from..from + 64])
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        for bits in [Bits::B2, Bits::B4] {
            let (mut plain, mut clipped) = (x.clone(), x.clone());
            fake_quantize(&mut plain, bits, 64).unwrap();
            fake_quantize_clipped(&mut clipped, bits, 64).unwrap();
            for g in 0..8 {
                assert!(
                    sse(&clipped, 64 * g) <= sse(&plain, 64 * g) + 1e-9,
                    "{bits:?} group {g}"
                );
            }
            if bits == Bits::B2 {
                assert!(
                    sse(&clipped, 0) < 0.9 * sse(&plain, 0),
                    "outlier group: {} vs {}",
                    sse(&clipped, 0),
                    sse(&plain, 0)
                );
            }
        }
    }

    #[test]
    fn fake_quantize_is_quantize_then_dequantize_bit_for_bit() {
        let mut s = 9u64;
        let mut x: Vec<f32> = (0..4096)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Mixed magnitudes, exact halves of a step, and a constant group.
                if i / 64 == 3 {
                    0.75
                } else if i % 5 == 0 {
                    u * 60.0
                } else {
                    u
                }
            })
            .collect();
        x[77] = -0.0;
        for bits in [Bits::B2, Bits::B4, Bits::B8] {
            for group in [32, 64, 100] {
                let mut fast = x.clone();
                fake_quantize(&mut fast, bits, group).unwrap();
                for (c, (chunk, got)) in x.chunks(group).zip(fast.chunks(group)).enumerate() {
                    let p = group_params(chunk, bits).unwrap();
                    for (j, (&v, &g)) in chunk.iter().zip(got).enumerate() {
                        let want = p.dequantize(quantize_with(v, p, bits));
                        assert_eq!(g.to_bits(), want.to_bits(), "{bits:?} group {c} elem {j}");
                    }
                }
            }
        }
    }

    /// Worst-case error of one element: half a step, plus the fp16 rounding of the zero,
    /// plus f32 arithmetic slack.
    fn bound(x: &[f32], p: GroupParams) -> f32 {
        let lo = x.iter().cloned().fold(f32::INFINITY, f32::min);
        let zero_err = (lo - p.zero.to_f32()).abs();
        let mag = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        p.scale.to_f32() / 2.0 + zero_err + 4.0 * f32::EPSILON * mag.max(1.0)
    }

    proptest! {
        #[test]
        fn round_trip_error_is_bounded(
            x in prop::collection::vec(-100f32..100.0, 1..130),
            bits in prop::sample::select(vec![2u32, 4, 8]),
        ) {
            let bits = Bits::from_u32(bits).unwrap();
            let mut codes = vec![0u8; x.len()];
            let p = quantize_group(&x, bits, &mut codes).unwrap();
            let b = bound(&x, p);
            for (&v, &c) in x.iter().zip(&codes) {
                prop_assert!(c <= bits.max_code());
                let err = (v - p.dequantize(c)).abs();
                prop_assert!(err <= b, "x={v} code={c} err={err} bound={b}");
            }
        }

        #[test]
        fn fewer_bits_never_beat_more_bits_on_the_bound(x in prop::collection::vec(-10f32..10.0, 2..64)) {
            let s2 = group_params(&x, Bits::B2).unwrap().scale.to_f32();
            let s4 = group_params(&x, Bits::B4).unwrap().scale.to_f32();
            let s8 = group_params(&x, Bits::B8).unwrap().scale.to_f32();
            prop_assert!(s2 >= s4 && s4 >= s8);
        }
    }

    #[test]
    fn constant_group_is_exact() {
        let x = [0.5f32; 32];
        let mut codes = [9u8; 32];
        let p = quantize_group(&x, Bits::B2, &mut codes).unwrap();
        assert_eq!(p.scale, f16::ZERO);
        assert!(codes.iter().all(|&c| c == 0));
        assert_eq!(p.dequantize(0), 0.5);
    }

    #[test]
    fn extremes_map_to_end_codes() {
        let x = [-1.0f32, 0.0, 0.3, 2.0];
        let mut codes = [0u8; 4];
        quantize_group(&x, Bits::B4, &mut codes).unwrap();
        assert_eq!(codes[0], 0);
        assert_eq!(codes[3], 15);
    }

    #[test]
    fn non_finite_input_names_the_index() {
        let x = [0.0f32, f32::NAN];
        let err = group_params(&x, Bits::B4).unwrap_err();
        assert!(
            matches!(err, QuantError::OutOfRange { index: 1, .. }),
            "{err}"
        );
        assert!(group_params(&[1e6], Bits::B4).is_err());
    }

    #[test]
    fn fake_quantize_rejects_zero_group() {
        assert!(fake_quantize(&mut [1.0], Bits::B4, 0).is_err());
    }
}
