//! Attention-output distortion of quantizing one tag's keys or values, for every tag of a
//! layer in one pass over the columns (DESIGN §6), plus the fake quantization it measures.

use super::{CalibrateError, QuantizerSettings};
use crate::kvcache::KvShape;
use crate::linalg::{exp_shifted_sum, expm1_in_place, gemm, Parallelism, Strided};
use crate::quant::{fake_quantize_keys, fake_quantize_values, outliers, Bits, KeyMode, QuantSpec};
use crate::tags::{RecencyUnit, TokenTag, NUM_TAGS};
use std::collections::BTreeMap;
use std::ops::Range;

/// Token sets that stay 16-bit for every query: the first `sinks` positions and the last
/// `window` positions up to and including the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protected {
    pub sinks: usize,
    pub window: usize,
}

impl Protected {
    /// Columns `[sinks, end)` may be quantized for a query at `pos`.
    fn quantized_end(self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.window)
    }
}

impl Default for Protected {
    fn default() -> Self {
        Protected {
            sinks: crate::kvcache::quantized::DEFAULT_SINKS,
            window: crate::kvcache::quantized::DEFAULT_WINDOW,
        }
    }
}

/// Keys and values of one layer after quantize-then-dequantize at one bit width.
#[derive(Debug, Clone)]
pub struct QuantizedLayer {
    pub bits: Bits,
    /// `[len, num_kv_heads, head_dim]`, like the originals.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Fake-quantize a whole layer's keys and values at `bits` as a mixed-precision cache would
/// store them. Per-channel key groups need a set of tokens sharing one class: tokens are
/// grouped by their static tag (role, modality, turn or step index), which always resolves
/// to one tag, in position order, `key_group` at a time. Sinks are never quantized.
/// Every group's range is chosen by least squared error when `clip` (`--compare-quantizers`
/// only: the packed format and the GPU kernel use min/max).
#[allow(clippy::too_many_arguments)]
pub fn quantize_layer(
    shape: KvShape,
    k: &[f32],
    v: &[f32],
    tags: &[TokenTag],
    unit: RecencyUnit,
    sinks: usize,
    bits: Bits,
    q: &QuantizerSettings,
    clip: bool,
) -> Result<QuantizedLayer, CalibrateError> {
    let (kvh, hd) = (shape.num_kv_heads, shape.head_dim);
    let row = kvh * hd;
    let len = tags.len();
    if k.len() != len * row || v.len() != len * row {
        return Err(CalibrateError::Shape(format!(
            "layer holds {} key / {} value values for {len} tokens of {row}",
            k.len(),
            v.len()
        )));
    }
    let mut kq = k.to_vec();
    let mut vq = v.to_vec();
    let start = sinks.min(len);
    let vspec = QuantSpec {
        bits,
        group: q.value_group,
    };
    fake_quantize_values(&mut vq[start * row..], hd, vspec, clip)?;

    // Positions per key group, in order.
    let mut groups: BTreeMap<(u8, u8, u32), Vec<usize>> = BTreeMap::new();
    match q.key_mode {
        KeyMode::PerChannel => {
            for (pos, t) in tags.iter().enumerate().skip(start) {
                let idx = match unit {
                    RecencyUnit::Turn => t.turn,
                    RecencyUnit::Step => t.step,
                };
                groups
                    .entry((t.role as u8, t.modality as u8, idx))
                    .or_default()
                    .push(pos);
            }
        }
        KeyMode::PerToken { .. } => {
            groups.insert((0, 0, 0), (start..len).collect());
        }
    }
    let kspec = QuantSpec {
        bits,
        group: q.key_group,
    };
    let outliers = q.key_outliers_ppm > 0 && q.key_mode == KeyMode::PerChannel;
    if outliers && clip {
        return Err(CalibrateError::Option(
            "key outliers are kept over min/max ranges, not clipped ones".into(),
        ));
    }
    // Keys are gathered per KV head, or per whole row when outliers are pooled over the heads
    // (the cache's seal).
    let (width, parts) = if outliers && q.key_outliers_pooled {
        (row, 1)
    } else {
        (hd, kvh)
    };
    let mut rows = Vec::new();
    for positions in groups.values() {
        for g in 0..parts {
            let span = |p: usize| p * row + g * width..p * row + (g + 1) * width;
            rows.clear();
            for &p in positions {
                rows.extend_from_slice(&k[span(p)]);
            }
            if outliers {
                outliers::fake_quantize_keys(
                    &mut rows,
                    width,
                    hd,
                    q.key_group,
                    bits,
                    q.key_outliers(),
                    q.key_outliers_pooled,
                )?;
            } else {
                fake_quantize_keys(&mut rows, hd, kspec, q.key_mode, clip)?;
            }
            for (i, &p) in positions.iter().enumerate() {
                kq[span(p)].copy_from_slice(&rows[i * width..(i + 1) * width]);
            }
        }
    }
    Ok(QuantizedLayer { bits, k: kq, v: vq })
}

/// Summed distortion of one layer: `[bits][kv][tag]`, kv 0 = keys, 1 = values.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerDistortion {
    /// Sum over queries (where the tag had quantized columns) of the head-averaged
    /// `||O' - O||² / ||O||²`.
    pub sum: Vec<[Vec<f64>; 2]>,
    /// Number of queries that saw at least one quantized column of the tag.
    pub queries: Vec<u64>,
}

