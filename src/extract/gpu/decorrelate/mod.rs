//! Decorrelation on the GPU (`kernels/decorrelate.cu`): per core fiber of each patch, the
//! inverse square root of its covariance block `C_ff` by symmetric Jacobi, then `s`, `R = Q/s`,
//! the flux `R·x_f`, `fluxivar = s²` and the resolution diagonals, as `cpu::decorrelate`'s
//! `block_inverse_sqrt` and the readout of `cpu::solve` do with LAPACK's dsyevd.
//!
//! Two routes to each block's eigenpairs ([`EigenRoute`]). The backend takes cuSOLVER's
//! `XsyevBatched` on the solve's covariance slots, in place, followed by the readout kernel
//! `decorrelate_eigen` ([`decorrelate_by_syev`]): 1.9x faster than the alternative on an H200.
//! The alternative, for a cuSOLVER without `XsyevBatched` (`syevjBatched` stops at 32×32 and
//! the blocks are 74×74), is a kernel of our own, `decorrelate`: one thread block per `C_ff`,
//! the matrix and its eigenvectors in shared memory, a parallel cyclic Jacobi in the
//! round-robin ordering started from the DCT-II basis ([`dct_basis`]), which nearly
//! diagonalises these near-Toeplitz blocks (the algorithm, the thread mapping and the shared
//! memory are documented at the top of the kernel file). Both kernels end in the same readout.
//!
//! [`DecorrLayout::new`] flattens a batch's [`Block`]s into the kernels' parameter arrays; the
//! launchers and the host twins (`twins::decorrelate`: the Jacobi kernel's algorithm and the
//! readout, meant to be bit-identical to the kernels') take their inputs from it. Keep the
//! kernel, the layout and the twin in step. Imports `device`, `solve` and the crate's `patch`
//! types.
//!
//! The covariance blocks and the solutions are taken as [`CudaSlice`]s with per-block offsets
//! and leading dimension, so that the previous stage's output (e.g. the fiber blocks inside a
//! dense inverse, leading dimension `nmax`) feeds the kernel in place, without a copy.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::launch::{self, kernel_params, Guards};

use super::device::Gpu;
use super::solve::{EigenBatch, Solver};
use super::GpuError;
use crate::patch::Patch;

/// Threads per block; must equal `DECORR_THREADS` in the kernel (its `__launch_bounds__`).
pub const THREADS: u32 = 256;
/// Jacobi sweeps allowed before a block is reported [`Status::NotConverged`]. A whole bundle of
/// the real PSF's blocks takes 6–9 (twin, random pixels with masked rows), the toy PSF's up
/// to 12; 20 leaves room for harder ones (each sweep past convergence squares the residual).
pub const MAX_SWEEPS: u32 = 20;
/// Parameters per block in the flattened `params` array.
pub(super) const NPARAM: usize = 8;

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("decorrelate.cu cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("decorrelation: {what}"), e)
}

/// Where the decorrelation takes each block's eigenpairs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EigenRoute {
    /// This crate's Jacobi kernel (`decorrelate`): eigenpairs and readout in one launch.
    Jacobi,
    /// cuSOLVER's `XsyevBatched` on the solve's covariance slots, in place, then the readout
    /// kernel (`decorrelate_eigen`).
    Syev,
}

impl EigenRoute {
    /// The route the backend takes where cuSOLVER has `XsyevBatched`: the faster of the two
    /// on an H200 at the real size (`spextract bench`'s library choices; BENCHMARKS.md).
    pub const PREFERRED: EigenRoute = EigenRoute::Syev;

    /// The other route.
    pub fn other(self) -> EigenRoute {
        match self {
            EigenRoute::Jacobi => EigenRoute::Syev,
            EigenRoute::Syev => EigenRoute::Jacobi,
        }
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            EigenRoute::Jacobi => "Jacobi kernel",
            EigenRoute::Syev => "XsyevBatched + readout kernel",
        }
    }
}

