//! The kernels' sources, embedded at build time, compiled with NVRTC at run time for the
//! device's architecture, and cached on disk keyed by source, architecture, options and NVRTC
//! version, so that only the first run on a machine pays the compile.
//!
//! Devices load machine code (a cubin for `sm_XY`): CUDA's minor-version compatibility lets a
//! driver load a cubin from a newer NVRTC of its major version, but not that NVRTC's PTX, and
//! machine code also spares the driver's compile at every module load. PTX (`compute_XY`) is
//! the fallback, and what the launch-ABI check (each entry point's one parameter struct,
//! `launch::KERNELS`) reads.

use std::path::{Path, PathBuf};

use super::GpuError;

/// `(file name, source)` of every `kernels/*.cu` and `*.cuh`, from build.rs.
pub const SOURCES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel files (`*.cu`), each compiled as one program.
pub fn kernel_files() -> impl Iterator<Item = &'static str> {
    SOURCES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| n.ends_with(".cu"))
}

fn source(name: &str) -> Result<&'static str, GpuError> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| GpuError::Kernel(format!("no kernel source {name} in this build")))
}

/// The source with its `#include "x.cuh"` lines replaced by the embedded headers, so that
/// NVRTC needs no include path at run time (and the CPU emulation tests, `emu`, compile the
/// same text).
pub(super) fn expanded(name: &str) -> Result<String, GpuError> {
    let mut out = String::new();
    for line in source(name)?.lines() {
        let inc = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'));
        match inc {
            Some(h) => {
                out += &expanded(h)?;
                out.push('\n');
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// FNV-1a, 64 bits: stable across builds and toolchains, unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where compiled PTX is kept: `$SPEXTRACT_PTX_CACHE`, else `$XDG_CACHE_HOME/spextract/ptx`,
/// else `~/.cache/spextract/ptx`; None when none can be named.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SPEXTRACT_PTX_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("spextract").join("ptx"))
}

/// What NVRTC writes for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Machine code for the device's architecture (`sm_XY`).
    Cubin,
    /// PTX for `compute_XY`, compiled by the driver when the module loads.
    Ptx,
}

impl Target {
    fn extension(self) -> &'static str {
        match self {
            Target::Cubin => "cubin",
            Target::Ptx => "ptx",
        }
    }
}

/// NVRTC's options for a device of compute capability `arch`.
fn options(arch: (i32, i32), target: Target) -> Vec<String> {
    let virt = match target {
        Target::Cubin => "sm",
        Target::Ptx => "compute",
    };
    vec![
        format!("--gpu-architecture={virt}_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        // The extraction is specified in f64 with IEEE division and square roots.
        "--fmad=true".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
    ]
}

/// Whether the NVRTC library can be loaded (cudarc panics on a missing library).
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library by its known names.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// [`nvrtc_present`], as an error that says what is missing.
pub fn require_nvrtc() -> Result<(), GpuError> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(GpuError::Library(
            "NVRTC (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH; it compiles the \
             GPU kernels"
                .into(),
        ))
    }
}

