//! The Qwen2-VL vision tower (f32, CPU): the 3-D patch embedding (a linear map of each
//! flattened patch), 2-D rotary positions over the patch grid, pre-norm ViT blocks
//! (LayerNorm, multi-head attention within each frame, QuickGELU MLP) and the patch merger
//! (LayerNorm, 2×2 neighbouring patches concatenated, GELU MLP into the language model's
//! width). Weights from the model's safetensors (`visual.*`). Checked against the reference
//! implementation's features in tests/vision.rs.

use super::preprocess::Patches;
use crate::model::llama::matmul;
use crate::model::safetensors::{SafetensorsError, TensorStore};
use crate::model::weights::Matrix;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: usize,
    /// The language model's width (the merger's output).
    pub hidden_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub rope_theta: f32,
}

impl VisionConfig {
    /// From a Qwen2-VL `config.json`'s `vision_config` object.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, SafetensorsError> {
        let missing = |f: &str| SafetensorsError::MissingField {
            path: path.to_path_buf(),
            field: format!("vision_config.{f}"),
        };
        let get = |f: &str| -> Result<usize, SafetensorsError> {
            v.get(f)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| missing(f))
        };
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(SafetensorsError::Unsupported {
                path: path.to_path_buf(),
                what: format!("vision_config.hidden_act `{act}` (Qwen2-VL's quick_gelu only)"),
            });
        }
        let c = VisionConfig {
            depth: get("depth")?,
            embed_dim: get("embed_dim")?,
            num_heads: get("num_heads")?,
            mlp_ratio: get("mlp_ratio")?,
            hidden_size: get("hidden_size")?,
            in_channels: get("in_channels").or_else(|_| get("in_chans")).unwrap_or(3),
            patch_size: get("patch_size")?,
            spatial_merge_size: get("spatial_merge_size")?,
            temporal_patch_size: get("temporal_patch_size")?,
            rope_theta: v
                .pointer("/rope_parameters/rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
        };
        if c.num_heads == 0
            || c.embed_dim % c.num_heads != 0
            || (c.embed_dim / c.num_heads) % 4 != 0
        {
            return Err(SafetensorsError::InvalidField {
                path: path.to_path_buf(),
                field: "vision_config.num_heads".into(),
                reason: format!(
                    "{} heads do not split embed_dim {} into heads of a multiple of 4",
                    c.num_heads, c.embed_dim
                ),
            });
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

struct Block {
    norm1: (Vec<f32>, Vec<f32>),
    norm2: (Vec<f32>, Vec<f32>),
    qkv: Matrix,
    qkv_b: Vec<f32>,
    proj: Matrix,
    proj_b: Vec<f32>,
    fc1: Matrix,
    fc1_b: Vec<f32>,
    fc2: Matrix,
    fc2_b: Vec<f32>,
}

pub struct VisionTower {
    pub config: VisionConfig,
    patch_embed: Matrix,
    blocks: Vec<Block>,
    merger_norm: (Vec<f32>, Vec<f32>),
    merger_fc1: Matrix,
    merger_fc1_b: Vec<f32>,
    merger_fc2: Matrix,
    merger_fc2_b: Vec<f32>,
}

fn layer_norm(x: &mut [f32], d: usize, w: &[f32], b: &[f32]) {
    for row in x.chunks_mut(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + 1e-6).sqrt();
        for ((v, &wi), &bi) in row.iter_mut().zip(w).zip(b) {
            *v = ((*v as f64 - mean) * inv) as f32 * wi + bi;
        }
    }
}

fn linear(x: &[f32], rows: usize, w: &Matrix, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; rows * w.rows];
    matmul(&mut y, x, rows, w);
    if let Some(b) = b {
        for r in y.chunks_mut(w.rows) {
            r.iter_mut().zip(b).for_each(|(v, &bi)| *v += bi);
        }
    }
    y
}

/// erf by Abramowitz–Stegun 7.1.26 is too coarse for 1e-3 logits; use libm's via f64.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// erf to ~1e-15 (W. J. Cody's rational approximations are what libm does; this series +
/// continued fraction split is enough for f32 outputs).
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: erf x = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc by its continued fraction (converges fast for |x| >= 2.5).
        let ax = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        let erfc = (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f);
        (1.0 - erfc).copysign(x)
    }
}

