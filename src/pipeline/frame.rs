//! One frame, in memory: plan → spots per bundle → pixel windows → backend batches → assembly,
//! then per-Ångström units and the spectral mask (docs/science.md §2, §5.9–5.10).

use std::time::{Duration, Instant};

use ndarray::{s, Array2, Array3, ArrayView2};

use crate::extract::{Backend, ExtractError, ExtractOptions, PatchInput, PixelLoad};
use crate::patch::{pixels, plan, Plan, WaveGrid};
use crate::psf::spots::{self, SpotSet};
use crate::psf::{Psf, PsfError};

/// desispec specmask bits written by extraction.
pub mod specmask {
    /// pixmask_fraction > 0.5.
    pub const SOMEBADPIX: u32 = 1 << 0;
    /// pixmask_fraction == 1.
    pub const ALLBADPIX: u32 = 1 << 1;
    /// chi2pix far above its medians.
    pub const BAD2DFIT: u32 = 1 << 7;
    /// No extraction: the patch's window misses the CCD or could not be solved, the bin puts
    /// less than `extract::MIN_CCD_LIGHT` of its light on the CCD, or the bin has no data
    /// or a value that is not finite (see `withhold_unusable`).
    pub const NODATA: u32 = 1 << 8;
}

/// The extracted spectra of a frame, per bin (before per-Ångström units).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FrameResult {
    /// First fiber.
    pub specmin: usize,
    /// Output wavelength grid.
    pub wave: Vec<f64>,
    /// Flux `[nspec, nwave]`.
    pub flux: Array2<f64>,
    /// Inverse variance of the flux.
    pub ivar: Array2<f64>,
    /// Resolution diagonals `[nspec, 2·ndiag+1, nwave]`.
    pub resolution: Array3<f64>,
    /// chi2pix.
    pub chi2pix: Array2<f64>,
    /// PSF-weighted masked fraction.
    pub pixmask_fraction: Array2<f64>,
    /// Bins whose patch was dropped (off the CCD) or failed, bins with too little light on
    /// the CCD, and bins withheld before writing (`withhold_unusable`).
    pub nodata: Array2<bool>,
    /// Model image `[npix_y, npix_x]`, if requested.
    pub model: Option<Array2<f64>>,
    /// Each pixel's leverage on the model image, if requested (`ExtractOptions::leverage`).
    #[serde(default)]
    pub leverage: Option<Array2<f64>>,
    /// What happened, with timings.
    pub stats: FrameStats,
}

/// Counts and stage timings of one frame's extraction.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FrameStats {
    /// Patches extracted.
    pub patches: usize,
    /// Patches retried with extra regularisation.
    pub retried: usize,
    /// Patches that failed even so.
    pub failed: usize,
    /// Patches dropped because no pixel of theirs is on the CCD.
    pub dropped: usize,
    /// Patches whose window leaves the CCD, extracted with the pixels off it masked.
    pub edge: usize,
    /// Their bins with too little light on the CCD (`extract::MIN_CCD_LIGHT`), NODATA.
    pub starved: usize,
    /// Time evaluating spots.
    pub spots: Duration,
    /// Time in the backend.
    pub solve: Duration,
    /// Time assembling.
    pub assemble: Duration,
}

impl FrameStats {
    /// Adds another extraction's counts and timings (of other patches of the same frame).
    pub fn add(&mut self, other: &FrameStats) {
        self.patches += other.patches;
        self.retried += other.retried;
        self.failed += other.failed;
        self.dropped += other.dropped;
        self.edge += other.edge;
        self.starved += other.starved;
        self.add_times(other);
    }

    /// Adds another extraction's timings only (an earlier pass over the same patches, whose
    /// counts this one's repeat).
    pub fn add_times(&mut self, other: &FrameStats) {
        self.spots += other.spots;
        self.solve += other.solve;
        self.assemble += other.assemble;
    }
}

/// Errors of a frame extraction.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The PSF cannot serve this request.
    #[error(transparent)]
    Psf(#[from] PsfError),
    /// The backend failed.
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// Inputs disagree with each other.
    #[error("{0}")]
    Input(String),
}

/// Called as patches finish with (patches done, patches in all), from any of the backend's
/// threads: per patch on the CPU, per batch on a GPU.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// The CCD pixels a piece of work reads: `pix` and `ivar` (ivar already masked) hold CCD rows
/// `y0..` and columns `x0..`: the whole CCD, or a work unit's rectangle.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    /// Image values.
    pub pix: ArrayView2<'a, f64>,
    /// Inverse variance, zero where masked.
    pub ivar: ArrayView2<'a, f64>,
    /// CCD row of the arrays' first row.
    pub y0: usize,
    /// CCD column of the arrays' first column.
    pub x0: usize,
    /// Where the backend already holds these pixels (received on its device, the views then
    /// standing for them): [`extract_bundles`] does not load them again. None: it loads them
    /// ([`Backend::load_pixels`]).
    pub loaded: Option<PixelLoad>,
}