pub(super) fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through pointers to these live locals; the library
    // was found loadable by `nvrtc_present` and catch_unwind guards a missing symbol.
    let rc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
    }))
    .map_err(|_| GpuError::Library("NVRTC (libnvrtc) could not be loaded".into()))?;
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(GpuError::Library(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// The PTX of kernel file `name` for `arch`, from the cache or compiled now (and cached).
pub fn ptx(name: &str, arch: (i32, i32)) -> Result<String, GpuError> {
    ptx_in(name, arch, cache_dir().as_deref())
}

/// [`ptx`] with the cache in `cache` (None: no cache).
pub fn ptx_in(name: &str, arch: (i32, i32), cache: Option<&Path>) -> Result<String, GpuError> {
    let bytes = compiled_in(name, arch, cache, Target::Ptx)?;
    String::from_utf8(bytes)
        .map_err(|_| GpuError::Kernel(format!("NVRTC wrote PTX for {name} that is not text")))
}

/// The machine code (cubin) of kernel file `name` for `arch`, from the cache or compiled now.
pub fn cubin(name: &str, arch: (i32, i32)) -> Result<Vec<u8>, GpuError> {
    compiled_in(name, arch, cache_dir().as_deref(), Target::Cubin)
}

/// Kernel file `name` compiled for `arch` as `target`, with the cache in `cache` (None: no
/// cache).
pub fn compiled_in(
    name: &str,
    arch: (i32, i32),
    cache: Option<&Path>,
    target: Target,
) -> Result<Vec<u8>, GpuError> {
    require_nvrtc()?;
    let src = expanded(name)?;
    let opts = options(arch, target);
    let (vmaj, vmin) = nvrtc_version()?;
    let key = fnv1a(&[
        src.as_bytes(),
        opts.join(" ").as_bytes(),
        format!("nvrtc {vmaj}.{vmin}").as_bytes(),
    ]);
    let stem = name.trim_end_matches(".cu");
    let file = cache.map(|d| {
        d.join(format!(
            "{stem}-sm{}{}-{key:016x}.{}",
            arch.0,
            arch.1,
            target.extension()
        ))
    });
    if let Some(bytes) = file.as_deref().and_then(|f| std::fs::read(f).ok()) {
        return Ok(bytes);
    }
    let compiled = compile(name, &src, &opts, target)?;
    if let Some(f) = &file {
        // A cache that cannot be written only costs the next run a compile.
        let _ = store(f, &compiled);
    }
    Ok(compiled)
}

fn compile(name: &str, src: &str, opts: &[String], target: Target) -> Result<Vec<u8>, GpuError> {
    use cudarc::nvrtc::{result, sys};
    let fail = |what: String| GpuError::Kernel(format!("NVRTC could not compile {name}: {what}"));
    let c_src = std::ffi::CString::new(src).map_err(|_| fail("a NUL byte in the source".into()))?;
    let c_name = std::ffi::CString::new(name).map_err(|_| fail("a NUL byte in the name".into()))?;
    let run = || -> Result<Vec<u8>, GpuError> {
        let nvrtc = |source, detail| GpuError::Nvrtc {
            context: format!("NVRTC could not compile {name}"),
            source,
            detail,
        };
        let prog =
            result::create_program(&c_src, Some(&c_name)).map_err(|e| nvrtc(e, String::new()))?;
        // SAFETY: `prog` was created just above from `c_src` and `c_name`, which outlive it, and
        // is destroyed once, at the end of this block; the output buffers are sized by the
        // matching Size call before NVRTC writes into them.
        unsafe {
            let out = result::compile_program(prog, opts).and_then(|()| match target {
                Target::Ptx => result::get_ptx(prog).map(|t| {
                    let bytes: Vec<u8> = t.iter().map(|&c| c as u8).collect();
                    // NVRTC's size counts the terminating NUL.
                    bytes.split(|&b| b == 0).next().unwrap_or(&[]).to_vec()
                }),
                Target::Cubin => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
                    let mut bin = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast()).result()?;
                    Ok(bin)
                }
            });
            let out = out.map_err(|e| {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let b: Vec<u8> = l
                            .iter()
                            .take_while(|&&c| c != 0)
                            .map(|&c| c as u8)
                            .collect();
                        String::from_utf8_lossy(&b).into_owned()
                    })
                    .unwrap_or_default();
                nvrtc(
                    e,
                    format!(
                        " (options {}){}{log}",
                        opts.join(" "),
                        if log.is_empty() { "" } else { ":\n" }
                    ),
                )
            });
            let _ = result::destroy_program(prog);
            out
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .map_err(|_| GpuError::Library("NVRTC could not be loaded".into()))?
}

