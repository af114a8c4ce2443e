//! The serving runtime: a scheduler thread that owns a compute backend and generates for
//! many sequences at once, each with its own (mixed-precision) KV cache.
//!
//! `backend` is the seam the GPU backend (`gpu::serve_backend`) plugs into; `cpu` is the
//! reference backend (its
//! `cpu_batch` forward runs every sequence of a step in one pass);
//! `scheduler` batches, admits by KV bytes and reuses kept prefixes; `engine` is the handle
//! the HTTP server (or a library user) submits requests through.

pub mod backend;
pub mod cpu;
pub mod cpu_batch;
pub mod engine;
pub mod metrics;
pub mod prefix;
pub mod prompt;
mod scheduler;
pub mod stop;

pub use backend::{Backend, BackendError, KvUsage, PoolOccupancy, Work};
pub use cpu::{CpuBackend, CpuKv};
pub use engine::{Engine, EngineConfig, EngineError, Event, FinishReason, GenerationRequest};
pub use prompt::{Prompt, Prompter};
