//! Seeded mutation testing of the FITS readers (issue 12): simulated inputs with one or two
//! mutations each (header cards of every kind, structural, table, tile-compression and PSF
//! keys, set to hostile values, flipped, blanked or duplicated; table and image data flipped;
//! files cut short; gzip streams cut, flipped or extended), read by `spextract extract` (PSFs
//! and preproc images) and `spextract compare` (frames), each in its own process so that a
//! crash in cfitsio is caught as one, under a time limit.
//!
//! Every case must end without a panic, a signal or a hang (still running after [`HANG_S`]);
//! extract must exit 0 or 2 (an error naming one of its inputs, and no output); compare 0, 1
//! or 2; and whenever extract exits 0 its frame must read back, with our reader and, when
//! `python3` can import astropy, with astropy (every HDU's data, every FIBERMAP column, and
//! `Table.read` of the FIBERMAP).
//!
//! `SPEXTRACT_FUZZ_CASES` (default [`DEFAULT_CASES`]) and `SPEXTRACT_FUZZ_SEED` (default
//! [`DEFAULT_SEED`]) choose the run; each case draws from its own generator, so
//! `SPEXTRACT_FUZZ_CASE=n` reruns case `n` alone and keeps its files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spextract::io::frame::read_frame;

use crate::common::{python_has, small_ccd, BIN};

/// Cases of a default run: a few hundred, a minute or two on two cores.
const DEFAULT_CASES: usize = 300;
/// The default seed; CI runs this one, so a failure there reproduces anywhere.
const DEFAULT_SEED: u64 = 12;
/// A reader or extraction still running after this long is a hang (they take well under a
/// second on these inputs).
const HANG_S: u64 = 60;
/// The extraction each case runs: a few fibers from the middle (so FIBERMAP rows are cut) of a
/// short grid.
const EXTRACT_ARGS: [&str; 9] = [
    "-w",
    "6100,6300,1.0",
    "-s",
    "3",
    "-n",
    "6",
    "--threads",
    "1",
    "--no-progress",
];

const BLOCK: usize = 2880;
const CARD: usize = 80;

/// Where a header and its data lie in a file.
#[derive(Debug, Clone)]
struct Hdu {
    /// Offset of the first card.
    header: usize,
    /// Cards before END.
    ncards: usize,
    /// Offset of the data.
    data: usize,
    /// Bytes of data (unpadded).
    data_len: usize,
}

/// The HDUs of a well-formed FITS file.
fn layout(bytes: &[u8]) -> Vec<Hdu> {
    let mut hdus = Vec::new();
    let mut at = 0;
    while at + BLOCK <= bytes.len() {
        let ncards = (at..bytes.len())
            .step_by(CARD)
            .position(|i| bytes[i..i + CARD].starts_with(b"END     "))
            .expect("END card");
        let data = at + (ncards * CARD / BLOCK + 1) * BLOCK;
        let cards = &bytes[at..at + ncards * CARD];
        let int = |k: &str| -> i64 {
            cards
                .chunks(CARD)
                .find(|c| c.starts_with(format!("{k:<8}=").as_bytes()))
                .map_or(0, |c| {
                    let v = String::from_utf8_lossy(&c[10..]);
                    v.split('/').next().unwrap().trim().parse().unwrap()
                })
        };
        let naxis = int("NAXIS");
        let elements: i64 = if naxis == 0 {
            0
        } else {
            (1..=naxis).map(|i| int(&format!("NAXIS{i}"))).product()
        };
        let data_len = (elements * (int("BITPIX").abs() / 8) + int("PCOUNT")) as usize;
        hdus.push(Hdu {
            header: at,
            ncards,
            data,
            data_len,
        });
        at = data + data_len.div_ceil(BLOCK) * BLOCK;
    }
    hdus
}

