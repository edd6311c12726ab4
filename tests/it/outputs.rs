//! Outputs are never lost, half-written or silently replaced (issue 12, items 1-5 and two
//! messages of item 14): reruns keep only frames of the same request, outputs are never inputs
//! nor each other, two writers of one path cannot both win, list mode leaves files that are not
//! its frames alone, leftovers of killed writers are removed (and only those), a full disk is
//! named as such, and a frame and its model image land together or not at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use spextract::io::frame::{read_frame, write_frame, FrameMeta};

use crate::common::{small_ccd, SmallCcd, BIN, SMALL_GRID};

/// A list of one frame of the small CCD, written to `out/frame.fits`.
fn list_of_one(dir: &Path, ccd: &SmallCcd) -> PathBuf {
    let list = dir.join("frames.txt");
    std::fs::write(
        &list,
        format!(
            "{} {} out/frame.fits\n",
            ccd.image.display(),
            ccd.psf.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    list
}

/// `extract --frames list --threads 1` and more; `-w SMALL_GRID` unless `extra` has a `-w`.
fn run_list(list: &Path, extra: &[&str]) -> crate::common::Run {
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "--frames".into(),
        list.into(),
        "--threads".into(),
        "1".into(),
    ];
    if !extra.contains(&"-w") {
        args.extend(["-w".into(), SMALL_GRID.into()]);
    }
    args.extend(extra.iter().map(Into::into));
    crate::common::spextract(args)
}

/// `extract -p -i -w SMALL_GRID --threads 1` and more (the outputs among them).
fn run_single(ccd: &SmallCcd, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> crate::common::Run {
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "-p".into(),
        ccd.psf.clone().into(),
        "-i".into(),
        ccd.image.clone().into(),
        "-w".into(),
        SMALL_GRID.into(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(|a| a.as_ref().to_owned()));
    crate::common::spextract(args)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Item 1: a rerun skips a frame only if it holds what the rerun asks for.
#[test]
fn a_rerun_keeps_only_frames_of_the_same_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let list = list_of_one(d, &ccd);
    let frame = d.join("out/frame.fits");
    run_list(&list, &["-n", "10"]).ok();
    assert_eq!(read_frame(&frame).unwrap().nspec(), 10);

    // The same request again: skipped.
    let run = run_list(&list, &["-n", "10"]);
    run.ok();
    assert!(run.stderr.contains("1 skipped"), "{}", run.stderr);

    // Another request: refused before any work, naming each difference.
    let before = std::fs::read(&frame).unwrap();
    let run = run_list(&list, &["-s", "5", "-n", "20", "-w", "6100,6400,0.8"]);
    run.fails_with(&[
        "frame.fits",
        "fibers: the frame has -s 0 -n 10 (fibers 0..10), this run asks for -s 5 -n 20",
        "wavelength grid: the frame's is -w 6050,6450,0.8, this run asks for -w 6100,6400,0.8",
        "--overwrite",
        "nothing was done",
    ]);
    assert!(!run.stderr.contains(" patches"), "{}", run.stderr);
    assert_eq!(
        std::fs::read(&frame).unwrap(),
        before,
        "the frame was touched"
    );

    // An option that changes the numbers.
    run_list(&list, &["-n", "10", "--regularize", "0.1"]).fails_with(&["regularize"]);

    // The image written again (same pixels, new file): its frame may be stale.
    let image = std::fs::read(&ccd.image).unwrap();
    std::fs::remove_file(&ccd.image).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&ccd.image, &image).unwrap();
    run_list(&list, &["-n", "10"]).fails_with(&["has changed since the frame was extracted"]);

    // --overwrite redoes it as asked.
    run_list(&list, &["-s", "5", "-n", "20", "--overwrite"]).ok();
    let f = read_frame(&frame).unwrap();
    assert_eq!((f.specmin, f.nspec()), (5, 20));
    run_list(&list, &["-s", "5", "-n", "20"]).ok();
}

/// Item 1: a frame that does not say what it was extracted for (written before requests were
/// recorded) is not taken as complete.
#[test]
fn a_frame_without_a_recorded_request_is_not_vouched_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let list = list_of_one(d, &ccd);
    let frame = d.join("out/frame.fits");
    run_list(&list, &["-n", "4"]).ok();
    let old = read_frame(&frame).unwrap();
    std::fs::remove_file(&frame).unwrap();
    write_frame(&frame, &old, &FrameMeta::default(), false).unwrap();
    run_list(&list, &["-n", "4"])
        .fails_with(&["does not record what it was extracted for", "--overwrite"]);
    run_list(&list, &["-n", "4", "--overwrite"]).ok();
    run_list(&list, &["-n", "4"]).ok();
}

