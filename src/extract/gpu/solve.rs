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
//! Layouts of the outputs ([`SolveBatch`], [`HostSolve`]), `nw` the largest `nwavetot` and
//! `ncore_max` the largest core-fiber count of the batch:
//! * `x[b·nmax + u]`: patch `b`'s solution, fiber-major `u = f·nwavetot + w`; 0 in the padding.
//! * `blocks[((b·ncore_max + c)·nw + w)·nw + w']` = `C[(f, w'), (f, w)]` for core fiber
//!   `f = core_fiber + c`: one `nw × nw` column-major block per core fiber (the matrix is
//!   symmetric, so it is row-major too up to rounding: gemm computes both triangles). Blocks of
//!   `c ≥ ncore_b`, and the rows and columns `≥ nwavetot_b` of a block, are 0.
//! * `info[b]`: potrf's info. Where it is not 0, that patch's `x` and blocks are meaningless
//!   (NaN in the twin); the caller retries it with more regularisation, as the CPU backend does.
//!
//! [`twin`] replays the device's sequence on host buffers laid out as the device's: the same
//! [`SolvePlan`] groups, the same pointer arrays (built by the same code from stand-in
//! addresses and decoded, with bounds and no-overlap checks), the same strided copy, sizes and
//! leading dimensions, with plain loops for each call. So the stage's decomposition, layouts,
//! offsets and padding are tested on machines without a GPU; what only the GPU test checks is
//! cuSOLVER's and cuBLAS's own arithmetic and their reading of the arrays and arguments.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use rayon::prelude::*;

use super::device::Gpu;
use super::normal::{DenseBatch, HostDense};
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

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("the batched solve cannot take this batch: {msg}"))
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Cuda(format!("batched solve: {what}: {e:?}"))
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

/// The stage's decomposition of a batch, shared by the device path and [`twin`]: sizes, the
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

/// The stage's outputs on the host (from [`twin`] or [`SolveBatch::download`]); layouts in
/// the module docs.
#[derive(Debug, Clone)]
pub struct HostSolve {
    /// Patches.
    pub npatch: usize,
    /// Stride of `x` per patch.
    pub nmax: usize,
    /// Side of a block.
    pub nw: usize,
    /// Blocks per patch.
    pub ncore_max: usize,
    /// `[npatch·nmax]`.
    pub x: Vec<f64>,
    /// `[npatch·ncore_max·nw·nw]`.
    pub blocks: Vec<f64>,
    /// potrf's info per patch.
    pub info: Vec<i32>,
}

impl HostSolve {
    /// Patch `b`'s solution (padded to `nmax`).
    pub fn x(&self, b: usize) -> &[f64] {
        &self.x[b * self.nmax..(b + 1) * self.nmax]
    }

    /// `C[(f, w'), (f, w)]` of patch `b`'s core fiber `c`.
    pub fn cov(&self, b: usize, c: usize, wp: usize, w: usize) -> f64 {
        self.blocks[((b * self.ncore_max + c) * self.nw + w) * self.nw + wp]
    }
}
/// Every pointer array of one run, in one vector (uploaded at once), and where each batched
/// call's array starts in it. Built by the device path from the buffers' device addresses and
/// by [`twin`] from stand-in addresses, so that the twin reads the very arrays the calls get.
struct PointerArrays {
    /// The pointers.
    host: Vec<u64>,
    /// potrf's and potrs's `A`: patch `b`'s matrix (`npatch` entries).
    factors: usize,
    /// potrs's `B`: patch `b`'s `x` (`npatch` entries).
    x: usize,
    /// One per group of the plan.
    groups: Vec<GroupArrays>,
}

/// A group's pointer arrays (one entry per patch of the group, in its order).
struct GroupArrays {
    /// trsm's `A`: `L[k0, k0]`.
    l22: usize,
    /// trsm's `B`: the patch's slab of `Y`.
    y: usize,
    /// Per core fiber, gemm's `A` and `B` (`Y_f`) and `C` (`C_ff`).
    fibers: Vec<(usize, usize)>,
}

