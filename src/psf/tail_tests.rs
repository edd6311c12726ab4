//! The tail term against specter's `_xypix`, written out independently here (pixel-integrated
//! Gauss–Hermite core by specter's `pgh`, plus the tail at pixel centres, clipped and
//! normalised), and the promise that a PSF without tails is left bit for bit alone.

use super::*;
use crate::psf::spots::{self, SpotEvaluator};
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};
use libm::erf;
use std::f64::consts::{PI, SQRT_2};

/// A tail like specex's fits: a few per mille of the peak at a few pixels.
const TAILS: [f64; 5] = [0.004, 1.5, 1.0, 1.3, 1.2];

fn tailed(tail: [f64; 5]) -> Psf {
    synthetic_psf(&SynthPsfOptions {
        nfiber: 30,
        legdeg: 3,
        ghdegx: 4,
        ghdegy: 3,
        gh_amplitude: 0.03,
        tail,
        ..Default::default()
    })
}

/// specter's `pgh(xccd, m, xc, sigma)`: the pixel integrals of `He_m(u)·φ(u)` over pixels
/// whose centres are `xccd`.
fn pgh(xccd: &[f64], m: usize, xc: f64, sigma: f64) -> Vec<f64> {
    let edges: Vec<f64> = xccd
        .iter()
        .map(|&c| c - xc - 0.5)
        .chain([xccd[xccd.len() - 1] - xc + 0.5])
        .map(|d| d / sigma)
        .collect();
    let he = |k: usize, u: f64| {
        let (mut a, mut b) = (1.0, u); // He_0, He_1
        match k {
            0 => a,
            _ => {
                for n in 1..k {
                    (a, b) = (b, u * b - n as f64 * a);
                }
                b
            }
        }
    };
    let y: Vec<f64> = if m > 0 {
        edges
            .iter()
            .map(|&u| -he(m - 1, u) * (-0.5 * u * u).exp() / (2.0 * PI).sqrt())
            .collect()
    } else {
        edges.iter().map(|&u| 0.5 * erf(u / SQRT_2)).collect()
    };
    y.windows(2).map(|w| w[1] - w[0]).collect()
}

/// specter's spot of `fiber` at `wave`: `(corner, values)`.
fn specter_spot(psf: &Psf, fiber: usize, wave: f64) -> ((i64, i64), Vec<f64>) {
    let p = |name: &str| psf.param(name).unwrap().series.eval(fiber, wave);
    let x = psf.xtrace.eval(fiber, wave);
    let y = psf.ytrace.eval(fiber, wave);
    let (hx, hy) = (psf.hsizex as f64, psf.hsizey as f64);
    let x0 = (x - hx + 0.5).floor();
    let y0 = (y - hy + 0.5).floor();
    let xccd: Vec<f64> = (0..psf.spot_nx()).map(|i| x0 + i as f64).collect();
    let yccd: Vec<f64> = (0..psf.spot_ny()).map(|i| y0 + i as f64).collect();
    let xf: Vec<_> = (0..=psf.ghdegx)
        .map(|i| pgh(&xccd, i, x, p("GHSIGX")))
        .collect();
    let yf: Vec<_> = (0..=psf.ghdegy)
        .map(|j| pgh(&yccd, j, y, p("GHSIGY")))
        .collect();
    let (amp, core, xs, ys, inde) = (
        p("TAILAMP"),
        p("TAILCORE"),
        p("TAILXSCA"),
        p("TAILYSCA"),
        p("TAILINDE"),
    );
    let mut img = Vec::new();
    for (iy, &yc) in yccd.iter().enumerate() {
        for (ix, &xc) in xccd.iter().enumerate() {
            let mut v = 0.0;
            for (i, xfi) in xf.iter().enumerate() {
                for (j, yfj) in yf.iter().enumerate() {
                    v += p(&format!("GH-{i}-{j}")) * yfj[iy] * xfi[ix];
                }
            }
            let r2 = ((xc - x) * xs).powi(2) + ((yc - y) * ys).powi(2);
            // specter's 0/0 where every tail row is 0 (r² = 0 and TAILCORE = 0) is taken as 0.
            if amp != 0.0 {
                v += amp * r2 / (core * core + r2).powf(1.0 + inde / 2.0);
            }
            img.push(v.max(0.0));
        }
    }
    let sum: f64 = img.iter().sum();
    img.iter_mut().for_each(|v| *v /= sum);
    ((x0 as i64, y0 as i64), img)
}

fn waves(psf: &Psf) -> Vec<f64> {
    let (lo, hi) = psf.wave_range();
    (0..9).map(|i| lo + (hi - lo) * i as f64 / 8.0).collect()
}