/// What happened to one block (`status[b]` of the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Decorrelated.
    Ok,
    /// A non-finite entry in the lower triangle of `C_ff`.
    NonfiniteInput,
    /// An eigenvalue not positive or not finite: the CPU's `DecorrFailure::BadCovariance`.
    BadEigenvalue,
    /// The Jacobi did not converge within the sweeps allowed (no CPU counterpart: dsyevd has
    /// no such limit; the backend should treat it as a failed patch).
    NotConverged,
    /// A kept bin's flux or fluxivar is not finite: the check after which `cpu::solve` gives
    /// up on the attempt. Unlike the other failures, the outputs are left as computed.
    NonfiniteOutput,
}

impl Status {
    /// The kernel's code (`DECORR_*` in the kernel).
    pub fn code(self) -> i32 {
        match self {
            Status::Ok => 0,
            Status::NonfiniteInput => 1,
            Status::BadEigenvalue => 2,
            Status::NotConverged => 3,
            Status::NonfiniteOutput => 4,
        }
    }

    /// The status of code `c`, None for a code the kernel never writes.
    pub fn from_code(c: i32) -> Option<Status> {
        [
            Status::Ok,
            Status::NonfiniteInput,
            Status::BadEigenvalue,
            Status::NotConverged,
            Status::NonfiniteOutput,
        ]
        .into_iter()
        .find(|s| s.code() == c)
    }
}

/// One covariance block to decorrelate and where its inputs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Size of `C_ff` (the patch's `nwavetot`).
    pub n: usize,
    /// Offset of `C_ff[0, 0]` in the covariance buffer.
    pub cov_off: usize,
    /// Leading dimension: `C_ff[i, j]` is at `cov_off + j·cov_ld + i` (only `i ≥ j` is read).
    pub cov_ld: usize,
    /// Offset of the fiber's first unknown in the solution buffer (`n` consecutive values).
    pub x_off: usize,
    /// First row of `Q` needed (`wavepad - ndiag` on the CPU).
    pub row_lo: usize,
    /// One past the last row needed.
    pub row_hi: usize,
    /// Padding bins below the core.
    pub wavepad: usize,
    /// Core bins: flux and fluxivar are produced for all of them (the model image needs them).
    pub nstep: usize,
    /// Core bins kept in the output: the resolution is produced for these.
    pub nkeep: usize,
    /// Half-width of the resolution band.
    pub ndiag: usize,
}

impl Block {
    /// Core fiber `core` (0-based among the patch's core fibers) of `p`, with `cpu::solve`'s
    /// rows and bins; `x_patch` is the offset of the patch's fiber-major solution
    /// (`u = f·nwavetot + w`) in the solution buffer.
    pub fn for_patch(
        p: &Patch,
        ndiag: usize,
        core: usize,
        cov_off: usize,
        cov_ld: usize,
        x_patch: usize,
    ) -> Block {
        let nwt = p.nwavetot;
        let nstep = nwt.saturating_sub(2 * p.wavepad);
        Block {
            n: nwt,
            cov_off,
            cov_ld,
            x_off: x_patch + (p.core_fiber_offset() + core) * nwt,
            row_lo: p.wavepad.saturating_sub(ndiag),
            row_hi: (p.wavepad + nstep + ndiag).min(nwt),
            wavepad: p.wavepad,
            nstep,
            nkeep: p.nwave_keep,
            ndiag,
        }
    }
}

/// A batch of blocks flattened into the kernel's arrays (host-side; see the kernel's header).
#[derive(Debug, Clone)]
pub struct DecorrLayout {
    /// Blocks.
    pub nblock: usize,
    /// The shared-memory size parameter: the largest block size rounded up to even.
    pub ld: usize,
    /// Output columns per block: the largest `nstep`.
    pub ncol: usize,
    /// Resolution rows per block: the largest `2·ndiag + 1`.
    pub nd2: usize,
    /// `{n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag}` per block.
    pub params: Vec<i32>,
    /// `{cov_off, x_off, basis_off}` per block.
    pub offs: Vec<i64>,
    /// The starting bases of the Jacobi: [`dct_basis`] of each distinct block size, once.
    pub basis: Vec<f64>,
    /// The covariance buffer must hold at least this many values.
    pub cov_need: usize,
    /// The solution buffer must hold at least this many values.
    pub x_need: usize,
}

