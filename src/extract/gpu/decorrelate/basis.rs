//! [`dct_basis`]: the orthonormal DCT-II basis the Jacobi kernel starts from, computed on the
//! host. Imports nothing.

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
