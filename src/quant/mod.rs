//! Quantizers for KV-cache tokens (asymmetric INT2/INT4/INT8 groups, Hadamard rotation) and
//! the packed block layout the GPU decode kernel reads (`docs/KV_LAYOUT.md`).

pub mod golden;
pub mod hadamard;
pub mod int;
pub mod layout;
pub mod outliers;
pub mod reference;

pub use hadamard::{fwht, fwht_rows};
pub use int::{
    clipped_group_params, fake_quantize, fake_quantize_clipped, group_params, quantize_group,
    quantize_with, Bits, GroupParams,
};
pub use layout::{BlockGeometry, KvClass, QuantizedBlock};
pub use reference::reference_attention;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum QuantError {
    #[error("unsupported bit width {0} (expected 2, 4 or 8)")]
    UnsupportedBits(u32),
    #[error("element {index} = {value} cannot be quantized: not finite or outside the fp16 range")]
    OutOfRange { index: usize, value: f32 },
    #[error("group size {group} does not divide a row of {len} values")]
    BadGroup { group: usize, len: usize },
    #[error("Hadamard rotation needs a power-of-two length, got {0}")]
    NotPowerOfTwo(usize),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("packed block layout: {0}")]
    Layout(String),
}

/// Bits and group size of one quantizer. Each group stores an fp16 scale and an fp16 zero,
/// so the group's overhead is 32 bits spread over its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: Bits,
    /// Elements sharing one scale/zero: head-dimension elements of a token (per-token
    /// groups) or tokens of a block (per-channel key groups).
    pub group: usize,
}

impl QuantSpec {
    /// Bits per element including the scale and zero: `bits + 32 / group`. The budget of
    /// the allocator is always expressed in these.
    pub fn effective_bits(self) -> f64 {
        self.bits.get() as f64 + 32.0 / self.group as f64
    }
}

/// How keys are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyMode {
    /// KIVI-style: each channel of a block of `spec.group` tokens shares a scale and zero
    /// (handles outlier channels). The GPU layout v1 stores keys this way.
    PerChannel,
    /// Groups of `spec.group` head-dimension elements per token, optionally after a
    /// Walsh–Hadamard rotation of the head dimension.
    PerToken { rotate: bool },
}

/// Quantize then dequantize keys `[n, dim]` (one head's tokens, in position order) in
/// place. Per-channel groups run over consecutive blocks of `spec.group` tokens (the last
/// one may be shorter); a rotation is undone afterwards, which is what rotating q would give.
/// `clip`: each group's range by least squared error ([`fake_quantize_clipped`]), else min/max.
pub fn fake_quantize_keys(
    k: &mut [f32],
    dim: usize,
    spec: QuantSpec,
    mode: KeyMode,
    clip: bool,
) -> Result<(), QuantError> {
    let fq = if clip {
        fake_quantize_clipped
    } else {
        fake_quantize
    };
    if dim == 0 || k.len() % dim != 0 {
        return Err(QuantError::Shape(format!(
            "{} key values are not rows of {dim}",
            k.len()
        )));
    }
    match mode {
        KeyMode::PerToken { rotate } => {
            if dim % spec.group != 0 {
                return Err(QuantError::BadGroup {
                    group: spec.group,
                    len: dim,
                });
            }
            if rotate {
                fwht_rows(k, dim)?;
            }
            fq(k, spec.bits, spec.group)?;
            if rotate {
                fwht_rows(k, dim)?;
            }
            Ok(())
        }
        KeyMode::PerChannel => {
            if spec.group == 0 {
                return Err(QuantError::BadGroup { group: 0, len: dim });
            }
            let mut col = Vec::with_capacity(spec.group);
            for block in k.chunks_mut(spec.group * dim) {
                let rows = block.len() / dim;
                for c in 0..dim {
                    col.clear();
                    col.extend((0..rows).map(|r| block[r * dim + c]));
                    fq(&mut col, spec.bits, rows)?;
                    for (r, v) in col.iter().enumerate() {
                        block[r * dim + c] = *v;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Quantize then dequantize values `[n, dim]` in place, per-token groups of `spec.group`
/// (`clip` as for keys).
pub fn fake_quantize_values(
    v: &mut [f32],
    dim: usize,
    spec: QuantSpec,
    clip: bool,
) -> Result<(), QuantError> {
    if dim == 0 || spec.group == 0 || dim % spec.group != 0 || v.len() % dim != 0 {
        return Err(QuantError::BadGroup {
            group: spec.group,
            len: dim,
        });
    }
    if clip {
        fake_quantize_clipped(v, spec.bits, spec.group)
    } else {
        fake_quantize(v, spec.bits, spec.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_bits_count_scale_and_zero() {
        let s = |b, g| QuantSpec { bits: b, group: g }.effective_bits();
        assert_eq!(s(Bits::B2, 32), 3.0);
        assert_eq!(s(Bits::B2, 128), 2.25);
        assert_eq!(s(Bits::B4, 64), 4.5);
        assert_eq!(s(Bits::B8, 128), 8.25);
    }

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn per_channel_keys_beat_per_token_on_an_outlier_channel() {
        let dim = 64;
        let mut k = lcg(128 * dim, 7);
        for r in 0..128 {
            k[r * dim + 5] += 20.0; // a large, stable outlier channel
        }
        let err = |mode| {
            let mut x = k.clone();
            let spec = QuantSpec {
                bits: Bits::B2,
                group: if mode == KeyMode::PerChannel { 64 } else { 32 },
            };
            fake_quantize_keys(&mut x, dim, spec, mode, false).unwrap();
            x.iter().zip(&k).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
        };
        let pc = err(KeyMode::PerChannel);
        let pt = err(KeyMode::PerToken { rotate: false });
        assert!(pc < pt, "per-channel {pc} vs per-token {pt}");
    }

    #[test]
    fn rotation_is_undone() {
        let dim = 64;
        let k = lcg(4 * dim, 3);
        let mut x = k.clone();
        let spec = QuantSpec {
            bits: Bits::B8,
            group: 64,
        };
        fake_quantize_keys(&mut x, dim, spec, KeyMode::PerToken { rotate: true }, false).unwrap();
        let worst = x
            .iter()
            .zip(&k)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.02, "8-bit rotated round trip off by {worst}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let spec = QuantSpec {
            bits: Bits::B4,
            group: 48,
        };
        assert!(fake_quantize_values(&mut [0.0; 128], 128, spec, false).is_err());
        assert!(fake_quantize_keys(&mut [0.0; 100], 64, spec, KeyMode::PerChannel, false).is_err());
    }
}
