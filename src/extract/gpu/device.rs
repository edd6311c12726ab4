//! Devices: what is there (read without creating contexts), and opening one. Which device a
//! rank takes is the pipeline's policy (`pipeline::env::gpu_ordinal`), and which backend runs
//! is `extract::engine`'s; this module imports nothing above `extract::gpu`.

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
    /// Its UUID (`cuDeviceGetUuid_v2`), which names it to NVML (see [`super::nvml`]) whatever
    /// CUDA_VISIBLE_DEVICES renumbers; None where the driver does not give it.
    pub uuid: Option<[u8; 16]>,
}

/// Runs a cudarc call that may panic when a library or symbol is missing.
pub(super) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
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
    // No GPU is NoDevice, whichever call finds it out; any other failure is the driver's.
    let failed = |what: &str, e: DriverError| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE {
            GpuError::NoDevice(format!("{what}: the CUDA driver finds no GPU"))
        } else {
            GpuError::driver(what, e)
        }
    };
    guarded("cuInit", cu::init)?.map_err(|e| failed("starting the CUDA driver", e))?;
    let n = guarded("cuDeviceGetCount", cu::device::get_count)?
        .map_err(|e| failed("counting the GPUs", e))?;
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
            // Only reports use the UUID: a driver that cannot give one still opens the device.
            let uuid = guarded("cuDeviceGetUuid_v2", || cu::device::get_uuid(dev))
                .ok()
                .and_then(Result::ok)
                .map(|u| u.bytes.map(|b| b as u8));
            Ok(DeviceInfo {
                ordinal: ordinal as usize,
                name: guarded("cuDeviceGetName", || cu::device::get_name(dev))?.map_err(q)?,
                arch: (major.map_err(q)?, minor.map_err(q)?),
                total_mem: total_mem.map_err(q)?,
                uuid,
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
