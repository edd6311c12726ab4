//! Work units: a frame cut into bundle ranges, each carrying only the pixel rectangle and the
//! PSF rows its patches read, and the results the writer puts back together.
//!
//! Imports `psf`, `patch`, `extract`, `io` (frame metadata) and the pipeline's `frame` and
//! `prepare`.

use std::ops::Range;
use std::path::PathBuf;

use ndarray::{s, Array2};
use serde::{Deserialize, Serialize};

use super::frame::{extract_bundles, BundleWork, FrameError, FrameResult, FrameStats, Region};
use super::prepare::{frame_meta, Prepared};
use crate::extract::{Backend, ExtractOptions};
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
    /// A unit of the frame failed (the first that did).
    #[error("unit {unit}: {why}")]
    Failed {
        /// The unit.
        unit: usize,
        /// Its error, as the compute rank sent it.
        why: String,
    },
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
    /// The PSF rows of the unit's fibers.
    pub psf: Psf,
    /// Frame fiber of `psf`'s row 0.
    pub psf_fiber0: usize,
    /// CCD row of `pix`'s first row.
    pub y0: usize,
    /// CCD column of `pix`'s first column.
    pub x0: usize,
    /// Image values of the rectangle.
    pub pix: Array2<f64>,
    /// Inverse variance of the rectangle, zero where masked.
    pub ivar: Array2<f64>,
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

/// Cuts a prepared frame into units of `unit_bundles` bundles, each with the rectangle of
/// pixels its on-CCD patch windows cover and the PSF rows of its fibers.
pub fn cut(
    prep: &Prepared,
    job: usize,
    unit_bundles: usize,
    output: PathBuf,
    overwrite: bool,
) -> Result<(FrameTicket, Vec<UnitInput>), UnitError> {
    let plan = &prep.plan;
    let setup = UnitSetup {
        grid: prep.grid.clone(),
        specmin: plan.specmin,
        nspec: plan.nspec,
        nfiber_psf: prep.psf.nfiber(),
        patch: prep.patch.clone(),
        opts: prep.opts,
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
        let img = &prep.preproc;
        units.push(UnitInput {
            job,
            unit,
            bundles,
            setup: setup.clone(),
            psf: prep.psf.subset(fmin, nfib),
            psf_fiber0: fmin,
            y0,
            x0,
            pix: img.image.slice(s![rows.clone(), cols.clone()]).to_owned(),
            ivar: img.ivar.slice(s![rows, cols]).to_owned(),
        });
    }
    let ticket = FrameTicket {
        job,
        nunits: units.len(),
        npatch: plan.npatch(),
        output,
        overwrite,
        grid: prep.grid.clone(),
        meta: frame_meta(prep),
        specmin: plan.specmin,
        nspec: plan.nspec,
        ndiag: prep.opts.ndiag,
    };
    Ok((ticket, units))
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

/// Extracts a unit on the current rayon pool.
pub fn compute(unit: &UnitInput, backend: &mut dyn Backend) -> Result<FrameResult, UnitError> {
    compute_on(unit, unit.pix.view(), unit.ivar.view(), backend)
}

/// Extracts a unit whose pixel rectangle is `pix` and `ivar` (the unit's own arrays, or views
/// standing for a copy the backend holds).
pub fn compute_on(
    unit: &UnitInput,
    pix: ndarray::ArrayView2<'_, f64>,
    ivar: ndarray::ArrayView2<'_, f64>,
    backend: &mut dyn Backend,
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
        psf_fiber0: unit.psf_fiber0,
        region: Region {
            pix,
            ivar,
            y0: unit.y0,
            x0: unit.x0,
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
        None,
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
            let st = &mut out.stats;
            st.patches += part.stats.patches;
            st.retried += part.stats.retried;
            st.failed += part.stats.failed;
            st.dropped += part.stats.dropped;
            st.edge += part.stats.edge;
            st.starved += part.stats.starved;
            st.spots += part.stats.spots;
            st.solve += part.stats.solve;
            st.assemble += part.stats.assemble;
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
