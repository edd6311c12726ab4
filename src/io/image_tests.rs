//! Tests of the preproc reader and writer.

use super::*;
use crate::io::shared_data;

#[test]
fn reads_the_real_gzipped_preproc() {
    let Some(path) = shared_data("preproc-r0-b00.fits.gz") else {
        return;
    };
    let p = read_preproc(&path, EXTRACT_MASK_BITS).unwrap();
    assert_eq!(p.image.dim(), (4128, 4114));
    assert_eq!(p.fibermap_rows, Some(500));
    assert_eq!(p.nonfinite, 0);
    // Python: (fitsio.FITS(path)['MASK'].read() & 0x2FF != 0).sum() == 209 (all COSMIC, 16).
    assert_eq!(p.masked_by_bits, 209);
    assert_eq!(p.mask.iter().filter(|&&m| m == 16).count(), 209);
    assert!(p
        .mask
        .iter()
        .zip(p.ivar.iter())
        .all(|(&m, &iv)| m == 0 || iv == 0.0));
    // Python: img[2000, 100], ivar[2000, 100] as float.
    assert_eq!(p.image[(2000, 100)], -3.0304813385009766);
    assert_eq!(p.ivar[(2000, 100)], 0.1111111119389534);
    assert!(p.header.iter().any(|c| c.starts_with("FLAVOR  = 'science")));
    assert!(p.header.iter().any(|c| c.starts_with("CAMERA  = 'r0")));
    assert_eq!(p.camera.as_deref(), Some("r0"));
    for key in ["SIMPLE", "BITPIX", "NAXIS1", "EXTNAME", "EXTEND"] {
        assert!(!p.header.iter().any(|c| c.starts_with(key)), "{key} copied");
    }
    assert!(p.header.iter().all(|c| c.len() <= 80));
    let fm = read_fibermap(&path).unwrap().unwrap();
    assert_eq!(fm.len(), 500);
    assert_eq!(
        (fm.fiber[7], fm.targetid[7], fm.objtype[7].as_str()),
        (7, 1000007, "TGT")
    );
}

fn small() -> (Array2<f32>, Array2<f32>, Array2<i16>) {
    let image = Array2::from_shape_fn((30, 20), |(y, x)| (y * 20 + x) as f32);
    let ivar = Array2::from_elem((30, 20), 0.5f32);
    let mut mask = Array2::zeros((30, 20));
    mask[(3, 4)] = 16; // COSMIC: an extraction bit
    mask[(5, 6)] = 1024; // BADREADNOISE: not one
    mask[(7, 8)] = -32768; // the sign bit of int16
    (image, ivar, mask)
}

#[test]
fn written_preproc_reads_back_with_masks_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pre.fits");
    let (mut image, ivar, mask) = small();
    image[(1, 1)] = f32::NAN;
    image[(2, 2)] = f32::INFINITY;
    let fm = Fibermap {
        fiber: vec![0, 1, 2],
        targetid: vec![10, 11, 1 << 40],
        objtype: vec!["TGT".into(), "SKY".into(), "TGT".into()],
        fiberstatus: vec![0, 0, 4],
    };
    let cards = vec![
        ("CAMERA".to_string(), "'r0'".to_string()),
        ("EXPID".to_string(), "42".to_string()),
        ("SIMULATD".to_string(), "T".to_string()),
    ];
    write_preproc(&path, &image, &ivar, &mask, &cards, Some(&fm), true).unwrap();
    let raw = std::fs::read(&path).unwrap();
    assert!(
        raw.windows(19).any(|w| w == b"ZCMPTYPE= 'RICE_1  "),
        "MASK not compressed"
    );

    let p = read_preproc(&path, EXTRACT_MASK_BITS).unwrap();
    assert_eq!(p.nonfinite, 2);
    assert_eq!(
        (p.image[(1, 1)], p.ivar[(1, 1)], p.ivar[(2, 2)]),
        (0.0, 0.0, 0.0)
    );
    // 0x8000 (as i32 0xFFFF8000) shares no bit with 0x2FF: only the COSMIC pixel counts.
    assert_eq!(p.masked_by_bits, 1);
    assert_eq!(p.ivar[(3, 4)], 0.0);
    assert_eq!(p.ivar[(5, 6)], 0.5);
    assert_eq!(p.mask[(7, 8)], -32768);
    assert_eq!(p.image[(29, 19)], 599.0);
    assert_eq!(p.fibermap_rows, Some(3));
    assert!(p.header.iter().any(|c| c.starts_with("CAMERA  = 'r0")));
    assert_eq!(p.camera.as_deref(), Some("r0"));
    assert!(p
        .header
        .iter()
        .any(|c| c.starts_with("SIMULATD=                    T")));
    assert_eq!(read_fibermap(&path).unwrap().unwrap(), fm);

    // gpu_specter's rule: any bit.
    assert_eq!(read_preproc(&path, -1).unwrap().masked_by_bits, 3);
}

