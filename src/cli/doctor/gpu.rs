//! GPUs: whether the CUDA driver loads and starts, the devices it shows (after
//! CUDA_VISIBLE_DEVICES), each one's name, compute capability and memory, a driver older than
//! the CUDA API spextract is built for, and the CUDA libraries (`cuda_libs`). Pure functions of
//! what `gpu_probe` gathered; imports the findings type, `cuda_libs` and `pipeline::env` (the
//! reading of CUDA_VISIBLE_DEVICES).

use super::cuda_libs::{cuda_lib_findings, CudaLib};
use super::{count, gib, Finding};
use crate::pipeline::env;

/// The CUDA API spextract's bindings are generated for (the `cuda-13000` feature of cudarc).
const BUILT_FOR_CUDA: (i32, i32) = (13, 0);

#[derive(Debug, Clone, PartialEq)]
/// One device as the report shows it.
pub(super) struct GpuDevice {
    pub(super) name: String,
    pub(super) capability: (i32, i32),
    pub(super) total: u64,
    /// Free memory (NVML's), or why it is unknown.
    pub(super) free: Result<u64, String>,
}

/// What loading the CUDA driver showed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum GpuProbe {
    /// No libcuda could be loaded.
    NoDriver,
    /// libcuda loaded but would not start.
    DriverFailed {
        driver: Option<(i32, i32)>,
        error: String,
    },
    /// The driver runs but shows no device.
    NoDevice { driver: Option<(i32, i32)> },
    /// The devices the driver shows (after CUDA_VISIBLE_DEVICES) and the CUDA libraries.
    Devices {
        driver: Option<(i32, i32)>,
        devices: Vec<Result<GpuDevice, String>>,
        libs: Vec<CudaLib>,
    },
}

impl GpuProbe {
    pub(super) fn device_count(&self) -> usize {
        match self {
            GpuProbe::Devices { devices, .. } => devices.len(),
            _ => 0,
        }
    }

