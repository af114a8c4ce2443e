//! One decode step of a whole Llama/Qwen-shaped model on the GPU, for `triaxkv bench
//! decode-step`: per layer RMSNorm → fused QKV GEMM (cuBLAS, bf16, f32 accumulate) → RoPE on q
//! → paged decode attention (`DecodeAttention` over a `DeviceCache`) → O GEMM → residual →
//! RMSNorm → fused gate/up GEMM → SwiGLU → down GEMM → residual; then the final RMSNorm, the LM
//! head GEMM (f32 logits) and a greedy argmax. The residual stream and the O / down projection
//! outputs are f32 (rounding does not pile up over the layers); GEMM inputs are bf16. Weights
//! are bf16 (random on the device for the
//! benchmark: speed only; or uploaded from a loaded model, `gpu::forward`). In the benchmark the
//! new token's K/V are not appended (quantize-append is timed by its own tests): attention runs
//! over the `context` cached tokens; `set_append` makes a step write them into a 16-bit block
//! first, as a forward pass needs. Glue kernels: `kernels/decode_step.cu`.

use super::attention_bench::{bench_layout, CacheKind};
use super::context::GpuContext;
use super::decode_attention::{DecodeAttention, DecodePlan, DeviceCache, HEAD_DIM};
use super::gemm::Gemm;
use super::layer_ops::{Bf16, LayerOps};
use super::membench::{fill_random, median, EventTimer, L2Flush};
use super::nvrtc::KernelSource;
use super::prefill_attention::{PrefillAttention, PrefillCall, PreparedPrefill};
use super::sampling::GpuSampler;
use super::{DriverResult, GpuError};
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::llama::{inv_freq_of, Model};
use crate::paged::pool::HOLD_FP8_SCALE;
use crate::quant::KvClass;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};

pub const DECODE_STEP: KernelSource = KernelSource {
    name: "decode_step.cu",
    source: include_str!("../../kernels/decode_step.cu"),
    options: &[],
};

/// Head dims a step runs: 128 natively, 64 zero-padded to 128 in q and in the 16-bit cache
/// blocks (scores and outputs are exact; the cache then holds twice the bytes it needs).
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// Said in every output of the benchmark.
pub const RANDOM_WEIGHTS_NOTE: &str = "random weights (speed only)";

/// The shape of a decoder-only model (no weights).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelShape {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    /// Llama-3.1 frequency scaling (none for the random-weight shapes: speed only).
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// Qwen3's per-head RMSNorm of q and k.
    pub qk_norm: bool,
}

impl ModelShape {
    /// Meta-Llama-3-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
    /// vocab 128256, RoPE theta 500000.
    pub fn llama3_8b() -> Self {
        ModelShape {
            name: "llama3-8b".into(),
            layers: 32,
            hidden: 4096,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 14336,
            vocab: 128256,
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            qk_norm: false,
        }
    }

    /// Qwen3-8B: 36 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 12288, vocab
    /// 151936, RoPE theta 1e6, q/k norm.
    pub fn qwen3_8b() -> Self {
        ModelShape {
            name: "qwen3-8b".into(),
            layers: 36,
            hidden: 4096,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 12288,
            vocab: 151936,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-6,
            qk_norm: true,
        }
    }

    /// Qwen3-32B: 64 layers, hidden 5120, 64 query / 8 KV heads of 128, MLP 25600, vocab
    /// 151936, RoPE theta 1e6, q/k norm (GQA 8: the decode kernel's largest group).
    pub fn qwen3_32b() -> Self {
        ModelShape {
            name: "qwen3-32b".into(),
            layers: 64,
            hidden: 5120,
            q_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 25600,
            vocab: 151936,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-6,
            qk_norm: true,
        }
    }

    /// The shape of a loaded model (`name` labels it in reports).
    pub fn of_config(name: &str, c: &ModelConfig) -> Self {
        ModelShape {
            name: name.to_string(),
            layers: c.num_layers,
            hidden: c.hidden_size,
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
            rms_eps: c.rms_norm_eps,
            qk_norm: c.qk_norm,
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "llama3-8b" | "llama-3-8b" | "llama3_8b" => Some(Self::llama3_8b()),
            "qwen3-8b" | "qwen3_8b" => Some(Self::qwen3_8b()),
            "qwen3-32b" | "qwen3_32b" => Some(Self::qwen3_32b()),
            _ => None,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Outputs of the fused QKV projection: q, then k, then v.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    pub fn layer_params(&self) -> usize {
        let h = self.hidden;
        h * self.qkv_dim()
            + self.q_dim() * h
            + 3 * self.intermediate * h
            + 2 * h
            + if self.qk_norm { 2 * self.head_dim } else { 0 }
    }

    /// Embedding + layers + final norm + an untied LM head.
    pub fn params(&self) -> usize {
        self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden
    }

    pub fn weight_bytes(&self) -> usize {
        2 * self.params()
    }

    /// RoPE frequencies `theta^(-2j / head_dim)`, scaled as the CPU forward scales them.
    pub fn inv_freq(&self) -> Vec<f32> {
        inv_freq_of(self.rope_theta, self.head_dim, self.rope_scaling)
    }

    pub fn validate(&self) -> Result<(), GpuError> {
        let bad = |m: String| Err(GpuError::Shape(format!("model {}: {m}", self.name)));
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return bad(format!(
                "head dim {}: the step takes {SUPPORTED_HEAD_DIMS:?} (the decode kernel is \
                 compiled for {HEAD_DIM}; smaller heads run zero-padded to it)",
                self.head_dim
            ));
        }
        if self.layers == 0 || self.hidden == 0 || self.intermediate == 0 || self.vocab == 0 {
            return bad("zero-sized dimension".into());
        }
        if self.kv_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return bad(format!(
                "{} query heads cannot share {} KV heads",
                self.q_heads, self.kv_heads
            ));
        }
        Ok(())
    }
}

/// Weights of one layer on the host (f32 values; rounded to bf16 on upload). Matrices are
/// row-major `[out][in]`: `wqkv` `[q_dim + 2 kv_dim][hidden]` (q rows, k rows, v rows), `wo`
/// `[hidden][q_dim]`, `wgu` `[2 intermediate][hidden]` (gate rows, then up rows), `wdown`
/// `[hidden][intermediate]`.
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub wqkv: Vec<f32>,
    pub wo: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    pub wgu: Vec<f32>,
    pub wdown: Vec<f32>,
    /// `[head_dim]` each, when the shape has `qk_norm`.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

