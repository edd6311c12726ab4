//! `spextract compare`: the statistics of docs/science.md §8, with thresholds that set the exit
//! code, so that scripts and CI can gate on them.
//!
//! For the frame alone: its size, mask bits, non-finite values and how much of each resolution
//! row's weight its stored band keeps. Against a second frame: pulls between the two. Against
//! the truth: pulls of `flux - R·truth`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ndarray::Array2;

use crate::io::frame::{read_frame, Frame};
use crate::io::truth::read_truth;
use crate::pipeline::frame::{median, specmask};

/// `spextract compare A [B] [--truth T]`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The frame to judge.
    pub frame: PathBuf,
    /// A second frame of the same fibers and grid (for example gpu_specter's).
    pub other: Option<PathBuf>,
    /// Truth spectra (WAVELENGTH, FLUX per Å) to compare with `R · truth`.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Frame vs frame: fail if the maximum pull exceeds this.
    #[arg(long, default_value_t = 1e-3)]
    pub max_pull: f64,
    /// Frame vs frame: fail if the median pull exceeds this.
    #[arg(long, default_value_t = 1e-6)]
    pub max_median_pull: f64,
    /// Truth: fail if |chi²/dof - 1| over the frame exceeds this.
    #[arg(long, default_value_t = 0.03)]
    pub chi2_tol: f64,
    /// Truth: fail if |mean pull| exceeds this.
    #[arg(long, default_value_t = 0.02)]
    pub mean_pull_tol: f64,
    /// Truth: fail if any fiber's |chi²/dof - 1| exceeds this.
    #[arg(long, default_value_t = 0.1)]
    pub fiber_chi2_tol: f64,
    /// Truth: bins excluded at each end of every fiber, where `R · truth` is incomplete
    /// (default: the resolution half-width).
    #[arg(long)]
    pub edge: Option<usize>,
    /// Frame: fail if any unmasked row of the resolution matrix keeps less than this fraction
    /// of its weight inside the stored band.
    #[arg(long, default_value_t = 0.995)]
    pub min_band_retention: f64,
}

/// Frame-versus-frame statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameDiff {
    /// Bins where both ivar > 0 (and flux and ivar are finite in both).
    pub nbins: usize,
    /// Max `|Δflux| / √(σ₁² + σ₂²)`.
    pub max_pull: f64,
    /// Median of the same.
    pub median_pull: f64,
    /// Max |ΔR| over the resolution diagonals both frames store (matched by offset).
    pub max_dres: f64,
    /// Median |Δivar| / ivar.
    pub median_divar: f64,
    /// Max |Δivar| / ivar.
    pub max_divar: f64,
    /// Bins with ivar > 0 in one frame only.
    pub ivar_disagree: usize,
    /// Bins whose flux or ivar is NaN or infinite in either frame.
    pub nonfinite: usize,
}

/// The largest value, NaN if any value is NaN, 0 for none.
fn max_nan(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, |m: f64, v| {
        if m.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    })
}