impl Region<'_> {
    /// Whether `w` (a window's part on the CCD) lies inside the region.
    pub fn contains(&self, w: &pixels::PixelWindow) -> bool {
        w.ymin >= self.y0 as i64
            && w.xmin >= self.x0 as i64
            && w.ymax <= (self.y0 + self.pix.nrows()) as i64
            && w.xmax <= (self.x0 + self.pix.ncols()) as i64
    }
}

/// A range of bundles to extract, and everything it reads.
#[derive(Debug, Clone)]
pub struct BundleWork<'a> {
    /// The PSF, holding at least the bundles' fibers (a unit carries only its fibers:
    /// [`Psf::fiber0`]).
    pub psf: &'a Psf,
    /// The pixels, covering every on-CCD patch window of the bundles.
    pub region: Region<'a>,
    /// Output and padded wavelength grids.
    pub grid: &'a WaveGrid,
    /// The frame's patches.
    pub plan: &'a Plan,
    /// Which of `plan.bundles`.
    pub bundles: std::ops::Range<usize>,
    /// Fraction of the padding rows kept around a patch's core rows.
    pub pixpad_frac: f64,
}

/// Spot sets kept from one extraction of a frame for another of the same frame (same PSF,
/// grids, plan and backend): `--ivar-from-model` extracts twice, and evaluating the spots is a
/// tenth of an extraction. Sets are kept while they fit in the budget (a whole frame's take
/// 1.8 GB on the r PSF at 0.8 Å: the groups beyond it are evaluated again), and only
/// where the backend's sets can be reused ([`Backend::spots_reusable`]).
#[derive(Debug, Default)]
pub struct SpotCache {
    /// By the first bundle of their group.
    sets: Vec<(usize, SpotSet)>,
    /// Bytes of spot values still allowed.
    room: usize,
    /// Whether sets evaluated from now on are kept.
    keeping: bool,
}

impl SpotCache {
    /// An empty cache that keeps the sets it is given up to `budget` bytes of spot values.
    pub fn keeping(budget: usize) -> Self {
        Self {
            sets: Vec::new(),
            room: budget,
            keeping: true,
        }
    }

    /// From now on hands out the sets it has, once each, and keeps no new one.
    pub fn stop_keeping(&mut self) {
        self.keeping = false;
    }

    /// Whether it keeps the sets it is offered.
    pub fn is_keeping(&self) -> bool {
        self.keeping
    }

    /// Bytes of spot values it holds.
    pub fn bytes(&self) -> usize {
        self.sets
            .iter()
            .map(|(_, s)| s.host_values().map_or(0, std::mem::size_of_val))
            .sum()
    }

    /// Whether it holds no set.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Allows it `room` more bytes from now on (in place of what was left).
    pub fn allow(&mut self, room: usize) {
        self.room = room;
    }

    /// The kept set of the group starting at bundle `first`, when it covers `grid`.
    fn take(&mut self, first: usize, grid: spots::SpotGrid) -> Option<SpotSet> {
        let i = self
            .sets
            .iter()
            .position(|(b, s)| *b == first && s.grid == grid)?;
        Some(self.sets.swap_remove(i).1)
    }

    /// Keeps `set` (of the group starting at bundle `first`) when keeping, its values are on
    /// the host and it fits; gives it back otherwise.
    fn offer(&mut self, first: usize, set: SpotSet) -> Option<SpotSet> {
        let Some(bytes) = set.host_values().map(std::mem::size_of_val) else {
            return Some(set);
        };
        if !self.keeping || bytes > self.room {
            return Some(set);
        }
        self.room -= bytes;
        self.sets.push((first, set));
        None
    }
}

