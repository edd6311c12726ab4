//! Tests of the frame writer and reader.

use super::*;
use crate::io::{read_fibermap, shared_data};

fn frame(specmin: usize, nspec: usize, nwave: usize) -> Frame {
    // Values exactly representable in f32, so the round trip is exact.
    let grid =
        |k: f64| Array2::from_shape_fn((nspec, nwave), move |(s, w)| k * (s * 1000 + w) as f64);
    Frame {
        specmin,
        wave: (0..nwave).map(|i| 5760.0 + 0.8 * i as f64).collect(),
        flux: grid(0.5),
        ivar: grid(0.25),
        mask: Array2::from_shape_fn(
            (nspec, nwave),
            |(s, w)| if (s + w) % 7 == 0 { 3 } else { 0 },
        ),
        resolution: Array3::from_shape_fn((nspec, 11, nwave), |(s, d, w)| {
            (s + d + w) as f64 / 64.0
        }),
        chi2pix: grid(0.125),
    }
}

fn model_image(pixels: &Array2<f64>) -> ModelImage<'_> {
    ModelImage {
        pixels,
        flux: "deconvolved",
        specmin: 0,
        nspec: 2,
        wave: &[5760.0, 5760.8],
    }
}

fn meta() -> FrameMeta {
    FrameMeta {
        header: vec![
            format!("{:<80}", "CAMERA  = 'r0'               / camera"),
            format!("{:<80}", "FLAVOR  = 'science'          / exposure flavor"),
            format!(
                "{:<80}",
                "IN_PSF  = 'old-psf.fits'     / from the preproc header"
            ),
            format!("{:<80}", "DEPNAM00= 'python  '"),
            format!("{:<80}", "DEPVER00= '3.11    '"),
            format!(
                "{:<80}",
                "NAXIS1  =                 4114 / must not be copied"
            ),
        ],
        in_psf: "psf.fits".into(),
        in_img: "preproc.fits".into(),
        orig_psf: Some("psfnight.fits".into()),
        fibermap_from: None,
        extra: vec![("PSFERR".into(), "0.01".into(), "PSF error used".into())],
    }
}

#[test]
fn frame_round_trips_with_desispec_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.fits");
    let fr = frame(25, 3, 10);
    write_frame(&path, &fr, &meta(), false).unwrap();
    assert_eq!(read_frame(&path).unwrap(), fr);

    let mut f = Fits::open(&path).unwrap();
    let cards = f.cards().unwrap();
    let count = |k: &str| cards.iter().filter(|c| c.starts_with(k)).count();
    assert_eq!(count("IN_PSF  = 'psf.fits'"), 1, "{cards:#?}");
    assert_eq!(count("IN_PSF"), 1);
    assert_eq!(count("NAXIS1  =                   10"), 1);
    assert_eq!(count("FLAVOR  = 'science'"), 1);
    assert_eq!(count("DEPNAM00= 'python"), 1);
    assert_eq!(count("DEPNAM01= 'spextract'"), 1);
    assert_eq!(count("PSFERR  =                 0.01"), 1);
    assert_eq!(count("CHECKSUM"), 1);
    assert_eq!(f.key_str("SPECTER").unwrap().unwrap(), program_version());
    assert_eq!(f.key_str("ORIG_PSF").unwrap().unwrap(), "psfnight.fits");
    assert_eq!(f.key_str("BUNIT").unwrap().unwrap(), "electron/Angstrom");
    assert_eq!(f.key_i64("NSPEC").unwrap(), Some(3));
    let step = f.key_f64("WAVESTEP").unwrap().unwrap();
    assert!((step - 0.8).abs() < 1e-12, "{step}");
    assert_eq!(f.num_hdus().unwrap(), 6);
    for name in [
        "FLUX",
        "IVAR",
        "MASK",
        "WAVELENGTH",
        "RESOLUTION",
        "CHI2PIX",
    ] {
        f.move_to(name).unwrap();
    }
    f.move_to("MASK").unwrap();
    assert_eq!(f.key_i64("BITPIX").unwrap(), Some(32));
    assert_eq!(f.key_f64("BZERO").unwrap(), Some(2147483648.0));
}

