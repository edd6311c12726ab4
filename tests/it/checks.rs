//! What `extract` and `doctor` refuse or limit before any work: an image and a PSF of different
//! cameras, lists and configurations without end, absurd thread, prefetch and role counts,
//! inputs that are not files; and errors that say their cause once.

use std::path::{Path, PathBuf};
use std::process::Command;

use spextract::io::write_psf;

use crate::common::{assert_no_output, find, small_ccd, small_psf, BIN, SMALL_GRID};

/// The small PSF written to `dir/name` with `CAMERA = 'camera'` in its PSF HDU, where specex
/// writes it.
fn psf_with_camera(dir: &Path, name: &str, camera: &str) -> PathBuf {
    let mut psf = small_psf();
    psf.camera = Some(camera.into());
    let path = dir.join(name);
    write_psf(&path, &psf).unwrap();
    assert!(find(&std::fs::read(&path).unwrap(), b"CAMERA  = ").is_some());
    path
}

/// `spextract extract` of one frame of the small grid with `extra` flags.
fn extract_one(psf: &Path, image: &Path, out: &Path, extra: &[&str]) -> crate::common::Run {
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "-p".into(),
        psf.into(),
        "-i".into(),
        image.into(),
        "-o".into(),
        out.into(),
        "-w".into(),
        SMALL_GRID.into(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    crate::common::spextract(args)
}

/// The simulated image says CAMERA r0: a b0 PSF is refused with both files and both cameras
/// named, unless --allow-camera-mismatch; the camera's case does not matter; a PSF without
/// CAMERA is extracted with a warning.
#[test]
fn an_image_and_a_psf_of_different_cameras_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let b0 = psf_with_camera(d, "psf-b0.fits", "b0");
    let out = d.join("frame.fits");
    extract_one(&b0, &ccd.image, &out, &[]).fails_with(&[
        "preproc-small.fits: CAMERA is r0 but the PSF",
        "psf-b0.fits is for camera b0",
        "--allow-camera-mismatch",
    ]);
    assert_no_output(&out);

    let run = extract_one(&b0, &ccd.image, &out, &["--allow-camera-mismatch"]);
    run.ok();
    assert!(run.stderr.contains("extracting anyway"), "{}", run.stderr);
    std::fs::remove_file(&out).unwrap();

    // The same in the configuration file.
    let cfg = d.join("allow.toml");
    std::fs::write(&cfg, "[extract]\nallow_camera_mismatch = true\n").unwrap();
    extract_one(&b0, &ccd.image, &out, &["--config", cfg.to_str().unwrap()]).ok();
    std::fs::remove_file(&out).unwrap();

    let upper = psf_with_camera(d, "psf-R0.fits", "R0");
    let run = extract_one(&upper, &ccd.image, &out, &[]);
    run.ok();
    assert!(!run.stderr.contains("CAMERA"), "{}", run.stderr);
    std::fs::remove_file(&out).unwrap();

    let run = extract_one(&ccd.psf, &ccd.image, &out, &[]);
    run.ok();
    assert!(
        run.stderr.contains("has no CAMERA keyword: cannot check"),
        "{}",
        run.stderr
    );
}

/// The demo's inputs, a PSF from `simulate --make-psf` and an image simulated through it, carry
/// one camera (r0 unless `--camera` says otherwise), so their extraction checks it without a
/// warning.
#[test]
fn simulated_psfs_and_images_carry_their_camera() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (psf, image, truth, out) = (
        d.join("psf.fits"),
        d.join("preproc.fits"),
        d.join("truth.fits"),
        d.join("frame.fits"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let simulate = |camera: &[&str]| {
        let mut args = vec!["simulate".to_string(), "--make-psf".into(), s(&psf)];
        args.extend(["--nfiber", "10", "--overwrite"].map(String::from));
        args.extend(camera.iter().map(|c| c.to_string()));
        crate::common::spextract(args).ok();
        crate::common::spextract([
            "simulate",
            "-p",
            &s(&psf),
            "-i",
            &s(&image),
            "-t",
            &s(&truth),
            "-n",
            "3",
            "-w",
            SMALL_GRID,
            "--overwrite",
        ])
        .ok();
    };
    simulate(&[]);
    assert_eq!(
        spextract::io::read_psf(&psf).unwrap().camera.as_deref(),
        Some("r0")
    );
    let run = extract_one(&psf, &image, &out, &["-n", "3"]);
    run.ok();
    assert!(!run.stderr.contains("CAMERA"), "{}", run.stderr);

    simulate(&["--camera", "B3"]);
    let run = extract_one(&psf, &image, &out, &["-n", "3", "--overwrite"]);
    run.ok();
    assert!(!run.stderr.contains("CAMERA"), "{}", run.stderr);
    let frame = std::fs::read(&out).unwrap();
    assert!(find(&frame, b"CAMERA  = 'b3").is_some());
}

/// In a list, the frame whose PSF is of another camera fails alone, before it is extracted,
/// naming both files and both cameras; the others are written.
#[test]
fn a_list_frame_of_another_camera_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_ccd(d);
    psf_with_camera(d, "psf-r0.fits", "r0");
    psf_with_camera(d, "psf-z3.fits", "z3");
    let list = d.join("frames.txt");
    std::fs::write(
        &list,
        "preproc-small.fits psf-r0.fits out/good.fits\n\
         preproc-small.fits psf-z3.fits out/other-camera.fits\n",
    )
    .unwrap();
    let run = run!(
        "extract",
        "--frames",
        list,
        "-w",
        SMALL_GRID,
        "--threads",
        "1"
    );
    run.expect_code(1);
    for part in [
        "preproc-small.fits: CAMERA is r0 but the PSF",
        "psf-z3.fits is for camera z3",
        "1 written",
        "1 failed",
    ] {
        assert!(run.stderr.contains(part), "lacks {part:?}:\n{}", run.stderr);
    }
    assert!(d.join("out/good.fits").is_file());
    assert!(!d.join("out/other-camera.fits").exists());
}

