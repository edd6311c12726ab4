//! Each GPU's free and total memory as NVML (libnvidia-ml, the library under `nvidia-smi`)
//! reports it, read without creating a CUDA context: a context would cost memory on the GPU
//! and be refused by one in exclusive-process mode that another process holds.
//!
//! cudarc 0.19 has no NVML binding, so the few calls used are loaded here with libloading, and
//! every `unsafe` of this FFI surface is in this file. A missing library or symbol is an
//! [`NvmlError`], never a panic. NVML numbers all the node's GPUs, ignoring
//! CUDA_VISIBLE_DEVICES, so a CUDA device is matched to NVML's by its UUID (which the driver API
//! gives, [`super::device::DeviceInfo::uuid`]), never by index. Imports nothing from the crate
//! (its GPU-node test reads the devices through `device`).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

/// The file NVML is loaded from: the driver installs the versioned name; the unversioned one
/// comes only with development packages.
pub const LIBRARY: &str = "libnvidia-ml.so.1";

/// A GPU's memory, in bytes, as NVML reports it (memory other processes hold counts as used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Not allocated by any process or by the driver.
    pub free: u64,
    /// The whole of the device's memory.
    pub total: u64,
}

/// Why NVML gave no memory figures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmlError {
    /// The library is not on the loader's path (a machine without the NVIDIA driver).
    #[error("{library} not found")]
    Missing {
        /// The file name asked for.
        library: String,
    },
    /// The library is there but does not load, or lacks a call used here.
    #[error("{library} does not load: {reason}")]
    Unusable {
        /// The file name asked for.
        library: String,
        /// The loader's words.
        reason: String,
    },
    /// An NVML call failed.
    #[error("{call}: {message} (NVML error {code})")]
    Call {
        /// The NVML function.
        call: &'static str,
        /// Its `nvmlReturn_t`.
        code: c_int,
        /// `nvmlErrorString`'s text for it.
        message: String,
    },
    /// The CUDA driver gave no UUID for the device, so it cannot be matched to NVML's.
    #[error("the CUDA driver gives no UUID for this GPU")]
    NoUuid,
    /// NVML lists no GPU with this UUID (a MIG instance has a UUID of its own, which NVML
    /// lists only under its parent GPU).
    #[error("NVML lists no GPU with UUID {uuid}")]
    NotListed {
        /// The CUDA device's UUID, as NVML writes it.
        uuid: String,
    },
}

/// The memory of the GPUs whose driver-API UUIDs are `uuids`, in their order: the GPU's
/// figures, or why NVML has none for it. Fails as a whole when NVML does not load or start.
pub fn memory(uuids: &[Option<[u8; 16]>]) -> Result<Vec<Result<Memory, NvmlError>>, NvmlError> {
    memory_from(LIBRARY, uuids)
}

/// [`memory`], with NVML loaded from `library` (a test names a file that is not there).
fn memory_from(
    library: &str,
    uuids: &[Option<[u8; 16]>],
) -> Result<Vec<Result<Memory, NvmlError>>, NvmlError> {
    let nvml = Nvml::open(library)?;
    let listed = nvml.start()?.devices()?;
    Ok(matched(uuids, &listed))
}

/// A device as NVML lists it: its UUID ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") and
/// memory.
type Listed = (String, Result<Memory, NvmlError>);

/// Each CUDA UUID's entry among NVML's devices (`listed`, in NVML's order).
fn matched(uuids: &[Option<[u8; 16]>], listed: &[Listed]) -> Vec<Result<Memory, NvmlError>> {
    uuids
        .iter()
        .map(|bytes| {
            let uuid = uuid_text(bytes.as_ref().ok_or(NvmlError::NoUuid)?);
            listed
                .iter()
                .find(|(id, _)| id.strip_prefix("GPU-") == Some(uuid.as_str()))
                .map_or_else(
                    || {
                        Err(NvmlError::NotListed {
                            uuid: format!("GPU-{uuid}"),
                        })
                    },
                    |(_, m)| m.clone(),
                )
        })
        .collect()
}

