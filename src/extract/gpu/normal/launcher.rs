//! The launcher of normal.cu: its [`Kernels`], the kernels' parameter structs (mirrored in
//! `kernels/params.cuh`), their launch configs ([`dense_config`], [`regularize_config`]) and
//! [`build_into`]. Imports the parent's errors, `buffers`, `layout`, `gpu::launch` and
//! `gpu::device`.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::buffers::{DenseBatch, LayoutBuffers};
use super::{bad, cuda};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::launch::{self, kernel_params, Guards};
use crate::extract::gpu::GpuError;

/// Threads per block of `normal_dense`: a column of 518 rows takes five strides; more threads
/// would idle on the ~89 % of rows that do not overlap column u's spot.
pub const DENSE_THREADS: u32 = 128;
/// Threads per block of `normal_regularize`; must equal `REG_THREADS` in kernels/normal.cu
/// (its shared reduction array has that size and its tree needs a power of two).
pub const REG_THREADS: u32 = 256;
/// The dynamic shared memory a block may take without opting in (spot u is staged there).
const MAX_DYNAMIC_SMEM: usize = 48 * 1024;
/// `gridDim.y` (the patch index of `normal_dense`) is limited to 65535 by the hardware.
const MAX_GRID_Y: usize = 65_535;

/// The two kernels of normal.cu, loaded once and reused batch after batch.
pub struct Kernels {
    dense: CudaFunction,
    regularize: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the PTX cache) and loads normal.cu on `gpu`.
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("normal.cu")?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| GpuError::Kernel(format!("normal.cu has no {name}: {e:?}")))
        };
        Ok(Kernels {
            dense: get("normal_dense")?,
            regularize: get("normal_regularize")?,
        })
    }
}

kernel_params! {
    /// `normal_dense`'s parameters (kernels/params.cuh): sizes, then the device addresses of
    /// the batch layout it reads and of AᵀWA, AᵀWp and AᵀW1, which it writes.
    pub struct NormalDenseParams {
        pub nmax: i32,
        pub ny: i32,
        pub nx: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub patch: u64,
        pub win_off: u64,
        pub pix: u64,
        pub ivar: u64,
        pub spots: u64,
        pub spot_off: u64,
        pub geom: u64,
        pub ata: u64,
        pub atp: u64,
        pub atw1: u64,
    }
}

kernel_params! {
    /// `normal_regularize`'s parameters (kernels/params.cuh): nmax, the patches and AᵀW1 it
    /// reads, the regularisation constants, and AᵀWA, whose diagonal it writes.
    pub struct NormalRegularizeParams {
        pub nmax: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub patch: u64,
        pub atw1: u64,
        pub regularize: f64,
        pub epsilon: f64,
        pub ata: u64,
    }
}

/// `normal_dense`'s launch: a block of [`DENSE_THREADS`] per unknown slot and patch, with an
/// `ny × nx` spot of doubles in dynamic shared memory.
pub fn dense_config(
    npatch: usize,
    nmax: usize,
    ny: usize,
    nx: usize,
) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (
            launch::dim(nmax, "unknowns")?,
            launch::dim(npatch, "patches")?,
            1,
        ),
        block_dim: (DENSE_THREADS, 1, 1),
        shared_mem_bytes: launch::dim(ny * nx * std::mem::size_of::<f64>(), "shared memory")?,
    })
}

