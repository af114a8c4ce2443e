//! Teacher-forced replay of one rendered trajectory through a KV cache, scoring the positions
//! that predict an assistant-generated token, with greedy tool-call generation.
//!
//! Every scored position is the last token of its chunk. The quantized cache settles tokens
//! leaving its 16-bit window when a chunk is appended, before the chunk attends, so only a
//! chunk's last query sees exactly the window a live decode (and calibration) gives it; an
//! earlier query would see up to `chunk − 1` of its window's tokens quantized already
//! (measured on SmolLM2 at INT2: mean KL 0.53 with 512-token chunks against 0.36 exact).
//! Scoring every assistant position therefore costs one forward per token; a spread sample of
//! them keeps the rest of the replay in prefill-sized chunks. Chunks never cross a turn or
//! step boundary either (recency moves before a unit's first token, as in a live run), and
//! every cache replays the same chunks, so a 16-bit profile differs from the reference only
//! by its storage. A tool call is generated on a copy of the cache, so the replay goes on as
//! if the recorded message had been generated; truncating a quantized cache back would not
//! give that (a per-channel key block sealed with generated tokens in it stays sealed).

use super::toolcall::ParsedCall;
use crate::kvcache::quantized::CacheBytes;
use crate::kvcache::{FullCache, KvCache, QuantCache};
use crate::model::llama::{Logits, Media, Model};
use crate::model::sampling::argmax;
use crate::quant::QuantError;
use crate::tags::{Modality, Role, TokenTag};
use crate::trace::render::Rendered;
use crate::trace::schema::{MessageRole, Trajectory};
use std::ops::Range;
use std::time::Instant;

/// A recorded assistant message with tool calls, where greedy generation is compared.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallStep {
    /// Index of the message in the trajectory.
    pub message: usize,
    /// Its first body token: generation starts with the logits of `start - 1`.
    pub start: usize,
    pub recorded: Vec<ParsedCall>,
}

/// One trajectory, rendered and truncated, with what the replay scores.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    pub id: String,
    pub file: String,
    pub ids: Vec<u32>,
    pub tags: Vec<TokenTag>,
    /// Ascending scored positions `p`: the next token `ids[p + 1]` is in an assistant
    /// message's body (reasoning, tool call, answer and the template tokens up to its
    /// end-of-turn); all of them, or a sample spread evenly over them.
    pub positions: Vec<usize>,
    /// Assistant-predicting positions within the limit (the sample's population).
    pub assistant_positions: usize,
    pub tool_calls: Vec<ToolCallStep>,
    /// Tokens of the whole rendering, before truncation.
    pub rendered_tokens: usize,
    pub truncated: bool,
    /// A vision-language model's image inputs (over the whole rendering).
    pub media: Option<Media>,
}

/// Up to `max` of `0..n` spread evenly, the last always included.
fn spread(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    (0..max).map(|i| ((i + 1) * n) / max - 1).collect()
}

impl ReplayPlan {
    /// Image tokens among the first `fed` tokens.
    pub fn image_tokens(&self, fed: usize) -> usize {
        self.tags[..fed.min(self.tags.len())]
            .iter()
            .filter(|t| t.modality == Modality::Image)
            .count()
    }

