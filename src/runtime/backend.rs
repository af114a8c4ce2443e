//! The seam between the scheduler and a compute backend: run one sequence's new tokens
//! through the model into its own KV cache, and report what that cache holds in bytes.

use crate::model::llama::Media;
use crate::tags::TokenTag;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("token #{index} has id {id}, outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    #[error("cannot build the KV cache: {0}")]
    Cache(String),
    #[error("the backend failed: {0}")]
    Failed(String),
    /// The cache's memory ran out while the sequence grew: the scheduler preempts it (its
    /// cache is dropped and recomputed later) instead of failing the request.
    #[error("the KV block pool is full")]
    OutOfBlocks,
}

/// Bytes one sequence's KV cache holds, by kind (what a real cache stores, not the
/// bookkeeping of the CPU reference implementation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KvUsage {
    /// Packed integer codes.
    pub packed: usize,
    /// fp16 scales and zeros of the packed codes.
    pub params: usize,
    /// 16-bit keys and values (sinks, residual window, 16-bit classes, staged keys).
    pub half: usize,
    /// 32-bit keys and values (the f32 reference cache).
    pub full: usize,
    /// K and V elements stored (tokens × layers × kv_heads × head_dim × 2).
    pub elements: usize,
    /// Of the bytes above, those of allocated blocks that hold no token's data (a block's
    /// empty tail, a slot larger than its class needs): internal fragmentation.
    pub unfilled: usize,
}

impl KvUsage {
    pub fn total(&self) -> usize {
        self.packed + self.params + self.half + self.full
    }

    /// Stored bits per K or V element, scales and 16-bit parts included.
    pub fn effective_bits(&self) -> f64 {
        if self.elements == 0 {
            return 0.0;
        }
        self.total() as f64 * 8.0 / self.elements as f64
    }

    pub fn add(&mut self, o: &KvUsage) {
        self.packed += o.packed;
        self.params += o.params;
        self.half += o.half;
        self.full += o.full;
        self.elements += o.elements;
        self.unfilled += o.unfilled;
    }

    /// Share of the bytes held that hold no token's data.
    pub fn fragmentation(&self) -> f64 {
        if self.total() == 0 {
            return 0.0;
        }
        self.unfilled as f64 / self.total() as f64
    }
}

/// A shared block pool's slots (backends that have one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolOccupancy {
    pub slots: usize,
    pub free: usize,
    pub slot_bytes: usize,
}

/// One sequence's share of a scheduler step: feed `tokens` (tagged `tags`) after what its
/// cache holds; return the last token's logits when `logits` is set, else nothing.
pub struct Work<'a, S> {
    pub seq: &'a mut S,
    pub tokens: &'a [u32],
    pub tags: &'a [TokenTag],
    pub logits: bool,
    /// A vision model's image inputs over the whole sequence (the tokens start at the
    /// cache's length): image tokens take their feature rows, every token its multimodal
    /// position.
    pub media: Option<&'a Media>,
}

/// A compute backend: owns the model weights; each live sequence owns a `Seq` (its KV
/// cache). The scheduler calls [`Backend::step`] with the work of every runnable sequence;
/// a GPU backend batches it into one launch per layer, the CPU backend runs it in turn.
pub trait Backend: Send + 'static {
    type Seq: Send + 'static;

    /// For `/metrics` and logs, e.g. `cpu, kv f32`.
    fn describe(&self) -> String;

    fn vocab_size(&self) -> usize;

    /// An empty KV cache for a new sequence.
    fn new_seq(&self) -> Result<Self::Seq, BackendError>;

    /// Tokens the sequence's cache holds.
    fn len(&self, seq: &Self::Seq) -> usize;

    /// Keep at most the first `len` tokens (prefix reuse). A backend may keep fewer (a
    /// paged cache cannot cut inside quantized blocks); `len` tells what it kept.
    fn truncate(&self, seq: &mut Self::Seq, len: usize);

    fn usage(&self, seq: &Self::Seq) -> KvUsage;

    /// Token-layers stored per precision class, labelled like `k4v2`, `k16v16`, `f32`.
    fn class_tokens(&self, seq: &Self::Seq) -> Vec<(String, usize)>;

    /// The shared block pool's occupancy, for backends that allocate from one.
    fn pool(&self) -> Option<PoolOccupancy> {
        None
    }

    /// Bytes a cache holding exactly `tags` (a prompt) would take: what admission reserves.
    fn estimate_bytes(&self, tags: &[TokenTag]) -> usize;

    /// Run one sequence's work.
    fn forward(&self, work: Work<'_, Self::Seq>) -> Result<Vec<f32>, BackendError>;

    /// Run every runnable sequence's work of one scheduler step; results in order.
    fn step(&self, batch: Vec<Work<'_, Self::Seq>>) -> Vec<Result<Vec<f32>, BackendError>> {
        batch.into_iter().map(|w| self.forward(w)).collect()
    }
}
