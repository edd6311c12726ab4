//! The Gauss–Hermite PSF model (docs/science.md §3): traces, coefficient tables and spot
//! evaluation.
//!
//! Pure mathematics: no file I/O here (the FITS reader and writer live in `io::psf`).

pub mod hermite;
pub mod legendre;
pub mod spots;
pub mod synth;
pub mod tail;

use ndarray::Array2;

pub use spots::{HeldSpots, SpotGrid, SpotSet, SpotValues};

/// Errors in the PSF model itself (the file readers wrap these with the path).
#[derive(Debug, thiserror::Error)]
pub enum PsfError {
    /// A parameter table row the extractor needs is absent.
    #[error("PSF has no parameter {0}")]
    MissingParam(String),
    /// A header value is out of the range this code accepts.
    #[error("PSF header {key} = {value} is outside the accepted range {range}")]
    BadHeader {
        /// The header key.
        key: &'static str,
        /// Its value, as read.
        value: String,
        /// The accepted range, in words.
        range: &'static str,
    },
    /// Shapes of the tables disagree with each other.
    #[error("PSF tables disagree: {0}")]
    Inconsistent(String),
    /// Frame fibers were asked of a PSF that does not hold them all (a unit's PSF holds its
    /// fibers only).
    #[error("fibers {}..{} requested from a PSF holding fibers {}..{}",
        .wanted.start, .wanted.end, .held.start, .held.end)]
    FibersNotHeld {
        /// The frame fibers asked for.
        wanted: std::ops::Range<usize>,
        /// The frame fibers the PSF holds.
        held: std::ops::Range<usize>,
    },
}

/// A set of Legendre series, one per fiber, over one wavelength range `[wavemin, wavemax]`
/// (each PSF HDU carries its own range: docs/science.md §3).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LegendreSet {
    /// Lower end of the range mapped onto u = -1.
    pub wavemin: f64,
    /// Upper end of the range mapped onto u = +1.
    pub wavemax: f64,
    /// Coefficients `[nfiber, ncoef]`; `ncoef = degree + 1`.
    pub coeff: Array2<f64>,
}

impl LegendreSet {
    /// Number of fibers described.
    pub fn nfiber(&self) -> usize {
        self.coeff.nrows()
    }

    /// The reduced coordinate `u ∈ [-1, 1]` of a wavelength.
    pub fn reduced(&self, wave: f64) -> f64 {
        2.0 * (wave - self.wavemin) / (self.wavemax - self.wavemin) - 1.0
    }

    /// The series of `fiber` at `wave`.
    pub fn eval(&self, fiber: usize, wave: f64) -> f64 {
        legendre::series(self.coeff.row(fiber).iter().copied(), self.reduced(wave))
    }
}

/// One row of the PSF parameter table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PsfParam {
    /// Parameter name as in the file (`GHSIGX`, `GH-2-3`, `TAILAMP`, …), without padding.
    pub name: String,
    /// Its Legendre coefficients per fiber, over the PSF HDU's wavelength range.
    pub series: LegendreSet,
}

/// A DESI Gauss–Hermite PSF (PSFVER 3).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Psf {
    /// CCD width in pixels.
    pub npix_x: usize,
    /// CCD height in pixels.
    pub npix_y: usize,
    /// Spot half width: spots are `2·hsizex + 1` columns wide.
    pub hsizex: usize,
    /// Spot half height: spots are `2·hsizey + 1` rows high.
    pub hsizey: usize,
    /// Highest Hermite degree along x.
    pub ghdegx: usize,
    /// Highest Hermite degree along y.
    pub ghdegy: usize,
    /// Legendre degree of the parameter table (header LEGDEG).
    pub legdeg: usize,
    /// Fiber number of row 0 (header FIBERMIN).
    pub fibermin: usize,
    /// The frame fiber of row 0: 0 for a PSF read from a file, whose rows are the frame's
    /// fibers; the first fiber of a [`Psf::subset`]. Spot evaluation takes frame fibers and
    /// reads row `fiber - fiber0` ([`Psf::rows`]). Not a header: files do not carry it.
    pub fiber0: usize,
    /// Trace x(λ).
    pub xtrace: LegendreSet,
    /// Trace y(λ).
    pub ytrace: LegendreSet,
    /// Parameter table rows, in file order.
    pub params: Vec<PsfParam>,
    /// Header PSFERR, if present (docs/formats.md: not PSFERROR).
    pub psferr: Option<f64>,
    /// Header IN_PSF, if present, propagated to the frame as ORIG_PSF.
    pub in_psf: Option<String>,
    /// The camera the PSF is for (`r0`), from its CAMERA keyword; checked against the image's.
    pub camera: Option<String>,
}

