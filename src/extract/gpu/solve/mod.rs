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
//!    are zero: only the trailing block `L[k0..n, k0..n]` is solved with, against `[I; 0]`.
//!    Patches are grouped by `(k0, n − k0, ncore, nwavetot)` because a batched call takes one
//!    size; a bundle gives three or four groups (edge subbundles solve 6 fibers, the first one
//!    has no left neighbour, frame edges have fewer core fibers).
//! 4. `C_ff = Y_fᵀ Y_f` per core fiber by `cublasDgemmBatched` (pointer arrays: the patches of
//!    a group are not evenly spaced, so the strided variant does not apply). Column `u` of `Y`
//!    is zero above row `u`, so fiber `c`'s Gram product starts at its own first row, saving a
//!    third of the flops over the five fibers.
//!
//! `E` is built without a kernel or an upload: `Y` gives each patch a slab of
//! `ncols_max·(nmax + 1)` elements with leading dimension `nmax`, so that the unit entries of
//! all slabs lie on one arithmetic progression of stride `nmax + 1`: a memset and one strided
//! `cublasDcopy` from a vector of ones.
//!
//! Layouts of the outputs ([`SolveBatch`]), `nw` the largest `nwavetot` and
//! `ncore_max` the largest core-fiber count of the batch:
//! * `x[b·nmax + u]`: patch `b`'s solution, fiber-major `u = f·nwavetot + w`; 0 in the padding.
//! * `blocks[((b·ncore_max + c)·nw + w)·nw + w']` = `C[(f, w'), (f, w)]` for core fiber
//!   `f = core_fiber + c`: one `nw × nw` column-major block per core fiber (the matrix is
//!   symmetric, so it is row-major too up to rounding: gemm computes both triangles). Blocks of
//!   `c ≥ ncore_b`, and the rows and columns `≥ nwavetot_b` of a block, are 0.
//! * `info[b]`: potrf's info. Where it is not 0, that patch's `x` and blocks are meaningless
//!   (NaN in the twin); the caller retries it with more regularisation, as the CPU backend does.
//!
//! The host twin that replays this sequence on host buffers is `twins::solve`. Imports
//! `device`, `normal` and the crate's `patch` types.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::device::Gpu;
use super::normal::DenseBatch;
use super::GpuError;
use crate::patch::Patch;

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

/// Patches that share the sizes of one trsm call, and of its per-fiber Gram calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// First core unknown, `core_fiber·nwavetot`: rows and columns of `L` solved with start here.
    pub k0: usize,
    /// Rows of the trailing triangle, `n − k0` (the identity padding is left out).
    pub m: usize,
    /// Core fibers.
    pub ncore: usize,
    /// Bins per fiber.
    pub nwt: usize,
    /// The patches, increasing.
    pub patches: Vec<usize>,
}

impl Group {
    /// Columns of `E`: the core unknowns.
    pub fn ncols(&self) -> usize {
        self.ncore * self.nwt
    }
}

/// The stage's decomposition of a batch, shared by the device path and its twin (`twins::solve`): sizes, the
/// trsm groups, and every offset (in elements) the pointer arrays are built from.
#[derive(Debug, Clone)]
pub struct SolvePlan {
    /// Patches.
    pub npatch: usize,
    /// Size and leading dimension of every patch's matrix.
    pub nmax: usize,
    /// Side of an output block: the largest `nwavetot`.
    pub nw: usize,
    /// Blocks per patch: the largest core-fiber count.
    pub ncore_max: usize,
    /// Columns of a patch's slab of `Y`: the largest `ncore·nwavetot`.
    pub ncols_max: usize,
    /// Elements of a patch's slab of `Y`, `ncols_max·(nmax + 1)` (see the module docs).
    pub slab: usize,
    /// The trsm groups, in increasing `(k0, m, ncore, nwt)`.
    pub groups: Vec<Group>,
}

