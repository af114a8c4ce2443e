//! Launcher of `kernels/prefill_attention.cu`: a chunk of consecutive query tokens of one
//! sequence attends to that sequence's paged cache, every class decoded once per call into an
//! fp16 scratch (`TokenMoves::decode`); the chunk's own K/V sit in the sequence's 16-bit
//! blocks, masked causally (query row `r` sees the first `f16_base + r + 1` 16-bit tokens).

use super::decode_attention::{class_index, DeviceCache, PagedLayout, HEAD_DIM, MAX_GQA};
use super::nvrtc::PREFILL_ATTENTION;
use super::token_moves::TokenMoves;
use super::{DriverResult, GpuContext, GpuError};
use crate::quant::KvClass;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// Query rows (tokens × the GQA group) per CTA and threads per CTA (`ROWS`, `NWARPS * 32` in
/// the kernel).
const ROWS: usize = 128;
const THREADS: u32 = 256;

/// `#[repr(C)]` mirror of `tkp::ClassTable` (48 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ClassTable {
    slot: u64,
    ntok: u64,
    begin: i32,
    end: i32,
    tokens: i32,
    v_off: i32,
    ks_off: i32,
    kz_off: i32,
    vs_off: i32,
    vz_off: i32,
}

/// `#[repr(C)]` mirror of `tkp::PrefillParams` (72 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PrefillParams {
    k: u64,
    v: u64,
    n: i32,
    n_quant: i32,
    kv_heads: i32,
    q_heads: i32,
    gqa: i32,
    rows: i32,
    f16_base: i32,
    _pad0: i32,
    q: u64,
    out: u64,
    scale_log2: f32,
    _pad: i32,
}

const _: () = assert!(std::mem::size_of::<ClassTable>() == 48);
const _: () = assert!(std::mem::size_of::<PrefillParams>() == 72);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for PrefillParams {}

/// A class's block capacity and byte offsets inside a slab (no table).
pub(super) fn class_offsets(l: &PagedLayout, c: KvClass) -> ClassTable {
    let g = l.geom(c);
    let int = c == KvClass::Int4 || c == KvClass::Int2;
    ClassTable {
        tokens: g.tokens as i32,
        v_off: g.v_offset() as i32,
        ks_off: g.k_scale_offset() as i32,
        kz_off: if int { g.k_zero_offset() as i32 } else { 0 },
        vs_off: if int { g.v_scale_offset() as i32 } else { 0 },
        vz_off: if int { g.v_zero_offset() as i32 } else { 0 },
        ..Default::default()
    }
}

pub struct PrefillAttention {
    f: CudaFunction,
    moves: TokenMoves,
}

/// One prefill call: which sequence, how many of its 16-bit tokens precede the chunk, and the
/// chunk's query rows.
#[derive(Debug, Clone, Copy)]
pub struct PrefillCall {
    pub seq: usize,
    pub f16_base: usize,
    /// The chunk's first row in `q` / `out` (several sequences' chunks share one step).
    pub row0: usize,
    pub rows: usize,
    pub sm_scale: f32,
}

impl PrefillAttention {
    pub fn load(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(PrefillAttention {
            f: gpu.function(&PREFILL_ATTENTION, &[], "tkv_prefill_attention")?,
            moves: TokenMoves::decoder(gpu)?,
        })
    }

    /// Queue the call on `gpu.stream()`: `q` fp16 bits `[rows][q_heads][128]`, `out` f32 of
    /// the same shape. The pool is `cache.pool` from byte `pool_offset` on.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &mut self,
        gpu: &GpuContext,
        cache: &DeviceCache,
        pool_offset: usize,
        call: PrefillCall,
        q: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let l = &cache.layout;
        let bad = |m: String| Err(GpuError::Shape(m));
        if l.head_dim() != HEAD_DIM || l.gqa() > MAX_GQA {
            return bad(format!(
                "head dim {} / GQA {}: the prefill kernel takes {HEAD_DIM} / at most {MAX_GQA}",
                l.head_dim(),
                l.gqa()
            ));
        }
        if call.seq >= l.seqs || call.rows == 0 {
            return bad(format!(
                "sequence {} of {}, {} rows",
                call.seq, l.seqs, call.rows
            ));
        }
        let row_len = l.q_heads * HEAD_DIM;
        let need = (call.row0 + call.rows) * row_len;
        if q.len() < need || out.len() < need {
            return bad(format!(
                "q {} / out {} values for {} rows × {} heads × {HEAD_DIM}",
                q.len(),
                out.len(),
                call.rows,
                l.q_heads
            ));
        }
        if pool_offset % 16 != 0 || pool_offset + l.pool_bytes() > cache.pool.len() {
            return bad(format!(
                "a pool of {} bytes at offset {pool_offset} in a buffer of {}",
                l.pool_bytes(),
                cache.pool.len()
            ));
        }
        let f16 = l.table(KvClass::F16);
        let f16_seq_tokens: usize = f16
            .iter()
            .filter(|b| b.seq == call.seq)
            .map(|b| b.tokens)
            .sum();
        if f16_seq_tokens < call.f16_base + call.rows {
            return bad(format!(
                "the 16-bit blocks of sequence {} hold fewer than the {} + {} tokens the chunk \
                 needs (append the chunk first)",
                call.seq, call.f16_base, call.rows
            ));
        }
        // The sequence's tokens, quantized classes first, then 16-bit in table order.
        let mut items: Vec<(i32, i32, i32)> = Vec::new();
        for c in [KvClass::Int4, KvClass::Int2, KvClass::Fp8, KvClass::F16] {
            for b in l.table(c).iter().filter(|b| b.seq == call.seq) {
                for t in 0..b.tokens {
                    items.push((b.slot as i32, class_index(c) as i32, t as i32));
                }
            }
        }
        let n_quant = items.len() - f16_seq_tokens;
        let (k, v) = self
            .moves
            .decode(gpu, l, &cache.pool, pool_offset, &items)?;
        let stream = gpu.stream();
        let p = PrefillParams {
            k: k.device_ptr(stream).0,
            v: v.device_ptr(stream).0,
            n: items.len() as i32,
            n_quant: n_quant as i32,
            kv_heads: l.kv_heads as i32,
            q_heads: l.q_heads as i32,
            gqa: l.gqa() as i32,
            rows: call.rows as i32,
            f16_base: call.f16_base as i32,
            q: q.device_ptr(stream).0 + (call.row0 * row_len * 2) as u64,
            out: out.device_ptr(stream).0 + (call.row0 * row_len * 4) as u64,
            scale_log2: call.sm_scale * std::f32::consts::LOG2_E,
            ..Default::default()
        };
        let cfg = LaunchConfig {
            grid_dim: (
                call.rows.div_ceil(ROWS / l.gqa()) as u32,
                l.kv_heads as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.f);
        b.arg(&p);
        // SAFETY: q and out hold `rows` rows (checked above), k and v the `n` decoded tokens of
        // every KV head; the kernel writes `rows × q_heads × 128` outputs.
        unsafe { b.launch(cfg) }.during("launching tkv_prefill_attention")?;
        Ok(())
    }
}
