//! Solve and "signal" decorrelation (docs/science.md §5.3–5.5, B&S eq. 17–19) from one banded
//! Cholesky factor.
//!
//! Ordered wavelength-major, `AᵀWA` is a band matrix (half-bandwidth ~58 of 518 on the real r
//! PSF), so its factor costs ~n·kd² flops. The decorrelation needs only the diagonal fiber
//! blocks of `C = (AᵀWA)⁻¹`; they come from the factor by the recurrence `Lᵀ C = L⁻¹`
//! (upper triangle zero), computing only what is needed: the band of C, then the core fibers'
//! columns above the band (see `selected_inverse`).

use super::lapack::{self, SyevdWork};
use super::simd;

/// Scratch for one patch's factorisation and decorrelation.
#[derive(Debug, Default)]
pub struct DecorrWork {
    ab: Vec<f64>,
    band: Vec<f64>,
    z: Vec<f64>,
    xperm: Vec<f64>,
    x: Vec<f64>,
    blocks: Vec<f64>,
    deep: Vec<f64>,
    eig_w: Vec<f64>,
    scaled: Vec<f64>,
    eig: SyevdWork,
    /// Fibers, bins and half-bandwidth of the last `run`, for `covariance`.
    shape: (usize, usize, usize),
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

/// A patch's regularised normal equations as the solver takes them.
#[derive(Debug, Clone, Copy)]
pub struct BandSystem<'a> {
    /// The upper triangle of `AᵀWA` in wavelength-major order, `(p, q, value)`, `p ≤ q`.
    pub pairs: &'a [(u32, u32, f64)],
    /// The regularisation added to each unknown's diagonal (fiber-major).
    pub diag: &'a [f64],
    /// `AᵀWp` (fiber-major).
    pub rhs: &'a [f64],
    /// Half-bandwidth of `AᵀWA` in wavelength-major order.
    pub kd: usize,
}

impl DecorrWork {
    /// Solves and decorrelates `system`. `r_out` receives the rows `row_lo..row_hi` of
    /// `R = Q/s` for each core fiber (`[core fiber][row][col]`) and `s_out` their `s`
    /// (fluxivar = s²); returns the deconvolved flux `x` (fiber-major).
    pub fn run(
        &mut self,
        layout: Layout,
        system: &BandSystem<'_>,
        r_out: &mut Vec<f64>,
        s_out: &mut Vec<f64>,
    ) -> Result<&[f64], DecorrFailure> {
        let BandSystem {
            pairs,
            diag,
            rhs,
            kd,
        } = *system;
        let (nsp, nwt) = (layout.nspecpad, layout.nwavetot);
        let n = nsp * nwt;
        let kd = kd.min(n.saturating_sub(1));
        let ldab = kd + 1;
        // Fiber-major u = f·nwt + w  ↔  wavelength-major p = w·nsp + f.
        let unperm = |p: usize| (p % nsp) * nwt + p / nsp;
        self.ab.clear();
        self.ab.resize(n * ldab, 0.0);
        for &(p, q, v) in pairs {
            let (p, q) = (p as usize, q as usize);
            self.ab[p * ldab + (q - p)] = v;
        }
        for p in 0..n {
            self.ab[p * ldab] += diag[unperm(p)];
        }
        if band_cholesky(n, kd, &mut self.ab).is_err() {
            return Err(DecorrFailure::NotPositiveDefinite);
        }
        self.xperm.clear();
        self.xperm.extend((0..n).map(|p| rhs[unperm(p)]));
        lapack::pbtrs_lower(n, kd, &self.ab, &mut self.xperm);
        self.selected_inverse(layout, kd);
        self.shape = (nsp, nwt, kd);
        self.block_inverse_sqrt(layout, r_out, s_out)?;
        // Back to fiber-major for the caller.
        self.x.resize(n, 0.0);
        for (p, v) in self.xperm.iter().enumerate() {
            self.x[unperm(p)] = *v;
        }
        Ok(&self.x)
    }