impl SolvePlan {
    /// Checks `shapes` against a batch of `npatch` matrices of size `nmax` whose patches have
    /// `n[b]` unknowns, and groups the patches.
    pub fn new(
        npatch: usize,
        nmax: usize,
        n: &[usize],
        shapes: &[PatchShape],
    ) -> Result<SolvePlan, GpuError> {
        if npatch == 0 || nmax == 0 {
            return Err(bad(format!("{npatch} patches of {nmax} unknowns")));
        }
        if shapes.len() != npatch || n.len() != npatch {
            return Err(bad(format!(
                "{} shapes and {} unknown counts for {npatch} patches",
                shapes.len(),
                n.len()
            )));
        }
        let mut keyed =
            std::collections::BTreeMap::<(usize, usize, usize, usize), Vec<usize>>::new();
        for (b, (s, &nb)) in shapes.iter().zip(n).enumerate() {
            if s.nwavetot == 0 || s.ncore == 0 || s.core_fiber + s.ncore > s.nfiber {
                return Err(bad(format!("patch {b}: core fibers of {s:?}")));
            }
            if s.nunknown() != nb || nb > nmax {
                return Err(bad(format!(
                    "patch {b}: {s:?} has {} unknowns, the batch {nb} (of at most {nmax})",
                    s.nunknown()
                )));
            }
            let k0 = s.core_fiber * s.nwavetot;
            keyed
                .entry((k0, nb - k0, s.ncore, s.nwavetot))
                .or_default()
                .push(b);
        }
        let nw = shapes.iter().map(|s| s.nwavetot).max().unwrap_or(0);
        let ncore_max = shapes.iter().map(|s| s.ncore).max().unwrap_or(0);
        let ncols_max = shapes
            .iter()
            .map(|s| s.ncore * s.nwavetot)
            .max()
            .unwrap_or(0);
        let slab = ncols_max * (nmax + 1);
        // Every size handed to cuBLAS/cuSOLVER is a 32-bit int, and the strided copy that
        // builds E indexes the whole of Y with one.
        int(nmax + 1, "nmax + 1")?;
        int(npatch * nmax, "x's length")?;
        int(npatch * slab, "Y's length")?;
        int(npatch * ncore_max * nw * nw, "the blocks' length")?;
        let groups = keyed
            .into_iter()
            .map(|((k0, m, ncore, nwt), patches)| Group {
                k0,
                m,
                ncore,
                nwt,
                patches,
            })
            .collect();
        Ok(SolvePlan {
            npatch,
            nmax,
            nw,
            ncore_max,
            ncols_max,
            slab,
            groups,
        })
    }

    /// Offset of patch `b`'s matrix (and factor) in `ata`.
    pub fn factor(&self, b: usize) -> usize {
        b * self.nmax * self.nmax
    }

    /// Offset of `L[k0, k0]` of patch `b`: the trailing triangle its trsm solves with.
    pub fn trailing(&self, b: usize, k0: usize) -> usize {
        self.factor(b) + k0 * (self.nmax + 1)
    }

    /// Offset of patch `b`'s `x`.
    pub fn x(&self, b: usize) -> usize {
        b * self.nmax
    }

    /// Offset of patch `b`'s slab of `Y` (row `r` of the slab is unknown `k0 + r`).
    pub fn y(&self, b: usize) -> usize {
        b * self.slab
    }

    /// Offset in `Y` of core fiber `c`'s first nonzero row in its first column: row and column
    /// `c·nwt` of patch `b`'s slab.
    pub fn y_fiber(&self, b: usize, c: usize, nwt: usize) -> usize {
        self.y(b) + c * nwt * (self.nmax + 1)
    }

    /// Offset of patch `b`'s block of core fiber `c` in `blocks`.
    pub fn block(&self, b: usize, c: usize) -> usize {
        (b * self.ncore_max + c) * self.nw * self.nw
    }

    /// Elements of `blocks`.
    pub fn blocks_len(&self) -> usize {
        self.npatch * self.ncore_max * self.nw * self.nw
    }

    /// Unit entries of `E` over the whole of `Y`: entry `i` is at `i·(nmax + 1)`.
    pub fn units(&self) -> usize {
        self.npatch * self.ncols_max
    }
}

