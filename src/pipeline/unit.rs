//! Work units: a frame cut into bundle ranges, each carrying only the pixel rectangle and the
//! PSF rows its patches read, and the results the writer puts back together.
//!
//! Imports `psf`, `patch`, `extract`, `io` (frame metadata) and the pipeline's `frame` and
//! `prepare`.

use std::ops::Range;
use std::path::PathBuf;

use ndarray::{s, Array2};
use serde::{Deserialize, Serialize};

use super::frame::{
    extract_bundles, BundleWork, FrameError, FrameResult, FrameStats, Region, SpotCache,
};
use super::prepare::{first_pass_options, frame_meta, Prepared};
use crate::extract::{Backend, ExtractOptions, PixelLoad};
use crate::io::frame::FrameMeta;
use crate::patch::{pixels, plan, PatchOptions, Plan, WaveGrid};
use crate::psf::{spots, Psf, PsfError};

/// Why a unit could not be cut, computed or put back into its frame, naming unit and frame.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// The PSF could not place a unit's patches on the CCD.
    #[error(transparent)]
    Psf(#[from] PsfError),
    /// The extraction of a unit's bundles failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A unit names bundles its frame's plan does not have.
    #[error("unit {unit} of frame {job} names bundles {bundles:?} of a plan with {nbundles}")]
    Bundles {
        /// The unit.
        unit: usize,
        /// Its frame.
        job: usize,
        /// The bundles it names.
        bundles: Range<usize>,
        /// Bundles of the plan.
        nbundles: usize,
    },
    /// A unit beyond the frame's count.
    #[error("unit {unit} of frame {job} but the frame has {nunits} units")]
    OutOfRange {
        /// The unit.
        unit: usize,
        /// Its frame.
        job: usize,
        /// Units of the frame.
        nunits: usize,
    },
    /// A unit received twice.
    #[error("unit {unit} of frame {job} arrived twice")]
    Twice {
        /// The unit.
        unit: usize,
        /// Its frame.
        job: usize,
    },
    /// A unit's model share does not lie on the CCD.
    #[error(
        "unit {unit} of frame {job}: its model share (CCD rows {rows:?}, columns {cols:?}) is \
         not on the {}x{} CCD",
        .ccd.0,
        .ccd.1
    )]
    Share {
        /// The unit.
        unit: usize,
        /// Its frame.
        job: usize,
        /// The share's CCD rows.
        rows: Range<usize>,
        /// Its CCD columns.
        cols: Range<usize>,
        /// The CCD's rows and columns.
        ccd: (usize, usize),
    },
    /// A unit of the frame failed (the first that did).
    #[error("unit {unit}: {why}")]
    Failed {
        /// The unit.
        unit: usize,
        /// Its error, as the compute rank sent it.
        why: String,
    },
}

/// What a unit's results are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnitPass {
    /// The frame's spectra: the results go to the frame's writer.
    Final,
    /// The first pass of `--ivar-from-model`: the unit's share of the model image, and the
    /// pixels' leverage on it, go back to the unit's reader, which puts the frame's model
    /// together and cuts the frame again with the variance from it.
    Model,
}

/// What a compute rank needs to rebuild a frame's plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitSetup {
    /// Output and padded wavelength grids.
    pub grid: WaveGrid,
    /// First fiber of the frame's extraction.
    pub specmin: usize,
    /// Fibers extracted.
    pub nspec: usize,
    /// Fibers of the whole PSF (bounds the padding neighbours).
    pub nfiber_psf: usize,
    /// Patch geometry.
    pub patch: PatchOptions,
    /// Per-patch options.
    pub opts: ExtractOptions,
}

impl UnitSetup {
    /// The frame's patch plan, identical to the one the reader cut.
    pub fn plan(&self) -> Plan {
        Plan::new(
            self.specmin,
            self.nspec,
            self.grid.wave.len(),
            self.nfiber_psf,
            &self.patch,
        )
    }
}

/// A bundle range of one frame, with the pixels and PSF rows it reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitInput {
    /// Index of the frame in the run's list.
    pub job: usize,
    /// Index of this unit in the frame.
    pub unit: usize,
    /// Bundles of the plan.
    pub bundles: Range<usize>,
    /// How to rebuild the plan.
    pub setup: UnitSetup,
    /// The PSF rows of the unit's fibers (its `fiber0` is their first).
    pub psf: Psf,
    /// CCD row of `pix`'s first row.
    pub y0: usize,
    /// CCD column of `pix`'s first column.
    pub x0: usize,
    /// Image values of the rectangle.
    pub pix: Array2<f64>,
    /// Inverse variance of the rectangle, zero where masked.
    pub ivar: Array2<f64>,
    /// What its results are for.
    pub pass: UnitPass,
}