impl PointerArrays {
    /// The arrays for `plan` with the buffers at device addresses `ata`, `x`, `y`, `blocks`.
    fn new(plan: &SolvePlan, ata: u64, x: u64, y: u64, blocks: u64) -> PointerArrays {
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

/// One of the twin's host buffers standing for a device buffer: where the twin pretends it
/// lies, how long it is, and how it splits into per-patch parts.
#[derive(Clone, Copy)]
struct Stand {
    base: u64,
    len: usize,
    part: usize,
}

impl Stand {
    /// The `count` pointers at `off` of `arrays` read as (patch, offset in the patch's part),
    /// indexed by patch. Panics if a pointer is not into this buffer, or if two entries of one
    /// call point into the same patch's part (a batched call's outputs must not overlap).
    fn decode(
        &self,
        arrays: &PointerArrays,
        off: usize,
        count: usize,
    ) -> Vec<Option<(usize, usize)>> {
        let mut by_patch = vec![None; self.len / self.part];
        for (entry, &p) in arrays.host[off..off + count].iter().enumerate() {
            assert!(
                p >= self.base && (p - self.base).is_multiple_of(8),
                "pointer {p:#x}"
            );
            let e = ((p - self.base) / 8) as usize;
            assert!(e < self.len, "pointer {p:#x} past the buffer");
            let (b, local) = (e / self.part, e % self.part);
            assert!(
                by_patch[b].is_none(),
                "two entries of one call in patch {b}"
            );
            by_patch[b] = Some((entry, local));
        }
        by_patch
    }
}

/// Pairs two decoded operands of one call: both of an entry must be in the same patch (true
/// of every call here; it is what lets the twin run the patches in parallel).
fn pair(
    a: &[Option<(usize, usize)>],
    b: &[Option<(usize, usize)>],
) -> Vec<Option<(usize, usize, usize)>> {
    a.iter()
        .zip(b)
        .map(|(p, q)| match (p, q) {
            (Some((ea, la)), Some((eb, lb))) => {
                assert_eq!(ea, eb, "an entry's operands are in different patches");
                Some((*ea, *la, *lb))
            }
            (None, None) => None,
            _ => panic!("an entry's operands are in different patches"),
        })
        .collect()
}

/// Host twin of the stage: the device's sequence of calls on host buffers laid out as the
/// device's (a copy of `ata` factored in place, `x`, `Y`, the blocks), each call reading the
/// same pointer arrays ([`PointerArrays`], decoded against stand-in addresses) and running
/// plain loops (column-oriented like the BLAS they stand for) on each entry. `dense` is only
/// read. Where a factorisation fails the patch gets its `info`, and NaN for its `x` and blocks.
pub fn twin(dense: &HostDense, shapes: &[PatchShape]) -> Result<HostSolve, GpuError> {
    twin_factored(dense, shapes).map(|(out, _)| out)
}

/// [`twin`], also returning the factored copy of `ata` (L in the lower triangles).
pub fn twin_factored(
    dense: &HostDense,
    shapes: &[PatchShape],
) -> Result<(HostSolve, Vec<f64>), GpuError> {
    let n: Vec<usize> = shapes.iter().map(PatchShape::nunknown).collect();
    let plan = SolvePlan::new(dense.npatch, dense.nmax, &n, shapes)?;
    let (npatch, nmax) = (plan.npatch, plan.nmax);
    if dense.ata.len() != npatch * nmax * nmax || dense.atp.len() != npatch * nmax {
        return Err(bad(format!(
            "host batch of {} and {} values for {npatch} patches of {nmax}",
            dense.ata.len(),
            dense.atp.len()
        )));
    }
    let nm2 = nmax * nmax;
    let per_blocks = plan.ncore_max * plan.nw * plan.nw;
    let stand = |k: u64, len: usize, part: usize| Stand {
        base: k << 40,
        len,
        part,
    };
    let (s_ata, s_x, s_y, s_blk) = (
        stand(1, npatch * nm2, nm2),
        stand(2, npatch * nmax, nmax),
        stand(3, npatch * plan.slab, plan.slab),
        stand(4, plan.blocks_len(), per_blocks),
    );
    let arrays = PointerArrays::new(&plan, s_ata.base, s_x.base, s_y.base, s_blk.base);

    let mut ata = dense.ata.clone();
    // memcpy_dtod AᵀWp → x; memset of the blocks and of Y.
    let mut x = dense.atp.clone();
    let mut blocks = vec![0.0; plan.blocks_len()];
    let mut y = vec![0.0; npatch * plan.slab];

    // potrfBatched: info[entry] for the entry's matrix.
    let fac = s_ata.decode(&arrays, arrays.factors, npatch);
    let mut info = vec![0i32; npatch];
    let results: Vec<(usize, i32)> = ata
        .par_chunks_mut(nm2)
        .zip(fac.par_iter())
        .filter_map(|(a, e)| e.map(|(entry, off)| (entry, potrf_lower(&mut a[off..], nmax, nmax))))
        .collect();
    for (entry, i) in results {
        info[entry] = i;
    }

    // potrsBatched (nrhs = 1).
    let sol = pair(&fac, &s_x.decode(&arrays, arrays.x, npatch));
    x.par_chunks_mut(nmax)
        .zip(ata.par_chunks(nm2))
        .zip(sol.par_iter())
        .for_each(|((xb, a), e)| {
            if let Some((_, la, lx)) = *e {
                potrs_lower(&a[la..], nmax, nmax, &mut xb[lx..]);
            }
        });

    // cublasDcopy of the ones into Y with stride nmax + 1.
    for i in 0..plan.units() {
        y[i * (nmax + 1)] = 1.0;
    }

    for (g, ga) in plan.groups.iter().zip(&arrays.groups) {
        let count = g.patches.len();
        // trsmBatched.
        let tr = pair(
            &s_ata.decode(&arrays, ga.l22, count),
            &s_y.decode(&arrays, ga.y, count),
        );
        y.par_chunks_mut(plan.slab)
            .zip(ata.par_chunks(nm2))
            .zip(tr.par_iter())
            .for_each(|((yb, a), e)| {
                if let Some((_, la, ly)) = *e {
                    trsm_lower(&a[la..], nmax, g.m, g.ncols(), &mut yb[ly..], nmax);
                }
            });
        // gemmBatched per core fiber.
        for (c, &(yf, cf)) in ga.fibers.iter().enumerate() {
            let gm = pair(
                &s_y.decode(&arrays, yf, count),
                &s_blk.decode(&arrays, cf, count),
            );
            let k = g.m - c * g.nwt;
            blocks
                .par_chunks_mut(per_blocks)
                .zip(y.par_chunks(plan.slab))
                .zip(gm.par_iter())
                .for_each(|((cb, yb), e)| {
                    if let Some((_, ly, lc)) = *e {
                        gram(&yb[ly..], nmax, k, g.nwt, &mut cb[lc..], plan.nw);
                    }
                });
        }
    }

    // What the device leaves there is meaningless; the twin says so with NaN.
    for (b, &i) in info.iter().enumerate() {
        if i != 0 {
            x[b * nmax..(b + 1) * nmax].fill(f64::NAN);
            blocks[b * per_blocks..(b + 1) * per_blocks].fill(f64::NAN);
        }
    }
    let out = HostSolve {
        npatch,
        nmax,
        nw: plan.nw,
        ncore_max: plan.ncore_max,
        x,
        blocks,
        info,
    };
    Ok((out, ata))
}

/// Lower Cholesky factor of the `n × n` column-major `a` (leading dimension `lda`), in place,
/// right-looking by columns; the strict upper triangle is not touched. Returns LAPACK's info:
/// `j + 1` when the pivot of column `j` is not positive (NaN included), else 0.
fn potrf_lower(a: &mut [f64], n: usize, lda: usize) -> i32 {
    for j in 0..n {
        let (head, tail) = a.split_at_mut((j + 1) * lda);
        let col = &mut head[j * lda..];
        let d = col[j];
        if !(d > 0.0) {
            return (j + 1) as i32;
        }
        let l = d.sqrt();
        col[j] = l;
        col[j + 1..n].iter_mut().for_each(|v| *v /= l);
        // A[k.., k] -= L[k.., j]·L[k, j] for every later column k (rows k.. of column k).
        for k in j + 1..n {
            let lk = col[k];
            let start = (k - j - 1) * lda;
            let dst = &mut tail[start + k..start + n];
            for (t, &v) in dst.iter_mut().zip(&col[k..n]) {
                *t = (-v).mul_add(lk, *t);
            }
        }
    }
    0
}

/// Solves `L Lᵀ x = b` in place (`b` in `x`), `l` from [`potrf_lower`] (leading dimension
/// `lda`).
fn potrs_lower(l: &[f64], n: usize, lda: usize, x: &mut [f64]) {
    for j in 0..n {
        let col = &l[j * lda..j * lda + n];
        x[j] /= col[j];
        let v = x[j];
        for (xi, &lij) in x[j + 1..n].iter_mut().zip(&col[j + 1..]) {
            *xi = (-v).mul_add(lij, *xi);
        }
    }
    for j in (0..n).rev() {
        let col = &l[j * lda..j * lda + n];
        let s = col[j + 1..]
            .iter()
            .zip(&x[j + 1..n])
            .fold(0.0f64, |s, (&lij, &xi)| lij.mul_add(xi, s));
        x[j] = (x[j] - s) / col[j];
    }
}

/// `B ← L⁻¹ B` for the `m × m` lower triangle at `l` (leading dimension `lda`) and the
/// `m × ncols` `b` (leading dimension `ldb`): dtrsm (Left, Lower, NoTrans, NonUnit), by
/// columns, skipping zero entries as the reference BLAS does, which here skips each unit
/// column's leading zeros.
fn trsm_lower(l: &[f64], lda: usize, m: usize, ncols: usize, b: &mut [f64], ldb: usize) {
    for j in 0..ncols {
        let col = &mut b[j * ldb..j * ldb + m];
        for r in 0..m {
            if col[r] == 0.0 {
                continue;
            }
            let lcol = &l[r * lda..r * lda + m];
            col[r] /= lcol[r];
            let v = col[r];
            for (ci, &lir) in col[r + 1..].iter_mut().zip(&lcol[r + 1..]) {
                *ci = (-v).mul_add(lir, *ci);
            }
        }
    }
}

/// `C = Yᵀ Y` for the `k × nwt` `y` (leading dimension `ldy`) into the column-major `c`
/// (leading dimension `ldc`): dgemm (T, N) with both operands the same.
fn gram(y: &[f64], ldy: usize, k: usize, nwt: usize, c: &mut [f64], ldc: usize) {
    for a in 0..nwt {
        let ya = &y[a * ldy..a * ldy + k];
        for ap in 0..nwt {
            let yp = &y[ap * ldy..ap * ldy + k];
            c[a * ldc + ap] = yp
                .iter()
                .zip(ya)
                .fold(0.0f64, |s, (&p, &q)| p.mul_add(q, s));
        }
    }
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

    /// Copies the outputs back (waits for the stage), failing if potrs refused an argument.
    pub fn download(&self, gpu: &Gpu) -> Result<HostSolve, GpuError> {
        let st = &gpu.stream;
        let potrs = st
            .clone_dtoh(&self.potrs_info)
            .map_err(cuda("downloading potrs's info"))?;
        check_potrs_info(potrs[0])?;
        Ok(HostSolve {
            npatch: self.npatch,
            nmax: self.nmax,
            nw: self.nw,
            ncore_max: self.ncore_max,
            x: st.clone_dtoh(&self.x).map_err(cuda("downloading x"))?,
            blocks: st
                .clone_dtoh(&self.blocks)
                .map_err(cuda("downloading the blocks"))?,
            info: st
                .clone_dtoh(&self.info)
                .map_err(cuda("downloading info"))?,
        })
    }
}

/// potrsBatched's single info: nonzero only when an argument was invalid (a bug here, not a
/// bad patch).
pub fn check_potrs_info(info: i32) -> Result<(), GpuError> {
    if info != 0 {
        return Err(GpuError::Cuda(format!(
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
    if s == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Cuda(format!("{routine}: {s:?}")))
    }
}

pub(super) fn solver_ok(routine: &str, s: cusolver::cusolverStatus_t) -> Result<(), GpuError> {
    if s == cusolver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Cuda(format!("{routine}: {s:?}")))
    }
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
    pub(super) fn dn_handle(&self) -> cusolver::cusolverDnHandle_t {
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

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array2, Axis};
    use ndarray_linalg::{Eigh, InverseC, SolveC, UPLO};

    use super::*;
    use crate::extract::cpu::oracle;
    use crate::extract::gpu::scene::{Bundle, Masked, Pixels, Recipe, Scene};
    use crate::extract::gpu::{device, normal};
    use crate::extract::PatchInput;
    use crate::patch::Plan;

    /// Random pixels; with `mask_spot`, one unknown of the first patch with every pixel
    /// masked: only the regularisation (λ = 1e-4 of the largest weight) holds it, and its
    /// neighbours in wavelength lose most of their pixels, which with `regularize = 0` leaves
    /// the patch with a condition number ~1e9 on the toy PSF.
    fn recipe(mask_spot: bool) -> Recipe {
        Recipe {
            trim: None,
            pixels: Pixels::Random,
            masked: mask_spot.then_some(Masked::MiddleBin),
        }
    }

    impl Scene {
        fn shapes(&self) -> Vec<PatchShape> {
            self.items.iter().map(|(p, _)| PatchShape::of(p)).collect()
        }
    }

    /// 12 toy fibers in 5 subbundles of 3, 3, 2, 2, 2 core fibers solving 4, 5, 4, 4, 3 fibers
    /// (first core fiber 0 or 1), 32 bins, four wavelength patches each: every size varies.
    fn toy_scene(seed: u64, mask_spot: bool) -> Scene {
        Bundle::toy(5).into_scene(seed, recipe(mask_spot))
    }

    /// Patches of one bundle at the real sizes (74 bins, 6 or 7 fibers solved, nmax 518) on the
    /// real PSF when the shared data is there, else on a toy PSF of 25 fibers: `picks` of a full
    /// bundle (all of it for `None`), plus two patches of a 23-fiber frame edge, whose last two
    /// subbundles have 4 core fibers.
    fn bundle_scene(picks: Option<&[usize]>, seed: u64, mask_spot: bool) -> (Scene, &'static str) {
        let mut bundle = Bundle::real_size().pick(picks);
        let nwave = bundle.grid.wave.len();
        let edge = Plan::new(0, 23, nwave, bundle.psf.nfiber(), &bundle.popts);
        let four: Vec<Patch> = edge.patches[0]
            .iter()
            .filter(|p| p.nspec == 4)
            .copied()
            .collect();
        bundle.patches.extend([four[3], four[four.len() - 2]]);
        let what = bundle.what;
        (bundle.into_scene(seed, recipe(mask_spot)), what)
    }

    fn max_abs<'a>(v: impl IntoIterator<Item = &'a f64>) -> f64 {
        v.into_iter().fold(0.0f64, |m, x| m.max(x.abs()))
    }

    /// Unit roundoff of f64.
    const EPS: f64 = f64::EPSILON / 2.0;

    /// The 2-norm condition number of a symmetric positive-definite matrix.
    fn condition(m: &Array2<f64>) -> f64 {
        let (e, _) = m.eigh(UPLO::Lower).unwrap();
        e[e.len() - 1] / e[0]
    }

    /// The dense reference of one patch: x and C = (AᵀWA)⁻¹ of the unpadded n × n matrix by
    /// LAPACK (dpotrf/dpotrs, dpotri).
    fn lapack_reference(m: &Array2<f64>, rhs: &Array1<f64>) -> (Array1<f64>, Array2<f64>) {
        (m.solvec(rhs).unwrap(), m.invc().unwrap())
    }

    /// The patch's matrix and right-hand side as `dense` holds them, without the padding.
    fn from_batch(dense: &HostDense, b: usize, n: usize) -> (Array2<f64>, Array1<f64>) {
        let m = Array2::from_shape_fn((n, n), |(v, u)| dense.ata(b, v, u));
        let rhs = dense.atp[b * dense.nmax..b * dense.nmax + n]
            .to_vec()
            .into();
        (m, rhs)
    }

    /// The CPU oracle's normal equations (dense `A` from `cpu::oracle`, the regularisation of
    /// `cpu::normal::regularization`): an independent build of the same system.
    fn from_oracle(inp: &PatchInput<'_>, reg: f64, eps: f64) -> (Array2<f64>, Array1<f64>) {
        let a = oracle::projection_matrix(inp);
        let pix: Array1<f64> = inp.pix.iter().copied().collect();
        let ivar: Array1<f64> = inp.ivar.iter().copied().collect();
        let wa = &a * &ivar.view().insert_axis(Axis(1));
        let mut m = a.t().dot(&wa);
        let rhs = wa.t().dot(&pix);
        let fw = wa.sum_axis(Axis(0));
        let minweight = 1e-4 * fw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for (u, &f) in fw.iter().enumerate() {
            let l2 = if f < minweight {
                (minweight - f) * (minweight - f)
            } else {
                reg * reg
            };
            m[[u, u]] += l2 + eps;
        }
        (m, rhs)
    }

    /// Differences of patch `b` of `got` from the reference `x`, `c` (x relative to the largest
    /// |x|, the core blocks to their largest entry), asserting what must be exact: info 0, x's
    /// padding 0, blocks of absent fibers and bins 0, every element finite.
    fn compare_patch(
        got: &HostSolve,
        b: usize,
        s: &PatchShape,
        x: &Array1<f64>,
        c: &Array2<f64>,
    ) -> (f64, f64) {
        assert_eq!(got.info[b], 0, "patch {b}");
        let (n, nwt) = (s.nunknown(), s.nwavetot);
        let gx = got.x(b);
        let sx = max_abs(x.iter());
        let mut wx = 0.0f64;
        for u in 0..got.nmax {
            if u < n {
                wx = wx.max((gx[u] - x[u]).abs() / sx);
            } else {
                assert_eq!(gx[u], 0.0, "patch {b}: x padding at {u}");
            }
        }
        let core = |ci: usize, wp: usize, w: usize| {
            let f0 = (s.core_fiber + ci) * nwt;
            c[[f0 + wp, f0 + w]]
        };
        let mut sc = 0.0f64;
        for ci in 0..s.ncore {
            for w in 0..nwt {
                for wp in 0..nwt {
                    sc = sc.max(core(ci, wp, w).abs());
                }
            }
        }
        let mut wc = 0.0f64;
        for ci in 0..got.ncore_max {
            for w in 0..got.nw {
                for wp in 0..got.nw {
                    let g = got.cov(b, ci, wp, w);
                    assert!(g.is_finite(), "patch {b} block {ci} ({wp}, {w}) = {g}");
                    if ci < s.ncore && w < nwt && wp < nwt {
                        wc = wc.max((g - core(ci, wp, w)).abs() / sc);
                    } else {
                        assert_eq!(g, 0.0, "patch {b}: absent block {ci} ({wp}, {w})");
                    }
                }
            }
        }
        (wx, wc)
    }

    /// Worst [`compare_patch`] over the batch against `reference(b)`.
    fn compare_with(
        got: &HostSolve,
        shapes: &[PatchShape],
        mut reference: impl FnMut(usize) -> (Array1<f64>, Array2<f64>),
    ) -> (f64, f64) {
        let mut worst = (0.0f64, 0.0f64);
        for (b, s) in shapes.iter().enumerate() {
            let (x, c) = reference(b);
            let (wx, wc) = compare_patch(got, b, s, &x, &c);
            worst = (worst.0.max(wx), worst.1.max(wc));
        }
        worst
    }

    #[test]
    fn plan_groups_patches_and_places_e_on_one_progression() {
        let scene = toy_scene(1, false);
        let shapes = scene.shapes();
        let n: Vec<usize> = shapes.iter().map(PatchShape::nunknown).collect();
        let nmax = *n.iter().max().unwrap();
        let plan = SolvePlan::new(shapes.len(), nmax, &n, &shapes).unwrap();
        assert_eq!((plan.nmax, plan.nw, plan.ncore_max), (5 * 32, 32, 3));
        assert_eq!(plan.ncols_max, 3 * 32);
        // (k0, m, ncore): the first subbundle (no left neighbour), the fifth (bundle edge: no
        // right neighbour), the third and fourth (same sizes), the second.
        let keys: Vec<_> = plan.groups.iter().map(|g| (g.k0, g.m, g.ncore)).collect();
        assert_eq!(
            keys,
            vec![(0, 128, 3), (32, 64, 2), (32, 96, 2), (32, 128, 3)]
        );
        let mut seen: Vec<usize> = plan.groups.iter().flat_map(|g| g.patches.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..shapes.len()).collect::<Vec<_>>());
        for g in &plan.groups {
            for &b in &g.patches {
                let s = shapes[b];
                assert_eq!(g.k0, s.core_fiber * s.nwavetot);
                assert_eq!(g.k0 + g.m, s.nunknown());
                // The trailing triangle and the last Gram operand stay inside the patch.
                assert!(plan.trailing(b, g.k0) + (g.m - 1) * (nmax + 1) < plan.factor(b + 1));
                let last = plan.y_fiber(b, g.ncore - 1, g.nwt);
                let rows = g.m - (g.ncore - 1) * g.nwt;
                assert!(last + (g.nwt - 1) * nmax + rows <= plan.y(b + 1));
            }
        }
        // The strided copy's unit entries are exactly the diagonals of the slabs.
        let units: std::collections::BTreeSet<usize> =
            (0..plan.units()).map(|i| i * (nmax + 1)).collect();
        let diagonals: std::collections::BTreeSet<usize> = (0..plan.npatch)
            .flat_map(|b| (0..plan.ncols_max).map(move |r| (b, r)))
            .map(|(b, r)| plan.y(b) + r * nmax + r)
            .collect();
        assert_eq!(units, diagonals);
        assert!(*units.last().unwrap() < plan.npatch * plan.slab);
    }