/// Every pointer array of one run, in one vector (uploaded at once), and where each batched
/// call's array starts in it. Built by the device path from the buffers' device addresses and
/// by the twin from stand-in addresses, so that the twin reads the very arrays the calls get.
pub(super) struct PointerArrays {
    /// The pointers.
    pub(super) host: Vec<u64>,
    /// potrf's and potrs's `A`: patch `b`'s matrix (`npatch` entries).
    pub(super) factors: usize,
    /// potrs's `B`: patch `b`'s `x` (`npatch` entries).
    pub(super) x: usize,
    /// One per group of the plan.
    pub(super) groups: Vec<GroupArrays>,
}

/// A group's pointer arrays (one entry per patch of the group, in its order).
pub(super) struct GroupArrays {
    /// trsm's `A`: `L[k0, k0]`.
    pub(super) l22: usize,
    /// trsm's `B`: the patch's slab of `Y`.
    pub(super) y: usize,
    /// Per core fiber, gemm's `A` and `B` (`Y_f`) and `C` (`C_ff`).
    pub(super) fibers: Vec<(usize, usize)>,
}

impl PointerArrays {
    /// The arrays for `plan` with the buffers at device addresses `ata`, `x`, `y`, `blocks`.
    pub(super) fn new(plan: &SolvePlan, ata: u64, x: u64, y: u64, blocks: u64) -> PointerArrays {
        let mut host: Vec<u64> = Vec::new();
        let factors = host.len();
        host.extend((0..plan.npatch).map(|b| at::<f64>(ata, plan.factor(b))));
        let xo = host.len();
        host.extend((0..plan.npatch).map(|b| at::<f64>(x, plan.x(b))));
        let mut groups = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            let l22 = host.len();
            host.extend(
                g.patches
                    .iter()
                    .map(|&b| at::<f64>(ata, plan.trailing(b, g.k0))),
            );
            let yo = host.len();
            host.extend(g.patches.iter().map(|&b| at::<f64>(y, plan.y(b))));
            let mut fibers = Vec::with_capacity(g.ncore);
            for c in 0..g.ncore {
                let yf = host.len();
                host.extend(
                    g.patches
                        .iter()
                        .map(|&b| at::<f64>(y, plan.y_fiber(b, c, g.nwt))),
                );
                let cf = host.len();
                host.extend(
                    g.patches
                        .iter()
                        .map(|&b| at::<f64>(blocks, plan.block(b, c))),
                );
                fibers.push((yf, cf));
            }
            groups.push(GroupArrays { l22, y: yo, fibers });
        }
        PointerArrays {
            host,
            factors,
            x: xo,
            groups,
        }
    }
}

/// A device address `off` elements of `T` past `base`.
fn at<T>(base: u64, off: usize) -> u64 {
    base + (off * std::mem::size_of::<T>()) as u64
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
    /// potrs's single info (argument errors only), checked by [`SolveBatch::download`] or,
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

/// Runs a cudarc call that may panic when a library or one of its symbols is missing.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| GpuError::Library(format!("{what}: the CUDA library could not be used")))
}

/// cuBLAS entry points this stage calls (checked up front: cudarc panics on a missing one).
const CUBLAS_SYMBOLS: [&str; 8] = [
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetPointerMode_v2",
    "cublasSetMathMode",
    "cublasDcopy_v2",
    "cublasDtrsmBatched",
    "cublasDgemmBatched",
];
/// cuSOLVER entry points this stage calls.
const CUSOLVER_SYMBOLS: [&str; 5] = [
    "cusolverDnCreate",
    "cusolverDnDestroy",
    "cusolverDnSetStream",
    "cusolverDnDpotrfBatched",
    "cusolverDnDpotrsBatched",
];