impl UnitInput {
    /// Bytes of pixel data the unit carries (what dominates a transfer).
    pub fn pixel_bytes(&self) -> usize {
        (self.pix.len() + self.ivar.len()) * std::mem::size_of::<f64>()
    }
}

/// What the writer needs to know about a frame before its units come back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameTicket {
    /// Index of the frame in the run's list.
    pub job: usize,
    /// Units the frame was cut into.
    pub nunits: usize,
    /// Patches in the frame.
    pub npatch: usize,
    /// Where the frame goes.
    pub output: PathBuf,
    /// Whether an existing output may be replaced.
    pub overwrite: bool,
    /// The output grid (per-Ångström units need it).
    pub grid: WaveGrid,
    /// Header and FIBERMAP provenance.
    pub meta: FrameMeta,
    /// First fiber and fibers of the frame.
    pub specmin: usize,
    /// Fibers extracted.
    pub nspec: usize,
    /// Resolution half-width.
    pub ndiag: usize,
    /// The first pass of `--ivar-from-model`, when the frame had one.
    pub first_pass: Option<FirstPass>,
}

/// What the first pass of `--ivar-from-model` leaves to the frame's writer: its units (for the
/// progress) and its timings (which the frame's stats add, as a single frame's do).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirstPass {
    /// Units the first pass was cut into.
    pub units: usize,
    /// Its counts and timings, summed over its units.
    pub stats: FrameStats,
}

impl FrameTicket {
    /// Units of the frame's passes together, as its progress counts them.
    pub fn all_units(&self) -> usize {
        self.nunits + self.first_pass.as_ref().map_or(0, |f| f.units)
    }
}

/// A computed unit: its part of the frame, or why it failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitOutput {
    /// Index of the frame in the run's list.
    pub job: usize,
    /// Index of the unit in the frame.
    pub unit: usize,
    /// The unit's fibers, or the error.
    pub result: Result<FrameResult, String>,
}

/// The inverse variance of a frame's pixels in CCD rows and columns (a unit's rectangle).
pub type IvarOf<'a> = &'a dyn Fn(Range<usize>, Range<usize>) -> Array2<f64>;

/// Cuts a prepared frame into units of `unit_bundles` bundles, each with the rectangle of
/// pixels its on-CCD patch windows cover (their inverse variance from `ivar_of`) and the PSF
/// rows of its fibers. The units of a `UnitPass::Model` pass ask for the model image and the
/// leverage ([`first_pass_options`]).
pub fn cut(
    prep: &Prepared,
    pass: UnitPass,
    job: usize,
    unit_bundles: usize,
    ivar_of: IvarOf<'_>,
) -> Result<Vec<UnitInput>, UnitError> {
    let plan = &prep.plan;
    let setup = UnitSetup {
        grid: prep.grid.clone(),
        specmin: plan.specmin,
        nspec: plan.nspec,
        nfiber_psf: prep.psf.nfiber(),
        patch: prep.patch.clone(),
        opts: match pass {
            UnitPass::Final => prep.opts,
            UnitPass::Model => first_pass_options(&prep.opts),
        },
    };
    let nb = plan.bundles.len();
    let step = unit_bundles.max(1);
    let mut units = Vec::new();
    for (unit, b0) in (0..nb).step_by(step).enumerate() {
        let bundles = b0..(b0 + step).min(nb);
        let patches: Vec<_> = plan.patches[bundles.clone()]
            .iter()
            .flatten()
            .copied()
            .collect();
        let (fmin, nfib) = plan::fiber_span(&patches);
        let corners = spots::corners(&prep.psf, fmin, nfib, &prep.grid.padded)?;
        let (mut ylo, mut yhi, mut xlo, mut xhi) = (i64::MAX, i64::MIN, i64::MAX, i64::MIN);
        for p in &patches {
            // A window that leaves the CCD reads its part on it.
            let w = pixels::window(p, &corners, prep.patch.pixpad_frac);
            if let Some(w) = w.clip(prep.psf.npix_y, prep.psf.npix_x) {
                ylo = ylo.min(w.ymin);
                yhi = yhi.max(w.ymax);
                xlo = xlo.min(w.xmin);
                xhi = xhi.max(w.xmax);
            }
        }
        let (y0, x0, rows, cols) = if ylo < yhi && xlo < xhi {
            (
                ylo as usize,
                xlo as usize,
                ylo as usize..yhi as usize,
                xlo as usize..xhi as usize,
            )
        } else {
            (0, 0, 0..0, 0..0)
        };
        units.push(UnitInput {
            job,
            unit,
            bundles,
            setup: setup.clone(),
            psf: prep.psf.subset(fmin, nfib)?,
            y0,
            x0,
            pix: prep
                .preproc
                .image
                .slice(s![rows.clone(), cols.clone()])
                .to_owned(),
            ivar: ivar_of(rows, cols),
            pass,
        });
    }
    Ok(units)
}

