//! `triaxkv eval gpu-forward`: does the GPU forward pass (bf16 weights, 16-bit paged cache,
//! `gpu::GpuForward`) compute what the CPU reference forward (f32) computes? Every position of
//! each trajectory (up to a token limit) is run through both — on the GPU the leading tokens by
//! chunked prefill, the last `decode_tail` by decode steps — and reported per trajectory and
//! in total (and per GPU path): top-1 agreement, KL(CPU ‖ GPU) of the next-token
//! distributions, the largest logit difference, and how close to a tie the disagreements were
//! on the CPU side.

use super::metrics::{argmax, kl, log_softmax};
use super::replay::ReplayPlan;
use super::EvalError;
use crate::gpu::{GpuContext, GpuForward};
use crate::kvcache::KvCache;
use crate::model::llama::{Logits, DEFAULT_PREFILL_CHUNK};
use crate::model::load::LoadedModel;
use serde::Serialize;
use std::time::Instant;

/// Disagreements are bucketed by the CPU's logit gap between its top-1 and the GPU's pick.
pub const GAP_BUCKETS: [f32; 4] = [0.01, 0.05, 0.2, 1.0];

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForwardAgreement {
    pub positions: usize,
    pub top1_agree: usize,
    pub top1_agreement: f64,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub max_abs_logit_diff: f64,
    /// Disagreements whose CPU logit gap (CPU top-1 minus the GPU's pick, on the CPU's logits)
    /// is below each of `GAP_BUCKETS` (cumulative), and the total.
    pub disagree_gap_below: Vec<usize>,
}

impl ForwardAgreement {
    fn add(&mut self, cpu: &[f32], gpu: &[f32]) {
        let (c, g) = (argmax(cpu) as usize, argmax(gpu) as usize);
        self.positions += 1;
        if c == g {
            self.top1_agree += 1;
        } else {
            let gap = cpu[c] - cpu[g];
            if self.disagree_gap_below.is_empty() {
                self.disagree_gap_below = vec![0; GAP_BUCKETS.len() + 1];
            }
            for (i, &b) in GAP_BUCKETS.iter().enumerate() {
                if gap < b {
                    self.disagree_gap_below[i] += 1;
                }
            }
            self.disagree_gap_below[GAP_BUCKETS.len()] += 1;
        }
        let k = kl(&log_softmax(cpu), &log_softmax(gpu));
        self.mean_kl += k;
        self.max_kl = self.max_kl.max(k);
        let d = cpu
            .iter()
            .zip(gpu)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        self.max_abs_logit_diff = self.max_abs_logit_diff.max(d);
    }

