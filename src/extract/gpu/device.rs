//! Devices: what is there, and opening one for a compute rank.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError, PinnedHostSlice,
};

use super::{ptx, GpuError};

/// One visible device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Ordinal among the visible devices (after CUDA_VISIBLE_DEVICES).
    pub ordinal: usize,
    /// Its name.
    pub name: String,
    /// Compute capability.
    pub arch: (i32, i32),
    /// Total memory in bytes.
    pub total_mem: usize,
}

/// Runs a cudarc call that may panic when a library or symbol is missing.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| GpuError::Library(format!("{what}: the CUDA library could not be used")))
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library by its known names.
    guarded("libcuda", || unsafe {
        cudarc::driver::sys::is_culib_present()
    })
    .unwrap_or(false)
}

/// The CUDA version of the driver (`cuDriverGetVersion`, which needs no `cuInit`), when the
/// driver library loads.
pub fn driver_version() -> Option<(i32, i32)> {
    use cudarc::driver::sys;
    if !driver_present() {
        return None;
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through a pointer valid for the call.
    let rc = guarded("cuDriverGetVersion", || unsafe {
        sys::cuDriverGetVersion(&mut v)
    })
    .ok()?;
    (rc == sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
}

/// The visible devices, or why there are none. Reads each device's properties without
/// creating a context on it: a context costs memory on every GPU a rank sees, and a GPU in
/// exclusive-process mode that another rank already holds would refuse one.
pub fn probe() -> Result<Vec<DeviceInfo>, GpuError> {
    use cudarc::driver::result as cu;
    use cudarc::driver::sys::CUdevice_attribute as attr;
    if !driver_present() {
        return Err(GpuError::Library(
            "no CUDA driver library (libcuda.so): this machine has no NVIDIA GPU driver".into(),
        ));
    }
    guarded("cuInit", cu::init)?
        .map_err(|e| GpuError::NoDevice(format!("the CUDA driver does not start: {e:?}")))?;
    let n = guarded("cuDeviceGetCount", cu::device::get_count)?
        .map_err(|e| GpuError::NoDevice(format!("no usable GPU: {e:?}")))?;
    if n <= 0 {
        return Err(GpuError::NoDevice(
            "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES and Slurm's --gpus)".into(),
        ));
    }
    (0..n)
        .map(|ordinal| {
            let q = |e: cudarc::driver::DriverError| GpuError::driver(format!("GPU {ordinal}"), e);
            let dev = guarded("cuDeviceGet", || cu::device::get(ordinal))?.map_err(q)?;
            // SAFETY: `dev` was returned by cuDeviceGet for this ordinal just above.
            let (major, minor, total_mem) = guarded("cuDeviceGetAttribute", || unsafe {
                (
                    cu::device::get_attribute(
                        dev,
                        attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    ),
                    cu::device::get_attribute(
                        dev,
                        attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    ),
                    cu::device::total_mem(dev),
                )
            })?;
            Ok(DeviceInfo {
                ordinal: ordinal as usize,
                name: guarded("cuDeviceGetName", || cu::device::get_name(dev))?.map_err(q)?,
                arch: (major.map_err(q)?, minor.map_err(q)?),
                total_mem: total_mem.map_err(q)?,
            })
        })
        .collect()
}

/// An opened device with its stream and loaded kernels.
pub struct Gpu {
    /// The device.
    pub info: DeviceInfo,
    /// Its context.
    pub ctx: Arc<CudaContext>,
    /// The stream work is queued on.
    pub stream: Arc<CudaStream>,
    /// Page-locked memory that [`Gpu::upload`] copies through, when this stream has it.
    staging: Option<Mutex<Staging>>,
}

/// Page-locked host memory that a stream's uploads are copied through, so that they are
/// asynchronous: the driver makes a copy from pageable memory wait for the stream's earlier
/// work, which would hold the host in the middle of queueing a chunk until the stream caught up.
/// Filled from the start in each round ([`Gpu::restage`]), when the stream has finished
/// every copy out of it; an upload that does not fit goes from pageable memory, and the next
/// round grows the buffer to what this one wanted.
#[derive(Default)]
struct Staging {
    buf: Option<PinnedHostSlice<u64>>,
    /// Words used in this round.
    used: usize,
    /// Words this round's uploads asked for, fitting or not.
    wanted: usize,
}

impl Gpu {
    /// Opens visible device `ordinal`.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let infos = probe()?;
        let info = infos.get(ordinal).cloned().ok_or_else(|| {
            GpuError::NoDevice(format!(
                "GPU {ordinal} requested but {} are visible",
                infos.len()
            ))
        })?;
        let ctx = guarded("cuCtxCreate", || CudaContext::new(ordinal))?
            .map_err(|e| GpuError::driver(format!("opening GPU {ordinal}"), e))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            info,
            ctx,
            stream,
            staging: None,
        })
    }

    /// Lets the device's memory pool keep what it has once held. Buffers come from the
    /// stream-ordered pool (`cuMemAllocAsync`), whose default release threshold of 0 hands
    /// its memory back to the driver at every synchronisation; the backend synchronises after
    /// every chunk and would then acquire its ~2 GB afresh for the next one.
    pub fn keep_pool_memory(&self) -> Result<(), GpuError> {
        use cudarc::driver::{result, sys};
        self.ctx
            .bind_to_thread()
            .map_err(|e| GpuError::driver(self.info.name.clone(), e))?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: cu_device is the context's own device; cuMemPoolSetAttribute reads one u64
        // through the pointer, which is valid for the call, for this attribute.
        let rc = guarded("cuMemPoolSetAttribute", || unsafe {
            result::device::get_mem_pool(self.ctx.cu_device()).and_then(|pool| {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .result()
            })
        })?;
        rc.map_err(|e| {
            GpuError::driver(format!("keeping the memory pool of {}", self.info.name), e)
        })
    }

    /// The same device on a stream of its own (non-blocking). The first such stream puts the
    /// context in cudarc's multi-stream mode, where every buffer records the events that make
    /// a stream using it wait for the stream that wrote it, and a buffer is freed in the order
    /// of the streams that used it.
    pub fn on_new_stream(&self) -> Result<Gpu, GpuError> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| GpuError::driver(format!("creating a stream on {}", self.info.name), e))?;
        Ok(Gpu {
            info: self.info.clone(),
            ctx: self.ctx.clone(),
            stream,
            staging: None,
        })
    }

    /// This stream with a staging buffer for its uploads (see [`Gpu::upload`]).
    pub fn with_staging(mut self) -> Gpu {
        self.staging = Some(Mutex::new(Staging::default()));
        self
    }

    /// Copies `data` into a new device buffer, queued on the stream: through the staging
    /// buffer where there is one and room in it (asynchronous), else straight from `data`.
    pub fn upload<T: DeviceRepr + Copy>(&self, data: &[T]) -> Result<CudaSlice<T>, DriverError> {
        let bytes = std::mem::size_of_val(data);
        let words = bytes.div_ceil(8);
        let Some(mut stage) = self.staging.as_ref().and_then(|m| m.lock().ok()) else {
            return self.stream.clone_htod(data);
        };
        stage.wanted += words;
        let used = stage.used;
        let room = stage.buf.as_ref().map_or(0, |b| b.len());
        if data.is_empty() || std::mem::align_of::<T>() > 8 || used + words > room {
            return self.stream.clone_htod(data);
        }
        let buf = stage.buf.as_mut().expect("room above");
        // The buffer's own event is never recorded (copies take plain slices of it), so this
        // does not wait.
        let base = buf.as_mut_ptr()?;
        // SAFETY: words [used, used + words) of the buffer lie inside it (checked above) and no
        // copy queued in this round reads them (each round hands out each word once; the
        // previous round's copies finished before `restage`). The destination is 8-byte
        // aligned, which covers T (checked above), and holds `bytes` = data.len() T's.
        let src: &[T] = unsafe {
            let dst = base.add(used).cast::<u8>();
            std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), dst, bytes);
            std::slice::from_raw_parts(dst.cast::<T>(), data.len())
        };
        // SAFETY: every element is written by the copy queued next, before anything later on
        // the stream reads it.
        let mut out = unsafe { self.stream.alloc::<T>(data.len()) }?;
        self.stream.memcpy_htod(src, &mut out)?;
        stage.used = used + words;
        Ok(out)
    }

    /// Starts a round of staged uploads. The stream must have finished every copy out of the
    /// staging buffer (a lane calls this after collecting its last chunk); the buffer is grown
    /// here, a quarter above what the last round wanted.
    pub fn restage(&self) -> Result<(), GpuError> {
        let Some(mut stage) = self.staging.as_ref().and_then(|m| m.lock().ok()) else {
            return Ok(());
        };
        let room = stage.buf.as_ref().map_or(0, |b| b.len());
        if stage.wanted > room {
            let len = stage.wanted + stage.wanted / 4;
            stage.buf = None;
            // SAFETY: the memory is uninitialised; `upload` writes each word before a copy
            // reads it. Plain page-locked memory, as run on the H200 (write-combined memory,
            // which the host only writes here, is untried).
            let buf = unsafe { self.ctx.alloc_pinned_with_flags::<u64>(len, 0) }.map_err(|e| {
                GpuError::driver(format!("page-locked staging of {} MB", (len * 8) >> 20), e)
            })?;
            stage.buf = Some(buf);
        }
        stage.used = 0;
        stage.wanted = 0;
        Ok(())
    }

    /// Compiles (or takes from the cache) and loads kernel file `name` (e.g. "spots.cu"): its
    /// machine code, or its PTX where the machine code cannot be made or loaded.
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>, GpuError> {
        let native = ptx::cubin(name, self.info.arch).and_then(|bin| {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin))
                .map_err(|e| GpuError::Kernel(format!("{e:?}")))
        });
        let cubin_err = match native {
            Ok(m) => return Ok(m),
            Err(e) => e,
        };
        tracing::warn!(
            "{name}: the machine code for sm_{}{} did not load ({cubin_err}); loading its PTX",
            self.info.arch.0,
            self.info.arch.1
        );
        let text = ptx::ptx(name, self.info.arch)?;
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(text))
            .map_err(|e| {
                // A newer NVRTC than the driver writes PTX the driver cannot read: say which.
                let hint =
                    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                        format!(
                        " (the PTX comes from NVRTC {:?}, the driver supports CUDA {:?}: put an \
                         NVRTC no newer than the driver first on LD_LIBRARY_PATH)",
                        ptx::nvrtc_version().ok(),
                        driver_version()
                    )
                    } else {
                        String::new()
                    };
                GpuError::Kernel(format!("loading {name} on {}: {e:?}{hint}", self.info.name))
            })
    }
}

