//! KV caches: the trait the forward pass writes to and attends through, the full-precision
//! reference cache, and (later) the mixed-precision quantized cache.

pub mod full;
pub mod quantized;

pub use full::FullCache;
pub use quantized::{KvPolicy, PrecisionClass, QuantCache, QuantCacheConfig};

use crate::tags::TokenTag;

/// Geometry of one model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// What the forward pass needs from a KV cache. For each layer, the new tokens' keys and
/// values are appended first, then their queries attend causally over everything stored.
/// Quantized caches implement this too, so the same forward runs with any precision.
pub trait KvCache {
    fn shape(&self) -> KvShape;

    /// Tokens stored in `layer`.
    fn len(&self, layer: usize) -> usize;

    fn is_empty(&self) -> bool {
        self.len(0) == 0
    }

    /// Append `n` tokens to `layer`. `k` and `v` are `[n, num_kv_heads, head_dim]` row-major,
    /// keys already rotated (post-RoPE); `tags.len() == n`.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tags: &[TokenTag]);

    /// Causal attention of the last `n` stored tokens' queries in `layer`: `q` is
    /// `[n, num_heads, head_dim]`; query `i` sits at position `len - n + i` and sees positions
    /// `0..=len - n + i`. Writes `[n, num_heads, head_dim]` into `out`.
    fn attend(&self, layer: usize, q: &[f32], out: &mut [f32]);

    /// Instead of [`KvCache::attend`] when nobody reads the output (the last layer of a
    /// forward pass that returns no logits): a cache that records queries (calibration)
    /// sees them here; the attention itself is skipped.
    fn skip_attend(&self, _layer: usize, _q: &[f32]) {}

    /// Drop every token at position `>= len` in every layer (rewind after speculative work).
    fn truncate(&mut self, len: usize);
}
