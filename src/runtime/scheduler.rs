//! The scheduler thread: continuous batching. Every step runs one batch through the
//! backend: a token for each decoding sequence plus prompt chunks (in admission order, up to
//! a row budget), so long prompts interleave with other sequences' decoding. Admission is by
//! KV bytes (kept prefixes are evicted first, least recently used); a sequence that outgrows
//! memory is preempted (its cache dropped, recomputed on re-admission). Finished caches are
//! kept for prefix reuse.

use super::backend::{Backend, BackendError, KvUsage, Work};
use super::engine::{Command, EngineConfig, EngineError, Event, FinishReason, Submission};
use super::metrics::{inc, KvSnapshot, Metrics};
use super::prefix::PrefixCache;
use super::prompt::Prompter;
use super::stop::StopMatcher;
use crate::model::llama::Media;
use crate::model::sampling::Sampler;
use crate::model::tokenizer::Tokenizer;
use crate::tags::TokenTag;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Generated tokens a new sequence must also have room for at admission.
const ADMISSION_HEADROOM_TOKENS: usize = 16;
/// Per-class token counts walk every token of every cache: refresh them at most this often
/// while busy (always when idle).
const CLASS_REFRESH: Duration = Duration::from_secs(1);

/// One request inside the scheduler.
struct Sequence<S> {
    seq: Option<S>,
    /// Every token that belongs in the cache: prompt, then generated tokens to feed.
    ids: Vec<u32>,
    tags: Vec<TokenTag>,
    /// Tokens of `ids` already in the cache.
    fed: usize,
    prompt_len: usize,
    gen_tag: TokenTag,
    /// A vision model's image inputs (such a sequence is never a kept prefix: image tokens
    /// share one id whatever the image).
    media: Option<Arc<Media>>,
    generated: Vec<u32>,
    max_tokens: usize,
    sampler: Sampler,
    stop: StopMatcher,
    events: UnboundedSender<Event>,
    started: bool,
    /// KV bytes to reserve at admission.
    need: usize,
    usage: KvUsage,
    admitted: u64,
}

enum Outcome {
    Running,
    /// The cache ran out of blocks while growing: back to the queue to recompute.
    Preempted,
    Finished(FinishReason),
    Failed(EngineError),
    Cancelled,
}

struct Worker<B: Backend> {
    backend: B,
    tokenizer: Arc<Tokenizer>,
    end_ids: Vec<u32>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Sequence<B::Seq>>,
    live: Vec<Sequence<B::Seq>>,
    prefix: PrefixCache<B::Seq>,
    admissions: u64,
    classes_at: Option<Instant>,
}