/// Whether cuBLAS and cuSOLVER load and export everything this stage calls, or what is missing.
pub fn check_libraries() -> Result<(), GpuError> {
    // SAFETY: is_culib_present only tries to dlopen the library by its known names.
    let blas = guarded("libcublas", || unsafe { cublas::is_culib_present() }).unwrap_or(false);
    if !blas {
        return Err(GpuError::Library(
            "no cuBLAS library (libcublas.so): install the CUDA toolkit's math libraries".into(),
        ));
    }
    // SAFETY: as above, for cuSOLVER.
    let solver =
        guarded("libcusolver", || unsafe { cusolver::is_culib_present() }).unwrap_or(false);
    if !solver {
        return Err(GpuError::Library(
            "no cuSOLVER library (libcusolver.so): install the CUDA toolkit's math libraries"
                .into(),
        ));
    }
    let missing = guarded("cuBLAS/cuSOLVER symbols", || {
        let mut missing = Vec::new();
        // SAFETY: culib returns the library just found present; `get` only looks a symbol up
        // (it is neither called nor kept here).
        let lib = unsafe { cublas::culib() };
        for s in CUBLAS_SYMBOLS {
            // SAFETY: a lookup by name; the pointer type is irrelevant as it is not called.
            if unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err() {
                missing.push(s);
            }
        }
        // SAFETY: as above, for cuSOLVER.
        let lib = unsafe { cusolver::culib() };
        for s in CUSOLVER_SYMBOLS {
            // SAFETY: as above.
            if unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err() {
                missing.push(s);
            }
        }
        missing
    })?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GpuError::Library(format!(
            "the CUDA math libraries lack {} (too old a CUDA toolkit?)",
            missing.join(", ")
        )))
    }
}

fn blas_ok(routine: &str, s: cublas::cublasStatus_t) -> Result<(), GpuError> {
    s.result().map_err(|e| GpuError::cublas(routine, e))
}

pub(crate) fn solver_ok(routine: &str, s: cusolver::cusolverStatus_t) -> Result<(), GpuError> {
    s.result().map_err(|e| GpuError::cusolver(routine, e))
}

/// cuBLAS and cuSOLVER handles bound to one GPU's stream, with the workspace reused from batch
/// to batch (`Y` and the ones that build `E`).
pub struct Solver {
    stream: Arc<CudaStream>,
    blas: cublas::cublasHandle_t,
    dn: cusolver::cusolverDnHandle_t,
    y: Option<CudaSlice<f64>>,
    ones: Option<CudaSlice<f64>>,
    /// XsyevBatched's parameter object and workspaces, made on its first use.
    syev: Option<SyevWork>,
}

/// What `cusolverDnXsyevBatched` needs besides its operands, kept between calls.
struct SyevWork {
    params: cusolver::cusolverDnParams_t,
    device: Option<CudaSlice<u8>>,
    host: Vec<u8>,
}

/// The eigenpairs of a batch of symmetric matrices ([`Solver::eigen_in_place`]): the
/// eigenvectors overwrite the matrices; here the eigenvalues and each matrix's info.
pub struct EigenBatch {
    /// `[count·n]`, ascending per matrix.
    pub values: CudaSlice<f64>,
    /// `[count]`: 0, or syev's failure code for that matrix.
    pub info: CudaSlice<i32>,
}

/// The routine of the eigen route of the decorrelation; the newest of the CUDA calls here
/// (CUDA 12.6), so its absence falls back to the Jacobi kernel instead of failing the backend.
const SYEV_BATCHED: &str = "cusolverDnXsyevBatched";

/// Whether cuSOLVER exports `cusolverDnXsyevBatched` (and its workspace query).
pub fn syev_batched_present() -> bool {
    guarded("cuSOLVER symbols", || {
        // SAFETY: culib returns the loaded library (check_libraries found it); `get` only looks
        // symbols up, without calling or keeping them.
        let lib = unsafe { cusolver::culib() };
        [
            SYEV_BATCHED,
            "cusolverDnXsyevBatched_bufferSize",
            "cusolverDnCreateParams",
        ]
        .iter()
        // SAFETY: as above.
        .all(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_ok())
    })
    .unwrap_or(false)
}

impl Solver {
    /// The cuSOLVER handle, bound to this solver's stream (for `choice`'s measurements).
    pub(crate) fn dn_handle(&self) -> cusolver::cusolverDnHandle_t {
        self.dn
    }