impl LayerDistortion {
    fn new(n_bits: usize) -> Self {
        LayerDistortion {
            sum: (0..n_bits)
                .map(|_| [vec![0.0; NUM_TAGS], vec![0.0; NUM_TAGS]])
                .collect(),
            queries: vec![0; NUM_TAGS],
        }
    }
}

/// Per query position: the tag id of each column it may quantize (`None` for protected
/// columns), and the column count per tag.
fn column_tags(tags: &[TokenTag], unit: RecencyUnit, prot: Protected, pos: usize) -> Vec<u8> {
    let now = tags[pos];
    let end = prot.quantized_end(pos);
    (0..end)
        .map(|j| {
            if j < prot.sinks {
                u8::MAX
            } else {
                tags[j].at(unit, now.turn, now.step).id().0
            }
        })
        .collect()
}

/// Mean number of quantizable columns of each tag per query (the tag's share of the cache
/// at decode time, what the allocator pays for).
pub fn column_counts(
    tags: &[TokenTag],
    unit: RecencyUnit,
    prot: Protected,
    positions: &[usize],
) -> Vec<u64> {
    let mut counts = vec![0u64; NUM_TAGS];
    for &pos in positions {
        for id in column_tags(tags, unit, prot, pos) {
            if (id as usize) < NUM_TAGS {
                counts[id as usize] += 1;
            }
        }
    }
    counts
}

/// The columns of one layer in the order the distortion pass reads them: the sinks first,
/// then every other token sorted by (role, modality, turn|step index, position). A token's
/// tag for a query depends only on that key and the query's own turn|step, and recency is
/// monotone in the index, so for any query each tag's columns are a few contiguous runs.
struct ColumnOrder {
    /// Sorted index → position.
    pos: Vec<usize>,
    /// Sink columns at the front (`pos[i] == i`).
    sinks: usize,
    /// Runs of one static key: sorted range and one token of it (for `TokenTag::at`).
    runs: Vec<(Range<usize>, TokenTag)>,
}

impl ColumnOrder {
    fn new(tags: &[TokenTag], unit: RecencyUnit, sinks: usize) -> ColumnOrder {
        let sinks = sinks.min(tags.len());
        let key = |p: usize| {
            let t = tags[p];
            (t.role as u8, t.modality as u8, unit_index(t, unit))
        };
        let mut pos: Vec<usize> = (0..tags.len()).collect();
        pos[sinks..].sort_by_key(|&p| (key(p), p));
        let mut runs: Vec<(Range<usize>, TokenTag)> = Vec::new();
        for i in sinks..pos.len() {
            match runs.last_mut() {
                Some((r, _)) if key(pos[r.start]) == key(pos[i]) => r.end = i + 1,
                _ => runs.push((i..i + 1, tags[pos[i]])),
            }
        }
        ColumnOrder { pos, sinks, runs }
    }
}

fn unit_index(t: TokenTag, unit: RecencyUnit) -> u32 {
    match unit {
        RecencyUnit::Turn => t.turn,
        RecencyUnit::Step => t.step,
    }
}

