//! specter's PSF tail term (docs/science.md §3; specter `GaussHermitePSF._xypix`):
//!
//! `TAILAMP · r² / (TAILCORE² + r²)^(1 + TAILINDE/2)`, `r² = (dx·TAILXSCA)² + (dy·TAILYSCA)²`,
//!
//! with `(dx, dy)` the distance from the trace position `(x, y)` to each pixel's *centre*
//! (evaluated there, not integrated over the pixel). specter adds it to the pixel-integrated
//! Gauss–Hermite core, then clips the sum at 0 and normalises it to 1; the five parameters are
//! Legendre series of the PSF table like GHSIGX. gpu_specter ignores the term; DESI's public
//! PSFs carry TAILAMP = 0, and for those (and for any spot whose TAILAMP evaluates to exactly
//! 0) nothing is added, so their spots stay bit for bit what they were without it.
//!
//! Pure mathematics over `psf` types; `kernels/spots.cu` (`spot_tail`) is its GPU copy.

use super::{Psf, PsfError};

/// The tail's parameter rows, in the order [`TailRows::rows`] and the GPU tables keep them.
pub const TAIL_PARAMS: [&str; 5] = ["TAILAMP", "TAILCORE", "TAILXSCA", "TAILYSCA", "TAILINDE"];

/// Indices into `Psf::params` of the five tail rows, in [`TAIL_PARAMS`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailRows {
    /// TAILAMP, TAILCORE, TAILXSCA, TAILYSCA, TAILINDE.
    pub rows: [usize; 5],
}

impl TailRows {
    /// The rows of `psf`'s tail, or `None` when it has none (no TAILAMP row, or every
    /// coefficient of it 0). A PSF with tails must carry all five rows.
    pub fn find(psf: &Psf) -> Result<Option<TailRows>, PsfError> {
        if !psf.has_tails() {
            return Ok(None);
        }
        let mut rows = [0; 5];
        for (row, name) in rows.iter_mut().zip(TAIL_PARAMS) {
            *row = psf
                .params
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| {
                    PsfError::MissingParam(format!("{name} (TAILAMP is not zero: tails are on)"))
                })?;
        }
        Ok(Some(TailRows { rows }))
    }
}

/// The tail's parameters at one `(fiber, wavelength)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// TAILAMP.
    pub amp: f64,
    /// TAILCORE (pixels, after scaling).
    pub core: f64,
    /// TAILXSCA: scale of the column distance.
    pub xsca: f64,
    /// TAILYSCA: scale of the row distance.
    pub ysca: f64,
    /// TAILINDE: the power-law index of the wings.
    pub inde: f64,
}

impl Tail {
    /// From values in [`TAIL_PARAMS`] order.
    pub fn from_values(v: [f64; 5]) -> Tail {
        let [amp, core, xsca, ysca, inde] = v;
        Tail {
            amp,
            core,
            xsca,
            ysca,
            inde,
        }
    }

    /// The tail at a pixel centre `(dx, dy)` from the trace position. At `r = 0` it is 0 (the
    /// numerator's r²): specter's 0/0 there when TAILCORE = 0 would poison the whole spot.
    #[inline]
    pub fn value(&self, dx: f64, dy: f64) -> f64 {
        let ax = dx * self.xsca;
        let ay = dy * self.ysca;
        let r2 = ax * ax + ay * ay;
        if r2 == 0.0 {
            return 0.0;
        }
        self.amp * r2 / (self.core * self.core + r2).powf(1.0 + self.inde / 2.0)
    }

    /// Adds the tail to the unclipped core `spot` (`ny × nx`, row-major) whose first pixel is
    /// `(xc, yc)`, for the trace position `(x, y)`. Does nothing when TAILAMP is 0 here.
    pub fn add_to(&self, spot: &mut [f64], nx: usize, xc: i64, yc: i64, x: f64, y: f64) {
        if self.amp == 0.0 {
            return;
        }
        for (iy, row) in spot.chunks_exact_mut(nx).enumerate() {
            let dy = (yc + iy as i64) as f64 - y;
            for (ix, v) in row.iter_mut().enumerate() {
                *v += self.value((xc + ix as i64) as f64 - x, dy);
            }
        }
    }
}

#[cfg(test)]
#[path = "tail_tests.rs"]
mod tests;
