//! A loaded model's forward pass on the GPU, one token at a time over a 16-bit paged cache:
//! bf16 weights (the model's f32 weights rounded), each step appends the token's K/V to its
//! sequence's 16-bit block and attends over everything before it and itself, through the same
//! decode step and decode-attention kernel as `bench decode-step`. What `eval gpu-forward`
//! checks against the CPU forward. Prefill is a decode step per prompt token: correct, not
//! fast (chunked prefill attention over packed history is not built).

use super::decode_attention::{BlockRef, DecodePlan, DeviceCache, PagedLayout};
use super::decode_step::{
    DecodeStep, DeviceWeights, HostWeights, KvCaches, ModelShape, StepOptions,
};
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
    /// Upload `model` (weights rounded to bf16) and a 16-bit cache for `capacity` tokens.
    pub fn new(
        gpu: &GpuContext,
        name: &str,
        model: &Model,
        capacity: usize,
    ) -> Result<Self, GpuError> {
        let shape = ModelShape::of_config(name, &model.config);
        shape.validate()?;
        if capacity == 0 {
            return Err(GpuError::Shape("a cache of 0 tokens".into()));
        }
        let host = HostWeights::of_model(model)?;
        let weights = DeviceWeights::upload(gpu, &shape, &host)?;
        drop(host);
        let step = DecodeStep::new(gpu, &shape, 1, V_GROUP)?;
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

    /// Run token `id` at the next position: returns its next-token logits (f32, the vocab).
    pub fn step(&mut self, gpu: &GpuContext, id: u32) -> Result<Vec<f32>, GpuError> {
        if self.len >= self.capacity {
            return Err(GpuError::Shape(format!(
                "the GPU cache holds {} tokens and is full",
                self.capacity
            )));
        }
        if id as usize >= self.shape.vocab {
            return Err(GpuError::Shape(format!(
                "token id {id} outside the vocabulary of {}",
                self.shape.vocab
            )));
        }
        let per_block = self.layout.geom(KvClass::F16).tokens;
        let (slot, tok) = (self.len / per_block, self.len % per_block);
        let table = &mut self.layout.tables[0];
        match table.last_mut() {
            Some(last) if tok > 0 => last.tokens += 1,
            _ => table.push(BlockRef {
                seq: 0,
                slot,
                tokens: 1,
            }),
        }
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
        self.step
            .set_append(gpu, Some((&[slot as i32], &[tok as i32])))?;
        self.step.run(
            gpu,
            &self.weights,
            &self.kv,
            &mut plan,
            StepOptions::default(),
        )?;
        let logits = gpu.download(&self.step.logits)?;
        self.len += 1;
        Ok(logits)
    }
}

/// bf16 rounding of a weight, as the GPU stores it (for references that want the same weights).
pub fn round_bf16(x: f32) -> f32 {
    Bf16::from_f32(x).to_f32()
}
