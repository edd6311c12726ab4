//! Per-patch spectroperfectionism (docs/science.md §5) behind the [`Backend`] trait.
//!
//! A backend takes a batch of host-side patches (pixel windows, ivar, spots) and returns one
//! [`PatchResult`] per patch. The CPU backend is the reference every other backend is compared
//! against. Here live what every backend shares: the input check ([`PatchInput::check`]) and
//! the regularisation constants; `engine` chooses and starts a backend; `fallback` completes a
//! device backend's batch on the CPU. Imports `psf` and `patch` only: no files, no MPI.

pub mod cpu;
pub mod engine;
pub mod fallback;
pub mod gpu;

use ndarray::{Array2, Array3, ArrayView2};

use crate::patch::{Patch, PixelWindow};
use crate::psf::{Psf, PsfError, SpotSet, SpotValues};

/// Options of the per-patch mathematics.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExtractOptions {
    /// Extra Tikhonov term `regularize²` on every well-constrained unknown (default 0).
    pub regularize: f64,
    /// Fractional PSF model error used by chi2pix (option, else header PSFERR, else 0.01).
    pub psferr: f64,
    /// Half-width of the stored resolution band (HSIZEY: 5 → 11 diagonals).
    pub ndiag: usize,
    /// Whether to compute each patch's contribution to the model image, and from which flux.
    pub model_image: Option<ModelFlux>,
    /// With the model image, also each pixel's leverage on it, `∂model/∂pix` (the hat
    /// matrix's diagonal over the core fibers' core bins), for a model that leaves the
    /// pixel's own noise out (`--ivar-from-model`).
    pub leverage: bool,
}

/// Which flux a patch projects through the PSF for its part of the model image (its core
/// fibers' core bins; the patches' parts are summed into the image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFlux {
    /// The deconvolved solution `f` (`A_core · f`), the model chi2pix is computed against: it
    /// reproduces the pixels up to noise.
    #[default]
    Deconvolved,
    /// The decorrelated flux `R·f` (`A_core · R·f`), gpu_specter's model image. The resolution
    /// matrix has already smoothed it in wavelength, so the image is the spectra smoothed twice.
    Decorrelated,
}

impl ModelFlux {
    /// Its name on the command line, in `pipeline.toml` and in the model image's header.
    pub fn name(self) -> &'static str {
        match self {
            ModelFlux::Deconvolved => "deconvolved",
            ModelFlux::Decorrelated => "decorrelated",
        }
    }
}

impl std::fmt::Display for ModelFlux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ModelFlux {
    type Err = String;

    fn from_str(s: &str) -> Result<ModelFlux, String> {
        match s {
            "deconvolved" => Ok(ModelFlux::Deconvolved),
            "decorrelated" => Ok(ModelFlux::Decorrelated),
            other => Err(format!(
                "--model-flux {other}: expected deconvolved or decorrelated"
            )),
        }
    }
}

/// A token for a region's pixels that a device backend holds, unique in the process, so that
/// the backend recognises a window of its own copy by the token alone and refuses a window of
/// another load (a stale one, or another backend's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoadId(u64);

impl LoadId {
    /// A token no other load of the process carries.
    pub fn mint() -> LoadId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        LoadId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl std::fmt::Display for LoadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pixel load #{}", self.0)
    }
}

/// Pixels a device backend holds: an image and its ivar, `rows × cols` each, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldPixels {
    /// Their token.
    pub id: LoadId,
    /// Rows.
    pub rows: usize,
    /// Columns: the row stride.
    pub cols: usize,
}

impl HeldPixels {
    /// `rows × cols` pixels under a fresh token.
    pub fn mint(rows: usize, cols: usize) -> HeldPixels {
        HeldPixels {
            id: LoadId::mint(),
            rows,
            cols,
        }
    }

    /// Elements of each array.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether they hold no pixel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a region's pixels are for a backend, as [`Backend::load_pixels`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLoad {
    /// On the host only: batches read the patches' own views.
    Host,
    /// Held by the backend (copied to, or received on, its device).
    Held(HeldPixels),
}

