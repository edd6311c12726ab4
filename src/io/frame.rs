//! Extracted frames in desispec's layout (docs/formats.md) and the optional model image, both
//! written under a temporary name and renamed into place; and a frame reader that also accepts
//! gpu_specter's output (MASK as int64).

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3};

use super::atomic::{output_key, refuse_existing, stage, write_atomic};
use super::fits::{Elem, Fits, MAX_ELEMENTS};
use super::image::is_structural;
use super::{program_version, IoError};
use crate::psf::{MAX_HSIZE, MAX_NFIBER};

/// Most wavelength bins accepted in a frame (DESI: under 3000).
const MAX_NWAVE: usize = 1_000_000;

/// An extracted frame: `nspec` fibers from `specmin` on, `nwave` bins.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// First fiber (header FIBERMIN).
    pub specmin: usize,
    /// Wavelength grid (Å).
    pub wave: Vec<f64>,
    /// Flux `[nspec, nwave]` (electrons/Å).
    pub flux: Array2<f64>,
    /// Inverse variance of the flux.
    pub ivar: Array2<f64>,
    /// Spectral mask bits.
    pub mask: Array2<u32>,
    /// Resolution diagonals `[nspec, ndiag, nwave]`, offsets `+ndiag/2 … -ndiag/2`.
    pub resolution: Array3<f64>,
    /// Reduced chi2 of the pixels contributing to each bin.
    pub chi2pix: Array2<f64>,
}

impl Frame {
    /// Number of spectra.
    pub fn nspec(&self) -> usize {
        self.flux.nrows()
    }

    /// Checks that every array agrees with `flux` and `wave`.
    fn check(&self) -> Result<(), String> {
        let (nspec, nwave) = self.flux.dim();
        if self.wave.len() != nwave {
            return Err(format!("wave has {} bins, flux {nwave}", self.wave.len()));
        }
        for (name, dim) in [
            ("ivar", self.ivar.dim()),
            ("mask", self.mask.dim()),
            ("chi2pix", self.chi2pix.dim()),
        ] {
            if dim != (nspec, nwave) {
                return Err(format!("{name} is {dim:?}, flux ({nspec}, {nwave})"));
            }
        }
        let (rs, nd, rw) = self.resolution.dim();
        if rs != nspec || rw != nwave || nd % 2 == 0 {
            return Err(format!(
                "resolution is ({rs}, {nd}, {rw}); expected ({nspec}, odd, {nwave})"
            ));
        }
        Ok(())
    }
}

/// What a frame's header and FIBERMAP record about its inputs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FrameMeta {
    /// Cards of the input IMAGE header (`Preproc::header`), copied first.
    pub header: Vec<String>,
    /// The PSF file used (header IN_PSF).
    pub in_psf: String,
    /// The preproc file used (header IN_IMG).
    pub in_img: String,
    /// The PSF's own IN_PSF, if any (header ORIG_PSF).
    pub orig_psf: Option<String>,
    /// Preproc file whose FIBERMAP rows `[specmin, specmin + nspec)` are copied, all columns.
    pub fibermap_from: Option<PathBuf>,
    /// More FLUX header cards: key, FITS-formatted value, comment. They replace same-named keys.
    pub extra: Vec<(String, String, String)>,
}

/// Writes `frame` to `path`: FLUX, IVAR, MASK (u4), WAVELENGTH, RESOLUTION, FIBERMAP (when the
/// input has one), CHI2PIX, each with CHECKSUM/DATASUM.
///
/// An existing `path` is refused, before any work and again in the rename that puts the file in
/// place, unless `overwrite`. The file appears only when complete; on error no temporary is
/// left behind.
pub fn write_frame(
    path: &Path,
    frame: &Frame,
    meta: &FrameMeta,
    overwrite: bool,
) -> Result<(), IoError> {
    write_frame_set(path, frame, meta, None, overwrite)
}

