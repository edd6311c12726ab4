//! `AᵀWA`, `AᵀWp` and `AᵀW1` built from the spots (docs/science.md §5.1–5.2), never from a
//! dense `A`: `A` is ~97 % zeros, so only overlapping spot pairs are visited.

use crate::extract::PatchInput;

/// Where one unknown's spot lies in the patch window.
#[derive(Debug, Clone, Copy)]
pub struct SpotGeom {
    /// Window row of the spot's first row (negative when trimmed at the top).
    pub row0: i64,
    /// Window column of the spot's first column.
    pub col0: i64,
    /// First spot row inside the window.
    pub iy0: usize,
    /// One past the last spot row inside the window (≤ `iy0` when none is).
    pub iy1: usize,
    /// Offset of the spot in `SpotSet::values`.
    pub spot: usize,
}

/// Places every unknown's spot (fiber-major, wavelength-minor) in the window.
pub fn geometry(input: &PatchInput<'_>, out: &mut Vec<SpotGeom>) {
    let p = &input.patch;
    let s = input.spots;
    let f0 = p.specmin - s.grid.fibermin;
    let ny = s.ny as i64;
    let nyw = input.window.ny() as i64;
    out.clear();
    for f in 0..p.nspecpad {
        for w in 0..p.nwavetot {
            let i = s.index(f0 + f, p.iwave + w);
            let row0 = s.yc[i] - input.window.ymin;
            let col0 = s.xc[i] - input.window.xmin;
            out.push(SpotGeom {
                row0,
                col0,
                iy0: (-row0).clamp(0, ny) as usize,
                iy1: (nyw - row0).clamp(0, ny) as usize,
                spot: i * s.ny * s.nx,
            });
        }
    }
}

/// The weighted normal equations of one patch.
pub struct Normal<'w> {
    /// The nonzero entries of `AᵀWA`'s upper triangle in wavelength-major order
    /// (`p = w·nspecpad + f`): `(p, q, value)` with `p ≤ q`, about 11 % of the matrix.
    pub pairs: &'w mut Vec<(u32, u32, f64)>,
    /// `AᵀWp`.
    pub rhs: &'w mut [f64],
    /// `AᵀW1`.
    pub fluxweight: &'w mut [f64],
    /// Weighted spots `W·A` per unknown, `[u][iy·nx + ix]`.
    pub wspot: &'w mut [f64],
}

