//! Preproc images (docs/formats.md; their treatment: docs/science.md §4): IMAGE, IVAR, MASK
//! (often RICE tile-compressed) and an optional FIBERMAP, read by EXTNAME into f64 with masked
//! and non-finite pixels given ivar 0; and a writer in the same layout for simulations and
//! tests.

use std::path::Path;

use ndarray::Array2;

use super::fits::{Elem, Fits, MAX_ELEMENTS};
use super::{write_atomic, IoError};
use crate::psf::MAX_NPIX;

/// Mask bits that zero a pixel's ivar before extraction: desispec ccdmask BAD, HOT, DEAD,
/// SATURATED, COSMIC, PIXFLATZERO, PIXFLATLOW, HIGHVAR, BADAMP (not BADREADNOISE).
pub const EXTRACT_MASK_BITS: i32 = 0x2FF;

/// A preproc image ready for extraction, in f64.
#[derive(Debug, Clone)]
pub struct Preproc {
    /// Pixel values (electrons), `[NPIX_Y, NPIX_X]`; 0 where the input was not finite.
    pub image: Array2<f64>,
    /// Inverse variance; 0 where masked or not finite.
    pub ivar: Array2<f64>,
    /// The MASK HDU as read.
    pub mask: Array2<i32>,
    /// Raw 80-character cards of the IMAGE HDU, without structural keys, for the frame header.
    pub header: Vec<String>,
    /// The IMAGE HDU's CAMERA (`r0`), as [`super::camera_name`] gives it; `None` without one.
    pub camera: Option<String>,
    /// Rows of the file's FIBERMAP, `None` if it has none; the table was checked readable by
    /// `check_fibermap`.
    pub fibermap_rows: Option<usize>,
    /// Pixels whose IMAGE or IVAR was NaN or infinite.
    pub nonfinite: usize,
    /// Pixels whose mask has one of the extraction bits.
    pub masked_by_bits: usize,
}

/// The fibermap columns a simulation needs (desispec has about 70; only these are written).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fibermap {
    /// Fiber number.
    pub fiber: Vec<i32>,
    /// Target identifier.
    pub targetid: Vec<i64>,
    /// `TGT` or `SKY` (3 characters at most).
    pub objtype: Vec<String>,
    /// Fiber status bits (0: good).
    pub fiberstatus: Vec<i32>,
}

impl Fibermap {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.fiber.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.fiber.is_empty()
    }
}

/// Keys that describe the HDU's structure rather than the exposure; not copied into frames.
pub(crate) fn is_structural(card: &str) -> bool {
    let key = card.get(..8).unwrap_or(card).trim_end();
    const EXACT: [&str; 13] = [
        "SIMPLE", "BITPIX", "NAXIS", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "BZERO",
        "BSCALE", "CHECKSUM", "DATASUM", "TFIELDS",
    ];
    // cfitsio adds this boilerplate to every primary HDU it makes; copying it piles up copies.
    const BOILERPLATE: [&str; 2] = [
        "COMMENT   FITS (Flexible Image Transport System) format is",
        "COMMENT   and Astrophysics', volume 376, page 359; bibcode",
    ];
    EXACT.contains(&key)
        || (key.starts_with("NAXIS") && key[5..].bytes().all(|b| b.is_ascii_digit()))
        || key.starts_with('Z')
        || ["TTYPE", "TFORM"].iter().any(|p| key.starts_with(p))
        || BOILERPLATE.iter().any(|b| card.starts_with(b))
        || card.trim().is_empty()
}

/// Reads a 2-D image HDU of the expected kind (integer or floating) with its shape, converted to
/// `T` by cfitsio (which fails on values `T` cannot hold).
fn read_plane<T: Elem>(f: &mut Fits, name: &str, integer: bool) -> Result<Array2<T>, IoError> {
    f.move_to(name)?;
    let bitpix = f.image_type()?;
    if integer == (bitpix < 0) {
        let want = if integer {
            "an integer"
        } else {
            "a floating-point"
        };
        return Err(f.err(format!("expected {want} image, found BITPIX {bitpix}")));
    }
    let shape = f.image_shape()?;
    let [ny, nx] = shape[..] else {
        return Err(f.err(format!("expected a 2-D image, found shape {shape:?}")));
    };
    if !(1..=MAX_NPIX).contains(&ny) || !(1..=MAX_NPIX).contains(&nx) || ny * nx > MAX_ELEMENTS {
        return Err(f.err(format!("image shape [{ny}, {nx}] is not a plausible CCD")));
    }
    let data: Vec<T> = f.read_pixels(ny * nx)?;
    Array2::from_shape_vec((ny, nx), data).map_err(|e| f.err(e.to_string()))
}

