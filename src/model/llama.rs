//! The f32 CPU forward pass of a Llama-family decoder (Llama, Qwen2, Qwen3), written to be
//! read top to bottom like llama2.c; attention goes through the [`KvCache`] trait.

use super::config::{ModelConfig, RopeScaling};
use super::weights::{Matrix, Weights};
use crate::kvcache::{FullCache, KvCache, KvShape};
use crate::tags::TokenTag;
use rayon::prelude::*;

/// Prefill chunk: long enough for efficient GEMMs, short enough to bound the score buffers.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Which logits [`Model::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[vocab]`: the last token's next-token logits.
    Last,
    /// `[n, vocab]` row-major: every token's.
    All,
    /// Nothing (prefill of history whose logits are not needed).
    None,
}

#[derive(Debug, thiserror::Error)]
#[error("token #{index} has id {id}, outside the model's vocabulary of {vocab}")]
pub struct TokenOutOfRange {
    pub index: usize,
    pub id: u32,
    pub vocab: usize,
}

pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
}

impl Model {
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            num_layers: self.config.num_layers,
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// An empty full-precision cache shaped for this model.
    pub fn new_cache(&self) -> FullCache {
        FullCache::new(self.kv_shape())
    }

    /// Check ids that came from outside (a file, a user) before [`Model::forward`].
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), TokenOutOfRange> {
        match tokens
            .iter()
            .position(|&t| t as usize >= self.config.vocab_size)
        {
            Some(index) => Err(TokenOutOfRange {
                index,
                id: tokens[index],
                vocab: self.config.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Run `tokens` (with their tags) through the model after what `cache` already holds:
    /// token `i` sits at position `cache.len(0) + i`. Appends their K/V to `cache`.
    ///
    /// Panics if `tags.len() != tokens.len()` or an id is outside the vocabulary (see
    /// [`Model::check_tokens`]): both are caller bugs, not input errors.
    pub fn forward(
        &self,
        tokens: &[u32],
        tags: &[TokenTag],
        cache: &mut dyn KvCache,
        logits: Logits,
    ) -> Vec<f32> {
        let c = &self.config;
        let w = &self.weights;
        let n = tokens.len();
        assert_eq!(tags.len(), n, "forward: one tag per token");
        if n == 0 {
            return Vec::new();
        }
        let dim = c.hidden_size;
        // Token embeddings.
        let mut x = vec![0.0f32; n * dim];
        for (row, &t) in x.chunks_mut(dim).zip(tokens) {
            let t = t as usize;
            assert!(
                t < c.vocab_size,
                "forward: token id {t} outside the vocabulary"
            );
            row.copy_from_slice(&w.embed.data[t * dim..(t + 1) * dim]);
        }
        self.forward_embedded(x, None, tags, cache, logits)
    }

    /// [`Model::forward`] from input embeddings `x` (`[n][hidden]`: token embeddings, or a
    /// vision tower's features in an image's rows) at explicit multimodal RoPE positions
    /// (`(t, h, w)` per row; `None`: positions `cache.len(0)..` as in `forward`).
    ///
    /// Panics if `x`, `tags` and `positions` disagree on the row count (caller bugs).
    pub fn forward_embedded(
        &self,
        mut x: Vec<f32>,
        positions: Option<&[[u32; 3]]>,
        tags: &[TokenTag],
        cache: &mut dyn KvCache,
        logits: Logits,
    ) -> Vec<f32> {
        let c = &self.config;
        let w = &self.weights;
        let (dim, q_dim, kv_dim, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let n = x.len() / dim;
        assert_eq!(x.len(), n * dim, "forward_embedded: rows of hidden_size");
        assert_eq!(tags.len(), n, "forward_embedded: one tag per row");
        if n == 0 {
            return Vec::new();
        }
        let rope = match positions {
            None => Rope::new(c, cache.len(0), n),
            Some(p) => {
                assert_eq!(p.len(), n, "forward_embedded: one position per row");
                Rope::multimodal(c, p)
            }
        };

        let mut xb = vec![0.0f32; n * dim];
        let mut q = vec![0.0f32; n * q_dim];
        let mut k = vec![0.0f32; n * kv_dim];
        let mut v = vec![0.0f32; n * kv_dim];
        let mut att = vec![0.0f32; n * q_dim];
        let mut gate = vec![0.0f32; n * c.intermediate_size];
        let mut up = vec![0.0f32; n * c.intermediate_size];

        for (l, lw) in w.layers.iter().enumerate() {
            // Attention block: RMSNorm, q/k/v projections, RoPE, cache, attention, output.
            rmsnorm(&mut xb, &x, &lw.attn_norm, c.rms_norm_eps);
            matmul(&mut q, &xb, n, &lw.wq);
            matmul(&mut k, &xb, n, &lw.wk);
            matmul(&mut v, &xb, n, &lw.wv);
            add_bias(&mut q, lw.bq.as_deref());
            add_bias(&mut k, lw.bk.as_deref());
            add_bias(&mut v, lw.bv.as_deref());
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                rmsnorm_in_place(&mut q, qn, c.rms_norm_eps);
                rmsnorm_in_place(&mut k, kn, c.rms_norm_eps);
            }
            rope.apply(&mut q, hd);
            rope.apply(&mut k, hd);
            cache.append(l, &k, &v, tags);
            if logits == Logits::None && l + 1 == w.layers.len() {
                // Only the cache's K/V are wanted: the last layer's attention output and
                // MLP feed nothing.
                cache.skip_attend(l, &q);
                return Vec::new();
            }
            cache.attend(l, &q, &mut att);
            matmul(&mut xb, &att, n, &lw.wo);
            add_in_place(&mut x, &xb);

            // MLP block: RMSNorm, SwiGLU, residual.
            rmsnorm(&mut xb, &x, &lw.ffn_norm, c.rms_norm_eps);
            matmul(&mut gate, &xb, n, &lw.w_gate);
            matmul(&mut up, &xb, n, &lw.w_up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            matmul(&mut xb, &gate, n, &lw.w_down);
            add_in_place(&mut x, &xb);
        }

        // Final norm and the language-model head (tied to the embeddings or not).
        let rows = match logits {
            Logits::None => return Vec::new(),
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let m = rows.len();
        let mut xf = vec![0.0f32; m * dim];
        rmsnorm(
            &mut xf,
            &x[rows.start * dim..rows.end * dim],
            &w.final_norm,
            c.rms_norm_eps,
        );
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        let mut out = vec![0.0f32; m * head.rows];
        matmul(&mut out, &xf, m, head);
        out
    }

    /// [`Model::forward`] in chunks of `chunk` tokens, calling `progress(done)` after each.
    /// Returns the logits asked for over the whole of `tokens`.
    pub fn prefill(
        &self,
        tokens: &[u32],
        tags: &[TokenTag],
        cache: &mut dyn KvCache,
        logits: Logits,
        chunk: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Vec<f32> {
        assert_eq!(tags.len(), tokens.len(), "prefill: one tag per token");
        chunked(tokens.len(), logits, chunk, progress, |r, want| {
            self.forward(&tokens[r.clone()], &tags[r], cache, want)
        })
    }
}

/// Image inputs of a token sequence for a vision-language model: the rows that replace the
/// image tokens' embeddings, and every token's multimodal RoPE position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Media {
    /// Per token of the sequence, the index of its feature row (`None`: a text token).
    pub row_of: Vec<Option<usize>>,
    /// Feature rows `[rows][hidden]`.
    pub features: Vec<f32>,
    /// `(t, h, w)` per token of the sequence.
    pub positions: Vec<[u32; 3]>,
}

impl Media {
    /// Position of token `i`: its own inside the sequence; after it (generated text), one
    /// past the largest position so far, in all three sections (as transformers continues).
    pub fn position(&self, i: usize) -> [u32; 3] {
        match self.positions.get(i) {
            Some(&p) => p,
            None => {
                let top = self
                    .positions
                    .iter()
                    .flat_map(|p| p.iter().copied())
                    .max()
                    .map_or(0, |m| m + 1);
                let p = top + (i - self.positions.len()) as u32;
                [p, p, p]
            }
        }
    }
}

impl Model {
    /// [`Model::prefill`] of `tokens` (which start at index `start` of `media`'s sequence):
    /// image tokens take their feature rows, every token its multimodal position; tokens past
    /// the sequence (generated text) continue after its largest position.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_media(
        &self,
        tokens: &[u32],
        tags: &[TokenTag],
        media: &Media,
        start: usize,
        cache: &mut dyn KvCache,
        logits: Logits,
        chunk: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Vec<f32> {
        assert_eq!(tags.len(), tokens.len(), "prefill_media: one tag per token");
        let dim = self.config.hidden_size;
        chunked(tokens.len(), logits, chunk, progress, |r, want| {
            let mut x = Vec::with_capacity(r.len() * dim);
            for (i, &t) in tokens[r.clone()].iter().enumerate() {
                match media.row_of.get(start + r.start + i).copied().flatten() {
                    Some(row) => x.extend_from_slice(&media.features[row * dim..(row + 1) * dim]),
                    None => {
                        let t = t as usize;
                        x.extend_from_slice(&self.weights.embed.data[t * dim..(t + 1) * dim]);
                    }
                }
            }
            let pos: Vec<[u32; 3]> = (start + r.start..start + r.end)
                .map(|i| media.position(i))
                .collect();
            self.forward_embedded(x, Some(&pos), &tags[r], cache, want)
        })
    }
}

/// Run `n` tokens in chunks of `chunk` through `run(range, logits wanted)`: all logits, the
/// last chunk's last row, or none, as `logits` asks; `progress(done)` after each chunk.
fn chunked(
    n: usize,
    logits: Logits,
    chunk: usize,
    progress: &mut dyn FnMut(usize),
    mut run: impl FnMut(std::ops::Range<usize>, Logits) -> Vec<f32>,
) -> Vec<f32> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut done = 0;
    while done < n {
        let end = (done + chunk).min(n);
        let want = match logits {
            Logits::Last if end == n => Logits::Last,
            Logits::All => Logits::All,
            _ => Logits::None,
        };
        out.extend_from_slice(&run(done..end, want));
        done = end;
        progress(done);
    }
    out
}

/// RoPE cos/sin for positions `start..start + n`, rotate-half convention (as Hugging Face):
/// dimension `i < d/2` pairs with `i + d/2` at frequency `theta^(-2i/d)`.
struct Rope {
    half: usize,
    /// `[n, half]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(c: &ModelConfig, start: usize, n: usize) -> Rope {
        let half = c.head_dim / 2;
        let inv_freq = inv_freq(c);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            for &f in &inv_freq {
                // The angle in f32 like the reference implementations; cos/sin of it exact.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Multimodal RoPE (Qwen2-VL): frequency `j` turns with the temporal, row or column
    /// position by the config's `mrope_section`; plain RoPE of the temporal position when the
    /// config has no sections.
    fn multimodal(c: &ModelConfig, positions: &[[u32; 3]]) -> Rope {
        let half = c.head_dim / 2;
        let inv_freq = inv_freq(c);
        let axis: Vec<usize> = match c.rope_scaling {
            RopeScaling::MRope { sections } => (0..half)
                .map(|j| {
                    if j < sections[0] {
                        0
                    } else if j < sections[0] + sections[1] {
                        1
                    } else {
                        2
                    }
                })
                .collect(),
            _ => vec![0; half],
        };
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (j, &f) in inv_freq.iter().enumerate() {
                let angle = (p[axis[j]] as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotate every head of `x` (`[n, heads, head_dim]`) in place.
    fn apply(&self, x: &mut [f32], head_dim: usize) {
        self.apply_rows(x, head_dim)
    }

    fn apply_rows(&self, x: &mut [f32], head_dim: usize) {
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

/// Rotate rows `x` (`[n, heads, head_dim]`, positions `start..start + n`) by the model's
/// plain RoPE, or undo it (`inverse`): pre-RoPE keys from the cached post-RoPE ones.
pub fn rope_rows(c: &ModelConfig, x: &mut [f32], start: usize, inverse: bool) {
    let row = c.num_kv_heads * c.head_dim;
    if row == 0 || x.len() % row != 0 {
        return;
    }
    let mut rope = Rope::new(c, start, x.len() / row);
    if inverse {
        rope.sin.iter_mut().for_each(|s| *s = -*s);
    }
    rope.apply_rows(x, c.head_dim);
}

/// RoPE inverse frequencies, with Llama-3 scaling when configured.
pub fn inv_freq(c: &ModelConfig) -> Vec<f32> {
    inv_freq_of(c.rope_theta, c.head_dim, c.rope_scaling)
}

/// [`inv_freq`] from its three inputs (the GPU forward's shape carries no whole config).
pub fn inv_freq_of(theta: f32, head_dim: usize, scaling: RopeScaling) -> Vec<f32> {
    let d = head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match scaling {
        RopeScaling::None | RopeScaling::MRope { .. } => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `out[i] = x[i] / rms(x[i]) * weight` for every row of length `weight.len()`.
pub(crate) fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for (o, xr) in out.chunks_mut(d).zip(x.chunks(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &wt) in o.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * wt;
        }
    }
}

/// RMSNorm of every `weight.len()`-long slice of `x` (Qwen3's per-head q/k norm).
pub(crate) fn rmsnorm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for xr in x.chunks_mut(d) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, &wt) in xr.iter_mut().zip(weight) {
            *v = *v * inv * wt;
        }
    }
}

pub(crate) fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_mut(b.len()) {
            add_in_place(row, b);
        }
    }
}

pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[n, w.rows] = x[n, w.cols] · wᵀ` (weights are `[out, in]` row-major).
pub fn matmul(out: &mut [f32], x: &[f32], n: usize, w: &Matrix) {
    assert_eq!(x.len(), n * w.cols, "matmul: input has the wrong length");
    assert_eq!(out.len(), n * w.rows, "matmul: output has the wrong length");
    assert_eq!(
        w.data.len(),
        w.rows * w.cols,
        "matmul: weight has the wrong length"
    );
    let threads = rayon::current_num_threads();
    if n == 1 && threads > 1 && w.rows >= 64 {
        // Decode: gemm runs a one-row product on one thread, so split the output rows.
        let block = w.rows.div_ceil(threads * 4);
        out.par_chunks_mut(block).enumerate().for_each(|(b, o)| {
            let rows = &w.data[b * block * w.cols..(b * block + o.len()) * w.cols];
            gemm_rows(o, x, 1, rows, o.len(), w.cols, gemm::Parallelism::None);
        });
        return;
    }
    let parallelism = if threads > 1 && n * w.rows * w.cols >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_rows(out, x, n, &w.data, w.rows, w.cols, parallelism);
}

/// `out[n, rows] = x[n, cols] · wᵀ` for a row-major `w` of `rows x cols`.
fn gemm_rows(
    out: &mut [f32],
    x: &[f32],
    n: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    parallelism: gemm::Parallelism,
) {
    assert!(x.len() == n * cols && out.len() == n * rows && w.len() == rows * cols);
    // SAFETY: callers pass matching lengths (checked in `matmul`); x is [n, cols] (row
    // stride cols), wᵀ is read as [cols, rows] with row stride 1 and column stride cols.
    unsafe {
        gemm::gemm(
            n,
            rows,
            cols,
            out.as_mut_ptr(),
            1,
            rows as isize,
            false,
            x.as_ptr(),
            1,
            cols as isize,
            w.as_ptr(),
            cols as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use crate::model::weights::LayerWeights;
    use crate::tags::{Modality, Role};
    use rand::{Rng, SeedableRng};

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
        }
    }

    fn random_model(c: ModelConfig, seed: u64) -> Model {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
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
                bq: None,
                bk: None,
                bv: None,
                q_norm: None,
                k_norm: None,
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
    fn matmul_matches_a_plain_loop() {
        let w = Matrix {
            rows: 3,
            cols: 2,
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let x = [1.0, -1.0, 0.5, 2.0];
        let mut out = [0.0; 6];
        matmul(&mut out, &x, 2, &w);
        assert_eq!(out, [-1.0, -1.0, -1.0, 4.5, 9.5, 14.5]);
    }

    #[test]
    fn one_row_matmul_split_over_threads_matches_a_plain_loop() {
        let (rows, cols) = (203, 7);
        let w = Matrix {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|i| ((i * 37) % 11) as f32 - 5.0)
                .collect(),
        };
        let x: Vec<f32> = (0..cols).map(|j| j as f32 * 0.5 - 1.0).collect();
        let mut out = vec![0.0; rows];
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| matmul(&mut out, &x, 1, &w));
        for (r, o) in out.iter().enumerate() {
            let want: f32 = (0..cols).map(|j| w.data[r * cols + j] * x[j]).sum();
            assert!((o - want).abs() < 1e-4, "row {r}: {o} vs {want}");
        }
    }

    #[test]
    fn chunked_prefill_and_decode_equal_one_full_forward() {
        let model = random_model(tiny_config(), 1);
        let toks = [1u32, 5, 3, 9, 0, 2, 7];
        let mut c1 = model.new_cache();
        let all = model.forward(&toks, &tags(7), &mut c1, Logits::All);
        assert_eq!(all.len(), 7 * 11);

        let mut c2 = model.new_cache();
        let chunked = model.prefill(&toks[..6], &tags(6), &mut c2, Logits::All, 4, &mut |_| {});
        let last = model.forward(&toks[6..], &tags(1), &mut c2, Logits::Last);
        for (a, b) in chunked.iter().chain(&last).zip(&all) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert_eq!(c2.len(0), 7);
        assert_eq!(c2.len(1), 7);
    }

    #[test]
    fn rope_rows_inverse_undoes_rope() {
        let mut c = tiny_config();
        c.num_kv_heads = 2;
        c.head_dim = 8;
        let x: Vec<f32> = (0..5 * 16)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut y = x.clone();
        rope_rows(&c, &mut y, 100, false);
        assert!(
            y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3),
            "rotated"
        );
        rope_rows(&c, &mut y, 100, true);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart_and_keeps_norms() {
        let c = tiny_config();
        let rope = Rope::new(&c, 3, 1);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut x, 4);
        // Dimension 0 pairs with dimension 2 at frequency 1: angle = position 3.
        assert!((x[0] - 3.0f32.cos()).abs() < 1e-6 && (x[2] - 3.0f32.sin()).abs() < 1e-6);
        assert_eq!(x[1], 0.0);
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let mut c = tiny_config();
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        let plain = inv_freq(&c);
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled = inv_freq(&c);
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn out_of_vocab_ids_are_reported() {
        let model = random_model(tiny_config(), 2);
        let err = model.check_tokens(&[1, 2, 11]).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("token #2 has id 11, outside the model's vocabulary of 11")
        );
        assert!(model.check_tokens(&[0, 10]).is_ok());
    }
}