    #[test]
    fn plan_refuses_inconsistent_shapes() {
        let s = PatchShape {
            nfiber: 7,
            core_fiber: 1,
            ncore: 5,
            nwavetot: 74,
        };
        assert!(SolvePlan::new(2, 518, &[518, 518], &[s, s]).is_ok());
        let err =
            |n: &[usize], sh: &[PatchShape]| SolvePlan::new(2, 518, n, sh).unwrap_err().to_string();
        assert!(err(&[518], &[s, s]).contains("unknown counts"));
        assert!(err(&[518, 444], &[s, s]).contains("444"));
        let too_many = PatchShape { core_fiber: 3, ..s };
        assert!(err(&[518, 518], &[s, too_many]).contains("core fibers"));
        let big = PatchShape { nfiber: 8, ..s };
        assert!(err(&[518, 592], &[s, big]).contains("at most 518"));
        assert!(SolvePlan::new(0, 518, &[], &[]).is_err());
    }

    #[test]
    fn twin_matches_lapack_on_toy_patches() {
        let scene = toy_scene(2, false);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        for (reg, eps) in [(0.0, 1e-15), (0.05, 1e-8)] {
            let dense = normal::twin(&layout, reg, eps);
            let got = twin(&dense, &shapes).unwrap();
            let same = compare_with(&got, &shapes, |b| {
                let (m, r) = from_batch(&dense, b, shapes[b].nunknown());
                lapack_reference(&m, &r)
            });
            let oracle = compare_with(&got, &shapes, |b| {
                let (m, r) = from_oracle(&inputs[b], reg, eps);
                lapack_reference(&m, &r)
            });
            eprintln!(
                "twin vs LAPACK, toy, regularize {reg}: same matrix x {:.1e} C_ff {:.1e}; \
                 oracle's matrix x {:.1e} C_ff {:.1e}",
                same.0, same.1, oracle.0, oracle.1
            );
            assert!(same.0 <= 1e-10 && same.1 <= 1e-10, "{same:?}");
            assert!(oracle.0 <= 1e-10 && oracle.1 <= 1e-10, "{oracle:?}");
            // The GPU test's comparison takes the twin against itself (its exact checks hold).
            assert_eq!(worst(&compare_with_twin(&got, &got, &shapes)), (0.0, 0.0));
        }
    }