#[test]
fn spots_with_tails_are_specters_point_by_point() {
    let psf = tailed(TAILS);
    let plain = tailed([0.0; 5]);
    assert!(psf.has_tails() && !plain.has_tails());
    let waves = waves(&psf);
    let fibers = [0, 7, 29];
    let (mut worst, mut effect) = (0.0f64, 0.0f64);
    for &f in &fibers {
        let set = spots::evaluate(&psf, f, 1, &waves).unwrap();
        let without = spots::evaluate(&plain, f, 1, &waves).unwrap();
        for (w, &wave) in waves.iter().enumerate() {
            let ((xc, yc), want) = specter_spot(&psf, f, wave);
            assert_eq!((set.xc[w], set.yc[w]), (xc, yc), "fiber {f} at {wave}");
            let got = set.spot(0, w);
            let peak = want.iter().fold(0.0f64, |m, &v| m.max(v));
            for (p, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = (a - b).abs() / peak;
                assert!(
                    d < 1e-12,
                    "fiber {f} at {wave}, pixel {p}: {a} vs specter {b}"
                );
                worst = worst.max(d);
            }
            for (a, b) in got.iter().zip(without.spot(0, w)) {
                effect = effect.max((a - b).abs() / peak);
            }
        }
    }
    eprintln!("tails vs specter: max |diff|/peak {worst:.1e}; the tail moves pixels by up to {effect:.1e} of the peak");
    // The tail is not lost in the rounding: it changes the spots well beyond the tolerance.
    assert!(effect > 1e-3, "{effect:e}");
}

#[test]
fn without_tails_spots_are_specters_too() {
    // The independent evaluation agrees with the evaluator on the core alone, so the test
    // above checks the tail, not a coincidence of both.
    let psf = tailed([0.0; 5]);
    for (w, &wave) in waves(&psf).iter().enumerate() {
        let set = spots::evaluate(&psf, 12, 1, &[wave]).unwrap();
        let (_, want) = specter_spot(&psf, 12, wave);
        let peak = want.iter().fold(0.0f64, |m, &v| m.max(v));
        for (a, b) in set.spot(0, 0).iter().zip(&want) {
            assert!((a - b).abs() / peak < 1e-12, "wave {w}: {a} vs {b}");
        }
    }
}

/// All spots of `psf` for `fibers` at `waves`, as bits.
fn bits(psf: &Psf, fibers: std::ops::Range<usize>, waves: &[f64]) -> Vec<u64> {
    let set = spots::evaluate(psf, fibers.start, fibers.len(), waves).unwrap();
    set.values().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_zero_tailamp_leaves_spots_bit_for_bit() {
    // TAILAMP = 0 with the other tail rows set (and absent altogether): exactly the spots of
    // the PSF without those rows.
    let mut psf = tailed(TAILS);
    let amp = psf.params.iter().position(|p| p.name == "TAILAMP").unwrap();
    psf.params[amp].series.coeff.fill(0.0);
    assert!(psf.gh_index().unwrap().tail.is_none());
    let mut stripped = psf.clone();
    stripped
        .params
        .retain(|p| !TAIL_PARAMS.contains(&p.name.as_str()));
    let waves = waves(&psf);
    assert_eq!(bits(&psf, 0..30, &waves), bits(&stripped, 0..30, &waves));

    // A fiber whose own TAILAMP is 0 in a PSF with tails elsewhere: its spots are untouched.
    let mut some = tailed(TAILS);
    some.params[amp].series.coeff.row_mut(4).fill(0.0);
    assert!(some.gh_index().unwrap().tail.is_some());
    assert_eq!(bits(&some, 4..5, &waves), bits(&stripped, 4..5, &waves));
    assert_ne!(bits(&some, 5..6, &waves), bits(&stripped, 5..6, &waves));
}

#[test]
fn a_tail_needs_all_five_rows() {
    let mut psf = tailed(TAILS);
    psf.params.retain(|p| p.name != "TAILINDE");
    let err = psf.validate().unwrap_err().to_string();
    assert!(err.contains("TAILINDE"), "{err}");
    assert!(psf.gh_index().is_err());
}

#[test]
fn the_tail_is_zero_at_its_centre_even_without_a_core() {
    let t = Tail::from_values([0.01, 0.0, 1.0, 1.0, 1.0]);
    assert_eq!(t.value(0.0, 0.0), 0.0);
    // Elsewhere specter's formula: r² / r^3 = 1/r at r = 2.
    assert!((t.value(2.0, 0.0) - 0.01 / 2.0).abs() < 1e-17);
    let mut spot = vec![0.0; 9];
    Tail::from_values([0.0, 1.0, 1.0, 1.0, 1.0]).add_to(&mut spot, 3, 0, 0, 1.0, 1.0);
    assert!(spot.iter().all(|v| v.to_bits() == 0));
    // One spot evaluator serves fibers with and without tails in turn.
    let psf = tailed(TAILS);
    let index = psf.gh_index().unwrap();
    let mut ev = SpotEvaluator::new(&psf, &index);
    let mut a = vec![0.0; psf.spot_nx() * psf.spot_ny()];
    let mut b = a.clone();
    ev.spot(3, 6500.0, &mut a);
    ev.spot(9, 6500.0, &mut b);
    ev.spot(3, 6500.0, &mut b);
    assert_eq!(a, b);
}
