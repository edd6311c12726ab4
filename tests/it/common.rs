//! Helpers shared by the integration tests: running the binary, the shared data, small
//! synthetic CCDs, and the truth-recovery thresholds of docs/science.md §8.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use spextract::cli::compare::{truth_stats, TruthStats};
use spextract::io::frame::{read_frame, Frame};
use spextract::io::truth::read_truth;
use spextract::io::write_psf;
use spextract::psf::synth::{synthetic_psf, SynthPsfOptions};
use spextract::psf::Psf;
use spextract::simulate::{write_simulation, SimOptions, Simulation};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_spextract");

/// Truth recovery over the frame: |chi²/dof - 1| at most this.
pub const CHI2_TOL: f64 = 0.03;
/// Truth recovery: |mean pull| below this.
pub const MEAN_PULL_TOL: f64 = 0.02;
/// Truth recovery: every fiber's |chi²/dof - 1| at most this.
pub const FIBER_CHI2_TOL: f64 = 0.1;
/// Resolution band: each unmasked row keeps at least this much of its weight in the band.
pub const MIN_BAND_RETENTION: f64 = 0.995;

/// desispec specmask NODATA (no extraction: the patch left the CCD or failed).
pub const NODATA: u32 = 1 << 8;

/// What a run of the binary did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error (the log).
    pub stderr: String,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Run {
    /// Asserts exit code 0 (and no panic), showing the log otherwise.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Asserts the exit code and that nothing panicked.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert!(
            self.code == code,
            "`{}` exited with {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.cmdline,
            self.code,
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "`{}` panicked:\n{}",
            self.cmdline,
            self.stderr
        );
        self
    }

    /// Asserts a failure (exit code 2) whose message contains every one of `needles`.
    #[track_caller]
    pub fn fails_with(&self, needles: &[&str]) -> &Self {
        self.expect_code(2);
        eprintln!("{}\n  -> {}", self.cmdline, self.stderr.trim());
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "`{}`: stderr lacks {n:?}:\n{}",
                self.cmdline,
                self.stderr
            );
        }
        self
    }
}

/// Runs `spextract args…` with a plain (uncoloured) info log and single-threaded BLAS.
pub fn spextract<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmdline = std::iter::once("spextract".to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(BIN)
        .args(&args)
        .env("NO_COLOR", "1")
        .env("SPEXTRACT_LOG", "info")
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        cmdline,
    }
}

/// `run!(a, b, …)`: [`spextract`] with arguments of any `AsRef<OsStr>` type (str, Path,
/// PathBuf, and references to them).
macro_rules! run {
    ($($a:expr),* $(,)?) => {
        $crate::common::spextract([$(::std::ffi::OsString::from(
            ::std::convert::AsRef::<::std::ffi::OsStr>::as_ref(&$a)
        )),*])
    };
}

/// The shared test data folder (`../shared/data`, or `$SPEXTRACT_TEST_DATA`) if it holds every
/// one of `files`; otherwise `None`, with a message saying why the test is skipped.
pub fn shared_data(files: &[&str]) -> Option<PathBuf> {
    let dir = std::env::var_os("SPEXTRACT_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    for f in files {
        let p = dir.join(f);
        if !p.is_file() {
            eprintln!("skipping: {} is missing", p.display());
            return None;
        }
    }
    Some(dir)
}

/// Asserts that neither `path` nor a temporary of it (`.name.tmp-*`) exists.
#[track_caller]
pub fn assert_no_output(path: &Path) {
    assert!(!path.exists(), "{} was written", path.display());
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let dir = path.parent().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with(&format!(".{name}.tmp")),
            "temporary {n} left behind in {}",
            dir.display()
        );
    }
}

/// Checks truth recovery of `frame` against `truth` with the thresholds of docs/science.md §8
/// (chi²/dof 1 ± 0.03, |mean pull| < 0.02, every fiber 1 ± 0.1), requiring that at least
/// `min_frac` of the bins away from the grid ends were usable. Returns the statistics.
#[track_caller]
pub fn assert_truth_recovery(frame: &Path, truth: &Path, min_frac: f64) -> TruthStats {
    let f = read_frame(frame).unwrap();
    let t = read_truth(truth).unwrap();
    let edge = f.resolution.shape()[1] / 2;
    let s = truth_stats(&f, &t.wave, &t.flux, t.specmin, edge).unwrap();
    let (nspec, nwave) = f.flux.dim();
    let possible = nspec * (nwave - 2 * edge);
    let label = frame.display();
    assert!(
        s.nbins as f64 >= min_frac * possible as f64,
        "{label}: only {} of {possible} bins usable",
        s.nbins
    );
    assert_eq!(s.per_fiber.len(), nspec, "{label}: fibers without bins");
    assert!(
        (s.chi2dof - 1.0).abs() <= CHI2_TOL,
        "{label}: chi2/dof {:.4} over {} bins",
        s.chi2dof,
        s.nbins
    );
    assert!(
        s.mean_pull.abs() < MEAN_PULL_TOL,
        "{label}: mean pull {:+.4} ± {:.4}",
        s.mean_pull,
        s.mean_pull_err
    );
    let bad: Vec<_> = s
        .per_fiber
        .iter()
        .filter(|(_, c)| (c - 1.0).abs() > FIBER_CHI2_TOL)
        .collect();
    assert!(
        bad.is_empty(),
        "{label}: fibers with chi2/dof outside 1 ± 0.1: {bad:?}"
    );
    eprintln!(
        "{label}: {} bins, chi2/dof {:.4}, mean pull {:+.4} ± {:.4}, fibers {:.3} .. {:.3}",
        s.nbins,
        s.chi2dof,
        s.mean_pull,
        s.mean_pull_err,
        s.per_fiber
            .iter()
            .map(|f| f.1)
            .fold(f64::INFINITY, f64::min),
        s.per_fiber.iter().map(|f| f.1).fold(0.0, f64::max)
    );
    s
}