impl PixelLoad {
    /// Where the window part `ccd` lies in this load of the arrays that hold CCD rows
    /// `origin.0..` and columns `origin.1..`; None for pixels on the host.
    pub fn place(&self, ccd: PixelWindow, origin: (usize, usize)) -> Option<InLoad> {
        match self {
            PixelLoad::Host => None,
            PixelLoad::Held(h) => Some(InLoad {
                id: h.id,
                row: ccd.ymin as usize - origin.0,
                col: ccd.xmin as usize - origin.1,
            }),
        }
    }
}

/// Where a patch's pixels (its window's part on the CCD) lie in a load a backend holds: the
/// load and the row and column of their first pixel there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InLoad {
    /// The load.
    pub id: LoadId,
    /// Row of the first pixel in the load.
    pub row: usize,
    /// Its column.
    pub col: usize,
}

/// One patch ready for a backend: geometry, the pixels it reads and the spots it uses.
#[derive(Debug, Clone)]
pub struct PatchInput<'a> {
    /// Which fibers and wavelengths.
    pub patch: Patch,
    /// Where on the CCD; it may reach beyond the CCD's edge.
    pub window: PixelWindow,
    /// The part of `window` on the CCD, which `pix` and `ivar` hold: `window` itself unless
    /// the window leaves the CCD ([`PatchInput::leaves_ccd`]).
    pub ccd: PixelWindow,
    /// Image values of the window's part on the CCD (electrons), `[ccd.ny, ccd.nx]`.
    pub pix: ArrayView2<'a, f64>,
    /// Inverse variance of that part, already zero where masked.
    pub ivar: ArrayView2<'a, f64>,
    /// Spots of the bundle on the padded wavelength grid; patch fiber `f` is spot fiber
    /// `patch.specmin - spots.grid.fibermin + f`, patch bin `w` is spot bin `patch.iwave + w`.
    pub spots: &'a SpotSet,
    /// Where `pix` and `ivar` lie in the pixels a backend holds, when it holds them
    /// ([`PixelLoad::place`]); None when only the views hold them.
    pub loaded: Option<InLoad>,
}

impl<'a> PatchInput<'a> {
    /// The input of `patch`, reading `window` out of the whole-CCD `pix` and `ivar`; some of
    /// the window must lie on the CCD (`PixelWindow::clip` is not None).
    pub fn from_ccd(
        patch: Patch,
        window: PixelWindow,
        pix: ArrayView2<'a, f64>,
        ivar: ArrayView2<'a, f64>,
        spots: &'a SpotSet,
    ) -> PatchInput<'a> {
        let ccd = window
            .clip(pix.nrows(), pix.ncols())
            .expect("PatchInput::from_ccd: the window misses the CCD");
        Self::from_region(patch, window, ccd, pix, ivar, (0, 0), spots)
    }

    /// The input of `patch` from arrays holding the CCD from row `origin.0` and column
    /// `origin.1` on (a work unit's rectangle); `ccd`, the window's part on the CCD, must lie
    /// inside them.
    pub fn from_region(
        patch: Patch,
        window: PixelWindow,
        ccd: PixelWindow,
        pix: ArrayView2<'a, f64>,
        ivar: ArrayView2<'a, f64>,
        origin: (usize, usize),
        spots: &'a SpotSet,
    ) -> PatchInput<'a> {
        let rows = ccd.ymin as usize - origin.0..ccd.ymax as usize - origin.0;
        let cols = ccd.xmin as usize - origin.1..ccd.xmax as usize - origin.1;
        PatchInput {
            patch,
            window,
            ccd,
            pix: pix.slice_move(ndarray::s![rows.clone(), cols.clone()]),
            ivar: ivar.slice_move(ndarray::s![rows, cols]),
            spots,
            loaded: None,
        }
    }

    /// Whether the window reaches beyond the CCD (the input then holds only its part on it).
    pub fn leaves_ccd(&self) -> bool {
        self.ccd != self.window
    }

    /// The whole window's image and ivar, the pixels off the CCD at 0 with ivar 0: masked,
    /// like any bad pixel, so that they neither constrain the fluxes nor count in chi2pix,
    /// and count as masked in the pixmask fraction.
    pub fn padded(&self) -> (Array2<f64>, Array2<f64>) {
        let shape = (self.window.ny(), self.window.nx());
        let (mut pix, mut ivar) = (Array2::zeros(shape), Array2::zeros(shape));
        let (r0, c0) = (
            (self.ccd.ymin - self.window.ymin) as usize,
            (self.ccd.xmin - self.window.xmin) as usize,
        );
        let part = ndarray::s![r0..r0 + self.ccd.ny(), c0..c0 + self.ccd.nx()];
        pix.slice_mut(part).assign(&self.pix);
        ivar.slice_mut(part).assign(&self.ivar);
        (pix, ivar)
    }

    /// The fraction of each core bin's spot (core fibers × kept bins) that falls on the
    /// CCD: the PSF-weighted fraction of its pixels the CCD has at all. The spot's values sum
    /// to 1 over its whole footprint.
    pub fn ccd_light(&self) -> Array2<f64> {
        let p = self.patch;
        let s = self.spots;
        let (ny, nx) = (s.ny, s.nx);
        let f0 = p.specmin - s.grid.fibermin + p.core_fiber_offset();
        let c = self.ccd;
        Array2::from_shape_fn((p.nspec, p.nwave_keep), |(f, j)| {
            let i = s.index(f0 + f, p.iwave + p.wavepad + j);
            let spot = &s.values()[i * ny * nx..(i + 1) * ny * nx];
            let mut light = 0.0;
            for iy in 0..ny {
                let y = s.yc[i] + iy as i64;
                if y < c.ymin || y >= c.ymax {
                    continue;
                }
                for ix in 0..nx {
                    let x = s.xc[i] + ix as i64;
                    if x >= c.xmin && x < c.xmax {
                        light += spot[iy * nx + ix];
                    }
                }
            }
            light
        })
    }
}

