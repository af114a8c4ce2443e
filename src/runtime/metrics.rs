//! Counters and gauges of the engine, shared between the scheduler thread (which updates
//! them) and the HTTP server (which renders them as Prometheus text).

use super::backend::{KvUsage, PoolOccupancy};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Generation rate is measured over this trailing window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the scheduler holds right now (published after every step that changes it).
#[derive(Debug, Clone, Default)]
pub struct KvSnapshot {
    pub live_sequences: usize,
    pub prefill_sequences: usize,
    pub live: KvUsage,
    pub prefix_entries: usize,
    pub prefix: KvUsage,
    /// Token-layers per precision class over live and kept caches.
    pub classes: BTreeMap<String, usize>,
    /// The backend's block pool, when it has one.
    pub pool: Option<PoolOccupancy>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub rejected_too_large: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_misses: AtomicU64,
    pub prefix_reused_tokens: AtomicU64,
    pub prefix_evictions: AtomicU64,
    pub preemptions: AtomicU64,
    /// Requests submitted and not yet admitted.
    pub queue_depth: AtomicU64,
    pub kv_limit_bytes: AtomicU64,
    pub snapshot: Mutex<KvSnapshot>,
    /// (when, tokens generated) per scheduler step, over the rate window.
    recent: Mutex<VecDeque<(Instant, u64)>>,
    /// HTTP responses by status code.
    pub http: Mutex<BTreeMap<u16, u64>>,
}

