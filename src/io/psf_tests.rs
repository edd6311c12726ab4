//! Tests of the PSF reader and writer.

use super::*;
use crate::io::shared_data;
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};

#[test]
fn reads_the_real_r0_psf() {
    let Some(path) = shared_data("psf-r0-00067784.fits") else {
        return;
    };
    let psf = read_psf(&path).unwrap();
    // specex writes CAMERA = '''r0      ''' in the PSF HDU: quotes inside the string.
    assert_eq!(psf.camera.as_deref(), Some("r0"));
    assert_eq!((psf.npix_x, psf.npix_y), (4114, 4128));
    assert_eq!(
        (psf.hsizex, psf.hsizey, psf.ghdegx, psf.ghdegy),
        (8, 5, 6, 6)
    );
    assert_eq!((psf.legdeg, psf.fibermin, psf.nfiber()), (1, 0, 500));
    assert_eq!(psf.xtrace.coeff.ncols(), 7);
    assert_eq!((psf.ytrace.wavemin, psf.ytrace.wavemax), (5543.0, 7826.0));
    assert_eq!(psf.params.len(), 59);
    assert_eq!(psf.params[0].series.wavemax, 7827.0);
    assert_eq!(psf.params[0].name, "GHSIGX");
    assert_eq!(psf.params[51].name, "TAILAMP");
    assert_eq!(psf.params[58].name, "CONT");
    // The file has PSFERROR = 0, which is not PSFERR.
    assert_eq!(psf.psferr, None);
    assert_eq!(
        psf.in_psf.as_deref(),
        Some("SPECPROD/calibnight/20201214/psfnight-r0-20201214.fits")
    );
    // Values from Python: fitsio.FITS(path)['XTRACE'].read()[0, 0], [499, 6];
    // ['YTRACE'].read()[250, 1]; ['PSF'].read()['COEFF'][p][f, k] (fitsio 1.2, numpy repr).
    assert_eq!(psf.xtrace.coeff[(0, 0)], 118.02542005200785);
    assert_eq!(psf.xtrace.coeff[(499, 6)], 0.2653666202826127);
    assert_eq!(psf.ytrace.coeff[(250, 1)], 2137.770637184628);
    let sigx = &psf.param("GHSIGX").unwrap().series.coeff;
    assert_eq!(sigx[(0, 0)], 1.0382261548162712);
    assert_eq!(sigx[(499, 1)], 0.02611179957308719);
    assert_eq!(
        psf.param("GH-2-3").unwrap().series.coeff[(17, 1)],
        0.000678126073765429
    );
    // numpy.polynomial.legendre.legval(u, x[10]) at 6500 Å with the XTRACE range.
    let x = psf.xtrace.eval(10, 6500.0);
    assert!((x - 193.58080776012173).abs() < 1e-9, "{x}");
    let y = psf.ytrace.eval(10, 6500.0);
    assert!((y - 1707.6185213138917).abs() < 1e-9, "{y}");
}

#[test]
fn synthetic_psfs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for legdeg in [1, 3, 5] {
        let mut psf = synthetic_psf(&SynthPsfOptions {
            legdeg,
            nfiber: 50,
            fibermin: 25,
            psferr: Some(0.04),
            ..Default::default()
        });
        psf.in_psf = Some(format!(
            "{}/a/long/path/that/needs/continue/cards/{}",
            "x".repeat(60),
            legdeg
        ));
        let path = dir.path().join(format!("psf-{legdeg}.fits"));
        write_psf(&path, &psf).unwrap();
        let back = read_psf(&path).unwrap();
        assert_eq!(back, psf, "LEGDEG {legdeg}");
    }
}

/// Replaces the value of the first card `key` found at or after byte `from`.
fn patch_card(bytes: &mut [u8], from: usize, key: &str, value: &str) {
    let pat = format!("{key:<8}=");
    let pos = (from..bytes.len() - 80)
        .step_by(80)
        .find(|&i| bytes[i..].starts_with(pat.as_bytes()))
        .unwrap_or_else(|| panic!("no card {key}"));
    let field = format!("{value:>20}");
    bytes[pos + 10..pos + 30].copy_from_slice(field.as_bytes());
}