/// A bin whose spot puts less than this fraction of its light on the CCD is not extracted
/// (NODATA, flux and ivar 0) even though its patch is: with most of its light off the chip its
/// flux would rest on the PSF's outer profile, the part of the model least known, and on
/// bins beyond the grid's end that no pixel constrains. Bins with more light on the CCD are
/// extracted with the pixels off it masked, and those with less than half of it there get
/// SOMEBADPIX by the usual pixmask rule (docs/science.md §5.10). The simulated frame of
/// `tests/it/structure.rs` (`synthetic_edge_bins_are_recovered`) measures the bins it lets in.
pub const MIN_CCD_LIGHT: f64 = 0.2;

/// Diagonal term every backend adds on every unknown of the normal equations.
pub const DIAG_EPSILON: f64 = 1e-15;
/// Regularisation of a patch's second solve when the first fails (gpu_specter's CPU retry).
pub const RETRY_REGULARIZE: f64 = 1e-4;
/// The diagonal term of that retry.
pub const RETRY_DIAG_EPSILON: f64 = 1e-8;

impl PatchInput<'_> {
    /// Rejects an input whose arrays disagree with its window or spots (every backend checks
    /// its batches with this before any work).
    pub fn check(&self) -> Result<(), ExtractError> {
        let bad = |msg: String| ExtractError::BadInput {
            ispec: self.patch.ispec,
            iwave: self.patch.iwave,
            msg,
        };
        let (w, c) = (self.window, self.ccd);
        if c.ymin < w.ymin || c.xmin < w.xmin || c.ymax > w.ymax || c.xmax > w.xmax {
            return Err(bad(format!(
                "the part on the CCD {c:?} is not inside the window {w:?}"
            )));
        }
        let shape = (c.ny(), c.nx());
        if self.pix.dim() != shape || self.ivar.dim() != shape {
            return Err(bad(format!(
                "pixel arrays {:?}/{:?} do not match the window's part on the CCD {:?}",
                self.pix.dim(),
                self.ivar.dim(),
                shape
            )));
        }
        if self.spots.values == SpotValues::Absent {
            return Err(bad("the spot set holds corners only, no values".into()));
        }
        let p = self.patch;
        let g = self.spots.grid;
        if p.specmin < g.fibermin
            || p.specmin + p.nspecpad > g.fibermin + g.nfiber
            || p.iwave + p.nwavetot > g.nwave
        {
            return Err(bad("spots do not cover the patch".into()));
        }
        Ok(())
    }

    /// Rejects an input whose spot values are not on the host, where a host backend reads
    /// them (a set a device backend holds serves that backend only).
    pub fn check_host_spots(&self) -> Result<(), ExtractError> {
        match self.spots.held() {
            None => Ok(()),
            Some(set) => Err(ExtractError::BadInput {
                ispec: self.patch.ispec,
                iwave: self.patch.iwave,
                msg: format!(
                    "its spot values are {set}, held by a device backend, not on the host"
                ),
            }),
        }
    }
}