pub fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Metrics {
    pub fn record_generated(&self, n: u64) {
        inc(&self.generated_tokens, n);
        let now = Instant::now();
        if let Ok(mut r) = self.recent.lock() {
            r.push_back((now, n));
            while r
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                r.pop_front();
            }
        }
    }

    /// Tokens generated per second over the last [`RATE_WINDOW`].
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let Ok(r) = self.recent.lock() else {
            return 0.0;
        };
        let n: u64 = r
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    pub fn record_http(&self, status: u16) {
        if let Ok(mut h) = self.http.lock() {
            *h.entry(status).or_insert(0) += 1;
        }
    }

    pub fn snapshot(&self) -> KvSnapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, backend: &str, model: &str) -> String {
        let mut o = String::new();
        let s = self.snapshot();
        let mut line = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(o, "# HELP triaxkv_{name} {help}");
            let _ = writeln!(o, "# TYPE triaxkv_{name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(o, "triaxkv_{name} {v}");
                } else {
                    let _ = writeln!(o, "triaxkv_{name}{{{labels}}} {v}");
                }
            }
        };
        let info = format!("backend=\"{}\",model=\"{}\"", esc(backend), esc(model));
        line(
            "info",
            "gauge",
            "Backend and model served.",
            &[(&info, 1.0)],
        );
        let c = |a: &AtomicU64| get(a) as f64;
        line(
            "requests_total",
            "counter",
            "Generation requests submitted.",
            &[("", c(&self.requests))],
        );
        line(
            "requests_rejected_total",
            "counter",
            "Requests refused before admission.",
            &[
                ("reason=\"queue_full\"", c(&self.rejected_queue_full)),
                ("reason=\"too_large\"", c(&self.rejected_too_large)),
            ],
        );
        line(
            "requests_finished_total",
            "counter",
            "Requests finished, by outcome.",
            &[
                ("reason=\"stop\"", c(&self.finished_stop)),
                ("reason=\"length\"", c(&self.finished_length)),
                ("reason=\"cancelled\"", c(&self.cancelled)),
                ("reason=\"error\"", c(&self.failed)),
            ],
        );
        line(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            &[("", c(&self.prompt_tokens))],
        );
        line(
            "prefill_tokens_total",
            "counter",
            "Prompt tokens computed (not reused).",
            &[("", c(&self.prefill_tokens))],
        );
        line(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            &[("", c(&self.generated_tokens))],
        );
        line(
            "generation_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last 10 s.",
            &[("", self.tokens_per_second())],
        );
        line(
            "prefix_cache_lookups_total",
            "counter",
            "Admissions that reused a kept prefix (hit) or not (miss).",
            &[
                ("result=\"hit\"", c(&self.prefix_hits)),
                ("result=\"miss\"", c(&self.prefix_misses)),
            ],
        );
        line(
            "prefix_cache_reused_tokens_total",
            "counter",
            "Prompt tokens taken from kept prefixes.",
            &[("", c(&self.prefix_reused_tokens))],
        );
        line(
            "prefix_cache_evictions_total",
            "counter",
            "Kept prefixes dropped to free memory or entries.",
            &[("", c(&self.prefix_evictions))],
        );
        line(
            "prefix_cache_entries",
            "gauge",
            "Kept prefixes.",
            &[("", s.prefix_entries as f64)],
        );
        line(
            "preemptions_total",
            "counter",
            "Sequences whose cache was dropped for memory (recomputed later).",
            &[("", c(&self.preemptions))],
        );
        line(
            "queue_depth",
            "gauge",
            "Requests waiting for admission.",
            &[("", c(&self.queue_depth))],
        );
        line(
            "live_sequences",
            "gauge",
            "Sequences holding a KV cache and generating.",
            &[("", s.live_sequences as f64)],
        );
        line(
            "prefill_sequences",
            "gauge",
            "Live sequences still reading their prompt.",
            &[("", s.prefill_sequences as f64)],
        );
        line(
            "kv_memory_limit_bytes",
            "gauge",
            "KV memory limit (--kv-memory).",
            &[("", c(&self.kv_limit_bytes))],
        );
        let mut total = s.live;
        total.add(&s.prefix);
        line(
            "kv_bytes",
            "gauge",
            "KV bytes held, by owner.",
            &[
                ("owner=\"live\"", s.live.total() as f64),
                ("owner=\"prefix_cache\"", s.prefix.total() as f64),
            ],
        );
        line(
            "kv_bytes_by_kind",
            "gauge",
            "KV bytes held (live and kept), by what they store.",
            &[
                ("kind=\"packed\"", total.packed as f64),
                ("kind=\"params\"", total.params as f64),
                ("kind=\"f16\"", total.half as f64),
                ("kind=\"f32\"", total.full as f64),
            ],
        );
        line(
            "kv_fragmentation",
            "gauge",
            "Share of the KV bytes held (live and kept) in block space no token fills.",
            &[("", total.fragmentation())],
        );
        if let Some(p) = s.pool {
            line(
                "kv_pool_slots",
                "gauge",
                "Slots of the block pool, by state.",
                &[
                    ("state=\"used\"", p.slots.saturating_sub(p.free) as f64),
                    ("state=\"free\"", p.free as f64),
                ],
            );
            line(
                "kv_pool_occupancy",
                "gauge",
                "Share of the block pool's slots in use.",
                &[(
                    "",
                    if p.slots == 0 {
                        0.0
                    } else {
                        (p.slots - p.free.min(p.slots)) as f64 / p.slots as f64
                    },
                )],
            );
            line(
                "kv_pool_slot_bytes",
                "gauge",
                "Bytes of one pool slot (a block in every layer).",
                &[("", p.slot_bytes as f64)],
            );
        }
        line(
            "kv_effective_bits",
            "gauge",
            "Stored bits per K/V element, scales and 16-bit parts included.",
            &[("", total.effective_bits())],
        );
        let classes: Vec<(String, f64)> = s
            .classes
            .iter()
            .map(|(k, v)| (format!("class=\"{}\"", esc(k)), *v as f64))
            .collect();
        let refs: Vec<(&str, f64)> = classes.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        line(
            "kv_token_layers",
            "gauge",
            "Stored token-layers per precision class (k<bits>v<bits>).",
            &refs,
        );
        let http: Vec<(String, f64)> = self
            .http
            .lock()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (format!("code=\"{k}\""), *v as f64))
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<(&str, f64)> = http.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        line(
            "http_responses_total",
            "counter",
            "HTTP responses, by status code.",
            &refs,
        );
        o
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