/// Item 2: no output is an input or the other output, however spelled, with or without
/// --overwrite.
#[test]
fn single_frame_outputs_are_never_its_inputs_nor_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    std::fs::create_dir(d.join("sub")).unwrap();
    let f = d.join("f.fits");
    let run = run_single(
        &ccd,
        &[&"-o", &f, &"-m", &d.join("sub/../f.fits"), &"--overwrite"],
    );
    run.fails_with(&["the model image would replace the frame"]);
    assert!(!f.exists());

    let psf = std::fs::read(&ccd.psf).unwrap();
    let image = std::fs::read(&ccd.image).unwrap();
    let spelled = d.join("sub/..//psf-small.fits");
    run_single(&ccd, &[&"-o", &spelled, &"--overwrite"])
        .fails_with(&["is the same file as --psf", "would replace the PSF"]);
    std::os::unix::fs::symlink(d, d.join("sub/up")).unwrap();
    run_single(
        &ccd,
        &[&"-o", &d.join("sub/up/preproc-small.fits"), &"--overwrite"],
    )
    .fails_with(&["is the same file as --image"]);
    run_single(&ccd, &[&"-o", &f, &"-m", &ccd.psf, &"--overwrite"])
        .fails_with(&["--model-image", "would replace the PSF"]);
    assert_eq!(std::fs::read(&ccd.psf).unwrap(), psf);
    assert_eq!(std::fs::read(&ccd.image).unwrap(), image);
}

/// Item 3: of two extractions racing to one output without --overwrite, exactly one writes it
/// and the other fails saying it exists.
#[test]
fn two_writers_of_one_output_cannot_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    for round in 0..3 {
        let out = d.join(format!("race-{round}.fits"));
        let start = || {
            Command::new(BIN)
                .args(["extract", "-p"])
                .arg(&ccd.psf)
                .arg("-i")
                .arg(&ccd.image)
                .arg("-o")
                .arg(&out)
                .args(["-w", SMALL_GRID, "--threads", "1", "-n", "5"])
                .env("NO_COLOR", "1")
                .env("OPENBLAS_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (start(), start());
        let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
        let logs: Vec<String> = outs
            .iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect();
        let winners = codes.iter().filter(|&&c| c == Some(0)).count();
        assert_eq!(winners, 1, "round {round}: exit codes {codes:?}\n{logs:#?}");
        let loser = codes.iter().position(|&c| c != Some(0)).unwrap();
        assert_eq!(codes[loser], Some(2), "{logs:#?}");
        assert!(logs[loser].contains("already exists"), "{}", logs[loser]);
        assert_eq!(read_frame(&out).unwrap().nspec(), 5);
    }
    assert!(
        entries(d).iter().all(|n| !n.contains(".tmp-")),
        "{:?}",
        entries(d)
    );
}

/// Item 4: list mode replaces nothing that is not its frame without --overwrite, and sees one
/// output however it is spelled.
#[test]
fn list_mode_leaves_other_files_alone_and_sees_through_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let list = list_of_one(d, &ccd);
    let frame = d.join("out/frame.fits");
    std::fs::write(&frame, b"someone's notes").unwrap();
    run_list(&list, &["-n", "3"]).fails_with(&["frame.fits", "not a frame", "--overwrite"]);
    assert_eq!(std::fs::read(&frame).unwrap(), b"someone's notes");
    run_list(&list, &["-n", "3", "--overwrite"]).ok();
    assert_eq!(read_frame(&frame).unwrap().nspec(), 3);

    std::fs::create_dir(d.join("out/x")).unwrap();
    std::os::unix::fs::symlink(d.join("out"), d.join("via")).unwrap();
    for second in ["via/a.fits", "out//x/../a.fits"] {
        let two = d.join("two.txt");
        let (i, p) = (ccd.image.display(), ccd.psf.display());
        std::fs::write(&two, format!("{i} {p} out/a.fits\n{i} {p} {second}\n")).unwrap();
        run_list(&two, &["-n", "3"]).fails_with(&["is named twice"]);
        assert!(!d.join("out/a.fits").exists());
    }
}