/// Compares two frames on their common fibers; the grids must agree.
pub fn diff_frames(a: &Frame, b: &Frame) -> Result<FrameDiff> {
    if a.wave.len() != b.wave.len()
        || a.wave
            .iter()
            .zip(&b.wave)
            .any(|(x, y)| !((x - y).abs() <= 1e-6))
    {
        bail!(
            "the frames have different wavelength grids ({} and {} bins)",
            a.wave.len(),
            b.wave.len()
        );
    }
    let lo = a.specmin.max(b.specmin);
    let hi = (a.specmin + a.flux.nrows()).min(b.specmin + b.flux.nrows());
    if hi <= lo {
        bail!("the frames share no fibers");
    }
    // Diagonals are stored from offset +nd down to -nd: match them by offset.
    let (nda, ndb) = (a.resolution.shape()[1] / 2, b.resolution.shape()[1] / 2);
    let nd = nda.min(ndb);
    let mut pulls = Vec::new();
    let (mut max_dres, mut ivar_disagree, mut nonfinite) = (0.0f64, 0, 0);
    let mut divar = Vec::new();
    for fib in lo..hi {
        let (fa, fb) = (fib - a.specmin, fib - b.specmin);
        for w in 0..a.wave.len() {
            let (ia, ib) = (a.ivar[[fa, w]], b.ivar[[fb, w]]);
            let (xa, xb) = (a.flux[[fa, w]], b.flux[[fb, w]]);
            if ![ia, ib, xa, xb].iter().all(|v| v.is_finite()) {
                nonfinite += 1;
                continue;
            }
            if (ia > 0.0) != (ib > 0.0) {
                ivar_disagree += 1;
            }
            if ia > 0.0 && ib > 0.0 {
                pulls.push((xa - xb).abs() / (1.0 / ia + 1.0 / ib).sqrt());
                divar.push((ia - ib).abs() / ib);
                for off in 0..=2 * nd {
                    let ra = a.resolution[[fa, nda - nd + off, w]];
                    let rb = b.resolution[[fb, ndb - nd + off, w]];
                    max_dres = max_nan([max_dres, (ra - rb).abs()]);
                }
            }
        }
    }
    Ok(FrameDiff {
        nbins: pulls.len(),
        max_pull: max_nan(pulls.iter().copied()),
        median_pull: median(pulls.iter().copied()),
        max_dres,
        median_divar: median(divar.iter().copied()),
        max_divar: max_nan(divar.iter().copied()),
        ivar_disagree,
        nonfinite,
    })
}

/// Truth-recovery statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthStats {
    /// Unmasked bins used.
    pub nbins: usize,
    /// Σ pull² / nbins.
    pub chi2dof: f64,
    /// Mean pull.
    pub mean_pull: f64,
    /// Standard error of the mean pull.
    pub mean_pull_err: f64,
    /// chi²/dof of each fiber (absolute fiber number, value); fibers with no bins are skipped.
    pub per_fiber: Vec<(usize, f64)>,
}

/// `pull = (flux - R·truth)·√ivar` over bins with ivar > 0, mask 0, away from the grid ends.
///
/// A NaN flux in such a bin makes the statistics NaN, which fails every threshold.
pub fn truth_stats(
    frame: &Frame,
    truth_wave: &[f64],
    truth_flux: &Array2<f64>,
    truth_specmin: usize,
    edge: usize,
) -> Result<TruthStats> {
    let nwave = frame.wave.len();
    if nwave == 0 {
        bail!("the frame has no wavelength bins");
    }
    if truth_flux.ncols() != truth_wave.len() {
        bail!(
            "the truth has {} wavelengths but {} flux columns",
            truth_wave.len(),
            truth_flux.ncols()
        );
    }
    let dw = if nwave > 1 {
        frame.wave[1] - frame.wave[0]
    } else {
        1.0
    };
    // Offset of the frame grid in the truth grid.
    let off = truth_wave
        .iter()
        .position(|w| (w - frame.wave[0]).abs() < 1e-3 * dw.abs())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the truth grid does not contain the frame's first wavelength {}",
                frame.wave[0]
            )
        })?;
    if off + nwave > truth_wave.len()
        || !((truth_wave[off + nwave - 1] - frame.wave[nwave - 1]).abs() <= 1e-3 * dw.abs())
    {
        bail!("the truth grid does not cover the frame's grid with the same step");
    }
    let ndia = frame.resolution.shape()[1];
    let nd = (ndia / 2) as i64;
    let mut per_fiber = Vec::new();
    let (mut sum, mut sum2, mut n) = (0.0, 0.0, 0usize);
    for f in 0..frame.flux.nrows() {
        let fib = frame.specmin + f;
        if fib < truth_specmin || fib - truth_specmin >= truth_flux.nrows() {
            continue;
        }
        let t = truth_flux.row(fib - truth_specmin);
        let (mut fs2, mut fn_) = (0.0, 0usize);
        for w in edge..nwave.saturating_sub(edge) {
            let iv = frame.ivar[[f, w]];
            if !(iv > 0.0) || frame.mask[[f, w]] != 0 {
                continue;
            }
            // (R·t)[w] = Σ_k data[k, w + off_k]·t[w + off_k], off_k = nd - k (dia layout).
            let mut rt = 0.0;
            for k in 0..ndia {
                let col = w as i64 + nd - k as i64;
                if col < 0 || col >= nwave as i64 {
                    continue;
                }
                let col = col as usize;
                rt += frame.resolution[[f, k, col]] * t[off + col];
            }
            let pull = (frame.flux[[f, w]] - rt) * iv.sqrt();
            sum += pull;
            sum2 += pull * pull;
            fs2 += pull * pull;
            n += 1;
            fn_ += 1;
        }
        if fn_ > 0 {
            per_fiber.push((fib, fs2 / fn_ as f64));
        }
    }
    if n == 0 {
        bail!("no unmasked bins in common with the truth");
    }
    let mean = sum / n as f64;
    let var = sum2 / n as f64 - mean * mean;
    Ok(TruthStats {
        nbins: n,
        chi2dof: sum2 / n as f64,
        mean_pull: mean,
        mean_pull_err: (var / n as f64).sqrt(),
        per_fiber,
    })
}

