//! `--ivar-from-model` (issue 14 item 1): on an image whose IVAR was computed from its own
//! pixels (`simulate --ivar-from-data`), the two passes with the variance from the model
//! remove the flux's bias; an IVAR from a model is left as it is; cosmic rays that
//! slipped through the mask are still flagged; lists extract in two passes as single frames do.

use std::path::Path;

use spextract::cli::compare::{truth_stats, TruthStats};
use spextract::io::frame::read_frame;
use spextract::io::truth::read_truth;
use spextract::io::{read_psf, write_psf};
use spextract::pipeline::frame::specmask;
use spextract::simulate::{simulate, SimOptions};

use crate::common::{shared_data, small_psf, small_sim_options, SMALL_GRID};

/// Truth recovery of a frame (5 edge bins left out, as `compare` does by default).
fn stats(frame: &Path, truth: &Path) -> TruthStats {
    let f = read_frame(frame).unwrap();
    let t = read_truth(truth).unwrap();
    truth_stats(&f, &t.wave, &t.flux, t.specmin, 5).unwrap()
}

/// Simulates `nspec` fibers with IVAR from the data (or from the model) and extracts them
/// without and with `--ivar-from-model`; returns both frames' truth recovery and the second
/// run's log.
fn before_after(
    dir: &Path,
    psf: &Path,
    nspec: usize,
    grid: Option<&str>,
    from_data: bool,
) -> (TruthStats, TruthStats, String) {
    let (image, truth) = (dir.join("preproc.fits"), dir.join("truth.fits"));
    let n = nspec.to_string();
    let mut sim: Vec<&std::ffi::OsStr> = vec!["simulate".as_ref(), "-n".as_ref(), n.as_ref()];
    sim.extend([
        "-p".as_ref(),
        psf.as_os_str(),
        "-i".as_ref(),
        image.as_os_str(),
        "-t".as_ref(),
        truth.as_os_str(),
    ]);
    if from_data {
        sim.push("--ivar-from-data".as_ref());
    }
    if let Some(g) = grid {
        sim.extend([std::ffi::OsStr::new("-w"), g.as_ref()]);
    }
    crate::common::spextract(&sim).ok();
    let mut out = Vec::new();
    let mut log = String::new();
    for (name, option) in [("before", None), ("after", Some("--ivar-from-model"))] {
        let frame = dir.join(format!("frame-{name}.fits"));
        let mut args: Vec<&std::ffi::OsStr> = vec!["extract".as_ref(), "-n".as_ref(), n.as_ref()];
        args.extend([
            "-p".as_ref(),
            psf.as_os_str(),
            "-i".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            frame.as_os_str(),
        ]);
        if let Some(g) = grid {
            args.extend([std::ffi::OsStr::new("-w"), g.as_ref()]);
        }
        args.extend(option.map(std::ffi::OsStr::new));
        let run = crate::common::spextract(&args);
        run.ok();
        log = run.stderr.clone();
        let s = stats(&frame, &truth);
        eprintln!(
            "{name}: chi2/dof {:.4}, mean pull {:.4} ± {:.4}, fibers {:.3} .. {:.3}",
            s.chi2dof,
            s.mean_pull,
            s.mean_pull_err,
            s.per_fiber.iter().map(|f| f.1).fold(f64::MAX, f64::min),
            s.per_fiber.iter().map(|f| f.1).fold(f64::MIN, f64::max)
        );
        out.push(s);
    }
    let before = out.remove(0);
    (before, out.remove(0), log)
}

/// |Mean pull| after the option at most this (issue 14).
const MEAN_PULL_TOL: f64 = 0.05;
/// |chi²/dof − 1| over the frame after the option at most this.
const CHI2_TOL: f64 = 0.03;
/// Every fiber's |chi²/dof − 1| after the option at most this, or four of its standard
/// deviations, `4·√(2/bins)`, on a fiber too short for 0.1 to mean anything (the small CCD's
/// 491 bins scatter by 0.064).
const FIBER_CHI2_TOL: f64 = 0.1;