/// A contiguous range of sorted columns read as one tag (`None`: the sinks).
#[derive(Debug, Clone)]
struct Piece {
    cols: Range<usize>,
    tag: Option<u8>,
}

/// Queries measured together: consecutive ones that resolve recency against the same
/// turn|step, so they share the column → tag map.
struct QueryBlock {
    /// Indices into `positions`.
    queries: Range<usize>,
    /// The sorted columns any of them can see, cut into single-tag pieces.
    pieces: Vec<Piece>,
}

/// Queries per block: bounds the score matrices to `QUERIES_PER_BLOCK * group` rows.
const QUERIES_PER_BLOCK: usize = 32;

fn query_blocks(
    order: &ColumnOrder,
    positions: &[usize],
    tags: &[TokenTag],
    unit: RecencyUnit,
) -> Vec<QueryBlock> {
    let mut blocks = Vec::new();
    let mut a = 0;
    while a < positions.len() {
        let now = tags[positions[a]];
        let mut b = a + 1;
        while b < positions.len()
            && b - a < QUERIES_PER_BLOCK
            && unit_index(tags[positions[b]], unit) == unit_index(now, unit)
        {
            b += 1;
        }
        let last = positions[a..b].iter().copied().max().unwrap_or(0);
        let mut pieces = vec![Piece {
            cols: 0..order.sinks.min(last + 1),
            tag: None,
        }];
        for (run, tok) in &order.runs {
            let tag = tok.at(unit, now.turn, now.step).id().0;
            // Positions ascend within a run: keep those the block can see.
            let cut = run.start + order.pos[run.clone()].partition_point(|&p| p <= last);
            if cut == run.start {
                continue;
            }
            match pieces.last_mut() {
                Some(p) if p.cols.end == run.start && p.tag == Some(tag) => p.cols.end = cut,
                _ => pieces.push(Piece {
                    cols: run.start..cut,
                    tag: Some(tag),
                }),
            }
        }
        blocks.push(QueryBlock {
            queries: a..b,
            pieces,
        });
        a = b;
    }
    blocks
}

/// One KV head's columns in sorted order, `[len, head_dim]` each: keys, values centred on
/// their mean (so that `Σ dE_j v_j - O Σ dE_j` does not cancel a large common component),
/// and per variant the quantization errors of keys and values.
struct HeadColumns {
    k: Vec<f32>,
    v_centred: Vec<f32>,
    mean: Vec<f32>,
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
}

impl HeadColumns {
    fn gather(
        order: &ColumnOrder,
        k: &[f32],
        v: &[f32],
        variants: &[QuantizedLayer],
        row: usize,
        g: usize,
        hd: usize,
    ) -> HeadColumns {
        let col = |j: usize| j * row + g * hd..j * row + (g + 1) * hd;
        let len = order.pos.len();
        let mut mean64 = vec![0.0f64; hd];
        for j in 0..len {
            for (m, &x) in mean64.iter_mut().zip(&v[col(j)]) {
                *m += x as f64;
            }
        }
        let mean: Vec<f32> = mean64
            .iter()
            .map(|m| (m / len.max(1) as f64) as f32)
            .collect();
        let mut ks = Vec::with_capacity(len * hd);
        let mut vc = Vec::with_capacity(len * hd);
        for &p in &order.pos {
            ks.extend_from_slice(&k[col(p)]);
            vc.extend(v[col(p)].iter().zip(&mean).map(|(x, m)| x - m));
        }
        let delta = |quant: &[f32], orig: &[f32]| -> Vec<f32> {
            let mut d = Vec::with_capacity(len * hd);
            for &p in &order.pos {
                d.extend(quant[col(p)].iter().zip(&orig[col(p)]).map(|(a, b)| a - b));
            }
            d
        };
        HeadColumns {
            dk: variants.iter().map(|var| delta(&var.k, k)).collect(),
            dv: variants.iter().map(|var| delta(&var.v, v)).collect(),
            k: ks,
            v_centred: vc,
            mean,
        }
    }
}

