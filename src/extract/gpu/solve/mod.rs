//! Solve and the fiber blocks of the inverse on the GPU: per patch of a [`DenseBatch`], the
//! Cholesky factor of `AᵀWA`, the flux `x = (AᵀWA)⁻¹ AᵀWp`, and for each core fiber `f` the
//! diagonal block `C_ff` of `C = (AᵀWA)⁻¹` that the decorrelation needs (what
//! `cpu::decorrelate` gets from its selected inversion).
//!
//! The sequence, all on the GPU's stream, batched over the patches:
//!
//! 1. `cusolverDnDpotrfBatched` (lower) factors every `nmax × nmax` matrix in place, `AᵀWA =
//!    L Lᵀ`, with one `info` per patch, so that a patch that is not positive definite is reported
//!    on its own (`info = k > 0`: the leading minor of order `k` is not) and the others go on.
//! 2. `cusolverDnDpotrsBatched` solves `L Lᵀ x = AᵀWp` in place in `x`. cuSOLVER supports only
//!    `nrhs = 1` there, and its `info` reports only invalid arguments (definiteness is potrf's).
//!    cuSOLVER documents that its batched Cholesky routines use the other triangle of `A` as
//!    workspace: after this stage `DenseBatch::ata` holds `L` in its lower triangle and garbage
//!    above it (only the lower one is read from here on).
//! 3. `Y = L⁻¹ E`, `E` the unit columns of the core unknowns, by `cublasDtrsmBatched`. The core
//!    unknowns `k0 .. k0 + ncols` (`k0 = core_fiber·nwavetot`, `ncols = ncore·nwavetot`) are
//!    contiguous in the fiber-major order, and `L⁻¹` is lower triangular, so rows `< k0` of `Y`
//!    are zero: only the trailing block `L[k0..n, k0..n]` is solved with, against `[I; 0]`,
//!    from row `k0` of each patch's slab (the rows above stay zero from the memset).
//!    Patches are grouped by `(k0, n − k0, ncore, nwavetot)` because a batched call takes one
//!    size; a bundle gives three or four groups (edge subbundles solve 6 fibers, the first one
//!    has no left neighbour, frame edges have fewer core fibers).
//! 4. `C_ff = Y_fᵀ Y_f` per core fiber by `cublasDgemmBatched` (pointer arrays: the patches of
//!    a group are not evenly spaced, so the strided variant does not apply). Column `u` of `Y`
//!    is zero above row `u`, so fiber `c`'s Gram product starts at its own first row, saving a
//!    third of the flops over the five fibers.
//! 5. On demand, after the stage ([`Solver::core_columns`], for `--ivar-from-model`'s
//!    leverages): the full core columns `C[:, core] = L⁻ᵀ Y` of every patch, rows `< k0` (the
//!    left neighbour) included, by one Trans `cublasDtrsmBatched` per group on the whole `n × n`
//!    factor (`n = k0 + m`), in place in `Y`, which then leaves the solver as `Z`.
//!
//! `E` is built without a kernel or an upload: `Y` gives each patch a slab of
//! `ncols_max·(nmax + 1)` elements with leading dimension `nmax`, in group order (the plan's
//! groups concatenated, each group's patches in order), with the unit of column `i` at row
//! `k0 + i`: within a group they lie on one arithmetic progression of stride `nmax + 1` from
//! the group's first slab plus `k0` (`SolvePlan::z_units`, which bounds it), so a memset and
//! one strided `cublasDcopy` per group from a vector of ones. The rows of each unknown are
//! its own (row `v` is unknown `v`), so step 5 solves the same slabs with the whole factor.
//!
//! Layouts of the outputs ([`SolveBatch`], and [`CoreColumns`]), `nw` the largest `nwavetot` and
//! `ncore_max` the largest core-fiber count of the batch:
//! * `x[b·nmax + u]`: patch `b`'s solution, fiber-major `u = f·nwavetot + w`; 0 in the padding.
//! * `blocks[((b·ncore_max + c)·nw + w)·nw + w']` = `C[(f, w'), (f, w)]` for core fiber
//!   `f = core_fiber + c`: one `nw × nw` column-major block per core fiber (the matrix is
//!   symmetric, so it is row-major too up to rounding: gemm computes both triangles). Blocks of
//!   `c ≥ ncore_b`, and the rows and columns `≥ nwavetot_b` of a block, are 0.
//! * `info[b]`: potrf's info. Where it is not 0, that patch's `x` and blocks are meaningless
//!   (NaN in the twin); the caller retries it with more regularisation, as the CPU backend does.
//! * [`CoreColumns`]: `z[off[b] + i·ld + v] = C[v, k0 + i]` for `v < n`, `i < ncols`, with
//!   `ld = nmax` and `off[b] = SolvePlan::z(b)`, the start of patch `b`'s slab in group order;
//!   the other elements are unspecified. Meaningless where `info[b]` is not 0.
//!
//! The host twin that replays this sequence on host buffers is `twins::solve`. Imports
//! `device`, `normal` and the crate's `patch` types.
//!
//! Here: the shapes, outputs and the [`Solver`]'s handles (with their release). The rest, one
//! concern a file: `plan` (the decomposition and the pointer arrays), `solver` (the handles
//! made, and the sequence of calls), `columns` (step 5), `eigen` (the batched eigen route of
//! the decorrelation), `libraries` (what cuBLAS and cuSOLVER must export, and their status
//! codes).