    #[test]
    fn twin_matches_lapack_at_the_real_sizes() {
        // Subbundle 0 (no left neighbour: 6 fibers, first core fiber 0), 1, 2, 4 (6 fibers,
        // first core fiber 1), the first and last bins, and two 4-fiber frame-edge subbundles.
        let picks = [0usize, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10];
        let (scene, what) = bundle_scene(Some(&picks), 3, false);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.nmax, 7 * 74);
        let n: Vec<usize> = (0..layout.npatch).map(|b| layout.n(b)).collect();
        let groups = SolvePlan::new(layout.npatch, layout.nmax, &n, &shapes)
            .unwrap()
            .groups
            .len();
        assert!(groups >= 4, "{groups} groups");
        assert!(shapes.iter().any(|s| s.ncore == 4) && shapes.iter().any(|s| s.ncore == 5));
        let dense = normal::twin(&layout, 0.0, 1e-15);
        let got = twin(&dense, &shapes).unwrap();
        let same = compare_with(&got, &shapes, |b| {
            let (m, r) = from_batch(&dense, b, shapes[b].nunknown());
            lapack_reference(&m, &r)
        });
        let oracle = compare_with(&got, &shapes, |b| {
            let (m, r) = from_oracle(&inputs[b], 0.0, 1e-15);
            lapack_reference(&m, &r)
        });
        eprintln!(
            "twin vs LAPACK, {what}, {} patches in {groups} groups: same matrix x {:.1e} C_ff \
             {:.1e}; oracle's matrix x {:.1e} C_ff {:.1e}",
            shapes.len(),
            same.0,
            same.1,
            oracle.0,
            oracle.1
        );
        assert!(same.0 <= 1e-10 && same.1 <= 1e-10, "{same:?}");
        assert!(oracle.0 <= 1e-10 && oracle.1 <= 1e-10, "{oracle:?}");
    }

    /// A spot with every pixel masked and `regularize = 0` make a patch with a condition number
    /// ~1e9. Its errors exceed 1e-10 against a matrix built in another summation order, but
    /// stay within κ·ε, what rounding the input alone explains; the other patches stay within
    /// 1e-10.
    #[test]
    fn twin_errors_on_an_ill_conditioned_patch_stay_within_its_conditioning() {
        let scene = toy_scene(2, true);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        let dense = normal::twin(&layout, 0.0, 1e-15);
        let got = twin(&dense, &shapes).unwrap();
        let mut kappa0 = 0.0;
        for (b, s) in shapes.iter().enumerate() {
            let (m, r) = from_batch(&dense, b, s.nunknown());
            let kappa = condition(&m);
            let same = {
                let (x, c) = lapack_reference(&m, &r);
                compare_patch(&got, b, s, &x, &c)
            };
            let (mo, ro) = from_oracle(&inputs[b], 0.0, 1e-15);
            let oracle = {
                let (x, c) = lapack_reference(&mo, &ro);
                compare_patch(&got, b, s, &x, &c)
            };
            let bound = (kappa * EPS).max(1e-10);
            if b == 0 {
                kappa0 = kappa;
                eprintln!(
                    "ill-conditioned patch, κ {kappa:.1e}: same matrix x {:.1e} C_ff {:.1e}; \
                     oracle's matrix x {:.1e} C_ff {:.1e} (κ·ε {:.1e})",
                    same.0,
                    same.1,
                    oracle.0,
                    oracle.1,
                    kappa * EPS
                );
            }
            for w in [same.0, same.1, oracle.0, oracle.1] {
                assert!(w <= bound, "patch {b}: κ {kappa:.1e}, error {w:.1e}");
            }
        }
        assert!(
            kappa0 > 1e8,
            "the masked spot should make patch 0 ill-conditioned"
        );
    }

    /// A negated diagonal entry (and a NaN one) fails the factorisation of that patch only, at
    /// that column; every other patch's results are untouched.
    #[test]
    fn a_non_positive_definite_patch_is_reported_alone() {
        let scene = toy_scene(4, false);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        let dense = normal::twin(&layout, 0.0, 1e-15);
        let good = twin(&dense, &shapes).unwrap();
        let nmax = dense.nmax;
        let mut bad = dense.clone();
        let (k, u) = (2usize, 37usize);
        let (j, v) = (5usize, 90usize);
        assert!(u < shapes[k].nunknown() && v < shapes[j].nunknown());
        bad.ata[(k * nmax + u) * nmax + u] *= -1.0;
        bad.ata[(j * nmax + v) * nmax + v] = f64::NAN;
        let got = twin(&bad, &shapes).unwrap();
        let per = got.ncore_max * got.nw * got.nw;
        for b in 0..shapes.len() {
            let want = match b {
                _ if b == k => u as i32 + 1,
                _ if b == j => v as i32 + 1,
                _ => 0,
            };
            assert_eq!(got.info[b], want, "patch {b}");
            let (gx, gb) = (got.x(b), &got.blocks[b * per..(b + 1) * per]);
            if want != 0 {
                assert!(gx.iter().chain(gb).all(|v| v.is_nan()), "patch {b}");
            } else {
                let same =
                    |a: &[f64], c: &[f64]| a.iter().zip(c).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same(gx, good.x(b)), "patch {b}: x changed");
                assert!(same(gb, &good.blocks[b * per..(b + 1) * per]), "patch {b}");
            }
        }
    }

    /// Without cuBLAS/cuSOLVER (this build's CI) the check names what is missing instead of
    /// panicking; with them it passes.
    #[test]
    fn library_check_does_not_panic() {
        match check_libraries() {
            Ok(()) => eprintln!("cuBLAS and cuSOLVER present with every symbol used"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{msg}");
                assert!(
                    msg.contains("cuBLAS") || msg.contains("cuSOLVER") || msg.contains("lack"),
                    "{msg}"
                );
            }
        }
    }

    fn poison(gpu: &Gpu, out: &mut SolveBatch) {
        let st = &gpu.stream;
        st.memcpy_htod(&vec![f64::NAN; out.x.len()], &mut out.x)
            .unwrap();
        st.memcpy_htod(&vec![f64::NAN; out.blocks.len()], &mut out.blocks)
            .unwrap();
        st.memcpy_htod(&vec![-77i32; out.info.len()], &mut out.info)
            .unwrap();
    }

    /// Per patch, the differences of the device's results from the twin's (relative to the
    /// twin's largest |x| and |C_ff|), zero where the twin's info is not 0 (asserted equal to
    /// the device's everywhere); absent blocks, fibers and bins must be exactly 0 and nothing
    /// may stay NaN.
    fn compare_with_twin(
        got: &HostSolve,
        tw: &HostSolve,
        shapes: &[PatchShape],
    ) -> Vec<(f64, f64)> {
        assert_eq!(got.info, tw.info);
        let per = got.ncore_max * got.nw * got.nw;
        (0..got.npatch)
            .map(|b| {
                if tw.info[b] != 0 {
                    return (0.0, 0.0);
                }
                let (gx, tx) = (got.x(b), tw.x(b));
                let sx = max_abs(tx);
                let mut wx = 0.0f64;
                for (g, t) in gx.iter().zip(tx) {
                    assert!(g.is_finite(), "patch {b}: x {g}");
                    wx = wx.max((g - t).abs() / sx);
                }
                let gb = &got.blocks[b * per..(b + 1) * per];
                let tb = &tw.blocks[b * per..(b + 1) * per];
                let sc = max_abs(tb);
                let (nw, s) = (got.nw, shapes[b]);
                let mut wc = 0.0f64;
                for (e, (g, t)) in gb.iter().zip(tb).enumerate() {
                    let (c, w, wp) = (e / (nw * nw), e / nw % nw, e % nw);
                    assert!(g.is_finite(), "patch {b}: block {c} ({wp}, {w}) = {g}");
                    if c >= s.ncore || w >= s.nwavetot || wp >= s.nwavetot {
                        assert_eq!(*g, 0.0, "patch {b}: absent block {c} ({wp}, {w})");
                    }
                    wc = wc.max((g - t).abs() / sc);
                }
                (wx, wc)
            })
            .collect()
    }

    fn worst(v: &[(f64, f64)]) -> (f64, f64) {
        v.iter()
            .fold((0.0f64, 0.0f64), |w, e| (w.0.max(e.0), w.1.max(e.1)))
    }

    /// The stage on GPU 0 against the twin: at the real sizes (a bundle's worth of patches plus
    /// two 4-fiber frame-edge ones, nmax 518) with outputs poisoned with NaN beforehand, x, C_ff
    /// and the factor itself to 1e-10; a non-positive-definite patch reported alone; and the
    /// toy batch (32 bins, 2 or 3 core fibers, an ill-conditioned patch) within max(1e-10, κ·ε).
    #[test]
    fn gpu_matches_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let mut solver = Solver::new(&gpu).expect("cuBLAS and cuSOLVER handles");
        let kernels = normal::Kernels::load(&gpu).expect("normal.cu compiles and loads");
        let (scene, what) = bundle_scene(None, 5, false);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.nmax, 7 * 74);
        let mut dense = normal::DenseBatch::alloc(&gpu, &layout).unwrap();
        let up = normal::UploadedLayout::upload(&gpu, &layout, Default::default()).unwrap();
        normal::build_into(&gpu, &kernels, &up.buffers(), 0.0, 1e-15, &mut dense).unwrap();
        let host = dense.download(&gpu).unwrap();
        let nmax = host.nmax;

        let (tw, tw_factor) = twin_factored(&host, &shapes).unwrap();
        let mut out = SolveBatch::alloc(&gpu, &dense, &shapes).unwrap();
        poison(&gpu, &mut out);
        solver
            .solve_into(&gpu, &mut dense, &shapes, &mut out)
            .unwrap();
        let got = out.download(&gpu).unwrap();
        let (wx, wc) = worst(&compare_with_twin(&got, &tw, &shapes));

        // The factor (lower triangle; cuSOLVER leaves the upper one as workspace garbage).
        let fac = dense.download(&gpu).unwrap();
        let wl = (0..host.npatch)
            .into_par_iter()
            .map(|b| {
                let a = &tw_factor[b * nmax * nmax..(b + 1) * nmax * nmax];
                let sl = max_abs((0..nmax).flat_map(|u| a[u * nmax + u..(u + 1) * nmax].iter()));
                let mut w = 0.0f64;
                for u in 0..nmax {
                    for v in u..nmax {
                        let g = fac.ata(b, v, u);
                        assert!(g.is_finite(), "patch {b}: L[{v}, {u}] = {g}");
                        w = w.max((g - a[u * nmax + v]).abs() / sl);
                    }
                }
                w
            })
            .reduce(|| 0.0, f64::max);
        eprintln!(
            "GPU ({}) vs twin, {} patches, {what}: x {wx:.1e}, C_ff {wc:.1e}, L {wl:.1e}",
            gpu.info.name, host.npatch
        );
        assert!(wx <= 1e-10 && wc <= 1e-10 && wl <= 1e-10, "{wx} {wc} {wl}");

        // A negated diagonal entry in one patch: reported there only, the rest as before.
        let mut bad = host.clone();
        let (k, u) = (3usize, 100usize);
        bad.ata[(k * nmax + u) * nmax + u] *= -1.0;
        gpu.stream.memcpy_htod(&bad.ata, &mut dense.ata).unwrap();
        poison(&gpu, &mut out);
        solver
            .solve_into(&gpu, &mut dense, &shapes, &mut out)
            .unwrap();
        let got = out.download(&gpu).unwrap();
        let tw_bad = twin(&bad, &shapes).unwrap();
        assert_eq!(tw_bad.info[k], u as i32 + 1);
        assert_eq!(got.info[k], u as i32 + 1);
        assert_eq!(got.info.iter().filter(|&&i| i != 0).count(), 1);
        let (bx, bc) = worst(&compare_with_twin(&got, &tw_bad, &shapes));
        eprintln!("with patch {k} not positive definite: the others x {bx:.1e}, C_ff {bc:.1e}");
        assert!(bx <= 1e-10 && bc <= 1e-10, "{bx} {bc}");

        // The one-call entry point, reusing the solver's workspace, on the restored matrices.
        gpu.stream.memcpy_htod(&host.ata, &mut dense.ata).unwrap();
        let again = solver
            .solve(&gpu, &mut dense, &shapes)
            .unwrap()
            .download(&gpu)
            .unwrap();
        let (ax, ac) = worst(&compare_with_twin(&again, &tw, &shapes));
        assert!(ax <= 1e-10 && ac <= 1e-10, "{ax} {ac}");

        // The toy batch: other block sizes, core counts and groups through the same solver.
        let scene = toy_scene(2, true);
        let inputs = scene.inputs();
        let shapes = scene.shapes();
        let layout = normal::BatchLayout::new(&inputs).unwrap();
        let mut dense = normal::DenseBatch::alloc(&gpu, &layout).unwrap();
        let up = normal::UploadedLayout::upload(&gpu, &layout, Default::default()).unwrap();
        normal::build_into(&gpu, &kernels, &up.buffers(), 0.0, 1e-15, &mut dense).unwrap();
        let host = dense.download(&gpu).unwrap();
        let tw = twin(&host, &shapes).unwrap();
        let mut out = SolveBatch::alloc(&gpu, &dense, &shapes).unwrap();
        poison(&gpu, &mut out);
        solver
            .solve_into(&gpu, &mut dense, &shapes, &mut out)
            .unwrap();
        let got = out.download(&gpu).unwrap();
        let per_patch = compare_with_twin(&got, &tw, &shapes);
        for (b, (s, &(ex, ec))) in shapes.iter().zip(&per_patch).enumerate() {
            let (m, _) = from_batch(&host, b, s.nunknown());
            let bound = (condition(&m) * EPS).max(1e-10);
            assert!(
                ex <= bound && ec <= bound,
                "toy patch {b}: {ex:.1e} {ec:.1e}"
            );
        }
        let (tx, tc) = worst(&per_patch[1..]);
        eprintln!(
            "GPU vs twin, toy: ill-conditioned patch x {:.1e} C_ff {:.1e}, the others x \
             {tx:.1e} C_ff {tc:.1e}",
            per_patch[0].0, per_patch[0].1
        );
    }
}