/// Distortion of every tag of one layer, for each quantized variant (bit width).
///
/// `k`, `v`: the layer's originals `[len, num_kv_heads, head_dim]`; `q`: `[positions.len(),
/// num_heads, head_dim]`, the post-RoPE queries at `positions`; `tags`: every token's tag.
/// Recency resolves against each query's own turn/step. Values change the output by
/// `Σ_{j∈t} p_j (v'_j − v_j)`; keys move each tag's softmax numerator and denominator by
/// the changed columns' `e'_j − e_j = e_j (exp(Δs_j) − 1)`, so every tag of a layer costs
/// one attention pass in total (DESIGN §6). The passes run as GEMMs: per KV head and block
/// of queries, the query heads sharing the KV head are stacked, columns are visited tag by
/// tag in [`ColumnOrder`], and every per-tag sum is a product of a weight matrix with the
/// tag's columns.
#[allow(clippy::too_many_arguments)]
pub fn layer_distortion(
    shape: KvShape,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    positions: &[usize],
    tags: &[TokenTag],
    unit: RecencyUnit,
    prot: Protected,
    variants: &[QuantizedLayer],
) -> LayerDistortion {
    let (nh, kvh, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let row = kvh * hd;
    let nb = variants.len();
    let mut res = LayerDistortion::new(nb);
    let order = ColumnOrder::new(tags, unit, prot.sinks);
    let blocks = query_blocks(&order, positions, tags, unit);
    // Per query, summed over heads: [kv][bits][tag]; and which tags it can quantize.
    let mut qsum = vec![0.0f64; positions.len() * 2 * nb * NUM_TAGS];
    let mut present = vec![[false; NUM_TAGS]; positions.len()];
    for g in 0..kvh {
        let cols = HeadColumns::gather(&order, k, v, variants, row, g, hd);
        for block in &blocks {
            measure_block(
                shape,
                &order,
                &cols,
                block,
                q,
                positions,
                prot,
                g,
                nb,
                &mut qsum,
                &mut present,
            );
        }
    }
    for (qi, pres) in present.iter().enumerate() {
        for t in (0..NUM_TAGS).filter(|&t| pres[t]) {
            res.queries[t] += 1;
            for b in 0..nb {
                for kv in 0..2 {
                    res.sum[b][kv][t] += qsum[((qi * 2 + kv) * nb + b) * NUM_TAGS + t] / nh as f64;
                }
            }
        }
    }
    res
}

/// The distortion pass of one query block against KV head `g`: adds each (query, tag)'s
/// head-summed relative errors into `qsum` and marks the tags it can quantize.
#[allow(clippy::too_many_arguments)]
fn measure_block(
    shape: KvShape,
    order: &ColumnOrder,
    cols: &HeadColumns,
    block: &QueryBlock,
    q: &[f32],
    positions: &[usize],
    prot: Protected,
    g: usize,
    nb: usize,
    qsum: &mut [f64],
    present: &mut [[bool; NUM_TAGS]],
) {
    let (nh, hd) = (shape.num_heads, shape.head_dim);
    let group = nh / shape.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let queries = block.queries.clone();
    let rows = queries.len() * group;
    // Row r = query queries.start + r / group, head g * group + r % group.
    let mut qb = Vec::with_capacity(rows * hd);
    for qi in queries.clone() {
        let off = (qi * nh + g * group) * hd;
        qb.extend_from_slice(&q[off..off + group * hd]);
    }
    let row_pos = |r: usize| positions[queries.start + r / group];
    // Concatenated piece columns: offset of each piece and every column's position.
    let mut offsets = Vec::with_capacity(block.pieces.len());
    let mut colpos = Vec::new();
    for p in &block.pieces {
        offsets.push(colpos.len());
        colpos.extend_from_slice(&order.pos[p.cols.clone()]);
    }
    let c = colpos.len();
    let mut slot_of = [usize::MAX; NUM_TAGS];
    let mut slot_tag = Vec::new();
    for t in block.pieces.iter().filter_map(|p| p.tag) {
        if slot_of[t as usize] == usize::MAX {
            slot_of[t as usize] = slot_tag.len();
            slot_tag.push(t as usize);
        }
    }
    let ns = slot_tag.len();

    // Scores of every piece, then softmax weights over the visible columns.
    let product = |dst: &mut [f32], keys: &[f32], p: usize, sc: f32| {
        let cols_p = block.pieces[p].cols.clone();
        gemm(
            &mut dst[offsets[p]..],
            c,
            (rows, cols_p.len(), hd),
            Strided::rows(&qb, hd),
            Strided::transposed(&keys[cols_p.start * hd..], hd),
            false,
            sc,
            Parallelism::None,
        );
    };
    let mut e = vec![0.0f32; rows * c];
    for p in 0..block.pieces.len() {
        product(&mut e, &cols.k, p, scale);
    }
    let mut z = vec![0.0f64; rows];
    for (r, er) in e.chunks_mut(c).enumerate() {
        let pos = row_pos(r);
        for (x, &cp) in er.iter_mut().zip(&colpos) {
            if cp > pos {
                *x = f32::NEG_INFINITY;
            }
        }
        let m = er.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        z[r] = exp_shifted_sum(er, m) as f64;
    }
    let mut n = vec![0.0f32; rows * hd];
    for (p, piece) in block.pieces.iter().enumerate() {
        gemm(
            &mut n,
            hd,
            (rows, hd, piece.cols.len()),
            Strided::rows(&e[offsets[p]..], c),
            Strided::rows(&cols.v_centred[piece.cols.start * hd..], hd),
            true,
            1.0,
            Parallelism::None,
        );
    }
    // Weights of the quantizable columns only: protected and unseen ones are 0.
    let mut w = vec![0.0f32; rows * c];
    for r in 0..rows {
        let end = prot.quantized_end(row_pos(r));
        for (p, piece) in block.pieces.iter().enumerate() {
            let Some(t) = piece.tag else { continue };
            let span = offsets[p]..offsets[p] + piece.cols.len();
            let mut any = false;
            for ci in span {
                if colpos[ci] < end {
                    w[r * c + ci] = e[r * c + ci];
                    any = true;
                }
            }
            if any && r % group == 0 {
                present[queries.start + r / group][t as usize] = true;
            }
        }
    }

    let mut de = vec![0.0f32; rows * c];
    let mut acc_v = vec![0.0f32; rows * ns * hd];
    let mut acc_n = vec![0.0f32; rows * ns * hd];
    let mut acc_z = vec![0.0f64; rows * ns];
    for b in 0..nb {
        acc_v.fill(0.0);
        acc_n.fill(0.0);
        acc_z.fill(0.0);
        for (p, piece) in block.pieces.iter().enumerate() {
            let Some(t) = piece.tag else { continue };
            let s = slot_of[t as usize];
            let (off, len) = (offsets[p], piece.cols.len());
            // e'_j - e_j = e_j (exp(Δs_j) - 1), with Δs from the key error directly.
            product(&mut de, &cols.dk[b], p, scale);
            for r in 0..rows {
                let span = r * c + off..r * c + off + len;
                expm1_in_place(&mut de[span.clone()]);
                let mut dz = 0.0f64;
                for (d, &wt) in de[span.clone()].iter_mut().zip(&w[span]) {
                    *d *= wt;
                    dz += *d as f64;
                }
                acc_z[r * ns + s] += dz;
            }
            let src = piece.cols.start * hd;
            gemm(
                &mut acc_v[s * hd..],
                ns * hd,
                (rows, hd, len),
                Strided::rows(&w[off..], c),
                Strided::rows(&cols.dv[b][src..], hd),
                true,
                1.0,
                Parallelism::None,
            );
            gemm(
                &mut acc_n[s * hd..],
                ns * hd,
                (rows, hd, len),
                Strided::rows(&de[off..], c),
                Strided::rows(&cols.v_centred[src..], hd),
                true,
                1.0,
                Parallelism::None,
            );
        }
        for r in 0..rows {
            let qi = queries.start + r / group;
            let zr = z[r];
            let nr = &n[r * hd..(r + 1) * hd];
            // ||O||² with O = N_centred / Z + mean.
            let o2 = nr
                .iter()
                .zip(&cols.mean)
                .map(|(&x, &m)| (x as f64 / zr + m as f64).powi(2))
                .sum::<f64>()
                .max(1e-30);
            for (s, &t) in slot_tag.iter().enumerate() {
                if !present[qi][t] {
                    continue;
                }
                let base = (r * ns + s) * hd;
                let ev: f64 = acc_v[base..base + hd]
                    .iter()
                    .map(|&x| (x as f64 / zr).powi(2))
                    .sum();
                // O' - O = (dN - O dZ) / (Z + dZ); with centred values dN - O dZ equals
                // dN_c - (N_c / Z) dZ.
                let dz = acc_z[r * ns + s];
                let ek: f64 = acc_n[base..base + hd]
                    .iter()
                    .zip(nr)
                    .map(|(&dn, &x)| ((dn as f64 - x as f64 / zr * dz) / (zr + dz)).powi(2))
                    .sum();
                qsum[((qi * 2) * nb + b) * NUM_TAGS + t] += ek / o2;
                qsum[((qi * 2 + 1) * nb + b) * NUM_TAGS + t] += ev / o2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Role, Tag, TagId};
    use rand::{Rng, SeedableRng};

    fn naive_attention(
        shape: KvShape,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        pos: usize,
        h: usize,
    ) -> Vec<f64> {
        let hd = shape.head_dim;
        let g = h / (shape.num_heads / shape.num_kv_heads);
        let row = shape.num_kv_heads * hd;
        let s: Vec<f64> = (0..=pos)
            .map(|j| {
                (0..hd)
                    .map(|i| q[h * hd + i] as f64 * k[j * row + g * hd + i] as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..hd)
            .map(|i| {
                (0..=pos)
                    .map(|j| w[j] / z * v[j * row + g * hd + i] as f64)
                    .sum()
            })
            .collect()
    }

    /// One synthetic layer: tags cycling through roles, turns and steps, random K/V/Q.
    struct Case {
        shape: KvShape,
        tags: Vec<TokenTag>,
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
        positions: Vec<usize>,
        prot: Protected,
    }

    #[allow(clippy::too_many_arguments)]
    fn case(
        shape: KvShape,
        len: usize,
        (turn_every, step_every, role_every): (usize, usize, usize),
        positions: Vec<usize>,
        prot: Protected,
        value_offset: f32,
        seed: u64,
    ) -> Case {
        let row = shape.num_kv_heads * shape.head_dim;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let roles = [
            Role::System,
            Role::User,
            Role::Observation,
            Role::Assistant,
            Role::Template,
        ];
        let mut tags = Vec::new();
        let (mut turn, mut step) = (0u32, 0u32);
        for p in 0..len {
            if p % turn_every == 0 {
                turn += 1;
            }
            if p % step_every == 0 {
                step += 1;
            }
            tags.push(TokenTag {
                role: roles[(p / role_every) % roles.len()],
                modality: if p % 13 == 0 {
                    Modality::Image
                } else {
                    Modality::Text
                },
                turn,
                step,
            });
        }
        let mut rnd = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amp)
                .collect()
        };
        let k = rnd(len * row, 2.0);
        // A large common component on some value channels (as real models have) is what
        // makes an uncentred `dN - O dZ` cancel.
        let mut v = rnd(len * row, 1.0);
        for (i, x) in v.iter_mut().enumerate() {
            if (i % shape.head_dim) % 7 == 0 {
                *x += value_offset;
            }
        }
        let q = rnd(positions.len() * shape.num_heads * shape.head_dim, 1.5);
        Case {
            shape,
            tags,
            k,
            v,
            q,
            positions,
            prot,
        }
    }

    /// Brute force: for each tag, replace only that tag's quantizable columns and recompute
    /// attention from scratch; the one-pass result must agree.
    fn check_against_brute_force(c: &Case, settings: &[QuantizerSettings]) {
        let Case {
            shape,
            ref tags,
            ref k,
            ref v,
            ref q,
            ref positions,
            prot,
        } = *c;
        let row = shape.num_kv_heads * shape.head_dim;
        for unit in [RecencyUnit::Turn, RecencyUnit::Step] {
            for settings in settings {
                let variants: Vec<QuantizedLayer> = [Bits::B2, Bits::B4]
                    .into_iter()
                    .map(|b| {
                        quantize_layer(shape, k, v, tags, unit, prot.sinks, b, settings, false)
                            .unwrap()
                    })
                    .collect();
                let fast = layer_distortion(shape, k, v, q, positions, tags, unit, prot, &variants);
                let mut checked = 0;
                for tid in 0..NUM_TAGS {
                    let tag = Tag::from_id(TagId(tid as u8)).unwrap();
                    for (b, var) in variants.iter().enumerate() {
                        for kv in 0..2 {
                            let mut sum = 0.0;
                            let mut count = 0u64;
                            for (qi, &pos) in positions.iter().enumerate() {
                                let now = tags[pos];
                                let cols: Vec<usize> = (prot.sinks..prot.quantized_end(pos))
                                    .filter(|&j| tags[j].at(unit, now.turn, now.step) == tag)
                                    .collect();
                                if cols.is_empty() {
                                    continue;
                                }
                                count += 1;
                                let (mut km, mut vm) = (k.clone(), v.clone());
                                for &j in &cols {
                                    let r = j * row..(j + 1) * row;
                                    if kv == 0 {
                                        km[r.clone()].copy_from_slice(&var.k[r]);
                                    } else {
                                        vm[r.clone()].copy_from_slice(&var.v[r]);
                                    }
                                }
                                let qrow = &q[qi * shape.num_heads * shape.head_dim..];
                                let mut r = 0.0;
                                for h in 0..shape.num_heads {
                                    let o = naive_attention(shape, k, v, qrow, pos, h);
                                    let o2 = naive_attention(shape, &km, &vm, qrow, pos, h);
                                    let num: f64 =
                                        o.iter().zip(&o2).map(|(a, b)| (a - b).powi(2)).sum();
                                    let den: f64 = o.iter().map(|a| a * a).sum();
                                    r += num / den;
                                }
                                sum += r / shape.num_heads as f64;
                            }
                            assert_eq!(fast.queries[tid], count, "{tag}: query count");
                            let got = fast.sum[b][kv][tid];
                            assert!(
                                (got - sum).abs() <= 1e-4 * sum.abs() + 1e-9,
                                "{tag} bits {:?} kv {kv} {unit:?}: one pass {got} vs brute force {sum}",
                                var.bits
                            );
                            if sum > 0.0 {
                                checked += 1;
                            }
                        }
                    }
                }
                assert!(checked >= 16, "only {checked} non-trivial comparisons");
            }
        }
    }

    #[test]
    fn one_pass_equals_brute_force_per_tag() {
        let shape = KvShape {
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
        };
        let c = case(
            shape,
            90,
            (23, 11, 7),
            vec![30, 47, 60, 75, 89],
            Protected {
                sinks: 4,
                window: 16,
            },
            0.0,
            11,
        );
        check_against_brute_force(
            &c,
            &[
                QuantizerSettings::default(),
                QuantizerSettings {
                    key_mode: KeyMode::PerToken { rotate: true },
                    key_group: 32,
                    value_group: 32,
                    ..QuantizerSettings::default()
                },
            ],
        );
    }

    /// Longer turns than a query block holds (blocks split), unsorted positions, a turn
    /// with no query, and values with a large common component.
    #[test]
    fn one_pass_equals_brute_force_with_split_blocks_and_offset_values() {
        let shape = KvShape {
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
        };
        let mut positions: Vec<usize> = (150..190).step_by(1).collect();
        positions.extend([299, 80, 260, 10, 3]);
        let c = case(
            shape,
            300,
            (100, 37, 9),
            positions,
            Protected {
                sinks: 4,
                window: 24,
            },
            1000.0,
            12,
        );
        check_against_brute_force(
            &c,
            &[QuantizerSettings {
                key_mode: KeyMode::PerChannel,
                key_group: 64,
                value_group: 32,
                ..QuantizerSettings::default()
            }],
        );
    }

    #[test]
    fn more_bits_less_distortion_and_sinks_untouched() {
        let shape = KvShape {
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 64,
        };
        let len = 40;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let k: Vec<f32> = (0..len * 64).map(|_| rng.random::<f32>() - 0.5).collect();
        let v: Vec<f32> = (0..len * 64).map(|_| rng.random::<f32>() - 0.5).collect();
        let tags = vec![
            TokenTag {
                role: Role::User,
                modality: Modality::Text,
                turn: 1,
                step: 0
            };
            len
        ];
        let s = QuantizerSettings::default();
        let v2 = quantize_layer(
            shape,
            &k,
            &v,
            &tags,
            RecencyUnit::Turn,
            4,
            Bits::B2,
            &s,
            false,
        )
        .unwrap();
        let v4 = quantize_layer(
            shape,
            &k,
            &v,
            &tags,
            RecencyUnit::Turn,
            4,
            Bits::B4,
            &s,
            false,
        )
        .unwrap();
        assert_eq!(&v2.k[..4 * 64], &k[..4 * 64]);
        assert_eq!(&v2.v[..4 * 64], &v[..4 * 64]);
        let q: Vec<f32> = (0..2 * 64).map(|_| rng.random::<f32>()).collect();
        let prot = Protected {
            sinks: 4,
            window: 8,
        };
        let d = layer_distortion(
            shape,
            &k,
            &v,
            &q,
            &[39],
            &tags,
            RecencyUnit::Turn,
            prot,
            &[v2, v4],
        );
        let id = tags[0].at(RecencyUnit::Turn, 1, 0).id().0 as usize;
        assert_eq!(d.queries[id], 1);
        for kv in 0..2 {
            assert!(
                d.sum[0][kv][id] > d.sum[1][kv][id],
                "kv {kv}: 2-bit must distort more than 4-bit"
            );
            assert!(d.sum[1][kv][id] > 0.0);
        }
        assert_eq!(
            column_counts(&tags, RecencyUnit::Turn, prot, &[39])[id],
            40 - 8 - 4
        );
    }

    /// Calibration's keys with outliers (`calibrate --key-outliers`, per KV head or pooled)
    /// are the keys the CPU cache decodes after sealing the same key groups, bit for bit.
    #[test]
    fn key_outliers_quantize_as_the_cache_seals() {
        use crate::kvcache::quantized::{KvPolicy, PrecisionClass, QuantCache, QuantCacheConfig};
        use crate::kvcache::KvCache;
        let shape = KvShape {
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
        };
        let (len, row) = (128, 128);
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut k: Vec<f32> = (0..len * row).map(|_| rng.random::<f32>() - 0.5).collect();
        // Spikes, more of them in head 1, so pooling moves entries between heads.
        for i in (0..k.len()).step_by(89) {
            k[i] *= if (i % row) >= 64 { 30.0 } else { 8.0 };
        }
        // The cache stages keys at 16 bits before sealing them.
        for x in &mut k {
            *x = half::f16::from_f32(*x).to_f32();
        }
        let v: Vec<f32> = (0..len * row).map(|_| rng.random::<f32>() - 0.5).collect();
        let tags = vec![
            TokenTag {
                role: Role::Observation,
                modality: Modality::Text,
                turn: 1,
                step: 0
            };
            len
        ];
        for pooled in [false, true] {
            let q = QuantizerSettings {
                key_outliers_ppm: 5000,
                key_outliers_pooled: pooled,
                ..QuantizerSettings::default()
            };
            let got = quantize_layer(
                shape,
                &k,
                &v,
                &tags,
                RecencyUnit::Turn,
                0,
                Bits::B2,
                &q,
                false,
            )
            .unwrap();
            let cfg = QuantCacheConfig {
                sinks: 0,
                window: 0,
                key_outliers: 0.005,
                key_outliers_pooled: pooled,
                ..QuantCacheConfig::default()
            };
            let policy = KvPolicy::uniform(1, PrecisionClass::new(2, 2).unwrap());
            let mut c = QuantCache::new(shape, policy, cfg).unwrap();
            c.append(0, &k, &v, &tags);
            assert!(c.error().is_none());
            let want = c.dequantize(0).unwrap().0;
            assert_eq!(got.k, want, "pooled {pooled}");
            let plain = quantize_layer(
                shape,
                &k,
                &v,
                &tags,
                RecencyUnit::Turn,
                0,
                Bits::B2,
                &QuantizerSettings::default(),
                false,
            )
            .unwrap();
            let err = |y: &[f32]| -> f64 {
                y.iter()
                    .zip(&k)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum()
            };
            assert!(
                err(&got.k) < 0.5 * err(&plain.k),
                "pooled {pooled}: outliers {} vs none {}",
                err(&got.k),
                err(&plain.k)
            );
        }
    }
}