/// A UUID's 16 bytes as NVML and `nvidia-smi -L` write them, without the "GPU-" prefix.
fn uuid_text(b: &[u8; 16]) -> String {
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

/// `nvmlReturn_t`'s success.
const NVML_SUCCESS: c_int = 0;
/// NVML_DEVICE_UUID_V2_BUFFER_SIZE: room for any UUID NVML writes, with its terminator.
const UUID_BUFFER: c_uint = 96;

/// `nvmlMemory_t` (version 1 of nvmlDeviceGetMemoryInfo).
#[repr(C)]
#[derive(Default)]
struct RawMemory {
    total: u64,
    free: u64,
    used: u64,
}

type Device = *mut c_void;

/// The NVML calls used, resolved from one loaded library, which the struct keeps loaded for
/// as long as the pointers live.
struct Nvml {
    init: unsafe extern "C" fn() -> c_int,
    shutdown: unsafe extern "C" fn() -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    count: unsafe extern "C" fn(*mut c_uint) -> c_int,
    by_index: unsafe extern "C" fn(c_uint, *mut Device) -> c_int,
    uuid: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int,
    memory: unsafe extern "C" fn(Device, *mut RawMemory) -> c_int,
    _library: libloading::Library,
}

impl Nvml {
    /// Loads `library` and resolves the calls.
    fn open(library: &str) -> Result<Nvml, NvmlError> {
        let unusable = |e: libloading::Error| NvmlError::Unusable {
            library: library.to_string(),
            reason: loader_words(&e),
        };
        // SAFETY: loading runs the library's initialisers; libnvidia-ml's only set up its own
        // state. A name that is not there fails here with an error, not a panic.
        let lib = unsafe { libloading::Library::new(library) }.map_err(|e| {
            if loader_words(&e).contains("No such file") {
                NvmlError::Missing {
                    library: library.to_string(),
                }
            } else {
                unusable(e)
            }
        })?;
        // SAFETY: each symbol is given the signature nvml.h declares for it (NVML's ABI has
        // kept these since the _v2 entry points of driver 325); the pointers are copied out
        // and used only while `_library` keeps the library loaded.
        let nvml = unsafe {
            Nvml {
                init: *lib.get(b"nvmlInit_v2\0").map_err(unusable)?,
                shutdown: *lib.get(b"nvmlShutdown\0").map_err(unusable)?,
                error_string: *lib.get(b"nvmlErrorString\0").map_err(unusable)?,
                count: *lib.get(b"nvmlDeviceGetCount_v2\0").map_err(unusable)?,
                by_index: *lib
                    .get(b"nvmlDeviceGetHandleByIndex_v2\0")
                    .map_err(unusable)?,
                uuid: *lib.get(b"nvmlDeviceGetUUID\0").map_err(unusable)?,
                memory: *lib.get(b"nvmlDeviceGetMemoryInfo\0").map_err(unusable)?,
                _library: lib,
            }
        };
        Ok(nvml)
    }

    /// Starts NVML, until the answer is dropped.
    fn start(&self) -> Result<Started<'_>, NvmlError> {
        // SAFETY: nvmlInit_v2 takes no arguments and may be called any number of times (NVML
        // counts them, and each nvmlShutdown undoes one).
        self.check("nvmlInit_v2", unsafe { (self.init)() })?;
        Ok(Started(self))
    }

    fn check(&self, call: &'static str, rc: c_int) -> Result<(), NvmlError> {
        if rc == NVML_SUCCESS {
            Ok(())
        } else {
            Err(self.failed(call, rc))
        }
    }

    fn failed(&self, call: &'static str, code: c_int) -> NvmlError {
        // SAFETY: nvmlErrorString returns a static NUL-terminated string for any code, and
        // may be called whether or not NVML started.
        let message = unsafe {
            let p = (self.error_string)(code);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        NvmlError::Call {
            call,
            code,
            message,
        }
    }
}

/// What the loader said: libloading's own words ("dlopen failed") and dlerror's beneath them.
fn loader_words(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// NVML started ([`Nvml::start`]); shut down on drop.
struct Started<'a>(&'a Nvml);

impl Started<'_> {
    /// Every device NVML lists, with its UUID and memory; one whose UUID cannot be read (e.g.
    /// a GPU this process may not use) is left out, as it matches no CUDA device.
    fn devices(&self) -> Result<Vec<Listed>, NvmlError> {
        let nvml = self.0;
        let mut n: c_uint = 0;
        // SAFETY: writes one unsigned int through a pointer valid for the call; NVML started.
        nvml.check("nvmlDeviceGetCount_v2", unsafe { (nvml.count)(&mut n) })?;
        let mut out = Vec::new();
        for index in 0..n {
            let mut dev: Device = std::ptr::null_mut();
            let mut buf = [0 as c_char; UUID_BUFFER as usize];
            // SAFETY: each call writes through pointers valid for it, the UUID at most
            // `UUID_BUFFER` chars with its terminator; `dev` is NVML's handle for `index`,
            // valid until nvmlShutdown.
            let uuid = unsafe {
                nvml.check(
                    "nvmlDeviceGetHandleByIndex_v2",
                    (nvml.by_index)(index, &mut dev),
                )
                .and_then(|()| {
                    nvml.check(
                        "nvmlDeviceGetUUID",
                        (nvml.uuid)(dev, buf.as_mut_ptr(), UUID_BUFFER),
                    )
                })
                .map(|()| CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
            };
            let Ok(uuid) = uuid else { continue };
            let mut raw = RawMemory::default();
            // SAFETY: `dev` was returned just above; the call fills one nvmlMemory_t.
            let memory = nvml
                .check("nvmlDeviceGetMemoryInfo", unsafe {
                    (nvml.memory)(dev, &mut raw)
                })
                .map(|()| Memory {
                    free: raw.free,
                    total: raw.total,
                });
            out.push((uuid, memory));
        }
        Ok(out)
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        // SAFETY: this answer stands for one successful nvmlInit_v2, undone here once; the
        // library is loaded, as the Nvml it borrows outlives it.
        unsafe { (self.0.shutdown)() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: [u8; 16] = [
        0x8f, 0x3c, 0x1a, 0x02, 0x5b, 0x6e, 0x47, 0x10, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56,
        0x78,
    ];

    #[test]
    fn a_uuid_is_written_as_nvml_writes_it() {
        assert_eq!(uuid_text(&H200), "8f3c1a02-5b6e-4710-9abc-def012345678");
    }

    #[test]
    fn cuda_devices_are_matched_to_nvml_by_uuid_not_index() {
        let mut other = H200;
        other[15] = 0x79;
        let mem = |free_gib: u64| Memory {
            free: free_gib << 30,
            total: 141 << 30,
        };
        // NVML lists every GPU of the node; CUDA_VISIBLE_DEVICES=1 shows only NVML's second
        // as CUDA device 0.
        let listed = vec![
            (format!("GPU-{}", uuid_text(&other)), Ok(mem(3))),
            (format!("GPU-{}", uuid_text(&H200)), Ok(mem(140))),
        ];
        assert_eq!(matched(&[Some(H200)], &listed), [Ok(mem(140))]);
        assert_eq!(
            matched(&[Some(H200), Some(other)], &listed),
            [Ok(mem(140)), Ok(mem(3))]
        );
        // A device NVML does not list (a MIG instance's own UUID) has no figures, and says so.
        let mut mig = H200;
        mig[0] = 0;
        let got = matched(&[Some(mig), None], &listed);
        assert_eq!(
            got[0].as_ref().unwrap_err().to_string(),
            "NVML lists no GPU with UUID GPU-003c1a02-5b6e-4710-9abc-def012345678"
        );
        assert_eq!(got[1], Err(NvmlError::NoUuid));
        // A failed read on the matched device is that device's answer.
        let failing = NvmlError::Call {
            call: "nvmlDeviceGetMemoryInfo",
            code: 4,
            message: "Insufficient Permissions".into(),
        };
        let listed = vec![(format!("GPU-{}", uuid_text(&H200)), Err(failing.clone()))];
        assert_eq!(matched(&[Some(H200)], &listed), [Err(failing)]);
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let err = memory_from("libspextract-no-such-nvml.so.1", &[Some(H200)]).unwrap_err();
        assert_eq!(err.to_string(), "libspextract-no-such-nvml.so.1 not found");
    }

    /// On a GPU node: every visible device is found in NVML by its UUID, with free memory no
    /// more than total, and NVML's total within a few percent of the driver's (NVML also
    /// counts what the driver reserves). Skips without a GPU.
    #[test]
    fn gpu_every_visible_device_has_nvml_figures() {
        let devices = match crate::extract::gpu::device::probe() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipping: no GPU ({e})");
                return;
            }
        };
        let uuids: Vec<_> = devices.iter().map(|d| d.uuid).collect();
        let figures = memory(&uuids).expect("a node with a GPU driver has NVML");
        for (d, m) in devices.iter().zip(figures) {
            let m = m.unwrap_or_else(|e| panic!("GPU {} ({}): {e}", d.ordinal, d.name));
            eprintln!(
                "GPU {} {}: NVML {m:?}, driver total {}",
                d.ordinal, d.name, d.total_mem
            );
            assert!(m.free <= m.total, "{m:?}");
            let driver = d.total_mem as f64;
            assert!(
                (m.total as f64 - driver).abs() < 0.05 * driver,
                "{m:?} vs {driver}"
            );
        }
    }

    #[test]
    fn a_library_without_nvml_is_unusable() {
        // libc loads everywhere and has no nvmlInit_v2.
        let err = memory_from("libc.so.6", &[Some(H200)]).unwrap_err();
        assert!(
            matches!(&err, NvmlError::Unusable { reason, .. } if reason.contains("nvmlInit_v2")),
            "{err}"
        );
    }
}
