//! Full-precision replay that keeps what calibration measures: post-RoPE K and V of every
//! token and the queries at the chosen decode positions, per layer.

use crate::kvcache::{FullCache, KvCache, KvShape};
use crate::model::llama::{Logits, Media, Model};
use crate::tags::TokenTag;
use std::cell::RefCell;
use std::ops::Range;

/// A [`FullCache`] that also copies the queries of chosen positions as they attend.
pub struct RecordingCache {
    full: FullCache,
    /// Sorted positions whose queries are kept.
    positions: Vec<usize>,
    /// Per layer `[positions.len(), num_heads * head_dim]`; `attend` takes `&self`.
    q: RefCell<Vec<Vec<f32>>>,
}

impl RecordingCache {
    pub fn new(shape: KvShape, positions: Vec<usize>) -> Self {
        Self::resume(FullCache::new(shape), positions)
    }

    /// Continue from `full`, which already holds this sequence's first `full.len(0)` tokens.
    /// Their queries are not recomputed, so every position must lie at or after them.
    pub fn resume(full: FullCache, mut positions: Vec<usize>) -> Self {
        positions.sort_unstable();
        positions.dedup();
        assert!(
            positions.first().is_none_or(|&p| p >= full.len(0)),
            "resume: a query position lies inside the reused prefix"
        );
        let shape = full.shape();
        let qrow = shape.num_heads * shape.head_dim;
        RecordingCache {
            full,
            q: RefCell::new(vec![vec![0.0; positions.len() * qrow]; shape.num_layers]),
            positions,
        }
    }

    pub fn into_capture(self) -> Capture {
        Capture {
            full: self.full,
            positions: self.positions,
            q: self.q.into_inner(),
        }
    }
}

impl KvCache for RecordingCache {
    fn shape(&self) -> KvShape {
        self.full.shape()
    }

    fn len(&self, layer: usize) -> usize {
        self.full.len(layer)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tags: &[TokenTag]) {
        self.full.append(layer, k, v, tags)
    }

    fn attend(&self, layer: usize, q: &[f32], out: &mut [f32]) {
        self.record(layer, q);
        self.full.attend(layer, q, out)
    }

    fn skip_attend(&self, layer: usize, q: &[f32]) {
        self.record(layer, q);
    }

    fn truncate(&mut self, len: usize) {
        self.full.truncate(len)
    }
}

impl RecordingCache {
    /// Keep the queries of `q` (the last stored tokens of `layer`) at chosen positions.
    fn record(&self, layer: usize, q: &[f32]) {
        let s = self.full.shape();
        let qrow = s.num_heads * s.head_dim;
        let n = q.len() / qrow;
        let len = self.full.len(layer);
        let start = len - n;
        let lo = self.positions.partition_point(|&p| p < start);
        let hi = self.positions.partition_point(|&p| p < len);
        let mut rec = self.q.borrow_mut();
        for (i, &p) in self.positions[lo..hi].iter().enumerate() {
            let src = &q[(p - start) * qrow..(p - start + 1) * qrow];
            rec[layer][(lo + i) * qrow..(lo + i + 1) * qrow].copy_from_slice(src);
        }
    }
}

/// What one trajectory's replay leaves for the distortion pass.
pub struct Capture {
    /// Every token's K and V (post-RoPE) and tag.
    pub full: FullCache,
    /// Query positions, sorted.
    pub positions: Vec<usize>,
    /// Per layer `[positions.len(), num_heads * head_dim]`.
    pub q: Vec<Vec<f32>>,
}

/// Up to `max` positions spread evenly over the tokens of `bodies` (all of them when fewer).
pub fn pick_positions(bodies: &[Range<usize>], max: usize) -> Vec<usize> {
    let all: Vec<usize> = bodies.iter().flat_map(|r| r.clone()).collect();
    if all.len() <= max {
        return all;
    }
    if max == 0 {
        return Vec::new();
    }
    // Evenly spaced picks, the last body token always included.
    (0..max)
        .map(|i| all[((i + 1) * all.len()) / max - 1])
        .collect()
}

