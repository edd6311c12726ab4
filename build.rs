//! Build script. CUDA kernels (kernels/*.cu, added with the GPU backend) are embedded and
//! compile-checked here when a CUDA compiler is present; for now it only tracks the folder.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
}
