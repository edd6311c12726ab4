//! Solve and "signal" decorrelation (extraction.md §5 steps 3–6, B&S eq. 17–19) from one banded
//! Cholesky factor.
//!
//! Ordered wavelength-major, `AᵀWA` is a band matrix (half-bandwidth ~58 of 518 on the real r
//! PSF), so its factor costs ~n·kd² flops. The decorrelation needs only the diagonal fiber
//! blocks of `C = (AᵀWA)⁻¹`; they come from the factor by the recurrence `Lᵀ C = L⁻¹`
//! (upper triangle zero), computing each column of C upwards only as far as it is needed: the
//! band for every column, and the whole fiber block for the core fibers' columns.

use super::lapack::{self, SyevdWork};
use super::simd;

/// Rows of the band recurrence whose independent dots are issued together.
const GROUP: usize = 8;

/// Scratch for one patch's factorisation and decorrelation.
#[derive(Debug, Default)]
pub struct DecorrWork {
    ab: Vec<f64>,
    band: Vec<f64>,
    z: Vec<f64>,
    x: Vec<f64>,
    blocks: Vec<f64>,
    deep: Vec<f64>,
    inv_diag: Vec<f64>,
    eig_w: Vec<f64>,
    scaled: Vec<f64>,
    eig: SyevdWork,
}

/// Why a patch could not be decorrelated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecorrFailure {
    /// `AᵀWA` is not numerically positive definite.
    NotPositiveDefinite,
    /// A fiber block of the covariance has a non-positive eigenvalue.
    BadCovariance,
}

/// Shape of the problem: `nspecpad` fibers × `nwavetot` bins, fiber-major unknowns.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Fibers solved for.
    pub nspecpad: usize,
    /// Bins solved for.
    pub nwavetot: usize,
    /// First core fiber among them.
    pub core_fiber: usize,
    /// Core fibers.
    pub ncore: usize,
    /// First row of the resolution matrix needed (core start minus ndiag).
    pub row_lo: usize,
    /// One past the last row needed.
    pub row_hi: usize,
}

impl DecorrWork {
    /// Solves and decorrelates. `icov` is the regularised dense `AᵀWA` (fiber-major), `kd` its
    /// wavelength-major half-bandwidth. `r_out`/`s_out` receive `R` and `s` (see [`Decorrelated`]).
    pub fn run(
        &mut self,
        layout: Layout,
        icov: &[f64],
        rhs: &[f64],
        kd: usize,
        r_out: &mut Vec<f64>,
        s_out: &mut Vec<f64>,
    ) -> Result<&[f64], DecorrFailure> {
        let (nsp, nwt) = (layout.nspecpad, layout.nwavetot);
        let n = nsp * nwt;
        let kd = kd.min(n.saturating_sub(1));
        let ldab = kd + 1;
        // Fiber-major u = f·nwt + w  ↔  wavelength-major p = w·nsp + f.
        let unperm = |p: usize| (p % nsp) * nwt + p / nsp;
        self.ab.clear();
        self.ab.resize(n * ldab, 0.0);
        for j in 0..n {
            let uj = unperm(j);
            for d in 0..=kd.min(n - 1 - j) {
                self.ab[j * ldab + d] = icov[unperm(j + d) * n + uj];
            }
        }
        if lapack::pbtrf_lower(n, kd, &mut self.ab) != 0 {
            return Err(DecorrFailure::NotPositiveDefinite);
        }
        self.x.clear();
        self.x.extend((0..n).map(|p| rhs[unperm(p)]));
        lapack::pbtrs_lower(n, kd, &self.ab, &mut self.x);
        self.selected_inverse(layout, kd);
        self.block_inverse_sqrt(layout, r_out, s_out)?;
        // Back to fiber-major for the caller.
        let xp = std::mem::take(&mut self.x);
        self.x.resize(n, 0.0);
        for (p, v) in xp.iter().enumerate() {
            self.x[unperm(p)] = *v;
        }
        self.z = xp;
        Ok(&self.x)
    }