/// Bytes of dynamic shared memory for size parameter `ld` (even): A and V (`ld²` doubles each),
/// cos, sin, tan of `ld/2` rotations, an `ld`-double work vector, then `ld/2` p's and q's.
pub fn smem_bytes(ld: usize) -> usize {
    8 * (2 * ld * ld + 3 * (ld / 2) + ld) + 4 * 2 * (ld / 2)
}

impl DecorrLayout {
    /// Flattens `blocks`, refusing what the kernel cannot index: an empty batch, an empty or
    /// oversized block, rows that do not cover the bins read, sizes beyond `i32`.
    pub fn new(blocks: &[Block]) -> Result<DecorrLayout, GpuError> {
        if blocks.is_empty() {
            return Err(bad("the batch is empty".into()));
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        let mut out = DecorrLayout {
            nblock: blocks.len(),
            ld: 0,
            ncol: 0,
            nd2: 0,
            params: Vec::with_capacity(NPARAM * blocks.len()),
            offs: Vec::with_capacity(3 * blocks.len()),
            basis: Vec::new(),
            cov_need: 0,
            x_need: 0,
        };
        let mut basis_at: std::collections::HashMap<usize, usize> = Default::default();
        for (b, k) in blocks.iter().enumerate() {
            let fail = |what: &str| Err(bad(format!("block {b}: {what} ({k:?})")));
            if k.n == 0 || k.cov_ld < k.n {
                return fail("empty, or leading dimension below its size");
            }
            // The rows read: wavepad - ndiag .. wavepad + nkeep + ndiag for the resolution,
            // wavepad .. wavepad + nstep for the flux (cpu::solve needs wavepad ≥ ndiag too).
            if k.ndiag > k.wavepad
                || k.row_lo > k.wavepad - k.ndiag
                || k.nkeep > k.nstep
                || k.row_hi < k.wavepad + k.nstep.max(k.nkeep + k.ndiag)
                || k.row_hi > k.n
            {
                return fail("rows row_lo..row_hi do not cover the bins read, or exceed n");
            }
            let m = k.n + (k.n & 1);
            // Offsets and products formed in the kernel: m², ld², j·cov_ld, 2·ndiag + 1.
            if !fits(k.cov_ld) || !fits(smem_bytes(m)) || !fits(2 * k.ndiag + 1) {
                return fail("sizes overflow i32");
            }
            out.ld = out.ld.max(m);
            out.ncol = out.ncol.max(k.nstep);
            out.nd2 = out.nd2.max(2 * k.ndiag + 1);
            let cov_end = k.cov_off + (k.n - 1) * k.cov_ld + k.n;
            out.cov_need = out.cov_need.max(cov_end);
            out.x_need = out.x_need.max(k.x_off + k.n);
            for v in [
                k.n, k.cov_ld, k.row_lo, k.row_hi, k.wavepad, k.nstep, k.nkeep, k.ndiag,
            ] {
                out.params.push(launch::int(v, "a block's size")?);
            }
            let off = |v: usize| i64::try_from(v).map_err(|_| bad(format!("block {b}: offset")));
            out.offs.push(off(k.cov_off)?);
            out.offs.push(off(k.x_off)?);
            let basis_off = *basis_at.entry(k.n).or_insert_with(|| {
                let at = out.basis.len();
                out.basis.extend(dct_basis(k.n));
                at
            });
            out.offs.push(off(basis_off)?);
        }
        // The output arrays are indexed with 64-bit products in the kernel; the per-block
        // extents (ncol, nd2·ncol) are ints.
        if out.ncol == 0 || !fits(out.nd2 * out.ncol) || !fits(out.nblock) {
            return Err(bad(format!(
                "{} blocks of {} columns × {} diagonals",
                out.nblock, out.ncol, out.nd2
            )));
        }
        Ok(out)
    }

    /// For the eigen route: the side `l` of the covariance slots and how many slots the
    /// blocks reach, when every block's `cov_ld` is `l` and its `cov_off` a whole number of
    /// `l × l` slots (the solve's layout, which `decorrelate_eigen` indexes eigenvalues by).
    pub fn slots(&self) -> Result<(usize, usize), GpuError> {
        // params[NPARAM·b + 1] is block b's cov_ld, offs[3b] its cov_off (`new`).
        let cov_ld = |b: usize| self.params[NPARAM * b + 1] as usize;
        // Offsets were made from usizes (`new`): they convert back.
        let cov_off = |b: usize| usize::try_from(self.offs[3 * b]).unwrap_or(usize::MAX);
        let l = cov_ld(0);
        let mut need = 0;
        for b in 0..self.nblock {
            let (ld, off) = (cov_ld(b), cov_off(b));
            if ld != l || !off.is_multiple_of(l * l) {
                return Err(bad(format!(
                    "block {b} is not a {l} × {l} slot (offset {off}, leading dimension {ld})"
                )));
            }
            need = need.max(off / (l * l) + 1);
        }
        Ok((l, need))
    }

    /// Dynamic shared memory of a launch.
    pub fn smem_bytes(&self) -> usize {
        smem_bytes(self.ld)
    }
}

/// A batch's results on the host (the backend's downloads, or the twins').
#[derive(Debug, Clone)]
pub struct HostDecorr {
    /// Blocks.
    pub nblock: usize,
    /// Columns per block.
    pub ncol: usize,
    /// Resolution rows per block.
    pub nd2: usize,
    /// `[nblock·ncol]`: flux of core bin `j < nstep`, 0 beyond.
    pub flux: Vec<f64>,
    /// `[nblock·ncol]`: `s²` of core bin `j < nstep`, 0 beyond.
    pub fluxivar: Vec<f64>,
    /// `[nblock·nd2·ncol]`: `Rdiag[k, j]` for `k ≤ 2·ndiag`, `j < nkeep`, 0 elsewhere.
    pub resolution: Vec<f64>,
    /// Kernel status codes ([`Status::from_code`]).
    pub status: Vec<i32>,
    /// Jacobi sweeps performed per block.
    pub sweeps: Vec<i32>,
}

impl HostDecorr {
    /// Flux of bin `j` of block `b`.
    pub fn flux(&self, b: usize, j: usize) -> f64 {
        self.flux[b * self.ncol + j]
    }

