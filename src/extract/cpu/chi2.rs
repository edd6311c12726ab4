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
        let spot = &s.values[g.spot..g.spot + ny * nx];
        for iy in g.iy0..g.iy1 {
            let r = (g.row0 + iy as i64) as usize;
            let dst = &mut out[r * nxw + g.col0 as usize..r * nxw + g.col0 as usize + nx];
            for (d, v) in dst.iter_mut().zip(&spot[iy * nx..(iy + 1) * nx]) {
                *d += a * v;
            }
        }
    }
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
    let spot = &s.values[g.spot..g.spot + ny * nx];
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