impl VisionTower {
    /// Load `visual.*` from a Qwen2-VL model directory.
    pub fn load(dir: &Path, config: VisionConfig) -> Result<Self, SafetensorsError> {
        let st = TensorStore::open(dir)?;
        let c = &config;
        let (e, mlp) = (c.embed_dim, c.embed_dim * c.mlp_ratio);
        let vec = |n: &str, len: usize| st.read(n, &[len]);
        let patch = st.read(
            "visual.patch_embed.proj.weight",
            &[
                e,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
        )?;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let p = format!("visual.blocks.{i}");
            blocks.push(Block {
                norm1: (
                    vec(&format!("{p}.norm1.weight"), e)?,
                    vec(&format!("{p}.norm1.bias"), e)?,
                ),
                norm2: (
                    vec(&format!("{p}.norm2.weight"), e)?,
                    vec(&format!("{p}.norm2.bias"), e)?,
                ),
                qkv: st.matrix(&format!("{p}.attn.qkv.weight"), 3 * e, e)?,
                qkv_b: vec(&format!("{p}.attn.qkv.bias"), 3 * e)?,
                proj: st.matrix(&format!("{p}.attn.proj.weight"), e, e)?,
                proj_b: vec(&format!("{p}.attn.proj.bias"), e)?,
                fc1: st.matrix(&format!("{p}.mlp.fc1.weight"), mlp, e)?,
                fc1_b: vec(&format!("{p}.mlp.fc1.bias"), mlp)?,
                fc2: st.matrix(&format!("{p}.mlp.fc2.weight"), e, mlp)?,
                fc2_b: vec(&format!("{p}.mlp.fc2.bias"), e)?,
            });
        }
        let m = e * c.spatial_merge_size * c.spatial_merge_size;
        Ok(VisionTower {
            patch_embed: Matrix {
                rows: e,
                cols: c.patch_len(),
                data: patch,
            },
            blocks,
            merger_norm: (
                vec("visual.merger.ln_q.weight", e)?,
                vec("visual.merger.ln_q.bias", e)?,
            ),
            merger_fc1: st.matrix("visual.merger.mlp.0.weight", m, m)?,
            merger_fc1_b: vec("visual.merger.mlp.0.bias", m)?,
            merger_fc2: st.matrix("visual.merger.mlp.2.weight", c.hidden_size, m)?,
            merger_fc2_b: vec("visual.merger.mlp.2.bias", c.hidden_size)?,
            config,
        })
    }

    /// Rotary angles `[patch][head_dim / 2]` of the patches in the processor's order: the
    /// first quarter of the head's frequencies turn with the patch row, the second with the
    /// column.
    fn angles(&self, grid: [usize; 3]) -> Vec<f32> {
        let c = &self.config;
        let dim = c.head_dim() / 2;
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        let (m, gh, gw) = (c.spatial_merge_size, grid[1], grid[2]);
        let mut out = Vec::with_capacity(grid.iter().product::<usize>() * dim);
        for _t in 0..grid[0] {
            for hb in 0..gh / m {
                for wb in 0..gw / m {
                    for hm in 0..m {
                        for wm in 0..m {
                            let (h, w) = ((hb * m + hm) as f32, (wb * m + wm) as f32);
                            out.extend(inv.iter().map(|f| h * f));
                            out.extend(inv.iter().map(|f| w * f));
                        }
                    }
                }
            }
        }
        out
    }

