//! Launchers of `kernels/layer_ops.cu`: RMSNorm, rotate-half RoPE, SwiGLU and the residual
//! add of the Llama/Qwen forward pass, on f32 or bf16 device tensors (f32 arithmetic).

use super::context::GpuContext;
use super::nvrtc::LAYER_OPS;
use super::{DriverResult, GpuError};
use cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

/// bf16 bits as stored on the device.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bf16(pub u16);

impl Bf16 {
    pub fn from_f32(x: f32) -> Self {
        Bf16(half::bf16::from_f32(x).to_bits())
    }
    pub fn to_f32(self) -> f32 {
        half::bf16::from_bits(self.0).to_f32()
    }
}

// SAFETY: a plain 16-bit value; all-zero bits are bf16 +0.
unsafe impl DeviceRepr for Bf16 {}
unsafe impl ValidAsZeroBits for Bf16 {}

/// Element types the kernels are compiled for.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy {
    const SUFFIX: &'static str;
}
impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Element for Bf16 {
    const SUFFIX: &'static str = "bf16";
}

pub struct LayerOps {
    gpu_fns: std::collections::HashMap<String, CudaFunction>,
}

fn check(what: &str, ok: bool, msg: impl FnOnce() -> String) -> Result<(), GpuError> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape(format!("{what}: {}", msg())))
    }
}

fn grid_for(gpu: &GpuContext, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, gpu.multiprocessors * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl LayerOps {
    pub fn load(gpu: &GpuContext) -> Result<Self, GpuError> {
        let mut gpu_fns = std::collections::HashMap::new();
        let mut names = vec!["tkv_rmsnorm_f32_bf16".to_string()];
        for op in ["rmsnorm", "rope", "swiglu", "add"] {
            for sfx in ["f32", "bf16"] {
                names.push(format!("tkv_{op}_{sfx}"));
            }
        }
        for name in names {
            let f = gpu.function(&LAYER_OPS, &[], &name)?;
            gpu_fns.insert(name, f);
        }
        Ok(LayerOps { gpu_fns })
    }

    fn f<T: Element>(&self, op: &str) -> Result<&CudaFunction, GpuError> {
        self.named(&format!("tkv_{op}_{}", T::SUFFIX))
    }

    fn named(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.gpu_fns
            .get(name)
            .ok_or_else(|| GpuError::Shape(format!("kernel {name} not loaded")))
    }

    /// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) * w` for each of `rows` rows of `w.len()`.
    /// `x` may be f32 with a bf16 weight and output (the f32 residual into a bf16 GEMM input).
    pub fn rmsnorm<X: Element, T: Element>(
        &self,
        gpu: &GpuContext,
        x: &CudaSlice<X>,
        w: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        rows: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let d = w.len();
        check(
            "rmsnorm",
            d > 0 && x.len() >= rows * d && out.len() >= rows * d,
            || {
                format!(
                    "{rows} rows of {d} from {} into {} values",
                    x.len(),
                    out.len()
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d32 = d as i32;
        let f = if X::SUFFIX == T::SUFFIX {
            self.f::<T>("rmsnorm")?
        } else {
            self.named(&format!("tkv_rmsnorm_{}_{}", X::SUFFIX, T::SUFFIX))?
        };
        let mut b = gpu.stream().launch_builder(f);
        b.arg(x).arg(w).arg(out).arg(&d32).arg(&eps);
        // SAFETY: rows × d values in x and out, d in w (checked above).
        unsafe { b.launch(cfg) }.during("launching rmsnorm")?;
        Ok(())
    }

    /// Rotate-half RoPE in place on `x` `[tokens][heads][head_dim]`; token `t` sits at
    /// `positions[t]`; `inv_freq` has `head_dim / 2` frequencies (`model::llama::inv_freq`).
    pub fn rope<T: Element>(
        &self,
        gpu: &GpuContext,
        x: &mut CudaSlice<T>,
        inv_freq: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), GpuError> {
        let tokens = positions.len();
        check(
            "rope",
            head_dim % 2 == 0
                && inv_freq.len() >= head_dim / 2
                && x.len() >= tokens * heads * head_dim,
            || {
                format!(
                    "{tokens} tokens × {heads} heads × {head_dim} in {} values",
                    x.len()
                )
            },
        )?;
        if tokens == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, hd) = (heads as i32, head_dim as i32);
        let mut b = gpu.stream().launch_builder(self.f::<T>("rope")?);
        b.arg(x).arg(inv_freq).arg(positions).arg(&h).arg(&hd);
        // SAFETY: sizes checked above; each thread rotates its own pair.
        unsafe { b.launch(cfg) }.during("launching rope")?;
        Ok(())
    }

    /// `out = silu(gate) * up` elementwise.
    pub fn swiglu<T: Element>(
        &self,
        gpu: &GpuContext,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = gate.len();
        check("swiglu", up.len() >= n && out.len() >= n, || {
            format!("gate {n}, up {}, out {}", up.len(), out.len())
        })?;
        let n64 = n as i64;
        let mut b = gpu.stream().launch_builder(self.f::<T>("swiglu")?);
        b.arg(gate).arg(up).arg(out).arg(&n64);
        // SAFETY: n values in each buffer (checked above).
        unsafe { b.launch(grid_for(gpu, n)) }.during("launching swiglu")?;
        Ok(())
    }

    /// `x += y` elementwise (the residual add).
    pub fn add<T: Element>(
        &self,
        gpu: &GpuContext,
        x: &mut CudaSlice<T>,
        y: &CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = x.len();
        check("add", y.len() >= n, || format!("x {n}, y {}", y.len()))?;
        let n64 = n as i64;
        let mut b = gpu.stream().launch_builder(self.f::<T>("add")?);
        b.arg(x).arg(y).arg(&n64);
        // SAFETY: n values in each buffer (checked above).
        unsafe { b.launch(grid_for(gpu, n)) }.during("launching add")?;
        Ok(())
    }
}