/// Keys whose values steer how a reader sizes and interprets what follows.
fn is_interesting(key: &str) -> bool {
    const EXACT: [&str; 20] = [
        "SIMPLE", "BITPIX", "NAXIS", "XTENSION", "PCOUNT", "GCOUNT", "TFIELDS", "EXTNAME", "BZERO",
        "BSCALE", "THEAP", "ZIMAGE", "ZBITPIX", "ZCMPTYPE", "NPIX_X", "NPIX_Y", "HSIZEX", "LEGDEG",
        "WAVEMIN", "FIBERMIN",
    ];
    const PREFIX: [&str; 12] = [
        "NAXIS", "TTYPE", "TFORM", "TDIM", "TNULL", "TSCAL", "TZERO", "ZNAXIS", "ZTILE", "ZNAME",
        "ZVAL", "GHDEG",
    ];
    EXACT.contains(&key) || PREFIX.iter().any(|p| key.starts_with(p))
}

/// Hostile values for a card of `key` whose current value is `current`.
fn values_for(key: &str, current: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "0",
        "-1",
        "1",
        "2",
        "3",
        "7",
        "999",
        "1000",
        "32767",
        "65536",
        "2147483647",
        "2147483648",
        "-2147483648",
        "4294967296",
        "9223372036854775807",
        "99999999999999999999",
        "1.5",
        "1E300",
        "NaN",
        "T",
        "5",
        "'abc'",
        "''",
        "'  '",
        "'unterminated",
        "=",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Ok(n) = current.parse::<i64>() {
        for m in [n + 1, n - 1, n * 2, n / 2, n.saturating_mul(1000), -n] {
            v.push(m.to_string());
        }
    }
    let strings: &[&str] = if key.starts_with("TFORM") {
        &[
            "'J'",
            "'K'",
            "'E'",
            "'D'",
            "'3A'",
            "'1000A'",
            "'0J'",
            "'2J'",
            "'L'",
            "'8X'",
            "'B'",
            "'I'",
            "'C'",
            "'M'",
            "'1PJ(5)'",
            "'1QD(3)'",
            "'abc'",
            "'2147483647E'",
            "'Z'",
            "'3a'",
        ]
    } else if key.starts_with("TDIM") {
        &["'(2,3)'", "'(0)'", "'(1000000,1000000)'", "'(3'", "'(1,1)'"]
    } else if key.starts_with("TTYPE") || key == "EXTNAME" {
        &[
            "'FIBER'",
            "'TARGETID'",
            "'OBJTYPE'",
            "'IMAGE'",
            "'IVAR'",
            "'MASK'",
            "'FIBERMAP'",
            "'PSF'",
            "'XTRACE'",
            "'FLUX'",
            "'a b'",
            "'x''y'",
        ]
    } else if key == "XTENSION" {
        &[
            "'BINTABLE'",
            "'IMAGE   '",
            "'TABLE   '",
            "'A3DTABLE'",
            "'FOO'",
        ]
    } else if key == "ZCMPTYPE" {
        &[
            "'RICE_1'",
            "'GZIP_1'",
            "'GZIP_2'",
            "'HCOMPRESS_1'",
            "'PLIO_1'",
            "'NOCOMPRESS'",
        ]
    } else if key == "BITPIX" || key == "ZBITPIX" {
        &["8", "16", "32", "64", "-32", "-64", "-16", "12"]
    } else {
        &[]
    };
    v.extend(strings.iter().map(|s| s.to_string()));
    v
}

