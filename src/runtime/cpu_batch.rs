//! The CPU forward pass over several sequences at once: the projections and the MLP run as
//! one product over every sequence's new rows (the weights are read once per step, which is
//! what makes batched decoding faster than one sequence after another), while RoPE
//! positions and attention stay per sequence, each through its own KV cache.
//!
//! With one sequence it performs exactly the operations of `Model::forward`, in the same
//! order, so its logits are bit-for-bit those of `triaxkv generate`.

use crate::kvcache::KvCache;
use crate::model::llama::{
    add_bias, add_in_place, inv_freq, matmul, rmsnorm, rmsnorm_in_place, silu, Model,
};
use crate::model::weights::Matrix;
use crate::tags::TokenTag;
use rayon::prelude::*;

/// Up to this many rows, a batched product splits the weight rows over threads (each reads
/// its weights once for all rows) instead of calling the `gemm` crate, which is slow for a
/// handful of rows (`examples/small_batch_matmul.rs`: 3-4x faster at 4 rows, ~1.7x at 16,
/// even at 32).
const SMALL_BATCH: usize = 32;

/// One sequence's new tokens.
pub struct BatchItem<'a> {
    pub cache: &'a mut dyn KvCache,
    pub tokens: &'a [u32],
    pub tags: &'a [TokenTag],
    /// Return the last token's next-token logits.
    pub logits: bool,
}

/// Run every item's tokens through `model` after what its cache holds. Returns, per item,
/// the last token's logits (`[vocab]`) when asked, else an empty vector.
///
/// Panics, like `Model::forward`, if an item's tags and tokens differ in length or an id is
/// outside the vocabulary (check with `Model::check_tokens` first).
pub fn forward_batch(model: &Model, items: &mut [BatchItem<'_>]) -> Vec<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let (dim, q_dim, kv_dim, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
    let mut rows = Vec::with_capacity(items.len());
    let mut n = 0;
    for it in items.iter() {
        assert_eq!(
            it.tags.len(),
            it.tokens.len(),
            "forward_batch: one tag per token"
        );
        rows.push(n..n + it.tokens.len());
        n += it.tokens.len();
    }
    if n == 0 {
        return items.iter().map(|_| Vec::new()).collect();
    }
    let rope = Rope::new(model, items, n);
    // One sequence alone runs exactly `Model::forward`'s products.
    let batched = items.len() > 1;
    let project = |out: &mut [f32], x: &[f32], n: usize, w: &Matrix| {
        if batched {
            matmul_small_batch(out, x, n, w)
        } else {
            matmul(out, x, n, w)
        }
    };

    let mut x = vec![0.0f32; n * dim];
    for (row, &t) in x.chunks_mut(dim).zip(items.iter().flat_map(|it| it.tokens)) {
        let t = t as usize;
        assert!(
            t < c.vocab_size,
            "forward_batch: token id {t} outside the vocabulary"
        );
        row.copy_from_slice(&w.embed.data[t * dim..(t + 1) * dim]);
    }
    let mut xb = vec![0.0f32; n * dim];
    let mut q = vec![0.0f32; n * q_dim];
    let mut k = vec![0.0f32; n * kv_dim];
    let mut v = vec![0.0f32; n * kv_dim];
    let mut att = vec![0.0f32; n * q_dim];
    let mut gate = vec![0.0f32; n * c.intermediate_size];
    let mut up = vec![0.0f32; n * c.intermediate_size];

    for (l, lw) in w.layers.iter().enumerate() {
        rmsnorm(&mut xb, &x, &lw.attn_norm, c.rms_norm_eps);
        project(&mut q, &xb, n, &lw.wq);
        project(&mut k, &xb, n, &lw.wk);
        project(&mut v, &xb, n, &lw.wv);
        add_bias(&mut q, lw.bq.as_deref());
        add_bias(&mut k, lw.bk.as_deref());
        add_bias(&mut v, lw.bv.as_deref());
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            rmsnorm_in_place(&mut q, qn, c.rms_norm_eps);
            rmsnorm_in_place(&mut k, kn, c.rms_norm_eps);
        }
        rope.apply(&mut q, hd);
        rope.apply(&mut k, hd);
        // Attention is per sequence: each reads only its own cache.
        for (it, r) in items.iter_mut().zip(&rows) {
            it.cache.append(
                l,
                &k[r.start * kv_dim..r.end * kv_dim],
                &v[r.start * kv_dim..r.end * kv_dim],
                it.tags,
            );
            it.cache.attend(
                l,
                &q[r.start * q_dim..r.end * q_dim],
                &mut att[r.start * q_dim..r.end * q_dim],
            );
        }
        project(&mut xb, &att, n, &lw.wo);
        add_in_place(&mut x, &xb);

        rmsnorm(&mut xb, &x, &lw.ffn_norm, c.rms_norm_eps);
        project(&mut gate, &xb, n, &lw.w_gate);
        project(&mut up, &xb, n, &lw.w_up);
        for (g, u) in gate.iter_mut().zip(&up) {
            *g = silu(*g) * u;
        }
        project(&mut xb, &gate, n, &lw.w_down);
        add_in_place(&mut x, &xb);
    }

    // The head only for the last row of each sequence that wants logits.
    let wanted: Vec<usize> = items
        .iter()
        .zip(&rows)
        .filter(|(it, r)| it.logits && !r.is_empty())
        .map(|(_, r)| r.end - 1)
        .collect();
    let mut out: Vec<Vec<f32>> = items.iter().map(|_| Vec::new()).collect();
    if wanted.is_empty() {
        return out;
    }
    let m = wanted.len();
    let mut last = vec![0.0f32; m * dim];
    for (dst, &r) in last.chunks_mut(dim).zip(&wanted) {
        dst.copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
    let mut xf = vec![0.0f32; m * dim];
    rmsnorm(&mut xf, &last, &w.final_norm, c.rms_norm_eps);
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let mut logits = vec![0.0f32; m * head.rows];
    project(&mut logits, &xf, m, head);
    let mut chunks = logits.chunks(head.rows);
    for (o, (it, r)) in out.iter_mut().zip(items.iter().zip(&rows)) {
        if it.logits && !r.is_empty() {
            *o = chunks.next().map(<[f32]>::to_vec).unwrap_or_default();
        }
    }
    out
}

/// `out[n, w.rows] = x[n, w.cols] · wᵀ` for a few rows from different sequences: blocks of
/// weight rows go to threads, and each weight row is dotted with every input row while it
/// is in cache, so the weights stream from memory once per step (decoding is memory-bound,
/// and the `gemm` crate's kernels are slow for a handful of rows). Larger `n` uses [`matmul`].
pub fn matmul_small_batch(out: &mut [f32], x: &[f32], n: usize, w: &Matrix) {
    if n <= 1 || n > SMALL_BATCH || w.rows < 64 {
        return matmul(out, x, n, w);
    }
    assert_eq!(
        x.len(),
        n * w.cols,
        "matmul_small_batch: input has the wrong length"
    );
    assert_eq!(
        out.len(),
        n * w.rows,
        "matmul_small_batch: output has the wrong length"
    );
    assert_eq!(
        w.data.len(),
        w.rows * w.cols,
        "matmul_small_batch: weight has the wrong length"
    );
    let cols = w.cols;
    let block = w.rows.div_ceil(rayon::current_num_threads() * 8).max(16);
    // Each block's results as [n, rows of the block], scattered into `out` afterwards.
    let parts: Vec<(usize, Vec<f32>)> = (0..w.rows)
        .step_by(block)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let r1 = (r0 + block).min(w.rows);
            let nb = r1 - r0;
            let mut o = vec![0.0f32; n * nb];
            for (j, wr) in w.data[r0 * cols..r1 * cols].chunks_exact(cols).enumerate() {
                for (i, xr) in x.chunks_exact(cols).enumerate() {
                    o[i * nb + j] = dot(wr, xr);
                }
            }
            (r0, o)
        })
        .collect();
    for (r0, o) in parts {
        let nb = o.len() / n;
        for (i, row) in o.chunks_exact(nb).enumerate() {
            out[i * w.rows + r0..i * w.rows + r0 + nb].copy_from_slice(row);
        }
    }
}