/// Extracts fibers `plan.specmin ..` of a whole-CCD image (`pix`, `ivar` already masked).
#[allow(clippy::too_many_arguments)]
pub fn extract_frame(
    psf: &Psf,
    pix: ArrayView2<'_, f64>,
    ivar: ArrayView2<'_, f64>,
    grid: &WaveGrid,
    plan: &Plan,
    pixpad_frac: f64,
    opts: &ExtractOptions,
    backend: &mut dyn Backend,
    progress: Progress<'_>,
    spot_cache: Option<&mut SpotCache>,
) -> Result<FrameResult, FrameError> {
    if pix.dim() != (psf.npix_y, psf.npix_x) || ivar.dim() != pix.dim() {
        return Err(FrameError::Input(format!(
            "image is {}x{} (rows x columns) but the PSF describes a {}x{} CCD",
            pix.nrows(),
            pix.ncols(),
            psf.npix_y,
            psf.npix_x
        )));
    }
    let work = BundleWork {
        psf,
        region: Region {
            pix,
            ivar,
            y0: 0,
            x0: 0,
            loaded: None,
        },
        grid,
        plan,
        bundles: 0..plan.bundles.len(),
        pixpad_frac,
    };
    extract_bundles(&work, opts, backend, progress, spot_cache)
}

/// Extracts the fibers of `work.bundles`: spots per bundle → pixel windows → backend batches →
/// assembly. The result covers those fibers only (its `specmin` is the first bundle's first
/// fiber); a model image, when requested, covers the region. Spot sets come from, and go to,
/// `spot_cache` when one is given and the backend can reuse them.
pub fn extract_bundles(
    work: &BundleWork<'_>,
    opts: &ExtractOptions,
    backend: &mut dyn Backend,
    progress: Progress<'_>,
    spot_cache: Option<&mut SpotCache>,
) -> Result<FrameResult, FrameError> {
    let (psf, region, grid, plan) = (work.psf, work.region, work.grid, work.plan);
    let bundles = &plan.bundles[work.bundles.clone()];
    let specmin = bundles.first().map_or(plan.specmin, |b| b.0);
    let nspec: usize = bundles.iter().map(|b| b.1).sum();
    // Refused before any work; the spot evaluator refuses each group's fibers as well.
    psf.rows(specmin, nspec)
        .map_err(|e| FrameError::Input(format!("the bundles' {e}")))?;
    let nwave = grid.wave.len();
    let ndiag = opts.ndiag;
    let mut out = FrameResult {
        specmin,
        wave: grid.wave.clone(),
        flux: Array2::zeros((nspec, nwave)),
        ivar: Array2::zeros((nspec, nwave)),
        resolution: Array3::zeros((nspec, 2 * ndiag + 1, nwave)),
        chi2pix: Array2::zeros((nspec, nwave)),
        pixmask_fraction: Array2::zeros((nspec, nwave)),
        nodata: Array2::from_elem((nspec, nwave), false),
        model: opts.model_image.map(|_| Array2::zeros(region.pix.dim())),
        leverage: (opts.model_image.is_some() && opts.leverage)
            .then(|| Array2::zeros(region.pix.dim())),
        stats: FrameStats::default(),
    };
    let total: usize = plan.patches[work.bundles.clone()]
        .iter()
        .map(Vec::len)
        .sum();
    let mut done = 0;
    let mut spots = spots::evaluate(psf, 0, 0, &[])?;
    let load = match region.loaded {
        Some(load) => load,
        None => backend.load_pixels(region.pix, region.ivar)?,
    };
    let per_batch = backend.bundles_per_batch().max(1);
    let mut spot_cache = spot_cache.filter(|_| backend.spots_reusable());
    for (g, group) in plan.patches[work.bundles.clone()]
        .chunks(per_batch)
        .enumerate()
    {
        let patches: Vec<_> = group.iter().flatten().copied().collect();
        if patches.is_empty() {
            continue;
        }
        let first_bundle = work.bundles.start + g * per_batch;
        let t0 = Instant::now();
        let (fmin, nfib) = plan::fiber_span(&patches);
        let want = spots::SpotGrid {
            fibermin: fmin,
            nfiber: nfib,
            nwave: grid.padded.len(),
        };
        match spot_cache.as_mut().and_then(|c| c.take(first_bundle, want)) {
            Some(kept) => spots = kept,
            None => backend.evaluate_spots(psf, fmin, nfib, &grid.padded, &mut spots)?,
        }
        let t1 = Instant::now();
        let mut inputs = Vec::with_capacity(patches.len());
        for p in &patches {
            let window = pixels::window(p, &spots, work.pixpad_frac);
            let Some(ccd) = window.clip(psf.npix_y, psf.npix_x) else {
                out.stats.dropped += 1;
                mark_nodata(&mut out, p.ispec, p.nspec, p.iwave, p.nwave_keep);
                continue;
            };
            if !region.contains(&ccd) {
                return Err(FrameError::Input(format!(
                    "patch at fiber {}, bin {} reads CCD rows {}..{}, columns {}..{}, outside \
                     the pixels it was given (rows {}.., columns {}..)",
                    p.ispec, p.iwave, ccd.ymin, ccd.ymax, ccd.xmin, ccd.xmax, region.y0, region.x0
                )));
            }
            out.stats.edge += usize::from(ccd != window);
            let mut inp = PatchInput::from_region(
                *p,
                window,
                ccd,
                region.pix,
                region.ivar,
                (region.y0, region.x0),
                &spots,
            );
            inp.loaded = load.place(ccd, (region.y0, region.x0));
            inputs.push(inp);
        }
        let finished = std::sync::atomic::AtomicUsize::new(done);
        let results = backend.extract_batch_counted(&inputs, opts, &|n| {
            let d = finished.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            progress(d, total);
        })?;
        let t2 = Instant::now();
        for (inp, r) in inputs.iter().zip(results) {
            let p = &inp.patch;
            let f = p.ispec - specmin;
            let (w0, nk) = (p.iwave, p.nwave_keep);
            out.stats.retried += usize::from(r.info.retried);
            if r.info.failed {
                out.stats.failed += 1;
                mark_nodata(&mut out, p.ispec, p.nspec, p.iwave, nk);
                continue;
            }
            // The backend zeroed their flux and ivar (on the device too, where results stay
            // there) and kept their resolution columns, the weights in their neighbours.
            for (c, j) in r.starved() {
                out.stats.starved += 1;
                mark_nodata(&mut out, p.ispec + c, 1, w0 + j, 1);
            }
            if !r.info.on_device {
                let cells = s![f..f + p.nspec, w0..w0 + nk];
                for (dst, src) in [
                    (&mut out.flux, &r.flux),
                    (&mut out.ivar, &r.fluxivar),
                    (&mut out.chi2pix, &r.chi2pix),
                    (&mut out.pixmask_fraction, &r.pixmask_fraction),
                ] {
                    dst.slice_mut(cells).assign(src);
                }
                out.resolution
                    .slice_mut(s![f..f + p.nspec, .., w0..w0 + nk])
                    .assign(&r.resolution);
            }
            for (image, part) in [(&mut out.model, &r.model), (&mut out.leverage, &r.leverage)] {
                if let (Some(image), Some(part)) = (image.as_mut(), part.as_ref()) {
                    // The part covers the window; the image, the window's part on the CCD.
                    let (w, c) = (inp.window, inp.ccd);
                    let (ry, rx) = (c.ymin as usize - region.y0, c.xmin as usize - region.x0);
                    let (my, mx) = ((c.ymin - w.ymin) as usize, (c.xmin - w.xmin) as usize);
                    let mut dst = image.slice_mut(s![ry..ry + c.ny(), rx..rx + c.nx()]);
                    dst += &part.slice(s![my..my + c.ny(), mx..mx + c.nx()]);
                }
            }
        }
        out.stats.patches += inputs.len();
        out.stats.spots += t1 - t0;
        out.stats.solve += t2 - t1;
        out.stats.assemble += t2.elapsed();
        done += patches.len();
        progress(done, total);
        if let Some(cache) = spot_cache.as_mut() {
            // A kept set leaves an empty one behind, for the next group to fill.
            let set = std::mem::replace(&mut spots, spots::evaluate(psf, 0, 0, &[])?);
            if let Some(back) = cache.offer(first_bundle, set) {
                spots = back;
            }
        }
    }
    Ok(out)
}