/// Indices into `Psf::params` for the rows spot evaluation needs, resolved once.
#[derive(Debug, Clone)]
pub struct GhIndex {
    /// Row of GHSIGX.
    pub sigx: usize,
    /// Row of GHSIGY.
    pub sigy: usize,
    /// Row of GH-i-j at `[i * (ghdegy + 1) + j]`.
    pub gh: Vec<usize>,
    /// Rows of the tail term, when the PSF has one (TAILAMP not all zero); `None` leaves
    /// spots exactly as a PSF without tails gives them.
    pub tail: Option<tail::TailRows>,
}

/// Largest accepted HSIZEX/HSIZEY: DESI uses 8 and 5.
pub const MAX_HSIZE: usize = 64;
/// Largest accepted Gauss–Hermite degree.
pub const MAX_GHDEG: usize = 20;
/// Largest accepted Legendre degree.
pub const MAX_LEGDEG: usize = 30;
/// Largest accepted CCD side.
pub const MAX_NPIX: usize = 100_000;
/// Largest accepted fiber count.
pub const MAX_NFIBER: usize = 100_000;

impl Psf {
    /// The PSF of frame fibers `first .. first + n` only (those rows of every table), for
    /// shipping to a rank that extracts just those fibers: its row 0 is frame fiber `first`.
    pub fn subset(&self, first: usize, n: usize) -> Result<Psf, PsfError> {
        let kept = self.rows(first, n)?;
        let rows = |set: &LegendreSet| LegendreSet {
            wavemin: set.wavemin,
            wavemax: set.wavemax,
            coeff: set.coeff.slice(ndarray::s![kept.clone(), ..]).to_owned(),
        };
        Ok(Psf {
            xtrace: rows(&self.xtrace),
            ytrace: rows(&self.ytrace),
            params: self
                .params
                .iter()
                .map(|p| PsfParam {
                    name: p.name.clone(),
                    series: rows(&p.series),
                })
                .collect(),
            fibermin: self.fibermin + kept.start,
            fiber0: first,
            ..self.clone_header()
        })
    }

    /// The frame fibers this PSF holds.
    pub fn fibers(&self) -> std::ops::Range<usize> {
        self.fiber0..self.fiber0 + self.nfiber()
    }

    /// The rows of frame fibers `first .. first + n`, refused where the PSF does not hold
    /// them all. No fibers are held by every PSF (an empty set starts a reusable one).
    pub fn rows(&self, first: usize, n: usize) -> Result<std::ops::Range<usize>, PsfError> {
        let held = self.fibers();
        let wanted = first..first.saturating_add(n);
        if n == 0 {
            return Ok(0..0);
        }
        if wanted.start < held.start || wanted.end > held.end {
            return Err(PsfError::FibersNotHeld { wanted, held });
        }
        Ok(wanted.start - self.fiber0..wanted.end - self.fiber0)
    }

    fn clone_header(&self) -> Psf {
        let empty = LegendreSet {
            wavemin: 0.0,
            wavemax: 1.0,
            coeff: Array2::zeros((0, 1)),
        };
        Psf {
            npix_x: self.npix_x,
            npix_y: self.npix_y,
            hsizex: self.hsizex,
            hsizey: self.hsizey,
            ghdegx: self.ghdegx,
            ghdegy: self.ghdegy,
            legdeg: self.legdeg,
            fibermin: self.fibermin,
            fiber0: self.fiber0,
            xtrace: empty.clone(),
            ytrace: empty,
            params: Vec::new(),
            psferr: self.psferr,
            in_psf: self.in_psf.clone(),
            camera: self.camera.clone(),
        }
    }

    /// Number of fibers described by the traces.
    pub fn nfiber(&self) -> usize {
        self.xtrace.nfiber()
    }

    /// Spot width in pixels.
    pub fn spot_nx(&self) -> usize {
        2 * self.hsizex + 1
    }

    /// Spot height in pixels.
    pub fn spot_ny(&self) -> usize {
        2 * self.hsizey + 1
    }