    pub(super) fn device_name(&self, index: usize) -> Option<&str> {
        match self {
            GpuProbe::Devices { devices, .. } => match devices.get(index) {
                Some(Ok(d)) => Some(d.name.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

fn version_text(v: Option<(i32, i32)>) -> String {
    v.map_or_else(
        || "of unknown version".to_string(),
        |(a, b)| format!("{a}.{b}"),
    )
}

/// Findings on the GPUs. `cuda_visible` is CUDA_VISIBLE_DEVICES (None when unset) and
/// `slurm_gpus` is SLURM_GPUS_ON_NODE.
pub(super) fn gpu_findings(
    probe: &GpuProbe,
    cuda_visible: Option<&str>,
    slurm_gpus: Option<&str>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let visible = cuda_visible.map(env::parse_cuda_visible_devices);
    let visible_text = match cuda_visible {
        None => "CUDA_VISIBLE_DEVICES unset".to_string(),
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?}"),
    };
    if let Some(v) = &visible {
        if let Some(first) = v.ignored.first() {
            out.push(Finding::warn(
                "gpu",
                format!(
                    "{visible_text}: CUDA ignores {first:?} and every entry after it, leaving \
                     {} visible",
                    count(v.devices.len(), "device")
                ),
                "list devices by index or GPU-/MIG- UUID, comma-separated with no empty entries",
            ));
        }
    }
    let slurm_gpus = slurm_gpus.and_then(|v| v.trim().parse::<usize>().ok());
    let allocated = slurm_gpus.is_some_and(|n| n > 0)
        || visible.as_ref().is_some_and(|v| !v.devices.is_empty());
    match probe {
        GpuProbe::NoDriver if allocated => out.push(Finding::warn(
            "gpu",
            format!(
                "GPUs are allocated ({visible_text}{}) but no CUDA driver library (libcuda.so) \
                 loads: the CPU backend will be used",
                slurm_gpus.map_or(String::new(), |n| format!(", SLURM_GPUS_ON_NODE={n}"))
            ),
            "run on a GPU node, or add the NVIDIA driver's library folder to LD_LIBRARY_PATH",
        )),
        GpuProbe::NoDriver => out.push(Finding::ok(
            "gpu",
            "no GPU: the CPU backend will be used (no CUDA driver library libcuda.so)",
        )),
        GpuProbe::DriverFailed { driver, error } => out.push(Finding::warn(
            "gpu",
            format!(
                "the CUDA driver {} loads but does not start ({error}): the CPU backend will \
                 be used",
                version_text(*driver)
            ),
            "check `nvidia-smi` on this node, and which libcuda.so LD_LIBRARY_PATH finds \
             first; a driver updated without a reboot, or a container without the GPU \
             devices, also gives this",
        )),
        GpuProbe::NoDevice { driver } => {
            let found = format!(
                "CUDA driver {} but no GPU visible ({visible_text}): the CPU backend will be used",
                version_text(*driver)
            );
            out.push(if allocated {
                Finding::warn(
                    "gpu",
                    found,
                    "check the entries of CUDA_VISIBLE_DEVICES against `nvidia-smi -L`",
                )
            } else {
                Finding::ok("gpu", found)
            });
        }
        GpuProbe::Devices {
            driver,
            devices,
            libs,
        } => {
            out.push(Finding::ok(
                "gpu",
                format!(
                    "CUDA driver {}: {} visible ({visible_text})",
                    version_text(*driver),
                    count(devices.len(), "GPU")
                ),
            ));
            if let Some(d) = driver.filter(|&d| d < BUILT_FOR_CUDA) {
                out.push(Finding::warn(
                    "gpu",
                    format!(
                        "the driver supports CUDA {}.{}, older than the CUDA {}.{} API \
                         spextract's GPU code is built for: calls newer than the driver fail",
                        d.0, d.1, BUILT_FOR_CUDA.0, BUILT_FOR_CUDA.1
                    ),
                    "run on nodes with an NVIDIA driver for CUDA 13 (version 580 or later)",
                ));
            }
            for (i, d) in devices.iter().enumerate() {
                out.push(match d {
                    Ok(d) => {
                        let free = match &d.free {
                            Ok(f) => format!(", {} free", gib(*f)),
                            Err(why) => format!(", free memory unknown ({why})"),
                        };
                        let found = format!(
                            "GPU {i}: {}, compute capability {}.{}, {} memory{free}",
                            d.name,
                            d.capability.0,
                            d.capability.1,
                            gib(d.total)
                        );
                        // A GPU less than half free is held by another process.
                        match d.free {
                            Ok(f) if f < d.total / 2 => Finding::warn(
                                "gpu",
                                found,
                                "another process holds this GPU's memory (nvidia-smi shows \
                                 which): ask for exclusive GPUs",
                            ),
                            _ => Finding::ok("gpu", found),
                        }
                    }
                    Err(e) => Finding::warn(
                        "gpu",
                        format!("GPU {i} does not open: {e}"),
                        "check `nvidia-smi`; a GPU in exclusive-process mode used by another \
                         process, or in an error state, gives this",
                    ),
                });
            }
            out.extend(cuda_lib_findings(libs, *driver));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::cuda_libs::lib;
    use crate::cli::doctor::{statuses, with_status, Status};

    fn device(free_gib: u64) -> Result<GpuDevice, String> {
        Ok(GpuDevice {
            name: "NVIDIA H100 80GB HBM3".to_string(),
            capability: (9, 0),
            total: 80 << 30,
            free: Ok(free_gib << 30),
        })
    }

    #[test]
    fn no_driver_means_the_cpu_backend() {
        let f = gpu_findings(&GpuProbe::NoDriver, None, None);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("CPU backend"), "{}", f[0].found);
        // GPUs allocated but no driver: the run silently loses them, so say so.
        let f = gpu_findings(&GpuProbe::NoDriver, None, Some("4"));
        assert_eq!(statuses(&f), [Status::Warn]);
        assert!(
            f[0].found.contains("SLURM_GPUS_ON_NODE=4"),
            "{}",
            f[0].found
        );
    }

    #[test]
    fn cuda_visible_devices_with_a_bad_entry_warns() {
        let f = gpu_findings(
            &GpuProbe::NoDevice {
                driver: Some((13, 0)),
            },
            Some("-1"),
            None,
        );
        assert_eq!(statuses(&f), [Status::Warn, Status::Ok]);
        assert!(f[0].found.contains("ignores \"-1\""), "{}", f[0].found);
        let hidden = gpu_findings(
            &GpuProbe::NoDevice {
                driver: Some((13, 0)),
            },
            Some(""),
            None,
        );
        assert_eq!(statuses(&hidden), [Status::Ok]);
    }

    #[test]
    fn devices_are_listed_and_a_busy_gpu_warns() {
        let probe = GpuProbe::Devices {
            driver: Some((13, 0)),
            devices: vec![
                device(79),
                device(10),
                Err("CUDA_ERROR_ECC_UNCORRECTABLE".into()),
            ],
            libs: vec![
                lib("NVRTC", true, (13, 0)),
                lib("cuBLAS", true, (13, 0)),
                lib("cuSOLVER", true, (12, 0)),
            ],
        };
        let f = gpu_findings(&probe, Some("1,2,3"), None);
        assert_eq!(
            statuses(&f),
            [
                Status::Ok,
                Status::Ok,
                Status::Warn,
                Status::Warn,
                Status::Ok
            ]
        );
        assert!(f[0].found.contains("3 GPUs visible"), "{}", f[0].found);
        assert!(f[1]
            .found
            .contains("GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0"));
        assert!(
            f[1].found.contains("80.0 GiB memory, 79.0 GiB free"),
            "{}",
            f[1].found
        );
        assert!(f[2].found.contains("10.0 GiB free"), "{}", f[2].found);
        assert!(f[3].found.contains("ECC"), "{}", f[3].found);
        assert_eq!(f[4].found, "loaded: NVRTC 13.0, cuBLAS 13.0, cuSOLVER 12.0");
    }

    #[test]
    fn unknown_free_memory_says_why_and_does_not_warn() {
        let probe = GpuProbe::Devices {
            driver: Some((13, 0)),
            devices: vec![Ok(GpuDevice {
                free: Err("libnvidia-ml.so.1 not found".into()),
                ..device(0).unwrap()
            })],
            libs: vec![lib("NVRTC", true, (13, 0))],
        };
        let f = gpu_findings(&probe, None, None);
        assert_eq!(statuses(&f), [Status::Ok, Status::Ok, Status::Ok]);
        assert_eq!(
            f[1].found,
            "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, 80.0 GiB memory, free memory \
             unknown (libnvidia-ml.so.1 not found)"
        );
    }

    #[test]
    fn old_driver_missing_library_and_newer_nvrtc_warn() {
        let probe = GpuProbe::Devices {
            driver: Some((12, 4)),
            devices: vec![device(79)],
            libs: vec![
                lib("NVRTC", true, (13, 0)),
                lib("cuBLAS", true, (12, 4)),
                lib("cuSOLVER", false, (0, 0)),
            ],
        };
        let f = gpu_findings(&probe, None, None);
        let warns: Vec<&str> = with_status(&f, Status::Warn)
            .iter()
            .map(|w| w.found.as_str())
            .collect();
        assert_eq!(warns.len(), 3, "{warns:?}");
        assert!(warns[0].contains("supports CUDA 12.4"), "{}", warns[0]);
        assert!(warns[1].starts_with("cuSOLVER"), "{}", warns[1]);
        assert!(warns[2].contains("UNSUPPORTED_PTX_VERSION"), "{}", warns[2]);
    }
}