    /// `C[u, v]` of the last successful `run`, for fiber-major unknowns `u` and `v` whose
    /// wavelength-major indices lie within the band of `AᵀWA` (every pair whose spots share a
    /// pixel does); 0 outside it. Read from `u`'s row of the band (which holds both halves,
    /// the same values), so that the partners of one `u` read one contiguous row.
    #[allow(dead_code)] // where the GPU twins include this file, nothing asks for it
    pub fn covariance(&self, u: usize, v: usize) -> f64 {
        let (nsp, nwt, kd) = self.shape;
        let perm = |u: usize| (u % nwt) * nsp + u / nwt;
        let (pu, pv) = (perm(u), perm(v));
        if pu.abs_diff(pv) > kd {
            return 0.0;
        }
        // C[pu, pv] sits at kd + (pv − pu) in row pu.
        self.band[pu * (2 * kd + 1) + kd + pv - pu]
    }

    /// The unknowns `v` (fiber-major, increasing) whose pair with `u` lies within the band of
    /// `AᵀWA` of the last successful `run`: the only ones [`Self::covariance`] can give a
    /// non-zero value for.
    #[allow(dead_code)] // where the GPU twins include this file, nothing asks for it
    pub fn band_partners(&self, u: usize) -> impl Iterator<Item = usize> {
        let (nsp, nwt, kd) = self.shape;
        // Wavelength-major p = w·nsp + f: within the band, |p_v − p_u| ≤ kd, which for each
        // fiber f is a run of bins.
        let pu = (u % nwt) * nsp + u / nwt;
        let (lo, hi) = (pu.saturating_sub(kd), pu + kd);
        (0..nsp).flat_map(move |f| {
            let w0 = lo.saturating_sub(f).div_ceil(nsp);
            let w1 = if hi >= f {
                ((hi - f) / nsp + 1).min(nwt)
            } else {
                0
            };
            (w0..w1.max(w0)).map(move |w| f * nwt + w)
        })
    }

