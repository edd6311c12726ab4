//! The many-frame pipeline: list in, frames out, under one process and under `mpirun`, with
//! bad frames among good ones and a SIGTERM (one process) or SIGUSR1 (mpirun) in the middle.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spextract::io::frame::{read_frame, Frame};
use spextract::io::write_psf;
use spextract::pipeline::report::RunReport;
use spextract::psf::synth::synthetic_psf;
use spextract::simulate::write_simulation;

use crate::common::{small_psf_options, small_sim_options, BIN, SMALL_GRID};

/// Two bundles (50 fibers) on a small CCD, so that frames are cut into several units.
pub(crate) fn two_bundle_psf(dir: &Path) -> PathBuf {
    let mut o = small_psf_options();
    o.nfiber = 50;
    o.npix_x = 480;
    let path = dir.join("psf.fits");
    write_psf(&path, &synthetic_psf(&o)).unwrap();
    path
}

/// `n` simulated exposures through `psf` (seeds 1..=n) and a list file naming their outputs
/// under `dir/out`.
fn frames(dir: &Path, psf: &Path, n: usize) -> PathBuf {
    frames_with(dir, psf, n, false)
}

/// [`frames`], with IVAR computed from the noisy pixels when `ivar_from_data`.
pub(crate) fn frames_with(dir: &Path, psf: &Path, n: usize, ivar_from_data: bool) -> PathBuf {
    let p = spextract::io::read_psf(psf).unwrap();
    let mut list = String::from("# image psf output\n");
    for i in 1..=n {
        let image = dir.join(format!("preproc-{i}.fits"));
        let mut o = small_sim_options();
        o.nspec = 50;
        o.seed = i as u64;
        o.ivar_from_data = ivar_from_data;
        write_simulation(&p, &o, &image, &dir.join(format!("truth-{i}.fits"))).unwrap();
        list += &format!("preproc-{i}.fits psf.fits out/frame-{i}.fits\n");
    }
    let path = dir.join("frames.txt");
    std::fs::write(&path, list).unwrap();
    path
}

pub(crate) fn config(dir: &Path) -> PathBuf {
    let path = dir.join("run.toml");
    let g: Vec<&str> = SMALL_GRID.split(',').collect();
    std::fs::write(
        &path,
        format!("[extract]\nwavelength = [{}, {}, {}]\n", g[0], g[1], g[2]),
    )
    .unwrap();
    path
}