/// How much of each resolution row's weight the stored band keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct BandRetention {
    /// Rows measured.
    pub nrows: usize,
    /// Smallest row sum (NaN if any row sum is NaN).
    pub min: f64,
    /// Median row sum.
    pub median: f64,
    /// Where the smallest row sum is: (fiber, bin).
    pub worst: (usize, usize),
}

/// The sums of the resolution rows over the stored band: for every unmasked bin `j` (ivar > 0,
/// mask 0) at least `ndiag` bins from either end of the grid and with no NODATA bin within
/// `±ndiag`, `Σ_k R[k, j + ndiag - k]` (dia layout, offsets `+ndiag … -ndiag`). Each row of the
/// full resolution matrix sums to 1, so this is the fraction of the row inside the band.
/// `None` if no row qualifies.
pub fn band_retention(frame: &Frame) -> Option<BandRetention> {
    let (nspec, ndia, nwave) = frame.resolution.dim();
    let nd = ndia / 2;
    let mut sums = Vec::new();
    let (mut min, mut worst) = (f64::INFINITY, (0, 0));
    for f in 0..nspec {
        for j in nd..nwave.saturating_sub(nd) {
            if !(frame.ivar[[f, j]] > 0.0) || frame.mask[[f, j]] != 0 {
                continue;
            }
            if (j - nd..=j + nd).any(|c| frame.mask[[f, c]] & specmask::NODATA != 0) {
                continue;
            }
            let s: f64 = (0..ndia)
                .map(|k| frame.resolution[[f, k, j + nd - k]])
                .sum();
            if !(s >= min) && !min.is_nan() {
                min = s;
                worst = (frame.specmin + f, j);
            }
            sums.push(s);
        }
    }
    if sums.is_empty() {
        return None;
    }
    Some(BandRetention {
        nrows: sums.len(),
        min,
        median: median(sums.into_iter()),
        worst,
    })
}