/// What the writer needs of a prepared frame cut into `nunits` units.
pub fn ticket(
    prep: &Prepared,
    job: usize,
    nunits: usize,
    output: PathBuf,
    overwrite: bool,
    first_pass: Option<FirstPass>,
) -> FrameTicket {
    FrameTicket {
        job,
        nunits,
        npatch: prep.plan.npatch(),
        output,
        overwrite,
        grid: prep.grid.clone(),
        meta: frame_meta(prep),
        specmin: prep.plan.specmin,
        nspec: prep.plan.nspec,
        ndiag: prep.opts.ndiag,
        first_pass,
    }
}

/// A unit's share of its frame's model image for `--ivar-from-model` (a `UnitPass::Model`
/// unit's result), for the unit's reader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelPart {
    /// Index of the frame in the run's list.
    pub job: usize,
    /// Index of the unit in the frame.
    pub unit: usize,
    /// CCD row of the share's first row.
    pub y0: usize,
    /// CCD column of its first column.
    pub x0: usize,
    /// The share, or why the unit failed.
    pub result: Result<ModelShare, String>,
}

/// The model image and leverage of a unit's pixel rectangle, and how its extraction went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelShare {
    /// The unit's fibers' model over its rectangle.
    pub model: Array2<f64>,
    /// Each pixel's leverage on it.
    pub leverage: Array2<f64>,
    /// Counts and timings.
    pub stats: FrameStats,
}

impl ModelPart {
    /// The share of `unit`, from its extraction's `result`.
    pub fn of(unit: &UnitInput, result: Result<FrameResult, String>) -> ModelPart {
        let result = result.and_then(|r| match (r.model, r.leverage) {
            (Some(model), Some(leverage)) => Ok(ModelShare {
                model,
                leverage,
                stats: r.stats,
            }),
            _ => Err("the extraction gave no model image or leverage".into()),
        });
        ModelPart {
            job: unit.job,
            unit: unit.unit,
            y0: unit.y0,
            x0: unit.x0,
            result,
        }
    }
}

/// A frame's model image and the pixels' leverage on it, as its first pass's units' shares.
#[derive(Debug)]
pub struct FrameModel {
    /// The shares by unit: CCD row and column of their first pixel, model and leverage.
    shares: Vec<(usize, usize, Array2<f64>, Array2<f64>)>,
}

impl FrameModel {
    /// The model of the `ccd` (rows, columns) from every unit's share; fails with the first
    /// unit that failed, or a share that is not on the CCD. Also gives the units' stats, summed.
    pub fn new(
        ccd: (usize, usize),
        parts: Vec<ModelPart>,
    ) -> Result<(FrameModel, FrameStats), UnitError> {
        let mut parts = parts;
        parts.sort_by_key(|p| p.unit);
        let mut stats = FrameStats::default();
        let mut shares = Vec::with_capacity(parts.len());
        for p in parts {
            let share = p
                .result
                .map_err(|why| UnitError::Failed { unit: p.unit, why })?;
            let (ny, nx) = share.model.dim();
            if p.y0 + ny > ccd.0 || p.x0 + nx > ccd.1 || share.leverage.dim() != (ny, nx) {
                return Err(UnitError::Share {
                    unit: p.unit,
                    job: p.job,
                    rows: p.y0..p.y0 + ny,
                    cols: p.x0..p.x0 + nx,
                    ccd,
                });
            }
            stats.add(&share.stats);
            shares.push((p.y0, p.x0, share.model, share.leverage));
        }
        Ok((FrameModel { shares }, stats))
    }

