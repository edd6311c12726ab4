//! Build script: embeds the CUDA kernels (`kernels/*.cu`, with the `.cuh` headers they include)
//! into the binary, so that it compiles them with NVRTC at run time for the GPU it finds; and
//! compile-checks them with `nvcc` when one is on the PATH. Without nvcc the check is left to
//! `scripts/check-kernels.sh` (NVRTC from a wheel, which CI runs).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")));
    files.sort();
    let mut out = String::from("&[\n");
    for f in &files {
        println!("cargo::rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        out += &format!(
            "    ({name:?}, include_str!({:?})),\n",
            f.display().to_string()
        );
    }
    out += "]\n";
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.rs");
    std::fs::write(&dest, out).expect("writing the kernel table");

    if std::env::var_os("SPEXTRACT_SKIP_NVCC").is_none() && nvcc_available() {
        for f in files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        {
            let status = Command::new("nvcc")
                .args([
                    "--ptx",
                    "-std=c++17",
                    "-arch=compute_90",
                    "-o",
                    "/dev/null",
                    "-I",
                ])
                .arg(&dir)
                .arg(f)
                .status();
            match status {
                Ok(s) if s.success() => {}
                Ok(_) => panic!(
                    "nvcc could not compile {} (see its messages above)",
                    f.display()
                ),
                Err(e) => println!("cargo::warning=nvcc did not run on {}: {e}", f.display()),
            }
        }
    }
}

fn nvcc_available() -> bool {
    Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