    /// Fills `blocks[c][w'][w] = C[(f, w'), (f, w)]` for each core fiber `f = core_fiber + c`.
    ///
    /// Phase 1 computes the band of C (Takahashi's selected inversion, ~n·kd² flops) row by
    /// row from the last: row i's off-diagonal entries need only rows i+1..i+kd of the band,
    /// so they come out of kd vectorised multiply-adds over contiguous rows of a row-major
    /// `[row][−kd..=kd]` band, and the diagonal then needs only row i itself. Phase 2 extends
    /// the core fibers' columns above the band: there the recurrence of row i reads only rows
    /// i+1..i+kd of the same column, so all core columns advance together, one row at a time.
    #[inline(never)]
    fn selected_inverse(&mut self, layout: Layout, kd: usize) {
        let (nsp, nwt) = (layout.nspecpad, layout.nwavetot);
        let n = nsp * nwt;
        let ldab = kd + 1;
        let bw = 2 * kd + 1;
        // band[i·bw + kd + t] = C[i, i + t] for -kd ≤ t ≤ kd (wavelength-major). Entries that
        // point outside 0..n are never written; the rows that would read them are masked out.
        if self.band.len() < n * bw {
            self.band.resize(n * bw, 0.0);
        }
        self.z.clear();
        self.z.resize(kd + 1, 0.0);
        let ab = &self.ab;
        let band = &mut self.band;
        let acc = &mut self.z;
        for i in (0..n).rev() {
            let tmax = kd.min(n - 1 - i);
            let lcol = &ab[i * ldab..i * ldab + tmax + 1];
            let inv = 1.0 / lcol[0];
            let row = i * bw + kd;
            if tmax > 0 {
                // C[i, i+t] = -(1/L_ii) Σ_{d≥1} L[i+d, i] C[i+d, i+t] for t ≥ 1. C[i+d, i+t]
                // is band[(i+d)·bw + kd + t - d]: for each d a contiguous run over t, the runs
                // bw - 1 apart, which is the shape of phase 2's row recurrence.
                let (upper, lower) = band.split_at_mut((i + 1) * bw);
                let out = &mut acc[..tmax];
                simd::recurrence_row(&lcol[1..], &lower[kd..], bw - 1, 0, -inv, out);
                upper[row + 1..=row + tmax].copy_from_slice(out);
                for (t, &v) in (1..=tmax).zip(out.iter()) {
                    // C[i+t, i], the mirror, in row i+t's lower half.
                    lower[(t - 1) * bw + kd - t] = v;
                }
            }
            // C[i, i] = (1/L_ii - Σ_d L[i+d, i] C[i, i+d]) / L_ii, with row i just computed.
            let sum = dot(&lcol[1..], &band[row + 1..=row + tmax]);
            band[row] = (inv - sum) * inv;
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
                deep[i * nc + c] = self.band[i * bw + kd + (j - i)];
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

/// Factors the symmetric positive-definite band matrix `ab` (LAPACK lower band storage,
/// `ab[j·(kd+1) + d] = A[j+d, j]`) in place into its Cholesky factor, as dpbtrf does.
///
/// LAPACK's dpbtrf takes its unblocked path (one dsyr call per column) whenever kd ≤ 64,
/// which is every patch here, and the call overhead of those short rank-1 updates made it 5 %
/// of the extraction. This is the same right-looking column algorithm with the update inlined
/// as contiguous multiply-adds. Returns the failing column (0-based) when a pivot is not
/// positive.
pub fn band_cholesky(n: usize, kd: usize, ab: &mut [f64]) -> Result<(), usize> {
    let ldab = kd + 1;
    assert!(ab.len() >= n * ldab, "band storage too small");
    for j in 0..n {
        let (head, tail) = ab.split_at_mut((j + 1) * ldab);
        let col = &mut head[j * ldab..];
        let ajj = col[0];
        if !(ajj > 0.0) || !ajj.is_finite() {
            return Err(j);
        }
        let ljj = ajj.sqrt();
        col[0] = ljj;
        let kn = kd.min(n - 1 - j);
        let inv = 1.0 / ljj;
        col[1..=kn].iter_mut().for_each(|v| *v *= inv);
        // A[j+a+d, j+a] -= L[j+a+d, j]·L[j+a, j]: column j+a starts at tail[(a-1)·ldab].
        for a in 1..=kn {
            let l = -col[a];
            let dst = &mut tail[(a - 1) * ldab..(a - 1) * ldab + kn - a + 1];
            for (t, &x) in dst.iter_mut().zip(&col[a..=kn]) {
                *t = l.mul_add(x, *t);
            }
        }
    }
    Ok(())
}

/// `Σ a·b` with eight independent partial sums of fused multiply-adds, so that the compiler can keep several vector
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
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::DecorrWork;

    /// The band's partners of an unknown are exactly the unknowns within `kd` of it in
    /// wavelength-major order, in increasing fiber-major order.
    #[test]
    fn band_partners_are_the_band_in_fiber_major_order() {
        for (nsp, nwt, kd) in [(1, 9, 3), (3, 7, 4), (4, 10, 9), (5, 6, 0), (2, 3, 40)] {
            let work = DecorrWork {
                shape: (nsp, nwt, kd),
                ..DecorrWork::default()
            };
            let perm = |u: usize| (u % nwt) * nsp + u / nwt;
            for u in 0..nsp * nwt {
                let want: Vec<usize> = (0..nsp * nwt)
                    .filter(|&v| perm(u).abs_diff(perm(v)) <= kd)
                    .collect();
                let got: Vec<usize> = work.band_partners(u).collect();
                assert_eq!(got, want, "nsp {nsp} nwt {nwt} kd {kd} u {u}");
            }
        }
    }
}
