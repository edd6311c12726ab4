//! Host twin of the solve stage (`solve::Solver`): the device's sequence of cuSOLVER and
//! cuBLAS calls replayed on host buffers laid out as the device's. The same [`SolvePlan`]
//! groups, the same pointer arrays (built by the product's own code from stand-in addresses
//! and decoded here, with bounds and no-overlap checks), the same strided copy, sizes and
//! leading dimensions, with plain loops for each call. So the stage's decomposition, layouts,
//! offsets and padding are tested on machines without a GPU; what only the GPU test checks is
//! cuSOLVER's and cuBLAS's own arithmetic and their reading of the arrays and arguments.
//! Test-only; re-exports the product's `solve`.

use rayon::prelude::*;

use super::super::device::Gpu;
use super::super::solve::plan::ColumnArrays;
pub(super) use super::super::solve::plan::PointerArrays;
pub(super) use super::super::solve::*;
use super::super::GpuError;
use super::normal::HostDense;
use crate::patch::Patch;

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
    /// `Y = L⁻¹E` as the stage leaves it in the solver's workspace (the twin's only: empty
    /// from the device), which [`twin_core_columns`] goes on from.
    pub y: Vec<f64>,
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

/// One of the twin's host buffers standing for a device buffer: where the twin pretends it
/// lies, how long it is, and how it splits into per-patch parts.
#[derive(Clone, Copy)]
struct Stand {
    base: u64,
    len: usize,
    part: usize,
}

