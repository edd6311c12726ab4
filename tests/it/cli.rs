//! Bad input: every case must exit with code 2 and a message that names the file and the
//! problem, must not panic, and must leave no output (nor a temporary) behind. Also the exit
//! codes of `compare` and the `--overwrite` rules.

use std::path::{Path, PathBuf};

use ndarray::s;
use spextract::io::frame::read_frame;
use spextract::io::write_preproc;

use crate::common::{assert_no_output, find, patch_card, small_ccd, SmallCcd, SMALL_GRID};

/// Runs `extract` of the small CCD's grid with `psf` and `image` into `dir/frame.fits`.
fn extract(dir: &Path, psf: &Path, image: &Path, extra: &[&str]) -> (crate::common::Run, PathBuf) {
    let out = dir.join("frame.fits");
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "-p".into(),
        psf.into(),
        "-i".into(),
        image.into(),
        "-o".into(),
        out.clone().into(),
        "-w".into(),
        SMALL_GRID.into(),
    ];
    args.extend(extra.iter().map(Into::into));
    (crate::common::spextract(args), out)
}

/// Writes the small simulation's planes, changed by `edit`, as an uncompressed preproc file.
fn write_edited(
    dir: &Path,
    ccd: &SmallCcd,
    name: &str,
    edit: impl FnOnce(&mut ndarray::Array2<f32>, &mut ndarray::Array2<f32>),
) -> PathBuf {
    let (mut image, mut ivar) = (ccd.sim.image.clone(), ccd.sim.ivar.clone());
    edit(&mut image, &mut ivar);
    let path = dir.join(name);
    write_preproc(
        &path,
        &image,
        &ivar,
        &ccd.sim.mask,
        &ccd.sim.header,
        Some(&ccd.sim.fibermap),
        false,
    )
    .unwrap();
    path
}

#[test]
fn missing_psf_file() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let psf = dir.path().join("nope-psf.fits");
    let (run, out) = extract(dir.path(), &psf, &ccd.image, &[]);
    run.fails_with(&["nope-psf.fits", "no such file"]);
    assert_no_output(&out);
}

#[test]
fn missing_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let image = dir.path().join("nope-preproc.fits");
    let (run, out) = extract(dir.path(), &ccd.psf, &image, &[]);
    run.fails_with(&["nope-preproc.fits", "no such file"]);
    assert_no_output(&out);
}

#[test]
fn image_without_ivar_hdu() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let path = write_edited(dir.path(), &ccd, "noivar.fits", |_, _| {});
    let mut bytes = std::fs::read(&path).unwrap();
    let at = find(&bytes, b"EXTNAME = 'IVAR").expect("IVAR's EXTNAME card");
    bytes[at + 11..at + 15].copy_from_slice(b"NOPE");
    std::fs::write(&path, &bytes).unwrap();
    let (run, out) = extract(dir.path(), &ccd.psf, &path, &[]);
    run.fails_with(&["noivar.fits", "HDU IVAR", "not found"]);
    assert_no_output(&out);
}

#[test]
fn image_shape_differs_from_the_psf() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let path = dir.path().join("short.fits");
    let rows = s![..900, ..];
    write_preproc(
        &path,
        &ccd.sim.image.slice(rows).to_owned(),
        &ccd.sim.ivar.slice(rows).to_owned(),
        &ccd.sim.mask.slice(rows).to_owned(),
        &ccd.sim.header,
        None,
        false,
    )
    .unwrap();
    let (run, out) = extract(dir.path(), &ccd.psf, &path, &[]);
    run.fails_with(&["short.fits", "900 rows x 240 columns", "1000 x 240"]);
    assert_no_output(&out);
}

#[test]
fn nan_pixels_are_masked_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    // 40 NaN image pixels and 7 infinite ivar pixels on the traces of fibers 10-14.
    let path = write_edited(dir.path(), &ccd, "nan.fits", |image, ivar| {
        for k in 0..40 {
            image[[300 + 7 * k, 96 + k % 5]] = f32::NAN;
        }
        for k in 0..7 {
            ivar[[620 + k, 110]] = f32::INFINITY;
        }
    });
    let (run, out) = extract(dir.path(), &ccd.psf, &path, &[]);
    run.ok();
    assert!(
        run.stderr.contains("47 NaN/Inf pixels treated as masked"),
        "{}",
        run.stderr
    );
    let f = read_frame(&out).unwrap();
    assert!(f.flux.iter().chain(f.ivar.iter()).all(|v| v.is_finite()));
    assert!(f.ivar.iter().all(|&v| v > 0.0));
}