mod columns;
mod eigen;
mod libraries;
// The twin (`twins::solve`) decodes the pointer arrays the plan builds.
pub(super) mod plan;
mod solver;

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{CudaSlice, CudaStream};

use self::eigen::SyevWork;
use super::device::Gpu;
use super::normal::DenseBatch;
use super::GpuError;
use crate::patch::Patch;

pub use self::columns::CoreColumns;
pub use self::eigen::EigenBatch;
pub(crate) use self::libraries::solver_ok;
pub use self::libraries::{check_libraries, syev_batched_present};
pub(in crate::extract::gpu) use self::libraries::{cublas_present, cusolver_present};
pub use self::plan::{Group, SolvePlan};

/// Which unknowns of a patch are solved for and which of them are its core fibers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchShape {
    /// Fibers solved for (core plus padding neighbours, `Patch::nspecpad`).
    pub nfiber: usize,
    /// First core fiber among them (`Patch::core_fiber_offset`).
    pub core_fiber: usize,
    /// Core fibers (`Patch::nspec`).
    pub ncore: usize,
    /// Bins per fiber (`Patch::nwavetot`).
    pub nwavetot: usize,
}

impl PatchShape {
    /// The shape of `patch`.
    pub fn of(patch: &Patch) -> PatchShape {
        PatchShape {
            nfiber: patch.nspecpad,
            core_fiber: patch.core_fiber_offset(),
            ncore: patch.nspec,
            nwavetot: patch.nwavetot,
        }
    }

    /// Unknowns of the patch.
    pub fn nunknown(&self) -> usize {
        self.nfiber * self.nwavetot
    }
}

pub(super) fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("the batched solve cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("batched solve: {what}"), e)
}

fn int(v: usize, what: &str) -> Result<c_int, GpuError> {
    c_int::try_from(v).map_err(|_| bad(format!("{what} = {v} overflows a 32-bit int")))
}

/// The stage's outputs on the device; layouts in the module docs.
pub struct SolveBatch {
    /// Patches.
    pub npatch: usize,
    /// Stride of `x` per patch.
    pub nmax: usize,
    /// Side of a block.
    pub nw: usize,
    /// Blocks per patch.
    pub ncore_max: usize,
    /// `[npatch·nmax]`.
    pub x: CudaSlice<f64>,
    /// `[npatch·ncore_max·nw·nw]`.
    pub blocks: CudaSlice<f64>,
    /// potrf's info per patch.
    pub info: CudaSlice<i32>,
    /// potrs's single info (argument errors only), checked by `SolveBatch::download` (test-only) or,
    /// copied back by the caller, by [`check_potrs_info`].
    pub potrs_info: CudaSlice<i32>,
}