/// Writes a frame and, when `model` is given, its model image, as one set: both are written
/// whole under temporary names before either is put in place, so that a failure while writing
/// (a full disk, say) leaves neither. Should putting the model image in place fail after the
/// frame's (another process created it meanwhile), the frame is taken out again unless it
/// replaced a file under `overwrite`; the error says which happened.
pub fn write_frame_set(
    path: &Path,
    frame: &Frame,
    meta: &FrameMeta,
    model: Option<(&Path, &ModelImage<'_>)>,
    overwrite: bool,
) -> Result<(), IoError> {
    refuse_existing(path, overwrite)?;
    if let Some((model_path, _)) = model {
        refuse_existing(model_path, overwrite)?;
        if output_key(model_path) == output_key(path) {
            return Err(IoError::file(
                model_path,
                "the model image and the frame would be the same file",
            ));
        }
    }
    frame
        .check()
        .map_err(|m| IoError::file(path, format!("inconsistent frame: {m}")))?;
    let staged_frame = stage(path, overwrite, |tmp| write_frame_hdus(tmp, frame, meta))?;
    let Some((model_path, image)) = model else {
        return staged_frame.place(overwrite).map(drop);
    };
    let together = "(a frame and its model image are written together or not at all)";
    let neither = |cause: IoError, other: &Path, what: &str| IoError::Set {
        cause: Box::new(cause),
        other: format!(
            "so the {what} {} was not written either {together}",
            other.display()
        ),
    };
    let staged_model = stage(model_path, overwrite, |tmp| {
        write_model_hdus(tmp, image, Some(meta))
    })
    .map_err(|e| neither(e, path, "frame"))?;
    let placed_frame = staged_frame
        .place(overwrite)
        .map_err(|e| neither(e, model_path, "model image"))?;
    match staged_model.place(overwrite) {
        Ok(_) => Ok(()),
        Err(e) if placed_frame.undo() => Err(neither(e, path, "frame")),
        Err(e) => Err(IoError::Set {
            cause: Box::new(e),
            other: format!(
                "the frame {} was written all the same: it replaced the file that was there \
                 (--overwrite), which cannot be put back",
                path.display()
            ),
        }),
    }
}

fn write_frame_hdus(tmp: &Path, frame: &Frame, meta: &FrameMeta) -> Result<(), IoError> {
    let mut f = Fits::create(tmp)?;
    let (nspec, nwave) = frame.flux.dim();
    f.create_image("FLUX", -32, &[nspec, nwave])?;
    write_flux_header(&mut f, frame, meta)?;
    f.write_pixels(&to_f32(frame.flux.iter()))?;
    f.create_image("IVAR", -32, &[nspec, nwave])?;
    f.write_pixels(&to_f32(frame.ivar.iter()))?;
    // BITPIX 40 makes cfitsio write BITPIX 32 with BZERO 2147483648: a u4 image.
    f.create_image("MASK", 40, &[nspec, nwave])?;
    f.write_pixels(&frame.mask.iter().copied().collect::<Vec<u32>>())?;
    f.create_image("WAVELENGTH", -64, &[nwave])?;
    f.put_str("BUNIT", "Angstrom", "")?;
    f.write_pixels(&frame.wave)?;
    let (_, ndiag, _) = frame.resolution.dim();
    f.create_image("RESOLUTION", -32, &[nspec, ndiag, nwave])?;
    f.write_pixels(&to_f32(frame.resolution.iter()))?;
    if let Some(src) = &meta.fibermap_from {
        copy_fibermap(&mut f, src, frame.specmin, nspec)?;
    }
    f.create_image("CHI2PIX", -32, &[nspec, nwave])?;
    f.write_pixels(&to_f32(frame.chi2pix.iter()))?;
    f.write_checksums()?;
    f.close()
}

fn to_f32<'a>(it: impl Iterator<Item = &'a f64>) -> Vec<f32> {
    it.map(|&v| v as f32).collect()
}

/// First and last wavelength of a grid and its step (0 for one bin), as the headers give them.
fn wave_range(wave: &[f64]) -> Option<(f64, f64, f64)> {
    let (&w0, &w1) = (wave.first()?, wave.last()?);
    let step = if wave.len() > 1 {
        (w1 - w0) / (wave.len() - 1) as f64
    } else {
        0.0
    };
    Some((w0, w1, step))
}

