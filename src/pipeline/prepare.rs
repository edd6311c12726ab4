//! One frame from files to a plan, and from results back to a file: what the single-frame
//! command and the pipeline's reader and writer share; and the single frame's extraction,
//! once or, with `--ivar-from-model`, twice (`extract_prepared`).
//!
//! Imports `psf`, `io`, `patch`, `extract`, `config` and the pipeline's `frame`, `env`,
//! `ivar_model` and `request`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2};
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::extract::{Backend, ExtractOptions, ModelFlux};
use crate::io::frame::{write_frame_set, Frame, FrameMeta, ModelImage};
use crate::io::image::{read_preproc, Preproc};
use crate::io::psf::read_psf;
use crate::io::IoError;
use crate::patch::{PatchOptions, Plan, WaveGrid};
use crate::pipeline::frame::{
    extract_frame, finalize, withhold_unusable, FrameError, FrameResult, Progress, SpotCache,
    Withheld,
};
use crate::pipeline::ivar_model::{
    image_gain, is_from_data, ivar_from_model, ivar_from_neighbours, read_noise_term,
};
use crate::pipeline::request::{FrameRequest, InputId, RequestError};
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
    /// The image is from another camera than the PSF describes.
    #[error(
        "{}: CAMERA is {image_camera} but the PSF {} is for camera {psf_camera}; pair each \
         image with its own camera's PSF, or pass --allow-camera-mismatch \
         (allow_camera_mismatch = true under [extract]) to extract it anyway",
        .image.display(),
        .psf.display()
    )]
    CameraMismatch {
        /// The image.
        image: PathBuf,
        /// Its CAMERA.
        image_camera: String,
        /// The PSF.
        psf: PathBuf,
        /// The PSF's CAMERA.
        psf_camera: String,
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
    /// No pixel of the image has ivar > 0.
    #[error(
        "{}: no pixel has data: every one is masked or has IVAR 0 ({masked_by_bits} masked by \
         MASK bits, {nonfinite} NaN/Inf); nothing to extract",
        .image.display()
    )]
    NoData {
        /// The image.
        image: PathBuf,
        /// Pixels masked by MASK bits.
        masked_by_bits: usize,
        /// Pixels whose IMAGE or IVAR was not finite.
        nonfinite: usize,
    },
    /// No bin of the frame has data and finite values.
    #[error(
        "no bin of the frame can be written: of {bins} bins, {no_data} have no data (every \
         pixel under their spot is masked or has IVAR 0), {non_finite} have a value that is not \
         finite or beyond float32's range, and {dropped} were not extracted; no output written"
    )]
    NothingUsable {
        /// Bins of the frame.
        bins: usize,
        /// Bins without data.
        no_data: usize,
        /// Bins with non-finite values.
        non_finite: usize,
        /// Bins of patches off the CCD or failed.
        dropped: usize,
    },
    /// An input could not be looked at to record it in the frame.
    #[error(transparent)]
    Request(#[from] RequestError),
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
    /// The error and its causes on one line, each said once (as the pipeline reports a frame's
    /// failure).
    pub fn one_line(&self) -> String {
        crate::error_line(self)
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
    /// With `--ivar-from-model` (and an IVAR computed from the pixels): electrons per image
    /// unit, for the second pass's variance (`ivar_model`).
    pub ivar_model_gain: Option<f64>,
    /// Worker threads.
    pub threads: usize,
    /// Whether to draw a progress bar.
    pub progress: bool,
    /// What the frame is extracted for, as its header records it.
    pub request: FrameRequest,
    /// Seconds the image took to read.
    pub read_s: f64,
}

impl Prepared {
    /// What reading the image found, for the log line of whoever read it: "read X (4128x4114)
    /// in 0.39 s: 332 pixels masked by MASK bits, 0 NaN/Inf pixels treated as masked".
    pub fn read_summary(&self) -> String {
        format!(
            "read {} ({}x{}) in {:.2} s: {} pixels masked by MASK bits, {} NaN/Inf pixels \
             treated as masked",
            self.image_path.display(),
            self.preproc.image.nrows(),
            self.preproc.image.ncols(),
            self.read_s,
            self.preproc.masked_by_bits,
            self.preproc.nonfinite
        )
    }
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

/// Refuses an image whose CAMERA differs from its PSF's unless `allow_mismatch`; warns when
/// either lacks CAMERA, since then nothing can be checked. Names as [`crate::io::camera_name`]
/// gives them.
fn check_camera(
    image: &Path,
    image_camera: Option<&str>,
    psf: &Path,
    psf_camera: Option<&str>,
    allow_mismatch: bool,
) -> Result<(), PrepareError> {
    let (image_shown, psf_shown) = (image.display(), psf.display());
    match (image_camera, psf_camera) {
        (Some(i), Some(p)) if i == p => {}
        (Some(i), Some(p)) if allow_mismatch => warn!(
            "{image_shown}: CAMERA is {i} but the PSF {psf_shown} is for camera {p}; \
             extracting anyway, as --allow-camera-mismatch asks"
        ),
        (Some(i), Some(p)) => {
            return Err(PrepareError::CameraMismatch {
                image: image.to_path_buf(),
                image_camera: i.to_string(),
                psf: psf.to_path_buf(),
                psf_camera: p.to_string(),
            })
        }
        (Some(i), None) => warn!(
            "the PSF {psf_shown} has no CAMERA keyword: cannot check that it is for camera {i} \
             of {image_shown}"
        ),
        (None, Some(p)) => warn!(
            "{image_shown} has no CAMERA keyword: cannot check that it is from camera {p} of \
             the PSF {psf_shown}"
        ),
        (None, None) => warn!(
            "neither {image_shown} nor the PSF {psf_shown} has a CAMERA keyword: cannot check \
             that they belong together"
        ),
    }
    Ok(())
}

/// Reads the PSF and the image of one frame and plans it under `cfg` (already validated).
pub fn prepare_frame(
    cfg: &Config,
    psf_path: &Path,
    image_path: &Path,
    model_image: bool,
    progress: bool,
) -> Result<Prepared, PrepareError> {
    // Each input is looked at before it is read, so that a file changed while it is read
    // is taken as changed by the next run; missing files are reported by the readers.
    let psf_seen = InputId::of(psf_path);
    let psf = read_psf(psf_path)?;
    let psf_seen = psf_seen?;
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
    let image_seen = InputId::of(image_path);
    let preproc = read_preproc(image_path, cfg.extract.mask_bits)?;
    let request = FrameRequest::of_inputs(cfg, image_seen?, psf_seen);
    let read_s = t0.elapsed().as_secs_f64();
    check_camera(
        image_path,
        preproc.camera.as_deref(),
        psf_path,
        psf.camera.as_deref(),
        cfg.extract.allow_camera_mismatch,
    )?;
    // A frame of nothing would still "extract": the regularisation alone gives every bin a
    // flux of 0 and an ivar of about 1e-15. Refuse it before the work.
    if !preproc.ivar.iter().any(|&v| v > 0.0) {
        return Err(PrepareError::NoData {
            image: image_path.to_path_buf(),
            masked_by_bits: preproc.masked_by_bits,
            nonfinite: preproc.nonfinite,
        });
    }
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
            let camera = preproc.camera.clone().unwrap_or_default();
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
    let ivar_model_gain = if cfg.extract.ivar_from_model {
        ivar_model_gain(&preproc, image_path)?
    } else {
        None
    };
    let opts = ExtractOptions {
        regularize: cfg.extract.regularize,
        psferr,
        ndiag: psf.hsizey,
        model_image: model_image.then_some(cfg.extract.model_flux),
        leverage: false,
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
        ivar_model_gain,
        threads: crate::pipeline::env::resolve_threads(cfg.run.threads),
        progress,
        request,
        read_s,
    })
}

/// The gain for `--ivar-from-model`, logging what it assumes; `None`, with a warning, when the
/// image's IVAR was not computed from its pixels (then there is no read-noise term to recover,
/// and the frame is extracted once, as without the option).
fn ivar_model_gain(preproc: &Preproc, image: &Path) -> Result<Option<f64>, PrepareError> {
    let (gain, note) = image_gain(
        header_value(&preproc.header, "BUNIT").as_deref(),
        header_value(&preproc.header, "GAIN").as_deref(),
    )
    .map_err(|msg| IoError::hdu(image, "IMAGE", msg))?;
    let shown = image.display();
    if let Some(note) = note {
        info!("{shown}: --ivar-from-model: {note}");
    }
    let Some((r, dr)) = read_noise_term(preproc.image.view(), preproc.ivar.view(), gain) else {
        return Ok(None);
    };
    if !is_from_data(r, dr) {
        warn!(
            "{shown}: --ivar-from-model: IVAR does not follow 1/(r + max(IMAGE, 0)) with a \
             read-noise term r the same from pixel to pixel (median r {r:.3}, median step \
             {dr:.3}): it was not computed from the pixels, so it is used as it is and the \
             frame is extracted once"
        );
        return Ok(None);
    }
    info!(
        "{shown}: --ivar-from-model: read-noise term {r:.3} (median) recovered from IVAR; \
         extracting twice, the second time with the first pass's model in the variance"
    );
    Ok(Some(gain))
}

/// Refuses a frame in which nothing was extracted or nothing can be written; withholds
/// (NODATA, ivar 0) the bins without data or with non-finite values, and warns about them and
/// about failed patches, naming the frame by `image`.
pub fn check_extracted(
    res: &mut FrameResult,
    grid: &WaveGrid,
    npatch: usize,
    image: &Path,
) -> Result<Withheld, PrepareError> {
    let st = &res.stats;
    if st.failed + st.dropped >= npatch {
        return Err(PrepareError::NothingExtracted {
            npatch,
            dropped: st.dropped,
            failed: st.failed,
        });
    }
    let failed = st.failed;
    let w = withhold_unusable(res, grid);
    if w.all() {
        return Err(PrepareError::NothingUsable {
            bins: w.bins,
            no_data: w.no_data,
            non_finite: w.non_finite,
            dropped: w.dropped,
        });
    }
    let image = image.display();
    if failed > 0 {
        warn!(
            "{image}: {failed} patches failed even with regularisation: their bins have ivar 0 \
             and mask NODATA"
        );
    }
    if w.no_data > 0 {
        warn!(
            "{image}: {} of {} bins have no data (every pixel under their spot is masked or has \
             IVAR 0): written with flux and ivar 0 and mask NODATA",
            w.no_data, w.bins
        );
    }
    if w.non_finite > 0 {
        warn!(
            "{image}: {} of {} bins have a non-finite flux, ivar, chi2pix or resolution (or one \
             beyond float32's range, about 3.4e38): written with flux and ivar 0 and mask NODATA",
            w.non_finite, w.bins
        );
    }
    Ok(w)
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
        ]
        .into_iter()
        .chain(prep.request.cards())
        .collect(),
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

/// Bytes of spot values `--ivar-from-model`'s first pass keeps for its second: 2 GiB holds a
/// whole frame's on the r PSF at 0.8 Å (90 MB a bundle of 25 fibers), where evaluating them
/// again would cost a tenth of a pass.
pub const SPOT_CACHE_BYTES: usize = 2 << 30;

/// The per-patch options of `--ivar-from-model`'s first pass: the model image of the
/// deconvolved flux, and each pixel's leverage on it, which the second pass's variance needs.
pub fn first_pass_options(opts: &ExtractOptions) -> ExtractOptions {
    ExtractOptions {
        model_image: Some(ModelFlux::Deconvolved),
        leverage: true,
        ..*opts
    }
}

/// The IVAR of `--ivar-from-model`'s first pass over CCD `rows` and `cols`: each pixel's light
/// from its neighbours.
pub fn first_pass_ivar(
    prep: &Prepared,
    gain: f64,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Array2<f64> {
    let p = &prep.preproc;
    ivar_from_neighbours(p.image.view(), p.ivar.view(), gain, rows, cols)
}

/// The IVAR of `--ivar-from-model`'s second pass over CCD `rows` and `cols`, into `out`: the
/// first pass's `model` there with each pixel's own value left out through its `leverage`.
pub fn second_pass_ivar(
    prep: &Prepared,
    gain: f64,
    (rows, cols): (Range<usize>, Range<usize>),
    model: ArrayView2<'_, f64>,
    leverage: ArrayView2<'_, f64>,
    out: ArrayViewMut2<'_, f64>,
) {
    let p = &prep.preproc;
    let cells = s![rows, cols];
    ivar_from_model(
        p.image.slice(cells),
        p.ivar.slice(cells),
        model,
        leverage,
        gain,
        out,
    );
}

/// Extracts a prepared frame: once, or, with `prep.ivar_model_gain`, twice, the first time
/// with the variance from each pixel's neighbours and the second with the variance from the
/// first pass's model, leaving each pixel's own value out (`ivar_model`). Progress runs over
/// both passes; the stage timings are the sum of both, the counts the second pass's.
pub fn extract_prepared(
    prep: &Prepared,
    backend: &mut dyn Backend,
    progress: Progress<'_>,
) -> Result<FrameResult, FrameError> {
    let mut run = |ivar: ArrayView2<'_, f64>,
                   opts: &ExtractOptions,
                   progress: Progress<'_>,
                   spot_cache: Option<&mut SpotCache>| {
        extract_frame(
            &prep.psf,
            prep.preproc.image.view(),
            ivar,
            &prep.grid,
            &prep.plan,
            prep.patch.pixpad_frac,
            opts,
            &mut *backend,
            progress,
            spot_cache,
        )
    };
    let Some(gain) = prep.ivar_model_gain else {
        return run(prep.preproc.ivar.view(), &prep.opts, progress, None);
    };
    let first_opts = first_pass_options(&prep.opts);
    let ccd = (0..prep.psf.npix_y, 0..prep.psf.npix_x);
    let mut ivar = first_pass_ivar(prep, gain, ccd.0.clone(), ccd.1.clone());
    // The second pass evaluates the same spots: the first keeps them (up to the budget).
    let mut spots = SpotCache::keeping(SPOT_CACHE_BYTES);
    let first = run(
        ivar.view(),
        &first_opts,
        &|d, t| progress(d, 2 * t),
        Some(&mut spots),
    )?;
    spots.stop_keeping();
    let (model, leverage) = first
        .model
        .zip(first.leverage)
        .expect("the first pass asked for the model and its leverage");
    second_pass_ivar(
        prep,
        gain,
        ccd,
        model.view(),
        leverage.view(),
        ivar.view_mut(),
    );
    drop((model, leverage));
    let mut second = run(
        ivar.view(),
        &prep.opts,
        &|d, t| progress(t + d, 2 * t),
        Some(&mut spots),
    )?;
    second.stats.add_times(&first.stats);
    Ok(second)
}

/// Finalises and writes a frame and, when one was computed, the model image: as one set, both
/// or neither (`io::frame::write_frame_set`).
pub fn write_outputs(
    res: &FrameResult,
    grid: &WaveGrid,
    meta: &FrameMeta,
    output: &Path,
    model_image: Option<(&Path, ModelFlux)>,
    overwrite: bool,
) -> Result<(), PrepareError> {
    let image = model_image
        .zip(res.model.as_ref())
        .map(|((path, flux), pixels)| {
            let image = ModelImage {
                pixels,
                flux: flux.name(),
                specmin: res.specmin,
                nspec: res.flux.nrows(),
                wave: &res.wave,
            };
            (path, image)
        });
    let model = image.as_ref().map(|(path, image)| (*path, image));
    write_frame_set(output, &frame_of(res, grid), meta, model, overwrite)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{check_camera, header_value, PrepareError};

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

    #[test]
    fn camera_mismatch_is_refused_unless_allowed_and_a_missing_camera_passes() {
        let (img, psf) = (Path::new("preproc-b0.fits"), Path::new("psf-r0.fits"));
        let err = check_camera(img, Some("b0"), psf, Some("r0"), false).unwrap_err();
        assert!(matches!(err, PrepareError::CameraMismatch { .. }));
        let msg = err.to_string();
        for part in [
            "preproc-b0.fits: CAMERA is b0",
            "PSF psf-r0.fits is for camera r0",
            "--allow-camera-mismatch",
        ] {
            assert!(msg.contains(part), "{msg}");
        }
        assert!(check_camera(img, Some("b0"), psf, Some("r0"), true).is_ok());
        assert!(check_camera(img, Some("r0"), psf, Some("r0"), false).is_ok());
        assert!(check_camera(img, Some("r0"), psf, None, false).is_ok());
        assert!(check_camera(img, None, psf, Some("r0"), false).is_ok());
        assert!(check_camera(img, None, psf, None, false).is_ok());
    }
}