#[test]
fn negative_ivar_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let path = write_edited(dir.path(), &ccd, "negivar.fits", |_, ivar| {
        ivar[[500, 100]] = -1.0;
        ivar[[501, 100]] = -0.5;
    });
    let (run, out) = extract(dir.path(), &ccd.psf, &path, &[]);
    run.fails_with(&["negivar.fits", "IVAR", "2 pixels have negative ivar"]);
    assert_no_output(&out);
}

#[test]
fn wavelengths_outside_the_psf() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let out = dir.path().join("frame.fits");
    for grid in ["5900,6400,0.8", "6100,6600,0.8"] {
        let run = run!("extract", "-p", ccd.psf, "-i", ccd.image, "-o", out, "-w", grid);
        run.fails_with(&["psf-small.fits", "outside the PSF"]);
        assert!(!run.stderr.contains("INFO read"), "{}", run.stderr);
        assert_no_output(&out);
    }
}

#[test]
fn absurd_psf_headers() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let orig = std::fs::read(&ccd.psf).unwrap();
    let table = find(&orig, b"XTENSION= 'BINTABLE'").unwrap();
    for (key, value, expect) in [
        ("HSIZEX", "1000000", "HSIZEX = 1000000 is outside"),
        ("LEGDEG", "100", "LEGDEG = 100 is outside"),
        ("NPIX_Y", "0", "NPIX_Y = 0 is outside"),
        ("GHDEGX", "-3", "GHDEGX = -3 is outside"),
    ] {
        let mut bytes = orig.clone();
        patch_card(&mut bytes, table, key, value);
        let psf = dir.path().join(format!("bad-{key}.fits"));
        std::fs::write(&psf, &bytes).unwrap();
        let (run, out) = extract(dir.path(), &psf, &ccd.image, &[]);
        run.fails_with(&[&format!("bad-{key}.fits"), expect]);
        assert_no_output(&out);
    }
}

/// Spot widths no spot can be made from, patched into the table data: GHSIGX's first
/// coefficient of fiber 0 (row 0 holds PARAM, 8 bytes, then COEFF as big-endian f8).
#[test]
fn psf_without_usable_spots() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let orig = std::fs::read(&ccd.psf).unwrap();
    let table = find(&orig, b"XTENSION= 'BINTABLE'").unwrap();
    let end = (table..orig.len())
        .step_by(80)
        .find(|&i| orig[i..].starts_with(b"END     "))
        .unwrap();
    let data = (end + 80).div_ceil(2880) * 2880;
    assert_eq!(&orig[data..data + 6], b"GHSIGX");
    for (value, expect) in [
        (f64::NAN, "GHSIGX of fiber 0 has a non-finite coefficient"),
        (0.0, "GHSIGX of fiber 0 is -"),
    ] {
        let mut bytes = orig.clone();
        bytes[data + 8..data + 16].copy_from_slice(&value.to_be_bytes());
        let psf = dir.path().join("nospots.fits");
        std::fs::write(&psf, &bytes).unwrap();
        let (run, out) = extract(dir.path(), &psf, &ccd.image, &[]);
        run.fails_with(&["nospots.fits", "HDU PSF", expect]);
        assert_no_output(&out);
    }
    let bad = dir.path().join("zero-sigma.fits");
    run!(
        "simulate",
        "--make-psf",
        bad,
        "--nfiber",
        "30",
        "--sigma",
        "0,1"
    )
    .fails_with(&["GHSIGX", "must be positive"]);
    assert_no_output(&bad);
}

/// A PSF whose traces leave the CCD: every patch window of the grid misses the CCD (rows
/// from about 1035 on a CCD of 1000), and a frame of nothing but NODATA is an error rather
/// than a success.
#[test]
fn nothing_extracted_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let steep = spextract::psf::synth::synthetic_psf(&spextract::psf::synth::SynthPsfOptions {
        y_per_angstrom: 3.0,
        ..crate::common::small_psf_options()
    });
    let psf = dir.path().join("steep.fits");
    spextract::io::write_psf(&psf, &steep).unwrap();
    let out = dir.path().join("frame.fits");
    let run = run!(
        "extract",
        "-p",
        psf,
        "-i",
        ccd.image,
        "-o",
        out,
        "-w",
        "6440,6460,0.8"
    );
    run.fails_with(&["nothing was extracted", "left the CCD"]);
    assert_no_output(&out);
}