/// Reads a preproc file, giving ivar 0 wherever `mask & extract_mask_bits != 0` (pass
/// [`EXTRACT_MASK_BITS`] for desispec's choice, `-1` for gpu_specter's "any bit").
///
/// NaN or infinite IMAGE/IVAR pixels become image 0, ivar 0 and are counted; a negative ivar
/// is an error; the three planes must have one shape.
pub fn read_preproc(path: &Path, extract_mask_bits: i32) -> Result<Preproc, IoError> {
    let mut f = Fits::open(path)?;
    let mut image: Array2<f64> = read_plane(&mut f, "IMAGE", false)?;
    let header: Vec<String> = f
        .cards()?
        .into_iter()
        .filter(|c| !is_structural(c))
        .collect();
    let camera = f.key_str("CAMERA")?.and_then(|c| super::camera_name(&c));
    let mut ivar: Array2<f64> = read_plane(&mut f, "IVAR", false)?;
    if ivar.dim() != image.dim() {
        return Err(f.err(format!(
            "shape {:?} differs from IMAGE {:?}",
            ivar.dim(),
            image.dim()
        )));
    }
    let mask: Array2<i32> = read_plane(&mut f, "MASK", true)?;
    if mask.dim() != image.dim() {
        return Err(f.err(format!(
            "shape {:?} differs from IMAGE {:?}",
            mask.dim(),
            image.dim()
        )));
    }
    let fibermap_rows = if f.try_move_to("FIBERMAP")? {
        Some(check_fibermap(&mut f)?)
    } else {
        None
    };
    f.close()?;

    let (mut nonfinite, mut negative, mut masked_by_bits) = (0usize, 0usize, 0usize);
    for ((im, iv), &m) in image.iter_mut().zip(ivar.iter_mut()).zip(mask.iter()) {
        if !im.is_finite() || !iv.is_finite() {
            nonfinite += 1;
            *im = 0.0;
            *iv = 0.0;
        }
        if *iv < 0.0 {
            negative += 1;
        }
        if m & extract_mask_bits != 0 {
            masked_by_bits += 1;
            *iv = 0.0;
        }
    }
    if negative > 0 {
        return Err(IoError::hdu(
            path,
            "IVAR",
            format!("{negative} pixels have negative ivar"),
        ));
    }
    Ok(Preproc {
        image,
        ivar,
        mask,
        header,
        camera,
        fibermap_rows,
        nonfinite,
        masked_by_bits,
    })
}

/// Checks the current HDU, a FIBERMAP, before any work is done with the file: a binary table
/// that astropy (and so desispec) can read once it is copied into a frame, with all its rows in
/// the file. Returns its row count.
fn check_fibermap(f: &mut Fits) -> Result<usize, IoError> {
    if !f.is_table()? {
        return Err(f.err("is not a binary table"));
    }
    f.check_table_header()?;
    f.check_table_complete()?;
    f.nrows()
}

/// Reads the FIBER, TARGETID, OBJTYPE and FIBERSTATUS columns of a file's FIBERMAP, `None` if
/// the file has no FIBERMAP.
pub fn read_fibermap(path: &Path) -> Result<Option<Fibermap>, IoError> {
    let mut f = Fits::open(path)?;
    if !f.try_move_to("FIBERMAP")? {
        return Ok(None);
    }
    let n = check_fibermap(&mut f)?;
    if n > MAX_ELEMENTS / 8 {
        return Err(f.err(format!("{n} rows is implausible for a fibermap")));
    }
    let c = f.need_col("FIBER")?;
    let fiber = f.read_col(c, n)?;
    let c = f.need_col("TARGETID")?;
    let targetid = f.read_col(c, n)?;
    let c = f.need_col("OBJTYPE")?;
    let objtype = f.read_col_str(c)?;
    let c = f.need_col("FIBERSTATUS")?;
    let fiberstatus = f.read_col(c, n)?;
    f.close()?;
    Ok(Some(Fibermap {
        fiber,
        targetid,
        objtype,
        fiberstatus,
    }))
}

/// Writes a preproc file atomically (replacing `path`): IMAGE f4 with `header_cards` (key,
/// FITS value text), IVAR f4, MASK i16 (RICE tile-compressed by rows if `compress_mask`), and
/// FIBERMAP if given.
pub fn write_preproc(
    path: &Path,
    image: &Array2<f32>,
    ivar: &Array2<f32>,
    mask: &Array2<i16>,
    header_cards: &[(String, String)],
    fibermap: Option<&Fibermap>,
    compress_mask: bool,
) -> Result<(), IoError> {
    let dim = image.dim();
    if ivar.dim() != dim || mask.dim() != dim {
        return Err(IoError::file(
            path,
            format!(
                "IMAGE {dim:?}, IVAR {:?}, MASK {:?} differ",
                ivar.dim(),
                mask.dim()
            ),
        ));
    }
    if let Some(fm) = fibermap {
        let n = fm.len();
        if fm.targetid.len() != n || fm.objtype.len() != n || fm.fiberstatus.len() != n {
            return Err(IoError::hdu(path, "FIBERMAP", "columns differ in length"));
        }
    }
    let shape = [dim.0, dim.1];
    write_atomic(path, true, |tmp| {
        let mut f = Fits::create(tmp)?;
        f.create_image("IMAGE", -32, &shape)?;
        for (k, v) in header_cards {
            f.put_value(k, v, "")?;
        }
        f.write_pixels(&image.iter().copied().collect::<Vec<f32>>())?;
        f.create_image("IVAR", -32, &shape)?;
        f.write_pixels(&ivar.iter().copied().collect::<Vec<f32>>())?;
        f.set_compression(compress_mask)?;
        f.create_image("MASK", 16, &shape)?;
        f.write_pixels(&mask.iter().copied().collect::<Vec<i16>>())?;
        f.set_compression(false)?;
        if let Some(fm) = fibermap {
            f.create_table(
                "FIBERMAP",
                fm.len(),
                &[
                    ("FIBER", "J"),
                    ("TARGETID", "K"),
                    ("OBJTYPE", "3A"),
                    ("FIBERSTATUS", "J"),
                ],
            )?;
            f.write_col(1, &fm.fiber)?;
            f.write_col(2, &fm.targetid)?;
            f.write_col_str(3, &fm.objtype)?;
            f.write_col(4, &fm.fiberstatus)?;
        }
        f.write_checksums()?;
        f.close()
    })
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