    /// The model and the leverage over CCD `rows` and `cols`: the shares added in unit order,
    /// so that the sums do not depend on the order the shares came back in.
    pub fn over(&self, rows: Range<usize>, cols: Range<usize>) -> (Array2<f64>, Array2<f64>) {
        let dim = (rows.len(), cols.len());
        let (mut model, mut leverage) = (Array2::zeros(dim), Array2::zeros(dim));
        for (y0, x0, m, h) in &self.shares {
            let (ylo, yhi) = (rows.start.max(*y0), rows.end.min(y0 + m.nrows()));
            let (xlo, xhi) = (cols.start.max(*x0), cols.end.min(x0 + m.ncols()));
            if ylo >= yhi || xlo >= xhi {
                continue;
            }
            let here = s![
                ylo - rows.start..yhi - rows.start,
                xlo - cols.start..xhi - cols.start
            ];
            let there = s![ylo - y0..yhi - y0, xlo - x0..xhi - x0];
            for (image, part) in [(&mut model, m), (&mut leverage, h)] {
                let mut dst = image.slice_mut(here);
                dst += &part.slice(there);
            }
        }
        (model, leverage)
    }
}

impl UnitInput {
    /// The first fiber and the number of fibers of the unit's bundles.
    pub fn fibers(&self) -> (usize, usize) {
        let plan = self.setup.plan();
        let bundles = plan.bundles.get(self.bundles.clone()).unwrap_or(&[]);
        let specmin = bundles.first().map_or(plan.specmin, |b| b.0);
        (specmin, bundles.iter().map(|b| b.1).sum())
    }
}

/// Extracts a unit on the current rayon pool, its spot sets from and to `spots` when given.
pub fn compute(
    unit: &UnitInput,
    backend: &mut dyn Backend,
    spots: Option<&mut SpotCache>,
) -> Result<FrameResult, UnitError> {
    compute_on(
        unit,
        unit.pix.view(),
        unit.ivar.view(),
        None,
        backend,
        spots,
    )
}

/// How many frames' first-pass spot sets a compute rank keeps at most: frames go through in
/// about list order, so the sets of a frame whose second-pass units went to other ranks are
/// let go once this many frames have begun since.
const PASS_SPOT_FRAMES: usize = 4;

/// The spot sets a compute rank keeps from its first-pass units for the same units' second
/// pass (`--ivar-from-model`), as a single frame does (`prepare::SPOT_CACHE_BYTES`), within
/// `budget` bytes over all the frames it holds sets of.
#[derive(Debug)]
pub struct PassSpots {
    budget: usize,
    /// By frame, oldest first.
    frames: Vec<(usize, SpotCache)>,
}

impl PassSpots {
    /// Keeps up to `budget` bytes of spot values.
    pub fn new(budget: usize) -> PassSpots {
        PassSpots {
            budget,
            frames: Vec::new(),
        }
    }

    /// The sets for `unit`: kept from a first-pass unit (within what the budget has left),
    /// handed out to a second-pass unit of a frame it holds sets of; None for other units.
    pub fn for_unit(&mut self, unit: &UnitInput) -> Option<&mut SpotCache> {
        let at = self.frames.iter().position(|(j, _)| *j == unit.job);
        let i = match (unit.pass, at) {
            (UnitPass::Final, None) => return None,
            (UnitPass::Final, Some(i)) => {
                self.frames[i].1.stop_keeping();
                i
            }
            (UnitPass::Model, at) => {
                let i = at.unwrap_or_else(|| {
                    if self.frames.len() == PASS_SPOT_FRAMES {
                        self.frames.remove(0);
                    }
                    self.frames.push((unit.job, SpotCache::keeping(0)));
                    self.frames.len() - 1
                });
                let others: usize = self
                    .frames
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| *k != i)
                    .map(|(_, (_, c))| c.bytes())
                    .sum();
                let cache = &mut self.frames[i].1;
                if cache.is_keeping() {
                    cache.allow(self.budget.saturating_sub(others + cache.bytes()));
                }
                i
            }
        };
        Some(&mut self.frames[i].1)
    }

    /// Lets go of a frame whose kept sets have all been handed out.
    pub fn settle(&mut self) {
        self.frames.retain(|(_, c)| c.is_keeping() || !c.is_empty());
    }
}