/// `normal_regularize`'s launch: a block of exactly [`REG_THREADS`] (its static reduction
/// array's size) per patch.
pub fn regularize_config(npatch: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (launch::dim(npatch, "patches")?, 1, 1),
        block_dim: (REG_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The normal equations of an uploaded layout into existing buffers (a pipeline reuses them from batch
/// to batch).
pub fn build_into(
    gpu: &Gpu,
    kernels: &Kernels,
    buf: &LayoutBuffers<'_>,
    regularize: f64,
    epsilon: f64,
    out: &mut DenseBatch,
) -> Result<(), GpuError> {
    let (npatch, nmax) = (buf.npatch, buf.nmax);
    if out.npatch != npatch
        || out.nmax != nmax
        || out.ata.len() != npatch * nmax * nmax
        || out.atp.len() != npatch * nmax
        || out.atw1.len() != npatch * nmax
    {
        return Err(bad(format!(
            "output buffers for {} patches of {} unknowns, layout of {npatch} × {nmax}",
            out.npatch, out.nmax
        )));
    }
    if npatch > MAX_GRID_Y {
        return Err(bad(format!(
            "{npatch} patches, at most {MAX_GRID_Y} per launch"
        )));
    }
    let smem = buf.ny * buf.nx * std::mem::size_of::<f64>();
    if smem > MAX_DYNAMIC_SMEM {
        return Err(bad(format!(
            "a {}×{} spot needs {smem} bytes of shared memory, over {MAX_DYNAMIC_SMEM}",
            buf.ny, buf.nx
        )));
    }
    out.n = buf.n.clone();
    let st = &gpu.stream;
    let (nmax_i, ny_i, nx_i) = (
        launch::int(nmax, "unknowns")?,
        launch::int(buf.ny, "spot height")?,
        launch::int(buf.nx, "spot width")?,
    );

    let cfg = dense_config(npatch, nmax, buf.ny, buf.nx)?;
    debug_assert_eq!(cfg.shared_mem_bytes as usize, smem);
    let mut g = Guards::default();
    let args = NormalDenseParams {
        nmax: nmax_i,
        ny: ny_i,
        nx: nx_i,
        pad0: 0,
        patch: g.read(buf.patch, st),
        win_off: g.read(buf.win_off, st),
        pix: g.read(buf.pix, st),
        ivar: g.read(buf.ivar, st),
        spots: g.read(buf.spots, st),
        spot_off: g.read(buf.spot_off, st),
        geom: g.read(buf.geom, st),
        ata: g.write(&mut out.ata, st),
        atp: g.write(&mut out.atp, st),
        atw1: g.write(&mut out.atw1, st),
    };
    let mut launch = st.launch_builder(&kernels.dense);
    launch.arg(&args);
    // SAFETY: NormalDenseParams is normal_dense's one parameter (kernels/params.cuh, layout
    // tested), its addresses those of live buffers whose guards (`g`) outlive the launch:
    // int nmax, ny, nx (i32); patch
    // (i32 × 4 per patch, read as int4: device allocations are 256-byte aligned), win_off
    // (i64 = long long), pix, ivar, spots (f64), spot_off (i64), geom (i32 × 4 per unknown,
    // int4); ata, atp, atw1 (f64, written). Bounds: the grid is (nmax, npatch) and every block
    // reads patch[b] < npatch, slots b·nmax + u < npatch·nmax of spot_off/geom and writes
    // column (b·nmax + u) of ata (length nmax) and slot b·nmax + u of atp/atw1, sizes checked
    // above. LayoutBuffers' contract: each spot offset + ny·nx ≤ spots.len(), and every pixel
    // read (rows clamped to the window by iy0/iy1, columns inside it by the col0 check) lies in
    // its window at win_off with rows ld apart, inside pix/ivar. Shared memory: ny·nx doubles,
    // passed as smem.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching normal_dense"))?;
    // The guards record the events of normal_dense's launch before normal_regularize's are
    // taken.
    drop(g);

    let mut g = Guards::default();
    let args = NormalRegularizeParams {
        nmax: nmax_i,
        pad0: 0,
        patch: g.read(buf.patch, st),
        atw1: g.read(&out.atw1, st),
        regularize,
        epsilon,
        ata: g.write(&mut out.ata, st),
    };
    let mut launch = st.launch_builder(&kernels.regularize);
    launch.arg(&args);
    let cfg = regularize_config(npatch)?;
    // SAFETY: NormalRegularizeParams is normal_regularize's one parameter (kernels/params.cuh,
    // layout tested), its addresses those of live buffers whose guards (`g`) outlive the
    // launch: int nmax (i32), patch
    // (int4, aligned as above), atw1 (f64, read), regularize and epsilon (f64 by value), ata
    // (f64, written). One block per patch b < npatch with exactly REG_THREADS threads, the size
    // of the kernel's static reduction array; it touches atw1[b·nmax + u] and the diagonal
    // (b·nmax + u)·nmax + u for u < n_b ≤ nmax, inside the buffers checked above. Same stream
    // as normal_dense, so it runs after the AᵀW1 it reads is written.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching normal_regularize"))?;
    drop(g);
    Ok(())
}
