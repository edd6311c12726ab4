//! Facts about the CUDA libraries this process loads, for reports (`spextract doctor`):
//! whether each loads, its version, and the file it was mapped from. Nothing here creates a
//! context or touches a device: devices are [`super::device::probe`]'s, and NVRTC's presence
//! and version are `ptx`'s, used as they are. What the backend requires of cuBLAS and cuSOLVER
//! (every routine it calls) stays in `solve::check_libraries`.

use cudarc::{cublas::sys as cublas, cusolver::sys as cusolver};

use super::device::guarded;
use super::ptx;
use super::solve::{cublas_present, cusolver_present};

/// One CUDA library as this process sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaLibrary {
    /// Its name in reports ("NVRTC", "cuBLAS", "cuSOLVER").
    pub name: &'static str,
    /// The unversioned file name cudarc loads it by.
    pub file: &'static str,
    /// Whether it loads.
    pub present: bool,
    /// Its version, when it loads and says.
    pub version: Option<(i32, i32)>,
    /// The file the process mapped it from: cudarc tries the unversioned name first, which
    /// can find an older toolkit's library before the one the versions above came from.
    pub path: Option<String>,
}

/// NVRTC, cuBLAS and cuSOLVER, in that order. Loading a library here keeps it loaded, as the
/// backend would.
pub fn cuda_libraries() -> Vec<CudaLibrary> {
    vec![
        library("NVRTC", "libnvrtc.so", ptx::nvrtc_present, || {
            ptx::nvrtc_version().ok()
        }),
        library("cuBLAS", "libcublas.so", cublas_present, cublas_version),
        library(
            "cuSOLVER",
            "libcusolver.so",
            cusolver_present,
            cusolver_version,
        ),
    ]
}

fn library(
    name: &'static str,
    file: &'static str,
    present: fn() -> bool,
    version: fn() -> Option<(i32, i32)>,
) -> CudaLibrary {
    // Each presence check guards its own dlopen.
    let present = present();
    let version = if present {
        guarded(name, version).ok().flatten()
    } else {
        None
    };
    let path = present.then(|| mapped_from(file)).flatten();
    CudaLibrary {
        name,
        file,
        present,
        version,
        path,
    }
}

fn cublas_version() -> Option<(i32, i32)> {
    let get = |property| {
        let mut v = 0;
        // SAFETY: cublasGetProperty writes one int through a pointer valid for the call; it
        // needs no handle.
        let rc = unsafe { cublas::cublasGetProperty(property, &mut v) };
        (rc == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(v)
    };
    Some((
        get(cublas::libraryPropertyType::MAJOR_VERSION)?,
        get(cublas::libraryPropertyType::MINOR_VERSION)?,
    ))
}

fn cusolver_version() -> Option<(i32, i32)> {
    let mut v = 0;
    // SAFETY: cusolverGetVersion writes one int through a pointer valid for the call; it needs
    // no handle.
    let rc = unsafe { cusolver::cusolverGetVersion(&mut v) };
    // Encoded as major * 1000 + minor * 100 + patch.
    (rc == cusolver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS)
        .then_some((v / 1000, (v % 1000) / 100))
}

/// The file of the mapped library whose name starts with `soname` (e.g. "libcublas.so"), as
/// this process's memory map shows it.
pub fn mapped_from(soname: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(soname))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_library_is_found_by_its_soname() {
        let libc = mapped_from("libc.so").expect("every Linux process maps libc");
        assert!(libc.starts_with('/') && libc.contains("libc.so"), "{libc}");
        assert_eq!(mapped_from("libspextract-no-such-library.so"), None);
    }

    #[test]
    fn libraries_are_reported_in_order_whether_or_not_they_load() {
        let libs = cuda_libraries();
        let names: Vec<&str> = libs.iter().map(|l| l.name).collect();
        assert_eq!(names, ["NVRTC", "cuBLAS", "cuSOLVER"]);
        for l in &libs {
            // A library that does not load has neither version nor file.
            assert!(
                l.present || (l.version.is_none() && l.path.is_none()),
                "{l:?}"
            );
        }
    }
}