pub(crate) fn run<B: Backend>(
    backend: B,
    prompter: Prompter,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Command>,
) {
    let mut w = Worker {
        tokenizer: prompter.tokenizer().clone(),
        end_ids: prompter.end_ids(),
        prefix: PrefixCache::new(cfg.max_prefix_entries),
        backend,
        cfg,
        metrics,
        waiting: VecDeque::new(),
        live: Vec::new(),
        admissions: 0,
        classes_at: None,
    };
    let mut shutting_down = false;
    loop {
        if w.live.is_empty() && w.waiting.is_empty() {
            w.publish(true);
            if shutting_down {
                break;
            }
            match rx.recv() {
                Ok(cmd) => shutting_down |= w.command(cmd),
                Err(_) => break,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            shutting_down |= w.command(cmd);
        }
        w.drop_cancelled_waiting();
        w.admit();
        if !w.live.is_empty() {
            w.step();
            w.enforce_memory();
        }
        w.publish(false);
    }
}

impl<B: Backend> Worker<B> {
    /// Returns true on shutdown.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => true,
            Command::Submit(sub) => {
                let Submission { request, events } = *sub;
                let p = request.prompt;
                let mut s = Sequence {
                    seq: None,
                    prompt_len: p.ids.len(),
                    ids: p.ids,
                    tags: p.tags,
                    fed: 0,
                    gen_tag: p.gen_tag,
                    media: p.media,
                    generated: Vec::new(),
                    max_tokens: request.max_tokens,
                    sampler: Sampler::new(request.sampling),
                    stop: StopMatcher::new(request.stop),
                    events,
                    started: false,
                    need: 0,
                    usage: KvUsage::default(),
                    admitted: 0,
                };
                s.need = self.need(&s);
                self.waiting.push_back(s);
                false
            }
        }
    }

    /// Bytes to reserve for a sequence: its tokens plus a little room to generate.
    fn need(&self, s: &Sequence<B::Seq>) -> usize {
        let room = ADMISSION_HEADROOM_TOKENS.min(s.max_tokens.saturating_sub(s.generated.len()));
        let mut tags = s.tags.clone();
        tags.extend(std::iter::repeat_n(s.gen_tag, room));
        self.backend.estimate_bytes(&tags)
    }

    fn unqueue(&self) {
        self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
    }

    fn drop_cancelled_waiting(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        for _ in self.waiting.len()..before {
            self.unqueue();
            inc(&self.metrics.cancelled, 1);
        }
    }

    fn live_bytes(&self) -> usize {
        self.live.iter().map(|s| s.usage.total()).sum()
    }

    /// Admit waiting sequences in order while their bytes fit (first come, first served:
    /// a head that does not fit blocks the ones behind it, so it cannot starve).
    fn admit(&mut self) {
        let limit = self.cfg.kv_memory;
        while let Some(head) = self.waiting.front() {
            if self.live.len() >= self.cfg.max_live {
                break;
            }
            if head.need > limit {
                let need = head.need;
                if let Some(s) = self.waiting.pop_front() {
                    self.unqueue();
                    inc(&self.metrics.rejected_too_large, 1);
                    let _ = s
                        .events
                        .send(Event::Failed(EngineError::TooLarge { need, limit }));
                }
                continue;
            }
            // Take the best kept prefix out first so eviction cannot pick it.
            let hit = if head.media.is_some() {
                None // image tokens share one id: a matching prefix may hold another image
            } else {
                self.prefix
                    .best_match(&head.ids, &head.tags)
                    .map(|(i, common)| (self.prefix.take(i), common))
            };
            let need = head.need;
            let fits = |w: &Self| w.live_bytes() + w.prefix.bytes() + need <= limit;
            while !fits(self) {
                if self.prefix.pop_lru().is_none() {
                    break;
                }
                inc(&self.metrics.prefix_evictions, 1);
            }
            if !fits(self) {
                if let Some((e, _)) = hit {
                    self.prefix.insert(e.ids, e.tags, e.seq, e.usage);
                }
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            self.unqueue();
            let first = !s.started;
            let seq = match hit {
                Some((mut e, common)) => {
                    // Keep at least the last prompt token to compute: its logits start decoding.
                    let keep = common.min(s.ids.len() - 1);
                    self.backend.truncate(&mut e.seq, keep);
                    s.fed = self.backend.len(&e.seq).min(keep);
                    inc(&self.metrics.prefix_hits, 1);
                    inc(&self.metrics.prefix_reused_tokens, s.fed as u64);
                    Ok(e.seq)
                }
                None => {
                    s.fed = 0;
                    inc(&self.metrics.prefix_misses, 1);
                    self.backend.new_seq()
                }
            };
            let seq = match seq {
                Ok(seq) => seq,
                Err(e) => {
                    inc(&self.metrics.failed, 1);
                    let _ = s
                        .events
                        .send(Event::Failed(EngineError::Backend(e.to_string())));
                    continue;
                }
            };
            s.usage = self.backend.usage(&seq);
            s.seq = Some(seq);
            self.admissions += 1;
            s.admitted = self.admissions;
            if first {
                s.started = true;
                inc(&self.metrics.prompt_tokens, s.prompt_len as u64);
                let _ = s.events.send(Event::Started {
                    prompt_tokens: s.prompt_len,
                    cached_tokens: s.fed,
                });
            }
            self.live.push(s);
        }
    }

    /// One unit of work for every live sequence, then sampling and bookkeeping.
    fn step(&mut self) {
        let chunk = self.cfg.prefill_chunk.max(1);
        // Rows this step may run: every decoding sequence gets its token, then prompts get
        // chunks in admission order while the budget lasts (bounding a step's work and memory).
        let mut budget = self.cfg.step_tokens.max(chunk);
        let runnable =
            |s: &Sequence<B::Seq>| s.seq.is_some() && !s.events.is_closed() && s.fed < s.ids.len();
        let mut ends: Vec<Option<usize>> = vec![None; self.live.len()];
        for (i, s) in self.live.iter().enumerate() {
            if runnable(s) && s.ids.len() - s.fed == 1 {
                ends[i] = Some(s.ids.len());
                budget = budget.saturating_sub(1);
            }
        }
        let mut prompts: Vec<usize> = (0..self.live.len())
            .filter(|&i| runnable(&self.live[i]) && ends[i].is_none())
            .collect();
        prompts.sort_by_key(|&i| self.live[i].admitted);
        for i in prompts {
            let s = &self.live[i];
            let n = (s.ids.len() - s.fed).min(chunk).min(budget);
            if n == 0 {
                break;
            }
            ends[i] = Some(s.fed + n);
            budget -= n;
        }
        // (index in `live`, end of the tokens it feeds) of every sequence with work.
        let plan: Vec<(usize, usize)> = ends
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|e| (i, e)))
            .collect();
        let mut batch = Vec::with_capacity(plan.len());
        let mut next = plan.iter().peekable();
        for (i, s) in self.live.iter_mut().enumerate() {
            let Some(&&(j, end)) = next.peek() else { break };
            if i != j {
                continue;
            }
            next.next();
            let Sequence {
                seq,
                ids,
                tags,
                fed,
                media,
                ..
            } = s;
            if let Some(seq) = seq.as_mut() {
                batch.push(Work {
                    seq,
                    tokens: &ids[*fed..end],
                    tags: &tags[*fed..end],
                    logits: end == ids.len(),
                    media: media.as_deref(),
                });
            }
        }
        let results = self.backend.step(batch);
        let mut outcomes: Vec<Outcome> = (0..self.live.len()).map(|_| Outcome::Running).collect();
        let mut generated = 0u64;
        for (&(i, end), result) in plan.iter().zip(results) {
            let s = &mut self.live[i];
            let computed = (end - s.fed) as u64;
            if s.fed < s.prompt_len {
                inc(
                    &self.metrics.prefill_tokens,
                    computed.min((s.prompt_len - s.fed) as u64),
                );
            }
            s.fed = end;
            if let Some(seq) = &s.seq {
                s.usage = self.backend.usage(seq);
            }
            match result {
                Err(BackendError::OutOfBlocks) => outcomes[i] = Outcome::Preempted,
                Err(e) => outcomes[i] = Outcome::Failed(EngineError::Backend(e.to_string())),
                Ok(logits) if end == s.ids.len() => {
                    let next = s.sampler.sample(&logits);
                    if !self.end_ids.contains(&next) {
                        generated += 1;
                    }
                    outcomes[i] = sample_step(
                        s,
                        next,
                        &self.end_ids,
                        &self.tokenizer,
                        self.cfg.max_context,
                    );
                }
                Ok(_) => {}
            }
        }
        if generated > 0 {
            self.metrics.record_generated(generated);
        }
        for (s, o) in self.live.iter().zip(outcomes.iter_mut()) {
            if matches!(o, Outcome::Running) && s.events.is_closed() {
                *o = Outcome::Cancelled;
            }
        }
        // Retire in reverse so indices stay valid.
        for i in (0..self.live.len()).rev() {
            let outcome = std::mem::replace(&mut outcomes[i], Outcome::Running);
            match outcome {
                Outcome::Running => {}
                Outcome::Preempted => {
                    let s = self.live.swap_remove(i);
                    self.preempt(s);
                }
                Outcome::Cancelled => {
                    inc(&self.metrics.cancelled, 1);
                    drop(self.live.swap_remove(i));
                }
                Outcome::Failed(e) => {
                    inc(&self.metrics.failed, 1);
                    let s = self.live.swap_remove(i);
                    let _ = s.events.send(Event::Failed(e));
                }
                Outcome::Finished(reason) => {
                    let s = self.live.swap_remove(i);
                    self.finish(s, reason);
                }
            }
        }
    }

    fn finish(&mut self, mut s: Sequence<B::Seq>, reason: FinishReason) {
        match reason {
            FinishReason::Stop => inc(&self.metrics.finished_stop, 1),
            FinishReason::Length => inc(&self.metrics.finished_length, 1),
        }
        let _ = s.events.send(Event::Done {
            reason,
            completion_tokens: s.generated.len(),
        });
        if let Some(seq) = s.seq.take().filter(|_| s.media.is_none()) {
            // The cache holds exactly the first `fed` tokens.
            s.ids.truncate(s.fed);
            s.tags.truncate(s.fed);
            let dropped = self.prefix.insert(s.ids, s.tags, seq, s.usage);
            drop(dropped);
        }
    }

    /// Drop `s`'s cache and queue it first, to recompute its tokens when admitted again.
    fn preempt(&mut self, mut s: Sequence<B::Seq>) {
        s.seq = None;
        s.fed = 0;
        s.usage = KvUsage::default();
        s.need = self.need(&s);
        inc(&self.metrics.preemptions, 1);
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(s);
    }

    /// Bring live plus kept bytes back under the limit: evict kept prefixes, then preempt
    /// the most recently admitted sequence; a lone sequence larger than memory ends.
    fn enforce_memory(&mut self) {
        let limit = self.cfg.kv_memory;
        while self.live_bytes() + self.prefix.bytes() > limit {
            if self.prefix.pop_lru().is_some() {
                inc(&self.metrics.prefix_evictions, 1);
                continue;
            }
            if self.live.len() > 1 {
                let Some(i) = (0..self.live.len()).max_by_key(|&i| self.live[i].admitted) else {
                    break;
                };
                let s = self.live.swap_remove(i);
                self.preempt(s);
                continue;
            }
            if let Some(mut s) = self.live.pop() {
                let text = self.tokenizer.decode(&s.generated).unwrap_or_default();
                let rest = s.stop.flush(&text);
                if !rest.is_empty() {
                    let _ = s.events.send(Event::Text(rest));
                }
                // Not kept: it alone exceeds the memory.
                s.seq = None;
                self.finish(s, FinishReason::Length);
            }
            break;
        }
    }

    fn publish(&mut self, idle: bool) {
        let mut snap = KvSnapshot {
            live_sequences: self.live.len(),
            prefill_sequences: self.live.iter().filter(|s| s.fed < s.prompt_len).count(),
            prefix_entries: self.prefix.len(),
            pool: self.backend.pool(),
            ..KvSnapshot::default()
        };
        for s in &self.live {
            snap.live.add(&s.usage);
        }
        for e in self.prefix.entries() {
            snap.prefix.add(&e.usage);
        }
        let refresh = idle || self.classes_at.is_none_or(|t| t.elapsed() >= CLASS_REFRESH);
        let Ok(mut shared) = self.metrics.snapshot.lock() else {
            return;
        };
        if refresh {
            let mut classes: BTreeMap<String, usize> = BTreeMap::new();
            let seqs = self
                .live
                .iter()
                .filter_map(|s| s.seq.as_ref())
                .chain(self.prefix.entries().map(|e| &e.seq));
            for seq in seqs {
                for (class, n) in self.backend.class_tokens(seq) {
                    *classes.entry(class).or_insert(0) += n;
                }
            }
            snap.classes = classes;
            self.classes_at = Some(Instant::now());
        } else {
            snap.classes = std::mem::take(&mut shared.classes);
        }
        *shared = snap;
    }
}