    fn merge(&mut self, o: &ForwardAgreement) {
        let total = self.positions + o.positions;
        if total > 0 {
            self.mean_kl = (self.mean_kl * self.positions as f64 + o.mean_kl * o.positions as f64)
                / total as f64;
        }
        self.positions = total;
        self.top1_agree += o.top1_agree;
        self.max_kl = self.max_kl.max(o.max_kl);
        self.max_abs_logit_diff = self.max_abs_logit_diff.max(o.max_abs_logit_diff);
        if self.disagree_gap_below.is_empty() {
            self.disagree_gap_below = vec![0; GAP_BUCKETS.len() + 1];
        }
        for (a, b) in self
            .disagree_gap_below
            .iter_mut()
            .zip(o.disagree_gap_below.iter())
        {
            *a += b;
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.top1_agreement = self.top1_agree as f64 / self.positions.max(1) as f64;
        if self.disagree_gap_below.is_empty() {
            self.disagree_gap_below = vec![0; GAP_BUCKETS.len() + 1];
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryAgreement {
    pub id: String,
    pub file: String,
    #[serde(flatten)]
    pub agreement: ForwardAgreement,
    pub cpu_s: f64,
    pub gpu_s: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct GpuForwardOptions {
    /// Prefill chunk (tokens per GPU prefill step).
    pub chunk: usize,
    /// Last tokens of each trajectory run by decode steps (one token each).
    pub decode_tail: usize,
}

impl Default for GpuForwardOptions {
    fn default() -> Self {
        GpuForwardOptions {
            chunk: 256,
            decode_tail: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuForwardReport {
    pub model: String,
    pub device: String,
    pub what: &'static str,
    pub chunk: usize,
    pub decode_tail: usize,
    pub gap_buckets: [f32; 4],
    pub trajectories: Vec<TrajectoryAgreement>,
    pub total: ForwardAgreement,
    /// The positions run by GPU prefill chunks, and by GPU decode steps.
    pub prefill: ForwardAgreement,
    pub decode: ForwardAgreement,
    /// GPU prefill tokens per second (chunks, logits of every row copied back).
    pub gpu_prefill_tokens_per_s: f64,
    /// GPU milliseconds per decode step (logits copied back).
    pub gpu_ms_per_decode_step: f64,
}

pub const WHAT: &str = "CPU: f32 weights (dequantized), f32 KV cache, chunked prefill; GPU: the \
     same weights rounded to bf16, bf16 GEMM inputs, f32 residual, 16-bit paged KV cache; chunked \
     prefill (prefill-attention kernel) then decode steps (decode-attention kernel), cuBLAS GEMMs";

/// Run every plan's tokens through both forwards. `progress(done, total)` after each token.
pub fn compare(
    gpu: &GpuContext,
    model: &LoadedModel,
    plans: &[ReplayPlan],
    opts: GpuForwardOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<GpuForwardReport, EvalError> {
    let capacity = plans.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if capacity == 0 {
        return Err(EvalError::NoTrajectories);
    }
    if opts.chunk == 0 {
        return Err(EvalError::Option(
            "the prefill chunk must be at least 1".into(),
        ));
    }
    let gerr = |e: crate::gpu::GpuError| EvalError::Option(format!("GPU: {e}"));
    let mut fwd =
        GpuForward::new(gpu, &model.name, &model.model, capacity, opts.chunk).map_err(gerr)?;
    let (mut prefill, mut decode) = (ForwardAgreement::default(), ForwardAgreement::default());
    let (mut prefill_s, mut decode_s) = (0.0, 0.0);
    let vocab = model.model.config.vocab_size;
    let total_tokens: usize = plans.iter().map(|p| p.ids.len()).sum();
    let mut done = 0;
    let mut rows = Vec::new();
    let mut total = ForwardAgreement::default();
    for plan in plans {
        let t0 = Instant::now();
        let mut cache = model.model.new_cache();
        let cpu = model.model.prefill(
            &plan.ids,
            &plan.tags,
            &mut cache as &mut dyn KvCache,
            Logits::All,
            DEFAULT_PREFILL_CHUNK,
            &mut |_| {},
        );
        let cpu_s = t0.elapsed().as_secs_f64();
        fwd.reset(gpu).map_err(gerr)?;
        let mut agree = ForwardAgreement::default();
        let (mut pre, mut dec) = (ForwardAgreement::default(), ForwardAgreement::default());
        let t1 = Instant::now();
        let n = plan.ids.len();
        let split = n.saturating_sub(opts.decode_tail);
        let mut p = 0;
        while p < split {
            let end = (p + opts.chunk).min(split);
            let t = Instant::now();
            let got = fwd.prefill(gpu, &plan.ids[p..end]).map_err(gerr)?;
            prefill_s += t.elapsed().as_secs_f64();
            for (r, row) in got.chunks(vocab).enumerate() {
                let c = &cpu[(p + r) * vocab..(p + r + 1) * vocab];
                agree.add(c, row);
                pre.add(c, row);
            }
            done += end - p;
            progress(done, total_tokens);
            p = end;
        }
        for (p, &id) in plan.ids.iter().enumerate().skip(split) {
            let t = Instant::now();
            let got = fwd.step(gpu, id).map_err(gerr)?;
            decode_s += t.elapsed().as_secs_f64();
            let c = &cpu[p * vocab..(p + 1) * vocab];
            agree.add(c, &got);
            dec.add(c, &got);
            done += 1;
            progress(done, total_tokens);
        }
        for (a, sum) in [(&mut pre, &mut prefill), (&mut dec, &mut decode)] {
            if a.positions > 0 {
                a.mean_kl /= a.positions as f64;
            }
            a.finish();
            sum.merge(a);
        }
        let g = t1.elapsed().as_secs_f64();
        if agree.positions > 0 {
            agree.mean_kl /= agree.positions as f64;
        }
        agree.finish();
        total.merge(&agree);
        rows.push(TrajectoryAgreement {
            id: plan.id.clone(),
            file: plan.file.clone(),
            agreement: agree,
            cpu_s,
            gpu_s: g,
        });
    }
    total.finish();
    prefill.finish();
    decode.finish();
    Ok(GpuForwardReport {
        model: model.name.clone(),
        device: gpu.name.clone(),
        what: WHAT,
        chunk: opts.chunk,
        decode_tail: opts.decode_tail,
        gap_buckets: GAP_BUCKETS,
        trajectories: rows,
        gpu_prefill_tokens_per_s: prefill.positions as f64 / prefill_s.max(1e-9),
        gpu_ms_per_decode_step: 1e3 * decode_s / decode.positions.max(1) as f64,
        total,
        prefill,
        decode,
    })
}

pub fn markdown(r: &GpuForwardReport) -> String {
    let mut s = format!(
        "# GPU forward vs CPU forward: {} on {}\n\n{}\n\n| trajectory | positions | top-1 \
         agreement | mean KL | max KL | max abs logit diff |\n|---|---|---|---|---|---|\n",
        r.model, r.device, r.what
    );
    let row = |name: &str, a: &ForwardAgreement| {
        format!(
            "| {name} | {} | {:.2}% ({}/{}) | {:.2e} | {:.2e} | {:.3} |\n",
            a.positions,
            100.0 * a.top1_agreement,
            a.top1_agree,
            a.positions,
            a.mean_kl,
            a.max_kl,
            a.max_abs_logit_diff
        )
    };
    for t in &r.trajectories {
        s += &row(&t.id, &t.agreement);
    }
    s += &row("**all**", &r.total);
    s += &row(
        &format!("GPU prefill ({}-token chunks)", r.chunk),
        &r.prefill,
    );
    s += &row(
        &format!("GPU decode steps (last {} per trajectory)", r.decode_tail),
        &r.decode,
    );
    let d = &r.total.disagree_gap_below;
    s += &format!(
        "\nDisagreements by the CPU's logit gap between its top-1 and the GPU's pick: {}; all {}.\n\
         GPU: prefill {:.0} tokens/s, decode {:.2} ms per step (logits copied back each time; \
         one sequence).\n",
        GAP_BUCKETS
            .iter()
            .zip(d)
            .map(|(b, n)| format!("< {b}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        d.last().copied().unwrap_or(0),
        r.gpu_prefill_tokens_per_s,
        r.gpu_ms_per_decode_step
    );
    s
}