    /// Fills `blocks[c][w'][w] = C[(f, w'), (f, w)]` for each core fiber `f = core_fiber + c`.
    ///
    /// Phase 1 walks the columns from the last, computing each column of C inside the band
    /// only (Takahashi's selected inversion, ~n·kd² flops). Phase 2 extends the core fibers'
    /// columns above the band: there the recurrence of row i reads only rows i+1..i+kd of the
    /// same column, so all core columns advance together, one row at a time, as a vectorised
    /// multiply-add over a row-major `[row][core column]` array instead of one serial chain
    /// per column.
    #[inline(never)]
    fn selected_inverse(&mut self, layout: Layout, kd: usize) {
        let (nsp, nwt) = (layout.nspecpad, layout.nwavetot);
        let n = nsp * nwt;
        let ldab = kd + 1;
        // band[j·ldab + d] = C[j + d, j] (lower band of C, wavelength-major).
        self.band.clear();
        self.band.resize(n * ldab, 0.0);
        self.z.clear();
        self.z.resize(n, 0.0);
        // Multiplying by 1/L_ii keeps divisions out of the dependent chain of each row group.
        self.inv_diag.clear();
        self.inv_diag
            .extend((0..n).map(|i| 1.0 / self.ab[i * ldab]));
        let inv_diag = &self.inv_diag;
        let ab = &self.ab;
        let z = &mut self.z;
        for j in (0..n).rev() {
            // C[k, j] for k > j is C[j, k], already in the band of column j.
            let kmax = (j + kd).min(n - 1);
            z[j + 1..=kmax].copy_from_slice(&self.band[j * ldab + 1..=j * ldab + (kmax - j)]);
            // Rows j down to j - kd, GROUP at a time: their dots over the rows already known
            // are independent, so they overlap instead of forming one serial chain; the few
            // terms inside the group are added afterwards.
            let lo = j.saturating_sub(kd);
            let mut top = j;
            loop {
                let g = (top - lo + 1).min(GROUP);
                let mut part = [0.0f64; GROUP];
                for (t, p) in part.iter_mut().enumerate().take(g) {
                    let r = top - t;
                    let m = kd.min(n - 1 - r);
                    // Known rows top+1 ..= r+m, at offsets (top+1-r) ..= m of L's column r.
                    let off = top + 1 - r;
                    if off <= m {
                        *p = dot(&ab[r * ldab + off..=r * ldab + m], &z[top + 1..=r + m]);
                    }
                }
                for t in 0..g {
                    let r = top - t;
                    let lcol = &ab[r * ldab..(r + 1) * ldab];
                    let mut sum = part[t];
                    for u in (0..t).rev() {
                        // Row top - u lies inside the group, below r, at offset t - u.
                        if t - u <= kd {
                            sum += lcol[t - u] * z[top - u];
                        }
                    }
                    let inv = inv_diag[r];
                    let delta = if r == j { inv } else { 0.0 };
                    z[r] = (delta - sum) * inv;
                }
                if top < lo + g {
                    break;
                }
                top -= g;
            }
            for (i, &v) in z.iter().enumerate().take(j + 1).skip(j.saturating_sub(kd)) {
                self.band[i * ldab + (j - i)] = v;
            }
        }
        // Phase 2. Core columns in increasing j: column index c ↔ (w = c / ncore, fiber
        // core_fiber + c % ncore), so j_c = w·nsp + core_fiber + c % ncore increases with c.
        let ncore = layout.ncore;
        let nc = ncore * nwt;
        let col_j = |c: usize| (c / ncore) * nsp + layout.core_fiber + c % ncore;
        // Every element the recurrence reads is written first (the band rows of each column
        // below, the rows above as it goes), so the array is not cleared between patches.
        if self.deep.len() < n * nc {
            self.deep.resize(n * nc, 0.0);
        }
        let deep = &mut self.deep;
        for c in 0..nc {
            let j = col_j(c);
            for i in j.saturating_sub(kd)..=j {
                deep[i * nc + c] = self.band[i * ldab + (j - i)];
            }
        }
        // Columns with j_c > i + kd still need row i; they form a suffix of 0..nc.
        let mut first = nc;
        for i in (layout.core_fiber..n).rev() {
            while first > 0 && col_j(first - 1) > i + kd {
                first -= 1;
            }
            if first == nc {
                continue;
            }
            let lcol = &ab[i * ldab..(i + 1) * ldab];
            let m = kd.min(n - 1 - i);
            let neg_inv = -1.0 / lcol[0];
            let (upto, below) = deep.split_at_mut((i + 1) * nc);
            simd::recurrence_row(
                &lcol[1..=m],
                below,
                nc,
                first,
                neg_inv,
                &mut upto[i * nc + first..],
            );
        }
        self.blocks.clear();
        self.blocks.resize(ncore * nwt * nwt, 0.0);
        for c in 0..nc {
            let (w, fc) = (c / ncore, c % ncore);
            let f = layout.core_fiber + fc;
            let blk = &mut self.blocks[fc * nwt * nwt..(fc + 1) * nwt * nwt];
            for wp in 0..=w {
                let v = deep[(wp * nsp + f) * nc + c];
                blk[wp * nwt + w] = v;
                blk[w * nwt + wp] = v;
            }
        }
    }