fn write_flux_header(f: &mut Fits, frame: &Frame, meta: &FrameMeta) -> Result<(), IoError> {
    for card in meta.header.iter().filter(|c| !is_structural(c)) {
        f.put_card(card)?;
    }
    f.put_i64("NSPEC", frame.nspec() as i64, "Number of spectra")?;
    if let Some((w0, w1, step)) = wave_range(&frame.wave) {
        f.put_f64("WAVEMIN", w0, "First wavelength [Angstroms]")?;
        f.put_f64("WAVEMAX", w1, "Last wavelength [Angstroms]")?;
        f.put_f64("WAVESTEP", step, "Wavelength step size [Angstroms]")?;
    }
    let version = program_version();
    f.put_str("SPECTER", &version, "extraction code")?;
    f.put_str("IN_PSF", &meta.in_psf, "Input spectral PSF")?;
    f.put_str("IN_IMG", &meta.in_img, "Input image")?;
    if let Some(orig) = &meta.orig_psf {
        f.put_str("ORIG_PSF", orig, "PSF the input PSF was made from")?;
    }
    f.put_i64("FIBERMIN", frame.specmin as i64, "First fiber")?;
    f.put_str("BUNIT", "electron/Angstrom", "")?;
    let nn = dependency_slot(&meta.header, "spextract");
    f.put_str(&format!("DEPNAM{nn:02}"), "spextract", "")?;
    f.put_str(&format!("DEPVER{nn:02}"), env!("CARGO_PKG_VERSION"), "")?;
    for (k, v, c) in &meta.extra {
        f.put_value(k, v, c)?;
    }
    Ok(())
}

/// The DEPNAMnn slot for `name`: its existing one, else the first free (desiutil `setdep`).
fn dependency_slot(cards: &[String], name: &str) -> usize {
    let mut used = [false; 100];
    for c in cards {
        let Some(nn) = c.get(6..8).filter(|_| c.starts_with("DEPNAM")) else {
            continue;
        };
        let Ok(nn) = nn.parse::<usize>() else {
            continue;
        };
        let value = c.get(10..).unwrap_or("").split('/').next().unwrap_or("");
        if value.trim().trim_matches('\'').trim() == name {
            return nn;
        }
        used[nn] = true;
    }
    used.iter().position(|u| !u).unwrap_or(99)
}

/// Appends the FIBERMAP of `src` (if it has one) keeping rows `[specmin, specmin + nspec)`.
fn copy_fibermap(f: &mut Fits, src: &Path, specmin: usize, nspec: usize) -> Result<(), IoError> {
    let mut input = Fits::open(src)?;
    if !input.try_move_to("FIBERMAP")? {
        return Ok(());
    }
    let nrows = input.nrows()?;
    if specmin + nspec > nrows {
        return Err(input.err(format!(
            "has {nrows} rows; fibers {specmin}..{} need more",
            specmin + nspec
        )));
    }
    f.copy_hdu_from(&mut input)?;
    f.delete_rows(specmin + nspec, nrows - specmin - nspec)?;
    f.delete_rows(0, specmin)?;
    input.close()
}

/// A model image and what it is made of, as its header records it.
#[derive(Debug, Clone, Copy)]
pub struct ModelImage<'a> {
    /// The image `[npix_y, npix_x]` (electrons).
    pub pixels: &'a Array2<f64>,
    /// What was projected through the PSF (header MODFLUX): "deconvolved", "decorrelated", or
    /// "truth" for a simulation's noiseless image.
    pub flux: &'a str,
    /// First fiber whose light is in the image (header FIBERMIN).
    pub specmin: usize,
    /// Fibers whose light is in the image (header NSPEC).
    pub nspec: usize,
    /// The wavelength grid whose bins are in the image (header WAVEMIN, WAVEMAX, WAVESTEP).
    pub wave: &'a [f64],
}