fn small_psf_file(dir: &Path) -> (std::path::PathBuf, Vec<u8>, usize) {
    let psf = synthetic_psf(&SynthPsfOptions {
        nfiber: 20,
        ..Default::default()
    });
    let path = dir.join("psf.fits");
    write_psf(&path, &psf).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let table = (0..bytes.len())
        .step_by(2880)
        .find(|&i| bytes[i..].starts_with(b"XTENSION= 'BINTABLE'"))
        .unwrap();
    (path, bytes, table)
}

#[test]
fn absurd_headers_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (path, orig, table) = small_psf_file(dir.path());
    let cases = [
        (table, "HSIZEX", "1000000", "HSIZEX = 1000000 is outside"),
        (table, "LEGDEG", "100", "LEGDEG = 100 is outside"),
        (table, "NPIX_X", "-5", "NPIX_X = -5 is outside"),
        // The table's declared size is past the end of the file: refused before its rows are
        // counted.
        (
            table,
            "NAXIS2",
            "1000000000",
            "HDU PSF: its data runs to byte",
        ),
        (table, "LEGDEG", "2", "LEGDEG 2 and 20 fibers imply 60"),
        (
            0,
            "NAXIS2",
            "999999999",
            "HDU XTRACE: its data runs to byte",
        ),
    ];
    for (from, key, value, expect) in cases {
        let mut bytes = orig.clone();
        patch_card(&mut bytes, from, key, value);
        std::fs::write(&path, &bytes).unwrap();
        let err = read_psf(&path).unwrap_err().to_string();
        assert!(err.contains(expect), "{key}={value}: {err}");
        assert!(err.contains("psf.fits"), "{err}");
    }
}

#[test]
fn truncated_files_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes, table) = small_psf_file(dir.path());
    let cut = dir.path().join("cut.fits");
    for len in [
        0,
        100,
        2880,
        2880 + 17,
        table - 1,
        table + 2880 + 5,
        bytes.len() - 2880,
    ] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = read_psf(&cut).expect_err(&format!("truncated to {len} bytes"));
        assert!(err.to_string().contains("cut.fits"), "{err}");
    }
    // Garbage is not a FITS file either.
    std::fs::write(&cut, vec![b'x'; 5000]).unwrap();
    assert!(read_psf(&cut).is_err());
    assert!(read_psf(&path).is_ok());
}

#[test]
fn missing_hdu_and_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_psf(&dir.path().join("none.fits"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none.fits") && err.contains("no such file"),
        "{err}"
    );
    if let Some(preproc) = shared_data("preproc-r0-b00.fits.gz") {
        let err = read_psf(&preproc).unwrap_err().to_string();
        assert!(err.contains("HDU XTRACE: not found"), "{err}");
    }
}

/// CAMERA is found in whichever HDU holds it, in any case; a PSF without one has none.
#[test]
fn psf_camera_is_read_from_any_hdu() {
    let dir = tempfile::tempdir().unwrap();
    let mut psf = synthetic_psf(&SynthPsfOptions {
        nfiber: 5,
        ..Default::default()
    });
    let plain = dir.path().join("plain.fits");
    write_psf(&plain, &psf).unwrap();
    assert_eq!(read_psf(&plain).unwrap().camera, None);
    // The camera written is the camera read back.
    psf.camera = Some("z3".into());
    write_psf(&plain, &psf).unwrap();
    assert_eq!(read_psf(&plain).unwrap().camera.as_deref(), Some("z3"));
    // Without one, its IN_PSF card in the PSF HDU, and the traces' PSFTYPE card, are replaced
    // by one.
    psf.camera = None;
    psf.in_psf = Some("placeholder".into());
    write_psf(&plain, &psf).unwrap();
    let bytes = std::fs::read(&plain).unwrap();
    let card = |key: &str| {
        let pat = format!("{key:<8}= ");
        bytes
            .windows(10)
            .position(|w| w == pat.as_bytes())
            .unwrap_or_else(|| panic!("no {key} card"))
    };
    let with = |at: usize, value: &str| {
        let mut b = bytes.clone();
        let c = format!("{:<80}", format!("CAMERA  = {value}"));
        b[at..at + 80].copy_from_slice(c.as_bytes());
        let path = dir.path().join("camera.fits");
        std::fs::write(&path, b).unwrap();
        read_psf(&path).unwrap().camera
    };
    assert_eq!(with(card("IN_PSF"), "'B1      '").as_deref(), Some("b1"));
    assert_eq!(with(card("PSFTYPE"), "'z7'").as_deref(), Some("z7"));
}
