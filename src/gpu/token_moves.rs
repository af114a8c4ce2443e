//! The device side of the serving block pool (`paged::pool`): zero new slots, move tokens
//! (decoded from any class) into 16-bit blocks or FP8 blocks of waiting tokens, and quantize
//! a key group's worth of tokens of any class into a packed block — for every layer of the
//! stacked pool in one launch each.
//! Kernels in `kernels/prefill_attention.cu` (they share its block decoding).

use super::decode_attention::{class_index, PagedLayout, HEAD_DIM};
use super::nvrtc::PREFILL_ATTENTION;
use super::prefill_attention::{class_offsets, ClassTable};
use super::quantize_append::{QuantizeAppend, QuantizeJob};
use super::{DriverResult, GpuContext, GpuError};
use crate::paged::pool::{Ops, HOLD_FP8_SCALE};
use crate::quant::KvClass;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// `#[repr(C)]` mirror of `tkp::MoveParams` (304 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct MoveParams {
    pool: u64,
    slab_bytes: i64,
    layer_slots: i64,
    kv_heads: i32,
    n: i32,
    v_group: i32,
    fp8_scale: f32,
    slot: u64,
    cls: u64,
    tok: u64,
    k: u64,
    v: u64,
    ct: [ClassTable; 4],
}

const _: () = assert!(std::mem::size_of::<MoveParams>() == 304);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for MoveParams {}

/// Launchers and a scratch of `tokens` tokens × every layer: f32 for the pool's moves, fp16
/// for a decoder's (prefill attention).
pub struct TokenMoves {
    gather: CudaFunction,
    store: CudaFunction,
    zero: CudaFunction,
    quantize: QuantizeAppend,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// Tokens (per layer) the scratch holds.
    pub tokens: usize,
    layers: usize,
    /// A decoder's scratch: fp16 bits (`decode`), not the pool moves' f32.
    k16: CudaSlice<u16>,
    v16: CudaSlice<u16>,
    gather16: Option<CudaFunction>,
}

impl TokenMoves {
    pub fn new(
        gpu: &GpuContext,
        layout: &PagedLayout,
        layers: usize,
        tokens: usize,
    ) -> Result<Self, GpuError> {
        if layout.head_dim() != HEAD_DIM {
            return Err(GpuError::Shape(format!(
                "token moves take head dim {HEAD_DIM}, not {}",
                layout.head_dim()
            )));
        }
        let n = layers * tokens.max(1) * layout.kv_heads * HEAD_DIM;
        Ok(TokenMoves {
            gather: gpu.function(&PREFILL_ATTENTION, &[], "tkv_gather_tokens")?,
            store: gpu.function(&PREFILL_ATTENTION, &[], "tkv_store_f16")?,
            zero: gpu.function(&PREFILL_ATTENTION, &[], "tkv_zero_slots")?,
            quantize: QuantizeAppend::load(gpu)?,
            k: gpu.zeros(n)?,
            v: gpu.zeros(n)?,
            tokens: tokens.max(1),
            layers,
            k16: gpu.zeros(1)?,
            v16: gpu.zeros(1)?,
            gather16: None,
        })
    }

    /// A decoder for one layer's pool (prefill attention: a sequence's tokens to fp16); its
    /// scratch grows to the longest sequence decoded.
    pub fn decoder(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(TokenMoves {
            gather: gpu.function(&PREFILL_ATTENTION, &[], "tkv_gather_tokens")?,
            store: gpu.function(&PREFILL_ATTENTION, &[], "tkv_store_f16")?,
            zero: gpu.function(&PREFILL_ATTENTION, &[], "tkv_zero_slots")?,
            quantize: QuantizeAppend::load(gpu)?,
            k: gpu.zeros(1)?,
            v: gpu.zeros(1)?,
            tokens: 0,
            layers: 1,
            k16: gpu.zeros(1)?,
            v16: gpu.zeros(1)?,
            gather16: Some(gpu.function(&PREFILL_ATTENTION, &[], "tkv_gather_tokens_f16")?),
        })
    }

    /// Check `items` (slot, class index, token) against `layout` and upload them once: a
    /// decoder then decodes any range of them in any layer with the same tables
    /// (`decode_items`), and the pool moves gather or store them.
    pub fn upload_items(
        gpu: &GpuContext,
        layout: &PagedLayout,
        items: &[(i32, i32, i32)],
        gather: bool,
    ) -> Result<DeviceItems, GpuError> {
        let slots: Vec<i32> = items.iter().map(|x| x.0).collect();
        Self::check_slots(layout, &slots)?;
        for &(_, c, t) in items {
            let cap = layout.geoms.get(c as usize).map_or(0, |g| g.tokens);
            // The store writes 16-bit and FP8 blocks only.
            let storable = [KvClass::F16, KvClass::Fp8].map(|k| class_index(k) as i32);
            let cap = if gather || storable.contains(&c) {
                cap
            } else {
                0
            };
            if t < 0 || t as usize >= cap {
                return Err(GpuError::Shape(format!(
                    "token {t} of a block of {cap} (class {c})"
                )));
            }
        }
        // One buffer, one copy: [slot; n] [class; n] [token; n].
        let mut flat = slots;
        flat.extend(items.iter().map(|x| x.1));
        flat.extend(items.iter().map(|x| x.2));
        Ok(DeviceItems {
            buf: gpu.upload(&flat)?,
            n: items.len(),
        })
    }