/// What MODFLUX says about each value, for the header's comment.
fn model_flux_comment(flux: &str) -> &'static str {
    match flux {
        "deconvolved" => "A.f: reproduces the pixels up to noise",
        "decorrelated" => "A.R.f: gpu_specter's model, smoothed twice",
        "truth" => "noiseless simulated image",
        _ => "flux projected through the PSF",
    }
}

/// Writes the model image (f4, one HDU named MODEL) atomically; refuses an existing `path`
/// unless `overwrite`.
pub fn write_model_image(
    path: &Path,
    model: &ModelImage<'_>,
    overwrite: bool,
) -> Result<(), IoError> {
    write_atomic(path, overwrite, |tmp| write_model_hdus(tmp, model, None))
}

fn write_model_hdus(
    tmp: &Path,
    model: &ModelImage<'_>,
    meta: Option<&FrameMeta>,
) -> Result<(), IoError> {
    let mut f = Fits::create(tmp)?;
    let (ny, nx) = model.pixels.dim();
    f.create_image("MODEL", -32, &[ny, nx])?;
    f.put_str("BUNIT", "electron", "")?;
    f.put_str("MODFLUX", model.flux, model_flux_comment(model.flux))?;
    f.put_i64(
        "FIBERMIN",
        model.specmin as i64,
        "First fiber whose light is modelled",
    )?;
    f.put_i64(
        "NSPEC",
        model.nspec as i64,
        "Fibers whose light is modelled",
    )?;
    if let Some((w0, w1, step)) = wave_range(model.wave) {
        f.put_f64("WAVEMIN", w0, "First wavelength modelled [Angstroms]")?;
        f.put_f64("WAVEMAX", w1, "Last wavelength modelled [Angstroms]")?;
        f.put_f64("WAVESTEP", step, "Wavelength step size [Angstroms]")?;
    }
    if let Some(meta) = meta {
        f.put_str("IN_PSF", &meta.in_psf, "Input spectral PSF")?;
        f.put_str("IN_IMG", &meta.in_img, "Input image")?;
    }
    f.put_str("SPECTER", &program_version(), "extraction code")?;
    for line in [
        "The light of fibers FIBERMIN..FIBERMIN+NSPEC-1 on the bins of",
        "WAVEMIN..WAVEMAX only: fibers that were not extracted (neighbours)",
        "and bins off that grid are not in it.",
    ] {
        f.put_card(&format!("COMMENT {line}"))?;
    }
    f.write_pixels(&to_f32(model.pixels.iter()))?;
    f.write_checksums()?;
    f.close()
}

/// A model image as read back: its pixels and what its header says it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelImageFile {
    /// The image `[npix_y, npix_x]` (electrons).
    pub pixels: Array2<f64>,
    /// MODFLUX, when the header has it (files written before it was recorded do not).
    pub flux: Option<String>,
    /// FIBERMIN, when present.
    pub specmin: Option<usize>,
    /// NSPEC, when present.
    pub nspec: Option<usize>,
}

/// Reads a model image (MODEL HDU) as [`write_model_image`] or `extract -m` writes it.
pub fn read_model_image(path: &Path) -> Result<ModelImageFile, IoError> {
    let mut f = Fits::open(path)?;
    let (data, shape) = read_hdu::<f64>(&mut f, "MODEL", 2, false)?;
    let pixels =
        Array2::from_shape_vec((shape[0], shape[1]), data).map_err(|e| f.err(e.to_string()))?;
    let count = |f: &mut Fits, key: &str| -> Result<Option<usize>, IoError> {
        match f.key_i64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .ok()
                .filter(|&v| v <= MAX_NFIBER)
                .map(Some)
                .ok_or_else(|| f.err(format!("{key} = {v} is not a fiber count"))),
        }
    };
    let specmin = count(&mut f, "FIBERMIN")?;
    let nspec = count(&mut f, "NSPEC")?;
    let flux = f.key_str("MODFLUX")?;
    Ok(ModelImageFile {
        pixels,
        flux,
        specmin,
        nspec,
    })
}

