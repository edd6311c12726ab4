//! The LAPACK routines the CPU backend calls directly (the FFI surface: all `unsafe` of the
//! CPU backend is in this file).
//!
//! ndarray-linalg's `eigh` calls dsyev; dsyevd is about 3x faster at 74², and the banded
//! Cholesky solve (dpbtrs) has no ndarray-linalg wrapper at all.

use std::os::raw::c_int;

fn int(n: usize) -> c_int {
    c_int::try_from(n).expect("LAPACK dimension exceeds i32")
}

/// Factors the symmetric positive-definite band matrix `ab` (LAPACK lower band storage:
/// `ab[j·(kd+1) + d] = A[j+d, j]`) in place into its Cholesky factor L.
/// Returns the LAPACK `info` (> 0: the leading minor of that order is not positive definite).
/// The extraction uses `decorrelate::band_cholesky`; this is its reference in the tests.
#[cfg(test)]
pub fn pbtrf_lower(n: usize, kd: usize, ab: &mut [f64]) -> i32 {
    assert!(ab.len() >= n * (kd + 1), "band storage too small");
    let (n, kd, ldab) = (int(n), int(kd), int(kd + 1));
    let mut info: c_int = 0;
    // SAFETY: `ab` holds n·(kd+1) elements as checked above, which is what dpbtrf reads and
    // writes for ldab = kd+1; all scalars are passed by pointer to live locals.
    unsafe { lapack_sys::dpbtrf_(c"L".as_ptr(), &n, &kd, ab.as_mut_ptr(), &ldab, &mut info) };
    info
}

/// Solves `A x = b` with a lower band Cholesky factor (LAPACK `dpbtrf`'s, or
/// `decorrelate::band_cholesky`'s); `b` is overwritten by `x`.
pub fn pbtrs_lower(n: usize, kd: usize, ab: &[f64], b: &mut [f64]) -> i32 {
    assert!(
        ab.len() >= n * (kd + 1) && b.len() >= n,
        "band storage or rhs too small"
    );
    let (nn, kd, ldab, one) = (int(n), int(kd), int(kd + 1), 1 as c_int);
    let mut info: c_int = 0;
    // SAFETY: sizes checked above; dpbtrs only reads `ab` (n·ldab) and writes b (n·1).
    unsafe {
        lapack_sys::dpbtrs_(
            c"L".as_ptr(),
            &nn,
            &kd,
            &one,
            ab.as_ptr(),
            &ldab,
            b.as_mut_ptr(),
            &nn,
            &mut info,
        )
    };
    info
}

/// Reusable workspace for [`syevd`] at one matrix size.
#[derive(Debug, Default)]
pub struct SyevdWork {
    n: usize,
    work: Vec<f64>,
    iwork: Vec<c_int>,
}

impl SyevdWork {
    fn ensure(&mut self, n: usize) {
        if self.n == n && !self.work.is_empty() {
            return;
        }
        // Ask for the optimal sizes: with only the documented minimum, dsyevd falls back to
        // unblocked back-transformation.
        let nn = int(n);
        let (mut wopt, mut iwopt, mut info) = (0.0f64, 0 as c_int, 0 as c_int);
        let (query, mut a, mut w) = (-1 as c_int, [0.0f64; 1], [0.0f64; 1]);
        // SAFETY: a workspace query (lwork = liwork = -1) reads no matrix and writes only the
        // two optimal sizes into `wopt` and `iwopt`.
        unsafe {
            lapack_sys::dsyevd_(
                c"V".as_ptr(),
                c"L".as_ptr(),
                &nn,
                a.as_mut_ptr(),
                &nn,
                w.as_mut_ptr(),
                &mut wopt,
                &query,
                &mut iwopt,
                &query,
                &mut info,
            )
        };
        // LAPACK's documented minimum sizes for JOBZ = 'V', or more if the query says so.
        let lwork = (1 + 6 * n + 2 * n * n).max(wopt as usize);
        let liwork = (3 + 5 * n).max(usize::try_from(iwopt).unwrap_or(0));
        self.work = vec![0.0; lwork];
        self.iwork = vec![0; liwork];
        self.n = n;
    }
}

