//! Host twin of kernels/spots.cu: the kernel's per-warp algorithm and memory layout
//! (flattened tables, shared-memory layout with its aliasing, the lanes' strided loops and the
//! warp's reduction order) in plain Rust, run against `psf::spots::evaluate`, so that what is
//! left to a GPU test is the CUDA arithmetic itself (erf, exp, FMA contraction); plus the
//! one-call [`evaluate`] the GPU test uses. Test-only; re-exports the product's `spots`.

use super::super::device::Gpu;
pub(super) use super::super::spots::*;
use super::super::GpuError;
use crate::psf::tail::Tail;
use crate::psf::{Psf, PsfError, SpotGrid, SpotSet};

/// `hermite::pixel_integrals` keeps its Gaussian recurrence in a 64-edge array.
const MAX_RECURRENCE_EDGES: usize = 64;

/// `legendre_series` of the kernel: `Σ_k c[k]·P_k(u)`, P_k as `legendre::vander` computes it,
/// summed in increasing k like `spots::trace_series`.
fn legendre_series(c: &[f64], u: f64) -> f64 {
    let (mut sum, mut pm2, mut pm1) = (0.0, 0.0, 0.0);
    for (k, &ck) in c.iter().enumerate() {
        let p = match k {
            0 => 1.0,
            1 => u,
            _ => {
                let kf = k as f64;
                ((2.0 * kf - 1.0) * u * pm1 - (kf - 1.0) * pm2) / kf
            }
        };
        sum += ck * p;
        pm2 = pm1;
        pm1 = p;
    }
    sum
}

fn reduced(wave: f64, lo: f64, hi: f64) -> f64 {
    2.0 * (wave - lo) / (hi - lo) - 1.0
}

/// `edge_gaussians` of the kernel (one lane's sequential loop).
fn edge_gaussians(g: &mut [f64], half: f64, offset: f64, sigma: f64) {
    let nedge = g.len();
    if nedge <= MAX_RECURRENCE_EDGES {
        let h = 1.0 / sigma;
        let u0 = (-half - 0.5 - offset) / sigma;
        let step = (-h * h).exp();
        let a = (half + 0.5 + offset).round().max(0.0);
        let anchor = if a < (nedge - 1) as f64 {
            a as usize
        } else {
            nedge - 1
        };
        let ua = u0 + anchor as f64 * h;
        g[anchor] = (-0.5 * ua * ua).exp();
        let mut ratio = (-ua * h - 0.5 * h * h).exp();
        for e in anchor + 1..nedge {
            g[e] = g[e - 1] * ratio;
            ratio *= step;
        }
        let mut ratio = (ua * h - 0.5 * h * h).exp();
        for e in (0..anchor).rev() {
            g[e] = g[e + 1] * ratio;
            ratio *= step;
        }
    } else {
        for (e, ge) in g.iter_mut().enumerate() {
            let u = (e as f64 - half - 0.5 - offset) / sigma;
            *ge = (-0.5 * u * u).exp();
        }
    }
}

/// `edge_row` of the kernel: `row[m] = He_m(u)·g/√(2π)` for `m < deg`, `row[deg] = erf(u/√2)`.
fn edge_row(row: &mut [f64], e: usize, deg: usize, half: f64, offset: f64, sigma: f64, gauss: f64) {
    let u = (e as f64 - half - 0.5 - offset) / sigma;
    let g = gauss * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let (mut hm2, mut hm1) = (0.0, 0.0);
    for (m, r) in row[..deg].iter_mut().enumerate() {
        let he = match m {
            0 => 1.0,
            1 => u,
            _ => u * hm1 - (m - 1) as f64 * hm2,
        };
        *r = he * g;
        hm2 = hm1;
        hm1 = he;
    }
    row[deg] = libm::erf(u * std::f64::consts::FRAC_1_SQRT_2);
}

/// The tasks lane `lane` takes in a phase of `n` tasks: `lane, lane + 32, …`.
fn lane_tasks(lane: usize, n: usize) -> impl Iterator<Item = usize> {
    (lane..n).step_by(WARP)
}

