//! `spextract compare`: the statistics of extraction.md §8, with thresholds that set the exit
//! code, so that scripts and CI can gate on them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ndarray::Array2;

use crate::io::frame::{read_frame, Frame};
use crate::io::truth::read_truth;
use crate::pipeline::frame::median;

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
}

/// Frame-versus-frame statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameDiff {
    /// Bins where both ivar > 0.
    pub nbins: usize,
    /// Max `|Δflux| / √(σ₁² + σ₂²)`.
    pub max_pull: f64,
    /// Median of the same.
    pub median_pull: f64,
    /// Max |ΔR| over the resolution diagonals.
    pub max_dres: f64,
    /// Median |Δivar| / ivar.
    pub median_divar: f64,
    /// Max |Δivar| / ivar.
    pub max_divar: f64,
    /// Bins with ivar > 0 in one frame only.
    pub ivar_disagree: usize,
}

/// Compares two frames on their common fibers; the grids must agree.
pub fn diff_frames(a: &Frame, b: &Frame) -> Result<FrameDiff> {
    if a.wave.len() != b.wave.len()
        || a.wave.iter().zip(&b.wave).any(|(x, y)| (x - y).abs() > 1e-6)
    {
        bail!("the frames have different wavelength grids ({} and {} bins)", a.wave.len(), b.wave.len());
    }
    let lo = a.specmin.max(b.specmin);
    let hi = (a.specmin + a.flux.nrows()).min(b.specmin + b.flux.nrows());
    if hi <= lo {
        bail!("the frames share no fibers");
    }
    let mut pulls = Vec::new();
    let (mut max_dres, mut ivar_disagree) = (0.0f64, 0);
    let mut divar = Vec::new();
    for fib in lo..hi {
        let (fa, fb) = (fib - a.specmin, fib - b.specmin);
        for w in 0..a.wave.len() {
            let (ia, ib) = (a.ivar[[fa, w]], b.ivar[[fb, w]]);
            if (ia > 0.0) != (ib > 0.0) {
                ivar_disagree += 1;
            }
            if ia > 0.0 && ib > 0.0 {
                let d = (a.flux[[fa, w]] - b.flux[[fb, w]]).abs();
                pulls.push(d / (1.0 / ia + 1.0 / ib).sqrt());
                divar.push((ia - ib).abs() / ib);
                let nd = a.resolution.shape()[1].min(b.resolution.shape()[1]);
                for k in 0..nd {
                    let dr = (a.resolution[[fa, k, w]] - b.resolution[[fb, k, w]]).abs();
                    max_dres = max_dres.max(dr);
                }
            }
        }
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
    Ok(FrameDiff {
        nbins: pulls.len(),
        max_pull: max(&pulls),
        median_pull: median(pulls.iter().copied()),
        max_dres,
        median_divar: median(divar.iter().copied()),
        max_divar: max(&divar),
        ivar_disagree,
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
pub fn truth_stats(frame: &Frame, truth_wave: &[f64], truth_flux: &Array2<f64>, truth_specmin: usize, edge: usize) -> Result<TruthStats> {
    let nwave = frame.wave.len();
    let dw = if nwave > 1 { frame.wave[1] - frame.wave[0] } else { 1.0 };
    // Offset of the frame grid in the truth grid.
    let off = truth_wave
        .iter()
        .position(|w| (w - frame.wave[0]).abs() < 1e-3 * dw.abs())
        .ok_or_else(|| anyhow::anyhow!("the truth grid does not contain the frame's first wavelength {}", frame.wave[0]))?;
    if off + nwave > truth_wave.len()
        || (truth_wave[off + nwave - 1] - frame.wave[nwave - 1]).abs() > 1e-3 * dw.abs()
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

/// `spextract compare`; returns whether every threshold held.
pub fn run(args: &CompareArgs) -> Result<bool> {
    if args.other.is_none() && args.truth.is_none() {
        bail!("give a second frame, --truth, or both");
    }
    let a = read_frame(&args.frame)?;
    let mut ok = true;
    if let Some(other) = &args.other {
        let b = read_frame(other)?;
        let d = diff_frames(&a, &b)?;
        println!("frame vs frame: {} and {}", args.frame.display(), other.display());
        println!("  bins with both ivar > 0   {}", d.nbins);
        println!("  bins with ivar > 0 in one {}", d.ivar_disagree);
        println!("  max pull                  {:.3e}  (threshold {:.1e})", d.max_pull, args.max_pull);
        println!("  median pull               {:.3e}  (threshold {:.1e})", d.median_pull, args.max_median_pull);
        println!("  max |Δresolution|         {:.3e}", d.max_dres);
        println!("  |Δivar|/ivar median, max  {:.3e}, {:.3e}", d.median_divar, d.max_divar);
        if d.max_pull > args.max_pull || d.median_pull > args.max_median_pull {
            println!("  FAIL: pulls above threshold");
            ok = false;
        }
    }
    if let Some(truth) = &args.truth {
        let t = read_truth(truth)?;
        let edge = args.edge.unwrap_or(a.resolution.shape()[1] / 2);
        let s = truth_stats(&a, &t.wave, &t.flux, t.specmin, edge)?;
        let (fmin, fmax) = s.per_fiber.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, c)| (lo.min(c), hi.max(c)));
        let bad: Vec<_> = s.per_fiber.iter().filter(|(_, c)| (c - 1.0).abs() > args.fiber_chi2_tol).collect();
        println!("frame vs truth: {} and {}", args.frame.display(), truth.display());
        println!("  unmasked bins             {} ({} fibers, {} edge bins excluded per end)", s.nbins, s.per_fiber.len(), edge);
        println!("  chi2/dof                  {:.4}  (1 ± {})", s.chi2dof, args.chi2_tol);
        println!("  mean pull                 {:+.4} ± {:.4}  (|mean| < {})", s.mean_pull, s.mean_pull_err, args.mean_pull_tol);
        println!("  per-fiber chi2/dof        {:.3} .. {:.3}  (1 ± {})", fmin, fmax, args.fiber_chi2_tol);
        if (s.chi2dof - 1.0).abs() > args.chi2_tol || s.mean_pull.abs() > args.mean_pull_tol || !bad.is_empty() {
            println!("  FAIL: truth recovery outside thresholds; fibers outside: {:?}", bad);
            ok = false;
        }
    }
    Ok(ok)
}