#[test]
fn truncated_images() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let plain = write_edited(dir.path(), &ccd, "plain.fits", |_, _| {});
    let bytes = std::fs::read(&plain).unwrap();
    let cut = dir.path().join("cut.fits");
    // Inside IMAGE's data, inside IVAR's header, inside MASK's data, and the last block gone.
    let ivar = find(&bytes, b"EXTNAME = 'IVAR").unwrap();
    let mask = find(&bytes, b"EXTNAME = 'MASK").unwrap();
    for len in [2880 * 20, ivar + 40, mask + 2880 * 10, bytes.len() - 2880] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let (run, out) = extract(dir.path(), &ccd.psf, &cut, &[]);
        run.fails_with(&["cut.fits"]);
        assert_no_output(&out);
    }
    // A gzipped file cut short.
    let gz = dir.path().join("cut.fits.gz");
    let status = std::process::Command::new("gzip")
        .args(["-k", "-c"])
        .arg(&plain)
        .stdout(std::fs::File::create(&gz).unwrap())
        .status();
    match status {
        Ok(s) if s.success() => {
            let zipped = std::fs::read(&gz).unwrap();
            std::fs::write(&gz, &zipped[..zipped.len() * 2 / 3]).unwrap();
            let (run, out) = extract(dir.path(), &ccd.psf, &gz, &[]);
            run.fails_with(&["cut.fits.gz"]);
            assert_no_output(&out);
        }
        _ => eprintln!("skipping the gzip case: gzip is not available"),
    }
}

#[test]
fn existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let out = dir.path().join("frame.fits");
    std::fs::write(&out, b"precious").unwrap();
    let (run, _) = extract(dir.path(), &ccd.psf, &ccd.image, &[]);
    run.fails_with(&["frame.fits", "already exists", "--overwrite"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let (run, _) = extract(dir.path(), &ccd.psf, &ccd.image, &["--overwrite"]);
    run.ok();
    assert_eq!(read_frame(&out).unwrap().flux.dim(), (25, 501));
}

#[test]
fn unwritable_output_fails_before_extracting() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let out = dir.path().join("no-such-dir").join("frame.fits");
    let run = run!("extract", "-p", ccd.psf, "-i", ccd.image, "-o", out, "-w", SMALL_GRID);
    run.fails_with(&["no-such-dir", "does not exist"]);
    assert!(!run.stderr.contains("extracted"), "{}", run.stderr);
    assert!(!out.exists());
}

/// Options the configuration or the PSF alone refuses, before the image is read.
#[test]
fn bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let out = dir.path().join("frame.fits");
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["-w", "6100,6400"],
            &["wavelength must be [wmin, wmax, dw]"],
        ),
        (&["-w", "6100,6400,-0.8"], &["wavelength must be"]),
        (
            &["-w", SMALL_GRID, "-s", "30"],
            &["specmin 30", "psf-small.fits", "25 fibers"],
        ),
        (
            &["-w", SMALL_GRID, "-s", "20", "-n", "10"],
            &["fibers 20..30", "psf-small.fits", "25 fibers"],
        ),
        (
            &["-w", SMALL_GRID, "--nsubbundles", "0"],
            &["nsubbundles 0"],
        ),
    ];
    for (flags, expect) in cases {
        let mut args: Vec<std::ffi::OsString> = vec![
            "extract".into(),
            "-p".into(),
            ccd.psf.clone().into(),
            "-i".into(),
            ccd.image.clone().into(),
            "-o".into(),
            out.clone().into(),
        ];
        args.extend(flags.iter().map(Into::into));
        let run = crate::common::spextract(args);
        run.fails_with(expect);
        assert!(
            !run.stderr.contains("INFO read"),
            "image read first:\n{}",
            run.stderr
        );
        assert_no_output(&out);
    }
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[extract]\nregularise = 1.0\n").unwrap();
    let (run, _) = extract(
        dir.path(),
        &ccd.psf,
        &ccd.image,
        &["--config", config.to_str().unwrap()],
    );
    run.fails_with(&["bad.toml", "regularise"]);
    assert_no_output(&out);
}

