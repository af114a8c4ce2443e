//! The paged mixed-precision KV cache of the GPU runtime, host side: the block pool and each
//! sequence's block tables (`pool`), and the serving workload replayed from agent traces
//! (`workload`).

pub mod pool;
pub mod workload;

pub use pool::{ClassMap, ClassTokens, Ops, PoolError, SeqBlocks, SlotPool};
