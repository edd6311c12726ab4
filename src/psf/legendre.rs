//! Legendre polynomials `P_k(u)`, as `numpy.polynomial.legendre.legvander` evaluates them.

/// Fills `out[k] = P_k(u)` for `k < out.len()` by Bonnet's recurrence
/// `(k+1) P_{k+1} = (2k+1) u P_k - k P_{k-1}`.
pub fn vander(u: f64, out: &mut [f64]) {
    if out.is_empty() {
        return;
    }
    out[0] = 1.0;
    if out.len() > 1 {
        out[1] = u;
    }
    for k in 2..out.len() {
        let kf = k as f64;
        out[k] = ((2.0 * kf - 1.0) * u * out[k - 1] - (kf - 1.0) * out[k - 2]) / kf;
    }
}

/// `Σ_k c_k P_k(u)`, summed in increasing k like `legvander(u, deg) @ c`.
pub fn series(coeff: impl IntoIterator<Item = f64>, u: f64) -> f64 {
    let (mut p_prev, mut p) = (0.0, 1.0);
    let mut sum = 0.0;
    for (k, c) in coeff.into_iter().enumerate() {
        if k == 1 {
            p_prev = 1.0;
            p = u;
        } else if k > 1 {
            let kf = k as f64;
            let next = ((2.0 * kf - 1.0) * u * p - (kf - 1.0) * p_prev) / kf;
            p_prev = p;
            p = next;
        }
        sum += c * p;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from numpy 2.x: numpy.polynomial.legendre.legvander(0.37, 6)[0] (numpy 2.x, computed once).
    const P_037: [f64; 7] = [
        1.0,
        0.37,
        -0.29465,
        -0.4283675,
        -0.05638045624999999,
        0.30514461613750005,
        0.2539734781549375,
    ];

    #[test]
    fn vander_matches_numpy() {
        let mut out = [0.0; 7];
        vander(0.37, &mut out);
        for (a, b) in out.iter().zip(P_037) {
            assert!((a - b).abs() < 1e-13, "{a} vs {b}");
        }
    }

    #[test]
    fn series_matches_numpy_legval() {
        // numpy.polynomial.legendre.legval(-0.91, [0.5, -1.25, 2.0, 0.75, -0.3])
        let v = series([0.5, -1.25, 2.0, 0.75, -0.3], -0.91);
        let expect = REF_LEGVAL;
        assert!((v - expect).abs() < 1e-13, "{v} vs {expect}");
    }

    const REF_LEGVAL: f64 = 2.651670511875;
}