/// Counts of the spectral mask bits extraction sets.
fn mask_counts(frame: &Frame) -> String {
    let bits = [
        ("SOMEBADPIX", specmask::SOMEBADPIX),
        ("ALLBADPIX", specmask::ALLBADPIX),
        ("BAD2DFIT", specmask::BAD2DFIT),
        ("NODATA", specmask::NODATA),
    ];
    bits.iter()
        .map(|(name, bit)| {
            let n = frame.mask.iter().filter(|&&m| m & bit != 0).count();
            format!("{name} {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints the frame's own figures; returns whether they pass.
fn judge_frame(args: &CompareArgs, a: &Frame) -> bool {
    let (nspec, nwave) = a.flux.dim();
    let mut ok = true;
    println!("frame: {}", args.frame.display());
    println!(
        "  fibers x bins             {nspec} x {nwave} (fibers {}..{}, {:.1}..{:.1} Å)",
        a.specmin,
        a.specmin + nspec,
        a.wave.first().copied().unwrap_or(f64::NAN),
        a.wave.last().copied().unwrap_or(f64::NAN)
    );
    let live = a.ivar.iter().filter(|&&v| v > 0.0).count();
    println!("  bins with ivar > 0        {live}");
    println!("  mask bits                 {}", mask_counts(a));
    let nonfinite = a
        .flux
        .iter()
        .chain(a.ivar.iter())
        .chain(a.resolution.iter())
        .chain(a.chi2pix.iter())
        .filter(|v| !v.is_finite())
        .count();
    if nonfinite > 0 {
        println!("  FAIL: {nonfinite} NaN or infinite values in FLUX, IVAR, RESOLUTION, CHI2PIX");
        ok = false;
    }
    match band_retention(a) {
        Some(b) => {
            println!(
                "  resolution band retention min {:.5} (fiber {}, bin {}), median {:.5} over {} rows  (min ≥ {})",
                b.min, b.worst.0, b.worst.1, b.median, b.nrows, args.min_band_retention
            );
            if !(b.min >= args.min_band_retention) {
                println!("  FAIL: resolution rows lose more than the band may");
                ok = false;
            }
        }
        None => println!("  resolution band retention: no unmasked rows away from the edges"),
    }
    ok
}

/// `spextract compare`; returns whether every threshold held.
pub fn run(args: &CompareArgs) -> Result<bool> {
    let a = read_frame(&args.frame)?;
    let mut ok = judge_frame(args, &a);
    if let Some(other) = &args.other {
        let b = read_frame(other)?;
        let d = diff_frames(&a, &b)?;
        println!(
            "frame vs frame: {} and {}",
            args.frame.display(),
            other.display()
        );
        println!("  bins with both ivar > 0   {}", d.nbins);
        println!("  bins with ivar > 0 in one {}", d.ivar_disagree);
        println!(
            "  max pull                  {:.3e}  (threshold {:.1e})",
            d.max_pull, args.max_pull
        );
        println!(
            "  median pull               {:.3e}  (threshold {:.1e})",
            d.median_pull, args.max_median_pull
        );
        println!("  max |Δresolution|         {:.3e}", d.max_dres);
        println!(
            "  |Δivar|/ivar median, max  {:.3e}, {:.3e}",
            d.median_divar, d.max_divar
        );
        if d.nonfinite > 0 {
            println!(
                "  FAIL: {} bins with NaN or infinite flux or ivar",
                d.nonfinite
            );
            ok = false;
        }
        if d.nbins == 0 {
            println!("  FAIL: no bins with ivar > 0 in both frames");
            ok = false;
        } else if !(d.max_pull <= args.max_pull && d.median_pull <= args.max_median_pull) {
            println!("  FAIL: pulls above threshold");
            ok = false;
        }
    }
    if let Some(truth) = &args.truth {
        let t = read_truth(truth)?;
        let edge = args.edge.unwrap_or(a.resolution.shape()[1] / 2);
        let s = truth_stats(&a, &t.wave, &t.flux, t.specmin, edge)?;
        let (fmin, fmax) = s
            .per_fiber
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, c)| {
                (lo.min(c), hi.max(c))
            });
        let bad: Vec<_> = s
            .per_fiber
            .iter()
            .filter(|(_, c)| !((c - 1.0).abs() <= args.fiber_chi2_tol))
            .collect();
        println!(
            "frame vs truth: {} and {}",
            args.frame.display(),
            truth.display()
        );
        println!(
            "  unmasked bins             {} ({} fibers, {} edge bins excluded per end)",
            s.nbins,
            s.per_fiber.len(),
            edge
        );
        println!(
            "  chi2/dof                  {:.4}  (1 ± {})",
            s.chi2dof, args.chi2_tol
        );
        println!(
            "  mean pull                 {:+.4} ± {:.4}  (|mean| < {})",
            s.mean_pull, s.mean_pull_err, args.mean_pull_tol
        );
        println!(
            "  per-fiber chi2/dof        {:.3} .. {:.3}  (1 ± {})",
            fmin, fmax, args.fiber_chi2_tol
        );
        if !((s.chi2dof - 1.0).abs() <= args.chi2_tol)
            || !(s.mean_pull.abs() < args.mean_pull_tol)
            || !bad.is_empty()
        {
            println!(
                "  FAIL: truth recovery outside thresholds; fibers outside: {:?}",
                bad
            );
            ok = false;
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// A frame whose resolution rows are a symmetric kernel `[0.001, …, 0.5 …]` of `ndia`
    /// diagonals: every row sum is `kernel.sum()`.
    fn frame(nspec: usize, nwave: usize, kernel: &[f64]) -> Frame {
        let ndia = kernel.len();
        Frame {
            specmin: 2,
            wave: (0..nwave).map(|i| 6000.0 + 0.8 * i as f64).collect(),
            flux: Array2::from_elem((nspec, nwave), 10.0),
            ivar: Array2::from_elem((nspec, nwave), 1.0),
            mask: Array2::zeros((nspec, nwave)),
            resolution: Array3::from_shape_fn((nspec, ndia, nwave), |(_, k, _)| kernel[k]),
            chi2pix: Array2::from_elem((nspec, nwave), 1.0),
        }
    }

    #[test]
    fn band_retention_sums_rows_and_skips_masked_and_nodata_neighbours() {
        let kernel = [0.01, 0.04, 0.2, 0.5, 0.2, 0.04, 0.005];
        let mut f = frame(2, 30, &kernel);
        // A row whose own entries are perturbed: row j=10 of fiber 1 reads R[k, 13 - k].
        for k in 0..7 {
            f.resolution[[1, k, 13 - k]] -= 0.01;
        }
        f.mask[[0, 20]] = specmask::NODATA;
        f.ivar[[0, 20]] = 0.0;
        let b = band_retention(&f).unwrap();
        let s: f64 = kernel.iter().sum();
        assert!((b.min - (s - 0.07)).abs() < 1e-12, "{b:?}");
        assert_eq!(b.worst, (3, 10));
        assert!((b.median - s).abs() < 1e-12);
        // Fiber 0 loses rows 17..=23 (NODATA at 20 within ±3), both fibers the 3 end rows.
        assert_eq!(b.nrows, 2 * (30 - 6) - 7);
        f.resolution[[0, 3, 5]] = f64::NAN;
        assert!(band_retention(&f).unwrap().min.is_nan());
    }

    #[test]
    fn diff_matches_diagonals_by_offset_and_flags_nan() {
        let a = frame(3, 20, &[0.1, 0.2, 0.4, 0.2, 0.1]);
        let b = frame(3, 20, &[0.0, 0.1, 0.2, 0.4, 0.2, 0.1, 0.0]);
        let d = diff_frames(&a, &b).unwrap();
        assert_eq!(
            (d.nbins, d.max_dres, d.max_pull, d.nonfinite),
            (60, 0.0, 0.0, 0)
        );
        let mut c = b.clone();
        c.flux[[1, 4]] = f64::NAN;
        c.flux[[2, 4]] += 1.0;
        let d = diff_frames(&a, &c).unwrap();
        assert_eq!((d.nbins, d.nonfinite), (59, 1));
        assert!((d.max_pull - 1.0 / 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn truth_stats_of_an_exact_frame_and_a_nan() {
        let kernel = [0.25, 0.5, 0.25];
        let mut f = frame(2, 10, &kernel);
        // Truth constant 10 per Å: R·t = 10 away from the ends, so every pull is 0.
        let wave: Vec<f64> = (0..14).map(|i| 6000.0 + 0.8 * (i as f64 - 2.0)).collect();
        let t = Array2::from_elem((4, 14), 10.0);
        let s = truth_stats(&f, &wave, &t, 2, 1).unwrap();
        assert_eq!((s.nbins, s.chi2dof, s.per_fiber.len()), (16, 0.0, 2));
        f.flux[[0, 5]] = f64::NAN;
        let s = truth_stats(&f, &wave, &t, 2, 1).unwrap();
        assert!(s.chi2dof.is_nan() && !((s.chi2dof - 1.0).abs() <= 0.03));
        // A truth that starts after the frame cannot be compared.
        assert!(truth_stats(
            &f,
            &wave[3..],
            &t.slice(ndarray::s![.., 3..]).to_owned(),
            2,
            1
        )
        .is_err());
    }
}