    /// Creates the handles on `gpu`'s stream, after checking the libraries.
    pub fn new(gpu: &Gpu) -> Result<Solver, GpuError> {
        check_libraries()?;
        gpu.ctx
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        // Null handles first, so that Drop releases whatever was created if a step fails.
        let mut s = Solver {
            stream: gpu.stream.clone(),
            blas: std::ptr::null_mut(),
            dn: std::ptr::null_mut(),
            y: None,
            ones: None,
            syev: None,
        };
        let raw = s.stream.cu_stream();
        // SAFETY: writes one handle into `s.blas`; the context is current (bound above).
        blas_ok("cublasCreate_v2", unsafe {
            cublas::cublasCreate_v2(&mut s.blas)
        })?;
        // SAFETY: a live handle and the raw stream of `s.stream`, which `s` keeps alive for as
        // long as the handle (Drop destroys the handle before the fields drop).
        blas_ok("cublasSetStream_v2", unsafe {
            cublas::cublasSetStream_v2(s.blas, raw as cublas::cudaStream_t)
        })?;
        // Host pointer mode: alpha and beta are host scalars, read during the call.
        // SAFETY: a live handle; the mode is a valid enum value.
        blas_ok("cublasSetPointerMode_v2", unsafe {
            cublas::cublasSetPointerMode_v2(
                s.blas,
                cublas::cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST,
            )
        })?;
        // Plain IEEE double arithmetic (no FP64 emulation): the twin and the CPU comparison
        // assume it.
        // SAFETY: a live handle; the mode is a valid enum value.
        blas_ok("cublasSetMathMode", unsafe {
            cublas::cublasSetMathMode(s.blas, cublas::cublasMath_t::CUBLAS_DEFAULT_MATH)
        })?;
        // SAFETY: writes one handle into `s.dn`; the context is current.
        solver_ok("cusolverDnCreate", unsafe {
            cusolver::cusolverDnCreate(&mut s.dn)
        })?;
        // SAFETY: a live handle and the stream kept alive by `s`, as for cuBLAS.
        solver_ok("cusolverDnSetStream", unsafe {
            cusolver::cusolverDnSetStream(s.dn, raw as cusolver::cudaStream_t)
        })?;
        Ok(s)
    }