    /// Queue the decoding of `items[range]` (uploaded by `upload_items` for this layout's
    /// tables) of the layer pool at `pool_offset` in `pool` to fp16 `[item][kv_head][128]`
    /// keys and values (a decoder's).
    pub fn decode_items(
        &mut self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: &CudaSlice<u8>,
        pool_offset: usize,
        items: &DeviceItems,
        range: std::ops::Range<usize>,
    ) -> Result<(&CudaSlice<u16>, &CudaSlice<u16>), GpuError> {
        if self.gather16.is_none() {
            return Err(GpuError::Shape(
                "decode needs a decoder (TokenMoves::decoder)".into(),
            ));
        }
        if pool_offset + layout.pool_bytes() > pool.len() {
            return Err(GpuError::Shape(format!(
                "a pool of {} bytes at offset {pool_offset} in a buffer of {}",
                layout.pool_bytes(),
                pool.len()
            )));
        }
        self.reserve_f16(gpu, layout, range.len())?;
        let ptr = pool.device_ptr(gpu.stream()).0 + pool_offset as u64;
        self.launch_items(gpu, layout, ptr, items, range, true)?;
        Ok((&self.k16, &self.v16))
    }

    /// Grow a decoder's fp16 scratch to hold `n` tokens (a power of two of them).
    pub fn reserve_f16(
        &mut self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        n: usize,
    ) -> Result<(), GpuError> {
        if n > self.tokens {
            let len = n.next_power_of_two() * layout.kv_heads * HEAD_DIM;
            self.k16 = gpu.zeros(len)?;
            self.v16 = gpu.zeros(len)?;
            self.tokens = n.next_power_of_two();
        }
        Ok(())
    }

    /// A decoder's fp16 scratch: keys and values `[token][kv_head][128]`.
    pub fn f16_scratch(&self) -> (&CudaSlice<u16>, &CudaSlice<u16>) {
        (&self.k16, &self.v16)
    }

    fn check_pool(&self, layout: &PagedLayout, pool: &CudaSlice<u8>) -> Result<(), GpuError> {
        if pool.len() < layout.pool_bytes() * self.layers {
            return Err(GpuError::Shape(format!(
                "a pool of {} bytes for {} layers of {}",
                pool.len(),
                self.layers,
                layout.pool_bytes()
            )));
        }
        Ok(())
    }

    fn check_slots(layout: &PagedLayout, slots: &[i32]) -> Result<(), GpuError> {
        if let Some(s) = slots.iter().find(|&&s| s < 0 || s as usize >= layout.slots) {
            return Err(GpuError::Shape(format!(
                "slot {s} of a pool of {}",
                layout.slots
            )));
        }
        Ok(())
    }

