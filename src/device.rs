//! Choosing where inference runs, and making sure the CUDA backend is really there.
//!
//! With the PyPI torch wheel, `libtorch_cuda.so` is dropped by the linker's `--as-needed`
//! (nothing references it directly), and CUDA is then silently never used (tch issues 907,
//! 980). Hard-linking it breaks the CPU route, which lacks cuSPARSE. So we `dlopen` it with
//! RTLD_GLOBAL before the first tch call and ignore failure: on the CPU route it is absent.
use std::ffi::CString;
use std::sync::OnceLock;

use tch::Device;

use crate::config::DeviceChoice;
use crate::error::{Error, Result};

static CUDA_BACKEND: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// Loads libtorch's CUDA backend if it is installed; idempotent. Returns the library path that
/// was loaded, or why none was (which is normal on the CPU route).
#[allow(unsafe_code)] // dlopen/dlerror: the reason this module exists (see the header).
pub fn load_cuda_backend() -> std::result::Result<String, String> {
    CUDA_BACKEND
        .get_or_init(|| {
            let baked = env!("ANOMALY_INSPECTOR_TORCH_LIB");
            let mut candidates = Vec::new();
            if !baked.is_empty() {
                candidates.push(format!("{baked}/libtorch_cuda.so"));
            }
            if let Ok(libtorch) = std::env::var("LIBTORCH") {
                candidates.push(format!("{libtorch}/lib/libtorch_cuda.so"));
            }
            candidates.push("libtorch_cuda.so".to_string());
            let mut why = Vec::new();
            for cand in candidates {
                let Ok(c) = CString::new(cand.clone()) else { continue };
                // SAFETY: dlopen with a valid C string; the handle is deliberately leaked so the
                // backend stays registered for the life of the process.
                let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !handle.is_null() {
                    return Ok(cand);
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                if !err.is_null() {
                    why.push(unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned());
                }
            }
            Err(why.join("; "))
        })
        .clone()
}

/// Resolves the user's choice into a tch device; `Cuda` without a usable GPU is an error
/// that says how to get the GPU route.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    let _ = load_cuda_backend();
    let cuda = tch::Cuda::is_available();
    if cuda && choice != DeviceChoice::Cpu {
        // A node sees frames of one size, so cuDNN's per-shape algorithm search pays off after
        // the first frame. (Not measured here: no GPU was lent to this project's sessions.)
        tch::Cuda::cudnn_set_benchmark(true);
    }
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        DeviceChoice::Cuda if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(Error::Config(format!(
            "device 'cuda' requested but no CUDA device is usable ({}); install the GPU route with \
             `scripts/setup.sh --gpu` on a machine with an NVIDIA GPU, or use device 'auto'/'cpu'",
            match load_cuda_backend() {
                Ok(_) => "libtorch_cuda loaded, but no GPU found".to_string(),
                Err(e) => format!("libtorch_cuda not loaded: {e}"),
            }
        ))),
    }
}

/// What a thread that runs inference holds for as long as it runs: gradients off (inference
/// never trains) on this thread.
///
/// Make one at the start of a long-lived inference thread, before its first torch op: the
/// thread's OpenMP pool is sized then (see [`InferenceThread::enter`]). Every OS thread that
/// runs torch ops builds its own pool, and a pool that hops between threads makes frames pay
/// for new pools (PLATFORM.md), so a node runs all inference on one such thread.
pub struct InferenceThread {
    _no_grad: tch::NoGradGuard,
}

impl InferenceThread {
    /// Sets up the calling thread for inference: `threads` CPU threads for libtorch (`None`:
    /// libtorch's default, one per core) and gradients off until the value is dropped.
    pub fn enter(threads: Option<usize>) -> Self {
        if let Some(n) = threads {
            // Before the first torch op of this thread, so that its OpenMP pool has this size.
            tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
        }
        Self { _no_grad: tch::no_grad_guard() }
    }
}

/// A one-line description of `device` for start-up logs.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i} ({} CUDA device(s) visible)", tch::Cuda::device_count()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_resolves_and_auto_matches_availability() {
        assert_eq!(resolve(DeviceChoice::Cpu).unwrap(), Device::Cpu);
        let auto = resolve(DeviceChoice::Auto).unwrap();
        assert_eq!(auto.is_cuda(), tch::Cuda::is_available());
    }

    #[test]
    fn cuda_without_gpu_is_a_clear_error() {
        if tch::Cuda::is_available() {
            assert!(resolve(DeviceChoice::Cuda).unwrap().is_cuda());
        } else {
            let err = resolve(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(err.contains("--gpu"), "{err}");
        }
    }
}