/// Which backend runs, and why: the decision `--backend` leads to on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The CPU backend, with the reason when a GPU was asked for or looked for.
    Cpu(String),
    /// The GPU backend (`GpuBackend`), on the devices found.
    Gpu(String),
}

/// Resolves `--backend` ("auto", "cpu" or "gpu"). `gpu` takes the GPU backend when a device
/// works and fails with the reason otherwise. `auto` takes it when a device is visible and the
/// CUDA libraries the backend needs load (and, in [`backend_for`], when the backend then
/// starts), else the CPU, saying why.
pub fn choose(requested: &str) -> Result<Choice, GpuError> {
    let found = |devs: &[DeviceInfo]| {
        format!(
            "{} GPU(s): {}",
            devs.len(),
            devs.iter()
                .map(|d| format!("{} sm_{}{}", d.name, d.arch.0, d.arch.1))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match requested {
        "cpu" => Ok(Choice::Cpu("--backend cpu".into())),
        "gpu" => match probe() {
            Ok(devs) => Ok(Choice::Gpu(format!("--backend gpu on {}", found(&devs)))),
            Err(e) => Err(GpuError::NoDevice(format!("--backend gpu: {e}"))),
        },
        "auto" => Ok(match probe().and_then(|devs| libraries().map(|()| devs)) {
            Ok(devs) => Choice::Gpu(format!("auto: GPU on {}", found(&devs))),
            Err(e) => Choice::Cpu(format!("auto: CPU ({e})")),
        }),
        other => Err(GpuError::NoDevice(format!(
            "--backend {other}: expected auto, cpu or gpu"
        ))),
    }
}

/// The device a compute rank uses: compute ranks of a node take the visible GPUs in turn,
/// `ranks_per_gpu` to a GPU (`compute_index` is the rank's place among its node's compute
/// ranks); under Slurm's per-task GPU binding each rank sees only its own GPU, device 0.
pub fn ordinal_for(
    compute_index: usize,
    visible: usize,
    ranks_per_gpu: usize,
) -> Result<usize, GpuError> {
    use crate::pipeline::env;
    let per_task = env::slurm_binds_gpus_per_task(
        std::env::var("SLURM_GPUS_PER_TASK").ok().as_deref(),
        std::env::var("SLURM_GPU_BIND").ok().as_deref(),
    );
    if per_task {
        return Ok(0);
    }
    env::gpu_binding(compute_index, visible, ranks_per_gpu).ok_or_else(|| {
        GpuError::NoDevice(format!(
            "compute rank {compute_index} of its node has no GPU: {visible} visible, \
             {ranks_per_gpu} compute rank(s) per GPU (start fewer ranks per node, or raise \
             --ranks-per-gpu under MPS)"
        ))
    })
}

/// The backend a compute rank uses: `name` is "cpu" or "gpu" (from [`choose`]).
pub fn backend_for(
    name: &str,
    compute_index: usize,
    ranks_per_gpu: usize,
) -> Result<Box<dyn crate::extract::Backend>, GpuError> {
    Ok(match engine_for(name, compute_index, ranks_per_gpu)? {
        Engine::Gpu(b) => b,
        Engine::Cpu(c) => Box::new(c),
    })
}

/// The backend a compute rank runs, held as what it is: the GPU's (whose device the
/// cuda-aware-mpi path reaches into), or the CPU's.
pub enum Engine {
    /// The GPU backend.
    Gpu(Box<super::backend::GpuBackend>),
    /// The CPU backend.
    Cpu(crate::extract::cpu::CpuBackend),
}

impl Engine {
    /// As a backend.
    pub fn backend(&mut self) -> &mut dyn crate::extract::Backend {
        match self {
            Engine::Gpu(b) => b.as_mut(),
            Engine::Cpu(c) => c,
        }
    }
}

/// [`backend_for`]'s choice, as an [`Engine`].
pub fn engine_for(
    name: &str,
    compute_index: usize,
    ranks_per_gpu: usize,
) -> Result<Engine, GpuError> {
    let cpu = || Engine::Cpu(crate::extract::cpu::CpuBackend);
    match name {
        "gpu" => {}
        "auto" if matches!(choose("auto")?, Choice::Gpu(_)) => {}
        _ => return Ok(cpu()),
    }
    let started = ordinal_for(compute_index, probe()?.len(), ranks_per_gpu)
        .and_then(|ordinal| Ok((ordinal, super::backend::GpuBackend::new(ordinal)?)));
    match started {
        Ok((ordinal, b)) => {
            tracing::info!(
                "compute rank {compute_index}: GPU {ordinal} ({})",
                b.device().name
            );
            Ok(Engine::Gpu(Box::new(b)))
        }
        Err(e) if name == "auto" => {
            tracing::warn!(
                "compute rank {compute_index}: the GPU backend did not start ({e}); the CPU \
                 backend runs instead (auto)"
            );
            Ok(cpu())
        }
        Err(e) => Err(e),
    }
}

/// Whether the CUDA libraries the GPU backend calls load: cuBLAS and cuSOLVER with every
/// routine it uses, and NVRTC.
fn libraries() -> Result<(), GpuError> {
    super::solve::check_libraries()?;
    ptx::require_nvrtc()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI, most laptops) `auto` falls back to the CPU and says why; `gpu` is an
    /// error naming the reason. With a working GPU and its libraries, both take it.
    #[test]
    fn backend_choice_falls_back_or_fails_clearly() {
        let gpu_works = probe().is_ok() && libraries().is_ok();
        match choose("auto").unwrap() {
            Choice::Cpu(why) => {
                assert!(
                    !gpu_works,
                    "auto stayed on the CPU beside a working GPU: {why}"
                );
                assert!(why.starts_with("auto: CPU ("), "{why}");
            }
            Choice::Gpu(why) => {
                assert!(gpu_works, "{why}");
                assert!(why.starts_with("auto: GPU on "), "{why}");
            }
        }
        match choose("gpu") {
            Err(e) => assert!(e.to_string().starts_with("--backend gpu: "), "{e}"),
            Ok(Choice::Gpu(why)) => assert!(why.starts_with("--backend gpu on "), "{why}"),
            Ok(c) => panic!("--backend gpu gave {c:?}"),
        }
        if !gpu_works {
            // Without a working GPU, auto hands out the CPU backend.
            assert_eq!(backend_for("auto", 0, 1).unwrap().name(), "cpu");
        }
        assert!(choose("cpu").is_ok());
        assert!(choose("tpu")
            .unwrap_err()
            .to_string()
            .contains("expected auto, cpu or gpu"));
    }

    /// `--ranks-per-gpu` reaches the binding: two ranks per GPU fill two GPUs with four ranks,
    /// and a fifth is refused with the way out named.
    #[test]
    fn ranks_per_gpu_shares_devices_and_refuses_the_excess() {
        if std::env::var_os("SLURM_GPUS_PER_TASK").is_some()
            || std::env::var_os("SLURM_GPU_BIND").is_some()
        {
            eprintln!("skipping: Slurm binds GPUs per task here");
            return;
        }
        let got: Vec<usize> = (0..4).map(|k| ordinal_for(k, 2, 2).unwrap()).collect();
        assert_eq!(got, [0, 1, 0, 1]);
        let err = ordinal_for(4, 2, 2).unwrap_err().to_string();
        assert!(err.contains("--ranks-per-gpu"), "{err}");
        assert!(ordinal_for(1, 2, 1).is_ok() && ordinal_for(2, 2, 1).is_err());
    }
}