    /// Queue `ops` on the stream (zero, moves, quantizes), in chunks of the scratch's size;
    /// waits only for the quantize kernel's status.
    pub fn run(
        &mut self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: &mut CudaSlice<u8>,
        ops: &Ops,
    ) -> Result<(), GpuError> {
        self.check_pool(layout, pool)?;
        if !ops.zero.is_empty() {
            let slots: Vec<i32> = ops.zero.iter().map(|&s| s as i32).collect();
            Self::check_slots(layout, &slots)?;
            let d_slots = gpu.upload(&slots)?;
            let stream = gpu.stream();
            let layer_slots = layout.slots as i64;
            let slot_bytes = (layout.kv_heads * layout.slab_bytes) as i64;
            let cfg = LaunchConfig {
                grid_dim: (slots.len() as u32, self.layers as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&self.zero);
            b.arg(&mut *pool)
                .arg(&layer_slots)
                .arg(&slot_bytes)
                .arg(&d_slots);
            // SAFETY: every slot is inside each layer's pool (checked), slot bytes a multiple
            // of 16 (the layout's slab is).
            unsafe { b.launch(cfg) }.during("launching tkv_zero_slots")?;
        }
        for chunk in ops.moves.chunks(self.tokens) {
            let src: Vec<(i32, i32, i32)> = chunk
                .iter()
                .map(|m| {
                    (
                        m.src_slot as i32,
                        class_index(m.src_class) as i32,
                        m.src_tok as i32,
                    )
                })
                .collect();
            let dst: Vec<(i32, i32, i32)> = chunk
                .iter()
                .map(|m| {
                    (
                        m.dst_slot as i32,
                        class_index(m.dst_class) as i32,
                        m.dst_tok as i32,
                    )
                })
                .collect();
            let ptr = pool.device_ptr(gpu.stream()).0;
            self.launch(gpu, layout, ptr, &src, true)?;
            self.launch(gpu, layout, ptr, &dst, false)?;
        }
        // Quantize jobs, as many blocks per launch as the scratch holds.
        let mut i = 0;
        while i < ops.quantize.len() {
            let mut n = 0;
            let mut j = i;
            while j < ops.quantize.len() && n + ops.quantize[j].src.len() <= self.tokens {
                n += ops.quantize[j].src.len();
                j += 1;
            }
            if j == i {
                return Err(GpuError::Shape(format!(
                    "a block of {} tokens does not fit a scratch of {}",
                    ops.quantize[i].src.len(),
                    self.tokens
                )));
            }
            let batch = &ops.quantize[i..j];
            let src: Vec<(i32, i32, i32)> = batch
                .iter()
                .flat_map(|q| {
                    q.src
                        .iter()
                        .map(|&(s, c, t)| (s as i32, class_index(c) as i32, t as i32))
                })
                .collect();
            let ptr = pool.device_ptr(gpu.stream()).0;
            self.launch(gpu, layout, ptr, &src, true)?;
            let mut jobs = Vec::with_capacity(batch.len() * self.layers);
            for l in 0..self.layers {
                let mut first = l * n;
                for q in batch {
                    jobs.push(QuantizeJob {
                        slot: l * layout.slots + q.dst_slot as usize,
                        class: q.class,
                        first_token: first,
                        tokens: q.src.len(),
                        start: q.start as usize,
                    });
                    first += q.src.len();
                }
            }
            let mut stacked = layout.clone();
            stacked.slots = layout.slots * self.layers;
            stacked.tables = Default::default();
            self.quantize
                .run(gpu, &stacked, pool, &self.k, &self.v, &jobs)?;
            i = j;
        }
        Ok(())
    }

    /// Gather (`gather`: decode tokens `(slot, class, tok)` into the scratch) or store (the
    /// scratch's first tokens into 16-bit or FP8 `(slot, class, tok)`), every layer of the pool at
    /// device address `pool` (checked by the caller to hold `self.layers` layer pools).
    fn launch(
        &self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: u64,
        items: &[(i32, i32, i32)],
        gather: bool,
    ) -> Result<(), GpuError> {
        if items.is_empty() {
            return Ok(());
        }
        let d = Self::upload_items(gpu, layout, items, gather)?;
        self.launch_items(gpu, layout, pool, &d, 0..items.len(), gather)
    }

    /// `launch` of `items[range]`, already checked and uploaded.
    fn launch_items(
        &self,
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: u64,
        items: &DeviceItems,
        range: std::ops::Range<usize>,
        gather: bool,
    ) -> Result<(), GpuError> {
        if range.is_empty() {
            return Ok(());
        }
        if range.end > items.n || range.len() > self.tokens {
            return Err(GpuError::Shape(format!(
                "items {range:?} of {} for a scratch of {} tokens",
                items.n, self.tokens
            )));
        }
        let stream = gpu.stream().clone();
        let base = items.buf.device_ptr(&stream).0;
        let at = |array: usize| base + ((array * items.n + range.start) * 4) as u64;
        let mut p = MoveParams {
            pool,
            slab_bytes: layout.slab_bytes as i64,
            layer_slots: layout.slots as i64,
            kv_heads: layout.kv_heads as i32,
            n: range.len() as i32,
            v_group: layout.v_group() as i32,
            fp8_scale: HOLD_FP8_SCALE,
            slot: at(0),
            cls: at(1),
            tok: at(2),
            ..Default::default()
        };
        // A decoder gathers into its fp16 scratch; the pool moves use the f32 one.
        let gather16 = gather && self.gather16.is_some();
        let f = match (&self.gather16, gather) {
            (Some(g16), true) => {
                p.k = self.k16.device_ptr(&stream).0;
                p.v = self.v16.device_ptr(&stream).0;
                g16
            }
            _ => {
                p.k = self.k.device_ptr(&stream).0;
                p.v = self.v.device_ptr(&stream).0;
                if gather {
                    &self.gather
                } else {
                    &self.store
                }
            }
        };
        for c in KvClass::ALL {
            p.ct[class_index(c)] = class_offsets(layout, c);
        }
        // The fp16 decoder's CTAs take `GATHER16_TOKENS` tokens each, the others one.
        let per_cta = if gather16 { GATHER16_TOKENS } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (
                range.len().div_ceil(per_cta) as u32,
                layout.kv_heads as u32,
                self.layers as u32,
            ),
            block_dim: (HEAD_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&p);
        // SAFETY: slots lie in each layer's pool and token indices in their blocks (checked
        // by `upload_items`); the scratch holds `range.len()` tokens of every layer and KV
        // head; the item buffer outlives the launch on this stream (dropped after it, and
        // device frees are stream-ordered).
        unsafe { b.launch(cfg) }.during("launching a token move")?;
        Ok(())
    }
}

/// Tokens one CTA of `tkv_gather_tokens_f16` decodes (`GATHER16_TOKENS` in the kernel).
const GATHER16_TOKENS: usize = 8;

/// Token items (slot, class, token) on the device (`TokenMoves::upload_items`).
pub struct DeviceItems {
    buf: CudaSlice<i32>,
    n: usize,
}
