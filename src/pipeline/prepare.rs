//! One frame from files to a plan, and from results back to a file: what the single-frame
//! command and the pipeline's reader and writer share.
//!
//! Imports `psf`, `io`, `patch`, `extract`, `config` and the pipeline's `frame` and `env`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, warn};

use crate::config::{self, Config};
use crate::extract::ExtractOptions;
use crate::io::frame::{write_frame, write_model_image, Frame, FrameMeta};
use crate::io::image::{read_preproc, Preproc};
use crate::io::psf::read_psf;
use crate::io::IoError;
use crate::patch::{PatchOptions, Plan, WaveGrid};
use crate::pipeline::frame::{finalize, FrameResult};
use crate::psf::Psf;

/// Why a frame could not be prepared or written, naming its files.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Reading the PSF or the image, or writing the frame.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The output grid is not a grid.
    #[error("{0}")]
    Grid(String),
    /// The output grid reaches beyond the PSF's wavelengths.
    #[error(
        "wavelength range {gmin:.2}..{gmax:.2} Å is outside the PSF {} range {lo}..{hi} Å",
        .psf.display()
    )]
    GridOutsidePsf {
        /// The grid's first wavelength.
        gmin: f64,
        /// Its last.
        gmax: f64,
        /// The PSF.
        psf: PathBuf,
        /// The PSF's first wavelength.
        lo: f64,
        /// Its last.
        hi: f64,
    },
    /// `specmin` is not a fiber of the PSF.
    #[error(
        "specmin {specmin} is past the last fiber of the PSF {}, which has {nfiber} fibers",
        .psf.display()
    )]
    SpecminPastPsf {
        /// The first fiber asked for.
        specmin: usize,
        /// The PSF.
        psf: PathBuf,
        /// Its fibers.
        nfiber: usize,
    },
    /// The fibers asked for run past the PSF's.
    #[error(
        "fibers {specmin}..{end} requested but the PSF {} has {nfiber} fibers",
        .psf.display()
    )]
    FibersPastPsf {
        /// The first fiber asked for.
        specmin: usize,
        /// One past the last.
        end: usize,
        /// The PSF.
        psf: PathBuf,
        /// Its fibers.
        nfiber: usize,
    },
    /// The image is not the CCD the PSF describes.
    #[error(
        "{}: image is {rows} rows x {cols} columns but the PSF {} describes a {psf_rows} x \
         {psf_cols} CCD",
        .image.display(),
        .psf.display()
    )]
    ImageVsPsf {
        /// The image.
        image: PathBuf,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
        /// The PSF.
        psf: PathBuf,
        /// The PSF's CCD rows.
        psf_rows: usize,
        /// The PSF's CCD columns.
        psf_cols: usize,
    },
    /// No grid given and none known for the image's camera.
    #[error(
        "{}: no --wavelength given and CAMERA '{camera}' is not b, r or z",
        .image.display()
    )]
    NoWavelength {
        /// The image.
        image: PathBuf,
        /// Its CAMERA header value.
        camera: String,
    },
    /// Every patch failed or left the CCD.
    #[error(
        "nothing was extracted: of {npatch} patches, {dropped} left the CCD and {failed} failed \
         even with regularisation; no output written"
    )]
    NothingExtracted {
        /// Patches of the frame.
        npatch: usize,
        /// Patches off the CCD.
        dropped: usize,
        /// Patches that failed.
        failed: usize,
    },
}

impl PrepareError {
    /// The error and its causes on one line, `: `-separated (as the pipeline reports a frame's
    /// failure).
    pub fn one_line(&self) -> String {
        let mut line = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            line.push_str(": ");
            line.push_str(&c.to_string());
            cause = c.source();
        }
        line
    }
}

/// Everything resolved and loaded for one frame's extraction.
pub struct Prepared {
    /// Where the PSF came from.
    pub psf_path: PathBuf,
    /// Where the image came from.
    pub image_path: PathBuf,
    /// The PSF.
    pub psf: Psf,
    /// The image, ivar masked.
    pub preproc: Preproc,
    /// Output and padded grids.
    pub grid: WaveGrid,
    /// The patches.
    pub plan: Plan,
    /// Patch geometry options.
    pub patch: PatchOptions,
    /// Per-patch options.
    pub opts: ExtractOptions,
    /// Worker threads.
    pub threads: usize,
    /// Whether to draw a progress bar.
    pub progress: bool,
}

