//! Properties every frame must have: the same bits whatever the thread count, ivar > 0 on every
//! bin that was extracted, nothing on the bins that were not (NODATA) or whose pixels carry no
//! data or give non-finite numbers, and a resolution band that holds nearly all of each row.

use std::path::{Path, PathBuf};

use spextract::cli::compare::band_retention;
use spextract::io::frame::{read_frame, Frame};

use crate::common::{
    assert_no_output, band_row_sums, shared_data, small_ccd, SmallCcd, MIN_BAND_RETENTION, NODATA,
    SMALL_GRID,
};

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
                run.stderr.contains(&format!("with {threads} thread")),
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

/// The small simulation with its planes changed by `edit`, written uncompressed as `name`.
fn edited_ccd(
    dir: &Path,
    ccd: &SmallCcd,
    name: &str,
    edit: impl FnOnce(&mut ndarray::Array2<f32>, &mut ndarray::Array2<f32>, &mut ndarray::Array2<i16>),
) -> PathBuf {
    let (mut image, mut ivar, mut mask) = (
        ccd.sim.image.clone(),
        ccd.sim.ivar.clone(),
        ccd.sim.mask.clone(),
    );
    edit(&mut image, &mut ivar, &mut mask);
    let path = dir.join(name);
    spextract::io::write_preproc(
        &path,
        &image,
        &ivar,
        &mask,
        &ccd.sim.header,
        Some(&ccd.sim.fibermap),
        false,
    )
    .unwrap();
    path
}

/// Extracts `image` of the small CCD, with `extra` arguments, into `dir/<image stem>-frame.fits`.
fn extract_small(
    dir: &Path,
    ccd: &SmallCcd,
    image: &Path,
    extra: &[&str],
) -> (crate::common::Run, PathBuf) {
    let stem = image.file_stem().unwrap().to_string_lossy();
    let out = dir.join(format!("{stem}-frame.fits"));
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "-p".into(),
        ccd.psf.clone().into(),
        "-i".into(),
        image.into(),
        "-o".into(),
        out.clone().into(),
        "-w".into(),
        SMALL_GRID.into(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    (crate::common::spextract(args), out)
}

/// For each fiber and bin of the small grid, the CCD rows its spot covers.
fn spot_rows(ccd: &SmallCcd) -> ndarray::Array2<(i64, i64)> {
    let psf = spextract::io::read_psf(&ccd.psf).unwrap();
    let g: Vec<f64> = SMALL_GRID.split(',').map(|v| v.parse().unwrap()).collect();
    let wave: Vec<f64> = (0..)
        .map(|k| g[0] + g[2] * f64::from(k))
        .take_while(|w| *w <= g[1] + 1e-9)
        .collect();
    let set = spextract::psf::spots::evaluate(&psf, 0, psf.nfiber(), &wave).unwrap();
    ndarray::Array2::from_shape_fn((psf.nfiber(), wave.len()), |(f, j)| {
        let y0 = set.yc[set.index(f, j)];
        (y0, y0 + set.ny as i64)
    })
}

/// An image whose every pixel is masked, or whose ivar is 0 everywhere, holds nothing to
/// extract: the run fails naming the image, before any work, instead of writing a frame of
/// regularisation (ivar about 6e-16 in every bin, exit 0, as it did). Fibers whose pixels are
/// all masked in an image that has data elsewhere fail the same way, after extraction.
#[test]
fn a_frame_of_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let masked = edited_ccd(d, &ccd, "all-masked.fits", |_, _, mask| mask.fill(1));
    let dark = edited_ccd(d, &ccd, "ivar-zero.fits", |_, ivar, _| ivar.fill(0.0));
    for image in [masked, dark] {
        let (run, out) = extract_small(d, &ccd, &image, &[]);
        let name = image.file_name().unwrap().to_string_lossy().into_owned();
        run.fails_with(&[&name, "no pixel has data", "nothing to extract"]);
        assert!(
            !run.stderr.contains("patches/s"),
            "it extracted:\n{}",
            run.stderr
        );
        assert_no_output(&out);
    }
    // Fibers 0..5 lie on columns 20..60 or so; columns 150.. keep their data.
    let left = edited_ccd(d, &ccd, "left-masked.fits", |_, _, mask| {
        mask.slice_mut(ndarray::s![.., ..150]).fill(1);
    });
    let (run, out) = extract_small(d, &ccd, &left, &["-s", "0", "-n", "5"]);
    run.fails_with(&[
        "left-masked.fits",
        "no bin of the frame can be written",
        "of 2505 bins, 2505 have no data",
    ]);
    assert_no_output(&out);
}