/// Replay `ids` through `model` in chunks (full precision), keeping K, V and the queries at
/// `positions`. `progress(done)` is called after each chunk.
pub fn replay(
    model: &Model,
    ids: &[u32],
    tags: &[TokenTag],
    positions: Vec<usize>,
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Capture {
    replay_from(model, ids, tags, None, positions, chunk, None, progress)
}

/// [`replay`], continuing from `prefix` when given: a cache holding the K/V of exactly
/// `ids[..prefix.len(0)]` (from an earlier replay of a sequence starting with the same
/// tokens), a whole number of chunks long, so that the remaining chunks are the ones a
/// fresh replay would run and the result is identical. `progress` counts from 0.
#[allow(clippy::too_many_arguments)]
pub fn replay_from(
    model: &Model,
    ids: &[u32],
    tags: &[TokenTag],
    media: Option<&Media>,
    positions: Vec<usize>,
    chunk: usize,
    prefix: Option<FullCache>,
    progress: &mut dyn FnMut(usize),
) -> Capture {
    let full = prefix.unwrap_or_else(|| model.new_cache());
    let done = full.len(0);
    assert!(
        done <= ids.len() && done % chunk.max(1) == 0,
        "replay_from: the prefix must be whole chunks of this sequence"
    );
    let mut cache = RecordingCache::resume(full, positions);
    match media {
        // A vision-language model's images: feature rows and multimodal positions.
        Some(m) => model.prefill_media(
            &ids[done..],
            &tags[done..],
            m,
            done,
            &mut cache,
            Logits::None,
            chunk,
            &mut |d| progress(done + d),
        ),
        None => model.prefill(
            &ids[done..],
            &tags[done..],
            &mut cache,
            Logits::None,
            chunk,
            &mut |d| progress(done + d),
        ),
    };
    cache.into_capture()
}

/// How many leading tokens of `(ids, tags)` may reuse the K/V of an earlier replay of
/// `(prev_ids, prev_tags)`: their common prefix, cut to whole `chunk`s and to the first
/// measured position (queries inside the prefix are not recomputed).
pub fn reusable_prefix(
    (ids, tags): (&[u32], &[TokenTag]),
    (prev_ids, prev_tags): (&[u32], &[TokenTag]),
    first_position: usize,
    chunk: usize,
) -> usize {
    let common = ids
        .iter()
        .zip(tags)
        .zip(prev_ids.iter().zip(prev_tags))
        .take_while(|(a, b)| a == b)
        .count();
    let chunk = chunk.max(1);
    common.min(first_position) / chunk * chunk
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Role};

    #[test]
    fn positions_are_spread_and_bounded() {
        let bodies = vec![3..10, 20..30];
        assert_eq!(pick_positions(&bodies, 100).len(), 17);
        let p = pick_positions(&bodies, 4);
        assert_eq!(p.len(), 4);
        assert_eq!(*p.last().unwrap(), 29);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn recording_cache_keeps_queries_of_chosen_positions_across_chunks() {
        let s = KvShape {
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let tag = TokenTag {
            role: Role::User,
            modality: Modality::Text,
            turn: 1,
            step: 0,
        };
        let mut c = RecordingCache::new(s, vec![4, 1]);
        let mut out = vec![0.0; 12];
        c.append(0, &[0.0; 6], &[0.0; 6], &[tag; 3]);
        c.attend(
            0,
            &[0., 1., 2., 3., 10., 11., 12., 13., 20., 21., 22., 23.],
            &mut out,
        );
        c.append(0, &[0.0; 4], &[0.0; 4], &[tag; 2]);
        c.attend(0, &[30., 31., 32., 33., 40., 41., 42., 43.], &mut out[..8]);
        let cap = c.into_capture();
        assert_eq!(cap.positions, vec![1, 4]);
        assert_eq!(cap.q[0], vec![10., 11., 12., 13., 40., 41., 42., 43.]);
    }
}
