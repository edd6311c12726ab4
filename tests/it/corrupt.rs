//! Corrupt inputs that used to pass, or fail with a wrong message (issue 12, items 10, 11, 12
//! and 14): a FIBERMAP that is corrupt, unreadable by astropy, too short or cut off; a gzip
//! missing its trailer, ten bytes long, or a bomb; an HDU whose header cannot be parsed. Each
//! must exit 2 before any extraction, with a message that says what is wrong, and leave no
//! output.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use spextract::io::write_preproc;

use crate::common::{assert_no_output, find, patch_card, small_ccd, Run, SmallCcd, SMALL_GRID};

/// Runs `extract` of the small CCD's grid (fibers 5..15) with `image` into `dir/out.fits`.
fn extract(dir: &Path, ccd: &SmallCcd, image: &Path) -> (Run, PathBuf) {
    let out = dir.join("out.fits");
    let run = run!(
        "extract", "-p", ccd.psf, "-i", image, "-o", out, "-w", SMALL_GRID, "-s", "5", "-n", "10"
    );
    (run, out)
}

/// Asserts that the run failed with every one of `needles` before extracting anything.
#[track_caller]
fn refused_before_work(run: &Run, out: &Path, needles: &[&str]) {
    run.fails_with(needles);
    assert!(
        !run.stderr.contains("patches"),
        "extraction ran before the refusal:\n{}",
        run.stderr
    );
    assert_no_output(out);
}

/// The small CCD's preproc bytes with `edit` applied, written to `dir/name`.
fn edited(dir: &Path, ccd: &SmallCcd, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(&ccd.image).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// Byte offset of the header block holding `EXTNAME = 'name`.
fn header_of(bytes: &[u8], name: &str) -> usize {
    let at = find(bytes, format!("EXTNAME = '{name}").as_bytes()).expect("the EXTNAME card");
    at - at % 2880
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_fibermap_cfitsio_cannot_parse_is_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let path = edited(dir.path(), &ccd, "tform.fits", |b| {
        let at = header_of(b, "FIBERMAP");
        patch_card(b, at, "TFORM2", "'abc'");
    });
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(
        &run,
        &out,
        &["tform.fits", "HDU FIBERMAP", "cannot be read", "NAXIS1"],
    );
}

#[test]
fn a_fibermap_astropy_cannot_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    for (key, value, why) in [
        ("TTYPE2", "5", "TTYPE2 = 5 is not a column name"),
        (
            "TTYPE2",
            "'FIBER'",
            "TTYPE2 = 'FIBER' repeats another column's name",
        ),
        ("TTYPE3", "''", "TTYPE3 = '' is not a column name"),
        (
            "PCOUNT",
            "",
            "header key PCOUNT: cfitsio status 204 (keyword value is undefined)",
        ),
        (
            "TFORM1",
            "'J' S",
            "(TFORM1) has a value astropy cannot parse: 'J' S",
        ),
    ] {
        let path = edited(dir.path(), &ccd, "ttype.fits", |b| {
            let at = header_of(b, "FIBERMAP");
            patch_card(b, at, key, value);
        });
        let (run, out) = extract(dir.path(), &ccd, &path);
        refused_before_work(&run, &out, &["ttype.fits", "HDU FIBERMAP", why]);
    }
}

#[test]
fn a_fibermap_whose_heap_runs_past_the_file_is_refused_before_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    // cfitsio used to abort ("buffer overflow detected") copying this table into the frame.
    for (pcount, why) in [
        ("1000000", "its data runs to byte"),
        (
            "9223372036854775807",
            "PCOUNT = 9223372036854775807 is not an integer",
        ),
    ] {
        let path = edited(dir.path(), &ccd, "heap.fits", |b| {
            let at = header_of(b, "FIBERMAP");
            patch_card(b, at, "PCOUNT", pcount);
        });
        let (run, out) = extract(dir.path(), &ccd, &path);
        refused_before_work(&run, &out, &["heap.fits", "HDU FIBERMAP", why]);
    }
}

