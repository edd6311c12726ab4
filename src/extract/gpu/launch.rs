//! What a kernel launch passes, described once: each kernel takes one `#[repr(C)]` parameter
//! struct by value (declared with `kernel_params!` beside its launcher, mirrored in
//! `kernels/params.cuh`), and its grid, block and dynamic shared memory come from one function
//! per kernel that both the launcher and the CPU emulator call.
//!
//! The header states each struct's size and field offsets in `static_assert`s; a test here
//! reads them back and compares them with the Rust layout, and `ptx`'s ABI test checks that
//! each compiled entry point takes one parameter of the struct's size, so that a field added
//! on one side only fails a test instead of shifting what the kernel reads.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};

use super::GpuError;

/// `v` as a kernel's `int` parameter, or an error naming what it counts.
pub fn int(v: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Kernel(format!("{what}: {v} overflows a kernel's int")))
}

/// `v` as a grid dimension or a shared-memory size (CUDA's `unsigned int`).
pub fn dim(v: usize, what: &str) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::Kernel(format!("{what}: {v} overflows a launch size")))
}

/// A kernel's parameter struct: its name in `kernels/params.cuh` and its fields (name, offset,
/// size), in declaration order.
pub trait KernelParams: DeviceRepr + Copy {
    /// The struct's name, on both sides.
    const NAME: &'static str;
    /// `(field, offset, size)` of every field.
    const FIELDS: &'static [(&'static str, usize, usize)];
}

/// Declares a `#[repr(C)]` kernel parameter struct, its `DeviceRepr` and its [`KernelParams`]
/// table. Device buffers are `u64` device addresses (`CUdeviceptr`); fields are laid out
/// without implicit padding (a test checks it), so that the struct's bytes are all defined.
macro_rules! kernel_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        // SAFETY: a #[repr(C)] struct of i32, f64 and u64 fields (plain values, device
        // addresses as integers), laid out as kernels/params.cuh declares it (the layout test
        // in launch.rs compares the two), so the kernel reads each field where it was written.
        unsafe impl cudarc::driver::DeviceRepr for $name {}

        impl $crate::extract::gpu::launch::KernelParams for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [(&'static str, usize, usize)] = &[
                $((
                    stringify!($field),
                    std::mem::offset_of!($name, $field),
                    std::mem::size_of::<$ty>(),
                ),)*
            ];
        }
    };
}
pub(crate) use kernel_params;

/// The device addresses a launch passes, with the guards that record cudarc's stream-ordering
/// events (a read event for each read buffer, a write event for each written one), as
/// `.arg(&slice)` / `.arg(&mut slice)` would: the guards must outlive the launch call, so the
/// launcher drops this after it.
#[derive(Default)]
pub struct Guards<'a>(Vec<SyncOnDrop<'a>>);

impl<'a> Guards<'a> {
    /// The address of a buffer the kernel reads.
    pub fn read<T>(&mut self, buf: &'a impl DevicePtr<T>, stream: &'a CudaStream) -> u64 {
        let (ptr, guard) = buf.device_ptr(stream);
        self.0.push(guard);
        ptr
    }

    /// The address of a buffer the kernel writes (or reads and writes).
    pub fn write<T>(&mut self, buf: &'a mut impl DevicePtrMut<T>, stream: &'a CudaStream) -> u64 {
        let (ptr, guard) = buf.device_ptr_mut(stream);
        self.0.push(guard);
        ptr
    }
}

/// Every kernel parameter struct, for the layout test against `kernels/params.cuh` and the
/// ABI test against the compiled PTX: `(kernel file, entry point, struct name, size, fields)`.
#[cfg(test)]
pub(super) type Abi = (
    &'static str,
    &'static str,
    &'static str,
    usize,
    &'static [(&'static str, usize, usize)],
);

#[cfg(test)]
const fn abi<P: KernelParams>(file: &'static str, entry: &'static str) -> Abi {
    (file, entry, P::NAME, std::mem::size_of::<P>(), P::FIELDS)
}

/// The launches of every kernel file, each entry point with its parameter struct.
#[cfg(test)]
pub(super) const KERNELS: &[Abi] = &[
    abi::<super::spots::SpotsParams>("spots.cu", "spots"),
    abi::<super::normal::NormalDenseParams>("normal.cu", "normal_dense"),
    abi::<super::normal::NormalRegularizeParams>("normal.cu", "normal_regularize"),
    abi::<super::unit::UnitScatterParams>("unit.cu", "unit_scatter"),
    abi::<super::chi2::Chi2PixelsParams>("chi2.cu", "chi2_pixels"),
    abi::<super::chi2::Chi2ProjectParams>("chi2.cu", "chi2_project"),
    abi::<super::model::ModelImageParams>("chi2.cu", "model_image"),
    abi::<super::decorrelate::DecorrelateParams>("decorrelate.cu", "decorrelate"),
    abi::<super::decorrelate::DecorrelateEigenParams>("decorrelate.cu", "decorrelate_eigen"),
];

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../../../kernels/params.cuh");

    /// `(struct, field or "", value)` of every `static_assert(sizeof(S) == N` and
    /// `SPX_FIELD(S, f, N)` in the header.
    fn header_layout() -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for line in HEADER.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("static_assert(sizeof(") {
                let (s, n) = rest.split_once(") ==").expect("a size assertion");
                let n = n.trim().split(',').next().unwrap();
                // The address width is the header's premise, not a struct.
                if s != "void*" {
                    out.push((s.to_string(), String::new(), n.parse().unwrap()));
                }
            } else if let Some(rest) = line.strip_prefix("SPX_FIELD(") {
                let Some(args) = rest.strip_suffix(");") else {
                    continue; // the macro's definition
                };
                let [s, f, n] = <[&str; 3]>::try_from(args.split(", ").collect::<Vec<_>>())
                    .unwrap_or_else(|_| panic!("params.cuh: {line}"));
                out.push((s.to_string(), f.to_string(), n.parse().unwrap()));
            }
        }
        out
    }

    /// Every struct of KERNELS is stated in params.cuh with the Rust size and offsets,
    /// field for field in the same order, and nothing else is; and no struct has implicit
    /// padding (its bytes are all defined).
    #[test]
    fn the_parameter_structs_match_params_cuh() {
        let mut want = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (_, _, name, size, fields) in KERNELS {
            if !seen.insert(*name) {
                continue;
            }
            want.push((name.to_string(), String::new(), *size));
            let mut end = 0;
            for (f, off, len) in fields.iter() {
                assert_eq!(*off, end, "{name}.{f}: padding before it");
                end = off + len;
                want.push((name.to_string(), f.to_string(), *off));
            }
            assert_eq!(end, *size, "{name}: padding at its end");
            assert_eq!(size % 8, 0, "{name}: not a whole number of 8-byte words");
        }
        // Grouped by struct, each in its declaration order.
        let mut got = header_layout();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
    }
}
