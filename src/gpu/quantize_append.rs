//! Launcher of `kernels/quantize_append.cu`: new keys and values already on the device
//! (f32 `[token][kv_head][head_dim]`) become packed blocks of their precision class in the
//! pool, the same bytes `QuantizedBlock::quantize` + `pack` make on the CPU; an INT4/INT2 job
//! may append whole key groups to a block that already holds some.

use super::context::GpuContext;
use super::decode_attention::{class_index, PagedLayout};
use super::nvrtc::QUANTIZE_APPEND;
use super::{DriverResult, GpuError};
use crate::quant::layout::KvClass;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// One block to write: `tokens` consecutive source tokens from `first_token`, quantized as
/// `class` into pool slot `slot` (all KV heads) as its tokens `start..start + tokens`. With
/// `start > 0` (INT4/INT2 only, a multiple of the class's key group) the block's first
/// `start` tokens are kept: the block must hold exactly them, as this kernel wrote them.
/// Two jobs of one launch must not name the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeJob {
    pub slot: usize,
    pub class: KvClass,
    pub first_token: usize,
    pub tokens: usize,
    pub start: usize,
}

/// `#[repr(C)]` mirror of `tkq::Geom` (36 bytes, static_assert in the .cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Geom {
    tokens: i32,
    v_group: i32,
    v_off: i32,
    ks_off: i32,
    kz_off: i32,
    vs_off: i32,
    vz_off: i32,
    slab: i32,
    k_group: i32,
}

/// `#[repr(C)]` mirror of `tkq::QuantizeParams` (200 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct QuantizeParams {
    pool: u64,
    slab_bytes: i64,
    kv_heads: i32,
    head_dim: i32,
    k: u64,
    v: u64,
    jobs: u64,
    status: u64,
    geom: [Geom; 4],
}

const _: () = assert!(std::mem::size_of::<Geom>() == 36);
const _: () = assert!(std::mem::size_of::<QuantizeParams>() == 200);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for QuantizeParams {}

pub struct QuantizeAppend {
    f: CudaFunction,
}

impl QuantizeAppend {
    pub fn load(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(QuantizeAppend {
            f: gpu.function(&QUANTIZE_APPEND, &[], "tkv_quantize_append")?,
        })
    }

    /// Quantize `jobs` from `k`, `v` (`[token][kv_head][head_dim]`, f32) into `pool` laid out
    /// as `layout` (its tables are not read). Waits for the kernel; a key or value that is not
    /// finite or outside the fp16 range is an error (the blocks it touched are then garbage).
    pub fn run(
        &self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: &mut CudaSlice<u8>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        jobs: &[QuantizeJob],
    ) -> Result<(), GpuError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let d = layout.head_dim();
        let per_token = layout.kv_heads * d;
        let src_tokens = k.len().min(v.len()) / per_token.max(1);
        if pool.len() < layout.pool_bytes() {
            return Err(GpuError::Shape(format!(
                "pool of {} bytes, the layout needs {}",
                pool.len(),
                layout.pool_bytes()
            )));
        }
        let mut flat = Vec::with_capacity(5 * jobs.len());
        let mut named = std::collections::HashSet::with_capacity(jobs.len());
        for (i, j) in jobs.iter().enumerate() {
            let g = layout.geom(j.class);
            let int = matches!(j.class, KvClass::Int4 | KvClass::Int2);
            let start_ok = j.start == 0 || (int && j.start % g.k_group == 0);
            if j.slot >= layout.slots
                || j.tokens == 0
                || !start_ok
                || j.start + j.tokens > g.tokens
                || j.first_token + j.tokens > src_tokens
                || g.slab_bytes() > layout.slab_bytes
            {
                return Err(GpuError::Shape(format!(
                    "quantize job {i}: slot {} of {}, tokens {}..{} of {src_tokens} into a \
                     {:?} block of {} at token {} (key group {}, {} bytes, pool slab {})",
                    j.slot,
                    layout.slots,
                    j.first_token,
                    j.first_token + j.tokens,
                    j.class,
                    g.tokens,
                    j.start,
                    g.k_group,
                    g.slab_bytes(),
                    layout.slab_bytes
                )));
            }
            if !named.insert(j.slot) {
                return Err(GpuError::Shape(format!(
                    "quantize job {i}: slot {} is named by an earlier job of the launch",
                    j.slot
                )));
            }
            flat.extend_from_slice(&[
                j.slot as i32,
                class_index(j.class) as i32,
                j.first_token as i32,
                j.tokens as i32,
                j.start as i32,
            ]);
        }
        if layout.slab_bytes > 48 * 1024 || layout.slab_bytes % 16 != 0 {
            return Err(GpuError::Shape(format!(
                "slab of {} bytes: the kernel builds a slab in at most 48 KB of shared memory, \
                 16-byte aligned",
                layout.slab_bytes
            )));
        }
        let d_jobs = gpu.upload(&flat)?;
        let status: CudaSlice<i32> = gpu.zeros(1)?;
        let stream = gpu.stream();
        let mut p = QuantizeParams {
            pool: pool.device_ptr(stream).0,
            slab_bytes: layout.slab_bytes as i64,
            kv_heads: layout.kv_heads as i32,
            head_dim: d as i32,
            k: k.device_ptr(stream).0,
            v: v.device_ptr(stream).0,
            jobs: d_jobs.device_ptr(stream).0,
            status: status.device_ptr(stream).0,
            ..Default::default()
        };
        for c in KvClass::ALL {
            let g = layout.geom(c);
            let ks = g.k_scale_offset() as i32;
            let int = matches!(c, KvClass::Int4 | KvClass::Int2);
            p.geom[class_index(c)] = Geom {
                tokens: g.tokens as i32,
                v_group: g.v_group as i32,
                v_off: g.v_offset() as i32,
                ks_off: ks,
                kz_off: if int { g.k_zero_offset() as i32 } else { ks },
                vs_off: if int { g.v_scale_offset() as i32 } else { ks },
                vz_off: if int { g.v_zero_offset() as i32 } else { ks },
                slab: g.slab_bytes() as i32,
                k_group: g.k_group as i32,
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (jobs.len() as u32, layout.kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: layout.slab_bytes as u32,
        };
        let mut b = stream.launch_builder(&self.f);
        b.arg(&p);
        // SAFETY: every job was checked against the pool, the source length and its block.
        unsafe { b.launch(cfg) }.during("launching tkv_quantize_append")?;
        let flags = gpu.download(&status)?;
        if flags.first().copied().unwrap_or(0) != 0 {
            return Err(GpuError::Shape(
                "quantize-append: a key or value is not finite or outside the fp16 range".into(),
            ));
        }
        Ok(())
    }
}