    /// Its inverse variance.
    pub fn fluxivar(&self, b: usize, j: usize) -> f64 {
        self.fluxivar[b * self.ncol + j]
    }

    /// `Rdiag[k, j]` of block `b` (`k = 0` is the diagonal `-ndiag`, as in `PatchResult`).
    pub fn resolution(&self, b: usize, k: usize, j: usize) -> f64 {
        self.resolution[(b * self.nd2 + k) * self.ncol + j]
    }

    /// Status of block `b`.
    pub fn status(&self, b: usize) -> Option<Status> {
        Status::from_code(self.status[b])
    }
}

/// The orthonormal DCT-II basis of size `n`, column-major: column `j` is
/// `√(2/n)·cos(π(k + ½)j/n)` over `k` (`√(1/n)` for `j = 0`). The Jacobi starts from it (see
/// the kernel's header). One Newton–Schulz step, `U ← U + U(I - UᵀU)/2`, brings its
/// orthonormality error from the cosines' rounding (~5e-15 at n = 74) to ~1e-15.
pub fn dct_basis(n: usize) -> Vec<f64> {
    let nf = n as f64;
    let mut u = vec![0.0; n * n];
    for j in 0..n {
        let norm = if j == 0 {
            (1.0 / nf).sqrt()
        } else {
            (2.0 / nf).sqrt()
        };
        for k in 0..n {
            let arg = std::f64::consts::PI * (k as f64 + 0.5) * j as f64 / nf;
            u[j * n + k] = norm * arg.cos();
        }
    }
    // E = (I - UᵀU)/2, then U + U·E.
    let mut e = vec![0.0; n * n];
    for j in 0..n {
        for i in 0..n {
            let g: f64 = (0..n).map(|k| u[i * n + k] * u[j * n + k]).sum();
            e[j * n + i] = 0.5 * (if i == j { 1.0 } else { 0.0 } - g);
        }
    }
    let mut out = u.clone();
    for j in 0..n {
        for k in 0..n {
            out[j * n + k] += (0..n).map(|i| u[i * n + k] * e[j * n + i]).sum::<f64>();
        }
    }
    out
}

/// The kernel, loaded once, with its dynamic shared-memory limit raised to the device's.
pub struct Kernels {
    func: CudaFunction,
    eigen: CudaFunction,
    /// The most dynamic shared memory a launch may request on this device.
    pub max_dynamic_smem: usize,
}

impl Kernels {
    /// Compiles (or takes from the PTX cache) and loads decorrelate.cu on `gpu`, and opts the
    /// kernel in to the device's largest dynamic shared memory (89 KB at 74×74, over the 48 KB
    /// a kernel gets without opting in).
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("decorrelate.cu")?;
        let optin = gpu
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda("querying the shared-memory limit"))?;
        let mut max_dyn = optin;
        let mut load = |name: &str| -> Result<CudaFunction, GpuError> {
            let func = module
                .load_function(name)
                .map_err(|e| GpuError::Kernel(format!("decorrelate.cu has no {name}: {e:?}")))?;
            let fixed = func
                .get_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(cuda("querying the kernel's static shared memory"))?;
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                optin - fixed,
            )
            .map_err(cuda("raising the dynamic shared-memory limit"))?;
            max_dyn = max_dyn.min(optin - fixed);
            Ok(func)
        };
        let func = load("decorrelate")?;
        let eigen = load("decorrelate_eigen")?;
        Ok(Kernels {
            func,
            eigen,
            max_dynamic_smem: max_dyn.max(0) as usize,
        })
    }
}

