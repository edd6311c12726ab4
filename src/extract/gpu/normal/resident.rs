//! The host arrays whose copies are already on the device, which a [`BatchLayout`] indexes
//! instead of carrying its own: [`Resident`], [`ResidentPixels`] (a work unit's pixels) and
//! [`ResidentSpots`] (a spot set evaluated on the device). Host-side only; imports the crate's
//! `extract` and `psf` types.
//!
//! [`BatchLayout`]: super::BatchLayout

use ndarray::ArrayView2;

use crate::extract::PatchInput;
use crate::psf::{HeldSpots, SpotSet};

/// Host arrays whose copies are already on the device, which a batch indexes instead of
/// carrying its own ([`BatchLayout::with_resident`](super::BatchLayout::with_resident)).
#[derive(Debug, Clone, Copy, Default)]
pub struct Resident<'a> {
    /// A work unit's pixels.
    pub pixels: Option<ResidentPixels>,
    /// A spot set evaluated on the device.
    pub spots: Option<&'a ResidentSpots>,
}

/// Identifies the host image and ivar arrays (row-major, contiguous, same shape) whose copies
/// are on the device: a window view that is a slice of them is found there at the same
/// offset. Holds addresses only to compare them; nothing is read through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentPixels {
    pix: usize,
    ivar: usize,
    nrows: usize,
    ncols: usize,
}

impl ResidentPixels {
    /// The identity of `pix` and `ivar`, when both are contiguous row-major arrays of one
    /// non-empty shape (the layout the device copy has).
    pub fn of(pix: ArrayView2<'_, f64>, ivar: ArrayView2<'_, f64>) -> Option<ResidentPixels> {
        let ok = pix.is_standard_layout()
            && ivar.is_standard_layout()
            && pix.dim() == ivar.dim()
            && !pix.is_empty();
        ok.then(|| ResidentPixels {
            pix: pix.as_ptr() as usize,
            ivar: ivar.as_ptr() as usize,
            nrows: pix.nrows(),
            ncols: pix.ncols(),
        })
    }

    /// Elements of each array.
    pub fn len(&self) -> usize {
        self.nrows * self.ncols
    }

    /// Whether the arrays are empty (never: `of` refuses them).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row stride.
    pub fn ld(&self) -> usize {
        self.ncols
    }

    /// The offset of `inp`'s window in the arrays, when its views are slices of them (same
    /// address offset in both, rows `ld` apart, wholly inside).
    pub fn offset_of(&self, inp: &PatchInput<'_>) -> Option<usize> {
        let ld = self.ncols as isize;
        let (wny, wnx) = inp.pix.dim();
        if wny == 0 || wnx == 0 || inp.pix.strides() != [ld, 1] || inp.ivar.strides() != [ld, 1] {
            return None;
        }
        let p = (inp.pix.as_ptr() as usize).checked_sub(self.pix)?;
        let q = (inp.ivar.as_ptr() as usize).checked_sub(self.ivar)?;
        let size = std::mem::size_of::<f64>();
        if p != q || p % size != 0 {
            return None;
        }
        let off = p / size;
        let (r, c) = (off / self.ncols, off % self.ncols);
        (r + wny <= self.nrows && c + wnx <= self.ncols).then_some(off)
    }
}

/// The spot set whose values are on the device, known by the token its host geometry carries
/// ([`DeviceSpots::held`](crate::extract::gpu::spots::DeviceSpots::held)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentSpots {
    /// The set's token.
    pub held: HeldSpots,
    /// Values on the device.
    pub len: usize,
}

impl ResidentSpots {
    /// Whether `set` is this one: its values held under this token.
    pub fn holds(&self, set: &SpotSet) -> bool {
        set.held() == Some(self.held)
    }
}