/// Eigenvalues (ascending, into `w`) and eigenvectors (column-major into `a`:
/// `a[r + k·n]` is component r of vector k) of the symmetric `n × n` matrix `a`
/// (its lower triangle is read). Returns LAPACK `info`.
pub fn syevd(n: usize, a: &mut [f64], w: &mut [f64], work: &mut SyevdWork) -> i32 {
    assert!(a.len() >= n * n && w.len() >= n, "eigen buffers too small");
    work.ensure(n);
    let (nn, lwork, liwork) = (int(n), int(work.work.len()), int(work.iwork.len()));
    let mut info: c_int = 0;
    // SAFETY: `a` has n² elements and `w` n (checked above); the work arrays have the sizes
    // passed as lwork/liwork, at least LAPACK's documented minima for jobz = 'V'.
    unsafe {
        lapack_sys::dsyevd_(
            c"V".as_ptr(),
            c"L".as_ptr(),
            &nn,
            a.as_mut_ptr(),
            &nn,
            w.as_mut_ptr(),
            work.work.as_mut_ptr(),
            &lwork,
            work.iwork.as_mut_ptr(),
            &liwork,
            &mut info,
        )
    };
    info
}

extern "C" {
    fn openblas_set_num_threads(n: c_int);
    fn openblas_get_num_threads() -> c_int;
}

/// The number of threads OpenBLAS will use for one call.
pub fn blas_threads() -> usize {
    // SAFETY: a getter of OpenBLAS's thread setting; no arguments, no preconditions.
    unsafe { openblas_get_num_threads() }.max(1) as usize
}

/// Keeps OpenBLAS single-threaded inside our own threads (its threads would oversubscribe the
/// cores that rayon already uses), unless the user set OPENBLAS_NUM_THREADS.
/// (Threaded OpenBLAS 0.3.21 called from several threads at once was also seen to make dsyev
/// fail to converge.) Called once per process, from every entry point into the CPU backend.
pub fn single_threaded_blas() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // OpenBLAS sized its pool from the environment when it was loaded, before `main`, so
        // setting the variable later (as `env::pin_blas_threads` does) is not enough: a value
        // of 1, or none, is applied here. Any other value is the user's explicit choice.
        let requested = std::env::var("OPENBLAS_NUM_THREADS").ok();
        if requested.as_deref().is_some_and(|v| v.trim() != "1") {
            return;
        }
        // SAFETY: openblas_set_num_threads takes a plain int and only adjusts OpenBLAS's own
        // thread-count setting.
        unsafe { openblas_set_num_threads(1) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_cholesky_solves_a_tridiagonal_system() {
        // A = tridiag(-1, 4, -1), n = 5, x = 1..5 → b = A x.
        let n = 5;
        let x: Vec<f64> = (1..=n).map(|v| v as f64).collect();
        let mut ab = vec![0.0; 2 * n];
        for j in 0..n {
            ab[2 * j] = 4.0;
            ab[2 * j + 1] = if j + 1 < n { -1.0 } else { 0.0 };
        }
        let mut b: Vec<f64> = (0..n)
            .map(|i| {
                4.0 * x[i]
                    - if i > 0 { x[i - 1] } else { 0.0 }
                    - if i + 1 < n { x[i + 1] } else { 0.0 }
            })
            .collect();
        assert_eq!(pbtrf_lower(n, 1, &mut ab), 0);
        assert_eq!(pbtrs_lower(n, 1, &ab, &mut b), 0);
        for (a, e) in b.iter().zip(&x) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn syevd_reconstructs_its_matrix() {
        let n = 6;
        let mut m = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                m[i + j * n] =
                    1.0 / (1.0 + (i as f64 - j as f64).abs()) + if i == j { 2.0 } else { 0.0 };
            }
        }
        let orig = m.clone();
        let mut w = vec![0.0; n];
        let mut work = SyevdWork::default();
        assert_eq!(syevd(n, &mut m, &mut w, &mut work), 0);
        for i in 0..n {
            for j in 0..n {
                let r: f64 = (0..n).map(|k| m[i + k * n] * w[k] * m[j + k * n]).sum();
                assert!((r - orig[i + j * n]).abs() < 1e-12);
            }
        }
    }
}