/// What the kernel's warp `spot` does, with `s` standing for its shared memory (`Layout`).
/// Phases run one after the other, which is what the kernel's `__syncwarp()`s guarantee; within
/// a phase the lanes' tasks are independent, so their order does not matter except in the
/// normalising sum, which follows the kernel's lanes and shuffle tree exactly.
fn warp_spot(
    inp: &SpotInputs,
    l: &Layout,
    spot: usize,
    s: &mut [f64],
    dst: &mut [f64],
) -> (f64, f64, i64, i64) {
    let sh = &inp.shape;
    let (nx, ny) = (sh.nx(), sh.ny());
    let (dx, dy) = (sh.ghdegx + 1, sh.ghdegy + 1);
    let nrow = sh.nrow();
    let fiber = spot / sh.nwave;
    let wave = inp.waves[spot - fiber * sh.nwave];
    let r = &inp.ranges;

    // Phase 1: the series.
    let up = reduced(wave, r[4], r[5]);
    for lane in 0..WARP {
        for t in lane_tasks(lane, 2 + nrow) {
            s[l.par + t] = match t {
                0 => legendre_series(
                    &inp.xtrace[fiber * sh.ncx..(fiber + 1) * sh.ncx],
                    reduced(wave, r[0], r[1]),
                ),
                1 => legendre_series(
                    &inp.ytrace[fiber * sh.ncy..(fiber + 1) * sh.ncy],
                    reduced(wave, r[2], r[3]),
                ),
                _ => {
                    let row = (fiber * nrow + (t - 2)) * sh.ncp;
                    legendre_series(&inp.params[row..row + sh.ncp], up)
                }
            };
        }
    }
    let (x, y, sigx, sigy) = (s[l.par], s[l.par + 1], s[l.par + 2], s[l.par + 3]);
    let (halfx, halfy) = ((nx / 2) as f64, (ny / 2) as f64);
    let offx = x - (x + 0.5).floor();
    let offy = y - (y + 0.5).floor();

    // Phase 2: lanes 0 and 1.
    edge_gaussians(&mut s[l.gx..l.gx + nx + 1], halfx, offx, sigx);
    edge_gaussians(&mut s[l.gy..l.gy + ny + 1], halfy, offy, sigy);

    // Phase 3: every edge of both axes.
    for lane in 0..WARP {
        for t in lane_tasks(lane, (nx + 1) + (ny + 1)) {
            if t <= nx {
                let g = s[l.gx + t];
                let row = &mut s[l.sx + t * dx..l.sx + (t + 1) * dx];
                edge_row(row, t, dx - 1, halfx, offx, sigx, g);
            } else {
                let e = t - (nx + 1);
                let g = s[l.gy + e];
                let row = &mut s[l.sy + e * dy..l.sy + (e + 1) * dy];
                edge_row(row, e, dy - 1, halfy, offy, sigy, g);
            }
        }
    }

    // Phase 4: pixel integrals.
    for lane in 0..WARP {
        for t in lane_tasks(lane, dx * nx + dy * ny) {
            let (npix, deg, m, k, sc, o) = if t < dx * nx {
                (nx, dx - 1, t / nx, t % nx, l.sx, l.px)
            } else {
                let u = t - dx * nx;
                (ny, dy - 1, u / ny, u % ny, l.sy, l.py)
            };
            let lo = sc + k * (deg + 1);
            let hi = lo + (deg + 1);
            s[o + m * npix + k] = if m == 0 {
                0.5 * (s[hi + deg] - s[lo + deg])
            } else {
                s[lo + m - 1] - s[hi + m - 1]
            };
        }
    }

    // Phase 5: tmp.
    for lane in 0..WARP {
        for t in lane_tasks(lane, dy * nx) {
            let (j, ix) = (t / nx, t % nx);
            let mut acc = 0.0;
            for i in 0..dx {
                acc += s[l.par + 4 + i * dy + j] * s[l.px + i * nx + ix];
            }
            s[l.tmp + t] = acc;
        }
    }

    // Phase 6: the spot plus its tail, clipped, and each lane's partial sum, then the
    // shuffle-down tree. The tail's pixel centres are the corner's (exact) columns and rows.
    let t0 = l.par + 4 + dx * dy;
    let tail =
        (sh.tail && s[t0] != 0.0).then(|| Tail::from_values(std::array::from_fn(|k| s[t0 + k])));
    let x0 = (x - sh.hsizex as f64 + 0.5).floor();
    let y0 = (y - sh.hsizey as f64 + 0.5).floor();
    let mut partial = [0.0f64; WARP];
    for (lane, part) in partial.iter_mut().enumerate() {
        for p in lane_tasks(lane, ny * nx) {
            let (iy, ix) = (p / nx, p % nx);
            let mut v = 0.0;
            for j in 0..dy {
                v += s[l.py + j * ny + iy] * s[l.tmp + j * nx + ix];
            }
            if let Some(tail) = &tail {
                v += tail.value(x0 + ix as f64 - x, y0 + iy as f64 - y);
            }
            if v < 0.0 {
                v = 0.0;
            }
            s[l.out + p] = v;
            *part += v;
        }
    }
    let mut off = WARP / 2;
    while off > 0 {
        // __shfl_down_sync: lane i receives lane i + off's value, or its own past the end;
        // every lane adds at once, hence the copy.
        let before = partial;
        for (lane, part) in partial.iter_mut().enumerate() {
            *part += if lane + off < WARP {
                before[lane + off]
            } else {
                before[lane]
            };
        }
        off /= 2;
    }
    let sum = partial[0];

    // Phase 7: normalise and write.
    for lane in 0..WARP {
        for p in lane_tasks(lane, ny * nx) {
            let v = s[l.out + p];
            dst[p] = if sum > 0.0 { v / sum } else { v };
        }
    }
    (x, y, x0 as i64, y0 as i64)
}