/// A batch's outputs on the device, in the layout of [`HostDecorr`].
pub struct DecorrBatch {
    /// Blocks.
    pub nblock: usize,
    /// Columns per block.
    pub ncol: usize,
    /// Resolution rows per block.
    pub nd2: usize,
    /// `[nblock·ncol]`.
    pub flux: CudaSlice<f64>,
    /// `[nblock·ncol]`.
    pub fluxivar: CudaSlice<f64>,
    /// `[nblock·nd2·ncol]`.
    pub resolution: CudaSlice<f64>,
    /// `[nblock]` status codes.
    pub status: CudaSlice<i32>,
    /// `[nblock]` Jacobi sweeps.
    pub sweeps: CudaSlice<i32>,
}

impl DecorrBatch {
    /// Device buffers sized for `layout` (zeroed so that they hold defined values; the kernel
    /// writes every element).
    pub fn alloc(gpu: &Gpu, layout: &DecorrLayout) -> Result<DecorrBatch, GpuError> {
        let (nb, ncol, nd2) = (layout.nblock, layout.ncol, layout.nd2);
        let st = &gpu.stream;
        Ok(DecorrBatch {
            nblock: nb,
            ncol,
            nd2,
            flux: st.alloc_zeros(nb * ncol).map_err(cuda("allocating flux"))?,
            fluxivar: st
                .alloc_zeros(nb * ncol)
                .map_err(cuda("allocating fluxivar"))?,
            resolution: st
                .alloc_zeros(nb * nd2 * ncol)
                .map_err(cuda("allocating the resolution"))?,
            status: st.alloc_zeros(nb).map_err(cuda("allocating status"))?,
            sweeps: st.alloc_zeros(nb).map_err(cuda("allocating sweeps"))?,
        })
    }