/// Whether every value a frame file stores for fiber `f`, bin `j` (flux and ivar per Ångström,
/// `dw` being the bin's width; chi2pix; the resolution column) is finite as a float32.
fn storable(res: &FrameResult, f: usize, j: usize, dw: f64) -> bool {
    let stored = |v: f64| (v as f32).is_finite();
    stored(res.flux[[f, j]] / dw)
        && stored(res.ivar[[f, j]] * dw * dw)
        && stored(res.chi2pix[[f, j]])
        && res
            .resolution
            .slice(s![f, .., j])
            .iter()
            .all(|&v| stored(v))
}

fn mark_nodata(out: &mut FrameResult, ispec: usize, nspec: usize, iwave: usize, nkeep: usize) {
    let f = ispec - out.specmin;
    out.nodata
        .slice_mut(s![f..f + nspec, iwave..iwave + nkeep])
        .fill(true);
}

/// A bin whose spot puts less than this fraction of its light on pixels with ivar > 0 has no
/// data: its unknown is decoupled from every other (no weighted pixel is shared), so its flux
/// and ivar are the regularisation's alone (ivar about 1e-15 where the whole patch is empty).
/// The spot sums to 1, so a bin without any unmasked pixel has a pixmask fraction of 1 up to
/// rounding (about 1e-14); a bin with one unmasked pixel in its spot's far wing still has far
/// more than this.
pub const NO_DATA_LIGHT: f64 = 1e-10;