/// Extracts a unit whose pixel rectangle is `pix` and `ivar`: the unit's own arrays, or views
/// standing for the copy the backend holds as `loaded`.
pub fn compute_on(
    unit: &UnitInput,
    pix: ndarray::ArrayView2<'_, f64>,
    ivar: ndarray::ArrayView2<'_, f64>,
    loaded: Option<PixelLoad>,
    backend: &mut dyn Backend,
    spots: Option<&mut SpotCache>,
) -> Result<FrameResult, UnitError> {
    let plan = unit.setup.plan();
    if unit.bundles.end > plan.bundles.len() {
        return Err(UnitError::Bundles {
            unit: unit.unit,
            job: unit.job,
            bundles: unit.bundles.clone(),
            nbundles: plan.bundles.len(),
        });
    }
    let work = BundleWork {
        psf: &unit.psf,
        region: Region {
            pix,
            ivar,
            y0: unit.y0,
            x0: unit.x0,
            loaded,
        },
        grid: &unit.setup.grid,
        plan: &plan,
        bundles: unit.bundles.clone(),
        pixpad_frac: unit.setup.patch.pixpad_frac,
    };
    Ok(extract_bundles(
        &work,
        &unit.setup.opts,
        backend,
        &|_, _| {},
        spots,
    )?)
}

/// A frame being put back together by the writer.
#[derive(Debug)]
pub struct Assembly {
    /// The frame.
    pub ticket: FrameTicket,
    parts: Vec<Option<FrameResult>>,
    received: usize,
    error: Option<UnitError>,
}

impl Assembly {
    /// An empty assembly for `ticket`.
    pub fn new(ticket: FrameTicket) -> Assembly {
        Assembly {
            parts: vec![None; ticket.nunits],
            ticket,
            received: 0,
            error: None,
        }
    }

    /// Adds a unit's output; a unit that failed fails the frame (its other units are still
    /// awaited, so that nothing of the frame is left in flight).
    pub fn add(&mut self, out: UnitOutput) -> Result<(), UnitError> {
        let nunits = self.ticket.nunits;
        let slot = self.parts.get_mut(out.unit).ok_or(UnitError::OutOfRange {
            unit: out.unit,
            job: out.job,
            nunits,
        })?;
        if slot.is_some() {
            return Err(UnitError::Twice {
                unit: out.unit,
                job: out.job,
            });
        }
        self.received += 1;
        match out.result {
            Ok(r) => *slot = Some(r),
            Err(e) => {
                *slot = Some(empty_part());
                self.error.get_or_insert(UnitError::Failed {
                    unit: out.unit,
                    why: e,
                });
            }
        }
        Ok(())
    }

    /// Whether every unit is in.
    pub fn complete(&self) -> bool {
        self.received == self.ticket.nunits
    }

    /// The whole frame, in the layout of the single-frame extraction.
    pub fn finish(self) -> Result<(FrameTicket, FrameResult), UnitError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let t = &self.ticket;
        let nwave = t.grid.wave.len();
        let mut out = FrameResult {
            specmin: t.specmin,
            wave: t.grid.wave.clone(),
            flux: Array2::zeros((t.nspec, nwave)),
            ivar: Array2::zeros((t.nspec, nwave)),
            resolution: ndarray::Array3::zeros((t.nspec, 2 * t.ndiag + 1, nwave)),
            chi2pix: Array2::zeros((t.nspec, nwave)),
            pixmask_fraction: Array2::zeros((t.nspec, nwave)),
            nodata: Array2::from_elem((t.nspec, nwave), false),
            model: None,
            leverage: None,
            stats: FrameStats::default(),
        };
        for part in self.parts.into_iter().flatten() {
            let (f0, n) = (part.specmin - t.specmin, part.flux.nrows());
            let rows = s![f0..f0 + n, ..];
            out.flux.slice_mut(rows).assign(&part.flux);
            out.ivar.slice_mut(rows).assign(&part.ivar);
            out.chi2pix.slice_mut(rows).assign(&part.chi2pix);
            out.pixmask_fraction
                .slice_mut(rows)
                .assign(&part.pixmask_fraction);
            out.nodata.slice_mut(rows).assign(&part.nodata);
            out.resolution
                .slice_mut(s![f0..f0 + n, .., ..])
                .assign(&part.resolution);
            out.stats.add(&part.stats);
        }
        if let Some(first) = &t.first_pass {
            out.stats.add_times(&first.stats);
        }
        Ok((self.ticket, out))
    }
}