#[test]
fn negative_ivar_is_an_error_with_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neg.fits");
    let (image, mut ivar, mask) = small();
    ivar[(0, 0)] = -1.0;
    ivar[(9, 9)] = -2.0;
    write_preproc(&path, &image, &ivar, &mask, &[], None, false).unwrap();
    let err = read_preproc(&path, EXTRACT_MASK_BITS)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("neg.fits") && err.contains("IVAR") && err.contains("2 pixels"),
        "{err}"
    );
    assert!(read_preproc(&path, 0).is_err());
    assert!(read_fibermap(&path).unwrap().is_none());
}

#[test]
fn mismatched_shapes_and_types_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.fits");
    let write = |ivar_shape: [usize; 2], mask_bitpix: i32| {
        let _ = std::fs::remove_file(&path);
        let mut f = Fits::create(&path).unwrap();
        f.create_image("IMAGE", -32, &[4, 5]).unwrap();
        f.write_pixels(&[1.0f32; 20]).unwrap();
        f.create_image("IVAR", -32, &ivar_shape).unwrap();
        f.write_pixels(&vec![1.0f32; ivar_shape[0] * ivar_shape[1]])
            .unwrap();
        f.create_image("MASK", mask_bitpix, &[4, 5]).unwrap();
        f.write_pixels(&[0i32; 20]).unwrap();
        f.close().unwrap();
        read_preproc(&path, EXTRACT_MASK_BITS)
            .unwrap_err()
            .to_string()
    };
    let err = write([5, 4], 16);
    assert!(
        err.contains("HDU IVAR") && err.contains("differs from IMAGE"),
        "{err}"
    );
    let err = write([4, 5], -32);
    assert!(
        err.contains("HDU MASK") && err.contains("expected an integer image"),
        "{err}"
    );
}

/// An integer IMAGE is refused in plain English; a file without CAMERA reads with none.
#[test]
fn integer_image_is_refused_and_camera_may_be_absent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("int.fits");
    let mut f = Fits::create(&path).unwrap();
    f.create_image("IMAGE", 16, &[4, 5]).unwrap();
    f.write_pixels(&[1i16; 20]).unwrap();
    f.close().unwrap();
    let err = read_preproc(&path, EXTRACT_MASK_BITS)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HDU IMAGE: expected a floating-point image, found BITPIX 16"),
        "{err}"
    );
    let (image, ivar, mask) = small();
    let plain = dir.path().join("nocamera.fits");
    write_preproc(&plain, &image, &ivar, &mask, &[], None, false).unwrap();
    assert_eq!(
        read_preproc(&plain, EXTRACT_MASK_BITS).unwrap().camera,
        None
    );
}

#[test]
fn missing_mask_hdu_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nomask.fits");
    let mut f = Fits::create(&path).unwrap();
    f.create_image("IMAGE", -32, &[4, 5]).unwrap();
    f.write_pixels(&[1.0f32; 20]).unwrap();
    f.create_image("IVAR", -32, &[4, 5]).unwrap();
    f.write_pixels(&[1.0f32; 20]).unwrap();
    f.close().unwrap();
    let err = read_preproc(&path, EXTRACT_MASK_BITS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nomask.fits: HDU MASK: not found"), "{err}");
}

#[test]
fn truncated_gzipped_preproc_is_an_error() {
    let Some(path) = shared_data("preproc-r0-b00.fits.gz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.fits.gz");
    let bytes = std::fs::read(&path).unwrap();
    for len in [10, bytes.len() / 2, bytes.len() - 100] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = read_preproc(&cut, EXTRACT_MASK_BITS).expect_err(&format!("{len} bytes"));
        assert!(err.to_string().contains("cut.fits.gz"), "{err}");
    }
}
