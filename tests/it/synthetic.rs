//! Truth recovery through synthetic PSFs made by `spextract simulate --make-psf`: Legendre
//! degrees 1, 3 and 5, smaller spots, and a fiber subset smaller than a bundle.
//!
//! Every case extracts the whole r grid (2326 bins), so that each fiber's chi²/dof rests on
//! about 2300 bins (σ ≈ 0.03): the per-fiber bound 1 ± 0.1 is then a 3σ test, where a few
//! hundred bins would make it a coin toss.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use spextract::io::frame::read_frame;
use spextract::io::read_fibermap;

use crate::common::{assert_truth_recovery, spextract};

const GRID: &str = "5760,7620,0.8";

/// Makes a 50-fiber synthetic PSF with `psf_args`, simulates fibers `0..nsim` through it (seed
/// fixed) and extracts with `extract_args`; returns (frame, truth).
fn cycle(dir: &Path, psf_args: &[&str], nsim: usize, extract_args: &[&str]) -> (PathBuf, PathBuf) {
    let psf = dir.join("psf.fits");
    let (image, truth, frame) = (
        dir.join("preproc.fits"),
        dir.join("truth.fits"),
        dir.join("frame.fits"),
    );
    let args = |fixed: Vec<OsString>, more: &[&str]| {
        fixed
            .into_iter()
            .chain(more.iter().map(OsString::from))
            .collect::<Vec<_>>()
    };
    let make: Vec<OsString> = vec![
        "simulate".into(),
        "--make-psf".into(),
        psf.clone().into(),
        "--nfiber".into(),
        "50".into(),
    ];
    spextract(args(make, psf_args)).ok();
    run!(
        "simulate",
        "-p",
        psf,
        "-i",
        image,
        "-t",
        truth,
        "-n",
        nsim.to_string(),
        "-w",
        GRID,
        "--seed",
        "3"
    )
    .ok();
    let extract: Vec<OsString> = vec![
        "extract".into(),
        "-p".into(),
        psf.into(),
        "-i".into(),
        image.into(),
        "-o".into(),
        frame.clone().into(),
        "-w".into(),
        GRID.into(),
    ];
    let run = spextract(args(extract, extract_args));
    run.ok();
    assert!(
        run.stderr.contains("0 retried, 0 failed, 0 dropped"),
        "{}",
        run.stderr
    );
    (frame, truth)
}

#[test]
fn legdeg_1() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, truth) = cycle(dir.path(), &["--legdeg", "1"], 25, &["-n", "25"]);
    assert_truth_recovery(&frame, &truth, 0.99);
}

/// Two bundles: the second starts past the synthetic bundle gap.
#[test]
fn legdeg_3_two_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, truth) = cycle(dir.path(), &["--legdeg", "3"], 50, &["-n", "50"]);
    assert_eq!(read_frame(&frame).unwrap().flux.dim(), (50, 2326));
    assert_truth_recovery(&frame, &truth, 0.99);
}

#[test]
fn legdeg_5() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, truth) = cycle(dir.path(), &["--legdeg", "5"], 25, &["-n", "25"]);
    assert_truth_recovery(&frame, &truth, 0.99);
}

/// Spots of 9 rows x 13 columns (HSIZEY 4: a 9-diagonal resolution band) and other widths.
#[test]
fn smaller_spots_and_other_sigmas() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, truth) = cycle(
        dir.path(),
        &["--legdeg", "3", "--hsize", "6,4", "--sigma", "0.85,0.95"],
        25,
        &["-n", "25"],
    );
    assert_eq!(read_frame(&frame).unwrap().resolution.dim(), (25, 9, 2326));
    assert_truth_recovery(&frame, &truth, 0.99);
}

/// Fibers 3..12 of a lit bundle: a subset smaller than a bundle, not starting at its edge.
#[test]
fn fewer_fibers_than_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, truth) = cycle(dir.path(), &["--legdeg", "3"], 25, &["-s", "3", "-n", "9"]);
    let f = read_frame(&frame).unwrap();
    assert_eq!((f.specmin, f.flux.nrows()), (3, 9));
    // desispec keeps the FIBERMAP rows of the extracted fibers only.
    let fm = read_fibermap(&frame)
        .unwrap()
        .expect("the frame has a FIBERMAP");
    assert_eq!(fm.fiber, (3..12).collect::<Vec<i32>>());
    assert_truth_recovery(&frame, &truth, 0.99);
}
