//! The Qwen2-VL and Qwen2.5-VL vision towers (f32, CPU): the 3-D patch embedding (a linear
//! map of each flattened patch), 2-D rotary positions over the patch grid, pre-norm ViT blocks
//! and the patch merger (2×2 neighbouring patches concatenated, GELU MLP into the language
//! model's width). Qwen2-VL: LayerNorm, attention within each frame, QuickGELU MLP. Qwen2.5-VL:
//! RMSNorm, a SiLU gate/up/down MLP, and attention within windows of merged patches (the
//! patches reordered window by window, restored after the merger) except in the
//! `fullatt_block_indexes` blocks. Weights from the model's safetensors (`visual.*`). Checked
//! against the reference implementation's features in tests/vision.rs.

use super::preprocess::Patches;
use crate::model::llama::matmul;
use crate::model::safetensors::{SafetensorsError, TensorStore};
use crate::model::weights::Matrix;
use serde_json::Value;
use std::path::Path;

/// What differs between the towers of the family.
#[derive(Debug, Clone, PartialEq)]
pub enum TowerKind {
    /// Qwen2-VL: LayerNorm, QuickGELU MLP of `mlp_hidden`, attention within each frame.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, SiLU gate/up/down MLP; attention within windows of `window`
    /// × `window` merged patches except in `full_blocks`.
    Qwen25Vl {
        window: usize,
        full_blocks: Vec<usize>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    /// Hidden width of the blocks' MLP.
    pub mlp_hidden: usize,
    /// The language model's width (the merger's output).
    pub hidden_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub rope_theta: f32,
    pub kind: TowerKind,
}

impl VisionConfig {
    /// From a Qwen2-VL or Qwen2.5-VL `config.json`'s `vision_config` object (Qwen2.5-VL's has
    /// `window_size`).
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
        let qwen25 = v.get("window_size").is_some();
        let (want_act, family) = if qwen25 {
            ("silu", "Qwen2.5-VL")
        } else {
            ("quick_gelu", "Qwen2-VL")
        };
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or(want_act);
        if act != want_act {
            return Err(SafetensorsError::Unsupported {
                path: path.to_path_buf(),
                what: format!("vision_config.hidden_act `{act}` ({family}'s {want_act} only)"),
            });
        }
        let patch_size = get("patch_size")?;
        let spatial_merge_size = get("spatial_merge_size")?;
        let (embed_dim, mlp_hidden, hidden_size, kind) = if qwen25 {
            let window_size = get("window_size")?;
            let window = window_size / spatial_merge_size.max(1) / patch_size.max(1);
            if window == 0 {
                return Err(SafetensorsError::InvalidField {
                    path: path.to_path_buf(),
                    field: "vision_config.window_size".into(),
                    reason: format!(
                        "{window_size} pixels hold no merged patch of {spatial_merge_size} × \
                         {patch_size}"
                    ),
                });
            }
            let full_blocks = v
                .get("fullatt_block_indexes")
                .and_then(Value::as_array)
                .ok_or_else(|| missing("fullatt_block_indexes"))?
                .iter()
                .map(|x| x.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| SafetensorsError::InvalidField {
                    path: path.to_path_buf(),
                    field: "vision_config.fullatt_block_indexes".into(),
                    reason: "not a list of block indices".into(),
                })?;
            (
                get("hidden_size")?,
                get("intermediate_size")?,
                get("out_hidden_size")?,
                TowerKind::Qwen25Vl {
                    window,
                    full_blocks,
                },
            )
        } else {
            let e = get("embed_dim")?;
            (
                e,
                e * get("mlp_ratio")?,
                get("hidden_size")?,
                TowerKind::Qwen2Vl,
            )
        };
        let c = VisionConfig {
            depth: get("depth")?,
            embed_dim,
            num_heads: get("num_heads")?,
            mlp_hidden,
            hidden_size,
            in_channels: get("in_channels").or_else(|_| get("in_chans")).unwrap_or(3),
            patch_size,
            spatial_merge_size,
            temporal_patch_size: get("temporal_patch_size")?,
            rope_theta: v
                .pointer("/rope_parameters/rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
            kind,
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

enum Norm {
    Layer(Vec<f32>, Vec<f32>),
    Rms(Vec<f32>),
}

impl Norm {
    fn apply(&self, x: &mut [f32], d: usize) {
        match self {
            Norm::Layer(w, b) => layer_norm(x, d, w, b),
            Norm::Rms(w) => rms_norm(x, d, w),
        }
    }
}

enum Mlp {
    /// fc2(quick_gelu(fc1 x)).
    QuickGelu {
        fc1: Matrix,
        fc1_b: Vec<f32>,
        fc2: Matrix,
        fc2_b: Vec<f32>,
    },
    /// down(silu(gate x) · up x).
    SwiGlu {
        gate: Matrix,
        gate_b: Vec<f32>,
        up: Matrix,
        up_b: Vec<f32>,
        down: Matrix,
        down_b: Vec<f32>,
    },
}

impl Mlp {
    fn apply(&self, h: &[f32], n: usize) -> Vec<f32> {
        match self {
            Mlp::QuickGelu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => {
                let mut u = linear(h, n, fc1, Some(fc1_b));
                for v in u.iter_mut() {
                    *v *= 1.0 / (1.0 + (-1.702 * *v).exp());
                }
                linear(&u, n, fc2, Some(fc2_b))
            }
            Mlp::SwiGlu {
                gate,
                gate_b,
                up,
                up_b,
                down,
                down_b,
            } => {
                let mut g = linear(h, n, gate, Some(gate_b));
                let u = linear(h, n, up, Some(up_b));
                for (a, b) in g.iter_mut().zip(&u) {
                    *a = *a / (1.0 + (-*a).exp()) * b;
                }
                linear(&g, n, down, Some(down_b))
            }
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Matrix,
    qkv_b: Vec<f32>,
    proj: Matrix,
    proj_b: Vec<f32>,
    mlp: Mlp,
}

pub struct VisionTower {
    pub config: VisionConfig,
    patch_embed: Matrix,
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Matrix,
    merger_fc1_b: Vec<f32>,
    merger_fc2: Matrix,
    merger_fc2_b: Vec<f32>,
}

/// Qwen2RMSNorm (eps 1e-6), in f32 like the reference.
fn rms_norm(x: &mut [f32], d: usize, w: &[f32]) {
    for row in x.chunks_mut(d) {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        for (v, &wi) in row.iter_mut().zip(w) {
            *v = wi * (*v * inv);
        }
    }
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
        let (e, mlp) = (c.embed_dim, c.mlp_hidden);
        let qwen25 = matches!(c.kind, TowerKind::Qwen25Vl { .. });
        let vec = |n: &str, len: usize| st.read(n, &[len]);
        let norm = |p: &str| -> Result<Norm, SafetensorsError> {
            Ok(if qwen25 {
                Norm::Rms(vec(&format!("{p}.weight"), e)?)
            } else {
                Norm::Layer(
                    vec(&format!("{p}.weight"), e)?,
                    vec(&format!("{p}.bias"), e)?,
                )
            })
        };
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
            let mlp = if qwen25 {
                Mlp::SwiGlu {
                    gate: st.matrix(&format!("{p}.mlp.gate_proj.weight"), mlp, e)?,
                    gate_b: vec(&format!("{p}.mlp.gate_proj.bias"), mlp)?,
                    up: st.matrix(&format!("{p}.mlp.up_proj.weight"), mlp, e)?,
                    up_b: vec(&format!("{p}.mlp.up_proj.bias"), mlp)?,
                    down: st.matrix(&format!("{p}.mlp.down_proj.weight"), e, mlp)?,
                    down_b: vec(&format!("{p}.mlp.down_proj.bias"), e)?,
                }
            } else {
                Mlp::QuickGelu {
                    fc1: st.matrix(&format!("{p}.mlp.fc1.weight"), mlp, e)?,
                    fc1_b: vec(&format!("{p}.mlp.fc1.bias"), mlp)?,
                    fc2: st.matrix(&format!("{p}.mlp.fc2.weight"), e, mlp)?,
                    fc2_b: vec(&format!("{p}.mlp.fc2.bias"), e)?,
                }
            };
            blocks.push(Block {
                norm1: norm(&format!("{p}.norm1"))?,
                norm2: norm(&format!("{p}.norm2"))?,
                qkv: st.matrix(&format!("{p}.attn.qkv.weight"), 3 * e, e)?,
                qkv_b: vec(&format!("{p}.attn.qkv.bias"), 3 * e)?,
                proj: st.matrix(&format!("{p}.attn.proj.weight"), e, e)?,
                proj_b: vec(&format!("{p}.attn.proj.bias"), e)?,
                mlp,
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
            merger_norm: norm("visual.merger.ln_q")?,
            merger_fc1: st.matrix("visual.merger.mlp.0.weight", m, m)?,
            merger_fc1_b: vec("visual.merger.mlp.0.bias", m)?,
            merger_fc2: st.matrix("visual.merger.mlp.2.weight", c.hidden_size, m)?,
            merger_fc2_b: vec("visual.merger.mlp.2.bias", c.hidden_size)?,
            config,
        })
    }

    /// Qwen2.5-VL's window order: the merged patches (units) window by window — windows of
    /// `window` × `window` units tiling each frame's merged grid row-major (the last row and
    /// column of windows cut short), units row-major within a window — and each window's
    /// range of patch rows in that order. `None` for a tower without windows.
    fn window_order(&self, grid: [usize; 3]) -> Option<(Vec<usize>, Vec<std::ops::Range<usize>>)> {
        let TowerKind::Qwen25Vl { window: ws, .. } = self.config.kind else {
            return None;
        };
        let m = self.config.spatial_merge_size;
        let m2 = m * m;
        let (lh, lw) = (grid[1] / m, grid[2] / m);
        let (mut order, mut windows) = (Vec::with_capacity(grid[0] * lh * lw), Vec::new());
        for t in 0..grid[0] {
            for wh in 0..lh.div_ceil(ws) {
                for ww in 0..lw.div_ceil(ws) {
                    let start = order.len() * m2;
                    for h in wh * ws..((wh + 1) * ws).min(lh) {
                        for w in ww * ws..((ww + 1) * ws).min(lw) {
                            order.push(t * lh * lw + h * lw + w);
                        }
                    }
                    windows.push(start..order.len() * m2);
                }
            }
        }
        Some((order, windows))
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
        let half = hd / 2;
        let mut x = linear(&patches.pixels, n, &self.patch_embed, None);
        let mut ang = self.angles(patches.grid);
        let frame = gh * gw;
        let frames: Vec<std::ops::Range<usize>> =
            (0..n).step_by(frame).map(|f| f..f + frame).collect();
        let windows = self.window_order(patches.grid);
        if let Some((order, _)) = &windows {
            // Patches (and their rotary angles) in window order, a merged unit at a time.
            let permute = |v: &[f32], width: usize| -> Vec<f32> {
                let unit = m2 * width;
                order
                    .iter()
                    .flat_map(|&u| v[u * unit..(u + 1) * unit].iter().copied())
                    .collect()
            };
            x = permute(&x, e);
            ang = permute(&ang, half);
        }
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
        let scale = 1.0 / (hd as f32).sqrt();
        for (i, blk) in self.blocks.iter().enumerate() {
            let segments = match (&c.kind, &windows) {
                (TowerKind::Qwen25Vl { full_blocks, .. }, Some((_, w)))
                    if !full_blocks.contains(&i) =>
                {
                    w
                }
                _ => &frames,
            };
            let mut h = x.clone();
            blk.norm1.apply(&mut h, e);
            let qkv = linear(&h, n, &blk.qkv, Some(&blk.qkv_b));
            let mut att = vec![0f32; n * e];
            let mut q = vec![0f32; hd];
            for seg in segments {
                let len = seg.len();
                let mut keys = vec![0f32; len * hd];
                let mut scores = vec![0f32; len];
                for hh in 0..heads {
                    for (t, k) in seg.clone().zip(keys.chunks_mut(hd)) {
                        let at = t * 3 * e + e + hh * hd;
                        k.copy_from_slice(&qkv[at..at + hd]);
                        rope(k, t);
                    }
                    for t in seg.clone() {
                        let at = t * 3 * e + hh * hd;
                        q.copy_from_slice(&qkv[at..at + hd]);
                        rope(&mut q, t);
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
                        let out = &mut att[t * e + hh * hd..t * e + (hh + 1) * hd];
                        for (u, &w) in seg.clone().zip(&scores) {
                            let v0 = u * 3 * e + 2 * e + hh * hd;
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
            blk.norm2.apply(&mut h, e);
            let d = blk.mlp.apply(&h, n);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        self.merger_norm.apply(&mut x, e);
        // Consecutive patches are 2×2 neighbours (the processor's order): rows of m² · e.
        let tokens = n / m2;
        let mut u = linear(&x, tokens, &self.merger_fc1, Some(&self.merger_fc1_b));
        u.iter_mut().for_each(|v| *v = gelu(*v));
        let merged = linear(&u, tokens, &self.merger_fc2, Some(&self.merger_fc2_b));
        let Some((order, _)) = windows else {
            return Ok(merged);
        };
        // Back to the processor's order: row i of `merged` is unit order[i].
        let d = c.hidden_size;
        let mut out = vec![0f32; merged.len()];
        for (row, &u) in merged.chunks(d).zip(&order) {
            out[u * d..(u + 1) * d].copy_from_slice(row);
        }
        Ok(out)
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