/// Dot product: with AVX2 and FMA when the CPU has them (checked at run time), else a
/// portable loop the compiler vectorises for the baseline target.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `dot_avx2` is compiled for (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_body::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true>(a, b)
}

/// 16 independent accumulators so the loop vectorises; `FMA` fuses each multiply-add.
#[inline(always)]
fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let split = a.len().min(b.len()) / L * L;
    let mut acc = [0.0f32; L];
    for (x, y) in a[..split].chunks_exact(L).zip(b[..split].chunks_exact(L)) {
        for k in 0..L {
            acc[k] = if FMA {
                x[k].mul_add(y[k], acc[k])
            } else {
                acc[k] + x[k] * y[k]
            };
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        s += x * y;
    }
    s
}

/// RoPE cos/sin of every row: each item's rows sit at positions following its cache.
struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(model: &Model, items: &[BatchItem<'_>], n: usize) -> Rope {
        let c = &model.config;
        let half = c.head_dim / 2;
        let inv_freq = inv_freq(c);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for it in items {
            let start = it.cache.len(0);
            for p in start..start + it.tokens.len() {
                for &f in &inv_freq {
                    // As `Model::forward`: the angle in f32, its cos/sin exact.
                    let angle = (p as f32 * f) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Rope { half, cos, sin }
    }

    fn apply(&self, x: &mut [f32], head_dim: usize) {
        let half = self.half;
        let row = x.len() / (self.cos.len() / half);
        for (i, tok) in x.chunks_mut(row).enumerate() {
            let cos = &self.cos[i * half..(i + 1) * half];
            let sin = &self.sin[i * half..(i + 1) * half];
            for head in tok.chunks_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for j in 0..half {
                    let (x0, x1) = (a[j], b[j]);
                    a[j] = x0 * cos[j] - x1 * sin[j];
                    b[j] = x1 * cos[j] + x0 * sin[j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Arch, ModelConfig, RopeScaling};
    use crate::model::llama::Logits;
    use crate::model::weights::{LayerWeights, Matrix, Weights};
    use crate::tags::{Modality, Role};
    use rand::{Rng, SeedableRng};

    fn random_model(qwen: bool) -> Model {
        let c = ModelConfig {
            arch: if qwen { Arch::Qwen3 } else { Arch::Llama },
            vocab_size: 13,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: qwen,
            qk_norm: qwen,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut m = |rows: usize, cols: usize| Matrix {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect(),
        };
        let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let layers = (0..c.num_layers)
            .map(|_| LayerWeights {
                attn_norm: vec![1.0; h],
                wq: m(q, h),
                wk: m(kv, h),
                wv: m(kv, h),
                wo: m(h, q),
                bq: qwen.then(|| vec![0.1; q]),
                bk: qwen.then(|| vec![-0.1; kv]),
                bv: qwen.then(|| vec![0.05; kv]),
                q_norm: qwen.then(|| vec![1.1; c.head_dim]),
                k_norm: qwen.then(|| vec![0.9; c.head_dim]),
                ffn_norm: vec![1.0; h],
                w_gate: m(ff, h),
                w_up: m(ff, h),
                w_down: m(h, ff),
            })
            .collect();
        let weights = Weights {
            embed: m(c.vocab_size, h),
            layers,
            final_norm: vec![1.0; h],
            lm_head: None,
        };
        Model { config: c, weights }
    }

    fn tags(n: usize) -> Vec<TokenTag> {
        vec![
            TokenTag {
                role: Role::User,
                modality: Modality::Text,
                turn: 1,
                step: 0,
            };
            n
        ]
    }

    #[test]
    fn small_batch_product_matches_a_plain_loop() {
        let (rows, cols, n) = (203, 37, 5);
        let w = Matrix {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|i| ((i * 37) % 11) as f32 - 5.0)
                .collect(),
        };
        let x: Vec<f32> = (0..n * cols).map(|j| (j % 7) as f32 * 0.5 - 1.0).collect();
        let mut out = vec![0.0; n * rows];
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| matmul_small_batch(&mut out, &x, n, &w));
        for i in 0..n {
            for r in 0..rows {
                let want: f32 = (0..cols)
                    .map(|j| w.data[r * cols + j] * x[i * cols + j])
                    .sum();
                let got = out[i * rows + r];
                assert!(
                    (got - want).abs() < 1e-3,
                    "row {i} col {r}: {got} vs {want}"
                );
            }
        }
    }

    /// Three sequences at different positions, one prefilling and two decoding, give the
    /// logits and caches of running each alone; one sequence alone is bit-for-bit equal.
    #[test]
    fn a_batch_equals_each_sequence_alone() {
        for qwen in [false, true] {
            let model = random_model(qwen);
            let histories: [&[u32]; 3] = [&[], &[1, 2, 3, 4, 5], &[7, 8]];
            let news: [&[u32]; 3] = [&[3, 1, 4, 1, 5, 9, 2, 6], &[6], &[11]];
            let mut solo = Vec::new();
            let mut caches = Vec::new();
            for (h, new) in histories.iter().zip(news) {
                let mut c = model.new_cache();
                model.forward(h, &tags(h.len()), &mut c, Logits::None);
                let mut alone = c.clone();
                solo.push(model.forward(new, &tags(new.len()), &mut alone, Logits::Last));
                caches.push((c, alone));
            }
            let tag_sets: Vec<Vec<TokenTag>> = news.iter().map(|t| tags(t.len())).collect();
            let mut items: Vec<BatchItem<'_>> = caches
                .iter_mut()
                .zip(news.iter().zip(&tag_sets))
                .map(|((c, _), (t, g))| BatchItem {
                    cache: c,
                    tokens: t,
                    tags: g,
                    logits: true,
                })
                .collect();
            let batched = forward_batch(&model, &mut items);
            drop(items);
            for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
                assert_eq!(b.len(), s.len());
                for (x, y) in b.iter().zip(s) {
                    assert!((x - y).abs() < 1e-4, "qwen {qwen} sequence {i}: {x} vs {y}");
                }
                let (c, alone) = &caches[i];
                assert_eq!(c.len(0), alone.len(0));
                for l in 0..2 {
                    for (x, y) in c.keys(l).iter().zip(alone.keys(l)) {
                        assert!((x - y).abs() < 1e-4);
                    }
                }
            }

            // One sequence alone: exactly `Model::forward`.
            let mut c1 = model.new_cache();
            let mut c2 = model.new_cache();
            let t = tags(5);
            let want = model.forward(&[2, 7, 1, 8, 2], &t, &mut c1, Logits::Last);
            let mut one = [BatchItem {
                cache: &mut c2,
                tokens: &[2, 7, 1, 8, 2],
                tags: &t,
                logits: true,
            }];
            assert_eq!(forward_batch(&model, &mut one)[0], want);
        }
    }
}
