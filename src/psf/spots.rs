//! Pixel-integrated spots and their corners for a block of fibers × wavelengths: the input that
//! both extraction backends share (gpu_specter `get_spots`), plus specter's tail term where the
//! PSF has one (`tail`).

use super::tail::Tail;
use super::{hermite, legendre, GhIndex, Psf, PsfError};

/// The `(fiber, wavelength)` block a [`SpotSet`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpotGrid {
    /// First fiber, as the frame counts them (a PSF's row `fiber - psf.fiber0`).
    pub fibermin: usize,
    /// Number of fibers.
    pub nfiber: usize,
    /// Number of wavelengths.
    pub nwave: usize,
}

/// A token for spot values that whoever evaluated them keeps (a device backend), minted by
/// [`HeldSpots::mint`]: unique in the process, so that the holder recognises its own set by
/// the token alone, and refuses a set another holder, or an earlier evaluation, minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldSpots(u64);

impl HeldSpots {
    /// A token no other set of the process carries.
    pub fn mint() -> HeldSpots {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        HeldSpots(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl std::fmt::Display for HeldSpots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spot set #{}", self.0)
    }
}

/// Where a [`SpotSet`]'s values are.
#[derive(Debug, Clone, PartialEq)]
pub enum SpotValues {
    /// On the host, `[(fiber·nwave + wave)·ny·nx + iy·nx + ix]`, each spot summing to 1.
    Host(Vec<f64>),
    /// Kept by the backend that evaluated them (on its device), under this token: the host
    /// has the geometry only.
    Held(HeldSpots),
    /// Nowhere: the set is the corners alone ([`corners`]).
    Absent,
}

/// Spots for every fiber × wavelength of a grid.
#[derive(Debug, Clone)]
pub struct SpotSet {
    /// What the set covers.
    pub grid: SpotGrid,
    /// Spot height (rows).
    pub ny: usize,
    /// Spot width (columns).
    pub nx: usize,
    /// The spot values, or where they are.
    pub values: SpotValues,
    /// Column of each spot's first pixel, `[fiber·nwave + wave]`.
    pub xc: Vec<i64>,
    /// Row of each spot's first pixel.
    pub yc: Vec<i64>,
    /// Trace x(λ) at each grid point.
    pub x: Vec<f64>,
    /// Trace y(λ) at each grid point.
    pub y: Vec<f64>,
}

impl SpotSet {
    /// Index of `(fiber offset, wave index)` in the per-spot arrays.
    #[inline]
    pub fn index(&self, fiber: usize, wave: usize) -> usize {
        fiber * self.grid.nwave + wave
    }

    /// The spot of fiber offset `fiber` at wave index `wave`, row-major `ny × nx` (values on
    /// the host: see [`SpotSet::values`]).
    #[inline]
    pub fn spot(&self, fiber: usize, wave: usize) -> &[f64] {
        let n = self.ny * self.nx;
        let i = self.index(fiber, wave);
        &self.values()[i * n..(i + 1) * n]
    }

    /// The values on the host, None when they are held elsewhere or absent.
    pub fn host_values(&self) -> Option<&[f64]> {
        match &self.values {
            SpotValues::Host(v) => Some(v),
            SpotValues::Held(_) | SpotValues::Absent => None,
        }
    }

    /// The values on the host. Code that reads values takes sets whose values its caller
    /// checked are on the host ([`SpotSet::host_values`]; the backends' input checks refuse
    /// the others): a set without them here is a bug, and panics.
    #[inline]
    pub fn values(&self) -> &[f64] {
        match &self.values {
            SpotValues::Host(v) => v,
            other => panic!("spot values read on the host, where the set has {other:?}"),
        }
    }

