//! Reading and writing DESI Gauss–Hermite PSF files, PSFVER 3 (docs/formats.md; the model:
//! docs/science.md §3).
//!
//! Every header number is checked against the limits of `psf` before anything is allocated from
//! it, and the table's row layout against what LEGDEG and the fiber count imply, so a corrupt or
//! hostile file fails fast with a message instead of exhausting memory.

use std::path::Path;

use ndarray::Array2;

use super::fits::Fits;
use super::{write_atomic, IoError};
use crate::psf::{
    LegendreSet, Psf, PsfParam, MAX_GHDEG, MAX_HSIZE, MAX_LEGDEG, MAX_NFIBER, MAX_NPIX,
};

/// Most parameter rows accepted: every GH-i-j of the largest degrees plus a generous margin for
/// the tail and bookkeeping rows (59 in DESI files).
const MAX_PARAMS: usize = (MAX_GHDEG + 1) * (MAX_GHDEG + 1) + 64;
/// Most trace coefficients accepted (7 in DESI files).
const MAX_TRACE_COEF: usize = MAX_LEGDEG + 1;
/// Width of the PARAM column.
const PARAM_WIDTH: usize = 8;

/// Reads a GaussHermite PSF (PSFVER 3): HDUs XTRACE, YTRACE and PSF found by EXTNAME.
///
/// PSFERR is read only under that exact key (specex's PSFERROR is ignored, like gpu_specter);
/// LEGDEGX/LEGDEGW are ignored. The result has passed [`Psf::validate`] and
/// [`check_values`].
///
/// A PSF with tails (TAILAMP not all zero, `psf::tail`) is logged once, naming the file.
///
/// The camera is the CAMERA keyword (as [`super::camera_name`] gives it) of the PSF HDU, where
/// specex writes it, else of the first of the primary, XTRACE and YTRACE HDUs that has one.
pub fn read_psf(path: &Path) -> Result<Psf, IoError> {
    let mut f = Fits::open(path)?;
    let mut cameras = vec![f.key_str("CAMERA")?];
    let xtrace = read_trace(&mut f, "XTRACE")?;
    cameras.push(f.key_str("CAMERA")?);
    let ytrace = read_trace(&mut f, "YTRACE")?;
    cameras.push(f.key_str("CAMERA")?);
    if ytrace.nfiber() != xtrace.nfiber() {
        return Err(f.err(format!(
            "YTRACE has {} fibers, XTRACE {}",
            ytrace.nfiber(),
            xtrace.nfiber()
        )));
    }
    let nfiber = xtrace.nfiber();

    f.move_to("PSF")?;
    if !f.is_table()? {
        return Err(f.err("is not a binary table"));
    }
    check_version(&mut f)?;
    let npix_x = need_int(&mut f, "NPIX_X", 1, MAX_NPIX)?;
    let npix_y = need_int(&mut f, "NPIX_Y", 1, MAX_NPIX)?;
    let hsizex = need_int(&mut f, "HSIZEX", 1, MAX_HSIZE)?;
    let hsizey = need_int(&mut f, "HSIZEY", 1, MAX_HSIZE)?;
    let ghdegx = need_int(&mut f, "GHDEGX", 0, MAX_GHDEG)?;
    let ghdegy = need_int(&mut f, "GHDEGY", 0, MAX_GHDEG)?;
    let legdeg = need_int(&mut f, "LEGDEG", 0, MAX_LEGDEG)?;
    let fibermin = match f.key_i64("FIBERMIN")? {
        None => 0,
        Some(_) => need_int(&mut f, "FIBERMIN", 0, MAX_NFIBER)?,
    };
    let (wavemin, wavemax) = wave_range(&mut f)?;
    let psferr = f.key_f64("PSFERR")?;
    if let Some(e) = psferr {
        if !(e.is_finite() && e >= 0.0) {
            return Err(f.err(format!("PSFERR = {e} must be finite and ≥ 0")));
        }
    }
    let in_psf = f.key_str("IN_PSF")?;
    cameras.insert(0, f.key_str("CAMERA")?);
    let camera = cameras.iter().flatten().find_map(|c| super::camera_name(c));

    // The table layout, checked before any column is read.
    let ncoef = legdeg + 1;
    let per_row = ncoef * nfiber;
    let nrows = f.nrows()?;
    if nrows == 0 || nrows > MAX_PARAMS {
        return Err(f.err(format!(
            "NAXIS2 = {nrows} parameter rows; expected 1..={MAX_PARAMS}"
        )));
    }
    let param_col = f.need_col("PARAM")?;
    let coeff_col = f.need_col("COEFF")?;
    let (ptype, prepeat, _) = f.col_info(param_col)?;
    if ptype != fitsio::sys::TSTRING as i32 || prepeat == 0 || prepeat > 80 {
        return Err(f.err(format!(
            "PARAM is not a short string column (type {ptype}, repeat {prepeat})"
        )));
    }
    let (_, crepeat, _) = f.col_info(coeff_col)?;
    if crepeat != per_row {
        return Err(f.err(format!(
            "COEFF holds {crepeat} values per row; LEGDEG {legdeg} and {nfiber} fibers imply {per_row}"
        )));
    }
    let row_bytes = need_int(&mut f, "NAXIS1", 1, usize::MAX >> 8)?;
    if row_bytes < 8 * per_row + prepeat {
        return Err(f.err(format!(
            "rows of {row_bytes} bytes cannot hold PARAM and {per_row} f8 coefficients"
        )));
    }
    let names = f.read_col_str(param_col)?;
    let coeff: Vec<f64> = f.read_col(coeff_col, nrows * per_row)?;
    let params = names
        .into_iter()
        .zip(coeff.chunks_exact(per_row))
        .map(|(name, c)| {
            Ok(PsfParam {
                name: name.trim_end_matches(['\0', ' ']).to_string(),
                series: LegendreSet {
                    wavemin,
                    wavemax,
                    coeff: Array2::from_shape_vec((nfiber, ncoef), c.to_vec())
                        .map_err(|e| f.err(format!("COEFF: {e}")))?,
                },
            })
        })
        .collect::<Result<Vec<_>, IoError>>()?;
    f.close()?;

    let psf = Psf {
        npix_x,
        npix_y,
        hsizex,
        hsizey,
        ghdegx,
        ghdegy,
        legdeg,
        fibermin,
        fiber0: 0,
        xtrace,
        ytrace,
        params,
        psferr,
        in_psf,
        camera,
    };
    psf.validate().map_err(|source| IoError::Psf {
        path: path.to_path_buf(),
        source,
    })?;
    check_values(&psf).map_err(|m| IoError::hdu(path, "PSF", m))?;
    if psf.has_tails() {
        // gpu_specter (and spextract before issue 14) ignored the tail: say that it is used.
        tracing::info!(
            "PSF {} has tails (TAILAMP ≠ 0): its spots include specter's tail term",
            path.display()
        );
    }
    Ok(psf)
}

