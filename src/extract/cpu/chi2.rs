//! Model, chi2pix and pixmask fraction of a patch (docs/science.md §5.6–5.8).

use super::normal::SpotGeom;
use crate::extract::PatchInput;

/// Accumulates `model = A·x` over the window (`[ny·nx]`, row-major).
#[inline(never)]
pub fn model(input: &PatchInput<'_>, geom: &[SpotGeom], x: &[f64], out: &mut Vec<f64>) {
    let w = input.window;
    let (nyw, nxw) = (w.ny(), w.nx());
    out.clear();
    out.resize(nyw * nxw, 0.0);
    add_spots(input, geom, x, 0..geom.len(), out);
}

/// `out += Σ_u spot_u · coef[u]` for unknowns `range`.
pub fn add_spots(
    input: &PatchInput<'_>,
    geom: &[SpotGeom],
    coef: &[f64],
    range: std::ops::Range<usize>,
    out: &mut [f64],
) {
    let s = input.spots;
    let (ny, nx) = (s.ny, s.nx);
    let nxw = input.window.nx();
    for u in range {
        let g = geom[u];
        let a = coef[u];
        let spot = &s.values()[g.spot..g.spot + ny * nx];
        for iy in g.iy0..g.iy1 {
            let r = (g.row0 + iy as i64) as usize;
            let dst = &mut out[r * nxw + g.col0 as usize..r * nxw + g.col0 as usize + nx];
            for (d, v) in dst.iter_mut().zip(&spot[iy * nx..(iy + 1) * nx]) {
                *d += a * v;
            }
        }
    }
}

/// Each window pixel's leverage on the model of the unknowns `core`: `∂model_i/∂pix_i =
/// ivar_i · Σ_{u∈core} a_iu Σ_v C_uv a_iv` (the hat matrix's diagonal restricted to `core`),
/// with `C` from the patch's last solve. Only the pairs within the band of `C` the solve keeps
/// are visited (every pair whose spots share a pixel is), and of those only the ones whose spots
/// share a pixel add; each pixel sums its terms in increasing `(u, v)`.
pub fn leverage(
    input: &PatchInput<'_>,
    geom: &[SpotGeom],
    core: &[usize],
    decorr: &super::decorrelate::DecorrWork,
) -> ndarray::Array2<f64> {
    let s = input.spots;
    let (ny, nx) = (s.ny, s.nx);
    let w = input.window;
    let nxw = w.nx();
    let mut acc = vec![0.0; w.ny() * nxw];
    // Rows of a spot inside the window, in window rows.
    let rows = |g: &SpotGeom| (g.row0 + g.iy0 as i64, g.row0 + g.iy1 as i64);
    for &u in core {
        let gu = geom[u];
        let (u0, u1) = rows(&gu);
        if u1 <= u0 {
            continue;
        }
        let su = &s.values()[gu.spot..gu.spot + ny * nx];
        for v in decorr.band_partners(u) {
            let gv = geom[v];
            // Spots that share no column share no pixel.
            if (gv.col0 - gu.col0).unsigned_abs() as usize >= nx {
                continue;
            }
            let (v0, v1) = rows(&gv);
            let (r0, r1) = (u0.max(v0), u1.min(v1));
            if r1 <= r0 {
                continue;
            }
            let c = decorr.covariance(u, v);
            if c == 0.0 {
                continue;
            }
            let sv = &s.values()[gv.spot..gv.spot + ny * nx];
            let x0 = gu.col0.max(gv.col0);
            let len = ((gu.col0 + nx as i64).min(gv.col0 + nx as i64) - x0) as usize;
            let (xu, xv) = ((x0 - gu.col0) as usize, (x0 - gv.col0) as usize);
            let (iyu, iyv) = ((r0 - gu.row0) as usize, (r0 - gv.row0) as usize);
            // Rows r0..r1 of the two spots and of the window, each from column x0 on.
            let dst = acc[r0 as usize * nxw + x0 as usize..].chunks_mut(nxw);
            let a_rows = su[iyu * nx + xu..].chunks(nx);
            let b_rows = sv[iyv * nx + xv..].chunks(nx);
            for ((d, a), b) in dst.zip(a_rows).zip(b_rows).take((r1 - r0) as usize) {
                for ((d, a), b) in d[..len].iter_mut().zip(&a[..len]).zip(&b[..len]) {
                    *d += c * a * b;
                }
            }
        }
    }
    ndarray::Array2::from_shape_vec((w.ny(), nxw), acc).expect("window-sized") * input.ivar
}

/// Per-pixel chi² and the indicator of `totivar > 0`, from the model (gpu_specter CPU path:
/// `modelivar = (psferr·model + 1e-32)⁻²`, `totivar = 1/(1/modelivar + 1/ivar)`).
#[inline(never)]
pub fn pixel_chi2(
    input: &PatchInput<'_>,
    model: &[f64],
    psferr: f64,
    chi2: &mut Vec<f64>,
    valid: &mut Vec<f64>,
) {
    let nxw = input.window.nx();
    chi2.clear();
    valid.clear();
    for (r, (prow, wrow)) in input
        .pix
        .outer_iter()
        .zip(input.ivar.outer_iter())
        .enumerate()
    {
        for c in 0..nxw {
            let m = model[r * nxw + c];
            let ivar = wrow[c];
            let t = psferr * m + 1e-32;
            let modelivar = 1.0 / (t * t);
            let totivar = if modelivar > 0.0 && ivar > 0.0 {
                1.0 / (1.0 / modelivar + 1.0 / ivar)
            } else {
                0.0
            };
            let d = prow[c] - m;
            chi2.push(d * d * totivar);
            valid.push(if totivar > 0.0 { 1.0 } else { 0.0 });
        }
    }
}

/// `Σ_pixels spot_u · values` for one unknown (a row of `Aᵀ·values`).
#[inline(never)]
pub fn project(input: &PatchInput<'_>, g: &SpotGeom, values: &[f64]) -> f64 {
    let s = input.spots;
    let (ny, nx) = (s.ny, s.nx);
    let nxw = input.window.nx();
    let spot = &s.values()[g.spot..g.spot + ny * nx];
    let mut sum = 0.0;
    for iy in g.iy0..g.iy1 {
        let r = (g.row0 + iy as i64) as usize;
        let src = &values[r * nxw + g.col0 as usize..r * nxw + g.col0 as usize + nx];
        sum += spot[iy * nx..(iy + 1) * nx]
            .iter()
            .zip(src)
            .map(|(a, b)| a * b)
            .sum::<f64>();
    }
    sum
}