    /// Copies the batch back (waits for the kernel; `spextract bench`'s library choices and the
    /// tests).
    pub fn download(&self, gpu: &Gpu) -> Result<HostDecorr, GpuError> {
        let st = &gpu.stream;
        Ok(HostDecorr {
            nblock: self.nblock,
            ncol: self.ncol,
            nd2: self.nd2,
            flux: st
                .clone_dtoh(&self.flux)
                .map_err(cuda("downloading flux"))?,
            fluxivar: st
                .clone_dtoh(&self.fluxivar)
                .map_err(cuda("downloading fluxivar"))?,
            resolution: st
                .clone_dtoh(&self.resolution)
                .map_err(cuda("downloading the resolution"))?,
            status: st
                .clone_dtoh(&self.status)
                .map_err(cuda("downloading status"))?,
            sweeps: st
                .clone_dtoh(&self.sweeps)
                .map_err(cuda("downloading sweeps"))?,
        })
    }
}

kernel_params! {
    /// `decorrelate`'s parameters (kernels/params.cuh): sizes and the sweep limit, then the
    /// device addresses of the blocks' parameters and offsets, the covariances, solutions and
    /// starting bases it reads, and the outputs it writes.
    pub struct DecorrelateParams {
        pub ld: i32,
        pub ncol: i32,
        pub nd2: i32,
        pub max_sweeps: i32,
        pub params: u64,
        pub offs: u64,
        pub cov: u64,
        pub x: u64,
        pub basis: u64,
        pub flux: u64,
        pub fluxivar: u64,
        pub resolution: u64,
        pub status: u64,
        pub sweeps: u64,
    }
}

kernel_params! {
    /// `decorrelate_eigen`'s parameters (kernels/params.cuh): sizes, then the device addresses
    /// of the blocks' parameters and offsets, syev's eigenpairs and infos, the solutions, and
    /// the outputs (`decorrelate`'s).
    pub struct DecorrelateEigenParams {
        pub ld: i32,
        pub ncol: i32,
        pub nd2: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub params: u64,
        pub offs: u64,
        pub evec: u64,
        pub eval: u64,
        pub einfo: u64,
        pub x: u64,
        pub flux: u64,
        pub fluxivar: u64,
        pub resolution: u64,
        pub status: u64,
        pub sweeps: u64,
    }
}

/// Both kernels' launch for `layout`: one block of [`THREADS`] per covariance block, with
/// [`DecorrLayout::smem_bytes`] of dynamic shared memory.
pub fn launch_config(layout: &DecorrLayout) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (launch::dim(layout.nblock, "covariance blocks")?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: launch::dim(layout.smem_bytes(), "shared memory")?,
    })
}

/// Decorrelates the blocks of `layout` on `gpu` from the device buffers `cov` and `x` (the
/// previous stages' outputs), queued on the GPU's stream.
pub fn decorrelate(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    max_sweeps: u32,
) -> Result<DecorrBatch, GpuError> {
    let mut out = DecorrBatch::alloc(gpu, layout)?;
    decorrelate_into(gpu, kernels, layout, cov, x, max_sweeps, &mut out)?;
    Ok(out)
}

