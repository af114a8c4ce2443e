//! Launcher of `kernels/prefill_attention.cu`: a chunk of consecutive query tokens of one
//! sequence attends to that sequence's paged cache, every class decoded once per call into an
//! fp16 scratch (`TokenMoves::decode`); the chunk's own K/V sit in the sequence's 16-bit
//! blocks, masked causally (query row `r` sees the first `f16_base + r + 1` 16-bit tokens).

use super::decode_attention::{
    class_index, BlockRef, DeviceCache, PagedLayout, HEAD_DIM, MAX_GQA, NUM_CLASSES,
};
use super::nvrtc::PREFILL_ATTENTION;
use super::token_moves::{DeviceItems, TokenMoves};
use super::{DriverResult, GpuContext, GpuError};
use crate::quant::KvClass;
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

/// Query rows (tokens × the GQA group) per CTA and threads per CTA (`ROWS`, `NWARPS * 32` in
/// the kernel).
const ROWS: usize = 128;
const THREADS: u32 = 256;

/// `#[repr(C)]` mirror of `tkp::ClassTable` (56 bytes).
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
    k_group: i32,
    _pad: i32,
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

const _: () = assert!(std::mem::size_of::<ClassTable>() == 56);
const _: () = assert!(std::mem::size_of::<PrefillParams>() == 72);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct; all zeros
// is a valid value (null pointers, zero counts).
unsafe impl DeviceRepr for PrefillParams {}
unsafe impl ValidAsZeroBits for PrefillParams {}

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
        k_group: g.k_group as i32,
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
        let prep = self.prepare(gpu, &cache.layout, &[call], q, out)?;
        self.launch_prepared(gpu, cache, pool_offset, &prep)
    }

    /// Check `calls` against `layout` and the buffers `q` (fp16 bits `[rows][q_heads][128]`)
    /// and `out` (f32, same shape), and upload each call's token list (its sequence's tokens,
    /// quantized classes first, then 16-bit in table order) and launch parameters once, for
    /// every layer whose cache has these tables (`launch_prepared`).
    pub fn prepare(
        &mut self,
        gpu: &GpuContext,
        l: &PagedLayout,
        calls: &[PrefillCall],
        q: &CudaSlice<u16>,
        out: &CudaSlice<f32>,
    ) -> Result<PreparedPrefill, GpuError> {
        let bad = |m: String| Err(GpuError::Shape(m));
        if l.head_dim() != HEAD_DIM || l.gqa() > MAX_GQA {
            return bad(format!(
                "head dim {} / GQA {}: the prefill kernel takes {HEAD_DIM} / at most {MAX_GQA}",
                l.head_dim(),
                l.gqa()
            ));
        }
        let row_len = l.q_heads * HEAD_DIM;
        let mut items: Vec<(i32, i32, i32)> = Vec::new();
        // Per call: its items and how many of them are quantized.
        let mut spans = Vec::with_capacity(calls.len());
        for &call in calls {
            if call.seq >= l.seqs || call.rows == 0 {
                return bad(format!(
                    "sequence {} of {}, {} rows",
                    call.seq, l.seqs, call.rows
                ));
            }
            let need = (call.row0 + call.rows) * row_len;
            if q.len() < need || out.len() < need {
                return bad(format!(
                    "q {} / out {} values for rows {}..{} × {} heads × {HEAD_DIM}",
                    q.len(),
                    out.len(),
                    call.row0,
                    call.row0 + call.rows,
                    l.q_heads
                ));
            }
            let f16_seq_tokens: usize = l
                .table(KvClass::F16)
                .iter()
                .filter(|b| b.seq == call.seq)
                .map(|b| b.tokens)
                .sum();
            if f16_seq_tokens < call.f16_base + call.rows {
                return bad(format!(
                    "the 16-bit blocks of sequence {} hold fewer than the {} + {} tokens the \
                     chunk needs (append the chunk first)",
                    call.seq, call.f16_base, call.rows
                ));
            }
            let first = items.len();
            for c in [KvClass::Int4, KvClass::Int2, KvClass::Fp8, KvClass::F16] {
                for b in l.table(c).iter().filter(|b| b.seq == call.seq) {
                    for t in 0..b.tokens {
                        items.push((b.slot as i32, class_index(c) as i32, t as i32));
                    }
                }
            }
            let n = items.len() - first;
            spans.push((first..items.len(), n - f16_seq_tokens));
        }
        let cap = (SCRATCH_BYTES / (l.kv_heads * HEAD_DIM * 4)).max(1);
        let lens: Vec<usize> = spans.iter().map(|s| s.0.len()).collect();
        let bounds = group_calls(&lens, cap);
        let largest = bounds
            .iter()
            .map(|b| spans[b.end - 1].0.end - spans[b.start].0.start)
            .max()
            .unwrap_or(0);
        self.moves.reserve_f16(gpu, l, largest)?;
        let (k, v) = self.moves.f16_scratch();
        let stream = gpu.stream();
        let (k, v) = (k.device_ptr(stream).0, v.device_ptr(stream).0);
        let (q_ptr, out_ptr) = (q.device_ptr(stream).0, out.device_ptr(stream).0);
        let mut groups = Vec::with_capacity(bounds.len());
        for b in bounds {
            let first = spans[b.start].0.start;
            let mut params = Vec::with_capacity(b.len());
            let mut tiles = 0;
            for i in b.clone() {
                let (call, (range, n_quant)) = (calls[i], &spans[i]);
                // The call's decoded tokens start `range.start - first` tokens into the scratch.
                let at = ((range.start - first) * l.kv_heads * HEAD_DIM * 2) as u64;
                params.push(PrefillParams {
                    k: k + at,
                    v: v + at,
                    n: range.len() as i32,
                    n_quant: *n_quant as i32,
                    kv_heads: l.kv_heads as i32,
                    q_heads: l.q_heads as i32,
                    gqa: l.gqa() as i32,
                    rows: call.rows as i32,
                    f16_base: call.f16_base as i32,
                    q: q_ptr + (call.row0 * row_len * 2) as u64,
                    out: out_ptr + (call.row0 * row_len * 4) as u64,
                    scale_log2: call.sm_scale * std::f32::consts::LOG2_E,
                    ..Default::default()
                });
                tiles = tiles.max(call.rows.div_ceil(ROWS / l.gqa()));
            }
            groups.push(PreparedGroup {
                items: first..spans[b.end - 1].0.end,
                params: gpu.upload(&params)?,
                calls: b.len(),
                tiles,
            });
        }
        Ok(PreparedPrefill {
            items: TokenMoves::upload_items(gpu, l, &items, true)?,
            groups,
            tables: l.tables.clone(),
            scratch: k,
        })
    }

    /// Queue every call of `prep` on `gpu.stream()` for the layer whose pool is `cache.pool`
    /// from byte `pool_offset` on (its tables must be those `prep` was made from): per group
    /// of calls, one decode of their tokens and one attention launch.
    pub fn launch_prepared(
        &mut self,
        gpu: &GpuContext,
        cache: &DeviceCache,
        pool_offset: usize,
        prep: &PreparedPrefill,
    ) -> Result<(), GpuError> {
        let l = &cache.layout;
        let bad = |m: String| Err(GpuError::Shape(m));
        if prep.tables_differ(l) {
            return bad("a prefill prepared for other block tables".into());
        }
        if pool_offset % 16 != 0 || pool_offset + l.pool_bytes() > cache.pool.len() {
            return bad(format!(
                "a pool of {} bytes at offset {pool_offset} in a buffer of {}",
                l.pool_bytes(),
                cache.pool.len()
            ));
        }
        for g in &prep.groups {
            let (k, _) = self.moves.decode_items(
                gpu,
                l,
                &cache.pool,
                pool_offset,
                &prep.items,
                g.items.clone(),
            )?;
            if k.device_ptr(gpu.stream()).0 != prep.scratch {
                return bad("the prefill scratch moved after prepare".into());
            }
            let cfg = LaunchConfig {
                grid_dim: (g.tiles as u32, l.kv_heads as u32, g.calls as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = gpu.stream().launch_builder(&self.f);
            b.arg(&g.params);
            // SAFETY: each call's q and out rows lie in the buffers (checked by prepare), its k
            // and v point at its `n` decoded tokens of every KV head in the scratch (decoded
            // just above, the scratch unmoved since prepare); the kernel writes
            // `rows × q_heads × 128` outputs per call.
            unsafe { b.launch(cfg) }.during("launching tkv_prefill_attention")?;
        }
        Ok(())
    }
}

/// Consecutive calls (of `lens` decoded tokens each) in groups of at most `cap` tokens, a
/// call longer than `cap` alone: the groups' decoded tokens share one scratch, so it stays
/// bounded whatever the step holds.
fn group_calls(lens: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut bounds = Vec::new();
    let (mut start, mut held) = (0, 0);
    for (i, &n) in lens.iter().enumerate() {
        if i > start && held + n > cap {
            bounds.push(start..i);
            (start, held) = (i, 0);
        }
        held += n;
    }
    if start < lens.len() {
        bounds.push(start..lens.len());
    }
    bounds
}

/// Bytes of decoded fp16 keys and values one attention launch reads at most (calls beyond it
/// go to the next launch).
const SCRATCH_BYTES: usize = 1 << 30;

/// Calls sharing one decode and one attention launch.
struct PreparedGroup {
    items: std::ops::Range<usize>,
    params: CudaSlice<PrefillParams>,
    calls: usize,
    tiles: usize,
}

impl PreparedPrefill {
    /// Whether `l` has other block tables than the layout this was prepared for.
    pub fn tables_differ(&self, l: &PagedLayout) -> bool {
        l.tables != self.tables
    }
}

/// Prefill calls checked and their token lists and launch parameters uploaded once
/// (`PrefillAttention::prepare`), for every layer of a step.
pub struct PreparedPrefill {
    items: DeviceItems,
    groups: Vec<PreparedGroup>,
    tables: [Vec<BlockRef>; NUM_CLASSES],
    /// The decoder scratch the parameters point into.
    scratch: u64,
}

#[cfg(test)]
mod tests {
    use super::group_calls;

    #[test]
    fn calls_group_up_to_the_cap_and_a_long_call_goes_alone() {
        assert_eq!(group_calls(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(group_calls(&[3, 3, 4], 10), vec![0..3]);
        assert_eq!(group_calls(&[3, 3, 5], 10), vec![0..2, 2..3]);
        assert_eq!(
            group_calls(&[25, 1, 1, 30, 2], 10),
            vec![0..1, 1..3, 3..4, 4..5]
        );
        // Every call lands in exactly one group, in order.
        let lens = [7, 2, 9, 1, 1, 1, 12, 3];
        let g = group_calls(&lens, 10);
        let flat: Vec<usize> = g.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(flat, (0..lens.len()).collect::<Vec<_>>());
        for r in &g {
            let sum: usize = lens[r.clone()].iter().sum();
            assert!(sum <= 10 || r.len() == 1, "{r:?}: {sum}");
        }
    }
}