/// One mutation of FITS bytes, in place; returns what it did.
fn mutate_fits(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>, hdus: &[Hdu]) -> String {
    // After a cut, only what is left can be mutated.
    let whole: Vec<&Hdu> = hdus
        .iter()
        .filter(|h| h.data + h.data_len <= bytes.len())
        .collect();
    let Some(&hdu) = whole.choose(rng) else {
        return "nothing (the file was cut)".into();
    };
    let hdu = hdu.clone();
    let card_at = |i: usize| hdu.header + i * CARD;
    let key_of = |b: &[u8], i: usize| {
        String::from_utf8_lossy(&b[card_at(i)..card_at(i) + 8])
            .trim_end()
            .to_string()
    };
    match rng.gen_range(0..100) {
        0..=44 => {
            let interesting: Vec<usize> = (0..hdu.ncards)
                .filter(|&i| is_interesting(&key_of(bytes, i)))
                .collect();
            let i = if !interesting.is_empty() && rng.gen_bool(0.75) {
                *interesting.choose(rng).unwrap()
            } else {
                rng.gen_range(0..hdu.ncards)
            };
            let key = key_of(bytes, i);
            let at = card_at(i);
            let current = String::from_utf8_lossy(&bytes[at + 10..at + CARD]);
            let current = current.split('/').next().unwrap().trim().to_string();
            let value = values_for(&key, &current).choose(rng).unwrap().clone();
            let card = format!("{key:<8}= {value:>20}");
            let card = format!("{card:<80}");
            bytes[at..at + CARD].copy_from_slice(&card.as_bytes()[..CARD]);
            format!("HDU at {}: {key} = {value}", hdu.header)
        }
        45..=54 => {
            let n = rng.gen_range(1..=3);
            for _ in 0..n {
                let at = hdu.header + rng.gen_range(0..hdu.ncards * CARD);
                bytes[at] = if rng.gen_bool(0.5) {
                    rng.gen_range(b' '..=b'~')
                } else {
                    rng.gen()
                };
            }
            format!("HDU at {}: {n} header bytes flipped", hdu.header)
        }
        55..=61 => {
            // Blank a card, END included: a key disappears or the header runs on.
            let i = rng.gen_range(0..=hdu.ncards);
            let at = card_at(i);
            bytes[at..at + CARD].fill(b' ');
            format!("HDU at {}: card {i} blanked", hdu.header)
        }
        62..=67 => {
            let (from, to) = (rng.gen_range(0..hdu.ncards), rng.gen_range(0..hdu.ncards));
            let card = bytes[card_at(from)..card_at(from) + CARD].to_vec();
            bytes[card_at(to)..card_at(to) + CARD].copy_from_slice(&card);
            format!("HDU at {}: card {from} copied over card {to}", hdu.header)
        }
        68..=82 => {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..bytes.len()),
                1 => hdu.header + rng.gen_range(0..BLOCK),
                2 => hdu.data + rng.gen_range(0..=hdu.data_len),
                _ => bytes.len() - rng.gen_range(1..=BLOCK),
            };
            bytes.truncate(len.min(bytes.len()));
            format!("cut to {len} bytes")
        }
        _ => {
            if hdu.data_len == 0 {
                return "nothing (no data to flip)".into();
            }
            let n = rng.gen_range(1..=16);
            for _ in 0..n {
                let at = hdu.data + rng.gen_range(0..hdu.data_len);
                bytes[at] = rng.gen();
            }
            format!("HDU at {}: {n} data bytes flipped", hdu.header)
        }
    }
}