impl Stand {
    /// The `count` pointers at `off` of `host` (the pointer arrays) read as (entry, offset in
    /// the patch's part), indexed by patch (the part's index). Panics if a pointer is not into
    /// this buffer, or if two entries of one call point into the same patch's part (a batched
    /// call's outputs must not overlap).
    fn decode(&self, host: &[u64], off: usize, count: usize) -> Vec<Option<(usize, usize)>> {
        let mut by_patch = vec![None; self.len / self.part];
        for (entry, &p) in host[off..off + count].iter().enumerate() {
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
        stand(3, plan.z_len(), plan.slab),
        stand(4, plan.blocks_len(), per_blocks),
    );
    let arrays = PointerArrays::new(&plan, s_ata.base, s_x.base, s_y.base, s_blk.base);

    let mut ata = dense.ata.clone();
    // memcpy_dtod AᵀWp → x; memset of the blocks and of Y.
    let mut x = dense.atp.clone();
    let mut blocks = vec![0.0; plan.blocks_len()];
    let mut y = vec![0.0; plan.z_len()];

    // potrfBatched: info[entry] for the entry's matrix.
    let fac = s_ata.decode(&arrays.host, arrays.factors, npatch);
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
    let sol = pair(&fac, &s_x.decode(&arrays.host, arrays.x, npatch));
    x.par_chunks_mut(nmax)
        .zip(ata.par_chunks(nm2))
        .zip(sol.par_iter())
        .for_each(|((xb, a), e)| {
            if let Some((_, la, lx)) = *e {
                potrs_lower(&a[la..], nmax, nmax, &mut xb[lx..]);
            }
        });

    for (g, ga) in plan.groups.iter().zip(&arrays.groups) {
        let count = g.patches.len();
        // cublasDcopy of the ones into the group's slabs of Y with stride nmax + 1.
        let (first, units) = plan.z_units(g);
        for i in 0..units {
            y[first + i * (nmax + 1)] = 1.0;
        }
        // trsmBatched: each entry's factor (A, by patch) and its slab of Y (B, by slot).
        let a_of = by_entry(&s_ata.decode(&arrays.host, ga.l22, count), count);
        let tr = s_y.decode(&arrays.host, ga.y, count);
        y.par_chunks_mut(plan.slab)
            .zip(tr.par_iter())
            .for_each(|(yb, e)| {
                if let Some((entry, ly)) = *e {
                    let (p, la) = a_of[entry];
                    let a = &ata[p * nm2..(p + 1) * nm2];
                    trsm_lower(&a[la..], nmax, g.m, g.ncols(), &mut yb[ly..], nmax);
                }
            });
        // gemmBatched per core fiber: each entry's Y_f (A and B, by slot) into its block (C,
        // by patch).
        for (c, &(yf, cf)) in ga.fibers.iter().enumerate() {
            let y_of = by_entry(&s_y.decode(&arrays.host, yf, count), count);
            let gm = s_blk.decode(&arrays.host, cf, count);
            let k = g.m - c * g.nwt;
            blocks
                .par_chunks_mut(per_blocks)
                .zip(gm.par_iter())
                .for_each(|(cb, e)| {
                    if let Some((entry, lc)) = *e {
                        let (slot, ly) = y_of[entry];
                        let yb = &y[slot * plan.slab..(slot + 1) * plan.slab];
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
        y,
    };
    Ok((out, ata))
}

/// Decoded pointers (by part: `(entry, offset)`) turned around: by entry, `(part, offset)`.
fn by_entry(decoded: &[Option<(usize, usize)>], count: usize) -> Vec<(usize, usize)> {
    let mut out = vec![(usize::MAX, 0); count];
    for (part, e) in decoded.iter().enumerate() {
        if let Some((entry, off)) = *e {
            out[entry] = (part, off);
        }
    }
    assert!(
        out.iter().all(|&(p, _)| p != usize::MAX),
        "an entry points nowhere"
    );
    out
}

/// The core columns on the host (from [`twin_core_columns`] or [`CoreColumns::download`]);
/// the fields as [`CoreColumns`]'s.
#[derive(Debug, Clone)]
pub struct HostCoreColumns {
    /// Leading dimension of each column (= nmax).
    pub ld: usize,
    /// Per patch `b`: offset in `z` of its first column.
    pub off: Vec<i64>,
    /// `z[off[b] + i·ld + v] = C[v, k0_b + i]` for `i < ncols_b`, `v < n_b`.
    pub z: Vec<f64>,
}

impl HostCoreColumns {
    /// `C[v, k0 + i]` of patch `b`.
    pub fn at(&self, b: usize, v: usize, i: usize) -> f64 {
        self.z[self.off[b] as usize + i * self.ld + v]
    }
}

/// Host twin of [`Solver::core_columns`]: its Trans trsm per group on the whole factor, in
/// place in the `Y` that [`twin_factored`] left in `solved`, each call reading the same
/// pointer arrays ([`ColumnArrays`], decoded against stand-in addresses). `factor` is the
/// factored copy of `ata` that [`twin_factored`] returns with `solved`; where `solved.info` is
/// not 0 the patch's slab is NaN.
pub fn twin_core_columns(
    solved: &HostSolve,
    factor: &[f64],
    shapes: &[PatchShape],
) -> Result<HostCoreColumns, GpuError> {
    let n: Vec<usize> = shapes.iter().map(PatchShape::nunknown).collect();
    let plan = SolvePlan::new(solved.npatch, solved.nmax, &n, shapes)?;
    let (npatch, nmax) = (plan.npatch, plan.nmax);
    let nm2 = nmax * nmax;
    if factor.len() != npatch * nm2 || solved.y.len() != plan.z_len() {
        return Err(bad(format!(
            "host factors of {} values and a Y of {} for {npatch} patches of {nmax}",
            factor.len(),
            solved.y.len()
        )));
    }
    let s_ata = Stand {
        base: 1 << 40,
        len: npatch * nm2,
        part: nm2,
    };
    let s_z = Stand {
        base: 5 << 40,
        len: plan.z_len(),
        part: plan.slab,
    };
    let arrays = ColumnArrays::new(&plan, s_ata.base, s_z.base);
    let mut z = solved.y.clone();
    for (g, &(full, slabs)) in plan.groups.iter().zip(&arrays.groups) {
        let count = g.patches.len();
        // Each entry's factor (its A, by patch) and its slab of Z (its B, by slot).
        let a_of = by_entry(&s_ata.decode(&arrays.host, full, count), count);
        let tr = s_z.decode(&arrays.host, slabs, count);
        let (m, ncols) = (g.k0 + g.m, g.ncols());
        z.par_chunks_mut(plan.slab)
            .zip(tr.par_iter())
            .for_each(|(zb, e)| {
                if let Some((entry, lz)) = *e {
                    let (p, la) = a_of[entry];
                    let l = &factor[p * nm2..(p + 1) * nm2][la..];
                    trsm_lower_trans(l, nmax, m, ncols, &mut zb[lz..], nmax);
                }
            });
    }
    for (b, &i) in solved.info.iter().enumerate() {
        if i != 0 {
            z[plan.z(b)..plan.z(b) + plan.slab].fill(f64::NAN);
        }
    }
    let off = (0..npatch).map(|b| plan.z(b) as i64).collect();
    Ok(HostCoreColumns { ld: nmax, off, z })
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

/// `B ← L⁻ᵀ B` for the `m × m` lower triangle at `l` (leading dimension `lda`) and the
/// `m × ncols` `b` (leading dimension `ldb`): dtrsm (Left, Lower, Trans, NonUnit), by columns,
/// from the last row up, each entry a dot product with what is below it (the reference BLAS's
/// order; it has no zero test in this case).
fn trsm_lower_trans(l: &[f64], lda: usize, m: usize, ncols: usize, b: &mut [f64], ldb: usize) {
    for j in 0..ncols {
        let col = &mut b[j * ldb..j * ldb + m];
        for i in (0..m).rev() {
            let lcol = &l[i * lda..i * lda + m];
            let mut t = col[i];
            for (&lki, &bk) in lcol[i + 1..].iter().zip(&col[i + 1..]) {
                t = (-lki).mul_add(bk, t);
            }
            col[i] = t / lcol[i];
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

impl SolveBatch {
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
            // The solver's workspace, not the stage's output: the twin's only.
            y: Vec::new(),
            info: st
                .clone_dtoh(&self.info)
                .map_err(cuda("downloading info"))?,
        })
    }
}

impl CoreColumns {
    /// Copies the columns back (waits for them).
    pub fn download(&self, gpu: &Gpu) -> Result<HostCoreColumns, GpuError> {
        Ok(HostCoreColumns {
            ld: self.ld,
            off: self.off.clone(),
            z: gpu
                .stream
                .clone_dtoh(&self.z)
                .map_err(cuda("downloading Z"))?,
        })
    }
}

mod tests {
    use ndarray::{Array1, Array2, Axis};
    use ndarray_linalg::{Eigh, InverseC, SolveC, UPLO};

    use super::super::normal;
    use super::*;
    use crate::extract::cpu::oracle;
    use crate::extract::gpu::device;
    use crate::extract::gpu::twins::scene::{Bundle, Masked, Pixels, Recipe, Scene};
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

        /// The normal-equation stage's twin on the scene's batch.
        fn dense(&self, reg: f64, eps: f64) -> HostDense {
            normal::twin(&normal::BatchLayout::new(&self.inputs()).unwrap(), reg, eps)
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
    fn plan_groups_patches_and_keeps_each_operand_in_its_slab() {
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
                // The trsm's operand (m rows from row k0, ncols columns) and the last Gram
                // operand stay inside the patch's slab of Y.
                let (slab, end) = (plan.z(b), plan.z(b) + plan.slab);
                assert_eq!(plan.y(b, g.k0), slab + g.k0);
                assert!(plan.y(b, g.k0) + (g.ncols() - 1) * nmax + g.m <= end);
                let last = plan.y_fiber(b, g.k0, g.ncore - 1, g.nwt);
                let rows = g.m - (g.ncore - 1) * g.nwt;
                assert_eq!(
                    last + rows,
                    slab + (g.ncore - 1) * g.nwt * nmax + g.k0 + g.m
                );
                assert!(last + (g.nwt - 1) * nmax + rows <= end);
            }
        }
        // One copy of ones per group: the vector of ones covers the largest.
        let largest = plan.groups.iter().map(|g| plan.z_units(g).1).max();
        assert_eq!(Some(plan.units()), largest);
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
        let dense = scene.dense(0.0, 1e-15);
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
        let shapes = scene.shapes();
        let dense = scene.dense(0.0, 1e-15);
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
    /// Patch `b`'s core columns against the reference inverse `c`, relative to its largest
    /// `|C[:, core]|`: the worst difference over all rows, the worst over the rows before the
    /// core (the left neighbour's, `v < k0`), and the largest reference value there (so that a
    /// test can see those rows are not trivially 0). Every element read must be finite.
    fn compare_columns(
        got: &HostCoreColumns,
        b: usize,
        s: &PatchShape,
        c: &Array2<f64>,
    ) -> (f64, f64, f64) {
        let (n, k0, ncols) = (
            s.nunknown(),
            s.core_fiber * s.nwavetot,
            s.ncore * s.nwavetot,
        );
        let sc = max_abs(
            (0..ncols)
                .flat_map(|i| (0..n).map(move |v| (v, i)))
                .map(|(v, i)| &c[[v, k0 + i]]),
        );
        let (mut w, mut wl, mut left) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..ncols {
            for v in 0..n {
                let (g, r) = (got.at(b, v, i), c[[v, k0 + i]]);
                assert!(g.is_finite(), "patch {b}: C[{v}, {}] = {g}", k0 + i);
                let e = (g - r).abs() / sc;
                w = w.max(e);
                if v < k0 {
                    wl = wl.max(e);
                    left = left.max(r.abs() / sc);
                }
            }
        }
        (w, wl, left)
    }

    /// The core rows of the columns are the stage's own `C_ff` blocks (computed another way, by
    /// the Gram products of `Y`): the worst difference relative to the largest block entry.
    fn columns_vs_blocks(
        got: &HostCoreColumns,
        solved: &HostSolve,
        b: usize,
        s: &PatchShape,
    ) -> f64 {
        let nwt = s.nwavetot;
        let sc = max_abs(
            (0..s.ncore)
                .flat_map(|c| (0..nwt * nwt).map(move |e| (c, e / nwt, e % nwt)))
                .map(|(c, w, wp)| {
                    &solved.blocks[((b * solved.ncore_max + c) * solved.nw + w) * solved.nw + wp]
                }),
        );
        let mut worst = 0.0f64;
        for c in 0..s.ncore {
            for w in 0..nwt {
                for wp in 0..nwt {
                    let z = got.at(b, (s.core_fiber + c) * nwt + wp, c * nwt + w);
                    worst = worst.max((z - solved.cov(b, c, wp, w)).abs() / sc);
                }
            }
        }
        worst
    }

    /// The twin's core columns of every patch of `scene` against LAPACK's inverse of the same
    /// matrix, each within `max(κ·ε, 1e-10)`, and against the stage's own blocks; returns the
    /// worst error, the worst over the rows before the core, and the largest of those rows'
    /// values among the patches with `k0 > 0`.
    fn check_columns(scene: &Scene, reg: f64, eps: f64) -> (f64, f64, f64) {
        let shapes = scene.shapes();
        let dense = scene.dense(reg, eps);
        let (solved, factor) = twin_factored(&dense, &shapes).unwrap();
        let got = twin_core_columns(&solved, &factor, &shapes).unwrap();
        assert_eq!(got.ld, dense.nmax);
        let mut worst = (0.0f64, 0.0f64, 0.0f64);
        for (b, s) in shapes.iter().enumerate() {
            let (m, _) = from_batch(&dense, b, s.nunknown());
            let bound = (condition(&m) * EPS).max(1e-10);
            let c = m.invc().unwrap();
            let (w, wl, left) = compare_columns(&got, b, s, &c);
            let wb = columns_vs_blocks(&got, &solved, b, s);
            assert!(
                w <= bound && wb <= bound,
                "patch {b} ({s:?}): {w:.1e} {wb:.1e}, bound {bound:.1e}"
            );
            worst = (worst.0.max(w), worst.1.max(wl), worst.2.max(left));
        }
        worst
    }

    #[test]
    fn twin_core_columns_match_lapack_on_toy_patches() {
        // First core fiber 0 or 1 (k0 0 or 32), four groups; with regularisation, and without
        // it with an ill-conditioned patch (κ ~1e9).
        for (mask, reg, eps) in [(false, 0.05, 1e-8), (true, 0.0, 1e-15)] {
            let scene = toy_scene(2, mask);
            let shapes = scene.shapes();
            assert!(
                shapes.iter().any(|s| s.core_fiber > 0) && shapes.iter().any(|s| s.core_fiber == 0)
            );
            let (w, wl, left) = check_columns(&scene, reg, eps);
            eprintln!(
                "twin's core columns vs LAPACK, toy, regularize {reg}, masked spot {mask}: \
                 {w:.1e} (left neighbour's rows {wl:.1e}, their largest |C| {left:.1e})"
            );
            assert!(
                left > 1e-6,
                "the left neighbour's rows are {left:.1e} of the largest"
            );
            assert!(
                wl <= 1e-8 * left,
                "the left neighbour's rows: {wl:.1e} of {left:.1e}"
            );
        }
    }

    #[test]
    fn twin_core_columns_match_lapack_at_the_real_sizes() {
        // Subbundles 0 (k0 = 0), 1, 2 and 4 (k0 = 74), and two 4-fiber frame-edge ones; the
        // groups interleaved in the batch, so that Z's group order is not the patches' order.
        let picks = [47 + 23, 0, 2 * 47 + 46, 20, 4 * 47 + 10];
        let (scene, what) = bundle_scene(Some(&picks), 3, false);
        let shapes = scene.shapes();
        let n: Vec<usize> = shapes.iter().map(PatchShape::nunknown).collect();
        let plan = SolvePlan::new(n.len(), 7 * 74, &n, &shapes).unwrap();
        let order: Vec<usize> = plan.groups.iter().flat_map(|g| g.patches.clone()).collect();
        assert_ne!(order, (0..n.len()).collect::<Vec<_>>());
        assert!(
            shapes.iter().any(|s| s.core_fiber > 0) && shapes.iter().any(|s| s.core_fiber == 0)
        );
        assert!(shapes.iter().any(|s| s.ncore == 4) && shapes.iter().any(|s| s.ncore == 5));
        let (w, wl, left) = check_columns(&scene, 0.0, 1e-15);
        eprintln!(
            "twin's core columns vs LAPACK, {what}, {} patches: {w:.1e} (left neighbour's rows \
             {wl:.1e}, their largest |C| {left:.1e})",
            shapes.len()
        );
        assert!(w <= 1e-10, "{w:.1e}");
        assert!(
            left > 1e-6,
            "the left neighbour's rows are {left:.1e} of the largest"
        );
        assert!(
            wl <= 1e-8 * left,
            "the left neighbour's rows: {wl:.1e} of {left:.1e}"
        );
    }

    /// A failed factorisation leaves that patch's columns NaN in the twin, the others as they
    /// were; a factor of the wrong length is refused.
    #[test]
    fn twin_core_columns_mark_a_failed_patch_and_refuse_a_wrong_factor() {
        let scene = toy_scene(4, false);
        let shapes = scene.shapes();
        let dense = scene.dense(0.0, 1e-15);
        let (solved, factor) = twin_factored(&dense, &shapes).unwrap();
        let good = twin_core_columns(&solved, &factor, &shapes).unwrap();
        let mut bad_dense = dense.clone();
        let (k, u) = (2usize, 37usize);
        bad_dense.ata[(k * dense.nmax + u) * dense.nmax + u] *= -1.0;
        let (bsolved, bfactor) = twin_factored(&bad_dense, &shapes).unwrap();
        let got = twin_core_columns(&bsolved, &bfactor, &shapes).unwrap();
        for (b, s) in shapes.iter().enumerate() {
            let (n, ncols) = (s.nunknown(), s.ncore * s.nwavetot);
            for i in 0..ncols {
                for v in 0..n {
                    let g = got.at(b, v, i);
                    if b == k {
                        assert!(g.is_nan(), "patch {b}: C[{v}, {i}] = {g}");
                    } else {
                        assert_eq!(g.to_bits(), good.at(b, v, i).to_bits(), "patch {b}");
                    }
                }
            }
        }
        let err = twin_core_columns(&solved, &factor[1..], &shapes).unwrap_err();
        assert!(err.to_string().contains("host factors"), "{err}");
    }

    #[test]
    fn plan_lays_z_out_in_group_order_with_e_on_one_progression_per_group() {
        // The toy scene's groups (k0 0 or 32, 2 or 3 core fibers); and real sizes where one
        // group's k0 (5 fibers of 74 bins) is so large that the units of its unused columns
        // (2 core fibers of at most 5) run past row nmax.
        let real = |core_fiber, ncore, nfiber| PatchShape {
            nfiber,
            core_fiber,
            ncore,
            nwavetot: 74,
        };
        let spill = vec![
            real(1, 5, 7),
            real(5, 2, 7),
            real(0, 5, 6),
            real(5, 2, 7),
            real(1, 4, 6),
        ];
        for (shapes, must_spill) in [(toy_scene(1, false).shapes(), false), (spill, true)] {
            let n: Vec<usize> = shapes.iter().map(PatchShape::nunknown).collect();
            let nmax = *n.iter().max().unwrap();
            let plan = SolvePlan::new(shapes.len(), nmax, &n, &shapes).unwrap();
            assert!(plan.groups.len() >= 3);
            // The slabs follow one another in group order, each group's patches in order.
            let order: Vec<usize> = plan.groups.iter().flat_map(|g| g.patches.clone()).collect();
            for (slot, &b) in order.iter().enumerate() {
                assert_eq!(plan.z(b), slot * plan.slab, "patch {b}");
            }
            assert_eq!(plan.z_len(), shapes.len() * plan.slab);
            let mut spilled = false;
            for g in &plan.groups {
                let (first, count) = plan.z_units(g);
                assert_eq!(count, g.patches.len() * plan.ncols_max);
                let start = plan.z(g.patches[0]);
                let end = start + g.patches.len() * plan.slab;
                assert!(end <= plan.z_len());
                // Every unit lands inside the group's slabs; in a column that trsm reads
                // (< ncols), exactly on row k0 + i of column i, once for each such column.
                let mut hits = std::collections::BTreeSet::new();
                for e in 0..count {
                    let p = first + e * (nmax + 1);
                    assert!(p >= start && p < end, "unit {e} of group {g:?} at {p}");
                    let (j, local) = ((p - start) / plan.slab, (p - start) % plan.slab);
                    let (col, row) = (local / nmax, local % nmax);
                    if col < g.ncols() {
                        assert_eq!(row, g.k0 + col, "unit {e} of group {g:?}");
                        assert!(hits.insert((j, col)));
                        let b = g.patches[j];
                        assert_eq!(plan.z(b) + col * nmax + g.k0 + col, p);
                    }
                    spilled |= col != e % plan.ncols_max;
                }
                assert_eq!(hits.len(), g.patches.len() * g.ncols());
            }
            assert_eq!(spilled, must_spill);
        }
    }

    /// `core_columns` on GPU 0 against the twin, to 1e-10 of each patch's largest |C[:, core]|
    /// (max(1e-10, κ·ε) on the toy batch): at the real sizes (a bundle plus two 4-fiber
    /// frame-edge patches, nmax 518) and on the toy batch (other sizes, k0 and groups).
    #[test]
    fn gpu_core_columns_match_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let mut solver = Solver::new(&gpu).expect("cuBLAS and cuSOLVER handles");
        let kernels = normal::Kernels::load(&gpu).expect("normal.cu compiles and loads");
        for (scene, what) in [bundle_scene(None, 5, false), (toy_scene(2, false), "toy")] {
            let inputs = scene.inputs();
            let shapes = scene.shapes();
            let layout = normal::BatchLayout::new(&inputs).unwrap();
            let mut dense = normal::DenseBatch::alloc(&gpu, &layout).unwrap();
            let up = normal::UploadedLayout::upload(&gpu, &layout, Default::default()).unwrap();
            normal::build_into(&gpu, &kernels, &up.buffers(), 0.0, 1e-15, &mut dense).unwrap();
            let host = dense.download(&gpu).unwrap();
            let (tw, tw_factor) = twin_factored(&host, &shapes).unwrap();
            let want = twin_core_columns(&tw, &tw_factor, &shapes).unwrap();
            let solved = solver.solve(&gpu, &mut dense, &shapes).unwrap();
            let cols = solver.core_columns(&gpu, &dense, &shapes).unwrap();
            // The columns took the solve's Y: asked again, they are refused.
            let again = solver.core_columns(&gpu, &dense, &shapes).err().unwrap();
            assert!(again.to_string().contains("just before"), "{again}");
            let got = cols.download(&gpu).unwrap();
            assert_eq!(solved.download(&gpu).unwrap().info, vec![0; shapes.len()]);
            assert_eq!((got.ld, &got.off), (want.ld, &want.off));
            let mut worst = 0.0f64;
            for (b, s) in shapes.iter().enumerate() {
                let (n, k0, ncols) = (
                    s.nunknown(),
                    s.core_fiber * s.nwavetot,
                    s.ncore * s.nwavetot,
                );
                let sc = max_abs(
                    (0..ncols)
                        .flat_map(|i| (0..n).map(move |v| (v, i)))
                        .map(|(v, i)| &want.z[want.off[b] as usize + i * want.ld + v]),
                );
                let mut w = 0.0f64;
                for i in 0..ncols {
                    for v in 0..n {
                        let g = got.at(b, v, i);
                        assert!(g.is_finite(), "patch {b}: C[{v}, {}] = {g}", k0 + i);
                        w = w.max((g - want.at(b, v, i)).abs() / sc);
                    }
                }
                let (m, _) = from_batch(&host, b, n);
                let bound = (condition(&m) * EPS).max(1e-10);
                assert!(w <= bound, "{what} patch {b}: {w:.1e}, bound {bound:.1e}");
                worst = worst.max(w);
            }
            eprintln!(
                "GPU ({}) core columns vs twin, {what}, {} patches: {worst:.1e}",
                gpu.info.name,
                shapes.len()
            );
        }
    }
}