/// A whole model's weights on the host: `embed` and `lm_head` `[vocab][hidden]`.
#[derive(Debug, Clone)]
pub struct HostWeights {
    pub embed: Vec<f32>,
    pub layers: Vec<HostLayer>,
    pub final_norm: Vec<f32>,
    pub lm_head: Vec<f32>,
}

impl HostWeights {
    /// A loaded model's f32 weights in the step's fused layout (q/k/v rows stacked, gate/up
    /// rows stacked, a tied LM head copied from the embedding). Biased q/k/v projections
    /// (Qwen2) are not in the step and are refused.
    pub fn of_model(model: &Model) -> Result<Self, GpuError> {
        let w = &model.weights;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            if l.bq.is_some() || l.bk.is_some() || l.bv.is_some() {
                return Err(GpuError::Shape(format!(
                    "layer {i}: q/k/v biases (Qwen2) are not supported by the GPU step"
                )));
            }
            let cat = |ms: &[&crate::model::weights::Matrix]| -> Vec<f32> {
                ms.iter().flat_map(|m| m.data.iter().copied()).collect()
            };
            layers.push(HostLayer {
                attn_norm: l.attn_norm.clone(),
                wqkv: cat(&[&l.wq, &l.wk, &l.wv]),
                wo: l.wo.data.clone(),
                mlp_norm: l.ffn_norm.clone(),
                wgu: cat(&[&l.w_gate, &l.w_up]),
                wdown: l.w_down.data.clone(),
                q_norm: l.q_norm.clone(),
                k_norm: l.k_norm.clone(),
            });
        }
        Ok(HostWeights {
            embed: w.embed.data.clone(),
            layers,
            final_norm: w.final_norm.clone(),
            lm_head: w.lm_head.as_ref().unwrap_or(&w.embed).data.clone(),
        })
    }
}

struct LayerWeights {
    attn_norm: CudaSlice<Bf16>,
    wqkv: CudaSlice<Bf16>,
    wo: CudaSlice<Bf16>,
    mlp_norm: CudaSlice<Bf16>,
    wgu: CudaSlice<Bf16>,
    wdown: CudaSlice<Bf16>,
    q_norm: Option<CudaSlice<Bf16>>,
    k_norm: Option<CudaSlice<Bf16>>,
}

/// bf16 weights on the device.
pub struct DeviceWeights {
    pub shape: ModelShape,
    embed: CudaSlice<Bf16>,
    layers: Vec<LayerWeights>,
    final_norm: CudaSlice<Bf16>,
    lm_head: CudaSlice<Bf16>,
}

fn grid_stride(gpu: &GpuContext, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(256).clamp(1, gpu.multiprocessors * 16) as u32,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl DeviceWeights {
    /// Random bf16 weights filled on the device: matrices uniform in ±√(3 / fan-in) (unit
    /// variance through each product), norms 1 ± 0.1, the embedding ±1, so activations stay
    /// finite. Speed only: nothing meaningful comes out.
    pub fn random(gpu: &GpuContext, shape: &ModelShape, seed: u32) -> Result<Self, GpuError> {
        shape.validate()?;
        let fill = gpu.function(&DECODE_STEP, &[], "tkv_fill_bf16")?;
        let mut n = 0u32;
        let mut make = |len: usize, offset: f32, scale: f32| -> Result<CudaSlice<Bf16>, GpuError> {
            let mut s = gpu.zeros::<Bf16>(len)?;
            n += 1;
            let seed = seed
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(n.wrapping_mul(7919));
            let len64 = len as i64;
            let mut b = gpu.stream().launch_builder(&fill);
            b.arg(&mut s)
                .arg(&len64)
                .arg(&seed)
                .arg(&offset)
                .arg(&scale);
            // SAFETY: `s` holds `len` values; the kernel writes indices below `len`.
            unsafe { b.launch(grid_stride(gpu, len)) }.during("launching tkv_fill_bf16")?;
            Ok(s)
        };
        let mat = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let (h, i) = (shape.hidden, shape.intermediate);
        let mut layers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            layers.push(LayerWeights {
                attn_norm: make(h, 1.0, 0.1)?,
                wqkv: make(shape.qkv_dim() * h, 0.0, mat(h))?,
                wo: make(h * shape.q_dim(), 0.0, mat(shape.q_dim()))?,
                mlp_norm: make(h, 1.0, 0.1)?,
                wgu: make(2 * i * h, 0.0, mat(h))?,
                wdown: make(h * i, 0.0, mat(i))?,
                q_norm: if shape.qk_norm {
                    Some(make(shape.head_dim, 1.0, 0.1)?)
                } else {
                    None
                },
                k_norm: if shape.qk_norm {
                    Some(make(shape.head_dim, 1.0, 0.1)?)
                } else {
                    None
                },
            });
        }
        Ok(DeviceWeights {
            shape: shape.clone(),
            embed: make(shape.vocab * h, 0.0, 1.0)?,
            layers,
            final_norm: make(h, 1.0, 0.1)?,
            lm_head: make(shape.vocab * h, 0.0, mat(h))?,
        })
    }

    /// Upload host weights (rounded to bf16), checking every size against `shape`.
    pub fn upload(gpu: &GpuContext, shape: &ModelShape, w: &HostWeights) -> Result<Self, GpuError> {
        shape.validate()?;
        let up = |what: &str, x: &[f32], len: usize| -> Result<CudaSlice<Bf16>, GpuError> {
            if x.len() != len {
                return Err(GpuError::Shape(format!(
                    "{what}: {} values, the shape needs {len}",
                    x.len()
                )));
            }
            let b: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
            gpu.upload(&b)
        };
        let (h, i) = (shape.hidden, shape.intermediate);
        if w.layers.len() != shape.layers {
            return Err(GpuError::Shape(format!(
                "{} layers of weights for {} layers",
                w.layers.len(),
                shape.layers
            )));
        }
        let mut layers = Vec::with_capacity(shape.layers);
        for l in &w.layers {
            let (q_norm, k_norm) = match (&l.q_norm, &l.k_norm, shape.qk_norm) {
                (Some(q), Some(k), true) => (
                    Some(up("q_norm", q, shape.head_dim)?),
                    Some(up("k_norm", k, shape.head_dim)?),
                ),
                (None, None, false) => (None, None),
                _ => {
                    return Err(GpuError::Shape(
                        "q_norm and k_norm weights present iff the shape has qk_norm".into(),
                    ))
                }
            };
            layers.push(LayerWeights {
                attn_norm: up("attn_norm", &l.attn_norm, h)?,
                wqkv: up("wqkv", &l.wqkv, shape.qkv_dim() * h)?,
                wo: up("wo", &l.wo, h * shape.q_dim())?,
                mlp_norm: up("mlp_norm", &l.mlp_norm, h)?,
                wgu: up("wgu", &l.wgu, 2 * i * h)?,
                wdown: up("wdown", &l.wdown, h * i)?,
                q_norm,
                k_norm,
            });
        }
        Ok(DeviceWeights {
            shape: shape.clone(),
            embed: up("embed", &w.embed, shape.vocab * h)?,
            layers,
            final_norm: up("final_norm", &w.final_norm, h)?,
            lm_head: up("lm_head", &w.lm_head, shape.vocab * h)?,
        })
    }
}

