//! One CUDA device: its context and stream, what it is (name, compute capability, SMs), and
//! the kernels loaded on it (compiled by NVRTC for its architecture, cached on disk).

use super::nvrtc::{compile_cached, Compiled, KernelSource};
use super::{DriverResult, GpuError};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Whether libcuda can be loaded. `CudaContext::new` panics without it, so every entry point
/// checks this first.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen libcuda; no driver function is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

type ModuleKey = (&'static str, Vec<(String, String)>);

pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: usize,
    pub total_memory: usize,
    modules: Mutex<HashMap<ModuleKey, (Arc<CudaModule>, Compiled)>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuContext({} #{}, sm_{}{})",
            self.name, self.ordinal, self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl GpuContext {
    /// Open device `ordinal`; a clear error (never a panic) without a driver or device.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        if !driver_available() {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().during("counting CUDA devices")?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).during("creating the CUDA context")?;
        // Launch parameters carry raw device pointers inside structs, which cudarc's per-slice
        // event tracking cannot see; ordering is explicit (one stream, fork/join by events).
        // SAFETY: no work has been queued yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().during("creating a stream")?;
        let name = ctx.name().during("reading the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .during("reading the multiprocessor count")? as usize;
        let total_memory = ctx.total_mem().during("reading the memory size")?;
        Ok(GpuContext {
            ctx,
            stream,
            ordinal,
            name,
            compute_capability,
            multiprocessors,
            total_memory,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// NVRTC's architecture name for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all work is queued on (launchers may fork from it and join back).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `src` compiled with `defines` for this device and loaded (once per context).
    pub fn module(
        &self,
        src: &KernelSource,
        defines: &[(&str, &str)],
    ) -> Result<Arc<CudaModule>, GpuError> {
        let key: ModuleKey = (
            src.name,
            defines
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| GpuError::Shape("module table poisoned by a panic".into()))?;
        if let Some((m, _)) = modules.get(&key) {
            return Ok(m.clone());
        }
        let compiled = compile_cached(src, &self.arch(), defines, None)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin.clone()))
            .during(&format!("loading the {} module", src.name))?;
        modules.insert(key, (module.clone(), compiled));
        Ok(module)
    }

    /// NVRTC log (ptxas resource report) of a loaded module.
    pub fn module_log(&self, src: &KernelSource, defines: &[(&str, &str)]) -> Option<String> {
        let key: ModuleKey = (
            src.name,
            defines
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let modules = self.modules.lock().ok()?;
        modules.get(&key).map(|(_, c)| c.log.clone())
    }

    pub fn function(
        &self,
        src: &KernelSource,
        defines: &[(&str, &str)],
        name: &str,
    ) -> Result<CudaFunction, GpuError> {
        self.module(src, defines)?
            .load_function(name)
            .during(&format!("finding kernel {name} in {}", src.name))
    }

    /// Copy `data` to a new device buffer (at least one element, so empty tables still have
    /// a valid pointer).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits + Clone>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, GpuError> {
        if data.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(data).during("copying to the device")
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.stream.alloc_zeros(len.max(1)).during(&format!(
            "allocating {} bytes",
            len * std::mem::size_of::<T>()
        ))
    }

    /// Uninitialised device memory; `None` when it does not fit (other errors are errors).
    pub fn try_alloc_bytes(&self, bytes: usize) -> Result<Option<CudaSlice<u8>>, GpuError> {
        // SAFETY: the caller fills the buffer before reading it.
        match unsafe { self.stream.alloc::<u8>(bytes.max(1)) } {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Ok(None),
            Err(e) => Err(GpuError::Driver {
                what: format!("allocating {bytes} bytes"),
                source: e,
            }),
        }
    }

    pub fn download<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
        self.stream
            .clone_dtoh(src)
            .during("copying from the device")
    }

    /// The first `n` values of `src` (all of them when it is shorter).
    pub fn download_prefix<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>, GpuError> {
        let view = src.slice(0..n.min(src.len()));
        self.stream
            .clone_dtoh(&view)
            .during("copying from the device")
    }

    /// `n` elements of `src` from `offset` (waits for the stream).
    pub fn download_range<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        offset: usize,
        n: usize,
    ) -> Result<Vec<T>, GpuError> {
        if offset + n > src.len() {
            return Err(GpuError::Shape(format!(
                "elements {offset}..{} of a buffer of {}",
                offset + n,
                src.len()
            )));
        }
        let view = src.slice(offset..offset + n);
        self.stream
            .clone_dtoh(&view)
            .during("copying from the device")
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().during("waiting for the stream")
    }
}