/// Bins a frame withholds: written as NODATA with flux, ivar, chi2pix and resolution 0, like
/// the bins of a patch whose window missed the CCD, because their numbers say nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Withheld {
    /// Bins whose spot falls on masked pixels (or ivar 0) only.
    pub no_data: usize,
    /// Bins with a value that is not finite, in f64 or once stored as float32 (an image of
    /// 1e38 gives fluxes beyond float32's range).
    pub non_finite: usize,
    /// Bins NODATA already: their patch's window missed the CCD or could not be solved, or
    /// too little of their light falls on the CCD.
    pub dropped: usize,
    /// Bins of the frame.
    pub bins: usize,
}

impl Withheld {
    /// Whether no bin of the frame is left to write.
    pub fn all(&self) -> bool {
        self.no_data + self.non_finite + self.dropped >= self.bins
    }
}

/// Marks NODATA, and zeroes, every bin without data and every bin with a value that a frame
/// file (float32) cannot hold as a finite number (docs/science.md §5.9, §6), so that nothing
/// meaningless is written as if valid. A frame with neither is left bit for bit as it was.
pub fn withhold_unusable(res: &mut FrameResult, grid: &WaveGrid) -> Withheld {
    let dwave = grid.dwave();
    let (nspec, nwave) = res.flux.dim();
    let mut w = Withheld {
        bins: nspec * nwave,
        ..Withheld::default()
    };
    for f in 0..nspec {
        for (j, &dw) in dwave.iter().enumerate() {
            if res.nodata[[f, j]] {
                w.dropped += 1;
                continue;
            }
            if res.pixmask_fraction[[f, j]] >= 1.0 - NO_DATA_LIGHT {
                w.no_data += 1;
            } else if !storable(res, f, j, dw) {
                w.non_finite += 1;
            } else {
                continue;
            }
            res.nodata[[f, j]] = true;
            res.flux[[f, j]] = 0.0;
            res.ivar[[f, j]] = 0.0;
            res.chi2pix[[f, j]] = 0.0;
            res.resolution.slice_mut(s![f, .., j]).fill(0.0);
        }
    }
    w
}

/// The frame as desispec writes it: flux and ivar per Ångström and the spectral mask.
#[derive(Debug, Clone)]
pub struct FinalFrame {
    /// Flux per Ångström.
    pub flux: Array2<f64>,
    /// Its inverse variance.
    pub ivar: Array2<f64>,
    /// desispec specmask bits.
    pub mask: Array2<u32>,
}

/// Applies per-Ångström units (`dwave = numpy.gradient(wave)`) and the spectral mask of
/// desispec `scripts/extract.py` (docs/science.md §5.9–5.10).
pub fn finalize(res: &FrameResult, grid: &WaveGrid) -> FinalFrame {
    let dwave = grid.dwave();
    let mut flux = res.flux.clone();
    let mut ivar = res.ivar.clone();
    for mut row in flux.outer_iter_mut() {
        row.iter_mut().zip(&dwave).for_each(|(v, d)| *v /= d);
    }
    for mut row in ivar.outer_iter_mut() {
        row.iter_mut().zip(&dwave).for_each(|(v, d)| *v *= d * d);
    }
    let (nspec, nwave) = res.flux.dim();
    let mut mask = Array2::<u32>::zeros((nspec, nwave));
    let med_over_fibers: Vec<f64> = (0..nwave)
        .map(|w| median(res.chi2pix.column(w).iter().copied()))
        .collect();
    let med_over_waves: Vec<f64> = (0..nspec)
        .map(|f| median(res.chi2pix.row(f).iter().copied()))
        .collect();
    for f in 0..nspec {
        for w in 0..nwave {
            let pm = res.pixmask_fraction[[f, w]];
            let mut m = 0;
            if pm > 0.5 {
                m |= specmask::SOMEBADPIX;
            }
            if pm == 1.0 {
                m |= specmask::ALLBADPIX;
            }
            let c = res.chi2pix[[f, w]];
            if c > 5.0 * med_over_fibers[w] && c > 5.0 * med_over_waves[f] {
                m |= specmask::BAD2DFIT;
            }
            if res.nodata[[f, w]] {
                m |= specmask::NODATA;
            }
            mask[[f, w]] = m;
        }
    }
    FinalFrame { flux, ivar, mask }
}