    /// Keep the first `limit` tokens of `rendered` (of `traj`); score up to `max_positions`
    /// assistant-predicting positions (all when `None`) and up to `max_tool_calls` tool-call
    /// steps, each spread over the trajectory.
    pub fn new(
        file: &str,
        traj: &Trajectory,
        rendered: &Rendered,
        limit: usize,
        max_positions: Option<usize>,
        max_tool_calls: usize,
    ) -> ReplayPlan {
        let rendered_tokens = rendered.ids.len();
        let n = rendered_tokens.min(limit);
        let mut positions = Vec::new();
        let mut steps = Vec::new();
        for m in rendered
            .messages
            .iter()
            .filter(|m| m.role == MessageRole::Assistant)
        {
            let body = m.body.start.max(1)..m.body.end.min(n);
            if body.is_empty() {
                continue;
            }
            positions.extend(body.start - 1..body.end - 1);
            let calls = &traj.messages[m.index].tool_calls;
            if !calls.is_empty() && m.body.start >= 1 {
                steps.push(ToolCallStep {
                    message: m.index,
                    start: m.body.start,
                    recorded: calls.iter().map(ParsedCall::from).collect(),
                });
            }
        }
        positions.sort_unstable();
        positions.dedup();
        let assistant_positions = positions.len();
        if let Some(m) = max_positions {
            positions = spread(positions.len(), m)
                .into_iter()
                .map(|i| positions[i])
                .collect();
        }
        let tool_calls = spread(steps.len(), max_tool_calls)
            .into_iter()
            .map(|i| steps[i].clone())
            .collect();
        ReplayPlan {
            id: traj.id.clone(),
            file: file.to_string(),
            ids: rendered.ids[..n].to_vec(),
            tags: rendered.tags[..n].to_vec(),
            positions,
            assistant_positions,
            tool_calls,
            rendered_tokens,
            truncated: n < rendered_tokens,
            media: None,
        }
    }

    /// Tokens the replay feeds: up to the last scored position (later ones change nothing).
    pub fn replay_len(&self) -> usize {
        self.positions.last().map_or(0, |&p| p + 1)
    }

    /// The chunks fed, in order, at most `max` tokens each: every scored position ends its
    /// chunk, and none crosses a turn or step boundary or a tool-call start.
    pub fn chunks(&self, max: usize) -> Vec<Range<usize>> {
        let end = self.replay_len();
        let mut cuts = vec![0, end];
        for i in 1..end {
            let (a, b) = (self.tags[i - 1], self.tags[i]);
            if a.turn != b.turn || a.step != b.step {
                cuts.push(i);
            }
        }
        cuts.extend(self.positions.iter().map(|p| p + 1));
        cuts.extend(self.tool_calls.iter().map(|s| s.start));
        cuts.retain(|&c| c <= end);
        cuts.sort_unstable();
        cuts.dedup();
        let max = max.max(1);
        let mut out = Vec::new();
        for w in cuts.windows(2) {
            // Split from the end so the piece ending at the cut keeps its full length.
            let mut pieces = Vec::new();
            let mut e = w[1];
            while e > w[0] {
                let s = e.saturating_sub(max).max(w[0]);
                pieces.push(s..e);
                e = s;
            }
            out.extend(pieces.into_iter().rev());
        }
        out
    }
}

/// The cache a replay runs through: the f32 reference or a profile's quantized cache.
#[derive(Debug, Clone)]
pub enum EvalCache {
    Full(FullCache),
    Quant(Box<QuantCache>),
}

impl EvalCache {
    pub fn kv(&mut self) -> &mut dyn KvCache {
        match self {
            EvalCache::Full(c) => c,
            EvalCache::Quant(c) => c.as_mut(),
        }
    }

    /// Recency moves to (turn, step) before that unit's tokens are fed.
    pub fn set_now(&mut self, turn: u32, step: u32) {
        if let EvalCache::Quant(c) = self {
            c.set_now(turn, step);
        }
    }

    /// Bytes held (quantized caches only).
    pub fn bytes(&self) -> Option<CacheBytes> {
        match self {
            EvalCache::Full(_) => None,
            EvalCache::Quant(c) => Some(c.bytes()),
        }
    }

    /// FP8 roundings and clippings (quantized caches with FP8 waiting or sinks).
    pub fn fp8_clipping(&self) -> (usize, usize) {
        match self {
            EvalCache::Full(_) => (0, 0),
            EvalCache::Quant(c) => c.fp8_clipping(),
        }
    }

