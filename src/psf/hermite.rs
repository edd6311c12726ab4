//! Probabilists' Hermite functions and their pixel integrals (docs/science.md §3).

use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// Fills `out[m] = He_m(u)` for `m < out.len()`: `He_0 = 1, He_1 = u,
/// He_k = u·He_{k-1} - (k-1)·He_{k-2}` (numpy's `hermevander`).
pub fn he_vander(u: f64, out: &mut [f64]) {
    if out.is_empty() {
        return;
    }
    out[0] = 1.0;
    if out.len() > 1 {
        out[1] = u;
    }
    for k in 2..out.len() {
        out[k] = u * out[k - 1] - (k - 1) as f64 * out[k - 2];
    }
}

/// Pixel-integrated Gauss–Hermite basis along one axis.
///
/// `npix` pixels whose centres sit at integer offsets `-npix/2 .. npix/2` from the spot's corner
/// pixel grid; `offset` is the sub-pixel position of the centre (`dx` of docs/science.md §3)
/// and `sigma` the Gaussian width. Writes `out[m * npix + k]` for `m = 0..=deg`, `k < npix`:
/// `m = 0` is the Gaussian's integral over pixel k, `m ≥ 1` the difference of `G_{m-1}` at its
/// edges. `scratch` needs `(deg + 1) * (npix + 1)` elements.
pub fn pixel_integrals(
    npix: usize,
    offset: f64,
    sigma: f64,
    deg: usize,
    out: &mut [f64],
    scratch: &mut [f64],
) {
    let nedge = npix + 1;
    let half = (npix / 2) as f64;
    let norm = 1.0 / (2.0 * PI).sqrt();
    debug_assert!(out.len() >= (deg + 1) * npix);
    debug_assert!(scratch.len() >= (deg + 1) * nedge);
    // scratch[e * (deg+1) + m] = G_m(u_e) for m < deg; scratch[e*(deg+1)+deg] = erf(u_e/√2).
    let stride = deg + 1;
    let mut he = [0.0f64; 32];
    // The edges are 1/σ apart in u, so exp(-u²/2) follows from one edge to the next by the
    // factor exp(-u·h - h²/2), itself multiplied by exp(-h²) at each step: three
    // exponentials per axis instead of one per edge (exp was a third of the spot time). The
    // products drift by a few ulps over a spot's ~20 edges; the start is re-anchored at the
    // edge nearest the centre so that the largest values are the most exact.
    let h = 1.0 / sigma;
    let u0 = (-half - 0.5 - offset) / sigma;
    let step = (-h * h).exp();
    let mut gauss = [0.0f64; 64];
    let anchor = ((half + 0.5 + offset).round().max(0.0) as usize).min(nedge - 1);
    let gauss = if nedge <= gauss.len() {
        let ua = u0 + anchor as f64 * h;
        gauss[anchor] = (-0.5 * ua * ua).exp();
        // Upwards: g(u+h) = g(u)·exp(-u·h - h²/2).
        let mut ratio = (-ua * h - 0.5 * h * h).exp();
        for e in anchor + 1..nedge {
            gauss[e] = gauss[e - 1] * ratio;
            ratio *= step;
        }
        // Downwards: g(u-h) = g(u)·exp(u·h - h²/2).
        let mut ratio = (ua * h - 0.5 * h * h).exp();
        for e in (0..anchor).rev() {
            gauss[e] = gauss[e + 1] * ratio;
            ratio *= step;
        }
        Some(gauss)
    } else {
        None
    };
    for e in 0..nedge {
        let u = (e as f64 - half - 0.5 - offset) / sigma;
        let g = match &gauss {
            Some(t) => t[e],
            None => (-0.5 * u * u).exp(),
        } * norm;
        he_vander(u, &mut he[..deg.max(1)]);
        let row = &mut scratch[e * stride..(e + 1) * stride];
        for m in 0..deg {
            row[m] = he[m] * g;
        }
        row[deg] = libm::erf(u * FRAC_1_SQRT_2);
    }
    for k in 0..npix {
        let lo = &scratch[k * stride..(k + 1) * stride];
        let hi = &scratch[(k + 1) * stride..(k + 2) * stride];
        out[k] = 0.5 * (hi[deg] - lo[deg]);
        for m in 1..=deg {
            out[m * npix + k] = lo[m - 1] - hi[m - 1];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermite_matches_numpy_hermevander() {
        // numpy.polynomial.hermite_e.hermevander(1.3, 6)[0] (numpy 2.x, computed once).
        let expect = [
            1.0,
            1.3,
            0.6900000000000002,
            -1.7029999999999998,
            -4.2839,
            1.2429299999999994,
            23.035308999999998,
        ];
        let mut out = [0.0; 7];
        he_vander(1.3, &mut out);
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn erf_matches_scipy() {
        // scipy.special.erf([-2.5, -0.7, 0.0, 0.3, 1.1, 3.2]) (scipy 1.x, computed once).
        let x = [-2.5, -0.7, 0.0, 0.3, 1.1, 3.2];
        let expect = [
            -0.999593047982555,
            -0.6778011938374183,
            0.0,
            0.3286267594591274,
            0.8802050695740817,
            0.9999939742388483,
        ];
        for (xi, e) in x.iter().zip(expect) {
            assert!((libm::erf(*xi) - e).abs() < 1e-15);
        }
    }

    #[test]
    fn pixel_integrals_match_scipy() {
        // Computed once with scipy 1.x / numpy 2.x for npix=5, offset=0.23, sigma=1.07, deg=3:
        //   e = (arange(6) - 2 - 0.5 - 0.23) / 1.07
        //   p0 = 0.5 * diff(erf(e / sqrt(2)))
        //   G_m(u) = hermeval(u, [0]*m + [1]) * exp(-u**2/2) / sqrt(2*pi)
        //   p_m = G_{m-1}(e[:-1]) - G_{m-1}(e[1:])
        let expect: [[f64; 5]; 4] = REF_PIX;
        let mut out = [0.0; 20];
        let mut scratch = [0.0; 24];
        pixel_integrals(5, 0.23, 1.07, 3, &mut out, &mut scratch);
        for m in 0..4 {
            for k in 0..5 {
                let a = out[m * 5 + k];
                assert!(
                    (a - expect[m][k]).abs() < 1e-14,
                    "m={m} k={k}: {a} vs {}",
                    expect[m][k]
                );
            }
        }
    }

    const REF_PIX: [[f64; 5]; 4] = [
        [
            0.047593781480093855,
            0.19458434924255374,
            0.35206683385434484,
            0.28276010887467945,
            0.10069032950191426,
        ],
        [
            -0.09256564311200413,
            -0.20814975653520829,
            -0.07033166797250584,
            0.18919913587292697,
            0.1552095334242535,
        ],
        [
            0.13527510260432002,
            0.041111660150984275,
            -0.3131767783148913,
            -0.13659660547499597,
            0.14493785638235462,
        ],
        [
            -0.08944288933157314,
            0.3432342317547853,
            0.19286048143150544,
            -0.442461665519643,
            -0.06651877571938634,
        ],
    ];
}