fn empty_part() -> FrameResult {
    FrameResult {
        specmin: 0,
        wave: Vec::new(),
        flux: Array2::zeros((0, 0)),
        ivar: Array2::zeros((0, 0)),
        resolution: ndarray::Array3::zeros((0, 0, 0)),
        chi2pix: Array2::zeros((0, 0)),
        pixmask_fraction: Array2::zeros((0, 0)),
        nodata: Array2::from_elem((0, 0), false),
        model: None,
        leverage: None,
        stats: FrameStats::default(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ndarray::{s, Array2};

    use std::ops::Range;

    use super::{
        compute, first_pass_options, FrameModel, FrameStats, ModelPart, ModelShare, PassSpots,
        UnitError, UnitInput, UnitPass, UnitSetup,
    };
    use crate::extract::cpu::CpuBackend;
    use crate::pipeline::frame::tests::ToyFrame;

    fn part(unit: usize, y0: usize, x0: usize, model: Array2<f64>) -> ModelPart {
        ModelPart {
            job: 3,
            unit,
            y0,
            x0,
            result: Ok(ModelShare {
                leverage: model.mapv(|m| m / 100.0),
                model,
                stats: FrameStats {
                    patches: 2,
                    ..FrameStats::default()
                },
            }),
        }
    }

    /// Overlapping shares add up in unit order whatever order they came in, a rectangle gets
    /// exactly its part of the sum, and the stats add up.
    #[test]
    fn shares_add_in_unit_order_over_any_rectangle() {
        let a = Array2::from_shape_fn((4, 3), |(y, x)| 0.1 + (y * 3 + x) as f64 / 7.0);
        let b = Array2::from_shape_fn((3, 4), |(y, x)| 1e16 + (y + x) as f64);
        let c = Array2::from_elem((2, 2), -1e16);
        let parts = || {
            vec![
                part(0, 0, 0, a.clone()),
                part(1, 2, 1, b.clone()),
                part(2, 3, 2, c.clone()),
            ]
        };
        let (model, stats) = FrameModel::new((6, 6), parts()).unwrap();
        let mut reversed = parts();
        reversed.reverse();
        let (again, _) = FrameModel::new((6, 6), reversed).unwrap();
        assert_eq!(stats.patches, 6);
        let (whole, lev) = model.over(0..6, 0..6);
        assert_eq!(again.over(0..6, 0..6).0, whole);
        // Pixel (3, 2) is in all three shares: ((a + b) + c), not a + (b + c).
        let expect = (a[[3, 2]] + b[[1, 1]]) + c[[0, 0]];
        assert_eq!(whole[[3, 2]], expect);
        assert_ne!(expect, a[[3, 2]] + (b[[1, 1]] + c[[0, 0]]));
        assert_eq!(lev[[0, 0]], a[[0, 0]] / 100.0);
        assert_eq!(whole[[5, 0]], 0.0);
        let (m, _) = model.over(2..5, 1..4);
        assert_eq!(m, whole.slice(s![2..5, 1..4]));
    }

    /// A unit of the toy frame's `bundles`, with the whole CCD as its rectangle.
    pub(crate) fn toy_unit(
        toy: &ToyFrame,
        job: usize,
        pass: UnitPass,
        bundles: Range<usize>,
    ) -> UnitInput {
        UnitInput {
            job,
            unit: bundles.start,
            bundles,
            setup: UnitSetup {
                grid: toy.grid.clone(),
                specmin: 0,
                nspec: 20,
                nfiber_psf: toy.psf.nfiber(),
                patch: toy.popts.clone(),
                opts: match pass {
                    UnitPass::Final => toy.opts,
                    UnitPass::Model => first_pass_options(&toy.opts),
                },
            },
            psf: toy.psf.clone(),
            y0: 0,
            x0: 0,
            pix: toy.pix.clone(),
            ivar: toy.ivar.clone(),
            pass,
        }
    }

    /// A compute rank keeps its first-pass units' spots, within its budget, hands them to the
    /// same units' second pass, whose results are the same as with spots evaluated again, and
    /// lets the frame go once all are handed out.
    #[test]
    fn a_rank_keeps_first_pass_spots_for_the_second_within_its_budget() {
        let toy = ToyFrame::new();
        let mut cpu = CpuBackend;
        let mut spots = PassSpots::new(usize::MAX);
        for b in 0..2 {
            let u = toy_unit(&toy, 7, UnitPass::Model, b..b + 1);
            compute(&u, &mut cpu, spots.for_unit(&u)).unwrap();
            spots.settle();
        }
        let held = spots.frames[0].1.bytes();
        assert!(held > 0 && spots.frames.len() == 1);
        // Another frame's first pass gets only what is left of the budget.
        let mut tight = PassSpots::new(held + 1);
        for (job, b) in [(7, 0), (7, 1), (8, 0)] {
            let u = toy_unit(&toy, job, UnitPass::Model, b..b + 1);
            compute(&u, &mut cpu, tight.for_unit(&u)).unwrap();
        }
        let total: usize = tight.frames.iter().map(|(_, c)| c.bytes()).sum();
        assert!(total <= held + 1, "{total} > {held}");
        // The second pass takes the kept sets, with the same results as without them.
        for b in 0..2 {
            let u = toy_unit(&toy, 7, UnitPass::Final, b..b + 1);
            let kept = compute(&u, &mut cpu, spots.for_unit(&u)).unwrap();
            let fresh = compute(&u, &mut cpu, None).unwrap();
            assert_eq!((kept.flux, kept.ivar), (fresh.flux, fresh.ivar));
            spots.settle();
        }
        assert!(spots.frames.is_empty());
        // A second-pass unit of a frame it holds nothing of gets nothing.
        let u = toy_unit(&toy, 9, UnitPass::Final, 0..1);
        assert!(spots.for_unit(&u).is_none());
    }

    /// A unit carries the PSF rows of its fibers only (`Psf::subset`, as `cut` gives it, sent
    /// as a reader sends it): its fibers come out as the whole frame's, bit for bit, and a unit
    /// whose PSF holds other fibers is refused, naming them.
    #[test]
    fn a_unit_with_its_psf_rows_only_extracts_its_fibers_as_the_frame_does() {
        use crate::pipeline::comm::{decode, encode, Msg};
        let toy = ToyFrame::new();
        let whole = toy.extract(&mut CpuBackend);
        let sent = |u: UnitInput| match decode(&encode(&Msg::Work(Box::new(u), 0)).unwrap(), 0) {
            Ok(Msg::Work(u, _)) => *u,
            other => panic!("{other:?}"),
        };
        for b in 1..4 {
            let mut u = toy_unit(&toy, 7, UnitPass::Final, b..b + 1);
            let (fmin, nfib) = crate::patch::plan::fiber_span(&toy.plan.patches[b]);
            u.psf = toy.psf.subset(fmin, nfib).unwrap();
            let u = sent(u);
            assert_eq!(u.psf.fibers(), fmin..fmin + nfib);
            let r = compute(&u, &mut CpuBackend, None).unwrap();
            assert_eq!((r.specmin, r.flux.nrows()), (5 * b, 5));
            let at = r.specmin - whole.specmin;
            let rows = s![at..at + 5, ..];
            assert_eq!(r.flux, whole.flux.slice(rows));
            assert_eq!(r.ivar, whole.ivar.slice(rows));
            assert_eq!(r.chi2pix, whole.chi2pix.slice(rows));
            assert_eq!(r.resolution, whole.resolution.slice(s![at..at + 5, .., ..]));
        }
        let mut u = toy_unit(&toy, 7, UnitPass::Final, 2..3);
        u.psf = toy.psf.subset(0, 5).unwrap();
        let err = compute(&sent(u), &mut CpuBackend, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fibers 10..15 requested from a PSF holding fibers 0..5"),
            "{err}"
        );
    }

    /// A share off the CCD, or a unit that failed, fails the frame naming the unit.
    #[test]
    fn a_share_off_the_ccd_or_a_failed_unit_fails_the_frame() {
        let off = vec![
            part(0, 0, 0, Array2::zeros((2, 2))),
            part(1, 5, 5, Array2::zeros((2, 2))),
        ];
        let err = FrameModel::new((6, 6), off).unwrap_err();
        assert!(matches!(err, UnitError::Share { unit: 1, .. }), "{err}");
        assert!(err.to_string().contains("not on the 6x6 CCD"), "{err}");
        let mut failed = part(1, 0, 0, Array2::zeros((2, 2)));
        failed.result = Err("solver gave up".into());
        let err = FrameModel::new((6, 6), vec![failed]).unwrap_err();
        assert_eq!(err.to_string(), "unit 1: solver gave up");
    }
}
