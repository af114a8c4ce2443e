//! triaxkv: tag every KV-cache token by recency, modality and semantic role, measure how
//! sensitive the model is to quantizing each tag, and store each tag at its own precision.

pub mod allocate;
pub mod calibrate;
pub mod eval;
pub mod gpu;
pub mod kvcache;
pub mod linalg;
pub mod model;
pub mod paged;
pub mod profile;
pub mod quant;
pub mod raster;
pub mod runtime;
pub mod serve;
pub mod tags;
pub mod trace;
pub mod util;
