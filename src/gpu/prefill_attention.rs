//! Launcher of `kernels/prefill_attention.cu`: a chunk of consecutive query tokens of one
//! sequence attends to that sequence's paged cache, every class read from its packed blocks
//! (no 16-bit scratch copy of the history); the chunk's own K/V sit in the sequence's 16-bit
//! blocks, masked causally (query row `r` sees the first `f16_base + r + 1` 16-bit tokens).

use super::decode_attention::{class_index, DeviceCache, HEAD_DIM, MAX_GQA};
use super::nvrtc::PREFILL_ATTENTION;
use super::{DriverResult, GpuContext, GpuError};
use crate::quant::KvClass;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// Query tokens per CTA and threads per CTA (`QT`, `NWARPS * 32` in the kernel).
const QUERY_TOKENS: usize = 8;
const THREADS: u32 = 256;

/// `#[repr(C)]` mirror of `tkp::ClassTable` (48 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ClassTable {
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

/// `#[repr(C)]` mirror of `tkp::PrefillParams` (256 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PrefillParams {
    pool: u64,
    slab_bytes: i64,
    kv_heads: i32,
    q_heads: i32,
    gqa: i32,
    rows: i32,
    f16_base: i32,
    v_group: i32,
    q: u64,
    out: u64,
    scale_log2: f32,
    _pad: i32,
    cls: [ClassTable; 4],
}

const _: () = assert!(std::mem::size_of::<ClassTable>() == 48);
const _: () = assert!(std::mem::size_of::<PrefillParams>() == 256);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for PrefillParams {}

pub struct PrefillAttention {
    f: CudaFunction,
}

/// One prefill call: which sequence, how many of its 16-bit tokens precede the chunk, and the
/// chunk's query rows.
#[derive(Debug, Clone, Copy)]
pub struct PrefillCall {
    pub seq: usize,
    pub f16_base: usize,
    pub rows: usize,
    pub sm_scale: f32,
}

impl PrefillAttention {
    pub fn load(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(PrefillAttention {
            f: gpu.function(&PREFILL_ATTENTION, &[], "tkv_prefill_attention")?,
        })
    }

    /// Queue the call on `gpu.stream()`: `q` fp16 bits `[rows][q_heads][128]`, `out` f32 of
    /// the same shape. The pool is `cache.pool` from byte `pool_offset` on.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
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
        let need = call.rows * l.q_heads * HEAD_DIM;
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
        let f16_seq = f16.iter().filter(|b| b.seq == call.seq).map(|b| b.tokens);
        if f16_seq.sum::<usize>() < call.f16_base + call.rows {
            return bad(format!(
                "the 16-bit blocks of sequence {} hold fewer than the {} + {} tokens the chunk \
                 needs (append the chunk first)",
                call.seq, call.f16_base, call.rows
            ));
        }
        let stream = gpu.stream();
        let mut p = PrefillParams {
            pool: cache.pool.device_ptr(stream).0 + pool_offset as u64,
            slab_bytes: l.slab_bytes as i64,
            kv_heads: l.kv_heads as i32,
            q_heads: l.q_heads as i32,
            gqa: l.gqa() as i32,
            rows: call.rows as i32,
            f16_base: call.f16_base as i32,
            v_group: l.v_group() as i32,
            q: q.device_ptr(stream).0,
            out: out.device_ptr(stream).0,
            scale_log2: call.sm_scale * std::f32::consts::LOG2_E,
            ..Default::default()
        };
        for c in KvClass::ALL {
            let ci = class_index(c);
            let table = l.table(c);
            let begin = table.iter().position(|b| b.seq == call.seq);
            let (begin, end) = match begin {
                Some(b) => (
                    b,
                    b + table[b..].iter().take_while(|e| e.seq == call.seq).count(),
                ),
                None => (0, 0),
            };
            let g = l.geom(c);
            let (slot, ntok) = cache
                .device_table(ci)
                .ok_or_else(|| GpuError::Shape("a class without device tables".into()))?;
            p.cls[ci] = ClassTable {
                slot: slot.device_ptr(stream).0,
                ntok: ntok.device_ptr(stream).0,
                begin: begin as i32,
                end: end as i32,
                tokens: g.tokens as i32,
                v_off: g.v_offset() as i32,
                ks_off: g.k_scale_offset() as i32,
                kz_off: if c == KvClass::Int4 || c == KvClass::Int2 {
                    g.k_zero_offset() as i32
                } else {
                    0
                },
                vs_off: if c == KvClass::Int4 || c == KvClass::Int2 {
                    g.v_scale_offset() as i32
                } else {
                    0
                },
                vz_off: if c == KvClass::Int4 || c == KvClass::Int2 {
                    g.v_zero_offset() as i32
                } else {
                    0
                },
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (
                call.rows.div_ceil(QUERY_TOKENS) as u32,
                l.kv_heads as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.f);
        b.arg(&p);
        // SAFETY: every pointer is a live buffer checked above (q and out hold `rows` rows, the
        // tables are the cache's, validated with its layout); the kernel reads entries
        // `begin..end` of each table and writes `rows × q_heads × 128` outputs.
        unsafe { b.launch(cfg) }.during("launching tkv_prefill_attention")?;
        Ok(())
    }
}