    /// Queues `cusolverDnXsyevBatched` on `count` column-major `n × n` symmetric matrices laid
    /// end to end in `a` (only their lower triangles are read): the eigenvectors overwrite them
    /// (column k of matrix i), the eigenvalues come back ascending. Nothing is waited for.
    pub fn eigen_in_place(
        &mut self,
        a: &mut CudaSlice<f64>,
        n: usize,
        count: usize,
    ) -> Result<EigenBatch, GpuError> {
        if n == 0 || count == 0 || a.len() < n * n * count {
            return Err(bad(format!(
                "{count} matrices of {n} × {n} in a buffer of {} values",
                a.len()
            )));
        }
        let st = self.stream.clone();
        st.context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        if self.syev.is_none() {
            let mut params: cusolver::cusolverDnParams_t = std::ptr::null_mut();
            // SAFETY: writes one parameter object, destroyed in Drop.
            solver_ok("cusolverDnCreateParams", unsafe {
                cusolver::cusolverDnCreateParams(&mut params)
            })?;
            self.syev = Some(SyevWork {
                params,
                device: None,
                host: Vec::new(),
            });
        }
        let work = self.syev.as_mut().expect("made above");
        let mut values: CudaSlice<f64> = st
            .alloc_zeros(count * n)
            .map_err(cuda("allocating eigenvalues"))?;
        let mut info: CudaSlice<i32> = st
            .alloc_zeros(count)
            .map_err(cuda("allocating syev's info"))?;
        let r64 = cusolver::cudaDataType::CUDA_R_64F;
        let vectors = cusolver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
        let lower = cusolver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let (n64, count64) = (n as i64, count as i64);
        let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
        {
            let (ap, _ga) = a.device_ptr_mut(&st);
            let (wp, _gw) = values.device_ptr_mut(&st);
            // SAFETY: a workspace query for `count` n × n double matrices (lda = n) inside `a`
            // (checked above) and their count·n eigenvalues; it writes only the two sizes.
            solver_ok("cusolverDnXsyevBatched_bufferSize", unsafe {
                cusolver::cusolverDnXsyevBatched_bufferSize(
                    self.dn,
                    work.params,
                    vectors,
                    lower,
                    n64,
                    r64,
                    ap as *const std::ffi::c_void,
                    n64,
                    r64,
                    wp as *const std::ffi::c_void,
                    r64,
                    &mut dev_bytes,
                    &mut host_bytes,
                    count64,
                )
            })?;
        }
        if work.device.as_ref().is_none_or(|d| d.len() < dev_bytes) || work.host.len() < host_bytes
        {
            // An earlier call may still read the workspaces: let it finish before they go.
            st.synchronize()
                .map_err(cuda("waiting before growing syev's workspace"))?;
            work.device = Some(
                st.alloc_zeros(dev_bytes.max(1))
                    .map_err(cuda("allocating syev's workspace"))?,
            );
            work.host = vec![0u8; host_bytes.max(1)];
        }
        let dev = work.device.as_mut().expect("allocated above");
        let (ap, _ga) = a.device_ptr_mut(&st);
        let (wp, _gw) = values.device_ptr_mut(&st);
        let (dp, _gd) = dev.device_ptr_mut(&st);
        let (ip, _gi) = info.device_ptr_mut(&st);
        // SAFETY: `count` column-major n × n matrices (lda = n) in `a`, overwritten with their
        // eigenvectors; count·n eigenvalues in `values` and count ints in `info`, allocated
        // above; device and host workspaces of at least the sizes just queried, owned by `self`
        // and only replaced after a synchronisation, so they outlive the queued call. The
        // handle is bound to this stream (Solver::new).
        solver_ok(SYEV_BATCHED, unsafe {
            cusolver::cusolverDnXsyevBatched(
                self.dn,
                work.params,
                vectors,
                lower,
                n64,
                r64,
                ap as *mut std::ffi::c_void,
                n64,
                r64,
                wp as *mut std::ffi::c_void,
                r64,
                dp as *mut std::ffi::c_void,
                dev_bytes,
                work.host.as_mut_ptr() as *mut std::ffi::c_void,
                host_bytes,
                ip as *mut i32,
                count64,
            )
        })?;
        drop((_ga, _gw, _gd, _gi));
        Ok(EigenBatch { values, info })
    }

    /// Allocates the outputs and runs the stage (see [`Solver::solve_into`]).
    pub fn solve(
        &mut self,
        gpu: &Gpu,
        dense: &mut DenseBatch,
        shapes: &[PatchShape],
    ) -> Result<SolveBatch, GpuError> {
        let mut out = SolveBatch::alloc(gpu, dense, shapes)?;
        self.solve_into(gpu, dense, shapes, &mut out)?;
        Ok(out)
    }