    /// The row named `name`, if present.
    pub fn param(&self, name: &str) -> Option<&PsfParam> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Checks header values before anything is allocated from them, and table consistency.
    pub fn validate(&self) -> Result<(), PsfError> {
        check_range("HSIZEX", self.hsizex, 1, MAX_HSIZE)?;
        check_range("HSIZEY", self.hsizey, 1, MAX_HSIZE)?;
        check_range("GHDEGX", self.ghdegx, 0, MAX_GHDEG)?;
        check_range("GHDEGY", self.ghdegy, 0, MAX_GHDEG)?;
        check_range("LEGDEG", self.legdeg, 0, MAX_LEGDEG)?;
        check_range("NPIX_X", self.npix_x, 1, MAX_NPIX)?;
        check_range("NPIX_Y", self.npix_y, 1, MAX_NPIX)?;
        check_range("NFIBER", self.nfiber(), 1, MAX_NFIBER)?;
        if self.ytrace.nfiber() != self.nfiber() {
            return Err(PsfError::Inconsistent(format!(
                "XTRACE has {} fibers, YTRACE {}",
                self.nfiber(),
                self.ytrace.nfiber()
            )));
        }
        for set in [&self.xtrace, &self.ytrace] {
            if !(set.wavemax > set.wavemin) || !set.wavemin.is_finite() || !set.wavemax.is_finite()
            {
                return Err(PsfError::Inconsistent(format!(
                    "trace wavelength range [{}, {}] is empty",
                    set.wavemin, set.wavemax
                )));
            }
        }
        let ncoef = self.params.first().map_or(0, |p| p.series.coeff.ncols());
        for p in &self.params {
            if p.series.coeff.ncols() != ncoef {
                return Err(PsfError::Inconsistent(format!(
                    "parameter {} has {} Legendre coefficients, {} has {}",
                    p.name,
                    p.series.coeff.ncols(),
                    self.params[0].name,
                    ncoef
                )));
            }
            if p.series.nfiber() != self.nfiber() {
                return Err(PsfError::Inconsistent(format!(
                    "parameter {} has {} fibers, the traces {}",
                    p.name,
                    p.series.nfiber(),
                    self.nfiber()
                )));
            }
        }
        self.gh_index().map(|_| ())
    }

    /// Resolves the table rows needed for spots.
    pub fn gh_index(&self) -> Result<GhIndex, PsfError> {
        let find = |name: &str| {
            self.params
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| PsfError::MissingParam(name.to_string()))
        };
        let mut gh = Vec::with_capacity((self.ghdegx + 1) * (self.ghdegy + 1));
        for i in 0..=self.ghdegx {
            for j in 0..=self.ghdegy {
                gh.push(find(&format!("GH-{i}-{j}"))?);
            }
        }
        Ok(GhIndex {
            sigx: find("GHSIGX")?,
            sigy: find("GHSIGY")?,
            gh,
            tail: tail::TailRows::find(self)?,
        })
    }

    /// Whether spots of this PSF carry specter's tail term (some TAILAMP coefficient ≠ 0).
    pub fn has_tails(&self) -> bool {
        self.param(tail::TAIL_PARAMS[0])
            .is_some_and(|p| p.series.coeff.iter().any(|&c| c != 0.0))
    }

    /// The wavelength range over which every table of this PSF is defined.
    pub fn wave_range(&self) -> (f64, f64) {
        let mut lo = self.xtrace.wavemin.max(self.ytrace.wavemin);
        let mut hi = self.xtrace.wavemax.min(self.ytrace.wavemax);
        if let Some(p) = self.params.first() {
            lo = lo.max(p.series.wavemin);
            hi = hi.min(p.series.wavemax);
        }
        (lo, hi)
    }
}

fn check_range(key: &'static str, value: usize, lo: usize, hi: usize) -> Result<(), PsfError> {
    if value < lo || value > hi {
        return Err(PsfError::BadHeader {
            key,
            value: value.to_string(),
            range: match key {
                "HSIZEX" | "HSIZEY" => "1..=64",
                "GHDEGX" | "GHDEGY" => "0..=20",
                "LEGDEG" => "0..=30",
                "NPIX_X" | "NPIX_Y" => "1..=100000",
                _ => "1..=100000",
            },
        });
    }
    Ok(())
}