#[test]
fn a_fibermap_too_short_for_the_fibers_is_refused_before_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let mut fm = ccd.sim.fibermap.clone();
    fm.fiber.truncate(10);
    fm.targetid.truncate(10);
    fm.objtype.truncate(10);
    fm.fiberstatus.truncate(10);
    let path = dir.path().join("short-fibermap.fits");
    let s = &ccd.sim;
    write_preproc(
        &path,
        &s.image,
        &s.ivar,
        &s.mask,
        &s.header,
        Some(&fm),
        true,
    )
    .unwrap();
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(
        &run,
        &out,
        &[
            "short-fibermap.fits",
            "HDU FIBERMAP",
            "has 10 rows; fibers 5..15",
        ],
    );
}

#[test]
fn a_file_cut_inside_the_fibermap_header_is_not_read_as_having_none() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let path = edited(dir.path(), &ccd, "cut.fits", |b| {
        let at = header_of(b, "FIBERMAP");
        b.truncate(at + 1000);
    });
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(&run, &out, &["cut.fits", "HDU FIBERMAP", "truncated"]);
}

#[test]
fn a_gzip_missing_its_trailer_or_all_but_its_start_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    let gz = gzip(&std::fs::read(&ccd.image).unwrap());
    let path = dir.path().join("cut.fits.gz");
    for keep in [gz.len() - 1, gz.len() - 4, gz.len() - 8, 10] {
        std::fs::write(&path, &gz[..keep]).unwrap();
        let (run, out) = extract(dir.path(), &ccd, &path);
        refused_before_work(&run, &out, &["cut.fits.gz", "gzip stream ends early"]);
        assert!(!run.stderr.contains("allocate"), "{}", run.stderr);
    }
    // The whole stream reads.
    std::fs::write(&path, &gz).unwrap();
    let (run, out) = extract(dir.path(), &ccd, &path);
    run.ok();
    assert!(out.is_file());
}

#[test]
fn a_gzip_bomb_is_refused_from_its_declared_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    // IMAGE declares 40000 x 40000 f4 pixels (6.4 GB) and 1.2 GB of zeros follow, in a file
    // of about 1 MB: 1200 gzip members of 1 MiB of zeros each.
    let mut bytes = std::fs::read(&ccd.image).unwrap();
    patch_card(&mut bytes, 0, "NAXIS1", "40000");
    patch_card(&mut bytes, 0, "NAXIS2", "40000");
    let mut bomb = gzip(&bytes);
    let zeros = gzip(&vec![0u8; 1 << 20]);
    for _ in 0..1200 {
        bomb.extend_from_slice(&zeros);
    }
    let path = dir.path().join("bomb.fits.gz");
    std::fs::write(&path, &bomb).unwrap();
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(
        &run,
        &out,
        &[
            "bomb.fits.gz",
            "HDU 0: declares 6400000000 bytes",
            "may inflate to at most",
        ],
    );
}

#[test]
fn an_hdu_whose_header_cannot_be_parsed_is_not_called_missing() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = small_ccd(dir.path());
    // MASK is tile-compressed: a binary table to cfitsio, whose BITPIX must be 8.
    let path = edited(dir.path(), &ccd, "bitpix.fits", |b| {
        let at = header_of(b, "MASK");
        patch_card(b, at, "BITPIX", "7");
    });
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(
        &run,
        &out,
        &[
            "bitpix.fits",
            "HDU MASK",
            "its header (HDU number 2) cannot be read",
            "BITPIX = 7",
        ],
    );
    assert!(!run.stderr.contains("not found"), "{}", run.stderr);
    // A corrupt IVAR stops the search for MASK behind it, and says so.
    let path = edited(dir.path(), &ccd, "naxis.fits", |b| {
        let at = header_of(b, "IVAR");
        patch_card(b, at, "NAXIS1", "'x'");
    });
    let (run, out) = extract(dir.path(), &ccd, &path);
    refused_before_work(
        &run,
        &out,
        &["naxis.fits", "HDU IVAR", "NAXIS1 = 'x' is not a count"],
    );
}