/// The paged KV cache the layers read: one cache per layer, or one layer-sized cache that
/// every layer reads (the same bytes from HBM per layer: a layer's cache is far larger than
/// L2 — 4.3 GB for bf16 32 × 32k against 50 MB — so the time is that of distinct buffers;
/// used where the whole model's cache does not fit).
pub enum KvCaches {
    PerLayer(Vec<DeviceCache>),
    Shared(Box<DeviceCache>),
    /// One pool of every layer's slabs (`DeviceCache::allocate_layers`) read through one set
    /// of block tables: the layout of a real model, whose layers hold the same tokens.
    Stacked {
        cache: Box<DeviceCache>,
        layers: usize,
    },
}

impl KvCaches {
    /// Layer `l`'s cache and the byte offset of its pool inside `cache.pool`.
    pub fn layer(&self, l: usize) -> Result<(&DeviceCache, usize), GpuError> {
        match self {
            KvCaches::Shared(c) => Ok((c, 0)),
            KvCaches::PerLayer(v) => v
                .get(l)
                .map(|c| (c, 0))
                .ok_or_else(|| GpuError::Shape(format!("no KV cache for layer {l}"))),
            KvCaches::Stacked { cache, layers } if l < *layers => {
                Ok((cache, l * cache.layout.pool_bytes()))
            }
            KvCaches::Stacked { layers, .. } => Err(GpuError::Shape(format!(
                "layer {l} of a {layers}-layer cache"
            ))),
        }
    }

    pub fn first(&self) -> Result<&DeviceCache, GpuError> {
        self.layer(0).map(|(c, _)| c)
    }
}

/// What one `DecodeStep::run` does besides the whole step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// Run the attention launches (off: a step without attention, to time the rest; the
    /// O projection then reads the last attention output).
    pub attention: bool,
    /// Record events around each layer's attention launches (`attention_ms` sums them).
    pub time_attention: bool,
    /// A prefill step computes the logits and greedy token of each call's last row only (what
    /// a server samples from; the LM head of every prompt row is ~6% of a long prefill's
    /// FLOPs): `DecodeStep::logits_row` maps a step row to its logits row.
    pub last_row_logits: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            attention: true,
            time_attention: false,
            last_row_logits: false,
        }
    }
}

/// Kernels and activation buffers of decode steps of `batch` sequences.
pub struct DecodeStep {
    pub shape: ModelShape,
    pub batch: usize,
    ops: LayerOps,
    gemm: Gemm,
    attention: DecodeAttention,
    f_embed: CudaFunction,
    f_q_rope: CudaFunction,
    f_attn_out: CudaFunction,
    f_kv_append: CudaFunction,
    /// Rows of the next step (`set_inputs`): at most `batch`.
    rows: usize,
    /// The prefill kernel and its output `[batch][q_heads][128]`, loaded by the first prefill.
    prefill: Option<(PrefillAttention, CudaSlice<f32>)>,
    /// Pool slot and token index inside its block of each sequence's new token, and whether
    /// the block is an FP8 waiting block (else 16-bit), when the step appends its K/V
    /// (`set_append`, `set_append_fp8`).
    append: Option<(CudaSlice<i32>, CudaSlice<i32>, CudaSlice<i32>)>,
    f_swiglu: CudaFunction,
    sampler: GpuSampler,
    inv_freq: CudaSlice<f32>,
    positions: CudaSlice<i32>,
    /// Input token of each sequence.
    pub ids: CudaSlice<i32>,
    /// Greedy next token of each sequence after a step.
    pub next_ids: CudaSlice<i32>,
    /// The residual stream, f32.
    x: CudaSlice<f32>,
    h: CudaSlice<Bf16>,
    qkv: CudaSlice<Bf16>,
    q16: CudaSlice<u16>,
    attn: CudaSlice<Bf16>,
    /// O and down projections, f32 (added to the residual).
    o: CudaSlice<f32>,
    gu: CudaSlice<Bf16>,
    m: CudaSlice<Bf16>,
    /// `[batch][vocab]` f32 after a step: row `logits_row(r)` holds step row `r`'s.
    pub logits: CudaSlice<f32>,
    attn_events: Vec<(CudaEvent, CudaEvent)>,
    /// The step rows whose logits (and `next_ids`) the last step computed, in order; `None`:
    /// every row, in place.
    logit_rows: Option<Vec<usize>>,
}