/// Fills `normal` and returns the half-bandwidth of `AᵀWA` in wavelength-major order
/// (`u' = w·nspecpad + f`).
#[inline(never)]
pub fn build(input: &PatchInput<'_>, geom: &[SpotGeom], normal: &mut Normal<'_>) -> usize {
    let s = input.spots;
    let (ny, nx) = (s.ny, s.nx);
    let nps = ny * nx;
    let n = geom.len();
    let nsp = input.patch.nspecpad;
    let nwt = input.patch.nwavetot;
    let (pix, ivar) = (&input.pix, &input.ivar);
    normal.pairs.clear();
    for (u, g) in geom.iter().enumerate() {
        let spot = &s.values()[g.spot..g.spot + nps];
        let ws = &mut normal.wspot[u * nps..(u + 1) * nps];
        ws.iter_mut().for_each(|v| *v = 0.0);
        let (mut rhs, mut fw) = (0.0, 0.0);
        for iy in g.iy0..g.iy1 {
            let r = (g.row0 + iy as i64) as usize;
            let c0 = g.col0 as usize;
            let prow = pix.row(r);
            let wrow = ivar.row(r);
            for ix in 0..nx {
                let v = spot[iy * nx + ix] * wrow[c0 + ix];
                ws[iy * nx + ix] = v;
                rhs += v * prow[c0 + ix];
                fw += v;
            }
        }
        normal.rhs[u] = rhs;
        normal.fluxweight[u] = fw;
    }
    let mut kd = 0usize;
    let perm = |u: usize| (u % nwt) * nsp + u / nwt;
    // Traces run monotonically in wavelength, so the bins of a fiber whose spot rows can meet a
    // given spot form one run, found by bisection; a PSF where they do not falls back to
    // testing every bin.
    let monotonic = (0..nsp).all(|f| {
        geom[f * nwt..(f + 1) * nwt]
            .windows(2)
            .all(|g| g[1].row0 >= g[0].row0)
    });
    let col_range: Vec<(i64, i64)> = (0..nsp)
        .map(|f| {
            let g = &geom[f * nwt..(f + 1) * nwt];
            (
                g.iter().map(|g| g.col0).min().unwrap_or(0),
                g.iter().map(|g| g.col0).max().unwrap_or(0),
            )
        })
        .collect();
    for u in 0..n {
        let gu = geom[u];
        if gu.iy1 <= gu.iy0 {
            continue;
        }
        let ws = &normal.wspot[u * nps..(u + 1) * nps];
        let fu = u / nwt;
        for fv in fu..nsp {
            let (cmin, cmax) = col_range[fv];
            if cmax <= gu.col0 - nx as i64 || cmin >= gu.col0 + nx as i64 {
                continue;
            }
            let fiber = &geom[fv * nwt..(fv + 1) * nwt];
            let mut wv = if fv == fu { u % nwt } else { 0 };
            if monotonic {
                let lo = gu.row0 - ny as i64;
                wv = wv.max(fiber.partition_point(|g| g.row0 <= lo));
            }
            while wv < nwt {
                let v = fv * nwt + wv;
                wv += 1;
                let gv = geom[v];
                let dy = gv.row0 - gu.row0;
                if monotonic && dy >= ny as i64 {
                    break;
                }
                let dx = gv.col0 - gu.col0;
                if dy.unsigned_abs() as usize >= ny || dx.unsigned_abs() as usize >= nx {
                    continue;
                }
                // Rows and columns in spot-u coordinates where both spots lie in the window.
                let iy_lo = (gu.iy0 as i64).max(gv.iy0 as i64 + dy);
                let iy_hi = (gu.iy1 as i64).min(gv.iy1 as i64 + dy);
                if iy_hi <= iy_lo {
                    continue;
                }
                let ix_lo = dx.max(0) as usize;
                let ix_hi = (nx as i64 + dx).min(nx as i64) as usize;
                let sv = &s.values()[gv.spot..gv.spot + nps];
                let sum = overlap_dot(
                    &ws[iy_lo as usize * nx + ix_lo..],
                    &sv[((iy_lo - dy) as usize * nx + (ix_lo as i64 - dx) as usize)..],
                    nx,
                    (iy_hi - iy_lo) as usize,
                    ix_hi - ix_lo,
                );
                let (pu, pv) = (perm(u), perm(v));
                // n ≤ a few thousand, far below u32::MAX.
                normal
                    .pairs
                    .push((pu.min(pv) as u32, pu.max(pv) as u32, sum));
                kd = kd.max(pu.abs_diff(pv));
            }
        }
    }
    kd
}

/// `Σ a·b` over a `rows × width` rectangle of two row-major arrays of row stride `stride`.
///
/// A spot row is only ~17 pixels, so reducing every row's products to a scalar (a dot product
/// per row) spent as long on the reductions as on the products. Here each column keeps its own
/// partial sum across the rows, in registers because the width is a compile-time constant
/// (one instance per width up to 24; wider spots take the plain loop), and the rectangle is
/// reduced once. The order is fixed, so the result does not depend on threads or batching.
#[inline]
fn overlap_dot(a: &[f64], b: &[f64], stride: usize, rows: usize, width: usize) -> f64 {
    macro_rules! by_width {
        ($($w:literal)*) => {
            match width {
                $($w => rect_dot::<$w>(a, b, stride, rows),)*
                _ => (0..rows)
                    .map(|r| {
                        let (a, b) = (&a[r * stride..], &b[r * stride..]);
                        a[..width].iter().zip(&b[..width]).fold(0.0, |s, (x, y)| x.mul_add(*y, s))
                    })
                    .sum(),
            }
        };
    }
    by_width!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
}

#[inline(always)]
fn rect_dot<const W: usize>(a: &[f64], b: &[f64], stride: usize, rows: usize) -> f64 {
    let mut acc = [0.0f64; W];
    for r in 0..rows {
        let x: &[f64; W] = a[r * stride..r * stride + W].try_into().expect("W wide");
        let y: &[f64; W] = b[r * stride..r * stride + W].try_into().expect("W wide");
        for k in 0..W {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    acc.iter().sum()
}

/// The regularisation of docs/science.md §5.2: what each unknown (fiber-major) adds to the
/// diagonal of `AᵀWA`.
pub fn regularization(fluxweight: &[f64], regularize: f64, epsilon: f64, out: &mut Vec<f64>) {
    let maxw = fluxweight.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let minweight = 1e-4 * maxw;
    out.clear();
    out.extend(fluxweight.iter().map(|&fw| {
        let lambda2 = if fw < minweight {
            (minweight - fw) * (minweight - fw)
        } else {
            regularize * regularize
        };
        lambda2 + epsilon
    }));
}