/// The kernel's computation on the CPU, warp by warp, from the same flattened inputs and with
/// the same shared-memory layout (filled with NaN before each spot, so that a read of a slot
/// the kernel would not have written shows in the result).
pub fn twin(inp: &SpotInputs) -> SpotSet {
    let sh = &inp.shape;
    let l = Layout::new(sh);
    let npix = sh.ny() * sh.nx();
    let nspot = sh.nspot();
    let mut set = SpotSet {
        grid: SpotGrid {
            fibermin: inp.fibermin,
            nfiber: sh.nfiber,
            nwave: sh.nwave,
        },
        ny: sh.ny(),
        nx: sh.nx(),
        values: crate::psf::SpotValues::Absent,
        xc: vec![i64::MIN; nspot],
        yc: vec![i64::MIN; nspot],
        x: vec![f64::NAN; nspot],
        y: vec![f64::NAN; nspot],
    };
    let mut s = vec![f64::NAN; l.size];
    let mut values = vec![f64::NAN; nspot * npix];
    for spot in 0..nspot {
        s.fill(f64::NAN);
        let dst = &mut values[spot * npix..(spot + 1) * npix];
        let (x, y, xc, yc) = warp_spot(inp, &l, spot, &mut s, dst);
        set.x[spot] = x;
        set.y[spot] = y;
        set.xc[spot] = xc;
        set.yc[spot] = yc;
    }
    set.values = crate::psf::SpotValues::Host(values);
    set
}