pub(crate) fn pipeline_cmd(
    launcher: Option<usize>,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> Command {
    let mut cmd = match launcher {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args(["-n", &n.to_string(), BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("extract");
    for a in args {
        cmd.arg(a);
    }
    cmd.env("NO_COLOR", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    cmd
}

pub(crate) fn run_pipeline(
    launcher: Option<usize>,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> (i32, String) {
    let out = pipeline_cmd(launcher, args)
        .output()
        .expect("cannot start spextract");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

pub(crate) fn have_mpirun() -> bool {
    // A cuda-aware-mpi build refuses an MPI that is not CUDA-aware (tested below), so its
    // multi-rank runs need one: say so with SPEXTRACT_CUDA_AWARE_MPI=1, its mpirun first on PATH.
    if cfg!(feature = "cuda-aware-mpi") && std::env::var_os("SPEXTRACT_CUDA_AWARE_MPI").is_none() {
        eprintln!(
            "skipping: this cuda-aware-mpi build runs under a CUDA-aware MPI only (set \
             SPEXTRACT_CUDA_AWARE_MPI=1 with one on PATH: scripts/build-cuda-aware-ompi.sh)"
        );
        return false;
    }
    mpirun_runs()
}

/// Whether `mpirun` runs here (a failure when CI requires it).
fn mpirun_runs() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // CI sets this so that a missing launcher fails instead of skipping the MPI tests.
        if std::env::var_os("SPEXTRACT_REQUIRE_MPI").is_some() {
            panic!("SPEXTRACT_REQUIRE_MPI is set but mpirun does not run");
        }
        eprintln!("skipping: mpirun not found (install openmpi-bin to run the multi-rank tests)");
    }
    ok
}

/// The arrays of a frame file, for equality (the files themselves differ in the time written
/// into the CHECKSUM comment).
pub(crate) fn same_frame(a: &Path, b: &Path) {
    let (fa, fb): (Frame, Frame) = (read_frame(a).unwrap(), read_frame(b).unwrap());
    assert_eq!(
        fa.wave,
        fb.wave,
        "{} vs {}: WAVELENGTH",
        a.display(),
        b.display()
    );
    assert!(
        fa.flux == fb.flux,
        "{} vs {}: FLUX differs",
        a.display(),
        b.display()
    );
    assert!(
        fa.ivar == fb.ivar,
        "{} vs {}: IVAR differs",
        a.display(),
        b.display()
    );
    assert!(
        fa.mask == fb.mask,
        "{} vs {}: MASK differs",
        a.display(),
        b.display()
    );
    assert!(
        fa.resolution == fb.resolution,
        "{} vs {}: RESOLUTION differs",
        a.display(),
        b.display()
    );
    assert!(
        fa.chi2pix == fb.chi2pix,
        "{} vs {}: CHI2PIX differs",
        a.display(),
        b.display()
    );
}

/// Single-frame extractions of frames 1..=n of `dir`, the reference the pipeline must match.
fn single_frames(dir: &Path, n: usize) -> Vec<PathBuf> {
    (1..=n)
        .map(|i| {
            let out = dir.join(format!("single-{i}.fits"));
            run!(
                "extract",
                "--psf",
                dir.join("psf.fits"),
                "--image",
                dir.join(format!("preproc-{i}.fits")),
                "--output",
                &out,
                "--wavelength",
                SMALL_GRID,
                "--threads",
                "1"
            )
            .ok();
            out
        })
        .collect()
}

#[test]
fn one_process_and_1_3_5_ranks_write_the_single_frame_results_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let list = frames(d, &psf, 3);
    let cfg = config(d);
    let reference = single_frames(d, 3);
    let mut launchers = vec![None];
    if have_mpirun() {
        launchers.extend([Some(1), Some(3), Some(5)]);
    }
    for launcher in launchers {
        let (log, rep) = run_list(d, launcher, &list, &cfg, &[]);
        for (i, r) in reference.iter().enumerate() {
            same_frame(r, &d.join(format!("out/frame-{}.fits", i + 1)));
        }
        assert_eq!(rep.frames.written, 3, "{log}");
        assert_eq!(rep.ranks, launcher.unwrap_or(1));
        assert!(rep.frames_per_node_hour > 0.0);
        assert!(rep.bytes_per_frame > 0.0, "{log}");
        // Every unit computed exactly once across the compute ranks: 2 bundles x 3 frames.
        assert_eq!(units_computed(&rep), 6, "{log}");
    }
}

/// Runs `list` (its outputs under `dir/out`, emptied first) under `launcher`, one thread per
/// rank and units of one bundle, with `extra` arguments; checks that it succeeds and returns
/// its log and report.
pub(crate) fn run_list(
    dir: &Path,
    launcher: Option<usize>,
    list: &Path,
    cfg: &Path,
    extra: &[&str],
) -> (String, RunReport) {
    let _ = std::fs::remove_dir_all(dir.join("out"));
    let report = dir.join("report.json");
    let mut args = list_args(&list, &cfg, extra);
    args.extend([&"--unit-bundles" as Arg, &"1", &"--report", &report]);
    let (code, log) = run_pipeline(launcher, &args);
    assert_eq!(code, 0, "launcher {launcher:?}:\n{log}");
    (log, RunReport::read_json(&report).unwrap())
}

/// An argument of a spextract command line.
type Arg<'a> = &'a dyn AsRef<std::ffi::OsStr>;

/// `extract --frames list --config cfg --threads 1`'s arguments, then `extra`.
fn list_args<'a>(list: Arg<'a>, cfg: Arg<'a>, extra: &'a [&'a str]) -> Vec<Arg<'a>> {
    let mut args: Vec<Arg<'a>> = vec![&"--frames", list, &"--config", cfg, &"--threads", &"1"];
    args.extend(extra.iter().map(|a| a as Arg<'a>));
    args
}

/// Units computed across a run's compute ranks.
pub(crate) fn units_computed(rep: &RunReport) -> usize {
    rep.roles
        .iter()
        .filter(|r| r.role.contains("compute"))
        .map(|r| r.units)
        .sum()
}

/// A cuda-aware-mpi build under an MPI that is not CUDA-aware refuses to start before any
/// work, naming the MPI library and the fix, instead of handing it device memory.
#[cfg(feature = "cuda-aware-mpi")]
#[test]
fn a_cuda_aware_build_refuses_an_mpi_that_is_not() {
    if std::env::var_os("SPEXTRACT_CUDA_AWARE_MPI").is_some() {
        eprintln!("skipping: SPEXTRACT_CUDA_AWARE_MPI says the MPI here is CUDA-aware");
        return;
    }
    if !mpirun_runs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let list = frames(d, &psf, 1);
    let cfg = config(d);
    let (code, log) = run_pipeline(Some(2), &[&"--frames", &list, &"--config", &cfg]);
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("built with --features cuda-aware-mpi"),
        "{log}"
    );
    assert!(
        log.contains("Open MPI") || log.contains("MPICH"),
        "names the library:\n{log}"
    );
    assert!(log.contains("scripts/build-cuda-aware-ompi.sh"), "{log}");
    assert!(!d.join("out/frame-1.fits").exists(), "no frame is written");
}

#[test]
fn a_bad_frame_fails_alone_and_the_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    frames(d, &psf, 2);
    let cfg = config(d);
    // A truncated image and a missing PSF between the two good frames.
    let bytes = std::fs::read(d.join("preproc-1.fits")).unwrap();
    std::fs::write(d.join("truncated.fits"), &bytes[..bytes.len() / 3]).unwrap();
    let list = d.join("mixed.txt");
    std::fs::write(
        &list,
        "preproc-1.fits psf.fits out/good-1.fits\n\
         truncated.fits psf.fits out/truncated.fits\n\
         preproc-2.fits no-such-psf.fits out/nopsf.fits\n\
         preproc-2.fits psf.fits out/good-2.fits\n",
    )
    .unwrap();
    let mut launchers = vec![None];
    if have_mpirun() {
        launchers.push(Some(3));
    }
    for launcher in launchers {
        let _ = std::fs::remove_dir_all(d.join("out"));
        let (code, log) = run_pipeline(
            launcher,
            &[&"--frames", &list, &"--config", &cfg, &"--threads", &"1"],
        );
        assert_eq!(
            code, 1,
            "launcher {launcher:?}: a failed frame must fail the run\n{log}"
        );
        assert!(
            log.contains("2 written") && log.contains("2 failed"),
            "{log}"
        );
        assert!(log.contains("failed frames:"), "{log}");
        assert!(
            log.contains("truncated.fits") && log.contains("no-such-psf.fits"),
            "{log}"
        );
        assert!(d.join("out/good-1.fits").is_file() && d.join("out/good-2.fits").is_file());
        assert!(!d.join("out/truncated.fits").exists() && !d.join("out/nopsf.fits").exists());
    }
}

#[test]
fn sigterm_leaves_only_complete_frames_and_a_rerun_finishes_the_same_files() {
    sigterm_then_rerun(&[], false);
}

/// Runs `n` frames in one process with `extra` arguments (on IVAR from the data when
/// `ivar_from_data`), SIGTERM once the first is written: only complete frames are left, the
/// rerun skips them and writes the rest, and every frame is the one an uninterrupted run writes.
pub(crate) fn sigterm_then_rerun(extra: &[&str], ivar_from_data: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let n = 10;
    let list = frames_with(d, &psf, n, ivar_from_data);
    let cfg = config(d);
    let out = d.join("out");
    let mut args = list_args(&list, &cfg, extra);
    args.extend([&"--prefetch" as Arg, &"1"]);
    let child = pipeline_cmd(None, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SIGTERM once the first frame is on disk, as Slurm does ahead of the time limit.
    let t0 = Instant::now();
    while !(out.join("frame-1.fits").exists() || t0.elapsed() > Duration::from_secs(120)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of a child this test owns and has not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let first = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&first.stderr);
    let present: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        present.len() < n,
        "the run finished before the signal; it must be interrupted for this test\n{log}"
    );
    assert_ne!(
        first.status.code(),
        Some(0),
        "an interrupted run exits non-zero\n{log}"
    );
    assert!(log.contains("abandoned"), "{log}");
    for p in &present {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(
            !name.starts_with('.'),
            "temporary left behind: {}",
            p.display()
        );
        read_frame(p).unwrap_or_else(|e| panic!("{} is not a complete frame: {e}", p.display()));
    }
    // The rerun skips what is done and writes the rest.
    let (code, log) = run_pipeline(None, &args);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("{} skipped", present.len())),
        "the rerun must skip the {} frames already written\n{log}",
        present.len()
    );
    // The same frames as an uninterrupted run.
    let straight = d.join("straight");
    std::fs::create_dir(&straight).unwrap();
    let list2 = d.join("frames-straight.txt");
    let text = std::fs::read_to_string(&list)
        .unwrap()
        .replace("out/", "straight/");
    std::fs::write(&list2, text).unwrap();
    let (code, log) = run_pipeline(None, &list_args(&list2, &cfg, extra));
    assert_eq!(code, 0, "{log}");
    for i in 1..=n {
        let name = format!("frame-{i}.fits");
        same_frame(&straight.join(&name), &out.join(&name));
    }
}

/// mpirun ends its ranks about a second after it forwards SIGTERM, but forwards SIGUSR1 and
/// leaves them running: SIGUSR1 to mpirun stops handing out frames, the frames in flight are
/// finished and written whole, rank 0 prints the summary (abandoned frames, "interrupted") and
/// the job exits 1; a rerun skips what was written and writes the rest.
#[test]
fn sigusr1_to_mpirun_drains_the_frames_in_flight_and_a_rerun_finishes() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let n = 8;
    let list = frames(d, &psf, n);
    let cfg = config(d);
    let out = d.join("out");
    let logs = d.join("logs");
    let report = d.join("report.json");
    let args: [&dyn AsRef<std::ffi::OsStr>; 14] = [
        &"--frames",
        &list,
        &"--config",
        &cfg,
        &"--threads",
        &"1",
        &"--prefetch",
        &"1",
        &"--unit-bundles",
        &"1",
        &"--log-dir",
        &logs,
        &"--report",
        &report,
    ];
    // 3 ranks: rank 0 reads, rank 1 writes, rank 2 computes.
    let child = pipeline_cmd(Some(3), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(out.join("frame-1.fits").exists() || t0.elapsed() > Duration::from_secs(120)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of the mpirun this test started and has not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    let (code, log) = wait_or_fail(child, Duration::from_secs(180), "SIGUSR1");
    let present: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        present.len() < n,
        "the run finished before the signal; it must be interrupted for this test\n{log}"
    );
    assert_eq!(
        code, 1,
        "a drained run that abandoned frames exits 1\n{log}"
    );
    assert!(
        log.contains("SIGUSR1: no new frames will be started; frames in flight are finished"),
        "{log}"
    );
    assert!(log.contains("abandoned (interrupted)"), "no summary\n{log}");
    for p in &present {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(
            !name.starts_with('.'),
            "temporary left behind: {}",
            p.display()
        );
        let f = read_frame(p)
            .unwrap_or_else(|e| panic!("{} is not a complete frame: {e}", p.display()));
        assert_eq!(f.flux.nrows(), 50, "{}", p.display());
    }
    let rep = RunReport::read_json(&report).unwrap();
    assert!(rep.interrupted, "{log}");
    assert_eq!(rep.frames.written, present.len(), "{log}");
    assert_eq!(rep.frames.failed, 0, "{log}");
    assert_eq!(rep.frames.abandoned, n - present.len(), "{log}");
    // The writer's own log: frames in flight at the signal were written after it, and none
    // was given up half assembled.
    let writer = std::fs::read_to_string(logs.join("rank-0001.log")).unwrap();
    let signalled = writer.find("SIGUSR1").expect("the writer logs the signal");
    assert!(
        writer[signalled..].contains("wrote "),
        "no frame in flight was written after the signal\n{writer}"
    );
    assert!(
        !writer.contains("abandoned: the run stopped before all its units came back"),
        "{writer}"
    );
    // The rerun writes the rest.
    let (code, log) = run_pipeline(Some(3), &args);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("{} skipped", present.len())),
        "the rerun must skip the {} frames already written\n{log}",
        present.len()
    );
    for i in 1..=n {
        read_frame(&out.join(format!("frame-{i}.fits"))).unwrap();
    }
}

/// The pid a rank logs at start in `--log-dir`.
fn rank_pid(log_dir: &Path, rank: usize, timeout: Duration) -> Option<i32> {
    let path = log_dir.join(format!("rank-{rank:04}.log"));
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some(pid) = text
                .lines()
                .find_map(|l| l.split(", pid ").nth(1))
                .and_then(|p| p.trim().parse().ok())
            {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Waits for `child` up to `timeout`; kills it and fails when it hangs.
fn wait_or_fail(mut child: std::process::Child, timeout: Duration, what: &str) -> (i32, String) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            return (status.code().unwrap_or(-1), log);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: the job still ran after {timeout:?}, it hangs\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A compute rank that dies (SIGKILL) or stops answering (SIGSTOP) ends the job with an error
/// rather than a hang: MPI takes the job down in the first case, the other ranks' watchdogs in
/// the second.
#[test]
fn a_dead_or_frozen_rank_fails_the_job_instead_of_hanging() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    let list = frames(d, &psf, 6);
    let cfg = config(d);
    for (signal, what) in [(libc::SIGKILL, "SIGKILL"), (libc::SIGSTOP, "SIGSTOP")] {
        let logs = d.join(format!("logs-{what}"));
        let child = pipeline_cmd(
            Some(3),
            &[
                &"--frames",
                &list,
                &"--config",
                &cfg,
                &"--threads",
                &"1",
                &"--unit-bundles",
                &"1",
                &"--watchdog",
                &"1",
                &"--log-dir",
                &logs,
                &"--overwrite",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let pid = rank_pid(&logs, 2, Duration::from_secs(60)).expect("rank 2 logs its pid");
        // SAFETY: kill(2) on the pid the compute rank of this test's job reported.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let (code, log) = wait_or_fail(child, Duration::from_secs(90), what);
        assert_ne!(code, 0, "{what}: the job must fail\n{log}");
        if signal == libc::SIGSTOP {
            assert!(
                log.contains("watchdog"),
                "the watchdog must say what it waits on\n{log}"
            );
            // The stopped rank is still there when its peers leave; make sure it goes.
            // SAFETY: as above; the pid may be gone already, which kill reports harmlessly.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A batch log (stderr not a terminal) of `--frames`: progress lines on rank 0 (the first
/// frame's and the last's at least), one line per frame read, a frame's failure said once by
/// the rank that found it, every line under mpirun with its rank, counts with their nouns.
#[test]
fn a_batch_log_shows_progress_and_readable_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = two_bundle_psf(d);
    frames(d, &psf, 2);
    let cfg = config(d);
    let bytes = std::fs::read(d.join("preproc-1.fits")).unwrap();
    std::fs::write(d.join("truncated.fits"), &bytes[..bytes.len() / 3]).unwrap();
    let list = d.join("mixed.txt");
    std::fs::write(
        &list,
        "preproc-1.fits psf.fits out/good-1.fits\n\
         truncated.fits psf.fits out/truncated.fits\n\
         preproc-2.fits psf.fits out/good-2.fits\n",
    )
    .unwrap();
    let mut launchers = vec![None];
    if have_mpirun() {
        launchers.push(Some(3));
    }
    for launcher in launchers {
        let _ = std::fs::remove_dir_all(d.join("out"));
        let out = pipeline_cmd(
            launcher,
            &[&"--frames", &list, &"--config", &cfg, &"--threads", &"1"],
        )
        .env("SPEXTRACT_LOG", "info")
        .output()
        .expect("cannot start spextract");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "one frame fails\n{log}");
        let lines: Vec<&str> = log.lines().collect();
        let with = |needle: &str| -> Vec<&str> {
            lines
                .iter()
                .copied()
                .filter(|l| l.contains(needle))
                .collect()
        };
        let progress = with("progress: ");
        assert!(
            progress
                .iter()
                .any(|l| l.contains("progress: 1 of 3 frames done")),
            "a line when the first frame finishes:\n{log}"
        );
        let last = progress
            .iter()
            .find(|l| l.contains("progress: 3 of 3 frames done (1 failed)"))
            .unwrap_or_else(|| panic!("a line when the last frame finishes:\n{log}"));
        assert!(
            last.contains("frames/h") && last.contains("elapsed"),
            "{last}"
        );
        for image in ["preproc-1.fits", "preproc-2.fits"] {
            let reads = with(&format!("read {}", d.join(image).display()));
            assert_eq!(reads.len(), 1, "one line per frame read:\n{log}");
            assert!(
                reads[0].contains("pixels masked") && reads[0].contains("cut into"),
                "{}",
                reads[0]
            );
        }
        let failed = with("frame ");
        let failed: Vec<_> = failed.iter().filter(|l| l.contains(" failed: ")).collect();
        assert_eq!(failed.len(), 1, "the failure said once:\n{log}");
        assert!(!log.contains("1 threads"), "{log}");
        assert!(log.contains("x 1 thread"), "{log}");
        match launcher {
            None => {
                assert!(
                    with("wrote ")
                        .iter()
                        .any(|l| l.contains("of 3 frames written on this rank")),
                    "{log}"
                );
            }
            Some(_) => {
                // Every log line names its rank; the progress and the read and failure lines
                // come from rank 0, which reads and hands out the frames.
                for l in lines.iter().filter(|l| {
                    [" INFO ", " WARN ", "ERROR "]
                        .iter()
                        .any(|lv| l.contains(lv))
                }) {
                    assert!(l.contains(" rank "), "a line without its rank: {l}\n{log}");
                }
                assert!(progress.iter().all(|l| l.contains("rank 0: progress: ")));
                assert!(failed[0].contains("rank 0: frame "), "{}", failed[0]);
            }
        }
    }
}
