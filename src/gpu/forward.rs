//! A loaded model's forward pass on the GPU over a 16-bit paged cache: bf16 weights (the
//! model's f32 weights rounded), f32 residual. `prefill` runs a chunk of tokens at once (GEMMs
//! over the chunk's rows, its K/V appended to the sequence's 16-bit blocks, causal attention
//! over the paged cache by `PrefillAttention`); `step` runs one token through the same decode
//! step and decode-attention kernel as `bench decode-step`. What `eval gpu-forward` checks
//! against the CPU forward.

use super::decode_attention::{BlockRef, DecodePlan, DeviceCache, PagedLayout};
use super::decode_step::{
    DecodeStep, DeviceWeights, HostWeights, KvCaches, ModelShape, StepOptions,
};
use super::prefill_attention::PrefillCall;
use super::{Bf16, GpuContext, GpuError};
use crate::model::llama::Model;
use crate::quant::KvClass;

const V_GROUP: usize = 64;

/// One sequence's forward pass on the GPU.
pub struct GpuForward {
    pub shape: ModelShape,
    weights: DeviceWeights,
    step: DecodeStep,
    kv: KvCaches,
    /// The host copy of the block tables (16-bit blocks of sequence 0, slot = block index).
    layout: PagedLayout,
    capacity: usize,
    len: usize,
    ctas_per_sm: [usize; 4],
    multiprocessors: usize,
}

impl GpuForward {
    /// Upload `model` (weights rounded to bf16) and a 16-bit cache for `capacity` tokens;
    /// prefill chunks of up to `max_chunk` tokens.
    pub fn new(
        gpu: &GpuContext,
        name: &str,
        model: &Model,
        capacity: usize,
        max_chunk: usize,
    ) -> Result<Self, GpuError> {
        let shape = ModelShape::of_config(name, &model.config);
        shape.validate()?;
        if capacity == 0 {
            return Err(GpuError::Shape("a cache of 0 tokens".into()));
        }
        let host = HostWeights::of_model(model)?;
        let weights = DeviceWeights::upload(gpu, &shape, &host)?;
        drop(host);
        let step = DecodeStep::new(gpu, &shape, max_chunk.max(1), V_GROUP)?;
        let ctas_per_sm = step.attention_kernels().ctas_per_sm()?;
        // The decode kernel's head dim (128) whatever the model's: smaller heads are zero-padded.
        let mut layout = PagedLayout::new(shape.q_heads, shape.kv_heads, 1, V_GROUP)?;
        layout.slots = capacity.div_ceil(layout.geom(KvClass::F16).tokens);
        let cache = DeviceCache::allocate_layers(gpu, &layout, shape.layers)?;
        let kv = KvCaches::Stacked {
            cache: Box::new(cache),
            layers: shape.layers,
        };
        Ok(GpuForward {
            shape,
            weights,
            step,
            kv,
            layout,
            capacity,
            len: 0,
            ctas_per_sm,
            multiprocessors: gpu.multiprocessors,
        })
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget the sequence (the pool is zeroed: unused token slots must read as zero).
    pub fn reset(&mut self, gpu: &GpuContext) -> Result<(), GpuError> {
        self.layout.tables = Default::default();
        self.len = 0;
        if let KvCaches::Stacked { cache, .. } = &mut self.kv {
            gpu.stream()
                .memset_zeros(&mut cache.pool)
                .map_err(|e| GpuError::Driver {
                    what: "zeroing the KV pool".into(),
                    source: e,
                })?;
        }
        Ok(())
    }

    /// Check `ids` fit and add them to the 16-bit block table: their (slot, token) targets.
    fn reserve(&mut self, ids: &[u32]) -> Result<(Vec<i32>, Vec<i32>), GpuError> {
        if ids.is_empty() || self.len + ids.len() > self.capacity {
            return Err(GpuError::Shape(format!(
                "{} tokens after {} in a GPU cache of {}",
                ids.len(),
                self.len,
                self.capacity
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.shape.vocab) {
            return Err(GpuError::Shape(format!(
                "token id {id} outside the vocabulary of {}",
                self.shape.vocab
            )));
        }
        let per_block = self.layout.geom(KvClass::F16).tokens;
        let (mut slots, mut toks) = (Vec::new(), Vec::new());
        for p in self.len..self.len + ids.len() {
            let (slot, tok) = (p / per_block, p % per_block);
            let table = &mut self.layout.tables[0];
            match table.last_mut() {
                Some(last) if tok > 0 => last.tokens += 1,
                _ => table.push(BlockRef {
                    seq: 0,
                    slot,
                    tokens: 1,
                }),
            }
            slots.push(slot as i32);
            toks.push(tok as i32);
        }
        Ok((slots, toks))
    }

    /// Run `ids` (at most `max_chunk`) at the next positions in one prefill step: returns the
    /// next-token logits of every one, `[ids.len()][vocab]`.
    pub fn prefill(&mut self, gpu: &GpuContext, ids: &[u32]) -> Result<Vec<f32>, GpuError> {
        if ids.len() > self.step.batch {
            return Err(GpuError::Shape(format!(
                "a chunk of {} tokens: at most {}",
                ids.len(),
                self.step.batch
            )));
        }
        let f16_base = self.len;
        let (slots, toks) = self.reserve(ids)?;
        let KvCaches::Stacked { cache, .. } = &mut self.kv else {
            return Err(GpuError::Shape("the forward's cache is not stacked".into()));
        };
        cache.set_tables(gpu, &self.layout)?;
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let pos: Vec<i32> = (f16_base..f16_base + ids.len()).map(|p| p as i32).collect();
        self.step.set_inputs(gpu, &ids32, &pos)?;
        self.step.set_append(gpu, Some((&slots, &toks)))?;
        let call = PrefillCall {
            seq: 0,
            f16_base,
            row0: 0,
            rows: ids.len(),
            sm_scale: 0.0,
        };
        self.step.run_prefill(gpu, &self.weights, &self.kv, call)?;
        let logits = gpu.download_prefix(&self.step.logits, ids.len() * self.shape.vocab)?;
        self.len += ids.len();
        Ok(logits)
    }

    /// Run token `id` at the next position: returns its next-token logits (f32, the vocab).
    pub fn step(&mut self, gpu: &GpuContext, id: u32) -> Result<Vec<f32>, GpuError> {
        let (slots, toks) = self.reserve(&[id])?;
        let (slot, tok) = (slots[0], toks[0]);
        let KvCaches::Stacked { cache, .. } = &mut self.kv else {
            return Err(GpuError::Shape("the forward's cache is not stacked".into()));
        };
        cache.set_tables(gpu, &self.layout)?;
        let bpw = DecodePlan::default_blocks_per_work(
            &cache.layout,
            self.multiprocessors,
            self.ctas_per_sm,
        );
        let mut plan = DecodePlan::new(gpu, cache, bpw)?;
        let pos = self.len as i32;
        self.step.set_inputs(gpu, &[id as i32], &[pos])?;
        self.step.set_append(gpu, Some((&[slot], &[tok])))?;
        self.step.run(
            gpu,
            &self.weights,
            &self.kv,
            &mut plan,
            StepOptions::default(),
        )?;
        let logits = gpu.download_prefix(&self.step.logits, self.shape.vocab)?;
        self.len += 1;
        Ok(logits)
    }
}

/// bf16 rounding of a weight, as the GPU stores it (for references that want the same weights).
pub fn round_bf16(x: f32) -> f32 {
    Bf16::from_f32(x).to_f32()
}
