//! Gathering the GPU facts: the driver, the devices, their free memory and the CUDA libraries,
//! read through `extract::gpu::device` (which reads each device's properties without creating
//! a context on it), `extract::gpu::nvml` (free memory, also without a context) and
//! `extract::gpu::facts`, with cudarc's panics on a missing library turned into findings.
//! Imports those three modules and the probe type of `gpu`; calls no CUDA or NVML function
//! itself.

use super::cuda_libs::CudaLib;
use super::gpu::{GpuDevice, GpuProbe};
use crate::extract::gpu::device::{self, DeviceInfo};
use crate::extract::gpu::nvml::{self, Memory, NvmlError};
use crate::extract::gpu::{facts, GpuError};

/// NVML's answer for each device ([`nvml::memory`]'s shape), given the devices' UUIDs.
type NvmlMemory = Result<Vec<Result<Memory, NvmlError>>, NvmlError>;

/// Runs `f`, turning a panic into an error without printing it: cudarc panics when a library
/// or symbol it loads lazily is missing, and doctor reports that as a finding instead.
fn catch_quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    // Swapping the process-wide hook is safe here: doctor runs no other Rust threads.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

/// What the driver shows, read through `extract::gpu::device`, which reads each device's
/// properties without creating a context on it.
pub(super) fn probe_gpus() -> GpuProbe {
    if catch_quietly(device::driver_present) != Ok(true) {
        return GpuProbe::NoDriver;
    }
    let driver = catch_quietly(device::driver_version).ok().flatten();
    let probed = catch_quietly(device::probe).unwrap_or_else(|e| Err(GpuError::Library(e)));
    probe_from(
        driver,
        probed,
        || catch_quietly(facts::cuda_libraries).unwrap_or_default(),
        nvml::memory,
    )
}

/// [`device::probe`]'s answer as a [`GpuProbe`]; `libs` and `memory` (NVML's free memory of
/// the devices of these UUIDs) are asked only when there are devices. The probe says "no GPU" with `GpuError::NoDevice` (the driver's CUDA_ERROR_NO_DEVICE, or
/// a count of none); any other error is a driver that loads but does not start.
fn probe_from(
    driver: Option<(i32, i32)>,
    probed: Result<Vec<DeviceInfo>, GpuError>,
    libs: impl FnOnce() -> Vec<CudaLib>,
    memory: impl FnOnce(&[Option<[u8; 16]>]) -> NvmlMemory,
) -> GpuProbe {
    match probed {
        Ok(devices) if devices.is_empty() => GpuProbe::NoDevice { driver },
        Ok(devices) => {
            let uuids: Vec<Option<[u8; 16]>> = devices.iter().map(|d| d.uuid).collect();
            let free: Vec<Result<u64, String>> = match memory(&uuids) {
                Ok(each) => each
                    .into_iter()
                    .map(|m| m.map(|m| m.free).map_err(|e| e.to_string()))
                    .collect(),
                Err(e) => vec![Err(e.to_string()); devices.len()],
            };
            GpuProbe::Devices {
                driver,
                devices: devices
                    .into_iter()
                    .zip(free)
                    .map(|(d, free)| {
                        Ok(GpuDevice {
                            name: d.name,
                            capability: d.arch,
                            total: d.total_mem as u64,
                            free,
                        })
                    })
                    .collect(),
                libs: libs(),
            }
        }
        Err(GpuError::NoDevice(_)) => GpuProbe::NoDevice { driver },
        Err(e) => GpuProbe::DriverFailed {
            driver,
            error: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::cuda_libs::lib;

    #[test]
    fn the_device_probe_is_read_as_doctor_reports_it() {
        let no_libs = || -> Vec<CudaLib> { panic!("libraries asked without devices") };
        let no_memory = |_: &[Option<[u8; 16]>]| -> NvmlMemory { panic!("NVML asked") };
        let p = probe_from(
            Some((13, 0)),
            Ok(vec![h100()]),
            || vec![lib("NVRTC", true, (13, 0))],
            |uuids| {
                assert_eq!(uuids, [Some(UUID)]);
                Ok(vec![Ok(Memory {
                    free: 79 << 30,
                    total: 80 << 30,
                })])
            },
        );
        let GpuProbe::Devices { devices, libs, .. } = &p else {
            panic!("{p:?}");
        };
        assert_eq!(devices.len(), 1);
        assert_eq!(libs.len(), 1);
        let d = devices[0].as_ref().unwrap();
        assert_eq!(
            (d.capability, d.total, d.free.clone()),
            ((9, 0), 80 << 30, Ok(79 << 30))
        );
        for no_gpu in [
            "starting the CUDA driver: the CUDA driver finds no GPU",
            "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES and Slurm's --gpus)",
        ] {
            let p = probe_from(
                None,
                Err(GpuError::NoDevice(no_gpu.into())),
                no_libs,
                no_memory,
            );
            assert_eq!(p, GpuProbe::NoDevice { driver: None }, "{no_gpu}");
        }
        let failing = GpuError::Library("starting the CUDA driver: CUDA_ERROR_UNKNOWN".into());
        let p = probe_from(Some((12, 4)), Err(failing), no_libs, no_memory);
        assert_eq!(
            p,
            GpuProbe::DriverFailed {
                driver: Some((12, 4)),
                error: "starting the CUDA driver: CUDA_ERROR_UNKNOWN".into()
            }
        );
    }

    const UUID: [u8; 16] = [7; 16];

    fn h100() -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".to_string(),
            arch: (9, 0),
            total_mem: 80 << 30,
            uuid: Some(UUID),
        }
    }

    #[test]
    fn free_memory_nvml_cannot_give_is_unknown_with_the_reason() {
        let free_of = |memory: NvmlMemory| {
            let p = probe_from(None, Ok(vec![h100(), h100()]), Vec::new, |_| memory);
            let GpuProbe::Devices { devices, .. } = p else {
                panic!("{p:?}");
            };
            devices
                .into_iter()
                .map(|d| d.unwrap().free)
                .collect::<Vec<_>>()
        };
        let missing = NvmlError::Missing {
            library: "libnvidia-ml.so.1".into(),
        };
        let why = Err("libnvidia-ml.so.1 not found".to_string());
        assert_eq!(free_of(Err(missing)), [why.clone(), why]);
        let each = free_of(Ok(vec![
            Err(NvmlError::NoUuid),
            Ok(Memory {
                free: 1 << 30,
                total: 80 << 30,
            }),
        ]));
        assert_eq!(
            each,
            [
                Err("the CUDA driver gives no UUID for this GPU".to_string()),
                Ok(1 << 30)
            ]
        );
    }

    #[test]
    fn panics_become_errors() {
        assert_eq!(catch_quietly(|| 7), Ok(7));
        let err = catch_quietly(|| -> i32 { panic!("no libcuda {}", 1) });
        assert_eq!(err, Err("no libcuda 1".to_string()));
    }
}
