//! The CUDA backend (cudarc, loaded at run time): device discovery, NVRTC kernels, launchers.
//! Without a driver every entry point returns `GpuError::NoDriver`; nothing panics.

pub mod attention_bench;
pub mod context;
pub mod decode_attention;
pub mod decode_step;
pub mod forward;
pub mod gemm;
pub mod layer_ops;
pub mod membench;
pub mod nvrtc;
pub mod prefill_attention;
pub mod quantize_append;
pub mod sampling;
pub mod serve_backend;
pub mod serve_bench;
pub mod token_moves;

pub use context::{driver_available, GpuContext};
pub use decode_attention::{DecodeAttention, DecodePlan, DeviceCache, HostCache, PagedLayout};
pub use forward::GpuForward;
pub use layer_ops::{Bf16, LayerOps};
pub use nvrtc::{
    KernelSource, DECODE_ATTENTION, LAYER_OPS, MEMBENCH, PREFILL_ATTENTION, QUANTIZE_APPEND,
};
pub use prefill_attention::PrefillAttention;
pub use quantize_append::{QuantizeAppend, QuantizeJob};
pub use sampling::GpuSampler;
pub use serve_backend::{GpuBackend, GpuDevice, GpuSeq, PoolSpec};

use cudarc::driver::DriverError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error(
        "no CUDA driver: libcuda could not be loaded, so the GPU backend is unavailable \
         (the CPU path does not need it)"
    )]
    NoDriver,
    #[error("CUDA device {ordinal} does not exist: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("no NVRTC: libnvrtc could not be loaded, so GPU kernels cannot be compiled")]
    NoNvrtc,
    #[error("CUDA driver call failed while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("NVRTC could not compile {name} for {arch}: {log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("kernel cache {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cuBLAS: libcublas could not be loaded, so the GPU matrix products are unavailable"
    )]
    NoCublas,
    #[error("cuBLAS call failed while {what}: {source}")]
    Cublas {
        what: String,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// A cache description, plan or input the kernels cannot take.
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
}

/// Attach what was being done to a driver error.
pub(crate) trait DriverResult<T> {
    fn during(self, what: &str) -> Result<T, GpuError>;
}

impl<T> DriverResult<T> for Result<T, DriverError> {
    fn during(self, what: &str) -> Result<T, GpuError> {
        self.map_err(|source| GpuError::Driver {
            what: what.to_string(),
            source,
        })
    }
}