/// What happened while extracting a patch (counts, not errors: faer's `Info` pattern).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PatchInfo {
    /// The first attempt produced NaN or a non-positive-definite system, and the patch was
    /// solved again with `regularize = 1e-4`.
    pub retried: bool,
    /// Even the retry failed: the patch's bins have ivar 0.
    pub failed: bool,
    /// The numbers were written into the backend's unit arrays on the device, not into the
    /// result (whose arrays are then empty; see `PatchResult::on_device`).
    pub on_device: bool,
}

/// Per-patch results for the core fibers and the kept core bins.
#[derive(Debug, Clone)]
pub struct PatchResult {
    /// Decorrelated flux per bin, `[nspec, nwave_keep]`.
    pub flux: Array2<f64>,
    /// Its inverse variance.
    pub fluxivar: Array2<f64>,
    /// Resolution diagonals `[nspec, 2·ndiag + 1, nwave_keep]`, dia layout (offsets +ndiag…-ndiag).
    pub resolution: Array3<f64>,
    /// PSF-weighted fraction of masked pixels.
    pub pixmask_fraction: Array2<f64>,
    /// PSF-weighted reduced chi² of the pixels.
    pub chi2pix: Array2<f64>,
    /// The patch's part of the model image over its window: its core fibers' `nwavestep` core
    /// bins projected through the PSF from the flux `ExtractOptions::model_image` names.
    pub model: Option<Array2<f64>>,
    /// For a patch whose window leaves the CCD, each kept bin's fraction of light on the CCD
    /// ([`PatchInput::ccd_light`]); the bins below [`MIN_CCD_LIGHT`] hold 0 and are NODATA.
    /// None for a patch on the CCD.
    pub ccd_light: Option<Array2<f64>>,
    /// The patch's part of each window pixel's leverage on the model image, when requested
    /// (`ExtractOptions::leverage`).
    pub leverage: Option<Array2<f64>>,
    /// What happened.
    pub info: PatchInfo,
}

impl PatchResult {
    /// A result whose numbers a device backend keeps in its unit arrays: no arrays here, the
    /// model image (a host array) kept when there is one.
    pub fn on_device(info: PatchInfo, model: Option<Array2<f64>>) -> PatchResult {
        PatchResult {
            flux: Array2::zeros((0, 0)),
            fluxivar: Array2::zeros((0, 0)),
            resolution: Array3::zeros((0, 0, 0)),
            pixmask_fraction: Array2::zeros((0, 0)),
            chi2pix: Array2::zeros((0, 0)),
            model,
            ccd_light: None,
            leverage: None,
            info: PatchInfo {
                on_device: true,
                ..info
            },
        }
    }

    /// Bins `(core fiber, kept bin)` with too little light on the CCD to be extracted.
    pub fn starved(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ccd_light
            .iter()
            .flat_map(|l| l.indexed_iter())
            .filter(|(_, &l)| l < MIN_CCD_LIGHT)
            .map(|(i, _)| i)
    }

    /// Zeroes the flux, ivar and chi2pix of the starved bins, as a NODATA bin holds them. Their
    /// resolution is kept: a bin's stored diagonals are a column of the resolution matrix,
    /// the weights of its true flux in the rows of its neighbours, which are extracted (zeroed,
    /// it biases every neighbour's `R·flux` low by what that bin contributes).
    pub fn zero_starved(&mut self) {
        let starved: Vec<_> = self.starved().collect();
        for (c, j) in starved {
            self.flux[[c, j]] = 0.0;
            self.fluxivar[[c, j]] = 0.0;
            self.chi2pix[[c, j]] = 0.0;
        }
    }