/// Item 5: reruns, single-frame or list, remove the temporaries of killed writers, the model
/// image's too, and leave those whose writer still runs.
#[test]
fn reruns_remove_the_leftovers_of_killed_writers_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let mut ended = Command::new("true").spawn().unwrap();
    ended.wait().unwrap();
    let dead = ended.id();
    let mut running = Command::new("sleep").arg("60").spawn().unwrap();
    let live = running.id();
    let h = spextract::io::temporary_host();
    let plant = |folder: &Path, output: &str| -> (Vec<PathBuf>, PathBuf) {
        let stale = vec![
            folder.join(format!(".{output}.tmp-{h}-{dead}-0")),
            // As spextract named them before it recorded the host.
            folder.join(format!(".{output}.tmp-{dead}-0")),
            folder.join(format!(".m.fits.tmp-{h}-{dead}-1")),
        ];
        let busy = folder.join(format!(".{output}.tmp-{h}-{live}-0"));
        for p in stale.iter().chain([&busy]) {
            std::fs::write(p, vec![0u8; 2880]).unwrap();
        }
        (stale, busy)
    };

    let (stale, busy) = plant(d, "f.fits");
    let run = run_single(
        &ccd,
        &[
            &"-o",
            &d.join("f.fits"),
            &"-m",
            &d.join("m.fits"),
            &"-n",
            &"3",
        ],
    );
    run.ok();
    for p in &stale {
        assert!(!p.exists(), "{} is left", p.display());
        assert!(
            run.stderr.contains(&format!("removed {}", p.display())),
            "{}",
            run.stderr
        );
    }
    assert!(busy.exists(), "a live writer's temporary was removed");
    assert!(
        run.stderr.contains("their writer is still running"),
        "{}",
        run.stderr
    );

    let list = list_of_one(d, &ccd);
    let (stale, busy) = plant(&d.join("out"), "frame.fits");
    run_list(&list, &["-n", "3"]).ok();
    for p in &stale {
        assert!(!p.exists(), "{} is left", p.display());
    }
    assert!(busy.exists(), "a live writer's temporary was removed");
    let _ = running.kill();
    let _ = running.wait();
}

/// Runs `script` (sh, `$1` the folder, `$2` the binary) in a new user and mount namespace
/// where `$1` gets a tmpfs of `size`; `None` (with a message) where that cannot be set up.
fn on_a_small_tmpfs(folder: &Path, size: &str, script: &str) -> Option<(i32, String)> {
    let full =
        format!("mount -t tmpfs -o size={size} tmpfs \"$1\" || exit 97; echo MOUNTED; {script}");
    let out = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            &full,
            "sh",
        ])
        .arg(folder)
        .arg(BIN)
        .env("NO_COLOR", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping: cannot run unshare to mount a small tmpfs: {e}");
            return None;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !text.contains("MOUNTED") {
        eprintln!("skipping: no user namespace with a tmpfs here:\n{text}");
        return None;
    }
    Some((out.status.code().unwrap_or(-1), text))
}

/// Item 14: a full disk is said as such, about the output (not its temporary), and nothing is
/// left; a model image that does not fit takes its frame with it (one output set).
#[test]
fn a_full_disk_is_named_and_a_frame_and_model_land_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let full = d.join("full");
    std::fs::create_dir(&full).unwrap();
    let (p, i) = (ccd.psf.display(), ccd.image.display());
    let extract = format!("\"$2\" extract -p {p} -i {i} -w {SMALL_GRID} -n 5 --threads 1");
    let script =
        format!("{extract} -o \"$1/f.fits\"; rc=$?; echo \"LEFT:[$(ls -A \"$1\")]\"; exit $rc");
    let Some((code, log)) = on_a_small_tmpfs(&full, "48k", &script) else {
        return;
    };
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("f.fits: not written: No space left on device"),
        "{log}"
    );
    assert!(!log.contains(".tmp-"), "names the temporary:\n{log}");
    assert!(log.contains("LEFT:[]"), "something was left:\n{log}");

    // The frame fits (outside the tmpfs), its model image does not.
    let frame = d.join("with-model.fits");
    let script = format!(
        "{extract} -o {} -m \"$1/m.fits\"; rc=$?; echo \"LEFT:[$(ls -A \"$1\")]\"; exit $rc",
        frame.display()
    );
    let (code, log) = on_a_small_tmpfs(&full, "48k", &script).unwrap();
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("m.fits: not written: No space left on device"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "so the frame {} was not written either",
            frame.display()
        )),
        "{log}"
    );
    assert!(log.contains("LEFT:[]"), "something was left:\n{log}");
    assert!(!frame.exists(), "the frame landed without its model image");
    assert!(
        entries(d).iter().all(|n| !n.contains(".tmp-")),
        "{:?}",
        entries(d)
    );
}

/// Under mpirun a refused run ends every rank with rank 0's error, instead of leaving the
/// others waiting for it in MPI_Init.
#[test]
fn a_refused_run_under_mpirun_ends_every_rank() {
    let have = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have || cfg!(feature = "cuda-aware-mpi") {
        eprintln!("skipping: needs mpirun and a host-staged build");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let list = list_of_one(d, &ccd);
    std::fs::write(d.join("out/frame.fits"), b"not a frame").unwrap();
    let mut child = Command::new("mpirun")
        .args(["-n", "2", BIN, "extract", "--frames"])
        .arg(&list)
        .args(["-w", SMALL_GRID, "--threads", "1"])
        .env("NO_COLOR", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("mpirun still runs 120 s after rank 0 refused the run");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("not a frame"), "{log}");
    assert_eq!(
        std::fs::read(d.join("out/frame.fits")).unwrap(),
        b"not a frame"
    );
}