/// /dev/zero as a list or a configuration is refused after a bounded read, naming the file,
/// by extract and by doctor.
#[test]
fn endless_lists_and_configurations_are_refused() {
    run!("extract", "--frames", "/dev/zero")
        .fails_with(&["/dev/zero: larger than the 64 MiB a frame list may be"]);
    run!("extract", "--config", "/dev/zero", "--frames", "/dev/null")
        .fails_with(&["/dev/zero: larger than the 8 MiB a configuration file may be"]);
    let run = run!("doctor", "--frames", "/dev/zero");
    run.expect_code(1);
    assert!(
        run.stdout.contains("/dev/zero: larger than the 64 MiB"),
        "{}",
        run.stdout
    );
}

/// A folder or a device as an input is named as what it is, not as a missing file.
#[test]
fn a_folder_or_a_device_as_input_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let out = d.join("frame.fits");
    extract_one(&ccd.psf, d, &out, &[]).fails_with(&["is a folder, not a FITS file"]);
    extract_one(Path::new("/dev/zero"), &ccd.image, &out, &[])
        .fails_with(&["/dev/zero: is not a regular file"]);
    assert_no_output(&out);
}

/// Errors that print their cause and also chain it say it once.
#[test]
fn error_causes_are_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = run!(
        "extract",
        "--config",
        d.join("absent.toml"),
        "--frames",
        "x"
    );
    run.fails_with(&["absent.toml: No such file or directory"]);
    assert_eq!(
        run.stderr.matches("No such file").count(),
        1,
        "{}",
        run.stderr
    );

    let ccd = small_ccd(d);
    let mut bytes = std::fs::read(&ccd.psf).unwrap();
    let at = find(&bytes, b"GH-0-0\0").expect("the GH-0-0 row");
    bytes[at..at + 6].copy_from_slice(b"GH-0-X");
    let psf = d.join("no-gh00.fits");
    std::fs::write(&psf, bytes).unwrap();
    let run = extract_one(&psf, &ccd.image, &d.join("frame.fits"), &[]);
    run.fails_with(&["no-gh00.fits: PSF has no parameter GH-0-0"]);
    assert_eq!(run.stderr.matches("GH-0-0").count(), 1, "{}", run.stderr);
}

/// Absurd thread counts, from the flag or from Slurm, are cut with a warning saying what is
/// used, and the frame is extracted (100 000 threads took minutes to start).
#[test]
fn huge_thread_counts_are_cut_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let out = d.join("flag.fits");
    let mut args = vec![
        "extract".to_string(),
        "-p".into(),
        ccd.psf.display().to_string(),
        "-i".into(),
        ccd.image.display().to_string(),
        "-w".into(),
        SMALL_GRID.into(),
        "-o".into(),
    ];
    let run = crate::common::spextract(args.iter().cloned().chain([
        out.display().to_string(),
        "--threads".into(),
        "100000".into(),
    ]));
    run.ok();
    assert!(
        run.stderr.contains("a thread count of 100000 (--threads")
            && run.stderr.contains("threads per compute rank"),
        "{}",
        run.stderr
    );
    assert!(out.is_file());

    args.push(d.join("slurm.fits").display().to_string());
    let slurm = Command::new(BIN)
        .args(&args)
        .env("SLURM_CPUS_PER_TASK", "100000")
        .env("NO_COLOR", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&slurm.stderr);
    assert_eq!(slurm.status.code(), Some(0), "{log}");
    assert!(
        log.contains("SLURM_CPUS_PER_TASK=100000 is more than"),
        "{log}"
    );
}

/// A prefetch depth or a reader count beyond what is sensible or possible is said, with what
/// is used instead.
#[test]
fn huge_prefetch_and_reader_counts_are_said() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_ccd(d);
    let list = d.join("frames.txt");
    std::fs::write(&list, "preproc-small.fits psf-small.fits out/f.fits\n").unwrap();
    let run = run!(
        "extract",
        "--frames",
        list,
        "-w",
        SMALL_GRID,
        "--threads",
        "1",
        "--prefetch",
        "10000",
        "--readers-per-node",
        "1000"
    );
    run.ok();
    for part in [
        "a prefetch of 10000 frames (--prefetch, or prefetch under [run]) is more than the 16",
        "using 16",
        "--readers-per-node 1000 and --writers-per-node 1 do not fit node 0's 1 rank(s)",
    ] {
        assert!(run.stderr.contains(part), "lacks {part:?}:\n{}", run.stderr);
    }
}