/// [`decorrelate`] into existing buffers (a pipeline reuses them from batch to batch).
pub fn decorrelate_into(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    max_sweeps: u32,
    out: &mut DecorrBatch,
) -> Result<(), GpuError> {
    let max_sweeps = i32::try_from(max_sweeps).map_err(|_| bad("max_sweeps > i32".into()))?;
    let LaunchArgs {
        cfg,
        ld_i,
        ncol_i,
        nd2_i,
        params,
        offs,
    } = prepare_launch(gpu, kernels, layout, cov, x, out)?;
    let basis = gpu
        .upload(&layout.basis)
        .map_err(cuda("uploading the starting bases"))?;
    let st = &gpu.stream;
    let mut g = Guards::default();
    let args = DecorrelateParams {
        ld: ld_i,
        ncol: ncol_i,
        nd2: nd2_i,
        max_sweeps,
        params: g.read(&params, st),
        offs: g.read(&offs, st),
        cov: g.read(cov, st),
        x: g.read(x, st),
        basis: g.read(&basis, st),
        flux: g.write(&mut out.flux, st),
        fluxivar: g.write(&mut out.fluxivar, st),
        resolution: g.write(&mut out.resolution, st),
        status: g.write(&mut out.status, st),
        sweeps: g.write(&mut out.sweeps, st),
    };
    let mut launch = st.launch_builder(&kernels.func);
    launch.arg(&args);
    // SAFETY: DecorrelateParams is `decorrelate`'s one parameter (kernels/params.cuh, layout
    // tested), its addresses those of live buffers whose guards (`g`) outlive the launch:
    // int ld, ncol, nd2, max_sweeps (i32); params (i32, 8 per block) and offs (i64 = long long,
    // 3 per block), built together by DecorrLayout::new for nblock blocks; cov, x and basis
    // (f64, read); flux, fluxivar, resolution (f64), status and sweeps (i32), written. Bounds:
    // one thread block per b < nblock = gridDim.x; it reads params[8b..8b+8], offs[3b..3b+3],
    // the lower triangle of C at cov_off + j·cov_ld + i (i, j < n, ≤ cov_need ≤ cov.len(),
    // checked above), x[x_off..x_off + n] (≤ x_need ≤ x.len()) and basis[basis_off..
    // basis_off + n²] (DecorrLayout::new appended an n × n basis there); it writes flux/fluxivar[b·ncol..
    // (b+1)·ncol], resolution[b·nd2·ncol..(b+1)·nd2·ncol], status[b], sweeps[b], all inside
    // the buffers checked above. Rows read in shared memory: DecorrLayout::new checked
    // row_lo ≤ wavepad - ndiag, wavepad + max(nstep, nkeep + ndiag) ≤ row_hi ≤ n, so every
    // Q/R row index lies in 0..nrow and every column in 0..n. Shared memory: smem_bytes(ld)
    // with ld ≥ every block's m = n rounded up to even, the carve-up the kernel makes, within
    // the limit set by Kernels::load (checked above). THREADS equals the kernel's
    // __launch_bounds__.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching decorrelate"))?;
    drop(g);
    // params, offs and basis drop here: cudarc frees them in stream order, after the kernel.
    Ok(())
}

/// The eigen route on a solve's outputs: `XsyevBatched` over every covariance slot of `blocks`
/// (`nslot` of `nw × nw`, overwritten with eigenvectors), then the readout; queued on the
/// stream of `gpu`, which must be `solver`'s.
#[allow(clippy::too_many_arguments)]
pub fn decorrelate_by_syev(
    gpu: &Gpu,
    kernels: &Kernels,
    solver: &mut Solver,
    layout: &DecorrLayout,
    blocks: &mut CudaSlice<f64>,
    nw: usize,
    nslot: usize,
    x: &CudaSlice<f64>,
) -> Result<DecorrBatch, GpuError> {
    let eig = solver.eigen_in_place(blocks, nw, nslot)?;
    let mut out = DecorrBatch::alloc(gpu, layout)?;
    decorrelate_eigen_into(gpu, kernels, layout, blocks, &eig, x, &mut out)?;
    Ok(out)
}