    /// The token of the values' holder, when they are held elsewhere.
    pub fn held(&self) -> Option<HeldSpots> {
        match self.values {
            SpotValues::Held(t) => Some(t),
            SpotValues::Host(_) | SpotValues::Absent => None,
        }
    }
}

/// Evaluates spots for frame fibers `fibermin .. fibermin + nfiber` at `waves`, from the
/// PSF rows that hold them ([`Psf::rows`]; fibers the PSF does not hold are refused).
///
/// Fibers are evaluated in parallel (rayon); the result does not depend on the thread count.
pub fn evaluate(
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotSet, PsfError> {
    let mut set = SpotSet {
        grid: SpotGrid {
            fibermin,
            nfiber: 0,
            nwave: 0,
        },
        ny: psf.spot_ny(),
        nx: psf.spot_nx(),
        values: SpotValues::Host(Vec::new()),
        xc: Vec::new(),
        yc: Vec::new(),
        x: Vec::new(),
        y: Vec::new(),
    };
    evaluate_into(psf, fibermin, nfiber, waves, &mut set)?;
    Ok(set)
}

/// [`evaluate`] into an existing set, reusing its memory: a frame's bundles each need ~60 MB
/// of spots, and fresh pages for every bundle cost as much as a tenth of the extraction.
pub fn evaluate_into(
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
    set: &mut SpotSet,
) -> Result<(), PsfError> {
    use rayon::prelude::*;
    let rows = psf.rows(fibermin, nfiber)?;
    // The evaluator relies on consistent tables (one coefficient count for every row).
    psf.validate()?;
    let index = psf.gh_index()?;
    let (ny, nx) = (psf.spot_ny(), psf.spot_nx());
    let nwave = waves.len();
    set.grid = SpotGrid {
        fibermin,
        nfiber,
        nwave,
    };
    set.ny = ny;
    set.nx = nx;
    let nspot = nfiber * nwave;
    // Every element is overwritten below, so resizing keeps the old pages without clearing.
    let mut values = match std::mem::replace(&mut set.values, SpotValues::Absent) {
        SpotValues::Host(v) => v,
        SpotValues::Held(_) | SpotValues::Absent => Vec::new(),
    };
    values.resize(nspot * ny * nx, 0.0);
    set.xc.resize(nspot, 0);
    set.yc.resize(nspot, 0);
    set.x.resize(nspot, 0.0);
    set.y.resize(nspot, 0.0);
    let per_fiber = nwave * ny * nx;
    if per_fiber == 0 {
        set.values = SpotValues::Host(values);
        return Ok(());
    }
    values
        .par_chunks_mut(per_fiber)
        .zip(set.xc.par_chunks_mut(nwave))
        .zip(set.yc.par_chunks_mut(nwave))
        .zip(set.x.par_chunks_mut(nwave))
        .zip(set.y.par_chunks_mut(nwave))
        .enumerate()
        .for_each(|(f, ((((values, xc), yc), x), y))| {
            let mut ev = SpotEvaluator::new(psf, &index);
            for (w, &wave) in waves.iter().enumerate() {
                let (sx, sy, cx, cy) = ev.spot(
                    rows.start + f,
                    wave,
                    &mut values[w * ny * nx..(w + 1) * ny * nx],
                );
                x[w] = sx;
                y[w] = sy;
                xc[w] = cx;
                yc[w] = cy;
            }
        });
    set.values = SpotValues::Host(values);
    Ok(())
}

/// The corners of the spots of frame fibers `fibermin .. fibermin + nfiber` at `waves`, from
/// the traces alone (no values): what a reader needs to cut the pixel rectangle of a work unit
/// without paying for the spots themselves.
pub fn corners(
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotSet, PsfError> {
    let rows = psf.rows(fibermin, nfiber)?;
    let nwave = waves.len();
    let mut set = SpotSet {
        grid: SpotGrid {
            fibermin,
            nfiber,
            nwave,
        },
        ny: psf.spot_ny(),
        nx: psf.spot_nx(),
        values: SpotValues::Absent,
        xc: Vec::with_capacity(nfiber * nwave),
        yc: Vec::with_capacity(nfiber * nwave),
        x: Vec::with_capacity(nfiber * nwave),
        y: Vec::with_capacity(nfiber * nwave),
    };
    let mut leg = vec![0.0; psf.xtrace.coeff.ncols().max(psf.ytrace.coeff.ncols())];
    for f in rows {
        for &wave in waves {
            let x = trace_series(&psf.xtrace, f, wave, &mut leg);
            let y = trace_series(&psf.ytrace, f, wave, &mut leg);
            let (xc, yc) = corner(psf, x, y);
            set.x.push(x);
            set.y.push(y);
            set.xc.push(xc);
            set.yc.push(yc);
        }
    }
    Ok(set)
}

/// A trace series at `wave`, summed exactly as the spot evaluator sums it, so that the corners
/// a reader computes are the corners the compute rank finds (`leg` is scratch).
fn trace_series(set: &super::LegendreSet, fiber: usize, wave: f64, leg: &mut [f64]) -> f64 {
    let n = set.coeff.ncols();
    legendre::vander(set.reduced(wave), &mut leg[..n]);
    set.coeff
        .row(fiber)
        .iter()
        .zip(&leg[..n])
        .map(|(c, p)| c * p)
        .sum()
}

/// The first pixel of the spot centred at `(x, y)`.
fn corner(psf: &Psf, x: f64, y: f64) -> (i64, i64) {
    let xc = (x - psf.hsizex as f64 + 0.5).floor();
    let yc = (y - psf.hsizey as f64 + 0.5).floor();
    (xc as i64, yc as i64)
}

/// Scratch space and resolved indices for evaluating one spot at a time.
pub struct SpotEvaluator<'a> {
    psf: &'a Psf,
    index: &'a GhIndex,
    leg: Vec<f64>,
    px: Vec<f64>,
    py: Vec<f64>,
    scratch: Vec<f64>,
    gh: Vec<f64>,
    tmp: Vec<f64>,
    /// The fiber whose coefficients `coef` holds.
    fiber: Option<usize>,
    /// That fiber's Legendre coefficients of GHSIGX, GHSIGY, every GH-i-j and, for a PSF with
    /// tails, the five tail rows, contiguous, so that each spot's parameters are short dot
    /// products rather than table look-ups.
    coef: Vec<f64>,
}

impl<'a> SpotEvaluator<'a> {
    /// Scratch sized for `psf`.
    pub fn new(psf: &'a Psf, index: &'a GhIndex) -> Self {
        let (ny, nx) = (psf.spot_ny(), psf.spot_nx());
        let (dx, dy) = (psf.ghdegx + 1, psf.ghdegy + 1);
        let ncoef = psf
            .params
            .iter()
            .map(|p| p.series.coeff.ncols())
            .chain([psf.xtrace.coeff.ncols(), psf.ytrace.coeff.ncols()])
            .max()
            .unwrap_or(1);
        SpotEvaluator {
            psf,
            index,
            leg: vec![0.0; ncoef],
            px: vec![0.0; dx * nx],
            py: vec![0.0; dy * ny],
            scratch: vec![0.0; dx.max(dy) * (nx.max(ny) + 1)],
            gh: vec![0.0; dx * dy],
            tmp: vec![0.0; dy * nx],
            fiber: None,
            coef: Vec::new(),
        }
    }

    fn series(&mut self, set: &super::LegendreSet, fiber: usize, wave: f64) -> f64 {
        trace_series(set, fiber, wave, &mut self.leg)
    }

    /// Writes the normalised spot of PSF row `fiber` (not a frame fiber) at `wave` into `out`
    /// (`ny × nx`), returning the trace position and the corner `(x, y, xc, yc)`.
    pub fn spot(&mut self, fiber: usize, wave: f64, out: &mut [f64]) -> (f64, f64, i64, i64) {
        let psf = self.psf;
        let (ny, nx) = (psf.spot_ny(), psf.spot_nx());
        let (dx, dy) = (psf.ghdegx + 1, psf.ghdegy + 1);
        let x = self.series(&psf.xtrace, fiber, wave);
        let y = self.series(&psf.ytrace, fiber, wave);
        // Every parameter row shares the PSF HDU's range, so one Vandermonde row serves all.
        let first = &psf.params[self.index.sigx].series;
        let n = first.coeff.ncols();
        if self.fiber != Some(fiber) {
            self.coef.clear();
            let rows = [self.index.sigx, self.index.sigy]
                .into_iter()
                .chain(self.index.gh.iter().copied())
                .chain(self.index.tail.iter().flat_map(|t| t.rows));
            for row in rows {
                self.coef
                    .extend(psf.params[row].series.coeff.row(fiber).iter());
            }
            self.fiber = Some(fiber);
        }
        legendre::vander(first.reduced(wave), &mut self.leg[..n]);
        let leg = &self.leg[..n];
        let mut values = self
            .coef
            .chunks_exact(n)
            .map(|c| c.iter().zip(leg).map(|(a, p)| a * p).sum::<f64>());
        let sigx = values.next().unwrap_or(0.0);
        let sigy = values.next().unwrap_or(0.0);
        for g in self.gh.iter_mut() {
            *g = values.next().unwrap_or(0.0);
        }
        let tail = self
            .index
            .tail
            .map(|_| Tail::from_values(std::array::from_fn(|_| values.next().unwrap_or(0.0))));
        let (xc, yc) = corner(psf, x, y);
        let offx = x - (x + 0.5).floor();
        let offy = y - (y + 0.5).floor();
        hermite::pixel_integrals(nx, offx, sigx, psf.ghdegx, &mut self.px, &mut self.scratch);
        hermite::pixel_integrals(ny, offy, sigy, psf.ghdegy, &mut self.py, &mut self.scratch);
        // tmp[j, ix] = Σ_i GH-i-j · px_i[ix]
        self.tmp.iter_mut().for_each(|t| *t = 0.0);
        for i in 0..dx {
            let pxi = &self.px[i * nx..(i + 1) * nx];
            for j in 0..dy {
                let c = self.gh[i * dy + j];
                let t = &mut self.tmp[j * nx..(j + 1) * nx];
                for (t, p) in t.iter_mut().zip(pxi) {
                    *t += c * p;
                }
            }
        }
        // spot[iy, ix] = Σ_j py_j[iy] · tmp[j, ix], clipped at 0, normalised to sum 1.
        out.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..dy {
            let t = &self.tmp[j * nx..(j + 1) * nx];
            for iy in 0..ny {
                let c = self.py[j * ny + iy];
                for (o, t) in out[iy * nx..(iy + 1) * nx].iter_mut().zip(t) {
                    *o += c * t;
                }
            }
        }
        // specter adds the tail to the core before clipping and normalising the sum.
        if let Some(tail) = tail {
            tail.add_to(out, nx, xc, yc, x, y);
        }
        let mut sum = 0.0;
        for v in out.iter_mut() {
            if *v < 0.0 {
                *v = 0.0;
            }
            sum += *v;
        }
        if sum > 0.0 {
            out.iter_mut().for_each(|v| *v /= sum);
        }
        (x, y, xc, yc)
    }
}

#[cfg(test)]
#[path = "spots_tests.rs"]
mod tests;