fn store(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::super::launch::KERNELS;
    use super::*;

    #[test]
    fn every_kernel_is_embedded_with_its_headers_expanded() {
        let files: Vec<_> = kernel_files().collect();
        assert!(!files.is_empty(), "kernels/*.cu are embedded by build.rs");
        for f in files {
            let src = expanded(f).unwrap();
            assert!(
                !src.contains("#include \""),
                "{f}: an include was left unexpanded"
            );
            assert!(
                src.contains("extern \"C\" __global__"),
                "{f}: no kernel entry point"
            );
        }
    }

    #[test]
    fn the_cache_key_changes_with_source_and_architecture() {
        let a = fnv1a(&[b"src", b"compute_90"]);
        assert_ne!(a, fnv1a(&[b"src", b"compute_80"]));
        assert_ne!(a, fnv1a(&[b"src2", b"compute_90"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    /// Whether libnvrtc loads; if not, says the test skips (and fails it where
    /// SPEXTRACT_REQUIRE_NVRTC is set, as scripts/check-kernels.sh does, so that there a
    /// missing NVRTC is an error).
    fn nvrtc_or_skip() -> bool {
        if nvrtc_present() {
            return true;
        }
        assert!(
            std::env::var_os("SPEXTRACT_REQUIRE_NVRTC").is_none(),
            "SPEXTRACT_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
        );
        eprintln!("skipping: libnvrtc not loadable (scripts/check-kernels.sh sets it up)");
        false
    }

    /// Compiles every kernel through the same path the GPU backend takes, when libnvrtc can be
    /// loaded (no GPU needed: CI points LD_LIBRARY_PATH at the nvidia-cuda-nvrtc wheel).
    #[test]
    fn every_kernel_compiles_with_nvrtc_when_present() {
        if !nvrtc_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for f in kernel_files() {
            let text = ptx_in(f, (9, 0), Some(dir.path())).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(
                text.contains(".version 9.0") || text.contains(".version"),
                "{f}"
            );
            assert!(text.contains(".entry"), "{f}: PTX without an entry point");
            // The second call is served from the cache.
            let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(!cached.is_empty());
            assert_eq!(ptx_in(f, (9, 0), Some(dir.path())).unwrap(), text);
        }
    }

    /// The machine code devices load: an ELF image for sm_90, cached beside the PTX under a
    /// key of its own.
    #[test]
    fn every_kernel_compiles_to_machine_code_when_nvrtc_is_present() {
        if !nvrtc_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for f in kernel_files() {
            let bin = compiled_in(f, (9, 0), Some(dir.path()), Target::Cubin)
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(&bin[..4], b"\x7fELF", "{f}: not an ELF cubin");
            let ptx = compiled_in(f, (9, 0), Some(dir.path()), Target::Ptx).unwrap();
            assert_ne!(bin, ptx, "{f}: the PTX was served for the cubin");
            assert_eq!(
                compiled_in(f, (9, 0), Some(dir.path()), Target::Cubin).unwrap(),
                bin,
                "{f}: the cached cubin differs"
            );
        }
    }

    /// The parameter declarations of entry `name` in `ptx`, or None when there is no such
    /// entry.
    fn entry_params(ptx: &str, name: &str) -> Option<Vec<String>> {
        let head = format!(".entry {name}(");
        let start = ptx.find(&head)? + head.len();
        let end = start + ptx[start..].find(')')?;
        let params = ptx[start..end]
            .split(',')
            .filter(|p| p.contains(".param"))
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        Some(params)
    }

    /// The size of a by-value struct parameter, `.param .align 8 .b8 name[SIZE]`.
    fn struct_size(param: &str) -> Option<usize> {
        let rest = param.strip_prefix(".param .align 8 .b8 ")?;
        let (_, size) = rest.strip_suffix(']')?.split_once('[')?;
        size.parse().ok()
    }

    #[test]
    fn entry_params_reads_ptx_parameter_lists() {
        let ptx = ".visible .entry k(\n\t.param .u32 k_param_0,\n\t.param .f64 k_param_1,\n\t\
                   .param .u64 .ptr .global .align 8 k_param_2\n)\n{";
        let params = entry_params(ptx, "k").unwrap();
        assert_eq!(params.len(), 3);
        assert_eq!(params[2], ".param .u64 .ptr .global .align 8 k_param_2");
        assert!(params.iter().all(|p| struct_size(p).is_none()));
        assert_eq!(entry_params(ptx, "other"), None);
        let ptx = ".visible .entry s(\n\t.param .align 8 .b8 s_param_0[128]\n)\n{";
        let params = entry_params(ptx, "s").unwrap();
        assert_eq!(params.len(), 1);
        assert_eq!(struct_size(&params[0]), Some(128));
        assert_eq!(struct_size(".param .u64 s_param_0"), None);
    }

    /// Each kernel's compiled parameter list is what its launcher passes, one struct of its
    /// parameter struct's size (launch::KERNELS), and every entry point of every file is in
    /// the table.
    #[test]
    fn every_kernel_takes_the_arguments_its_launcher_passes() {
        if !nvrtc_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for f in kernel_files() {
            let text = ptx_in(f, (9, 0), Some(dir.path())).unwrap_or_else(|e| panic!("{f}: {e}"));
            let entries = text.matches(".entry ").count();
            let listed = KERNELS.iter().filter(|k| k.0 == f);
            assert_eq!(
                entries,
                listed.clone().count(),
                "{f}: {entries} entry points, {} in launch::KERNELS",
                listed.count()
            );
            for (_, name, ty, size, _) in listed {
                let got = entry_params(&text, name)
                    .unwrap_or_else(|| panic!("{f}: no entry point {name}"));
                let sizes: Vec<_> = got.iter().map(|p| struct_size(p)).collect();
                assert_eq!(
                    sizes,
                    [Some(*size)],
                    "{f}: {name} takes {got:?}, its launcher one {ty} of {size} bytes"
                );
            }
        }
    }
}
