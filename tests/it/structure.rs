//! Properties every frame must have: the same bits whatever the thread count, ivar > 0 on every
//! bin that was extracted, nothing on the bins that were not (NODATA), and a resolution band
//! that holds nearly all of each row.

use std::path::Path;

use spextract::cli::compare::band_retention;
use spextract::io::frame::{read_frame, Frame};

use crate::common::{band_row_sums, shared_data, MIN_BAND_RETENTION, NODATA};

/// Asserts the ivar/NODATA contract; returns the number of NODATA bins.
#[track_caller]
fn assert_ivar_and_nodata(f: &Frame) -> usize {
    let mut nodata = 0;
    for ((i, j), &m) in f.mask.indexed_iter() {
        let (iv, fl) = (f.ivar[[i, j]], f.flux[[i, j]]);
        assert!(
            iv.is_finite() && fl.is_finite(),
            "fiber {i} bin {j}: flux {fl}, ivar {iv}"
        );
        assert!(f.chi2pix[[i, j]].is_finite(), "fiber {i} bin {j}: chi2pix");
        if m & NODATA != 0 {
            nodata += 1;
            assert_eq!((fl, iv), (0.0, 0.0), "NODATA fiber {i} bin {j}");
        } else {
            assert!(
                iv > 0.0,
                "fiber {i} bin {j}: ivar {iv} without NODATA (mask {m:#x})"
            );
        }
    }
    nodata
}

/// Asserts that every measured row of the band keeps ≥ 0.995 of its weight, and that the
/// crate's `band_retention` (what `spextract compare` prints) agrees with this independent sum.
#[track_caller]
fn assert_band(f: &Frame, min_rows: usize) {
    let rows = band_row_sums(f);
    assert!(rows.len() >= min_rows, "only {} rows measured", rows.len());
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| !(r.2 >= MIN_BAND_RETENTION))
        .take(10)
        .collect();
    assert!(
        bad.is_empty(),
        "rows (fiber, bin, sum) below {MIN_BAND_RETENTION}: {bad:?}"
    );
    let min = rows.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
    let b = band_retention(f).expect("rows to measure");
    assert_eq!(b.nrows, rows.len());
    assert!((b.min - min).abs() < 1e-12, "{b:?} vs {min}");
    eprintln!("band retention: {b:?}");
}

fn assert_bit_identical(a: &Frame, b: &Frame) {
    let bits = |v: &f64| v.to_bits();
    assert_eq!(a.specmin, b.specmin);
    assert_eq!(a.wave, b.wave);
    for (name, x, y) in [
        ("FLUX", &a.flux, &b.flux),
        ("IVAR", &a.ivar, &b.ivar),
        ("CHI2PIX", &a.chi2pix, &b.chi2pix),
    ] {
        assert_eq!(x.dim(), y.dim(), "{name}");
        let diff = x
            .iter()
            .zip(y.iter())
            .filter(|(p, q)| bits(p) != bits(q))
            .count();
        assert_eq!(diff, 0, "{name}: {diff} values differ");
    }
    assert_eq!(a.resolution.dim(), b.resolution.dim());
    let diff = a
        .resolution
        .iter()
        .zip(b.resolution.iter())
        .filter(|(p, q)| bits(p) != bits(q))
        .count();
    assert_eq!(diff, 0, "RESOLUTION: {diff} values differ");
    assert_eq!(a.mask, b.mask, "MASK");
}

/// Extracts with `--threads 1` and `--threads 2`; asserts the frames are bit-identical and
/// returns the first.
fn extract_twice(dir: &Path, psf: &Path, image: &Path, grid: &str, fibers: [&str; 2]) -> Frame {
    let frames: Vec<Frame> = ["1", "2"]
        .iter()
        .map(|threads| {
            let out = dir.join(format!("frame-{threads}.fits"));
            let run = run!(
                "extract",
                "-p",
                psf,
                "-i",
                image,
                "-o",
                out,
                "-w",
                grid,
                "-s",
                fibers[0],
                "-n",
                fibers[1],
                "--threads",
                threads
            );
            run.ok();
            assert!(
                run.stderr.contains(&format!("with {threads} threads")),
                "{}",
                run.stderr
            );
            read_frame(&out).unwrap()
        })
        .collect();
    assert_bit_identical(&frames[0], &frames[1]);
    frames.into_iter().next().unwrap()
}

/// Two bundles of a synthetic PSF on 5560–6400 Å: the first patches of the central fibers
/// run off the bottom of the CCD and are dropped (NODATA), the rest extract normally.
#[test]
fn synthetic_deterministic_with_nodata_edge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (psf, image, truth) = (
        d.join("psf.fits"),
        d.join("preproc.fits"),
        d.join("truth.fits"),
    );
    run!("simulate", "--make-psf", psf, "--nfiber", "50").ok();
    run!(
        "simulate",
        "-p",
        psf,
        "-i",
        image,
        "-t",
        truth,
        "-n",
        "50",
        "-w",
        "5560,6400,0.8",
        "--seed",
        "5"
    )
    .ok();
    let f = extract_twice(d, &psf, &image, "5560,6400,0.8", ["0", "50"]);
    assert_eq!(f.flux.dim(), (50, 1051));
    let nodata = assert_ivar_and_nodata(&f);
    // Patches are dropped whole: their bins come in runs of 50 from the start of the grid.
    assert!(
        nodata > 0 && nodata.is_multiple_of(50),
        "{nodata} NODATA bins"
    );
    for i in 0..50 {
        let first_live = (0..1051).find(|&j| f.mask[[i, j]] & NODATA == 0).unwrap();
        assert!(
            (first_live..1051).all(|j| f.mask[[i, j]] & NODATA == 0),
            "fiber {i}: NODATA after live bins"
        );
    }
    assert_band(&f, 40_000);
}

/// The shared real frame: no bin left without ivar, and the band on the real PSF.
#[test]
fn real_bundle_deterministic_and_banded() {
    let Some(data) = shared_data(&["psf-r0-00067784.fits", "preproc-r0-b00.fits.gz"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = extract_twice(
        dir.path(),
        &data.join("psf-r0-00067784.fits"),
        &data.join("preproc-r0-b00.fits.gz"),
        "5760,7620,0.8",
        ["0", "25"],
    );
    assert_eq!(assert_ivar_and_nodata(&f), 0);
    assert_band(&f, 57_000);
}
