//! Run-time compilation of the embedded `kernels/*.cu` with NVRTC into a cubin for one GPU
//! architecture, cached on disk under `triaxkv_home()/kernels/` (key: source, options, NVRTC
//! version). Needs libnvrtc only, no driver: a cubin can be built on a machine without a GPU.

use super::GpuError;
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// A kernel file compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    /// Extra NVRTC options of this file.
    pub options: &'static [&'static str],
}

pub const DECODE_ATTENTION: KernelSource = KernelSource {
    name: "decode_attention.cu",
    source: include_str!("../../kernels/decode_attention.cu"),
    options: &[],
};

pub const MEMBENCH: KernelSource = KernelSource {
    name: "membench.cu",
    source: include_str!("../../kernels/membench.cu"),
    options: &[],
};

pub const LAYER_OPS: KernelSource = KernelSource {
    name: "layer_ops.cu",
    source: include_str!("../../kernels/layer_ops.cu"),
    options: &[],
};

pub const PREFILL_ATTENTION: KernelSource = KernelSource {
    name: "prefill_attention.cu",
    source: include_str!("../../kernels/prefill_attention.cu"),
    options: &[],
};

/// No multiply-add contraction: its arithmetic must round exactly as the CPU quantizer's.
pub const QUANTIZE_APPEND: KernelSource = KernelSource {
    name: "quantize_append.cu",
    source: include_str!("../../kernels/quantize_append.cu"),
    options: &["--fmad=false"],
};

/// A compiled module: the cubin and NVRTC's log (which holds ptxas' resource report).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    /// The cached file, when the cache could be used.
    pub path: Option<PathBuf>,
    pub from_cache: bool,
}

pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen libnvrtc; no NVRTC function is called.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::Compile {
            name: "nvrtcVersion".into(),
            arch: String::new(),
            log: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// The folder holding `cuda_fp16.h`: `$TRIAXKV_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include` or `/usr/local/cuda/include`, the first that has it.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("TRIAXKV_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_fp16.h").is_file())
}

/// NVRTC options for `arch` (e.g. `sm_90`) with `-D` defines.
fn options(
    src: &KernelSource,
    arch: &str,
    defines: &[(&str, &str)],
    include: Option<&Path>,
) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    o.extend(src.options.iter().map(|s| s.to_string()));
    if let Some(dir) = include {
        o.push(format!("--include-path={}", dir.display()));
    }
    for (k, v) in defines {
        o.push(format!("-D{k}={v}"));
    }
    o
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile `src` for `arch` to a cubin, bypassing the cache.
pub fn compile_uncached(
    src: &KernelSource,
    arch: &str,
    defines: &[(&str, &str)],
) -> Result<(Vec<u8>, String), GpuError> {
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let fail = |log: String| GpuError::Compile {
        name: src.name.to_string(),
        arch: arch.to_string(),
        log,
    };
    let code = CString::new(src.source).map_err(|_| fail("source holds a NUL byte".into()))?;
    let name = CString::new(src.name).map_err(|_| fail("name holds a NUL byte".into()))?;
    let include = cuda_include_dir();
    let opts = options(src, arch, defines, include.as_deref());
    let prog =
        nvrtc_result::create_program(&code, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    // SAFETY: `prog` is live until destroy_program below; `code`/`name` outlive it.
    let outcome = unsafe { compile_program(prog, &opts) };
    // SAFETY: created above and destroyed once.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    let (cubin, log) = outcome.map_err(|log| {
        let hint = if include.is_none() {
            "\n(no CUDA include folder with cuda_fp16.h found: set TRIAXKV_CUDA_INCLUDE)"
        } else {
            ""
        };
        fail(format!("{log}{hint}"))
    })?;
    Ok((cubin, log))
}

/// Compile a created program; on failure the error is NVRTC's log.
unsafe fn compile_program(
    prog: nvrtc_sys::nvrtcProgram,
    opts: &[String],
) -> Result<(Vec<u8>, String), String> {
    let compiled = nvrtc_result::compile_program(prog, opts);
    let log = nvrtc_result::get_program_log(prog)
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(format!("{e:?} with options {opts:?}\n{log}"));
    }
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize: {e:?} (is the architecture a real sm_XX?)"))?;
    let mut cubin = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
    Ok((cubin, log))
}