/// The value of `key` in raw FITS header cards, without quotes.
pub fn header_value(cards: &[String], key: &str) -> Option<String> {
    cards.iter().find_map(|c| {
        let (k, rest) = c.split_at(c.len().min(8));
        if k.trim_end() != key || !rest.starts_with('=') {
            return None;
        }
        let v = rest[1..].trim();
        if let Some(stripped) = v.strip_prefix('\'') {
            let end = stripped.find('\'').unwrap_or(stripped.len());
            Some(stripped[..end].trim_end().to_string())
        } else {
            Some(v.split('/').next().unwrap_or("").trim().to_string())
        }
    })
}

/// The output grid `[wmin, wmax, dw]`, which must lie inside the PSF's wavelength range.
fn wave_grid(
    w: [f64; 3],
    cfg: &Config,
    psf: &Psf,
    psf_path: &Path,
) -> Result<WaveGrid, PrepareError> {
    let grid = WaveGrid::new(w[0], w[1], w[2], &cfg.patch).map_err(PrepareError::Grid)?;
    let (lo, hi) = psf.wave_range();
    let (gmin, gmax) = (grid.wave[0], grid.wave[grid.wave.len() - 1]);
    if gmin < lo || gmax > hi {
        return Err(PrepareError::GridOutsidePsf {
            gmin,
            gmax,
            psf: psf_path.to_path_buf(),
            lo,
            hi,
        });
    }
    let (pmin, pmax) = (grid.padded[0], grid.padded[grid.padded.len() - 1]);
    if pmin < lo || pmax > hi {
        warn!("patch padding {pmin:.2}..{pmax:.2} Å extrapolates the PSF beyond {lo}..{hi} Å");
    }
    Ok(grid)
}

/// Reads the PSF and the image of one frame and plans it under `cfg` (already validated).
pub fn prepare_frame(
    cfg: &Config,
    psf_path: &Path,
    image_path: &Path,
    model_image: bool,
    progress: bool,
) -> Result<Prepared, PrepareError> {
    let psf = read_psf(psf_path)?;
    // What the PSF alone can refuse, before the (larger) image is read.
    let specmin = cfg.extract.specmin;
    let nfiber = psf.nfiber();
    if specmin >= nfiber {
        return Err(PrepareError::SpecminPastPsf {
            specmin,
            psf: psf_path.to_path_buf(),
            nfiber,
        });
    }
    let nspec = match cfg.extract.nspec {
        0 => nfiber - specmin,
        n if specmin + n > nfiber => {
            return Err(PrepareError::FibersPastPsf {
                specmin,
                end: specmin + n,
                psf: psf_path.to_path_buf(),
                nfiber,
            })
        }
        n => n,
    };
    let given = (!cfg.extract.wavelength.is_empty()).then(|| {
        let w = &cfg.extract.wavelength;
        [w[0], w[1], w[2]]
    });
    let grid_given = match given {
        Some(w) => Some(wave_grid(w, cfg, &psf, psf_path)?),
        None => None,
    };

    let t0 = Instant::now();
    let preproc = read_preproc(image_path, cfg.extract.mask_bits)?;
    info!(
        "read {} ({}x{}) in {:.2}s: {} pixels masked by MASK bits, {} NaN/Inf pixels treated as masked",
        image_path.display(),
        preproc.image.nrows(),
        preproc.image.ncols(),
        t0.elapsed().as_secs_f64(),
        preproc.masked_by_bits,
        preproc.nonfinite
    );
    if preproc.image.dim() != (psf.npix_y, psf.npix_x) {
        return Err(PrepareError::ImageVsPsf {
            image: image_path.to_path_buf(),
            rows: preproc.image.nrows(),
            cols: preproc.image.ncols(),
            psf: psf_path.to_path_buf(),
            psf_rows: psf.npix_y,
            psf_cols: psf.npix_x,
        });
    }
    // The frame copies FIBERMAP rows specmin.. of the extracted fibers: refuse now, not after
    // the extraction, a table too short for them.
    if let Some(rows) = preproc.fibermap_rows.filter(|&r| r < specmin + nspec) {
        return Err(IoError::hdu(
            image_path,
            "FIBERMAP",
            format!(
                "has {rows} rows; fibers {specmin}..{} need {}",
                specmin + nspec,
                specmin + nspec
            ),
        )
        .into());
    }
    let grid = match grid_given {
        Some(g) => g,
        None => {
            let camera = header_value(&preproc.header, "CAMERA").unwrap_or_default();
            let w =
                config::camera_wavelength(&camera).ok_or_else(|| PrepareError::NoWavelength {
                    image: image_path.to_path_buf(),
                    camera: camera.clone(),
                })?;
            wave_grid(w, cfg, &psf, psf_path)?
        }
    };
    let plan = Plan::new(specmin, nspec, grid.wave.len(), psf.nfiber(), &cfg.patch);
    let psferr = if cfg.extract.psferr >= 0.0 {
        cfg.extract.psferr
    } else {
        psf.psferr.unwrap_or(0.01)
    };
    let opts = ExtractOptions {
        regularize: cfg.extract.regularize,
        psferr,
        ndiag: psf.hsizey,
        model_image,
    };
    Ok(Prepared {
        psf_path: psf_path.to_path_buf(),
        image_path: image_path.to_path_buf(),
        psf,
        preproc,
        grid,
        plan,
        patch: cfg.patch.clone(),
        opts,
        threads: crate::pipeline::env::resolve_threads(cfg.run.threads),
        progress,
    })
}