impl DecodeStep {
    pub fn new(
        gpu: &GpuContext,
        shape: &ModelShape,
        batch: usize,
        v_group: usize,
    ) -> Result<Self, GpuError> {
        shape.validate()?;
        if batch == 0 || batch > 65535 {
            return Err(GpuError::Shape(format!("batch {batch}: 1 to 65535")));
        }
        let f = |name: &str| gpu.function(&DECODE_STEP, &[], name);
        let b = batch;
        let mut attn_events = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            let mk = || {
                gpu.context()
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .during("creating a timing event")
            };
            attn_events.push((mk()?, mk()?));
        }
        Ok(DecodeStep {
            shape: shape.clone(),
            batch,
            ops: LayerOps::load(gpu)?,
            gemm: Gemm::new(gpu)?,
            attention: DecodeAttention::load(gpu, v_group)?,
            f_embed: f("tkv_embed_f32")?,
            f_q_rope: f("tkv_q_rope_f16")?,
            f_attn_out: f("tkv_attn_out_bf16")?,
            f_kv_append: f("tkv_kv_append_f16")?,
            append: None,
            rows: batch,
            prefill: None,
            f_swiglu: f("tkv_swiglu_fused_bf16")?,
            sampler: GpuSampler::load(gpu)?,
            inv_freq: gpu.upload(&shape.inv_freq())?,
            positions: gpu.zeros(b)?,
            ids: gpu.zeros(b)?,
            next_ids: gpu.zeros(b)?,
            x: gpu.zeros(b * shape.hidden)?,
            h: gpu.zeros(b * shape.hidden)?,
            qkv: gpu.zeros(b * shape.qkv_dim())?,
            q16: gpu.zeros(b * shape.q_heads * HEAD_DIM)?,
            attn: gpu.zeros(b * shape.q_dim())?,
            o: gpu.zeros(b * shape.hidden)?,
            gu: gpu.zeros(b * 2 * shape.intermediate)?,
            m: gpu.zeros(b * shape.intermediate)?,
            logits: gpu.zeros(b * shape.vocab)?,
            attn_events,
            logit_rows: None,
        })
    }

    pub fn attention_kernels(&self) -> &DecodeAttention {
        &self.attention
    }

    /// Token ids and RoPE positions (the position of the new token: its cached context
    /// length) of each sequence.
    pub fn set_inputs(
        &mut self,
        gpu: &GpuContext,
        ids: &[i32],
        positions: &[i32],
    ) -> Result<(), GpuError> {
        if ids.is_empty() || ids.len() > self.batch || positions.len() != ids.len() {
            return Err(GpuError::Shape(format!(
                "{} ids and {} positions for a batch of at most {}",
                ids.len(),
                positions.len(),
                self.batch
            )));
        }
        self.rows = ids.len();
        self.ids = gpu.upload(ids)?;
        self.positions = gpu.upload(positions)?;
        Ok(())
    }

    /// Make later steps write each sequence's new K/V into token `toks[b]` of the 16-bit
    /// block in pool slot `slots[b]` before attention (so the token attends to itself, as in
    /// a forward pass); `None` turns appending off (the benchmark's steps).
    pub fn set_append(
        &mut self,
        gpu: &GpuContext,
        target: Option<(&[i32], &[i32])>,
    ) -> Result<(), GpuError> {
        match target {
            None => {
                self.append = None;
                Ok(())
            }
            Some((slots, toks)) => self.set_append_fp8(gpu, slots, toks, &[]),
        }
    }

    /// `set_append` where rows with `fp8[b] != 0` write into token `toks[b]` of an FP8 waiting
    /// block (E4M3 at `HOLD_FP8_SCALE`, as the pool's moves write them) instead of a 16-bit
    /// one; an empty `fp8`: every row 16-bit.
    pub fn set_append_fp8(
        &mut self,
        gpu: &GpuContext,
        slots: &[i32],
        toks: &[i32],
        fp8: &[i32],
    ) -> Result<(), GpuError> {
        if slots.len() != self.rows
            || toks.len() != self.rows
            || !(fp8.is_empty() || fp8.len() == self.rows)
        {
            return Err(GpuError::Shape(format!(
                "{} slots, {} token indices and {} classes for {} rows",
                slots.len(),
                toks.len(),
                fp8.len(),
                self.rows
            )));
        }
        let flags = if fp8.is_empty() {
            gpu.zeros(self.rows.max(1))?
        } else {
            gpu.upload(fp8)?
        };
        self.append = Some((gpu.upload(slots)?, gpu.upload(toks)?, flags));
        Ok(())
    }

    /// The greedy tokens of the last step become the next step's input (positions stay).
    pub fn feed_back(&mut self) {
        std::mem::swap(&mut self.ids, &mut self.next_ids);
    }

    /// Queue one decode step on `gpu.stream()`: `ids` → logits and `next_ids`. `plan` must
    /// be made for the caches' layout (`DecodePlan::new` on any of them: they share it).
    pub fn run(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        plan: &mut DecodePlan,
        opts: StepOptions,
    ) -> Result<(), GpuError> {
        let seqs = kv.first()?.layout.seqs;
        if seqs != self.rows {
            return Err(GpuError::Shape(format!(
                "a decode step of {} rows over a cache of {seqs} sequences",
                self.rows
            )));
        }
        self.run_inner(gpu, w, kv, Attention::Decode(plan), opts)
    }

    /// Queue a prefill step on `gpu.stream()`: the rows set by `set_inputs` are consecutive
    /// tokens of sequence `call.seq` (their K/V appended by `set_append` into its 16-bit
    /// blocks, after `call.f16_base` 16-bit tokens); each row attends causally over the
    /// sequence's packed cache (`PrefillAttention`). Logits and `next_ids` of every row.
    pub fn run_prefill(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        call: PrefillCall,
    ) -> Result<(), GpuError> {
        self.run_prefills(gpu, w, kv, vec![call])
    }

    /// `run_prefill` for chunks of several sequences in one step (one pass over the weights):
    /// `calls` cover the rows in order (`row0` = the rows before).
    pub fn run_prefills(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        calls: Vec<PrefillCall>,
    ) -> Result<(), GpuError> {
        self.run_prefills_with(gpu, w, kv, calls, StepOptions::default())
    }

    /// `run_prefills` with `opts` (e.g. `time_attention`, read back by `attention_ms`).
    pub fn run_prefills_with(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        calls: Vec<PrefillCall>,
        opts: StepOptions,
    ) -> Result<(), GpuError> {
        self.check_calls(gpu, &calls, 0)?;
        self.run_inner(gpu, w, kv, Attention::Prefill(calls), opts)
    }

    /// One step over decode rows and prefill chunks together (one pass over the weights):
    /// rows `0..plan's sequences` decode the first sequences of the tables (`plan` from
    /// `DecodePlan::new_prefix`), the calls cover the rows after them in order (their sequences
    /// after the decode ones). Logits: every decode row, and the prefill rows as
    /// `opts.last_row_logits` says.
    pub fn run_mixed(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        plan: &mut DecodePlan,
        calls: Vec<PrefillCall>,
        opts: StepOptions,
    ) -> Result<(), GpuError> {
        let d = plan.seqs();
        if d == 0 || calls.iter().any(|c| c.seq < d) {
            return Err(GpuError::Shape(format!(
                "a mixed step needs decode rows first ({d}) and chunks of later sequences"
            )));
        }
        self.check_calls(gpu, &calls, d)?;
        self.run_inner(gpu, w, kv, Attention::Mixed(plan, calls), opts)
    }

    /// `calls` cover the step's rows from `first` on, in order, with K/V appended; loads the
    /// prefill kernel.
    fn check_calls(
        &mut self,
        gpu: &GpuContext,
        calls: &[PrefillCall],
        first: usize,
    ) -> Result<(), GpuError> {
        let mut next = first;
        for c in calls {
            if c.row0 != next || c.rows == 0 {
                return Err(GpuError::Shape(format!(
                    "prefill chunks must cover the rows in order: a chunk of {} at row {} after \
                     {next}",
                    c.rows, c.row0
                )));
            }
            next += c.rows;
        }
        if self.append.is_none() || next != self.rows {
            return Err(GpuError::Shape(format!(
                "a prefill of {next} rows needs the {} rows' K/V appended (set_append)",
                self.rows
            )));
        }
        if self.prefill.is_none() {
            self.prefill = Some((
                PrefillAttention::load(gpu)?,
                gpu.zeros(self.batch * self.shape.q_heads * HEAD_DIM)?,
            ));
        }
        Ok(())
    }

    fn run_inner(
        &mut self,
        gpu: &GpuContext,
        w: &DeviceWeights,
        kv: &KvCaches,
        mut attention: Attention<'_>,
        opts: StepOptions,
    ) -> Result<(), GpuError> {
        let s = &self.shape;
        if w.shape != *s {
            return Err(GpuError::Shape(format!(
                "weights of {} for a step of {}",
                w.shape.name, s.name
            )));
        }
        let (b, hd) = (self.rows, s.hidden);
        let l0 = &kv.first()?.layout;
        if l0.q_heads != s.q_heads || l0.kv_heads != s.kv_heads {
            return Err(GpuError::Shape(format!(
                "cache of {} sequences × {} / {} heads for a batch of {b} × {} / {} heads",
                l0.seqs, l0.q_heads, l0.kv_heads, s.q_heads, s.kv_heads
            )));
        }
        let stream = gpu.stream().clone();
        let sm_scale = 1.0 / (s.head_dim as f32).sqrt();
        let (hd32, vocab32) = (hd as i32, s.vocab as i32);
        {
            let cfg = LaunchConfig {
                grid_dim: (b as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = stream.launch_builder(&self.f_embed);
            lb.arg(&w.embed)
                .arg(&self.ids)
                .arg(&mut self.x)
                .arg(&hd32)
                .arg(&vocab32);
            // SAFETY: ids has `b` entries (clamped to the vocab), x `b × hidden`.
            unsafe { lb.launch(cfg) }.during("launching tkv_embed_bf16")?;
        }
        let qkv_row = s.qkv_dim() as i32;
        let head_dim32 = s.head_dim as i32;
        let null_norm: u64 = 0;
        let mut prepared: Option<PreparedPrefill> = None;
        for (li, lw) in w.layers.iter().enumerate() {
            self.ops
                .rmsnorm(gpu, &self.x, &lw.attn_norm, &mut self.h, b, s.rms_eps)?;
            self.gemm
                .linear(gpu, &self.h, &lw.wqkv, &mut self.qkv, b, hd, s.qkv_dim())?;
            {
                let cfg = LaunchConfig {
                    grid_dim: (b as u32, s.q_heads as u32, 1),
                    block_dim: (64, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut lb = stream.launch_builder(&self.f_q_rope);
                lb.arg(&self.qkv).arg(&qkv_row).arg(&head_dim32);
                match &lw.q_norm {
                    Some(qn) => lb.arg(qn),
                    None => lb.arg(&null_norm),
                };
                lb.arg(&s.rms_eps)
                    .arg(&self.inv_freq)
                    .arg(&self.positions)
                    .arg(&mut self.q16);
                // SAFETY: qkv is `b × qkv_dim`, q16 `b × q_heads × 128`, head_dim / 2
                // inv_freq values, `b` positions; a null q-norm pointer means no norm.
                unsafe { lb.launch(cfg) }.during("launching tkv_q_rope_f16")?;
            }
            let (cache, pool_offset) = kv.layer(li)?;
            if let Some((slots, toks, fp8)) = &self.append {
                let g16 = cache.layout.geom(KvClass::F16);
                let g8 = cache.layout.geom(KvClass::Fp8);
                let (fp8_v_off, fp8_ks_off) = (g8.v_offset() as i32, g8.k_scale_offset() as i32);
                let fp8_scale = HOLD_FP8_SCALE;
                let cfg = LaunchConfig {
                    grid_dim: (b as u32, s.kv_heads as u32, 1),
                    block_dim: (64, 1, 1),
                    shared_mem_bytes: 0,
                };
                let q_dim32 = s.q_dim() as i32;
                let slab = cache.layout.slab_bytes as i64;
                let v_off = g16.v_offset() as i32;
                let pool = cache.pool.device_ptr(&stream).0 + pool_offset as u64;
                let mut lb = stream.launch_builder(&self.f_kv_append);
                lb.arg(&self.qkv)
                    .arg(&qkv_row)
                    .arg(&q_dim32)
                    .arg(&head_dim32);
                match &lw.k_norm {
                    Some(kn) => lb.arg(kn),
                    None => lb.arg(&null_norm),
                };
                lb.arg(&s.rms_eps)
                    .arg(&self.inv_freq)
                    .arg(&self.positions)
                    .arg(&pool)
                    .arg(&slab)
                    .arg(&v_off)
                    .arg(slots)
                    .arg(toks)
                    .arg(fp8)
                    .arg(&fp8_v_off)
                    .arg(&fp8_ks_off)
                    .arg(&fp8_scale);
                // SAFETY: the caller's slots lie in this layer's pool (`GpuForward` checks them
                // against the layout); the kernel writes one token of one 16-bit or FP8 slab per
                // (sequence, KV head), on the stream every later read of the pool is ordered on.
                unsafe { lb.launch(cfg) }.during("launching tkv_kv_append_f16")?;
            }
            if opts.attention {
                let ev = &self.attn_events[li];
                if opts.time_attention {
                    ev.0.record(&stream).during("recording an event")?;
                }
                if let Attention::Decode(plan) | Attention::Mixed(plan, _) = &mut attention {
                    self.attention
                        .launch_at(gpu, cache, pool_offset, plan, &self.q16, sm_scale)?;
                }
                if let Some(calls) = attention.calls_mut() {
                    let Some((kernel, out)) = &mut self.prefill else {
                        return Err(GpuError::Shape("prefill kernel not loaded".into()));
                    };
                    // The token lists are the same in every layer of a stacked or shared
                    // cache: built and uploaded once per step (an upload from pageable
                    // memory waits for the stream).
                    let fresh = match &prepared {
                        Some(p) => p.tables_differ(&cache.layout),
                        None => true,
                    };
                    if fresh {
                        for call in calls.iter_mut() {
                            call.sm_scale = sm_scale;
                        }
                        prepared =
                            Some(kernel.prepare(gpu, &cache.layout, calls, &self.q16, out)?);
                    }
                    if let Some(prep) = &prepared {
                        kernel.launch_prepared(gpu, cache, pool_offset, prep)?;
                    }
                }
                if opts.time_attention {
                    ev.1.record(&stream).during("recording an event")?;
                }
            }
            {
                // Attention outputs (f32, 128 per head) to bf16 rows: the decode plan's for
                // its rows, the prefill kernel's for the rest.
                let decode_rows = match &attention {
                    Attention::Decode(_) => b,
                    Attention::Mixed(plan, _) => plan.seqs(),
                    Attention::Prefill(_) => 0,
                };
                let (q_dim, row128) = (s.q_dim(), s.q_heads * HEAD_DIM);
                let mut parts: Vec<(CudaView<'_, f32>, usize, usize)> = Vec::with_capacity(2);
                if let Attention::Decode(plan) | Attention::Mixed(plan, _) = &attention {
                    parts.push((plan.out.slice(..), 0, decode_rows));
                }
                if decode_rows < b {
                    let Some((_, out)) = &self.prefill else {
                        return Err(GpuError::Shape("prefill output not allocated".into()));
                    };
                    parts.push((out.slice(decode_rows * row128..), decode_rows, b));
                }
                for (src, r0, r1) in parts {
                    let n = ((r1 - r0) * q_dim) as i64;
                    let mut dst = self.attn.slice_mut(r0 * q_dim..r1 * q_dim);
                    let mut lb = stream.launch_builder(&self.f_attn_out);
                    lb.arg(&src).arg(&mut dst).arg(&head_dim32).arg(&n);
                    // SAFETY: src holds `(r1 - r0) × q_heads × 128` f32 from its first row, dst
                    // `(r1 - r0) × q_heads × head_dim` bf16 (head_dim <= 128).
                    unsafe { lb.launch(grid_stride(gpu, n as usize)) }
                        .during("launching tkv_attn_out_bf16")?;
                }
            }
            self.gemm
                .linear(gpu, &self.attn, &lw.wo, &mut self.o, b, s.q_dim(), hd)?;
            self.ops.add(gpu, &mut self.x, &self.o)?;
            self.ops
                .rmsnorm(gpu, &self.x, &lw.mlp_norm, &mut self.h, b, s.rms_eps)?;
            self.gemm.linear(
                gpu,
                &self.h,
                &lw.wgu,
                &mut self.gu,
                b,
                hd,
                2 * s.intermediate,
            )?;
            {
                let n = (b * s.intermediate) as i64;
                let inter = s.intermediate as i32;
                let mut lb = stream.launch_builder(&self.f_swiglu);
                lb.arg(&self.gu).arg(&mut self.m).arg(&inter).arg(&n);
                // SAFETY: gu is `b × 2 intermediate`, m `b × intermediate`.
                unsafe { lb.launch(grid_stride(gpu, n as usize)) }
                    .during("launching tkv_swiglu_fused_bf16")?;
            }
            self.gemm
                .linear(gpu, &self.m, &lw.wdown, &mut self.o, b, s.intermediate, hd)?;
            self.ops.add(gpu, &mut self.x, &self.o)?;
        }
        // The LM head over the rows that are sampled: every row, or each prefill call's last
        // (their residual rows copied to the front of the free O buffer).
        self.logit_rows = match (&attention, opts.last_row_logits) {
            (Attention::Prefill(calls), true) => {
                Some(calls.iter().map(|c| c.row0 + c.rows - 1).collect())
            }
            (Attention::Mixed(plan, calls), true) => Some(
                (0..plan.seqs())
                    .chain(calls.iter().map(|c| c.row0 + c.rows - 1))
                    .collect(),
            ),
            _ => None,
        };
        let (final_x, n) = match &self.logit_rows {
            Some(sel) => {
                for (j, &r) in sel.iter().enumerate() {
                    stream
                        .memcpy_dtod(
                            &self.x.slice(r * hd..(r + 1) * hd),
                            &mut self.o.slice_mut(j * hd..(j + 1) * hd),
                        )
                        .during("copying a residual row")?;
                }
                (&self.o, sel.len())
            }
            None => (&self.x, b),
        };
        self.ops
            .rmsnorm(gpu, final_x, &w.final_norm, &mut self.h, n, s.rms_eps)?;
        self.gemm
            .linear(gpu, &self.h, &w.lm_head, &mut self.logits, n, hd, s.vocab)?;
        self.sampler
            .argmax(gpu, &self.logits, n, s.vocab, &mut self.next_ids)
    }

    /// The row of `logits` / `next_ids` holding step row `r`'s after the last step, if it
    /// computed them (`StepOptions::last_row_logits`).
    pub fn logits_row(&self, r: usize) -> Option<usize> {
        match &self.logit_rows {
            Some(sel) => sel.iter().position(|&x| x == r),
            None => (r < self.rows).then_some(r),
        }
    }

    /// Sum over layers of the attention time of the last step run with `time_attention`
    /// (waits for it).
    pub fn attention_ms(&self) -> Result<f64, GpuError> {
        let mut total = 0.0;
        for (a, z) in &self.attn_events {
            total += a.elapsed_ms(z).during("reading event time")? as f64;
        }
        Ok(total)
    }
}

/// The attention of a step: decode (one token per sequence, a plan over the cache) or prefill
/// (consecutive tokens of one or more sequences).
enum Attention<'a> {
    Decode(&'a mut DecodePlan),
    Prefill(Vec<PrefillCall>),
    /// Decode rows first (one per sequence of the plan, a prefix of the tables), then the
    /// prefill calls' rows: one pass over the weights for both.
    Mixed(&'a mut DecodePlan, Vec<PrefillCall>),
}

impl Attention<'_> {
    fn calls_mut(&mut self) -> Option<&mut Vec<PrefillCall>> {
        match self {
            Attention::Prefill(c) | Attention::Mixed(_, c) => Some(c),
            Attention::Decode(_) => None,
        }
    }
}

/// How the layers' KV caches are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KvBuffers {
    /// One cache per layer when the whole model's cache fits (with 2 GiB to spare), else one
    /// shared layer-sized cache.
    Auto,
    Distinct,
    Shared,
}

#[derive(Debug, Clone)]
pub struct DecodeStepBenchConfig {
    pub shape: ModelShape,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub caches: Vec<CacheKind>,
    pub v_group: usize,
    pub kv_buffers: KvBuffers,
    pub warmup: usize,
    pub iters: usize,
    pub flush_bytes: usize,
    pub seed: u32,
}

impl Default for DecodeStepBenchConfig {
    fn default() -> Self {
        DecodeStepBenchConfig {
            shape: ModelShape::llama3_8b(),
            batches: vec![32],
            contexts: vec![32768],
            caches: vec![
                CacheKind::F16,
                CacheKind::Mixed {
                    int4_fraction: 0.05,
                },
            ],
            v_group: 64,
            kv_buffers: KvBuffers::Auto,
            warmup: 3,
            iters: 15,
            flush_bytes: 256 << 20,
            seed: 0x5eed,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeStepRow {
    /// `bf16` (all 16-bit blocks) or `mixed`.
    pub cache: String,
    pub batch: usize,
    pub context: usize,
    /// `distinct` (one cache per layer) or `shared` (one layer-sized cache read by every
    /// layer); `None` when skipped.
    pub kv_buffers: Option<String>,
    /// Median whole-step time, ms (`None`: skipped).
    pub step_ms: Option<f64>,
    pub step_ms_min: Option<f64>,
    /// Median of steps without the attention launches.
    pub no_attention_ms: Option<f64>,
    /// Median over steps of the summed per-layer attention event times.
    pub attention_ms: Option<f64>,
    /// attention_ms / step_ms.
    pub attention_share: Option<f64>,
    /// 1 - no_attention_ms / step_ms.
    pub attention_share_by_difference: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// KV bytes the attention kernel reads per layer (whole tiles and scales).
    pub kv_bytes_read_per_layer: u64,
    /// Pool bytes of one layer (slabs, padding included) and of the whole model.
    pub kv_pool_bytes_per_layer: u64,
    pub kv_pool_bytes_model: u64,
    /// Whether the whole model's pool fits in device memory next to the weights.
    pub model_cache_fits_with_weights: bool,
    pub effective_bits: f64,
    pub blocks_per_work: usize,
    pub finite: bool,
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeStepReport {
    pub note: &'static str,
    pub device: String,
    pub arch: String,
    pub multiprocessors: usize,
    pub device_memory_bytes: usize,
    pub model: ModelShape,
    pub weight_bytes: usize,
    pub v_group: usize,
    pub warmup: usize,
    pub iters: usize,
    pub excluded: &'static str,
    pub rows: Vec<DecodeStepRow>,
}

pub const EXCLUDED_NOTE: &str = "the new token's K/V append (quantize-append) is not in the \
     step: attention reads the `context` cached tokens; Llama-3.1 RoPE scaling and Qwen3's k \
     norm are not applied (they do not change the work measured)";

const SPARE_BYTES: usize = 2 << 30;

pub fn cache_name(kind: CacheKind) -> &'static str {
    match kind {
        CacheKind::F16 => "bf16",
        other => other.name(),
    }
}

/// Run the grid; `progress` gets each finished row.
pub fn run(
    gpu: &GpuContext,
    cfg: &DecodeStepBenchConfig,
    mut progress: impl FnMut(&DecodeStepRow),
) -> Result<DecodeStepReport, GpuError> {
    let shape = &cfg.shape;
    shape.validate()?;
    let weights = DeviceWeights::random(gpu, shape, cfg.seed)?;
    let mut flush = L2Flush::new(gpu, cfg.flush_bytes)?;
    let timer = EventTimer::new(gpu)?;
    let mut rows = Vec::new();
    for &batch in &cfg.batches {
        let mut step = DecodeStep::new(gpu, shape, batch, cfg.v_group)?;
        let ctas_per_sm = step.attention_kernels().ctas_per_sm()?;
        for &ctx in &cfg.contexts {
            for &kind in &cfg.caches {
                let layout =
                    bench_layout(kind, batch, ctx, shape.q_heads, shape.kv_heads, cfg.v_group)?;
                let per_layer = layout.pool_bytes() as u64;
                let model_pool = per_layer * shape.layers as u64;
                let bytes = layout.bytes_read();
                let elems = (batch * ctx * shape.kv_dim() * 2) as f64;
                let mut row = DecodeStepRow {
                    cache: cache_name(kind).to_string(),
                    batch,
                    context: ctx,
                    kv_buffers: None,
                    step_ms: None,
                    step_ms_min: None,
                    no_attention_ms: None,
                    attention_ms: None,
                    attention_share: None,
                    attention_share_by_difference: None,
                    tokens_per_s: None,
                    kv_bytes_read_per_layer: bytes,
                    kv_pool_bytes_per_layer: per_layer,
                    kv_pool_bytes_model: model_pool,
                    model_cache_fits_with_weights: model_pool as usize + shape.weight_bytes()
                        <= gpu.total_memory,
                    effective_bits: 8.0 * bytes as f64 / elems,
                    blocks_per_work: 0,
                    finite: false,
                    skipped: None,
                };
                let (free, _) = gpu.context().mem_get_info().during("reading free memory")?;
                let distinct = match cfg.kv_buffers {
                    KvBuffers::Distinct => true,
                    KvBuffers::Shared => false,
                    KvBuffers::Auto => model_pool as usize + SPARE_BYTES <= free,
                };
                let kv = if distinct {
                    let mut v = Vec::with_capacity(shape.layers);
                    for li in 0..shape.layers {
                        match DeviceCache::allocate(gpu, &layout)? {
                            Some(mut c) => {
                                fill_random(gpu, &mut c, cfg.seed ^ (li as u32 * 131 + 7))?;
                                v.push(c);
                            }
                            None => break,
                        }
                    }
                    (v.len() == shape.layers).then_some(KvCaches::PerLayer(v))
                } else {
                    match DeviceCache::allocate(gpu, &layout)? {
                        Some(mut c) => {
                            fill_random(gpu, &mut c, cfg.seed ^ 7)?;
                            Some(KvCaches::Shared(Box::new(c)))
                        }
                        None => None,
                    }
                };
                let Some(kv) = kv else {
                    row.skipped = Some(format!(
                        "{} KV pool ({:.1} GB) does not fit",
                        if distinct {
                            "whole-model"
                        } else {
                            "one layer's"
                        },
                        if distinct { model_pool } else { per_layer } as f64 / 1e9
                    ));
                    progress(&row);
                    rows.push(row);
                    continue;
                };
                row.kv_buffers = Some(if distinct { "distinct" } else { "shared" }.into());
                let first = kv.first()?;
                let bpw = DecodePlan::default_blocks_per_work(
                    &first.layout,
                    gpu.multiprocessors,
                    ctas_per_sm,
                );
                let mut plan = DecodePlan::new(gpu, first, bpw)?;
                let ids: Vec<i32> = (0..batch)
                    .map(|i| ((i as u64 * 2_654_435_761) % shape.vocab as u64) as i32)
                    .collect();
                step.set_inputs(gpu, &ids, &vec![ctx as i32; batch])?;
                let full = StepOptions::default();
                for _ in 0..cfg.warmup {
                    step.run(gpu, &weights, &kv, &mut plan, full)?;
                    step.feed_back();
                }
                gpu.synchronize()?;
                let mut timed = |opts: StepOptions,
                                 step: &mut DecodeStep,
                                 plan: &mut DecodePlan|
                 -> Result<(Vec<f64>, Vec<f64>), GpuError> {
                    let (mut ts, mut att) = (Vec::new(), Vec::new());
                    for i in 0..cfg.iters {
                        flush.flush(gpu, i as u8)?;
                        ts.push(timer.time_us(gpu, || step.run(gpu, &weights, &kv, plan, opts))?);
                        if opts.time_attention {
                            att.push(step.attention_ms()?);
                        }
                        step.feed_back();
                    }
                    Ok((ts, att))
                };
                let (ts, _) = timed(full, &mut step, &mut plan)?;
                gpu.synchronize()?;
                let logits = gpu.download(&step.logits)?;
                row.finite = logits.iter().all(|x| x.is_finite());
                let (_, att) = timed(
                    StepOptions {
                        time_attention: true,
                        ..StepOptions::default()
                    },
                    &mut step,
                    &mut plan,
                )?;
                let (tn, _) = timed(
                    StepOptions {
                        attention: false,
                        ..StepOptions::default()
                    },
                    &mut step,
                    &mut plan,
                )?;
                gpu.synchronize()?;
                let step_ms = median(ts.clone()) / 1e3;
                let no_attn = median(tn) / 1e3;
                let attn = median(att);
                row.step_ms = Some(step_ms);
                row.step_ms_min = ts.iter().cloned().reduce(f64::min).map(|v| v / 1e3);
                row.no_attention_ms = Some(no_attn);
                row.attention_ms = Some(attn);
                row.attention_share = Some(attn / step_ms);
                row.attention_share_by_difference = Some(1.0 - no_attn / step_ms);
                row.tokens_per_s = Some(batch as f64 / (step_ms * 1e-3));
                row.blocks_per_work = bpw;
                drop(kv);
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(DecodeStepReport {
        note: RANDOM_WEIGHTS_NOTE,
        device: gpu.name.clone(),
        arch: gpu.arch(),
        multiprocessors: gpu.multiprocessors,
        device_memory_bytes: gpu.total_memory,
        model: shape.clone(),
        weight_bytes: shape.weight_bytes(),
        v_group: cfg.v_group,
        warmup: cfg.warmup,
        iters: cfg.iters,
        excluded: EXCLUDED_NOTE,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_8b_sizes() {
        let s = ModelShape::llama3_8b();
        // 8.03 B parameters (untied head), ~16.06 GB of bf16.
        assert!(
            (s.params() as f64 / 1e9 - 8.03).abs() < 0.01,
            "{}",
            s.params()
        );
        assert_eq!(s.qkv_dim(), 6144);
        // bf16 KV of 32 × 32k over 32 layers: 137.4 GB; one layer 4.29 GB.
        let l = bench_layout(CacheKind::F16, 32, 32768, 32, 8, 64).unwrap();
        assert_eq!(l.pool_bytes(), 32 * 32768 * 8 * 128 * 2 * 2);
        assert!((ModelShape::qwen3_8b().params() as f64 / 1e9 - 8.19).abs() < 0.01);
        // Qwen3-32B: 32.8 B parameters with its untied head (config.json of Qwen/Qwen3-32B).
        let p = ModelShape::qwen3_32b().params() as f64 / 1e9;
        assert!((p - 32.76).abs() < 0.05, "{p}");
    }
}