#[test]
fn simulate_refuses_fibers_outside_the_psf() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let (image, truth) = (dir.path().join("sim.fits"), dir.path().join("t.fits"));
    let run =
        run!("simulate", "-p", ccd.psf, "-i", image, "-t", truth, "-n", "30", "-w", SMALL_GRID);
    run.fails_with(&["fibers 0..30", "25 fibers"]);
    assert_no_output(&image);
    assert_no_output(&truth);
}

#[test]
fn compare_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let (run, out) = extract(dir.path(), &ccd.psf, &ccd.image, &[]);
    run.ok();
    // Truth recovery within thresholds: exit 0. (This CCD has 500 bins per fiber, so each
    // fiber's chi2/dof has σ ≈ 0.06 and the frame's σ ≈ 0.013: the thresholds are widened to
    // test the exit code, not the science, which the synthetic and real_data tests cover.)
    let run = run!(
        "compare",
        out,
        "--truth",
        ccd.truth,
        "--chi2-tol",
        "0.1",
        "--fiber-chi2-tol",
        "0.4"
    );
    run.ok();
    assert!(
        run.stdout.contains("resolution band retention"),
        "{}",
        run.stdout
    );
    // The frame alone: its own figures.
    run!("compare", out).ok();
    // The same frame against itself: zero pulls.
    let run = run!("compare", out, out);
    run.ok();
    assert!(
        run.stdout.contains("max pull                  0.000e0"),
        "{}",
        run.stdout
    );
    // An absurdly tight chi2 tolerance fails the thresholds: exit 1, not an error.
    let run = run!("compare", out, "--truth", ccd.truth, "--chi2-tol", "1e-9");
    run.expect_code(1);
    assert!(run.stdout.contains("FAIL"), "{}", run.stdout);
    // So does a band retention nobody can meet.
    run!("compare", out, "--min-band-retention", "1.5").expect_code(1);
    // A missing file is an error: exit 2.
    run!("compare", out, "--truth", dir.path().join("none.fits")).fails_with(&["none.fits"]);
}

/// OpenBLAS sizes its thread pool when it is loaded, before `main`; without
/// OPENBLAS_NUM_THREADS in the environment spextract must still bring it down to one thread per
/// call, since its own threads already use every core (a threaded BLAS under them made a frame
/// ten times slower).
#[test]
fn blas_is_single_threaded_without_the_environment_variable() {
    let out = std::process::Command::new(crate::common::BIN)
        .args(["compare", "/nonexistent/frame.fits"])
        .env_remove("OPENBLAS_NUM_THREADS")
        .env_remove("OMP_NUM_THREADS")
        .env("SPEXTRACT_LOG", "debug")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("OpenBLAS threads per call: 1"), "{log}");
}

/// Without a GPU (CI, this machine) `--backend gpu` fails before any work with the reason, and
/// `auto` extracts on the CPU and says why. (On a GPU machine `gpu` runs the GPU backend, which
/// `extract::gpu::backend`'s tests compare with the CPU; only the `auto` half applies.)
#[test]
fn backend_gpu_fails_clearly_and_auto_falls_back_to_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = crate::common::small_ccd(dir.path());
    let out = dir.path().join("frame.fits");
    if spextract::extract::gpu::device::probe().is_err() {
        run!(
            "extract",
            "-p",
            ccd.psf,
            "-i",
            ccd.image,
            "-o",
            out,
            "-w",
            crate::common::SMALL_GRID,
            "--backend",
            "gpu"
        )
        .fails_with(&["--backend gpu:"]);
        crate::common::assert_no_output(&out);
    }
    let r = run!(
        "extract",
        "-p",
        ccd.psf,
        "-i",
        ccd.image,
        "-o",
        out,
        "-w",
        crate::common::SMALL_GRID,
        "--backend",
        "auto"
    );
    r.ok();
    assert!(
        r.stderr.contains("backend: cpu (auto: CPU ("),
        "{}",
        r.stderr
    );
    assert!(out.is_file());
}

/// The single-frame log: the grid's wavelengths to its step (not `6450.000000000423`), "1
/// thread", a rate with its noun, and one line for the image read.
#[test]
fn the_single_frame_log_reads_well() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let (run, _) = extract(dir.path(), &ccd.psf, &ccd.image, &["--threads", "1"]);
    run.ok();
    let log = &run.stderr;
    assert!(
        log.contains("(6050.0..6450.0 Å in steps of 0.8 Å)") && log.contains("with 1 thread\n"),
        "{log}"
    );
    assert!(log.contains(" patches/s"), "{log}");
    assert_eq!(log.matches(" read ").count(), 1, "{log}");
}
