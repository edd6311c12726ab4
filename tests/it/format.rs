//! The written frame (docs/formats.md): HDU order, types and shapes, read three ways: by a
//! FITS header walker written here (independent of cfitsio), and, when Python has them, by
//! `fitsio` and `astropy.io.fits` with checksum verification.

use std::path::Path;
use std::process::Command;

use crate::common::{python_has, small_ccd, SmallCcd, SMALL_GRID};

/// One HDU's header as (key, value text) cards.
struct Hdu {
    cards: Vec<(String, String)>,
}

impl Hdu {
    fn get(&self, key: &str) -> Option<&str> {
        self.cards
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn int(&self, key: &str) -> i64 {
        let v = self.get(key).unwrap_or_else(|| panic!("no {key}"));
        v.parse().unwrap_or_else(|_| panic!("{key} = {v:?}"))
    }

    fn string(&self, key: &str) -> String {
        let v = self.get(key).unwrap_or_else(|| panic!("no {key}"));
        v.trim_matches('\'').trim_end().to_string()
    }

    /// NAXISn, slowest first (numpy order).
    fn shape(&self) -> Vec<usize> {
        let n = self.int("NAXIS");
        (1..=n)
            .rev()
            .map(|i| self.int(&format!("NAXIS{i}")) as usize)
            .collect()
    }

    fn name(&self) -> String {
        self.get("EXTNAME")
            .map(|_| self.string("EXTNAME"))
            .unwrap_or_default()
    }
}

/// Splits a FITS file into HDU headers, checking that each data unit (BITPIX, NAXISn, PCOUNT,
/// GCOUNT) fits the file and that the file ends exactly after the last one.
fn walk(bytes: &[u8]) -> Vec<Hdu> {
    assert_eq!(
        bytes.len() % 2880,
        0,
        "size {} is not whole blocks",
        bytes.len()
    );
    let mut hdus = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let mut cards = Vec::new();
        loop {
            let card = std::str::from_utf8(&bytes[pos..pos + 80]).expect("ASCII header");
            pos += 80;
            let key = card[..8].trim_end().to_string();
            if key == "END" {
                break;
            }
            if card.get(8..10) == Some("= ") {
                let value = card[10..].split(" /").next().unwrap().trim().to_string();
                cards.push((key, value));
            }
            assert!(pos < bytes.len(), "header runs off the end");
        }
        pos = pos.div_ceil(2880) * 2880;
        let h = Hdu { cards };
        let naxis = h.int("NAXIS");
        let elems: usize = if naxis == 0 {
            0
        } else {
            h.shape().iter().product()
        };
        let pcount = h.get("PCOUNT").map_or(0, |_| h.int("PCOUNT")) as usize;
        let gcount = h.get("GCOUNT").map_or(1, |_| h.int("GCOUNT")) as usize;
        let size = (h.int("BITPIX").unsigned_abs() as usize / 8) * gcount * (pcount + elems);
        pos += size.div_ceil(2880) * 2880;
        assert!(
            pos <= bytes.len(),
            "data of HDU {} runs off the end",
            hdus.len()
        );
        hdus.push(h);
    }
    hdus
}

/// (EXTNAME, BITPIX, shape) expected for a frame of `nspec` x `nwave` with `ndia` diagonals.
fn expected(
    nspec: usize,
    nwave: usize,
    ndia: usize,
    fibermap: bool,
) -> Vec<(&'static str, i64, Vec<usize>)> {
    let mut v = vec![
        ("FLUX", -32, vec![nspec, nwave]),
        ("IVAR", -32, vec![nspec, nwave]),
        ("MASK", 32, vec![nspec, nwave]),
        ("WAVELENGTH", -64, vec![nwave]),
        ("RESOLUTION", -32, vec![nspec, ndia, nwave]),
    ];
    if fibermap {
        v.push(("FIBERMAP", 8, vec![nspec]));
    }
    v.push(("CHI2PIX", -32, vec![nspec, nwave]));
    v
}