/// numpy's median: the mean of the two middle values for an even count.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::extract::cpu::{tests::toy_psf, CpuBackend};
    use crate::extract::PatchResult;
    use crate::patch::PatchOptions;
    use crate::psf::SpotSet;

    /// The CPU backend taking `per_batch` bundles at a time, as a GPU does, and recording
    /// the calls it gets.
    struct Grouped {
        per_batch: usize,
        batches: Vec<usize>,
        loads: usize,
        spot_sets: Vec<usize>,
    }

    impl Backend for Grouped {
        fn name(&self) -> &'static str {
            "grouped"
        }

        fn extract_batch(
            &mut self,
            batch: &[PatchInput<'_>],
            opts: &ExtractOptions,
        ) -> Result<Vec<PatchResult>, ExtractError> {
            self.batches.push(batch.len());
            CpuBackend.extract_batch(batch, opts)
        }

        fn evaluate_spots(
            &mut self,
            psf: &Psf,
            fibermin: usize,
            nfiber: usize,
            waves: &[f64],
            set: &mut SpotSet,
        ) -> Result<(), ExtractError> {
            self.spot_sets.push(nfiber);
            Ok(spots::evaluate_into(psf, fibermin, nfiber, waves, set)?)
        }

        fn load_pixels(
            &mut self,
            _pix: ArrayView2<'_, f64>,
            _ivar: ArrayView2<'_, f64>,
        ) -> Result<PixelLoad, ExtractError> {
            self.loads += 1;
            Ok(PixelLoad::Host)
        }

        fn bundles_per_batch(&self) -> usize {
            self.per_batch
        }
    }

    /// The CPU backend answering that it holds the pixels, recording where each patch says
    /// its pixels lie in that load and where its views point.
    #[derive(Default)]
    struct Holding {
        loads: Vec<crate::extract::HeldPixels>,
        /// Where each patch's pixels lie, and the address its view starts at.
        seen: Vec<(Option<crate::extract::InLoad>, usize)>,
    }

    impl Backend for Holding {
        fn name(&self) -> &'static str {
            "holding"
        }

        fn extract_batch(
            &mut self,
            batch: &[PatchInput<'_>],
            opts: &ExtractOptions,
        ) -> Result<Vec<PatchResult>, ExtractError> {
            self.seen
                .extend(batch.iter().map(|i| (i.loaded, i.pix.as_ptr() as usize)));
            CpuBackend.extract_batch(batch, opts)
        }

        fn load_pixels(
            &mut self,
            pix: ArrayView2<'_, f64>,
            _ivar: ArrayView2<'_, f64>,
        ) -> Result<PixelLoad, ExtractError> {
            let held = crate::extract::HeldPixels::mint(pix.nrows(), pix.ncols());
            self.loads.push(held);
            Ok(PixelLoad::Held(held))
        }
    }

    /// Every patch names the load its backend answered and where its window lies there (the
    /// place its views are cut from); a region whose pixels the backend already holds is not
    /// loaded again, and its patches name that load.
    #[test]
    fn patches_name_where_their_window_lies_in_the_backends_load() {
        let toy = ToyFrame::new();
        let mut holding = Holding::default();
        toy.extract(&mut holding);
        assert_eq!(holding.loads.len(), 1);
        let id = holding.loads[0].id;
        assert!(!holding.seen.is_empty());
        for (at, ptr) in &holding.seen {
            let at = at.expect("a patch naming the load");
            assert_eq!(at.id, id);
            assert_eq!(*ptr, &toy.pix[[at.row, at.col]] as *const f64 as usize);
        }
        let held = crate::extract::HeldPixels::mint(toy.pix.nrows(), toy.pix.ncols());
        let work = BundleWork {
            psf: &toy.psf,
            region: Region {
                pix: toy.pix.view(),
                ivar: toy.ivar.view(),
                y0: 0,
                x0: 0,
                loaded: Some(PixelLoad::Held(held)),
            },
            grid: &toy.grid,
            plan: &toy.plan,
            bundles: 0..toy.plan.bundles.len(),
            pixpad_frac: toy.popts.pixpad_frac,
        };
        let mut again = Holding::default();
        extract_bundles(&work, &toy.opts, &mut again, &|_, _| {}, None).unwrap();
        assert!(again.loads.is_empty(), "held pixels loaded again");
        assert!(again
            .seen
            .iter()
            .all(|(at, _)| at.map(|a| a.id) == Some(held.id)));
    }

    /// A small frame for frame-level tests (here and the GPU backend's): 20 toy fibers in 4
    /// bundles of 5, 100 bins, patterned pixels with every 53rd diagonal masked.
    pub(crate) struct ToyFrame {
        pub psf: Psf,
        pub popts: PatchOptions,
        pub grid: WaveGrid,
        pub plan: Plan,
        pub pix: Array2<f64>,
        pub ivar: Array2<f64>,
        pub opts: ExtractOptions,
    }

    impl ToyFrame {
        pub fn new() -> ToyFrame {
            let psf = toy_psf(20, 3);
            let popts = PatchOptions {
                bundlesize: 5,
                nsubbundles: 1,
                nwavestep: 20,
                ..PatchOptions::default()
            };
            let grid = WaveGrid::new(5200.0, 5300.0, 1.0, &popts).unwrap();
            let plan = Plan::new(0, 20, grid.wave.len(), psf.nfiber(), &popts);
            let (ny, nx) = (psf.npix_y, psf.npix_x);
            let pix =
                Array2::from_shape_fn((ny, nx), |(r, c)| 10.0 + ((r * 7 + c * 3) % 11) as f64);
            let ivar =
                Array2::from_shape_fn((ny, nx), |(r, c)| if (r + c) % 53 == 0 { 0.0 } else { 1.0 });
            let opts = ExtractOptions {
                regularize: 0.0,
                psferr: 0.01,
                ndiag: psf.hsizey,
                model_image: None,
                leverage: false,
            };
            ToyFrame {
                psf,
                popts,
                grid,
                plan,
                pix,
                ivar,
                opts,
            }
        }

        /// The frame through `backend`.
        pub fn extract(&self, backend: &mut dyn Backend) -> FrameResult {
            extract_frame(
                &self.psf,
                self.pix.view(),
                self.ivar.view(),
                &self.grid,
                &self.plan,
                self.popts.pixpad_frac,
                &self.opts,
                backend,
                &|_, _| {},
                None,
            )
            .unwrap()
        }
    }

    /// Progress moves per patch on the CPU, not once per bundle: the bar of a one-bundle
    /// run made one jump, from 0 to the end.
    #[test]
    fn progress_moves_per_patch_within_a_bundle() {
        let toy = ToyFrame::new();
        let per_bundle = toy.plan.patches[0].len();
        assert!(per_bundle > 1, "the toy bundle has several patches");
        let calls = std::sync::Mutex::new(Vec::new());
        extract_frame(
            &toy.psf,
            toy.pix.view(),
            toy.ivar.view(),
            &toy.grid,
            &toy.plan,
            toy.popts.pixpad_frac,
            &toy.opts,
            &mut CpuBackend,
            &|done, total| calls.lock().unwrap().push((done, total)),
            None,
        )
        .unwrap();
        let calls = calls.into_inner().unwrap();
        let total = toy.plan.npatch();
        let within_first: Vec<_> = calls.iter().filter(|(d, _)| *d < per_bundle).collect();
        assert!(
            within_first.len() >= per_bundle - 1,
            "{} calls before the first bundle ended: {calls:?}",
            within_first.len()
        );
        assert_eq!(calls.iter().map(|c| c.0).max(), Some(total));
        assert!(calls.iter().all(|c| c.1 == total));
    }

    /// A backend that takes several bundles per batch (one spot set for all of them, the
    /// pixels announced once) gives the frame of one bundle per batch, bit for bit.
    #[test]
    fn bundles_grouped_per_batch_give_the_same_frame() {
        let toy = ToyFrame::new();
        let plan = &toy.plan;
        assert_eq!(plan.bundles.len(), 4);
        let run = |backend: &mut dyn Backend| toy.extract(backend);
        let one = run(&mut CpuBackend);
        let mut grouped = Grouped {
            per_batch: 3,
            batches: Vec::new(),
            loads: 0,
            spot_sets: Vec::new(),
        };
        let three = run(&mut grouped);
        assert_eq!(grouped.loads, 1);
        assert_eq!(grouped.spot_sets.len(), 2, "bundles 0-2, then 3");
        assert_eq!(grouped.batches.len(), 2);
        assert_eq!(
            grouped.batches.iter().sum::<usize>() + three.stats.dropped,
            plan.npatch()
        );
        let bits = |a: &Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.flux), bits(&three.flux));
        assert_eq!(bits(&one.ivar), bits(&three.ivar));
        assert_eq!(bits(&one.chi2pix), bits(&three.chi2pix));
        assert_eq!(bits(&one.pixmask_fraction), bits(&three.pixmask_fraction));
        assert_eq!(one.nodata, three.nodata);
        assert!(one
            .resolution
            .iter()
            .zip(&three.resolution)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(one.flux.iter().any(|&f| f != 0.0));
    }

    /// A second extraction of the frame (other weights, as `--ivar-from-model`'s second pass)
    /// takes the spot sets the first kept instead of evaluating them again, and gives the
    /// frame it gives without them, bit for bit; sets beyond the budget are evaluated again.
    #[test]
    fn kept_spot_sets_serve_a_second_extraction() {
        let toy = ToyFrame::new();
        let ivar2 = toy.ivar.mapv(|v| 0.5 * v);
        let run = |backend: &mut dyn Backend,
                   ivar: ArrayView2<'_, f64>,
                   cache: Option<&mut SpotCache>| {
            extract_frame(
                &toy.psf,
                toy.pix.view(),
                ivar,
                &toy.grid,
                &toy.plan,
                toy.popts.pixpad_frac,
                &toy.opts,
                backend,
                &|_, _| {},
                cache,
            )
            .unwrap()
        };
        let want = run(&mut CpuBackend, ivar2.view(), None);
        let bits = |a: &Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let nbundle = toy.plan.bundles.len();
        let mut one_set = spots::evaluate(&toy.psf, 0, 0, &[]).unwrap();
        let (fmin, nfib) = plan::fiber_span(&toy.plan.patches[0]);
        spots::evaluate_into(&toy.psf, fmin, nfib, &toy.grid.padded, &mut one_set).unwrap();
        let set_bytes = std::mem::size_of_val(one_set.values());
        // Room for all, then for one set only.
        for (budget, evaluated_again) in [(usize::MAX, 0), (set_bytes, nbundle - 1)] {
            let mut grouped = Grouped {
                per_batch: 1,
                batches: Vec::new(),
                loads: 0,
                spot_sets: Vec::new(),
            };
            let mut cache = SpotCache::keeping(budget);
            run(&mut grouped, toy.ivar.view(), Some(&mut cache));
            assert_eq!(grouped.spot_sets.len(), nbundle);
            cache.stop_keeping();
            let second = run(&mut grouped, ivar2.view(), Some(&mut cache));
            assert_eq!(grouped.spot_sets.len(), nbundle + evaluated_again);
            assert_eq!(bits(&want.flux), bits(&second.flux));
            assert_eq!(bits(&want.ivar), bits(&second.ivar));
            assert_eq!(bits(&want.chi2pix), bits(&second.chi2pix));
            assert!(want
                .resolution
                .iter()
                .zip(&second.resolution)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// A frame with data and finite values everywhere (every 53rd diagonal masked, as real
    /// frames have bad pixels) is left bit for bit; a bin pushed beyond float32 and a bin
    /// whose spot is wholly masked are withheld, and only they.
    #[test]
    fn only_bins_without_data_or_finite_values_are_withheld() {
        let toy = ToyFrame::new();
        let mut res = toy.extract(&mut CpuBackend);
        let before = res.clone();
        let w = withhold_unusable(&mut res, &toy.grid);
        assert_eq!((w.no_data, w.non_finite), (0, 0), "{w:?}");
        assert_eq!(w.bins, res.flux.len());
        let bits = |a: &Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&before.flux), bits(&res.flux));
        assert_eq!(bits(&before.ivar), bits(&res.ivar));
        assert_eq!(bits(&before.chi2pix), bits(&res.chi2pix));
        assert_eq!(before.nodata, res.nodata);

        let live: Vec<(usize, usize)> = res
            .nodata
            .indexed_iter()
            .filter(|(_, &n)| !n)
            .map(|(i, _)| i)
            .take(2)
            .collect();
        let (huge, empty) = (live[0], live[1]);
        res.flux[huge] = 1e39;
        res.pixmask_fraction[empty] = 1.0 - 1e-15;
        let w = withhold_unusable(&mut res, &toy.grid);
        assert_eq!((w.no_data, w.non_finite), (1, 1), "{w:?}");
        for bin in [huge, empty] {
            assert!(res.nodata[bin]);
            assert_eq!(
                (res.flux[bin], res.ivar[bin], res.chi2pix[bin]),
                (0.0, 0.0, 0.0)
            );
            assert!(res
                .resolution
                .slice(s![bin.0, .., bin.1])
                .iter()
                .all(|&v| v == 0.0));
        }
        let fin = finalize(&res, &toy.grid);
        assert_eq!(fin.mask[huge] & specmask::NODATA, specmask::NODATA);
        assert!(!w.all());
    }
}
