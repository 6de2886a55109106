//! Choosing where inference runs, and making sure the CUDA backend is really there.
//!
//! With the PyPI torch wheel, `libtorch_cuda.so` is dropped by the linker's `--as-needed`
//! (nothing references it directly), and CUDA is then silently never used (tch issues 907,
//! 980). Hard-linking it breaks the CPU route, which lacks cuSPARSE. So we `dlopen` it with
//! RTLD_GLOBAL before the first tch call and ignore failure: on the CPU route it is absent.
use std::ffi::CString;
use std::sync::OnceLock;

use tch::Device;

use crate::config::{DeviceChoice, Precision};
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

/// Set by [`set_precision`]: float32 on the CPU whatever it can do.
static FLOAT32_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the number format of the models built from now on (call it at start-up, before any
/// model is loaded or fitted; a model keeps the format it was built with). Process-wide, like
/// PyTorch's `set_float32_matmul_precision`: every model of a process computes alike.
pub fn set_precision(precision: Precision) {
    FLOAT32_ONLY.store(precision == Precision::Float32, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU multiplies bfloat16 natively (AVX-512 BF16; every CPU with AMX has it too).
/// Elsewhere libtorch emulates it, slower than float32.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether a model built now on `device` computes in bfloat16: on the CPU, where it is native and
/// [`set_precision`] did not ask for float32.
pub fn computes_in_bf16(device: Device) -> bool {
    device == Device::Cpu && cpu_has_native_bf16() && !FLOAT32_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// A one-line description of `device` for start-up logs.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu if computes_in_bf16(device) => format!("cpu ({} threads, bfloat16)", tch::get_num_threads()),
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

/// How often [`ThreadGovernor::update`] reads the CPU counters.
const GOVERNOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Inference threads for `cores` cores when other processes keep `others_busy` cores busy (mean
/// over the last interval): the cores they leave, at least one.
///
/// Why: libtorch's OpenMP steps wait for their slowest thread, so a thread whose core another
/// process holds stalls every step. Measured on 2 cores with one busy loop beside the engine
/// (PatchCore, 640x480; README, "CPU threads"): 2 threads 51 ms per frame, 1 thread 36 ms, idle
/// with 2 threads 17.5 ms.
pub fn threads_for(cores: usize, others_busy: f64) -> usize {
    let cores = cores.max(1);
    let free = (cores as f64 - others_busy.max(0.0)).round();
    (free.max(1.0) as usize).min(cores)
}

/// CPU time counters at one moment (Linux `/proc`, in clock ticks).
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuCounters {
    /// Busy ticks of every CPU together (user, nice, system, irq, softirq, steal).
    busy: u64,
    /// All ticks of every CPU together (busy, idle and iowait).
    total: u64,
    /// Ticks this process has run (user + system, all its threads).
    own: u64,
    /// CPUs counted in `/proc/stat`.
    cpus: usize,
}

impl CpuCounters {
    /// From the texts of `/proc/stat` and `/proc/self/stat`; None when either is not as Linux writes it.
    fn parse(stat: &str, self_stat: &str) -> Option<Self> {
        let mut lines = stat.lines();
        let cpu: Vec<u64> = lines
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = cpu[..] else { return None };
        let cpus = lines.filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
        // The command name (field 2) may hold spaces and parentheses: fields count from the last ')'.
        let rest = self_stat.get(self_stat.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
        let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let busy = user + nice + system + irq + softirq + steal;
        Some(Self { busy, total: busy + idle + iowait, own, cpus: cpus.max(1) })
    }

    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?, &std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// Cores kept busy by other processes between `earlier` and `self`.
    fn others_busy_since(&self, earlier: &Self) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)?;
        let busy = self.busy.saturating_sub(earlier.busy);
        let own = self.own.saturating_sub(earlier.own);
        Some(busy.saturating_sub(own) as f64 / total as f64 * self.cpus as f64)
    }
}

/// Keeps the calling inference thread's libtorch CPU threads at the cores other processes
/// leave free ([`threads_for`]), re-read about once a second between frames; the node's
/// `inference_threads: 0`. Without Linux's `/proc` it leaves libtorch's default alone.
#[derive(Debug)]
pub struct ThreadGovernor {
    cores: usize,
    threads: usize,
    last: Option<(CpuCounters, std::time::Instant)>,
}

impl ThreadGovernor {
    /// A governor for this machine's cores, starting at one thread per core. Make it on the
    /// inference thread (it sets that thread's libtorch threads).
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        tch::set_num_threads(i32::try_from(cores).unwrap_or(i32::MAX));
        Self { cores, threads: cores, last: CpuCounters::read().map(|c| (c, std::time::Instant::now())) }
    }

    /// Call between frames: at most once per second it reads the counters and, when the free
    /// cores changed, sets the thread count; returns the new count when it changed.
    pub fn update(&mut self) -> Option<usize> {
        let (earlier, at) = self.last?;
        if at.elapsed() < GOVERNOR_INTERVAL {
            return None;
        }
        let now = CpuCounters::read()?;
        self.last = Some((now, std::time::Instant::now()));
        let wanted = threads_for(self.cores, now.others_busy_since(&earlier)?);
        if wanted == self.threads {
            return None;
        }
        tch::set_num_threads(i32::try_from(wanted).unwrap_or(i32::MAX));
        self.threads = wanted;
        Some(wanted)
    }
}

impl Default for ThreadGovernor {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod governor_tests {
    use super::*;

    #[test]
    fn threads_are_the_cores_others_leave_at_least_one() {
        assert_eq!(threads_for(2, 0.0), 2);
        assert_eq!(threads_for(2, 0.3), 2);
        assert_eq!(threads_for(2, 1.0), 1);
        assert_eq!(threads_for(2, 2.0), 1);
        assert_eq!(threads_for(8, 2.6), 5);
        assert_eq!(threads_for(4, -1.0), 4);
        assert_eq!(threads_for(0, 0.0), 1);
    }

    const STAT: &str = "cpu  100 5 50 800 10 3 2 0 0 0\ncpu0 50 2 25 400 5 1 1 0 0 0\ncpu1 50 3 25 400 5 2 1 0 0 0\nintr 1\n";

    fn self_stat(utime: u64, stime: u64) -> String {
        format!("4242 (a (weird) name) S 1 1 1 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 3 0 5 0 0")
    }

    #[test]
    fn counters_parse_linux_texts_and_subtract_this_process() {
        let a = CpuCounters::parse(STAT, &self_stat(30, 10)).unwrap();
        assert_eq!(a, CpuCounters { busy: 160, total: 970, own: 40, cpus: 2 });
        // 200 ticks later on 2 CPUs: 150 busy, of which 50 ours -> others hold 100/200 of 2 cores.
        let later = "cpu  200 5 100 850 10 3 2 0 0 0\ncpu0 1\ncpu1 1\n";
        let b = CpuCounters::parse(later, &self_stat(70, 20)).unwrap();
        assert_eq!(b.total - a.total, 100 + 50 + 50);
        let others = b.others_busy_since(&a).unwrap();
        assert!((others - 1.0).abs() < 1e-9, "{others}");
        assert_eq!(threads_for(2, others), 1);
        // No time passed: no reading.
        assert_eq!(a.others_busy_since(&a), None);
        assert_eq!(CpuCounters::parse("nonsense", &self_stat(1, 1)), None);
        assert_eq!(CpuCounters::parse(STAT, "4242 (x) S"), None);
    }
}
