//! The real DESI r0 PSF of `../shared/data`: parity with gpu_specter's frame of the shared
//! preproc image, and truth recovery on a 125-fiber simulation of our own.

use spextract::cli::compare::diff_frames;
use spextract::io::frame::read_frame;

use crate::common::{assert_truth_recovery, shared_data};

const PSF: &str = "psf-r0-00067784.fits";
const PREPROC: &str = "preproc-r0-b00.fits.gz";
const GPU_SPECTER: &str = "frame-r0-b00-gpu_specter.fits";
const TRUTH: &str = "truth-r0-b00.fits";

/// gpu_specter's options for the shared frame (data README): the r grid, bundle 0.
const GRID: &str = "5760,7620,0.8";

#[test]
fn bundle0_matches_gpu_specter_and_recovers_the_truth() {
    let Some(data) = shared_data(&[PSF, PREPROC, GPU_SPECTER, TRUTH]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frame.fits");
    let run = run!(
        "extract",
        "-p",
        data.join(PSF),
        "-i",
        data.join(PREPROC),
        "-o",
        out,
        "-w",
        GRID,
        "-s",
        "0",
        "-n",
        "25"
    );
    run.ok();
    assert!(
        run.stderr.contains("0 retried, 0 failed, 0 dropped"),
        "{}",
        run.stderr
    );

    let ours = read_frame(&out).unwrap();
    let theirs = read_frame(&data.join(GPU_SPECTER)).unwrap();
    assert_eq!(ours.flux.dim(), (25, 2326));
    let d = diff_frames(&ours, &theirs).unwrap();
    eprintln!("parity with gpu_specter: {d:?}");
    // Every bin has ivar > 0 in gpu_specter's frame; ours must agree bin for bin.
    assert_eq!(d.nbins, 25 * 2326, "{d:?}");
    assert_eq!(d.ivar_disagree, 0, "{d:?}");
    assert!(d.max_pull <= 1e-3, "max pull {:.3e} > 1e-3", d.max_pull);
    assert!(
        d.median_pull <= 1e-6,
        "median pull {:.3e} > 1e-6",
        d.median_pull
    );

    let s = assert_truth_recovery(&out, &data.join(TRUTH), 0.99);
    // The data README: gpu_specter has chi2/dof 1.0047 over these 57 900 bins.
    assert_eq!(s.nbins, 57_900);

    // The binary's compare reaches the same verdict.
    let run = run!(
        "compare",
        out,
        data.join(GPU_SPECTER),
        "--truth",
        data.join(TRUTH)
    );
    run.ok();
    assert!(run.stdout.contains("chi2/dof"), "{}", run.stdout);
}

/// Five bundles (125 fibers) simulated by `spextract simulate` through the real PSF, with its
/// cosmics and bad pixels, then extracted over the whole r grid.
#[test]
fn five_bundles_simulated_through_the_real_psf() {
    let Some(data) = shared_data(&[PSF]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (image, truth, out) = (
        d.join("preproc.fits"),
        d.join("truth.fits"),
        d.join("frame.fits"),
    );
    let psf = data.join(PSF);
    run!("simulate", "-p", psf, "-i", image, "-t", truth, "-n", "125", "-w", GRID, "--seed", "7")
        .ok();
    let run = run!("extract", "-p", psf, "-i", image, "-o", out, "-w", GRID, "-n", "125");
    run.ok();
    assert!(run.stderr.contains("0 failed"), "{}", run.stderr);
    let frame = read_frame(&out).unwrap();
    assert_eq!(frame.flux.dim(), (125, 2326));
    assert_truth_recovery(&out, &truth, 0.99);
}