    pub fn quant_error(&self) -> Option<&QuantError> {
        match self {
            EvalCache::Full(_) => None,
            EvalCache::Quant(c) => c.error(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Largest chunk fed at once.
    pub chunk: usize,
    /// New tokens generated at most per tool-call step.
    pub gen_tokens: usize,
    /// Ids that end generation (the template's end-of-turn).
    pub eos: Vec<u32>,
}

/// A greedy generation at a tool-call step.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Index into `ReplayPlan::tool_calls`.
    pub step: usize,
    /// Generated ids, the end-of-turn token excluded.
    pub ids: Vec<u32>,
    /// Stopped at an end-of-turn token (else at the token cap).
    pub finished: bool,
}

/// Cache size as seen by the scored positions: bytes and elements summed over the scored
/// positions, each reading the cache right after its own token was appended.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BitsSample {
    pub weighted_bytes: f64,
    pub weighted_elements: f64,
    /// What the cache held once the replay ended.
    pub last: CacheBytes,
}

impl BitsSample {
    pub fn effective_bits(&self) -> f64 {
        if self.weighted_elements > 0.0 {
            8.0 * self.weighted_bytes / self.weighted_elements
        } else {
            f64::NAN
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplayResult {
    pub generations: Vec<Generated>,
    pub bits: Option<BitsSample>,
    /// Tokens fed (teacher-forced), generation excluded.
    pub fed: usize,
    pub replay_s: f64,
    pub generated_tokens: usize,
    pub generate_s: f64,
    /// The first quantization error the cache met (its tokens were kept at 16 bits).
    pub quant_error: Option<String>,
    /// FP8 roundings (waiting tokens, sinks, window) and those clipped at ±448.
    pub fp8_clipping: (usize, usize),
}

/// Replay `plan` through `cache`. `scored(i, logits)` receives the raw logits of
/// `plan.positions[i]`, in order; `progress(fed)` runs after each chunk.
pub fn replay(
    model: &Model,
    plan: &ReplayPlan,
    cache: &mut EvalCache,
    cfg: &ReplayConfig,
    scored_row: &mut dyn FnMut(usize, &[f32]),
    progress: &mut dyn FnMut(usize),
) -> ReplayResult {
    let t0 = Instant::now();
    let vocab = model.config.vocab_size;
    let chunks = plan.chunks(cfg.chunk);
    let end = plan.replay_len();
    let mut next_row = 0usize;
    // The last scored row and its position: a tool call starts from it.
    let mut last: Option<(usize, Vec<f32>)> = None;
    let mut generations = Vec::new();
    let (mut generate_s, mut generated_tokens) = (0.0, 0usize);
    let mut bits = cache.bytes().map(|_| BitsSample::default());

    let mut generate_at = |pos: usize,
                           cache: &EvalCache,
                           last: &Option<(usize, Vec<f32>)>,
                           generations: &mut Vec<Generated>| {
        for (step, s) in plan.tool_calls.iter().enumerate() {
            if s.start != pos {
                continue;
            }
            let Some((p, logits)) = last.as_ref().filter(|(p, _)| p + 1 == pos) else {
                continue;
            };
            debug_assert_eq!(*p + 1, pos);
            let tg = Instant::now();
            let g = generate(model, plan, cache, s.start, logits, cfg, step);
            generate_s += tg.elapsed().as_secs_f64();
            generated_tokens += g.ids.len();
            generations.push(g);
        }
    };

    for r in chunks {
        generate_at(r.start, cache, &last, &mut generations);
        let t = plan.tags[r.start];
        cache.set_now(t.turn, t.step);
        let scored = plan.positions.get(next_row) == Some(&(r.end - 1));
        let starts_call = plan.tool_calls.iter().any(|s| s.start == r.end);
        let want = if scored || starts_call {
            Logits::Last
        } else {
            Logits::None
        };
        let logits = match &plan.media {
            Some(m) => model.prefill_media(
                &plan.ids[r.clone()],
                &plan.tags[r.clone()],
                m,
                r.start,
                cache.kv(),
                want,
                r.len(),
                &mut |_| {},
            ),
            None => model.forward(
                &plan.ids[r.clone()],
                &plan.tags[r.clone()],
                cache.kv(),
                want,
            ),
        };
        if scored {
            scored_row(next_row, &logits);
            next_row += 1;
            if let (Some(b), Some(now)) = (bits.as_mut(), cache.bytes()) {
                b.weighted_bytes += now.total() as f64;
                b.weighted_elements += now.elements as f64;
            }
        }
        if !logits.is_empty() {
            debug_assert_eq!(logits.len(), vocab);
            last = Some((r.end - 1, logits));
        }
        progress(r.end);
    }
    generate_at(end, cache, &last, &mut generations);
    if let (Some(b), Some(now)) = (bits.as_mut(), cache.bytes()) {
        b.last = now;
    }
    ReplayResult {
        generations,
        bits,
        fed: end,
        replay_s: t0.elapsed().as_secs_f64() - generate_s,
        generated_tokens,
        generate_s,
        quant_error: cache.quant_error().map(|e| e.to_string()),
        fp8_clipping: cache.fp8_clipping(),
    }
}

/// Greedy generation from `logits` (those of `start - 1`) on a copy of `cache`.
fn generate(
    model: &Model,
    plan: &ReplayPlan,
    cache: &EvalCache,
    start: usize,
    logits: &[f32],
    cfg: &ReplayConfig,
    step: usize,
) -> Generated {
    let mut fork = cache.clone();
    let at = plan.tags[start.min(plan.tags.len() - 1)];
    // A live runtime tags what it generates as the assistant's message of this unit.
    let tag = TokenTag {
        role: Role::Assistant,
        modality: Modality::Text,
        turn: at.turn,
        step: at.step,
    };
    let mut ids = Vec::new();
    let mut next = argmax(logits);
    let mut finished = false;
    while ids.len() < cfg.gen_tokens {
        if cfg.eos.contains(&next) {
            finished = true;
            break;
        }
        ids.push(next);
        if ids.len() == cfg.gen_tokens {
            break;
        }
        let l = match &plan.media {
            // After images the positions are the multimodal ones: text continues from the
            // position the replaced token had.
            Some(m) => {
                let base = m.positions.get(start).map_or_else(
                    || m.positions.iter().flatten().max().map_or(0, |&p| p + 1),
                    |p| p[0],
                );
                let p = base + ids.len() as u32 - 1;
                let d = model.config.hidden_size;
                let e = &model.weights.embed.data[next as usize * d..(next as usize + 1) * d];
                model.forward_embedded(e.to_vec(), Some(&[[p; 3]]), &[tag], fork.kv(), Logits::Last)
            }
            None => model.forward(&[next], &[tag], fork.kv(), Logits::Last),
        };
        next = argmax(&l);
    }
    Generated {
        step,
        ids,
        finished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Modality, Role};

    fn tag(turn: u32, step: u32) -> TokenTag {
        TokenTag {
            role: Role::User,
            modality: Modality::Text,
            turn,
            step,
        }
    }

    fn plan(tags: Vec<TokenTag>, positions: Vec<usize>, starts: &[usize]) -> ReplayPlan {
        ReplayPlan {
            id: "t".into(),
            file: "f".into(),
            ids: vec![0; tags.len()],
            tags,
            assistant_positions: positions.len(),
            positions,
            tool_calls: starts
                .iter()
                .map(|&start| ToolCallStep {
                    message: 0,
                    start,
                    recorded: Vec::new(),
                })
                .collect(),
            rendered_tokens: 0,
            truncated: false,
            media: None,
        }
    }

    #[test]
    fn scored_positions_end_their_chunks_and_units_are_never_crossed() {
        // Turn 1 for 0..10, step moves at 6; turn 2 from 10.
        let tags: Vec<TokenTag> = (0..30)
            .map(|i| tag(1 + u32::from(i >= 10), u32::from(i >= 6)))
            .collect();
        let p = plan(tags, vec![7, 8, 9, 10, 11, 20, 21], &[8]);
        let chunks = p.chunks(4);
        assert_eq!(
            chunks,
            vec![
                0..2,
                2..6,
                6..8,
                8..9,
                9..10,
                10..11,
                11..12,
                12..13,
                13..17,
                17..21,
                21..22
            ]
        );
        for &q in &p.positions {
            assert!(
                chunks.iter().any(|r| r.end == q + 1),
                "{q} must end a chunk"
            );
        }
        for r in &chunks {
            assert!(r.clone().all(|i| p.tags[i] == p.tags[r.start]), "{r:?}");
        }
        assert_eq!(p.replay_len(), 22);
    }

    #[test]
    fn spread_keeps_the_last() {
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(10, 2), vec![4, 9]);
        assert!(spread(4, 0).is_empty());
    }
}
