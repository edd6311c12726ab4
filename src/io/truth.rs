//! True spectra of a simulation (the layout of `truth-r0-b00.fits`): WAVELENGTH (header W0, DW,
//! SPECMIN, NSPEC), PHOT in electrons per bin and FLUX = PHOT / DW in electrons per Å.

use std::path::Path;

use ndarray::Array2;

use super::fits::{Fits, MAX_ELEMENTS};
use super::{write_atomic, IoError};
use crate::psf::MAX_NFIBER;

/// True spectra on a regular grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    /// Bin centres (Å).
    pub wave: Vec<f64>,
    /// Electrons per bin `[nspec, nwave]`.
    pub phot: Array2<f64>,
    /// Electrons per Å `[nspec, nwave]`.
    pub flux: Array2<f64>,
    /// First fiber.
    pub specmin: usize,
    /// Start of the extraction grid the truth was made for (header W0); the truth grid begins
    /// some bins below it so that padded patches are covered.
    pub w0: f64,
}

fn read_f64(f: &mut Fits, name: &str, ndim: usize) -> Result<(Vec<f64>, Vec<usize>), IoError> {
    f.move_to(name)?;
    let shape = f.image_shape()?;
    let n = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    match n {
        Some(n) if shape.len() == ndim && n <= MAX_ELEMENTS => Ok((f.read_pixels(n)?, shape)),
        _ => Err(f.err(format!(
            "expected a {ndim}-D image of sane size, found {shape:?}"
        ))),
    }
}

/// Reads a truth file by EXTNAME; SPECMIN defaults to 0 and W0 to the first wavelength.
pub fn read_truth(path: &Path) -> Result<Truth, IoError> {
    let mut f = Fits::open(path)?;
    let (wave, _) = read_f64(&mut f, "WAVELENGTH", 1)?;
    let specmin = match f.key_i64("SPECMIN")? {
        None => 0,
        Some(v) => usize::try_from(v)
            .ok()
            .filter(|&v| v < MAX_NFIBER)
            .ok_or_else(|| f.err(format!("SPECMIN = {v} is not a fiber number")))?,
    };
    let w0 = f.key_f64("W0")?.or(wave.first().copied()).unwrap_or(0.0);
    let mut plane = |name: &str| -> Result<Array2<f64>, IoError> {
        let (data, s) = read_f64(&mut f, name, 2)?;
        if s[1] != wave.len() || s[0] > MAX_NFIBER {
            return Err(f.err(format!(
                "shape {s:?} does not fit {} wavelengths",
                wave.len()
            )));
        }
        Array2::from_shape_vec((s[0], s[1]), data).map_err(|e| f.err(e.to_string()))
    };
    let phot = plane("PHOT")?;
    let flux = plane("FLUX")?;
    if flux.dim() != phot.dim() {
        return Err(IoError::hdu(
            path,
            "FLUX",
            format!("shape {:?} differs from PHOT", flux.dim()),
        ));
    }
    f.close()?;
    Ok(Truth {
        wave,
        phot,
        flux,
        specmin,
        w0,
    })
}

/// Writes a truth file atomically, replacing `path`.
pub fn write_truth(path: &Path, truth: &Truth) -> Result<(), IoError> {
    let nwave = truth.wave.len();
    if truth.phot.ncols() != nwave || truth.flux.dim() != truth.phot.dim() {
        return Err(IoError::file(
            path,
            format!(
                "PHOT {:?}, FLUX {:?} and {nwave} wavelengths disagree",
                truth.phot.dim(),
                truth.flux.dim()
            ),
        ));
    }
    let nspec = truth.phot.nrows();
    write_atomic(path, true, |tmp| {
        let mut f = Fits::create(tmp)?;
        f.create_image("WAVELENGTH", -64, &[nwave])?;
        if nwave > 1 {
            let dw = (truth.wave[nwave - 1] - truth.wave[0]) / (nwave - 1) as f64;
            f.put_f64("DW", dw, "")?;
        }
        f.put_f64("W0", truth.w0, "")?;
        f.put_i64("SPECMIN", truth.specmin as i64, "")?;
        f.put_i64("NSPEC", nspec as i64, "")?;
        f.put_str(
            "BUNIT",
            "electron/bin for PHOT, electron/Angstrom for FLUX",
            "",
        )?;
        f.write_pixels(&truth.wave)?;
        f.create_image("PHOT", -64, &[nspec, nwave])?;
        f.put_str("BUNIT", "electron", "photons per wavelength bin on the CCD")?;
        f.write_pixels(&truth.phot.iter().copied().collect::<Vec<f64>>())?;
        f.create_image("FLUX", -64, &[nspec, nwave])?;
        f.put_str("BUNIT", "electron/Angstrom", "PHOT/dw")?;
        f.write_pixels(&truth.flux.iter().copied().collect::<Vec<f64>>())?;
        f.write_checksums()?;
        f.close()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::shared_data;

    #[test]
    fn reads_the_real_truth() {
        let Some(path) = shared_data("truth-r0-b00.fits") else {
            return;
        };
        let t = read_truth(&path).unwrap();
        assert_eq!((t.specmin, t.w0), (0, 5760.0));
        assert_eq!(t.wave.len(), 2821);
        assert_eq!(t.phot.dim(), (25, 2821));
        // Python: fitsio.FITS(path)['WAVELENGTH'].read()[0]; ['PHOT'].read()[3, 1000]; FLUX.
        assert_eq!(t.wave[0], 5545.6);
        assert_eq!(t.phot[(3, 1000)], 294.29997222291496);
        assert_eq!(t.flux[(3, 1000)], 367.8749652786437);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("truth.fits");
        let wave: Vec<f64> = (0..7).map(|i| 5750.4 + 0.8 * i as f64).collect();
        let phot = Array2::from_shape_fn((2, 7), |(s, w)| (s * 10 + w) as f64 + 0.25);
        let t = Truth {
            wave,
            flux: &phot / 0.8,
            phot,
            specmin: 25,
            w0: 5760.0,
        };
        write_truth(&path, &t).unwrap();
        assert_eq!(read_truth(&path).unwrap(), t);
    }
}