/// Reads an image HDU of `ndim` axes as `T`, checking its kind and size before reading.
fn read_hdu<T: Elem>(
    f: &mut Fits,
    name: &str,
    ndim: usize,
    integer: bool,
) -> Result<(Vec<T>, Vec<usize>), IoError> {
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
    let n = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if shape.len() != ndim || n.is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(f.err(format!(
            "expected a {ndim}-D image of sane size, found {shape:?}"
        )));
    }
    let data = f.read_pixels(n.unwrap_or(0))?;
    Ok((data, shape))
}

/// Reads a frame by EXTNAME: FLUX, IVAR, MASK (any integer type), WAVELENGTH, RESOLUTION and
/// CHI2PIX; FIBERMIN gives `specmin` (0 if absent).
pub fn read_frame(path: &Path) -> Result<Frame, IoError> {
    let mut f = Fits::open(path)?;
    let (flux, shape) = read_hdu::<f64>(&mut f, "FLUX", 2, false)?;
    let (nspec, nwave) = (shape[0], shape[1]);
    if nspec > MAX_NFIBER || nwave > MAX_NWAVE {
        return Err(f.err(format!("shape {shape:?} is implausible for a frame")));
    }
    let specmin = match f.key_i64("FIBERMIN")? {
        None => 0,
        Some(v) => usize::try_from(v)
            .ok()
            .filter(|&v| v < MAX_NFIBER)
            .ok_or_else(|| f.err(format!("FIBERMIN = {v} is not a fiber number")))?,
    };
    let plane = |f: &mut Fits, name: &str| -> Result<Array2<f64>, IoError> {
        let (data, s) = read_hdu::<f64>(f, name, 2, false)?;
        if s != shape {
            return Err(f.err(format!("shape {s:?} differs from FLUX {shape:?}")));
        }
        Array2::from_shape_vec((nspec, nwave), data).map_err(|e| f.err(e.to_string()))
    };
    let flux = Array2::from_shape_vec((nspec, nwave), flux).map_err(|e| f.err(e.to_string()))?;
    let ivar = plane(&mut f, "IVAR")?;
    let chi2pix = plane(&mut f, "CHI2PIX")?;
    let (m, s) = read_hdu::<i64>(&mut f, "MASK", 2, true)?;
    if s != shape {
        return Err(f.err(format!("shape {s:?} differs from FLUX {shape:?}")));
    }
    let m = m
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| f.err(format!("mask value {v} is not a u32"))))
        .collect::<Result<Vec<u32>, _>>()?;
    let mask = Array2::from_shape_vec((nspec, nwave), m).map_err(|e| f.err(e.to_string()))?;
    let (wave, s) = read_hdu::<f64>(&mut f, "WAVELENGTH", 1, false)?;
    if s != [nwave] {
        return Err(f.err(format!("has {s:?} bins, FLUX {nwave}")));
    }
    let (res, s) = read_hdu::<f64>(&mut f, "RESOLUTION", 3, false)?;
    let ndiag = s[1];
    if s[0] != nspec || s[2] != nwave || ndiag % 2 == 0 || ndiag > 4 * MAX_HSIZE + 1 {
        return Err(f.err(format!("shape {s:?} does not fit FLUX {shape:?}")));
    }
    let resolution =
        Array3::from_shape_vec((nspec, ndiag, nwave), res).map_err(|e| f.err(e.to_string()))?;
    f.close()?;
    Ok(Frame {
        specmin,
        wave,
        flux,
        ivar,
        mask,
        resolution,
        chi2pix,
    })
}

/// The values of `keys` in a frame's FLUX header, as text (strings unquoted, long ones joined),
/// `None` where absent: what a rerun compares with its request before reading the frame.
pub fn read_frame_keys(path: &Path, keys: &[&str]) -> Result<Vec<Option<String>>, IoError> {
    let mut f = Fits::open(path)?;
    f.move_to("FLUX")?;
    let values = keys
        .iter()
        .map(|k| f.key_str(k))
        .collect::<Result<Vec<_>, _>>()?;
    f.close()?;
    Ok(values)
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