/// Rows 400..520 masked on every column: the bins whose spots lie wholly in them carry no
/// data and are written NODATA with flux and ivar 0, with a warning naming the image; bins
/// whose spots reach unmasked rows keep their ivar.
#[test]
fn bins_without_data_are_nodata_with_ivar_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let (r0, r1) = (400i64, 520i64);
    let image = edited_ccd(d, &ccd, "band-masked.fits", |_, _, mask| {
        mask.slice_mut(ndarray::s![r0 as usize..r1 as usize, ..])
            .fill(1);
    });
    let (run, out) = extract_small(d, &ccd, &image, &[]);
    run.ok();
    let f = read_frame(&out).unwrap();
    let nodata = assert_ivar_and_nodata(&f);
    let rows = spot_rows(&ccd);
    let mut inside = 0;
    for ((i, j), &(y0, y1)) in rows.indexed_iter() {
        let is_nodata = f.mask[[i, j]] & NODATA != 0;
        if y0 >= r0 && y1 <= r1 {
            inside += 1;
            assert!(
                is_nodata,
                "fiber {i} bin {j}: spot on rows {y0}..{y1}, all masked"
            );
        } else if is_nodata {
            let centre = (y0 + y1) / 2;
            assert!(
                (r0..r1).contains(&centre),
                "fiber {i} bin {j}: NODATA with its spot on rows {y0}..{y1}"
            );
        }
    }
    assert!(
        inside > 0 && nodata >= inside,
        "{inside} spots inside, {nodata} NODATA"
    );
    assert!(
        run.stderr.contains("band-masked.fits")
            && run
                .stderr
                .contains(&format!("{nodata} of {} bins have no data", f.flux.len())),
        "{}",
        run.stderr
    );
}

/// An image of 1e38 gives fluxes beyond float32's range: the frame is refused rather than
/// written with FLUX = +inf in every bin (exit 0, as it did). With 1e38 on some rows only,
/// the bins they ruin are written NODATA with flux and ivar 0, and a warning says so; no value
/// in the file is infinite.
#[test]
fn non_finite_results_are_never_written_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let huge = edited_ccd(d, &ccd, "huge.fits", |image, _, _| image.fill(1e38));
    let (run, out) = extract_small(d, &ccd, &huge, &[]);
    run.fails_with(&[
        "huge.fits",
        "no bin of the frame can be written",
        "not finite",
    ]);
    assert_no_output(&out);

    let part = edited_ccd(d, &ccd, "huge-rows.fits", |image, _, _| {
        image.slice_mut(ndarray::s![400..520, ..]).fill(1e38);
    });
    let (run, out) = extract_small(d, &ccd, &part, &[]);
    run.ok();
    let f = read_frame(&out).unwrap();
    let nodata = assert_ivar_and_nodata(&f);
    assert!(
        f.resolution.iter().all(|v| v.is_finite()),
        "RESOLUTION holds a non-finite value"
    );
    assert!(nodata > 0, "no bin was withheld");
    assert!(
        run.stderr.contains("huge-rows.fits")
            && run.stderr.contains(&format!(
                "{nodata} of {} bins have a non-finite",
                f.flux.len()
            )),
        "{}",
        run.stderr
    );
}