/// The bias of IVAR from the data before, and none of it after.
#[track_caller]
fn assert_unbiased(before: &TruthStats, after: &TruthStats) {
    assert!(before.mean_pull < -0.3, "before: {before:?}");
    assert!(before.chi2dof > 1.2, "before: {before:?}");
    assert!(after.mean_pull.abs() < MEAN_PULL_TOL, "after: {after:?}");
    assert!((after.chi2dof - 1.0).abs() <= CHI2_TOL, "after: {after:?}");
    let bins = after.nbins as f64 / after.per_fiber.len() as f64;
    let tol = FIBER_CHI2_TOL.max(4.0 * (2.0 / bins).sqrt());
    for &(f, c) in &after.per_fiber {
        assert!((c - 1.0).abs() <= tol, "fiber {f}: {c} (±{tol}); {after:?}");
    }
}

/// [`before_after`] of 25 fibers through the small synthetic PSF, in a new folder (returned).
fn small_before_after(from_data: bool) -> (tempfile::TempDir, TruthStats, TruthStats, String) {
    let dir = tempfile::tempdir().unwrap();
    let psf = dir.path().join("psf.fits");
    write_psf(&psf, &small_psf()).unwrap();
    let (before, after, log) = before_after(dir.path(), &psf, 25, Some(SMALL_GRID), from_data);
    (dir, before, after, log)
}

#[test]
fn ivar_from_model_removes_the_bias_synthetic_psf() {
    let (_dir, before, after, log) = small_before_after(true);
    assert!(log.contains("extracting twice"), "{log}");
    assert_unbiased(&before, &after);
}