/// Where the cubin of `src` with these options goes.
fn cache_path(
    dir: &Path,
    src: &KernelSource,
    arch: &str,
    defines: &[(&str, &str)],
    version: (i32, i32),
) -> PathBuf {
    let mut h = Sha256::new();
    h.update(src.source.as_bytes());
    for o in options(src, arch, defines, cuda_include_dir().as_deref()) {
        h.update(o.as_bytes());
        h.update([0u8]);
    }
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let stem = src.name.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{hex}.cubin"))
}

/// The cubin of `src` for `arch`, from `cache_dir` (default `triaxkv_home()/kernels`) or
/// compiled and stored there. A cache that cannot be written is not an error: the module is
/// still returned, with `path: None`.
pub fn compile_cached(
    src: &KernelSource,
    arch: &str,
    defines: &[(&str, &str)],
    cache_dir: Option<&Path>,
) -> Result<Compiled, GpuError> {
    let version = nvrtc_version()?;
    let dir = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::util::triaxkv_home().join("kernels"));
    let path = cache_path(&dir, src, arch, defines, version);
    if let Ok(cubin) = std::fs::read(&path) {
        // A truncated or foreign file fails to load later; an ELF header is the cheap check.
        if cubin.starts_with(b"\x7fELF") {
            let log = std::fs::read_to_string(path.with_extension("log")).unwrap_or_default();
            return Ok(Compiled {
                cubin,
                log,
                path: Some(path),
                from_cache: true,
            });
        }
    }
    let (cubin, log) = compile_uncached(src, arch, defines)?;
    let stored = crate::util::write_atomic(&path, |w| w.write_all(&cubin)).and_then(|_| {
        crate::util::write_atomic(&path.with_extension("log"), |w| w.write_all(log.as_bytes()))
    });
    Ok(Compiled {
        cubin,
        log,
        path: stored.is_ok().then_some(path),
        from_cache: false,
    })
}

/// `(kernel, registers, spill stores bytes)` from ptxas' `-v` report in an NVRTC log.
pub fn ptxas_registers(log: &str) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    let mut spill = 0u32;
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            current = rest.split('\'').next().map(str::to_string);
            spill = 0;
        } else if line.contains("bytes spill stores") {
            // "0 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads"
            spill = line
                .split(',')
                .find(|part| part.contains("spill stores"))
                .and_then(|part| part.split_whitespace().next())
                .and_then(|w| w.parse().ok())
                .unwrap_or(0);
        } else if let (Some(name), Some(at)) = (current.as_ref(), line.find("Used ")) {
            let regs = line[at + 5..]
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(0);
            out.push((name.clone(), regs, spill));
            current = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : Compiling entry function 'tkv_decode_int2_vg64' for 'sm_90'\n\
                   ptxas info    : Function properties for tkv_decode_int2_vg64\n\
                   \x20   0 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 111 registers, used 1 barriers, 34304 bytes smem\n";
        assert_eq!(
            ptxas_registers(log),
            vec![("tkv_decode_int2_vg64".to_string(), 111, 12)]
        );
    }

    #[test]
    fn cache_key_depends_on_arch_and_defines() {
        let d = Path::new("/x");
        let a = cache_path(d, &MEMBENCH, "sm_90", &[], (13, 0));
        let b = cache_path(d, &MEMBENCH, "sm_80", &[], (13, 0));
        let c = cache_path(d, &MEMBENCH, "sm_90", &[("TKV_STAGES", "4")], (13, 0));
        let e = cache_path(d, &MEMBENCH, "sm_90", &[], (13, 2));
        assert!(a != b && a != c && a != e);
        assert_eq!(a, cache_path(d, &MEMBENCH, "sm_90", &[], (13, 0)));
        assert!(a.to_string_lossy().contains("membench-sm_90-"));
    }
}
