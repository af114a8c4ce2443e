//! cuBLAS (loaded at run time) for the linear layers of the decode step: bf16 operands, f32
//! accumulation (`CUBLAS_COMPUTE_32F`), bf16 or f32 output, on the context's stream.

use super::context::GpuContext;
use super::layer_ops::Bf16;
use super::GpuError;
use cudarc::cublas::result as blas;
use cudarc::cublas::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use std::ffi::c_void;

/// Output element types of `Gemm::linear`.
pub trait GemmOut: DeviceRepr {
    const TYPE: sys::cudaDataType;
}
impl GemmOut for Bf16 {
    const TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// Whether libcublas can be loaded (cudarc panics on first use without it).
pub fn cublas_available() -> bool {
    // SAFETY: only tries to dlopen libcublas; no cuBLAS function is called.
    unsafe { sys::is_culib_present() }
}

/// A cuBLAS handle bound to `gpu.stream()`.
pub struct Gemm {
    handle: sys::cublasHandle_t,
}

// SAFETY: a cuBLAS handle belongs to a context, not to the thread that created it; it may be
// used from another thread when that context is current there (`linear` binds it) and no
// two threads use it at once (`linear` takes `&self` of a `Gemm` that is not `Sync`, so a
// step holding it is used from one thread at a time). This lets a serving engine's thread
// own the decode step.
unsafe impl Send for Gemm {}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gemm(cuBLAS handle)")
    }
}

/// Make `gpu`'s context current on this thread (cuBLAS calls run in the current context).
fn bind(gpu: &GpuContext) -> Result<(), GpuError> {
    gpu.context()
        .bind_to_thread()
        .map_err(|source| GpuError::Driver {
            what: "binding the context for cuBLAS".into(),
            source,
        })
}

fn during<T>(r: Result<T, blas::CublasError>, what: &str) -> Result<T, GpuError> {
    r.map_err(|source| GpuError::Cublas {
        what: what.to_string(),
        source,
    })
}

impl Gemm {
    pub fn new(gpu: &GpuContext) -> Result<Self, GpuError> {
        if !cublas_available() {
            return Err(GpuError::NoCublas);
        }
        bind(gpu)?;
        let handle = during(blas::create_handle(), "creating the cuBLAS handle")?;
        let g = Gemm { handle };
        // SAFETY: a live handle and the context's live stream.
        during(
            unsafe { blas::set_stream(g.handle, gpu.stream().cu_stream() as sys::cudaStream_t) },
            "setting the cuBLAS stream",
        )?;
        Ok(g)
    }

    /// `y[r][o] = Σ_i x[r][i] · w[o][i]` for `rows` rows: `x` `[rows][k]`, `w` `[n][k]` (the
    /// `[out][in]` of a PyTorch `Linear`), `y` `[rows][n]`, all row-major. bf16 operands, f32
    /// accumulation, `y` rounded to its type.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<O: GemmOut>(
        &self,
        gpu: &GpuContext,
        x: &CudaSlice<Bf16>,
        w: &CudaSlice<Bf16>,
        y: &mut CudaSlice<O>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        if rows == 0 || k == 0 || n == 0 {
            return Err(GpuError::Shape(format!(
                "linear of {rows} rows × {k} inputs × {n} outputs"
            )));
        }
        if x.len() < rows * k || w.len() < n * k || y.len() < rows * n {
            return Err(GpuError::Shape(format!(
                "linear {rows}×{k} · ({n}×{k})ᵀ: x has {}, w {}, y {} values",
                x.len(),
                w.len(),
                y.len()
            )));
        }
        if [rows, k, n].iter().any(|&v| v > i32::MAX as usize) {
            return Err(GpuError::Shape("linear dimension over 2^31".into()));
        }
        bind(gpu)?;
        let stream = gpu.stream();
        let (xp, _sx) = x.device_ptr(stream);
        let (wp, _sw) = w.device_ptr(stream);
        let (yp, _sy) = y.device_ptr_mut(stream);
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: yᵀ (n × rows) = wᵀ-as-stored (k × n, transposed: n × k) · xᵀ
        // (k × rows). w row-major [n][k] is column-major k × n with ld k; x likewise k × rows.
        // SAFETY: the pointers are live device buffers of the sizes checked above, ordered on
        // the handle's stream (the context's); alpha/beta are host f32 (compute type 32F).
        during(
            unsafe {
                blas::gemm_ex(
                    self.handle,
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    rows as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    wp as *const c_void,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    xp as *const c_void,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const c_void,
                    yp as *mut c_void,
                    O::TYPE,
                    n as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            },
            "running a bf16 GEMM",
        )
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once; an error here has
        // nowhere to go.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}