/// Refuses a frame in which nothing was extracted; warns about failed patches.
pub fn check_extracted(res: &FrameResult, npatch: usize) -> Result<(), PrepareError> {
    let st = &res.stats;
    if st.failed + st.dropped >= npatch {
        return Err(PrepareError::NothingExtracted {
            npatch,
            dropped: st.dropped,
            failed: st.failed,
        });
    }
    if st.failed > 0 {
        warn!(
            "{} patches failed even with regularisation: their bins have ivar 0 and mask NODATA",
            st.failed
        );
    }
    Ok(())
}

/// What the frame's header and FIBERMAP record about its inputs.
pub fn frame_meta(prep: &Prepared) -> FrameMeta {
    FrameMeta {
        header: prep.preproc.header.clone(),
        in_psf: prep.psf_path.display().to_string(),
        in_img: prep.image_path.display().to_string(),
        orig_psf: prep.psf.in_psf.clone(),
        fibermap_from: prep.preproc.fibermap_rows.map(|_| prep.image_path.clone()),
        extra: vec![
            (
                "PSFERR".into(),
                format!("{}", prep.opts.psferr),
                "PSF model error used by chi2pix".into(),
            ),
            (
                "REGULARI".into(),
                format!("{}", prep.opts.regularize),
                "regularisation".into(),
            ),
        ],
    }
}

/// The frame as it is written, in f64 (the file stores float32).
pub fn frame_of(res: &FrameResult, grid: &WaveGrid) -> Frame {
    let fin = finalize(res, grid);
    Frame {
        specmin: res.specmin,
        wave: res.wave.clone(),
        flux: fin.flux,
        ivar: fin.ivar,
        mask: fin.mask,
        resolution: res.resolution.clone(),
        chi2pix: res.chi2pix.clone(),
    }
}

/// Finalises and writes a frame (and the model image when one was computed), each atomically.
pub fn write_outputs(
    res: &FrameResult,
    grid: &WaveGrid,
    meta: &FrameMeta,
    output: &Path,
    model_image: Option<&Path>,
    overwrite: bool,
) -> Result<(), PrepareError> {
    write_frame(output, &frame_of(res, grid), meta, overwrite)?;
    if let (Some(path), Some(model)) = (model_image, &res.model) {
        write_model_image(path, model, overwrite)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::header_value;

    #[test]
    fn header_values_lose_quotes_and_comments() {
        let cards = vec![
            format!("{:<80}", "CAMERA  = 'r0      '           / camera"),
            format!("{:<80}", "EXPID   =                67784 / exposure"),
        ];
        assert_eq!(header_value(&cards, "CAMERA").as_deref(), Some("r0"));
        assert_eq!(header_value(&cards, "EXPID").as_deref(), Some("67784"));
        assert_eq!(header_value(&cards, "NIGHT"), None);
    }
}
