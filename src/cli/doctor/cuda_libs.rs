//! The CUDA libraries the GPU backend loads (NVRTC, cuBLAS, cuSOLVER): which load, their
//! versions and files, and an NVRTC newer than the driver, whose kernels would not load. The
//! facts are `extract::gpu::facts`'s; this file imports that and the findings type only.

use super::Finding;

/// A CUDA library as this process sees it.
pub(super) use crate::extract::gpu::facts::CudaLibrary as CudaLib;

/// Findings on the CUDA libraries, judged against the driver's CUDA version.
pub(super) fn cuda_lib_findings(libs: &[CudaLib], driver: Option<(i32, i32)>) -> Vec<Finding> {
    let mut out = Vec::new();
    let present: Vec<String> = libs
        .iter()
        .filter(|l| l.present)
        .map(|l| {
            let v = match l.version {
                Some((a, b)) => format!("{} {a}.{b}", l.name),
                None => format!("{} (version unreadable)", l.name),
            };
            match &l.path {
                Some(p) => format!("{v} from {p}"),
                None => v,
            }
        })
        .collect();
    if !present.is_empty() {
        out.push(Finding::ok(
            "cuda-libs",
            format!("loaded: {}", present.join(", ")),
        ));
    }
    for l in libs.iter().filter(|l| !l.present) {
        out.push(Finding::warn(
            "cuda-libs",
            format!(
                "{} ({}) does not load (missing, or a library it needs is): the GPU backend \
                 cannot start",
                l.name, l.file
            ),
            "load the CUDA toolkit module, or add its lib64 folder to LD_LIBRARY_PATH",
        ));
    }
    // NVRTC writes machine code and PTX of its own CUDA version. A driver of the same major
    // version loads the machine code (minor-version compatibility); an older major loads
    // neither.
    let nvrtc = libs
        .iter()
        .find(|l| l.name == "NVRTC" && l.present)
        .and_then(|l| l.version);
    if let (Some(n), Some(d)) = (nvrtc, driver) {
        if n.0 > d.0 {
            out.push(Finding::warn(
                "cuda-libs",
                format!(
                    "NVRTC {}.{} is newer than the driver's CUDA {}.{}: the kernels it compiles \
                     will not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION)",
                    n.0, n.1, d.0, d.1
                ),
                "put an NVRTC no newer than the driver first in LD_LIBRARY_PATH, or update the \
                 driver",
            ));
        }
    }
    out
}

/// A library for the tests of the GPU findings, of the given presence and version.
#[cfg(test)]
pub(super) fn lib(name: &'static str, present: bool, version: (i32, i32)) -> CudaLib {
    CudaLib {
        name,
        file: "libx.so",
        present,
        version: present.then_some(version),
        path: None,
    }
}