impl SolveBatch {
    /// Device buffers for `dense` with `shapes` (zeroed only so that they hold defined values).
    pub fn alloc(
        gpu: &Gpu,
        dense: &DenseBatch,
        shapes: &[PatchShape],
    ) -> Result<SolveBatch, GpuError> {
        let plan = SolvePlan::new(dense.npatch, dense.nmax, &dense.n, shapes)?;
        let st = &gpu.stream;
        Ok(SolveBatch {
            npatch: plan.npatch,
            nmax: plan.nmax,
            nw: plan.nw,
            ncore_max: plan.ncore_max,
            x: st
                .alloc_zeros(plan.npatch * plan.nmax)
                .map_err(cuda("allocating x"))?,
            blocks: st
                .alloc_zeros(plan.blocks_len())
                .map_err(cuda("allocating the blocks"))?,
            info: st
                .alloc_zeros(plan.npatch)
                .map_err(cuda("allocating info"))?,
            potrs_info: st.alloc_zeros(1).map_err(cuda("allocating potrs's info"))?,
        })
    }
}

/// potrsBatched's single info: nonzero only when an argument was invalid (a bug here, not a
/// bad patch).
pub fn check_potrs_info(info: i32) -> Result<(), GpuError> {
    if info != 0 {
        return Err(GpuError::Refused(format!(
            "cusolverDnDpotrsBatched: argument {} is invalid",
            -info
        )));
    }
    Ok(())
}

/// cuBLAS and cuSOLVER handles bound to one GPU's stream, with the workspace reused from batch
/// to batch (`Y`, and the ones that build `E` in `Y` and in `Z`).
pub struct Solver {
    stream: Arc<CudaStream>,
    blas: cublas::cublasHandle_t,
    dn: cusolver::cusolverDnHandle_t,
    y: Option<CudaSlice<f64>>,
    /// What the last `solve_into` left in `y`: the unknowns and shapes of its batch, which
    /// [`Solver::core_columns`] must be asked for (and then takes `y`).
    solved: Option<(Vec<usize>, Vec<PatchShape>)>,
    ones: Option<CudaSlice<f64>>,
    /// XsyevBatched's parameter object and workspaces, made on its first use.
    syev: Option<SyevWork>,
}

// SAFETY: the handles are used only through `&mut self` (never from two threads at once), and
// `solve_into`, `core_columns` and `drop` make the stream's context current on the calling
// thread before using them, which is all cuBLAS and cuSOLVER ask of a handle that changes
// threads. cudarc's own handle wrappers (`CudaBlas`, `DnHandle`) are `Send` on the same grounds.
unsafe impl Send for Solver {}

impl Drop for Solver {
    fn drop(&mut self) {
        // Handles are destroyed with the context current; failures cannot be returned here.
        let _ = self.stream.context().bind_to_thread();
        if let Some(w) = self.syev.take() {
            // The host workspace must outlive any call still queued with it.
            let _ = self.stream.synchronize();
            // SAFETY: the object made by cusolverDnCreateParams, destroyed once (taken).
            let s = unsafe { cusolver::cusolverDnDestroyParams(w.params) };
            if s != cusolver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                tracing::warn!("cusolverDnDestroyParams: {s:?}");
            }
        }
        if !self.dn.is_null() {
            // SAFETY: a handle created by cusolverDnCreate and destroyed once (nulled after).
            let s = unsafe { cusolver::cusolverDnDestroy(self.dn) };
            if s != cusolver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                tracing::warn!("cusolverDnDestroy: {s:?}");
            }
            self.dn = std::ptr::null_mut();
        }
        if !self.blas.is_null() {
            // SAFETY: a handle created by cublasCreate_v2 and destroyed once (nulled after).
            let s = unsafe { cublas::cublasDestroy_v2(self.blas) };
            if s != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                tracing::warn!("cublasDestroy_v2: {s:?}");
            }
            self.blas = std::ptr::null_mut();
        }
    }
}