    /// Features `[tokens][hidden_size]` of one image (tokens = patches / merge²).
    pub fn forward(&self, patches: &Patches) -> Result<Vec<f32>, SafetensorsError> {
        let c = &self.config;
        let n = patches.rows();
        let m2 = c.spatial_merge_size * c.spatial_merge_size;
        let (gh, gw) = (patches.grid[1], patches.grid[2]);
        if patches.row_len != c.patch_len()
            || patches.pixels.len() != n * c.patch_len()
            || gh % c.spatial_merge_size != 0
            || gw % c.spatial_merge_size != 0
        {
            return Err(SafetensorsError::Unsupported {
                path: Default::default(),
                what: format!(
                    "patches of {} values on a {:?} grid for a tower taking {} per patch and \
                     merging {}×{}",
                    patches.row_len,
                    patches.grid,
                    c.patch_len(),
                    c.spatial_merge_size,
                    c.spatial_merge_size
                ),
            });
        }
        let (e, hd, heads) = (c.embed_dim, c.head_dim(), c.num_heads);
        let mut x = linear(&patches.pixels, n, &self.patch_embed, None);
        let ang = self.angles(patches.grid);
        let half = hd / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let rope = |v: &mut [f32], p: usize| {
            // rotate-half over the head: dim j pairs with j + half, angle index j % half.
            for j in 0..half {
                let (cj, sj) = (cos[p * half + j], sin[p * half + j]);
                let (a, b) = (v[j], v[j + half]);
                v[j] = a * cj - b * sj;
                v[j + half] = b * cj + a * sj;
            }
        };
        let frame = gh * gw;
        let scale = 1.0 / (hd as f32).sqrt();
        for blk in &self.blocks {
            let mut h = x.clone();
            layer_norm(&mut h, e, &blk.norm1.0, &blk.norm1.1);
            let qkv = linear(&h, n, &blk.qkv, Some(&blk.qkv_b));
            let mut att = vec![0f32; n * e];
            let mut q = vec![0f32; hd];
            let mut keys = vec![0f32; frame * hd];
            let mut scores = vec![0f32; frame];
            for f0 in (0..n).step_by(frame) {
                for hh in 0..heads {
                    for t in 0..frame {
                        let at = (f0 + t) * 3 * e + e + hh * hd;
                        keys[t * hd..(t + 1) * hd].copy_from_slice(&qkv[at..at + hd]);
                        rope(&mut keys[t * hd..(t + 1) * hd], f0 + t);
                    }
                    for t in 0..frame {
                        let at = (f0 + t) * 3 * e + hh * hd;
                        q.copy_from_slice(&qkv[at..at + hd]);
                        rope(&mut q, f0 + t);
                        let mut mx = f32::NEG_INFINITY;
                        for (s, kk) in scores.iter_mut().zip(keys.chunks(hd)) {
                            *s = q.iter().zip(kk).map(|(a, b)| a * b).sum::<f32>() * scale;
                            mx = mx.max(*s);
                        }
                        let mut z = 0.0;
                        for s in scores.iter_mut() {
                            *s = (*s - mx).exp();
                            z += *s;
                        }
                        let out = &mut att[(f0 + t) * e + hh * hd..(f0 + t) * e + (hh + 1) * hd];
                        for (u, &w) in scores.iter().enumerate() {
                            let v0 = (f0 + u) * 3 * e + 2 * e + hh * hd;
                            for (o, &vv) in out.iter_mut().zip(&qkv[v0..v0 + hd]) {
                                *o += w / z * vv;
                            }
                        }
                    }
                }
            }
            let o = linear(&att, n, &blk.proj, Some(&blk.proj_b));
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let mut h = x.clone();
            layer_norm(&mut h, e, &blk.norm2.0, &blk.norm2.1);
            let mut u = linear(&h, n, &blk.fc1, Some(&blk.fc1_b));
            for v in u.iter_mut() {
                *v *= 1.0 / (1.0 + (-1.702 * *v).exp());
            }
            let d = linear(&u, n, &blk.fc2, Some(&blk.fc2_b));
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        layer_norm(&mut x, e, &self.merger_norm.0, &self.merger_norm.1);
        // Consecutive patches are 2×2 neighbours (the processor's order): rows of m² · e.
        let tokens = n / m2;
        let mut u = linear(&x, tokens, &self.merger_fc1, Some(&self.merger_fc1_b));
        u.iter_mut().for_each(|v| *v = gelu(*v));
        Ok(linear(
            &u,
            tokens,
            &self.merger_fc2,
            Some(&self.merger_fc2_b),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {}", erf(x));
        }
    }
}