#[test]
fn refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.fits");
    write_frame(&path, &frame(0, 2, 5), &meta(), false).unwrap();
    let err = write_frame(&path, &frame(0, 4, 5), &meta(), false).unwrap_err();
    assert!(matches!(err, IoError::Exists { .. }), "{err}");
    assert_eq!(read_frame(&path).unwrap().nspec(), 2);
    write_frame(&path, &frame(0, 4, 5), &meta(), true).unwrap();
    assert_eq!(read_frame(&path).unwrap().nspec(), 4);
    let pixels = Array2::from_elem((4, 3), 2.5);
    let model = model_image(&pixels);
    write_model_image(&dir.path().join("model.fits"), &model, false).unwrap();
    assert!(write_model_image(&dir.path().join("model.fits"), &model, false).is_err());
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.fits");
    let mut m = meta();
    m.fibermap_from = Some(dir.path().join("missing-preproc.fits"));
    let err = write_frame(&path, &frame(0, 2, 5), &m, false).unwrap_err();
    assert!(err.to_string().contains("missing-preproc.fits"), "{err}");
    let mut bad = frame(0, 2, 5);
    bad.wave.pop();
    assert!(write_frame(&path, &bad, &meta(), false).is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn fibermap_rows_of_the_extracted_fibers_are_copied() {
    let Some(preproc) = shared_data("preproc-r0-b00.fits.gz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (specmin, nspec) in [(0, 25), (100, 5), (495, 5)] {
        let path = dir.path().join(format!("frame-{specmin}.fits"));
        let mut m = meta();
        m.fibermap_from = Some(preproc.clone());
        write_frame(&path, &frame(specmin, nspec, 4), &m, false).unwrap();
        let fm = read_fibermap(&path).unwrap().unwrap();
        let want: Vec<i32> = (specmin as i32..(specmin + nspec) as i32).collect();
        assert_eq!(fm.fiber, want);
        assert_eq!(fm.targetid[0], 1_000_000 + specmin as i64);
    }
    let mut m = meta();
    m.fibermap_from = Some(preproc);
    let err = write_frame(&dir.path().join("x.fits"), &frame(490, 20, 4), &m, false).unwrap_err();
    assert!(err.to_string().contains("has 500 rows"), "{err}");
}

#[test]
fn reads_gpu_specter_frame() {
    let Some(path) = shared_data("frame-r0-b00-gpu_specter.fits") else {
        return;
    };
    let fr = read_frame(&path).unwrap();
    assert_eq!(fr.flux.dim(), (25, 2326));
    assert_eq!(fr.resolution.dim(), (25, 11, 2326));
    assert_eq!((fr.specmin, fr.wave[0], fr.wave[1]), (0, 5760.0, 5760.8));
    // Python fitsio: FLUX[3, 1000], IVAR[3, 1000], RESOLUTION[3, 5, 1000], CHI2PIX[3, 1000].
    assert_eq!(fr.flux[(3, 1000)], 350.9696044921875);
    assert_eq!(fr.ivar[(3, 1000)], 0.001946542295627296);
    assert_eq!(fr.resolution[(3, 5, 1000)], 0.49842196702957153);
    assert_eq!(fr.chi2pix[(3, 1000)], 0.6521166563034058);
    assert!(fr.mask.iter().all(|&m| m <= 1));
}

#[test]
fn long_string_keys_from_the_input_are_replaced_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre.fits");
    let old = format!("'{}/old-psf.fits'", "o".repeat(120));
    let z = Array2::<f32>::zeros((2, 2));
    let cards = [
        ("IN_PSF".to_string(), old),
        ("FLAVOR".to_string(), "'science'".into()),
    ];
    crate::io::write_preproc(&pre, &z, &z, &Array2::zeros((2, 2)), &cards, None, false).unwrap();
    let header = crate::io::read_preproc(&pre, 0).unwrap().header;
    assert!(header.iter().any(|c| c.starts_with("CONTINUE")));

    let path = dir.path().join("frame.fits");
    let m = FrameMeta {
        header,
        in_psf: format!("{}/new-psf.fits", "n".repeat(100)),
        ..meta()
    };
    write_frame(&path, &frame(0, 1, 3), &m, false).unwrap();
    let mut f = Fits::open(&path).unwrap();
    assert_eq!(f.key_str("IN_PSF").unwrap().unwrap(), m.in_psf);
    let cards = f.cards().unwrap();
    assert!(!cards.iter().any(|c| c.contains("ooo")), "{cards:#?}");
    assert_eq!(f.key_str("FLAVOR").unwrap().as_deref(), Some("science"));
}