/// Checks the frame's structure with the header walker.
fn check_layout(path: &Path, nspec: usize, nwave: usize, fibermap: bool) {
    let hdus = walk(&std::fs::read(path).unwrap());
    let want = expected(nspec, nwave, 11, fibermap);
    let names: Vec<String> = hdus.iter().map(Hdu::name).collect();
    let want_names: Vec<&str> = want.iter().map(|w| w.0).collect();
    assert_eq!(names, want_names);
    for (h, (name, bitpix, shape)) in hdus.iter().zip(&want) {
        assert_eq!(h.int("BITPIX"), *bitpix, "{name} BITPIX");
        if *name == "FIBERMAP" {
            assert_eq!(h.string("XTENSION"), "BINTABLE");
            assert_eq!(h.int("NAXIS2") as usize, shape[0], "FIBERMAP rows");
        } else {
            assert_eq!(&h.shape(), shape, "{name} shape");
        }
        assert!(
            h.get("CHECKSUM").is_some() && h.get("DATASUM").is_some(),
            "{name} checksums"
        );
    }
    assert_eq!(hdus[0].get("SIMPLE"), Some("T"));
    // MASK is a u4 image: BITPIX 32 offset by 2^31.
    assert_eq!(hdus[2].get("BZERO"), Some("2147483648"));
    let flux = &hdus[0];
    assert_eq!(flux.int("NSPEC") as usize, nspec);
    assert_eq!(flux.string("BUNIT"), "electron/Angstrom");
    assert_eq!(
        flux.string("FLAVOR"),
        "science",
        "input IMAGE header copied"
    );
    assert_eq!(flux.string("CAMERA"), "r0");
    assert!(flux.string("SPECTER").starts_with("spextract"));
    for key in [
        "WAVEMIN", "WAVEMAX", "WAVESTEP", "IN_PSF", "IN_IMG", "FIBERMIN",
    ] {
        assert!(flux.get(key).is_some(), "FLUX header lacks {key}");
    }
    assert_eq!(hdus[3].string("BUNIT"), "Angstrom");
}

/// Python's view of the frame: `reader EXTNAME dtype shape` lines from fitsio and astropy
/// (checksums verified, warnings are errors), and the FIBERMAP's FIBER column.
const PY: &str = r#"
import sys, warnings
warnings.simplefilter("error")
import fitsio
from astropy.io import fits
path = sys.argv[1]
def kind(dt):
    return "%s%d" % (dt.kind, dt.itemsize)
with fitsio.FITS(path) as f:
    for h in f:
        d = h.read()
        if h.get_exttype() == "IMAGE_HDU":
            print("fitsio", h.get_extname(), kind(d.dtype), ",".join(map(str, d.shape)))
        else:
            print("fitsio", h.get_extname(), "table", len(d))
            print("fiber", ",".join(str(x) for x in d["FIBER"]))
with fits.open(path, checksum=True) as hl:
    hl.verify("exception")
    for h in hl:
        if isinstance(h, fits.BinTableHDU):
            print("astropy", h.name, "table", len(h.data))
        else:
            print("astropy", h.name, kind(h.data.dtype), ",".join(map(str, h.data.shape)))
"#;

/// Checks the frame with Python's fitsio and astropy, if both import; skips with a message
/// otherwise.
fn check_with_python(path: &Path, nspec: usize, nwave: usize, fibers: Option<&[i32]>) {
    if !python_has(&["fitsio", "astropy", "numpy"]) {
        eprintln!("skipping the Python check: python3 cannot import fitsio, astropy and numpy");
        return;
    }
    let out = Command::new("python3")
        .args(["-c", PY])
        .arg(path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dtype = |bitpix: i64| match bitpix {
        -32 => "f4",
        -64 => "f8",
        32 => "u4",
        _ => "table",
    };
    for reader in ["fitsio", "astropy"] {
        let got: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix(reader).map(str::trim))
            .collect();
        let want: Vec<String> = expected(nspec, nwave, 11, fibers.is_some())
            .into_iter()
            .map(|(name, bitpix, shape)| {
                let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
                format!("{name} {} {}", dtype(bitpix), shape.join(","))
            })
            .collect();
        assert_eq!(got, want, "{reader} sees\n{stdout}");
    }
    if let Some(fibers) = fibers {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("fiber "))
            .unwrap();
        let got: Vec<i32> = line.split(',').map(|v| v.parse().unwrap()).collect();
        assert_eq!(got, fibers);
    }
}

#[test]
fn frame_with_fibermap_and_model_image() {
    let dir = tempfile::tempdir().unwrap();
    let SmallCcd { psf, image, .. } = small_ccd(dir.path());
    let (out, model) = (dir.path().join("frame.fits"), dir.path().join("model.fits"));
    run!(
        "extract", "-p", psf, "-i", image, "-o", out, "-m", model, "-w", SMALL_GRID, "-s", "5",
        "-n", "15"
    )
    .ok();
    check_layout(&out, 15, 501, true);
    check_with_python(&out, 15, 501, Some(&(5..20).collect::<Vec<i32>>()));

    let hdus = walk(&std::fs::read(&model).unwrap());
    assert_eq!(hdus.len(), 1);
    assert_eq!(hdus[0].name(), "MODEL");
    assert_eq!(
        (hdus[0].int("BITPIX"), hdus[0].shape()),
        (-32, vec![1000, 240])
    );
}

#[test]
fn frame_without_fibermap() {
    let dir = tempfile::tempdir().unwrap();
    let SmallCcd { psf, sim, .. } = small_ccd(dir.path());
    let image = dir.path().join("nofibermap.fits");
    sim.write_preproc(&image, false, false).unwrap();
    let out = dir.path().join("frame.fits");
    run!("extract", "-p", psf, "-i", image, "-o", out, "-w", SMALL_GRID).ok();
    check_layout(&out, 25, 501, false);
    check_with_python(&out, 25, 501, None);
}