    /// Queues the stage for `dense` (one shape per patch) on the stream: factors `dense.ata`
    /// in place (its upper triangle is left as cuSOLVER's workspace) and writes `out`. Nothing is
    /// waited for; [`SolveBatch::download`] or a later stage on the same stream sees the results.
    pub fn solve_into(
        &mut self,
        gpu: &Gpu,
        dense: &mut DenseBatch,
        shapes: &[PatchShape],
        out: &mut SolveBatch,
    ) -> Result<(), GpuError> {
        if !Arc::ptr_eq(&gpu.stream, &self.stream) {
            return Err(bad(
                "the solver's handles are bound to another stream".into()
            ));
        }
        let plan = SolvePlan::new(dense.npatch, dense.nmax, &dense.n, shapes)?;
        let (npatch, nmax) = (plan.npatch, plan.nmax);
        if dense.ata.len() != npatch * nmax * nmax || dense.atp.len() != npatch * nmax {
            return Err(bad(format!(
                "device batch of {} and {} values for {npatch} patches of {nmax}",
                dense.ata.len(),
                dense.atp.len()
            )));
        }
        if (out.npatch, out.nmax, out.nw, out.ncore_max) != (npatch, nmax, plan.nw, plan.ncore_max)
            || out.x.len() != npatch * nmax
            || out.blocks.len() != plan.blocks_len()
            || out.info.len() != npatch
        {
            return Err(bad(format!(
                "outputs for {} patches ({}, {} × {}, {} blocks), plan of {npatch} ({nmax}, {} × \
                 {}, {} blocks)",
                out.npatch,
                out.nmax,
                out.nw,
                out.nw,
                out.ncore_max,
                plan.nw,
                plan.nw,
                plan.ncore_max
            )));
        }
        let st = self.stream.clone();
        st.context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;

        // Workspace, grown when a batch needs more.
        let ylen = npatch * plan.slab;
        if self.y.as_ref().is_none_or(|y| y.len() < ylen) {
            self.y = None;
            self.y = Some(st.alloc_zeros(ylen).map_err(cuda("allocating Y"))?);
        }
        if self.ones.as_ref().is_none_or(|o| o.len() < plan.units()) {
            self.ones = Some(
                gpu.upload(&vec![1.0f64; plan.units()])
                    .map_err(cuda("uploading ones"))?,
            );
        }
        let (Some(y), Some(ones)) = (self.y.as_mut(), self.ones.as_ref()) else {
            unreachable!("allocated above");
        };

        // potrs solves in place: start x from AᵀWp. Then zero the blocks (those of absent
        // core fibers stay so) and Y (E's zeros).
        st.memcpy_dtod(&dense.atp, &mut out.x)
            .map_err(cuda("copying AᵀWp into x"))?;
        st.memset_zeros(&mut out.blocks)
            .map_err(cuda("zeroing the blocks"))?;
        st.memset_zeros(&mut y.slice_mut(0..ylen))
            .map_err(cuda("zeroing Y"))?;

        // Device addresses; the guards keep cudarc's stream ordering until the calls are queued.
        let (ata_p, _g_ata) = dense.ata.device_ptr_mut(&st);
        let (x_p, _g_x) = out.x.device_ptr_mut(&st);
        let (blk_p, _g_blk) = out.blocks.device_ptr_mut(&st);
        let (info_p, _g_info) = out.info.device_ptr_mut(&st);
        let (pinfo_p, _g_pinfo) = out.potrs_info.device_ptr_mut(&st);
        let (y_p, _g_y) = y.device_ptr_mut(&st);
        let (ones_p, _g_ones) = ones.device_ptr(&st);

        // Every pointer array, in one upload.
        let arrays = PointerArrays::new(&plan, ata_p, x_p, y_p, blk_p);
        let ptrs = gpu
            .upload(&arrays.host)
            .map_err(cuda("uploading the pointer arrays"))?;
        let (ptrs_p, _g_ptrs) = ptrs.device_ptr(&st);
        let parr = |off: usize| at::<u64>(ptrs_p, off);

        let (nmax_i, npatch_i) = (int(nmax, "nmax")?, int(npatch, "patches")?);
        let lower_s = cusolver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;

        // SAFETY: `parr(arrays.factors)` is a device array of npatch pointers, each to a column-major
        // nmax × nmax matrix with lda = nmax inside `dense.ata` (npatch·nmax² elements, checked
        // above); `info_p` is a device array of npatch ints (`out.info`, checked). The pointer
        // array (`ptrs`) and all buffers outlive the call's execution: they are dropped after
        // it is queued, and cudarc frees them in stream order.
        solver_ok("cusolverDnDpotrfBatched", unsafe {
            cusolver::cusolverDnDpotrfBatched(
                self.dn,
                lower_s,
                nmax_i,
                parr(arrays.factors) as *mut *mut f64,
                nmax_i,
                info_p as *mut c_int,
                npatch_i,
            )
        })?;
        // SAFETY: the same factor pointers (lda = nmax); `parr(arrays.x)` holds npatch device
        // pointers to nmax-vectors in `out.x` (npatch·nmax, checked), ldb = nmax, nrhs = 1 (the
        // only value cuSOLVER supports); `pinfo_p` is one device int. Lifetimes as above.
        solver_ok("cusolverDnDpotrsBatched", unsafe {
            cusolver::cusolverDnDpotrsBatched(
                self.dn,
                lower_s,
                nmax_i,
                1,
                parr(arrays.factors) as *mut *mut f64,
                nmax_i,
                parr(arrays.x) as *mut *mut f64,
                nmax_i,
                pinfo_p as *mut c_int,
                npatch_i,
            )
        })?;

        // E: ones at i·(nmax + 1) for i < npatch·ncols_max (module docs).
        let (units, stride) = (
            int(plan.units(), "E's unit entries")?,
            int(nmax + 1, "nmax + 1")?,
        );
        // SAFETY: reads `units` contiguous doubles of `ones` (its length is at least
        // plan.units(), ensured above) and writes y[i·(nmax+1)] for i < units; the last index,
        // (npatch·ncols_max − 1)·(nmax + 1), is below npatch·slab = ylen ≤ y.len().
        blas_ok("cublasDcopy_v2", unsafe {
            cublas::cublasDcopy_v2(
                self.blas,
                units,
                ones_p as *const f64,
                1,
                y_p as *mut f64,
                stride,
            )
        })?;

        let (one, zero) = (1.0f64, 0.0f64);
        for (g, gp) in plan.groups.iter().zip(&arrays.groups) {
            let count = int(g.patches.len(), "patches in a group")?;
            let (m, ncols, nwt) = (
                int(g.m, "m")?,
                int(g.ncols(), "columns")?,
                int(g.nwt, "nwt")?,
            );
            // SAFETY: `parr(gp.l22)` holds count device pointers to L[k0, k0] of the group's
            // patches: an m × m lower triangle with lda = nmax, inside the patch's matrix since
            // k0 + m = n ≤ nmax. `parr(gp.y)` holds count pointers to slabs of Y (ldb = nmax ≥ m):
            // m rows × ncols ≤ ncols_max columns, the last element at (ncols_max − 1)·nmax +
            // nmax − 1 < slab. alpha is a host scalar (host pointer mode) read during the call.
            blas_ok("cublasDtrsmBatched", unsafe {
                cublas::cublasDtrsmBatched(
                    self.blas,
                    cublas::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                    cublas::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    cublas::cublasOperation_t::CUBLAS_OP_N,
                    cublas::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                    m,
                    ncols,
                    &one,
                    parr(gp.l22) as *const *const f64,
                    nmax_i,
                    parr(gp.y) as *const *mut f64,
                    nmax_i,
                    count,
                )
            })?;
            for (c, &(yf, cf)) in gp.fibers.iter().enumerate() {
                let k = int(g.m - c * g.nwt, "Gram rows")?;
                let ldc = int(plan.nw, "nw")?;
                // SAFETY: `parr(yf)` holds count pointers to row and column c·nwt of a slab:
                // a k × nwt operand (k = m − c·nwt rows, so it ends at slab row m; lda = nmax ≥
                // k), read as both A (transposed) and B. `parr(cf)` holds count pointers to
                // nw × nw blocks of `out.blocks` (ldc = nw ≥ nwt, the block at plan.block(b, c)
                // with c < ncore ≤ ncore_max, inside blocks_len()). alpha/beta are host scalars.
                blas_ok("cublasDgemmBatched", unsafe {
                    cublas::cublasDgemmBatched(
                        self.blas,
                        cublas::cublasOperation_t::CUBLAS_OP_T,
                        cublas::cublasOperation_t::CUBLAS_OP_N,
                        nwt,
                        nwt,
                        k,
                        &one,
                        parr(yf) as *const *const f64,
                        nmax_i,
                        parr(yf) as *const *const f64,
                        nmax_i,
                        &zero,
                        parr(cf) as *const *mut f64,
                        ldc,
                        count,
                    )
                })?;
            }
        }
        // `ptrs` drops here, after the calls that read it are queued: freed in stream order.
        Ok(())
    }
}

// SAFETY: the handles are used only through `&mut self` (never from two threads at once), and
// `solve_into` and `drop` make the stream's context current on the calling thread before using
// them, which is all cuBLAS and cuSOLVER ask of a handle that changes threads. cudarc's own
// handle wrappers (`CudaBlas`, `DnHandle`) are `Send` on the same grounds.
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