/// A frame and its model image are one set: a model image that cannot be written takes the
/// frame with it, and the error says so (issue 12, item 14).
#[test]
fn a_frame_lands_only_with_its_model_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.fits");
    let pixels = Array2::from_elem((4, 3), 2.5);
    let model = model_image(&pixels);
    let nowhere = dir.path().join("no-such-folder/model.fits");
    let err = write_frame_set(
        &path,
        &frame(0, 2, 5),
        &meta(),
        Some((&nowhere, &model)),
        false,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IoError::Set { .. }), "{msg}");
    assert!(msg.starts_with(&nowhere.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!(
            "so the frame {} was not written either",
            path.display()
        )),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // The same file twice is refused before any work.
    let err = write_frame_set(
        &path,
        &frame(0, 2, 5),
        &meta(),
        Some((&dir.path().join("./frame.fits"), &model)),
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("the same file"), "{err}");
    assert!(!path.exists());

    let m = dir.path().join("model.fits");
    write_frame_set(&path, &frame(0, 2, 5), &meta(), Some((&m, &model)), false).unwrap();
    assert_eq!(read_frame(&path).unwrap().nspec(), 2);
    // An existing model image stops both, before any work.
    let other = dir.path().join("other.fits");
    let err =
        write_frame_set(&other, &frame(0, 2, 5), &meta(), Some((&m, &model)), false).unwrap_err();
    assert!(matches!(err, IoError::Exists { .. }), "{err}");
    assert!(!other.exists());
}

#[test]
fn frame_keys_are_read_back_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.fits");
    let mut m = meta();
    let long = format!("'{}'", "x/".repeat(60));
    m.extra
        .push(("IMGPATH".into(), long.clone(), "input".into()));
    write_frame(&path, &frame(7, 2, 5), &m, false).unwrap();
    let got = read_frame_keys(&path, &["FIBERMIN", "IMGPATH", "PSFERR", "NOPE"]).unwrap();
    assert_eq!(
        got,
        [
            Some("7".to_string()),
            Some(long.trim_matches('\'').to_string()),
            Some("0.01".to_string()),
            None
        ]
    );
    assert!(read_frame_keys(&dir.path().join("missing.fits"), &["FIBERMIN"]).is_err());
}

/// A model image says what it holds: which flux, which fibers, which grid; and reads back.
#[test]
fn model_image_records_flux_fibers_and_grid() {
    let dir = tempfile::tempdir().unwrap();
    let pixels = Array2::from_shape_fn((4, 3), |(y, x)| (y * 3 + x) as f64 * 0.5);
    let wave = [5760.0, 5760.8, 5761.6];
    let image = ModelImage {
        pixels: &pixels,
        flux: "decorrelated",
        specmin: 7,
        nspec: 3,
        wave: &wave,
    };
    let path = dir.path().join("model.fits");
    write_model_image(&path, &image, false).unwrap();
    let back = read_model_image(&path).unwrap();
    assert_eq!(back.pixels, pixels);
    assert_eq!(back.flux.as_deref(), Some("decorrelated"));
    assert_eq!((back.specmin, back.nspec), (Some(7), Some(3)));
    let mut f = Fits::open(&path).unwrap();
    f.move_to("MODEL").unwrap();
    assert_eq!(f.key_f64("WAVEMIN").unwrap(), Some(5760.0));
    assert_eq!(f.key_f64("WAVEMAX").unwrap(), Some(5761.6));
    let cards = f.cards().unwrap().join("\n");
    assert!(cards.contains("not extracted (neighbours)"), "{cards}");
}