/// Wavelengths per fiber at which GHSIGX and GHSIGY are checked (65: the ends and 63 between).
const SIGMA_SAMPLES: usize = 64;

/// Refuses parameter values no spot can be made from: non-finite coefficients anywhere in the
/// table, and a GHSIGX or GHSIGY that is not positive at some wavelength of its range (sampled
/// at 65 points per fiber). Such a PSF would otherwise give NaN spots, every patch would fail,
/// and the frame would come out empty.
pub fn check_values(psf: &Psf) -> Result<(), String> {
    for p in &psf.params {
        if let Some(i) = p.series.coeff.iter().position(|v| !v.is_finite()) {
            let ncoef = p.series.coeff.ncols().max(1);
            return Err(format!(
                "parameter {} of fiber {} has a non-finite coefficient",
                p.name,
                psf.fibermin + i / ncoef
            ));
        }
    }
    for name in ["GHSIGX", "GHSIGY"] {
        let Some(p) = psf.param(name) else {
            continue;
        };
        let s = &p.series;
        for f in 0..s.nfiber() {
            for i in 0..=SIGMA_SAMPLES {
                let w = s.wavemin + (s.wavemax - s.wavemin) * i as f64 / SIGMA_SAMPLES as f64;
                let v = s.eval(f, w);
                if !(v > 0.0 && v.is_finite()) {
                    return Err(format!(
                        "{name} of fiber {} is {v} at {w:.1} Å; spot widths must be positive",
                        psf.fibermin + f
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One trace HDU: an f8 image `[nfiber, ncoef]` with its own WAVEMIN/WAVEMAX.
fn read_trace(f: &mut Fits, name: &str) -> Result<LegendreSet, IoError> {
    f.move_to(name)?;
    let shape = f.image_shape()?;
    let [nfiber, ncoef] = shape[..] else {
        return Err(f.err(format!(
            "expected a 2-D image [nfiber, ncoef], found shape {shape:?}"
        )));
    };
    if !(1..=MAX_NFIBER).contains(&nfiber) || !(1..=MAX_TRACE_COEF).contains(&ncoef) {
        return Err(f.err(format!(
            "shape [{nfiber}, {ncoef}] is outside [1..={MAX_NFIBER}, 1..={MAX_TRACE_COEF}]"
        )));
    }
    let (wavemin, wavemax) = wave_range(f)?;
    let data: Vec<f64> = f.read_pixels(nfiber * ncoef)?;
    if data.iter().any(|v| !v.is_finite()) {
        return Err(f.err("has non-finite coefficients"));
    }
    let coeff = Array2::from_shape_vec((nfiber, ncoef), data).map_err(|e| f.err(e.to_string()))?;
    Ok(LegendreSet {
        wavemin,
        wavemax,
        coeff,
    })
}

fn wave_range(f: &mut Fits) -> Result<(f64, f64), IoError> {
    let lo = need_f64(f, "WAVEMIN")?;
    let hi = need_f64(f, "WAVEMAX")?;
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(f.err(format!(
            "WAVEMIN {lo}, WAVEMAX {hi} is not a wavelength range"
        )));
    }
    Ok((lo, hi))
}

/// Refuses other PSF types and versions when the header says which it is.
fn check_version(f: &mut Fits) -> Result<(), IoError> {
    if let Some(t) = f.key_str("PSFTYPE")? {
        if t.trim() != "GAUSS-HERMITE" {
            return Err(f.err(format!("PSFTYPE {t:?} is not GAUSS-HERMITE")));
        }
    }
    if let Some(v) = f.key_str("PSFVER")? {
        if v.trim() != "3" {
            return Err(f.err(format!("PSFVER {v:?} is not supported (only 3)")));
        }
    }
    Ok(())
}

fn need_f64(f: &mut Fits, key: &str) -> Result<f64, IoError> {
    f.key_f64(key)?
        .ok_or_else(|| f.err(format!("header key {key} is missing")))
}

/// A required integer key within `lo..=hi`, checked before it is used to size anything.
fn need_int(f: &mut Fits, key: &str, lo: usize, hi: usize) -> Result<usize, IoError> {
    let v = f
        .key_i64(key)?
        .ok_or_else(|| f.err(format!("header key {key} is missing")))?;
    match usize::try_from(v) {
        Ok(u) if (lo..=hi).contains(&u) => Ok(u),
        _ => Err(f.err(format!(
            "header {key} = {v} is outside the accepted range {lo}..={hi}"
        ))),
    }
}

/// Writes `psf` in the layout [`read_psf`] reads (and specex writes), atomically, replacing
/// `path` if it exists.
///
/// Every parameter row must share one wavelength range and have `legdeg + 1` coefficients.
pub fn write_psf(path: &Path, psf: &Psf) -> Result<(), IoError> {
    psf.validate().map_err(|source| IoError::Psf {
        path: path.to_path_buf(),
        source,
    })?;
    check_values(psf).map_err(|m| IoError::hdu(path, "PSF", m))?;
    let (wavemin, wavemax) = match psf.params.first() {
        Some(p) => (p.series.wavemin, p.series.wavemax),
        None => return Err(IoError::hdu(path, "PSF", "the PSF has no parameter rows")),
    };
    let ncoef = psf.legdeg + 1;
    for p in &psf.params {
        let s = &p.series;
        if s.wavemin != wavemin || s.wavemax != wavemax || s.coeff.ncols() != ncoef {
            return Err(IoError::hdu(
                path,
                "PSF",
                format!(
                    "parameter {} has range [{}, {}] and {} coefficients; the table needs \
                     [{wavemin}, {wavemax}] and {ncoef} for every row",
                    p.name,
                    s.wavemin,
                    s.wavemax,
                    s.coeff.ncols()
                ),
            ));
        }
        if p.name.len() > PARAM_WIDTH || !p.name.is_ascii() {
            return Err(IoError::hdu(
                path,
                "PSF",
                format!(
                    "parameter name {:?} is not ASCII of at most 8 bytes",
                    p.name
                ),
            ));
        }
    }
    write_atomic(path, true, |tmp| {
        let mut f = Fits::create(tmp)?;
        write_trace(&mut f, "XTRACE", psf, &psf.xtrace)?;
        write_trace(&mut f, "YTRACE", psf, &psf.ytrace)?;
        let nfiber = psf.nfiber();
        let tform = format!("{}D", ncoef * nfiber);
        f.create_table(
            "PSF",
            psf.params.len(),
            &[
                ("PARAM", "8A"),
                ("COEFF", &tform),
                ("LEGDEGX", "J"),
                ("LEGDEGW", "J"),
            ],
        )?;
        f.set_tdim(2, &[ncoef, nfiber])?;
        f.put_str("PSFTYPE", "GAUSS-HERMITE", "")?;
        f.put_str("PSFVER", "3", "")?;
        let keys = [
            ("NPIX_X", psf.npix_x, "number of columns in input CCD image"),
            ("NPIX_Y", psf.npix_y, "number of rows in input CCD image"),
            (
                "HSIZEX",
                psf.hsizex,
                "Half size of PSF in fit, NX=2*HSIZEX+1",
            ),
            (
                "HSIZEY",
                psf.hsizey,
                "Half size of PSF in fit, NY=2*HSIZEY+1",
            ),
            ("FIBERMIN", psf.fibermin, "first fiber (starting at 0)"),
            (
                "FIBERMAX",
                psf.fibermin + nfiber - 1,
                "last fiber (included)",
            ),
            ("NPARAMS", psf.params.len(), "number of PSF parameters"),
            (
                "LEGDEG",
                psf.legdeg,
                "degree of Legendre pol.(wave) for parameters",
            ),
            (
                "GHDEGX",
                psf.ghdegx,
                "degree of Hermite polynomial along CCD columns",
            ),
            (
                "GHDEGY",
                psf.ghdegy,
                "degree of Hermite polynomial along CCD rows",
            ),
        ];
        for (k, v, c) in keys {
            f.put_i64(k, v as i64, c)?;
        }
        f.put_f64(
            "WAVEMIN",
            wavemin,
            "minimum wavelength (A), for the Legendre pol.",
        )?;
        f.put_f64(
            "WAVEMAX",
            wavemax,
            "maximum wavelength (A), for the Legendre pol.",
        )?;
        if let Some(e) = psf.psferr {
            f.put_f64("PSFERR", e, "assumed PSF fractional error in chi2")?;
        }
        if let Some(s) = &psf.in_psf {
            f.put_str("IN_PSF", s, "")?;
        }
        if let Some(c) = &psf.camera {
            f.put_str("CAMERA", c, "camera this PSF is for")?;
        }
        // NUL padding, as specex writes it: numpy then reads the names without padding.
        for (row, p) in psf.params.iter().enumerate() {
            let mut name = [0u8; PARAM_WIDTH];
            name[..p.name.len()].copy_from_slice(p.name.as_bytes());
            f.write_row_bytes(row, 0, &name)?;
        }
        let mut coeff: Vec<f64> = Vec::with_capacity(psf.params.len() * ncoef * nfiber);
        for p in &psf.params {
            coeff.extend(p.series.coeff.iter());
        }
        f.write_col(2, &coeff)?;
        let deg = vec![psf.legdeg as i32; psf.params.len()];
        f.write_col(3, &deg)?;
        f.write_col(4, &deg)?;
        f.close()
    })
}

fn write_trace(f: &mut Fits, name: &str, psf: &Psf, set: &LegendreSet) -> Result<(), IoError> {
    let (nfiber, ncoef) = set.coeff.dim();
    f.create_image(name, -64, &[nfiber, ncoef])?;
    f.put_i64("FIBERMIN", psf.fibermin as i64, "")?;
    f.put_i64("FIBERMAX", (psf.fibermin + nfiber) as i64 - 1, "")?;
    f.put_f64("WAVEMIN", set.wavemin, "")?;
    f.put_f64("WAVEMAX", set.wavemax, "")?;
    f.put_str("PSFTYPE", "GAUSS-HERMITE", "")?;
    f.put_i64("PSFVER", 3, "")?;
    let data: Vec<f64> = set.coeff.iter().copied().collect();
    f.write_pixels(&data)
}

#[cfg(test)]
#[path = "psf_tests.rs"]
mod tests;