/// Spots for frame fibers `fibermin .. fibermin + nfiber` of `psf` at `waves`, on the GPU: the same
/// set as `psf::spots::evaluate`, x, y and corners bit for bit, values to a few ulps of each
/// spot's peak (CUDA's erf and exp, and fused multiply-adds).
pub fn evaluate(
    gpu: &Gpu,
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotSet, GpuError> {
    let bad = |e: PsfError| GpuError::Kernel(format!("spots: the PSF cannot be evaluated: {e}"));
    if nfiber == 0 || waves.is_empty() {
        // Nothing to compute (the pipeline builds its reusable set this way), and CUDA refuses
        // zero-byte allocations: the CPU returns the same empty, checked set.
        return crate::psf::spots::evaluate(psf, fibermin, nfiber, waves).map_err(bad);
    }
    let inp = flatten(psf, fibermin, nfiber, waves).map_err(bad)?;
    let kernel = SpotsKernel::load(gpu)?;
    let dev = DeviceInputs::upload(gpu, &inp)?;
    let mut out = DeviceSpots::zeros(gpu, &dev)?;
    kernel.launch(gpu, &dev, &mut out)?;
    gpu.stream
        .synchronize()
        .map_err(cuda("running the kernel"))?;
    out.download(gpu)
}

/// The shape of a synthetic PSF the spot kernel is checked over: LEGDEG, HSIZEX, HSIZEY,
/// GHDEGX, GHDEGY.
pub(super) type Shape = (usize, usize, usize, usize, usize);

/// A synthetic PSF of `nfiber` fibers of `shape`, with Gauss–Hermite terms of 0.03 and specter's
/// `tail` (zeros for none).
pub(super) fn shaped_psf(nfiber: usize, shape: Shape, tail: [f64; 5]) -> Psf {
    let (legdeg, hsizex, hsizey, ghdegx, ghdegy) = shape;
    crate::psf::synth::synthetic_psf(&crate::psf::synth::SynthPsfOptions {
        nfiber,
        legdeg,
        hsizex,
        hsizey,
        ghdegx,
        ghdegy,
        gh_amplitude: 0.03,
        tail,
        ..Default::default()
    })
}

mod tests {
    use super::*;
    use crate::psf::spots;
    use crate::psf::synth::{synthetic_psf, SynthPsfOptions};

    /// Largest |twin - cpu| over values; asserts x, y, corners equal and values within `tol`.
    fn compare_twin(psf: &Psf, fibermin: usize, nfiber: usize, waves: &[f64], tol: f64) -> f64 {
        let cpu = spots::evaluate(psf, fibermin, nfiber, waves).unwrap();
        let inp = flatten(psf, fibermin, nfiber, waves).unwrap();
        let tw = twin(&inp);
        assert_eq!(tw.grid, cpu.grid);
        assert_eq!((tw.ny, tw.nx), (cpu.ny, cpu.nx));
        assert_eq!(tw.xc, cpu.xc);
        assert_eq!(tw.yc, cpu.yc);
        // Same operations in the same order: the traces agree to the bit.
        assert_eq!(tw.x, cpu.x);
        assert_eq!(tw.y, cpu.y);
        assert_eq!(tw.values().len(), cpu.values().len());
        let mut worst = 0.0f64;
        for (i, (a, b)) in tw.values().iter().zip(cpu.values()).enumerate() {
            let d = (a - b).abs();
            assert!(d <= tol, "value {i}: twin {a} vs cpu {b}");
            worst = worst.max(d);
        }
        worst
    }

    fn grid(lo: f64, hi: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
            .collect()
    }

    /// Shapes that catch transposed or mis-strided indices: LEGDEG ≠ the traces' 7 terms,
    /// ghdegx ≠ ghdegy, hsizex ≠ hsizey, a pure Gaussian along x (degree 0), and a spot wide
    /// enough (81 edges) that the Gaussian is taken at every edge instead of by recurrence.
    #[test]
    fn twin_matches_the_cpu_on_synthetic_psfs() {
        let shapes = [
            (4, 8, 5, 4, 6),
            (3, 8, 5, 6, 6),
            (0, 40, 3, 0, 2),
            (6, 3, 9, 5, 1),
        ];
        for shape in shapes {
            let (legdeg, hsizex, hsizey, ghdegx, ghdegy) = shape;
            let psf = shaped_psf(30, shape, [0.0; 5]);
            let (lo, hi) = psf.wave_range();
            // Past both ends of the range too: spots leave the CCD there.
            let waves = grid(lo - 15.0, hi + 15.0, 157);
            let worst = compare_twin(&psf, 3, 5, &waves, 1e-13);
            eprintln!(
                "twin vs cpu, synthetic LEGDEG {legdeg} HSIZE {hsizex}x{hsizey} GHDEG \
                 {ghdegx}x{ghdegy}: max |diff| {worst:.2e}"
            );
        }
    }

    /// A PSF with tails: five more parameter rows per fiber (their order in the flattened
    /// table), a longer `par` that shifts every later slot of the layout, and the tail added
    /// before clipping at the corner's pixel centres. One fiber's TAILAMP is 0: its spots skip
    /// the tail on both sides.
    #[test]
    fn twin_matches_the_cpu_with_tails() {
        for shape in [(4, 8, 5, 4, 6), (0, 40, 3, 0, 2)] {
            let (legdeg, hsizex, hsizey, ghdegx, ghdegy) = shape;
            let mut psf = shaped_psf(30, shape, [0.004, 1.5, 1.0, 1.3, 1.2]);
            let amp = psf.params.iter().position(|p| p.name == "TAILAMP").unwrap();
            psf.params[amp].series.coeff.row_mut(5).fill(0.0);
            let (lo, hi) = psf.wave_range();
            let waves = grid(lo - 15.0, hi + 15.0, 157);
            let inp = flatten(&psf, 3, 5, &waves).unwrap();
            assert!(inp.shape.tail);
            let plain = SpotShape {
                tail: false,
                ..inp.shape
            };
            assert_eq!(Layout::new(&inp.shape).gx, Layout::new(&plain).gx + 5);
            let worst = compare_twin(&psf, 3, 5, &waves, 1e-13);
            eprintln!(
                "twin vs cpu with tails, LEGDEG {legdeg} HSIZE {hsizex}x{hsizey} GHDEG \
                 {ghdegx}x{ghdegy}: max |diff| {worst:.2e}"
            );
        }
    }

    #[test]
    fn twin_matches_the_cpu_on_the_real_psf() {
        let Some(path) = crate::io::shared_data("psf-r0-00067784.fits") else {
            return;
        };
        let psf = crate::io::psf::read_psf(&path).unwrap();
        let (lo, hi) = psf.wave_range();
        let waves = grid(lo - 10.0, hi + 10.0, 2400);
        let n = psf.nfiber();
        let mut worst = 0.0f64;
        for (fmin, nf) in [(0, 3), (n / 2, 2), (n - 3, 3)] {
            worst = worst.max(compare_twin(&psf, fmin, nf, &waves, 1e-13));
        }
        eprintln!("twin vs cpu, real PSF: max |diff| {worst:.2e}");
    }

    #[test]
    fn flatten_keeps_gh_index_order_and_each_tables_range() {
        let psf = synthetic_psf(&SynthPsfOptions {
            nfiber: 12,
            legdeg: 4,
            ghdegx: 3,
            ghdegy: 5,
            ..Default::default()
        });
        let waves = [6000.0, 7000.0];
        let inp = flatten(&psf, 4, 6, &waves).unwrap();
        let sh = inp.shape;
        assert_eq!(
            (sh.nfiber, sh.nwave, sh.ncx, sh.ncy, sh.ncp),
            (6, 2, 7, 7, 5)
        );
        assert_eq!(sh.nrow(), 2 + 4 * 6);
        for f in 0..6 {
            for k in 0..5 {
                let at = |r: usize| inp.params[(f * sh.nrow() + r) * sh.ncp + k];
                let coef = |name: &str| psf.param(name).unwrap().series.coeff[[4 + f, k]];
                assert_eq!(at(0), coef("GHSIGX"));
                assert_eq!(at(1), coef("GHSIGY"));
                assert_eq!(at(2 + 2 * 6 + 3), coef("GH-2-3"));
                assert_eq!(at(2 + 3 * 6 + 5), coef("GH-3-5"));
            }
            // No tails in this PSF: no tail rows.
            assert_eq!(inp.params.len(), 6 * sh.nrow() * sh.ncp);
            assert_eq!(inp.xtrace[f * 7 + 2], psf.xtrace.coeff[[4 + f, 2]]);
            assert_eq!(inp.ytrace[f * 7 + 6], psf.ytrace.coeff[[4 + f, 6]]);
        }
        // The parameter table's own WAVEMAX (1 Å past the traces'), not the traces'.
        assert_eq!(inp.ranges[5], psf.param("GHSIGX").unwrap().series.wavemax);
        assert_ne!(inp.ranges[5], inp.ranges[1]);
        assert!(flatten(&psf, 8, 6, &waves).is_err());

        // With tails, TAILAMP … TAILINDE follow the GH-i-j rows of each fiber.
        let psf = synthetic_psf(&SynthPsfOptions {
            nfiber: 12,
            legdeg: 4,
            ghdegx: 3,
            ghdegy: 5,
            tail: [0.01, 2.0, 1.0, 1.1, 1.5],
            ..Default::default()
        });
        let inp = flatten(&psf, 4, 6, &waves).unwrap();
        let sh = inp.shape;
        assert!(sh.tail);
        assert_eq!(sh.nrow(), 2 + 4 * 6 + 5);
        for f in 0..6 {
            for (t, name) in crate::psf::tail::TAIL_PARAMS.iter().enumerate() {
                for k in 0..5 {
                    let at = inp.params[(f * sh.nrow() + 2 + 24 + t) * sh.ncp + k];
                    assert_eq!(at, psf.param(name).unwrap().series.coeff[[4 + f, k]]);
                }
            }
        }
    }

    /// A unit's PSF holds its fibers only: the kernel's inputs for those frame fibers are the
    /// whole PSF's, the set it gives is labelled with them, and other fibers are refused.
    #[test]
    fn flatten_takes_frame_fibers_from_a_psf_subset() {
        let psf = synthetic_psf(&SynthPsfOptions {
            nfiber: 50,
            ..Default::default()
        });
        let unit = psf.subset(25, 25).unwrap();
        let waves = [6000.0, 6500.0, 7000.0];
        let inp = flatten(&unit, 30, 6, &waves).unwrap();
        assert_eq!(inp, flatten(&psf, 30, 6, &waves).unwrap());
        assert_eq!(twin(&inp).grid.fibermin, 30);
        compare_twin(&unit, 30, 6, &waves, 1e-13);
        for (first, n) in [(20, 6), (45, 6)] {
            match flatten(&unit, first, n, &waves) {
                Err(PsfError::FibersNotHeld { wanted, held }) => {
                    assert_eq!((wanted, held), (first..first + n, 25..50));
                }
                other => panic!("fibers {first}+{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn launch_config_fits_shared_memory() {
        let desi = SpotShape {
            nfiber: 25,
            nwave: 2400,
            hsizex: 8,
            hsizey: 5,
            ghdegx: 6,
            ghdegy: 6,
            ncx: 7,
            ncy: 7,
            ncp: 9,
            tail: false,
        };
        // par 53, g 18 + 12, s 126 + 84, px 119 (out's 187 fit inside), py 77, tmp 119.
        assert_eq!(
            Layout::new(&desi).size,
            53 + 18 + 12 + 126 + 84 + 119 + 77 + 119
        );
        let (cfg, stride) = launch_config(&desi).unwrap();
        assert_eq!(stride, Layout::new(&desi).size);
        assert_eq!(cfg.block_dim, (256, 1, 1));
        assert_eq!(cfg.grid_dim, (25 * 2400 / 8, 1, 1));
        assert_eq!(cfg.shared_mem_bytes as usize, 8 * stride * 8);
        // A spot whose clipped values outgrow the dead scratch they alias.
        let big = SpotShape {
            hsizex: 30,
            hsizey: 30,
            ghdegx: 1,
            ghdegy: 1,
            ..desi
        };
        let l = Layout::new(&big);
        assert_eq!(l.py, l.out + 61 * 61);
        // The largest shapes the PSF reader accepts do not fit: a clear error, not a launch.
        let huge = SpotShape {
            hsizex: 64,
            hsizey: 64,
            ghdegx: 20,
            ghdegy: 20,
            ..desi
        };
        let err = launch_config(&huge).unwrap_err().to_string();
        assert!(err.contains("shared"), "{err}");
    }

    /// The kernel against the CPU at the real size of a bundle (25 fibers × 2400 wavelengths),
    /// on the first and last bundles, over a grid reaching past the PSF's range so that spots
    /// leave the CCD, and on a synthetic PSF with tails. The outputs are poisoned (NaN,
    /// i64::MIN) before the launch, so that an element the kernel fails to write cannot pass.
    #[test]
    fn gpu_spots_match_the_cpu() {
        if let Err(e) = crate::extract::gpu::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 is visible but cannot be opened");
        let psf = match crate::io::shared_data("psf-r0-00067784.fits") {
            Some(p) => crate::io::psf::read_psf(&p).unwrap(),
            None => synthetic_psf(&SynthPsfOptions::default()),
        };
        let (lo, hi) = psf.wave_range();
        let waves = grid(lo - 10.0, hi + 10.0, 2400);
        let kernel = SpotsKernel::load(&gpu).unwrap();
        let nf = psf.nfiber();
        let mut worst = 0.0f64;
        let mut off_ccd = 0usize;
        for fmin in [0, nf - 25] {
            let inp = flatten(&psf, fmin, 25, &waves).unwrap();
            let dev = DeviceInputs::upload(&gpu, &inp).unwrap();
            let sh = inp.shape;
            let n = sh.nspot();
            let s = &gpu.stream;
            let mut out = DeviceSpots {
                held: crate::psf::HeldSpots::mint(),
                grid: DeviceSpots::grid_of(&dev),
                ny: sh.ny(),
                nx: sh.nx(),
                values: s
                    .clone_htod(&vec![f64::NAN; n * sh.ny() * sh.nx()])
                    .unwrap(),
                xc: s.clone_htod(&vec![i64::MIN; n]).unwrap(),
                yc: s.clone_htod(&vec![i64::MIN; n]).unwrap(),
                x: s.clone_htod(&vec![f64::NAN; n]).unwrap(),
                y: s.clone_htod(&vec![f64::NAN; n]).unwrap(),
            };
            kernel.launch(&gpu, &dev, &mut out).unwrap();
            s.synchronize().unwrap();
            let g = out.download(&gpu).unwrap();
            let cpu = spots::evaluate(&psf, fmin, 25, &waves).unwrap();
            assert_eq!(g.grid, cpu.grid);
            // The traces and corners are computed unfused: bit for bit.
            assert_eq!(g.xc, cpu.xc);
            assert_eq!(g.yc, cpu.yc);
            assert_eq!(g.x, cpu.x);
            assert_eq!(g.y, cpu.y);
            let npix = sh.ny() * sh.nx();
            for i in 0..n {
                let (a, b) = (
                    g.spot(i / sh.nwave, i % sh.nwave),
                    cpu.spot(i / sh.nwave, i % sh.nwave),
                );
                // Relative to the spot's peak: a tail pixel that cancels to ~0 has no
                // meaningful relative error of its own.
                let peak = b.iter().fold(0.0f64, |m, v| m.max(*v));
                assert!(peak > 0.0);
                for p in 0..npix {
                    let d = (a[p] - b[p]).abs() / peak;
                    assert!(
                        d <= 1e-12,
                        "fiber {} wave {}: pixel {p}: gpu {} cpu {}",
                        fmin + i / sh.nwave,
                        i % sh.nwave,
                        a[p],
                        b[p]
                    );
                    worst = worst.max(d);
                }
                let (xc, yc) = (cpu.xc[i], cpu.yc[i]);
                if xc < 0
                    || yc < 0
                    || xc + sh.nx() as i64 > psf.npix_x as i64
                    || yc + sh.ny() as i64 > psf.npix_y as i64
                {
                    off_ccd += 1;
                }
            }
            // evaluate() takes the same path with zeroed outputs.
            let e = evaluate(&gpu, &psf, fmin, 25, &waves).unwrap();
            assert_eq!(e.xc, g.xc);
            for (a, b) in e.values().iter().zip(g.values()) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
        assert!(
            off_ccd > 0,
            "no spot leaves the CCD: the edge case is not exercised"
        );
        // A PSF with tails: CUDA's pow against libm's, within the same bound.
        let tailed = synthetic_psf(&SynthPsfOptions {
            nfiber: 50,
            gh_amplitude: 0.03,
            tail: [0.004, 1.5, 1.0, 1.3, 1.2],
            ..Default::default()
        });
        let (lo, hi) = tailed.wave_range();
        let waves = grid(lo - 10.0, hi + 10.0, 600);
        let g = evaluate(&gpu, &tailed, 20, 25, &waves).unwrap();
        let cpu = spots::evaluate(&tailed, 20, 25, &waves).unwrap();
        assert_eq!(
            (&g.xc, &g.yc, &g.x, &g.y),
            (&cpu.xc, &cpu.yc, &cpu.x, &cpu.y)
        );
        let npix = cpu.ny * cpu.nx;
        let mut worst_tail = 0.0f64;
        for (a, b) in g.values().chunks(npix).zip(cpu.values().chunks(npix)) {
            let peak = b.iter().fold(0.0f64, |m, v| m.max(*v));
            for (p, q) in a.iter().zip(b) {
                let d = (p - q).abs() / peak;
                assert!(d <= 1e-12, "tails: gpu {p} cpu {q}");
                worst_tail = worst_tail.max(d);
            }
        }
        eprintln!("gpu vs cpu with tails: max |diff|/peak {worst_tail:.2e}");
        // An empty block never reaches the device and is the CPU's empty set.
        let empty = evaluate(&gpu, &psf, 0, 0, &[]).unwrap();
        assert!(empty.values().is_empty() && empty.xc.is_empty());
        assert_eq!((empty.ny, empty.nx), (psf.spot_ny(), psf.spot_nx()));
        eprintln!(
            "gpu vs cpu on {} ({} spots off the CCD): max |diff|/peak {worst:.2e}",
            gpu.info.name, off_ccd
        );
    }
}
