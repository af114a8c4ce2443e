//! Dense-and-sparse keys (KVQuant, arXiv 2401.18079): a few elements of each per-channel key
//! group are kept out of the quantization, so the other values of their channels get a
//! narrower range. Shared by the CPU cache and the packed block layout
//! (`docs/KV_LAYOUT.md`, "Key outliers"): each kept element is one u32 entry, its fp16
//! correction `δ = x - x̂` (the value minus what its code decodes to) in the low half and
//! `token * head_dim + channel` in the high half; unused entries are 0 (`δ = 0`: no-ops).

use super::int::{group_params, quantize_with};
use super::{Bits, QuantError};
use half::f16;

/// Entries per key group of `k_group` tokens and `head_dim` channels for a kept `fraction`
/// of its elements (rounded up).
pub fn per_group(fraction: f64, k_group: usize, head_dim: usize) -> usize {
    (fraction.max(0.0) * (k_group * head_dim) as f64).ceil() as usize
}

/// The rows of each channel to keep, `n` in all: greedily, one at a time, the channel end
/// (its lowest or highest remaining value) whose removal shrinks that channel's squared
/// range most, since a per-channel group's error grows with the square of its range. Two
/// values of every channel always remain.
pub fn choose(cols: &[Vec<f32>], n: usize) -> Vec<Vec<usize>> {
    let mut kept = vec![Vec::new(); cols.len()];
    if n == 0 {
        return kept;
    }
    let order: Vec<Vec<usize>> = cols
        .iter()
        .map(|col| {
            let mut o: Vec<usize> = (0..col.len()).collect();
            o.sort_by(|&a, &b| col[a].total_cmp(&col[b]));
            o
        })
        .collect();
    // (taken from the bottom, taken from the top) per channel.
    let mut ends = vec![(0usize, 0usize); cols.len()];
    for _ in 0..n {
        let mut best: Option<(f32, usize, bool)> = None;
        for (c, col) in cols.iter().enumerate() {
            let (lo, hi) = ends[c];
            let len = col.len();
            if lo + hi + 2 >= len {
                continue;
            }
            let at = |i: usize| col[order[c][i]];
            let range = at(len - 1 - hi) - at(lo);
            for top in [false, true] {
                let narrowed = if top {
                    at(len - 2 - hi) - at(lo)
                } else {
                    at(len - 1 - hi) - at(lo + 1)
                };
                let gain = range * range - narrowed * narrowed;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, c, top));
                }
            }
        }
        let Some((_, c, top)) = best else { break };
        let len = cols[c].len();
        let (lo, hi) = &mut ends[c];
        if top {
            kept[c].push(order[c][len - 1 - *hi]);
            *hi += 1;
        } else {
            kept[c].push(order[c][*lo]);
            *lo += 1;
        }
    }
    kept
}

/// The values of `col` whose rows are not in `kept`: what the channel's range spans.
pub fn inliers(col: &[f32], kept: &[usize]) -> Vec<f32> {
    col.iter()
        .enumerate()
        .filter(|(r, _)| !kept.contains(r))
        .map(|(_, &x)| x)
        .collect()
}

/// One entry: `δ` at `(token, channel)` of a block with `head_dim` channels.
pub fn entry(token: usize, channel: usize, head_dim: usize, delta: f16) -> u32 {
    (((token * head_dim + channel) as u32) << 16) | delta.to_bits() as u32
}

/// `(token, channel, δ)` of an entry.
pub fn read(e: u32, head_dim: usize) -> (usize, usize, f16) {
    let at = (e >> 16) as usize;
    (at / head_dim, at % head_dim, f16::from_bits(e as u16))
}

/// Quantize-then-dequantize per-channel key groups of `group` rows (the last may be shorter)
/// as the CPU cache seals them with dense-and-sparse keys (`calibrate --key-outliers`):
/// `rows` is `[n][width]`, `width` a multiple of `head_dim`. Each group keeps
/// `per_group(fraction, its rows, head_dim)` elements per head — chosen within the head, or
/// when `pooled` over all heads of the row together (as many in all) — at `x̂ + f16(x − x̂)`;
/// every other value becomes its code's value over its channel's range without the kept ones.
pub fn fake_quantize_keys(
    rows: &mut [f32],
    width: usize,
    head_dim: usize,
    group: usize,
    bits: Bits,
    fraction: f64,
    pooled: bool,
) -> Result<(), QuantError> {
    if head_dim == 0 || width % head_dim != 0 || rows.len() % width != 0 || group == 0 {
        return Err(QuantError::Shape(format!(
            "{} key values are not rows of {width} in heads of {head_dim} (groups of {group})",
            rows.len()
        )));
    }
    let heads = width / head_dim;
    for block in rows.chunks_mut(group * width) {
        let n_rows = block.len() / width;
        let cols: Vec<Vec<f32>> = (0..width)
            .map(|c| (0..n_rows).map(|r| block[r * width + c]).collect())
            .collect();
        let n = per_group(fraction, n_rows, head_dim);
        let kept = if pooled {
            choose(&cols, n * heads)
        } else {
            cols.chunks(head_dim).flat_map(|h| choose(h, n)).collect()
        };
        for (c, col) in cols.iter().enumerate() {
            let p = group_params(&inliers(col, &kept[c]), bits)?;
            for (r, &x) in col.iter().enumerate() {
                let xq = p.dequantize(quantize_with(x, p, bits));
                block[r * width + c] = if kept[c].contains(&r) {
                    xq + f16::from_f32(x - xq).to_f32()
                } else {
                    xq
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The far spike goes first, then the spike of the wider channel, never more than a
    /// channel can give.
    #[test]
    fn choose_takes_the_ends_that_narrow_ranges_most() {
        let cols = vec![
            vec![0.0, 1.0, 10.0, 0.5], // spike 10 at row 2
            vec![0.0, -3.0, 0.2, 0.1], // spike -3 at row 1
            vec![0.1, 0.2, 0.3, 0.4],  // no spike
        ];
        assert_eq!(choose(&cols, 0), vec![Vec::<usize>::new(); 3]);
        assert_eq!(choose(&cols, 1), vec![vec![2], vec![], vec![]]);
        assert_eq!(choose(&cols, 2), vec![vec![2], vec![1], vec![]]);
        let k = choose(&cols, 100);
        assert!(k.iter().all(|c| c.len() <= 2), "{k:?}");
        assert_eq!(k.iter().map(Vec::len).sum::<usize>(), 6);
    }

    #[test]
    fn entries_round_trip_and_count_up() {
        let d = f16::from_f32(-3.25);
        assert_eq!(read(entry(127, 127, 128, d), 128), (127, 127, d));
        assert_eq!(read(0, 128), (0, 0, f16::ZERO));
        assert_eq!(per_group(0.005, 64, 128), 41);
        assert_eq!(per_group(0.005, 64, 64), 21);
        assert_eq!(per_group(0.0, 64, 128), 0);
    }
}