/// The readout of `decorrelate_eigen` from the eigenpairs of the covariance slots, which
/// [`Solver::eigen_in_place`](super::solve::Solver::eigen_in_place) wrote over them (`evec`)
/// and into `eig`; queued on the GPU's stream into `out`.
pub fn decorrelate_eigen_into(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    evec: &CudaSlice<f64>,
    eig: &EigenBatch,
    x: &CudaSlice<f64>,
    out: &mut DecorrBatch,
) -> Result<(), GpuError> {
    let LaunchArgs {
        cfg,
        ld_i,
        ncol_i,
        nd2_i,
        params,
        offs,
    } = prepare_launch(gpu, kernels, layout, evec, x, out)?;
    let (l, nslot) = layout.slots()?;
    if eig.values.len() < nslot * l || eig.info.len() < nslot {
        return Err(bad(format!(
            "{} eigenvalues and {} infos for {nslot} slots of {l}",
            eig.values.len(),
            eig.info.len()
        )));
    }
    let st = &gpu.stream;
    let mut g = Guards::default();
    let args = DecorrelateEigenParams {
        ld: ld_i,
        ncol: ncol_i,
        nd2: nd2_i,
        params: g.read(&params, st),
        offs: g.read(&offs, st),
        evec: g.read(evec, st),
        eval: g.read(&eig.values, st),
        einfo: g.read(&eig.info, st),
        x: g.read(x, st),
        flux: g.write(&mut out.flux, st),
        fluxivar: g.write(&mut out.fluxivar, st),
        resolution: g.write(&mut out.resolution, st),
        status: g.write(&mut out.status, st),
        sweeps: g.write(&mut out.sweeps, st),
        ..DecorrelateEigenParams::default()
    };
    let mut launch = st.launch_builder(&kernels.eigen);
    launch.arg(&args);
    // SAFETY: DecorrelateEigenParams is `decorrelate_eigen`'s one parameter
    // (kernels/params.cuh, layout tested), its addresses those of live buffers whose guards
    // (`g`) outlive the launch: int ld, ncol, nd2 (i32, fit: DecorrLayout::new); params (i32, 8 a
    // block) and offs (i64, 3 a block) for nblock = gridDim.x blocks; evec, eval (f64) and
    // einfo (i32), read; x (f64), read; the outputs as `decorrelate`'s. Bounds: block b reads
    // evec[cov_off + (k0 + t)·l + i] for t, i < n ≤ l, inside the slot at cov_off (≤ cov_need ≤
    // evec.len(), prepare_launch), eval[slot·l + k0 + t] and einfo[slot] with slot = cov_off / l²
    // < nslot (DecorrLayout::slots: every cov_off is a whole slot and cov_ld = l; lengths
    // checked above), x and the outputs as `decorrelate` (prepare_launch). Shared memory as
    // `decorrelate`'s, within the limit Kernels::load set for this kernel.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching decorrelate_eigen"))?;
    drop(g);
    Ok(())
}

/// What both kernels' launches share: the grid and the shared memory, the sizes they take
/// as ints, and the blocks' parameters and offsets on the device.
struct LaunchArgs {
    cfg: LaunchConfig,
    ld_i: i32,
    ncol_i: i32,
    nd2_i: i32,
    params: CudaSlice<i32>,
    offs: CudaSlice<i64>,
}

/// Checks what both kernels need of a launch (outputs of the layout's sizes, inputs as long as
/// the blocks read: `cov` for the Jacobi, the eigenvectors for the eigen route, at the same
/// offsets; shared memory within the device's limit), then uploads the blocks' parameters.
fn prepare_launch(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    out: &DecorrBatch,
) -> Result<LaunchArgs, GpuError> {
    let (nb, ncol, nd2) = (layout.nblock, layout.ncol, layout.nd2);
    if out.nblock != nb
        || out.ncol != ncol
        || out.nd2 != nd2
        || out.flux.len() != nb * ncol
        || out.fluxivar.len() != nb * ncol
        || out.resolution.len() != nb * nd2 * ncol
        || out.status.len() != nb
        || out.sweeps.len() != nb
    {
        return Err(bad(format!(
            "output buffers for {} blocks × {} × {}, layout of {nb} × {ncol} × {nd2}",
            out.nblock, out.ncol, out.nd2
        )));
    }
    if cov.len() < layout.cov_need || x.len() < layout.x_need {
        return Err(bad(format!(
            "covariance ({}) or solution ({}) buffer shorter than the blocks read ({}, {})",
            cov.len(),
            x.len(),
            layout.cov_need,
            layout.x_need
        )));
    }
    let smem = layout.smem_bytes();
    if smem > kernels.max_dynamic_smem {
        return Err(bad(format!(
            "{0}×{0} blocks need {smem} bytes of shared memory, over this GPU's {1}",
            layout.ld, kernels.max_dynamic_smem
        )));
    }
    Ok(LaunchArgs {
        cfg: launch_config(layout)?,
        ld_i: launch::int(layout.ld, "block side")?,
        ncol_i: launch::int(ncol, "block columns")?,
        nd2_i: launch::int(nd2, "resolution diagonals")?,
        params: gpu
            .upload(&layout.params)
            .map_err(cuda("uploading block parameters"))?,
        offs: gpu
            .upload(&layout.offs)
            .map_err(cuda("uploading block offsets"))?,
    })
}