/// Take the sampled token `next`: end the turn, or record it, stream its text, check stop
/// strings and limits, and queue it to be fed next step.
fn sample_step<S>(
    s: &mut Sequence<S>,
    next: u32,
    end_ids: &[u32],
    tok: &Tokenizer,
    max_context: usize,
) -> Outcome {
    let text_of = |ids: &[u32]| {
        tok.decode(ids)
            .map_err(|e| EngineError::Backend(e.to_string()))
    };
    if end_ids.contains(&next) {
        let text = match text_of(&s.generated) {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(e),
        };
        let rest = s.stop.flush(&text);
        if !rest.is_empty() {
            let _ = s.events.send(Event::Text(rest));
        }
        return Outcome::Finished(FinishReason::Stop);
    }
    s.generated.push(next);
    let text = match text_of(&s.generated) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(e),
    };
    let (delta, stopped) = s.stop.advance(&text);
    if !delta.is_empty() {
        let _ = s.events.send(Event::Text(delta));
    }
    if stopped {
        return Outcome::Finished(FinishReason::Stop);
    }
    if s.generated.len() >= s.max_tokens || s.ids.len() + 1 > max_context {
        let rest = s.stop.flush(&text);
        if !rest.is_empty() {
            let _ = s.events.send(Event::Text(rest));
        }
        return Outcome::Finished(FinishReason::Length);
    }
    s.ids.push(next);
    s.tags.push(s.gen_tag);
    Outcome::Running
}
