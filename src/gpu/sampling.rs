//! Next-token choice on the device: greedy argmax and nucleus (top-p) sampling over f32 logits
//! (`kernels/decode_step.cu`), the CPU `Sampler`'s rule (src/model/sampling.rs) with the
//! caller's uniform coins, so a seeded run draws its coins on the host as the CPU path does.

use super::context::GpuContext;
use super::decode_step::DECODE_STEP;
use super::{DriverResult, GpuError};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

pub struct GpuSampler {
    f_argmax: CudaFunction,
    f_top_p: CudaFunction,
}

impl GpuSampler {
    pub fn load(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(GpuSampler {
            f_argmax: gpu.function(&DECODE_STEP, &[], "tkv_argmax_f32")?,
            f_top_p: gpu.function(&DECODE_STEP, &[], "tkv_sample_top_p_f32")?,
        })
    }

    fn check_rows(
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        ids: &CudaSlice<i32>,
    ) -> Result<(), GpuError> {
        if rows == 0 || rows > 65535 || vocab == 0 || vocab > i32::MAX as usize {
            return Err(GpuError::Shape(format!(
                "sampling {rows} rows of {vocab} logits: rows 1 to 65535, vocab 1 to 2^31 - 1"
            )));
        }
        if logits.len() < rows * vocab || ids.len() < rows {
            return Err(GpuError::Shape(format!(
                "sampling {rows} x {vocab}: logits {}, ids {} elements",
                logits.len(),
                ids.len()
            )));
        }
        Ok(())
    }

    fn row_launch(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `ids[r]` = argmax of row `r` of `logits` (`rows × vocab`; ties to the lower index).
    pub fn argmax(
        &self,
        gpu: &GpuContext,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        ids: &mut CudaSlice<i32>,
    ) -> Result<(), GpuError> {
        Self::check_rows(logits, rows, vocab, ids)?;
        let vocab32 = vocab as i32;
        let mut lb = gpu.stream().launch_builder(&self.f_argmax);
        lb.arg(logits).arg(&vocab32).arg(ids);
        // SAFETY: logits `rows × vocab`, ids `rows` (checked above).
        unsafe { lb.launch(Self::row_launch(rows)) }.during("launching tkv_argmax_f32")?;
        Ok(())
    }

    /// `ids[r]` for each of `rows` rows of `logits` (`rows × vocab`): the argmax when
    /// `temperature <= 0`, else a draw from the top-`top_p` nucleus of softmax(logits / T)
    /// with `coins[r]` uniform in [0, 1).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        gpu: &GpuContext,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
        top_p: f32,
        coins: &CudaSlice<f32>,
        ids: &mut CudaSlice<i32>,
    ) -> Result<(), GpuError> {
        if top_p.is_nan() || top_p <= 0.0 || !temperature.is_finite() {
            return Err(GpuError::Shape(format!(
                "top_p {top_p} must be > 0 and temperature {temperature} finite"
            )));
        }
        if temperature <= 0.0 {
            return self.argmax(gpu, logits, rows, vocab, ids);
        }
        Self::check_rows(logits, rows, vocab, ids)?;
        if coins.len() < rows {
            return Err(GpuError::Shape(format!(
                "sampling {rows} rows: {} coins",
                coins.len()
            )));
        }
        let (vocab32, inv_t) = (vocab as i32, 1.0 / temperature);
        let mut lb = gpu.stream().launch_builder(&self.f_top_p);
        lb.arg(logits)
            .arg(&vocab32)
            .arg(&inv_t)
            .arg(&top_p)
            .arg(coins)
            .arg(ids);
        // SAFETY: logits `rows × vocab`, coins and ids `rows` (checked above).
        unsafe { lb.launch(Self::row_launch(rows)) }.during("launching tkv_sample_top_p_f32")?;
        Ok(())
    }
}
