//! Devices: what is there, and opening one for a compute rank.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaStream};

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

/// The visible devices, or why there are none.
pub fn probe() -> Result<Vec<DeviceInfo>, GpuError> {
    if !driver_present() {
        return Err(GpuError::Library(
            "no CUDA driver library (libcuda.so): this machine has no NVIDIA GPU driver".into(),
        ));
    }
    let n = guarded("cuDeviceGetCount", CudaContext::device_count)?
        .map_err(|e| GpuError::NoDevice(format!("no usable GPU: {e:?}")))?;
    if n <= 0 {
        return Err(GpuError::NoDevice(
            "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES and Slurm's --gpus)".into(),
        ));
    }
    (0..n as usize)
        .map(|ordinal| {
            let ctx = guarded("cuCtxCreate", || CudaContext::new(ordinal))?
                .map_err(|e| GpuError::Cuda(format!("opening GPU {ordinal}: {e:?}")))?;
            let q =
                |e: cudarc::driver::DriverError| GpuError::Cuda(format!("GPU {ordinal}: {e:?}"));
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().map_err(q)?,
                arch: ctx.compute_capability().map_err(q)?,
                total_mem: ctx.total_mem().map_err(q)?,
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
            .map_err(|e| GpuError::Cuda(format!("opening GPU {ordinal}: {e:?}")))?;
        let stream = ctx.default_stream();
        Ok(Gpu { info, ctx, stream })
    }

    /// Compiles (or takes from the cache) and loads kernel file `name` (e.g. "spots.cu").
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>, GpuError> {
        let text = ptx::ptx(name, self.info.arch)?;
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(text))
            .map_err(|e| GpuError::Kernel(format!("loading {name} on {}: {e:?}", self.info.name)))
    }
}

/// Which backend runs, and why: the decision `--backend` leads to on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The CPU backend, with the reason when a GPU was asked for or looked for.
    Cpu(String),
}

/// Resolves `--backend` ("auto", "cpu" or "gpu"): `auto` takes a GPU when one works and the
/// GPU backend can run on it, else the CPU, saying which and why; `gpu` fails with the reason
/// when it cannot be honoured.
pub fn choose(requested: &str) -> Result<Choice, GpuError> {
    match requested {
        "cpu" => Ok(Choice::Cpu("--backend cpu".into())),
        "auto" | "gpu" => {
            let why = match probe() {
                Err(e) => e.to_string(),
                Ok(devs) => format!(
                    "{} GPU(s) found ({}), but this build's GPU backend is not complete yet \
                     (issue 4: kernels being ported)",
                    devs.len(),
                    devs.iter()
                        .map(|d| format!("{} sm_{}{}", d.name, d.arch.0, d.arch.1))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            if requested == "gpu" {
                Err(GpuError::NoDevice(format!("--backend gpu: {why}")))
            } else {
                Ok(Choice::Cpu(format!("auto: CPU ({why})")))
            }
        }
        other => Err(GpuError::NoDevice(format!(
            "--backend {other}: expected auto, cpu or gpu"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI, most laptops) `auto` falls back to the CPU and says why; `gpu` is an
    /// error naming the reason; with a GPU the same holds until the backend is complete.
    #[test]
    fn backend_choice_falls_back_or_fails_clearly() {
        match choose("auto").unwrap() {
            Choice::Cpu(why) => assert!(why.starts_with("auto: CPU ("), "{why}"),
        }
        let err = choose("gpu").unwrap_err().to_string();
        assert!(err.starts_with("--backend gpu: "), "{err}");
        assert!(choose("cpu").is_ok());
        assert!(choose("tpu")
            .unwrap_err()
            .to_string()
            .contains("expected auto, cpu or gpu"));
    }
}