    /// `Q_f = C_ff^{-1/2}` by eigendecomposition; writes the needed rows of `R = Q/s` and `s`.
    #[inline(never)]
    fn block_inverse_sqrt(
        &mut self,
        layout: Layout,
        r_out: &mut Vec<f64>,
        s_out: &mut Vec<f64>,
    ) -> Result<(), DecorrFailure> {
        let nwt = layout.nwavetot;
        let nrow = layout.row_hi - layout.row_lo;
        r_out.clear();
        r_out.resize(layout.ncore * nrow * nwt, 0.0);
        s_out.clear();
        s_out.resize(layout.ncore * nrow, 0.0);
        self.eig_w.resize(nwt, 0.0);
        self.scaled.resize(nwt * nwt, 0.0);
        for c in 0..layout.ncore {
            let blk = &mut self.blocks[c * nwt * nwt..(c + 1) * nwt * nwt];
            if lapack::syevd(nwt, blk, &mut self.eig_w, &mut self.eig) != 0 {
                return Err(DecorrFailure::BadCovariance);
            }
            // Q = V Λ^{-1/2} Vᵀ = (V Λ^{-1/4})(V Λ^{-1/4})ᵀ; V is column-major in `blk`.
            for k in 0..nwt {
                let lam = self.eig_w[k];
                if !(lam > 0.0) || !lam.is_finite() {
                    return Err(DecorrFailure::BadCovariance);
                }
                let scale = lam.powf(-0.25);
                for r in 0..nwt {
                    self.scaled[r * nwt + k] = blk[r + k * nwt] * scale;
                }
            }
            let rows = &mut r_out[c * nrow * nwt..(c + 1) * nrow * nwt];
            let sv = ndarray::ArrayView2::from_shape((nwt, nwt), &self.scaled[..])
                .expect("square scratch");
            let top = sv.slice(ndarray::s![layout.row_lo..layout.row_hi, ..]);
            let mut q = ndarray::ArrayViewMut2::from_shape((nrow, nwt), rows).expect("row block");
            ndarray::linalg::general_mat_mul(1.0, &top, &sv.t(), 0.0, &mut q);
            for (ri, mut row) in q.outer_iter_mut().enumerate() {
                let s: f64 = row.sum();
                s_out[c * nrow + ri] = s;
                row.mapv_inplace(|v| v / s);
            }
        }
        Ok(())
    }
}

/// `Σ a·b` with eight independent partial sums, so that the compiler can keep several vector
/// lanes busy instead of one serial chain of additions. The summation order is fixed, so the
/// result does not depend on threads or batching.
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