/// One mutation of a gzip stream.
fn mutate_gzip(rng: &mut ChaCha8Rng, gz: &mut Vec<u8>) -> String {
    let n = gz.len();
    match rng.gen_range(0..6) {
        0 => {
            let k = rng.gen_range(1..=8);
            gz.truncate(n - k);
            format!("gzip: last {k} bytes cut")
        }
        1 => {
            let k = rng.gen_range(10..n);
            gz.truncate(k);
            format!("gzip: cut to {k} bytes")
        }
        2 => {
            let at = rng.gen_range(0..n);
            gz[at] ^= 1 << rng.gen_range(0..8);
            format!("gzip: bit flipped at byte {at}")
        }
        3 => {
            let at = n - rng.gen_range(1..=8);
            gz[at] = rng.gen();
            format!("gzip: trailer byte {at} changed")
        }
        4 => {
            let extra: Vec<u8> = (0..rng.gen_range(1..100)).map(|_| rng.gen()).collect();
            gz.extend_from_slice(&extra);
            format!("gzip: {} bytes appended", extra.len())
        }
        _ => {
            gz.truncate(10);
            "gzip: only the first 10 bytes".into()
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Preproc,
    PreprocGz,
    Psf,
    Frame,
}

/// The valid inputs every case mutates.
struct Inputs {
    psf: PathBuf,
    psf_bytes: Vec<u8>,
    image: PathBuf,
    image_bytes: Vec<u8>,
    frame_bytes: Vec<u8>,
}

/// What a run of the binary did.
struct Ran {
    code: Option<i32>,
    stderr: String,
}

/// Runs `spextract args…`, its log into `log`, killing it after [`HANG_S`].
fn run_binary(args: &[&std::ffi::OsStr], log: &Path) -> Result<Ran, String> {
    let mut child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env("SPEXTRACT_LOG", "info")
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .map_err(|e| format!("cannot run {BIN}: {e}"))?;
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let stderr = std::fs::read_to_string(log).unwrap_or_default();
            let tail = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            if stderr.contains("panicked") {
                return Err(format!("it panicked: {tail}"));
            }
            return match status.code() {
                Some(code @ (0..=2)) => Ok(Ran {
                    code: Some(code),
                    stderr,
                }),
                other => Err(format!("it exited with {other:?} ({status}): {tail}")),
            };
        }
        if t0.elapsed() > Duration::from_secs(HANG_S) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("it hung (still running after {HANG_S} s)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs extract on `psf` and `image` into `out`; `Ok(Some(out))` when it wrote a frame, which
/// has then read back.
fn check_extract(
    psf: &Path,
    image: &Path,
    out: &Path,
    log: &Path,
) -> Result<Option<PathBuf>, String> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "extract".as_ref(),
        "-p".as_ref(),
        psf.as_os_str(),
        "-i".as_ref(),
        image.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ];
    args.extend(EXTRACT_ARGS.iter().map(std::ffi::OsStr::new));
    let run = run_binary(&args, log)?;
    let tail = run
        .stderr
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ");
    match run.code {
        Some(0) => {
            read_frame(out).map_err(|e| format!("exit 0 but the frame does not read back: {e}"))?;
            Ok(Some(out.to_path_buf()))
        }
        Some(2) => {
            let names = [psf, image].map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
            if !names.iter().any(|n| run.stderr.contains(n.as_str())) {
                return Err(format!("exit 2 without naming an input: {tail}"));
            }
            if out.exists() {
                return Err("exit 2 but the output was written".into());
            }
            Ok(None)
        }
        other => Err(format!("extract exited with {other:?}: {tail}")),
    }
}

/// Runs case `case` in `dir`; returns a description of what it did and frames to check.
fn run_case(
    seed: u64,
    case: usize,
    inputs: &Inputs,
    dir: &Path,
) -> (String, Result<Option<PathBuf>, String>) {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (case as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let target = match rng.gen_range(0..100) {
        0..=39 => Target::Preproc,
        40..=59 => Target::PreprocGz,
        60..=84 => Target::Psf,
        _ => Target::Frame,
    };
    let source = match target {
        Target::Preproc | Target::PreprocGz => &inputs.image_bytes,
        Target::Psf => &inputs.psf_bytes,
        Target::Frame => &inputs.frame_bytes,
    };
    let hdus = layout(source);
    let mut bytes = source.clone();
    let mut what = Vec::new();
    let compressed_mutation = target == Target::PreprocGz && rng.gen_bool(0.5);
    if !compressed_mutation {
        for _ in 0..if rng.gen_bool(0.8) { 1 } else { 2 } {
            what.push(mutate_fits(&mut rng, &mut bytes, &hdus));
        }
    }
    if target == Target::PreprocGz {
        bytes = gzip(&bytes);
        if compressed_mutation {
            what.push(mutate_gzip(&mut rng, &mut bytes));
        }
    }
    let name = match target {
        Target::PreprocGz => format!("case{case}-preproc.fits.gz"),
        Target::Preproc => format!("case{case}-preproc.fits"),
        Target::Psf => format!("case{case}-psf.fits"),
        Target::Frame => format!("case{case}-frame.fits"),
    };
    let path = dir.join(&name);
    std::fs::write(&path, &bytes).unwrap();
    let label = format!("case {case} ({target:?}: {})", what.join("; "));
    let log = dir.join(format!("case{case}.log"));
    let result = match target {
        // `compare` reads the frame with read_frame, and judges it: exit 0 or 1.
        Target::Frame => run_binary(&["compare".as_ref(), path.as_os_str()], &log).map(|_| None),
        Target::Psf => check_extract(
            &path,
            &inputs.image,
            &dir.join(format!("case{case}-out.fits")),
            &log,
        ),
        _ => check_extract(
            &inputs.psf,
            &path,
            &dir.join(format!("case{case}-out.fits")),
            &log,
        ),
    };
    (label, result)
}

/// Reads every frame with astropy; returns the failures, or `None` when astropy is missing.
fn astropy_failures(frames: &[PathBuf]) -> Option<Vec<String>> {
    if !python_has(&["astropy", "numpy"]) {
        eprintln!("skipping the astropy read-back: python3 cannot import astropy and numpy");
        return None;
    }
    const SCRIPT: &str = r#"
import sys, warnings
import numpy as np
from astropy.io import fits
from astropy.table import Table
warnings.simplefilter("ignore")
for path in sys.argv[1:]:
    try:
        with fits.open(path) as h:
            for hdu in h:
                d = hdu.data
                if isinstance(hdu, fits.BinTableHDU):
                    for name in d.columns.names:
                        np.asarray(d[name])
                elif d is not None:
                    np.asarray(d)
            if "FIBERMAP" in h:
                Table.read(path, hdu="FIBERMAP")
    except Exception as e:
        print("FAIL", path, type(e).__name__, str(e)[:200].replace("\n", " "))
"#;
    let mut failures = Vec::new();
    for chunk in frames.chunks(200) {
        let out = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .args(chunk)
            .output()
            .expect("python3 ran a moment ago");
        let stdout = String::from_utf8_lossy(&out.stdout);
        failures.extend(
            stdout
                .lines()
                .filter(|l| l.starts_with("FAIL"))
                .map(String::from),
        );
        if !out.status.success() {
            failures.push(format!(
                "the astropy script failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Some(failures)
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[test]
fn mutated_inputs_never_panic_hang_or_give_an_unreadable_frame() {
    let seed = env_number("SPEXTRACT_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let only = env_number("SPEXTRACT_FUZZ_CASE").map(|c| c as usize);
    let ncases = env_number("SPEXTRACT_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let frame = dir.path().join("frame.fits");
    let run = crate::common::spextract(
        ["extract", "-p"]
            .iter()
            .map(|s| s.into())
            .chain([ccd.psf.clone().into_os_string()])
            .chain(["-i".into(), ccd.image.clone().into_os_string()])
            .chain(["-o".into(), frame.clone().into_os_string()])
            .chain(EXTRACT_ARGS.iter().map(|s| s.into()))
            .collect::<Vec<std::ffi::OsString>>(),
    );
    run.ok();
    let inputs = Inputs {
        psf_bytes: std::fs::read(&ccd.psf).unwrap(),
        image_bytes: std::fs::read(&ccd.image).unwrap(),
        frame_bytes: std::fs::read(&frame).unwrap(),
        psf: ccd.psf.clone(),
        image: ccd.image.clone(),
    };
    let cases: Vec<usize> = match only {
        Some(c) => vec![c],
        None => (0..ncases).collect(),
    };
    let work = dir.path().join("cases");
    std::fs::create_dir(&work).unwrap();
    let (mut failures, mut frames, mut errors) = (Vec::new(), Vec::new(), 0usize);
    let t0 = Instant::now();
    for &case in &cases {
        let (label, result) = run_case(seed, case, &inputs, &work);
        match result {
            Ok(Some(frame)) => frames.push((label, frame)),
            Ok(None) => errors += 1,
            Err(e) => failures.push(format!("{label}: {e}")),
        }
        if only.is_none() {
            for e in std::fs::read_dir(&work).unwrap() {
                let p = e.unwrap().path();
                if !frames.iter().any(|(_, f)| *f == p) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
    let paths: Vec<PathBuf> = frames.iter().map(|(_, f)| f.clone()).collect();
    if let Some(bad) = astropy_failures(&paths) {
        for line in bad {
            let label = frames
                .iter()
                .find(|(_, f)| line.contains(&*f.to_string_lossy()))
                .map_or("?", |(l, _)| l.as_str());
            failures.push(format!("{label}: astropy cannot read the frame: {line}"));
        }
    }
    eprintln!(
        "fuzz seed {seed}: {} cases in {:.0} s: {} frames written and read back, {} clean errors \
         or judgements, {} failures",
        cases.len(),
        t0.elapsed().as_secs_f64(),
        frames.len(),
        errors,
        failures.len()
    );
    if only.is_some() {
        eprintln!("files kept in {}", dir.keep().display());
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failing cases (rerun one with SPEXTRACT_FUZZ_SEED={seed} \
         SPEXTRACT_FUZZ_CASE=n):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