#[test]
fn ivar_from_model_removes_the_bias_real_psf() {
    let Some(data) = shared_data(&["psf-r0-00067784.fits"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let psf = data.join("psf-r0-00067784.fits");
    let (before, after, _) = before_after(dir.path(), &psf, 50, None, true);
    assert_unbiased(&before, &after);
}

/// An IVAR that already comes from a model has no read-noise term to recover: the option
/// says so and changes nothing.
#[test]
fn ivar_from_a_model_is_left_as_it_is() {
    let (dir, before, after, log) = small_before_after(false);
    assert!(log.contains("it was not computed from the pixels"), "{log}");
    assert_eq!(before.chi2dof, after.chi2dof);
    let (a, b) = (
        read_frame(&dir.path().join("frame-before.fits")).unwrap(),
        read_frame(&dir.path().join("frame-after.fits")).unwrap(),
    );
    assert_eq!((a.flux, a.ivar, a.mask), (b.flux, b.ivar, b.mask));
}

/// A cosmic ray the mask missed stands out against the model's variance: its bins are
/// flagged BAD2DFIT.
#[test]
fn an_unmasked_cosmic_ray_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let psf_path = dir.path().join("psf.fits");
    write_psf(&psf_path, &small_psf()).unwrap();
    let psf = read_psf(&psf_path).unwrap();
    let opts = SimOptions {
        ivar_from_data: true,
        ..small_sim_options()
    };
    let mut sim = simulate(&psf, &opts).unwrap();
    let (fiber, wave) = (12, 6250.0);
    let (x, y) = (psf.xtrace.eval(fiber, wave), psf.ytrace.eval(fiber, wave));
    let (x, y) = (x.round() as usize, y.round() as usize);
    for dy in 0..3 {
        let (yy, xx) = (y + dy, x + dy / 2);
        sim.image[[yy, xx]] += 3000.0;
        // As preproc would compute it, from the hit pixel.
        sim.ivar[[yy, xx]] = 1.0 / (9.0 + sim.image[[yy, xx]].max(0.0));
    }
    let image = dir.path().join("preproc.fits");
    sim.write_preproc(&image, true, false).unwrap();
    let out = dir.path().join("frame.fits");
    run!(
        "extract",
        "-p",
        psf_path,
        "-i",
        image,
        "-o",
        out,
        "-w",
        SMALL_GRID,
        "--ivar-from-model"
    )
    .ok();
    let frame = read_frame(&out).unwrap();
    let j = frame.wave.iter().position(|&w| w >= wave).unwrap();
    let flagged = (j - 3..j + 4).any(|k| frame.mask[[fiber, k]] & specmask::BAD2DFIT != 0);
    assert!(
        flagged,
        "{:?}",
        frame.mask.slice(ndarray::s![fiber, j - 3..j + 4])
    );
}

/// Largest |Δflux|·√ivar between two frames of the same fibers and grid, and the largest
/// relative difference of their IVARs.
fn largest_differences(a: &Path, b: &Path) -> (f64, f64) {
    let (fa, fb) = (read_frame(a).unwrap(), read_frame(b).unwrap());
    assert_eq!(fa.mask, fb.mask, "{} vs {}: MASK", a.display(), b.display());
    let (mut pull, mut rel) = (0.0f64, 0.0f64);
    for (((x, y), ia), ib) in fa.flux.iter().zip(&fb.flux).zip(&fa.ivar).zip(&fb.ivar) {
        pull = pull.max((x - y).abs() * ia.max(*ib).sqrt());
        if ia.max(*ib) > 0.0 {
            rel = rel.max((ia - ib).abs() / ia.max(*ib));
        }
    }
    (pull, rel)
}

/// A list extracts each frame in two passes as the single-frame command does, in one process
/// and under mpirun: the first pass's units send their share of the model back to the reader,
/// which cuts the frame again with the variance from it. The shares are added per unit rather
/// than patch after patch, so the frames agree to rounding rather than bit for bit.
#[test]
fn a_list_extracts_in_two_passes_like_a_single_frame() {
    use crate::pipeline::{
        config, frames_with, have_mpirun, run_list, run_pipeline, two_bundle_psf, units_computed,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let list = frames_with(d, &psf, 2, true);
    let cfg = config(d);
    let mut reference = Vec::new();
    for i in 1..=2 {
        let single = d.join(format!("single-{i}.fits"));
        run!(
            "extract",
            "-p",
            &psf,
            "-i",
            d.join(format!("preproc-{i}.fits")),
            "-o",
            &single,
            "-w",
            SMALL_GRID,
            "--threads",
            "1",
            "--ivar-from-model"
        )
        .ok();
        reference.push(single);
    }
    let once = d.join("once");
    let text = std::fs::read_to_string(&list)
        .unwrap()
        .replace("out/", "once/");
    let list_once = d.join("frames-once.txt");
    std::fs::write(&list_once, text).unwrap();
    let (code, log) = run_pipeline(
        None,
        &[
            &"--frames",
            &list_once,
            &"--config",
            &cfg,
            &"--threads",
            &"1",
        ],
    );
    assert_eq!(code, 0, "{log}");
    let mut launchers = vec![None];
    if have_mpirun() {
        launchers.push(Some(4));
    }
    for launcher in launchers {
        let (log, rep) = run_list(d, launcher, &list, &cfg, &["--ivar-from-model"]);
        assert!(log.contains("first pass; cut into 2 units"), "{log}");
        assert!(
            log.contains("second pass, with the variance from the first pass's model"),
            "{log}"
        );
        for (i, single) in reference.iter().enumerate() {
            let frame = d.join(format!("out/frame-{}.fits", i + 1));
            let (pull, rel) = largest_differences(single, &frame);
            assert!(
                pull < 1e-6 && rel < 1e-6,
                "{launcher:?}, frame {i}: {pull}, {rel}"
            );
            // The option did something: one pass on the same IVAR gives other fluxes.
            let (pull, _) =
                largest_differences(&once.join(format!("frame-{}.fits", i + 1)), &frame);
            assert!(pull > 0.1, "{launcher:?}, frame {i}: {pull}");
        }
        // Every unit computed once per pass: 2 bundles x 2 frames x 2 passes.
        assert_eq!(rep.frames.written, 2, "{log}");
        assert_eq!(units_computed(&rep), 8, "{log}");
    }
}

/// A SIGTERM in the middle of a list extracted in two passes leaves only complete frames,
/// and the rerun writes the same frames as an uninterrupted run.
#[test]
fn sigterm_between_passes_leaves_only_complete_frames() {
    crate::pipeline::sigterm_then_rerun(&["--ivar-from-model"], true);
}