/// The resolution band's row sums, computed here independently of the crate: for fiber `i`
/// and each row `j` with `ndiag ≤ j < nwave - ndiag` whose bin is unmasked (ivar > 0, mask 0)
/// and with no NODATA bin within ±ndiag, `Σ_k R[i, k, j + ndiag - k]` (dia layout, offsets
/// `+ndiag … -ndiag`). Returns `(fiber, row, sum)`.
pub fn band_row_sums(frame: &Frame) -> Vec<(usize, usize, f64)> {
    let (nspec, ndia, nwave) = frame.resolution.dim();
    let nd = ndia / 2;
    let mut out = Vec::new();
    for i in 0..nspec {
        for j in nd..nwave.saturating_sub(nd) {
            if !(frame.ivar[[i, j]] > 0.0) || frame.mask[[i, j]] != 0 {
                continue;
            }
            if (j - nd..=j + nd).any(|c| frame.mask[[i, c]] & NODATA != 0) {
                continue;
            }
            let sum: f64 = (0..ndia)
                .map(|k| frame.resolution[[i, k, j + nd - k]])
                .sum();
            out.push((frame.specmin + i, j, sum));
        }
    }
    out
}

/// A small synthetic PSF: 25 fibers over 240 columns, 6000–6500 Å over 1000 rows (about
/// DESI's 1.8 rows per Å), so that a whole simulate → extract cycle takes a fraction of a
/// second.
pub fn small_psf() -> Psf {
    synthetic_psf(&small_psf_options())
}

/// The options of [`small_psf`].
pub fn small_psf_options() -> SynthPsfOptions {
    SynthPsfOptions {
        nfiber: 25,
        first_fiber_x: 20.0,
        npix_x: 240,
        npix_y: 1000,
        wavemin: 6000.0,
        wavemax: 6500.0,
        y_per_angstrom: 1.81,
        smile: 5.0,
        bow: 1.0,
        ..Default::default()
    }
}

/// Extraction grid of the small CCD (501 bins).
pub const SMALL_GRID: &str = "6050,6450,0.8";

/// The small CCD's simulation options: all 25 fibers lit, seed fixed.
pub fn small_sim_options() -> SimOptions {
    SimOptions {
        wmin: 6050.0,
        wmax: 6450.0,
        nspec: 25,
        seed: 11,
        ..Default::default()
    }
}

/// Files of a small simulated exposure.
pub struct SmallCcd {
    /// The PSF file.
    pub psf: PathBuf,
    /// The preproc image (with FIBERMAP, MASK tile-compressed).
    pub image: PathBuf,
    /// The truth.
    pub truth: PathBuf,
    /// What was simulated.
    pub sim: Simulation,
}

/// Writes the small PSF and a simulation through it into `dir`.
pub fn small_ccd(dir: &Path) -> SmallCcd {
    let psf = small_psf();
    let psf_path = dir.join("psf-small.fits");
    write_psf(&psf_path, &psf).unwrap();
    let image = dir.join("preproc-small.fits");
    let truth = dir.join("truth-small.fits");
    let mut opts = small_sim_options();
    opts.in_psf = psf_path.display().to_string();
    let sim = write_simulation(&psf, &opts, &image, &truth).unwrap();
    SmallCcd {
        psf: psf_path,
        image,
        truth,
        sim,
    }
}

/// Replaces the value field of the first header card `key` at or after byte `from` (a multiple
/// of 80) with `value`, right-aligned in columns 11–30 as for numbers.
pub fn patch_card(bytes: &mut [u8], from: usize, key: &str, value: &str) {
    let pat = format!("{key:<8}=");
    let pos = (from..bytes.len() - 80)
        .step_by(80)
        .find(|&i| bytes[i..].starts_with(pat.as_bytes()))
        .unwrap_or_else(|| panic!("no card {key}"));
    let field = format!("{value:>20}");
    bytes[pos + 10..pos + 30].copy_from_slice(field.as_bytes());
}

/// Byte offset of the first occurrence of `needle` in `bytes`.
pub fn find(bytes: &[u8], needle: &[u8]) -> Option<usize> {
    bytes.windows(needle.len()).position(|w| w == needle)
}

/// Whether `python3` can import every one of `modules`.
pub fn python_has(modules: &[&str]) -> bool {
    let code = format!("import {}", modules.join(", "));
    Command::new("python3")
        .args(["-c", &code])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