    /// A result with every value 0, for patches that are dropped or failed.
    pub fn empty(patch: &Patch, ndiag: usize) -> PatchResult {
        let shape = (patch.nspec, patch.nwave_keep);
        PatchResult {
            flux: Array2::zeros(shape),
            fluxivar: Array2::zeros(shape),
            resolution: Array3::zeros((patch.nspec, 2 * ndiag + 1, patch.nwave_keep)),
            pixmask_fraction: Array2::zeros(shape),
            chi2pix: Array2::zeros(shape),
            model: None,
            ccd_light: None,
            leverage: None,
            info: PatchInfo::default(),
        }
    }
}

/// Errors a backend reports: device, configuration or resource faults, not bad patches.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The PSF cannot give the spots asked for.
    #[error(transparent)]
    Psf(#[from] PsfError),
    /// The backend could not be set up or run.
    #[error("{backend} backend: {msg}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What went wrong.
        msg: String,
    },
    /// A patch's inputs are inconsistent with each other.
    #[error("patch at fiber {ispec}, bin {iwave}: {msg}")]
    BadInput {
        /// First core fiber.
        ispec: usize,
        /// First core bin.
        iwave: usize,
        /// The problem.
        msg: String,
    },
}

/// A way of doing the per-patch mathematics for a batch of patches.
pub trait Backend: Send {
    /// Short name for logs ("cpu", "gpu").
    fn name(&self) -> &'static str;

    /// Extracts every patch of `batch`; results come back in batch order and do not depend on
    /// how the backend schedules them.
    fn extract_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Vec<PatchResult>, ExtractError>;

    /// [`Backend::extract_batch`], calling `done(n)` as patches finish (`n` of them, from any
    /// of the backend's threads), so that progress moves within a batch. A backend that
    /// cannot tell says the whole batch at its end.
    fn extract_batch_counted(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
        done: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<PatchResult>, ExtractError> {
        let out = self.extract_batch(batch, opts)?;
        done(batch.len());
        Ok(out)
    }

    /// Evaluates the spots of frame fibers `fibermin .. fibermin + nfiber` at `waves` into
    /// `set`, labelled with those fibers (`psf` holds them from its row of [`Psf::fiber0`], and
    /// refuses others), for the batches that follow. A device backend may evaluate them there
    /// and leave the values there (`set.values` [`SpotValues::Held`] under a token it minted,
    /// the geometry on the host): such a set is good for that backend's batches only, until its
    /// next call; other backends, and that one after it, refuse it.
    fn evaluate_spots(
        &mut self,
        psf: &Psf,
        fibermin: usize,
        nfiber: usize,
        waves: &[f64],
        set: &mut SpotSet,
    ) -> Result<(), ExtractError> {
        Ok(crate::psf::spots::evaluate_into(
            psf, fibermin, nfiber, waves, set,
        )?)
    }

    /// Whether a set filled by [`Backend::evaluate_spots`] serves this backend's batches again
    /// later, after other sets were evaluated (a frame extracted twice, `--ivar-from-model`):
    /// true where the set holds the values on the host; a device backend that keeps them on
    /// the device until its next call says no.
    fn spots_reusable(&self) -> bool {
        true
    }

    /// The pixels that the windows of the coming batches are cut from (a work unit's, or the
    /// CCD's): a device backend copies them once here instead of once per patch, and answers
    /// where they are; the patches then say where their windows lie in that load
    /// ([`PatchInput::loaded`]). A load holds until the next one.
    fn load_pixels(
        &mut self,
        _pix: ArrayView2<'_, f64>,
        _ivar: ArrayView2<'_, f64>,
    ) -> Result<PixelLoad, ExtractError> {
        Ok(PixelLoad::Host)
    }

    /// How many bundles' patches this backend takes per batch: one on the CPU, whose threads
    /// share a batch; as many as fill a GPU.
    fn bundles_per_batch(&self) -> usize {
        1
    }

    /// Device seconds per stage since the last call, for `bench` and `extract`'s log (none on
    /// the CPU, whose stages the frame's own timings cover).
    fn take_stage_times(&mut self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}
