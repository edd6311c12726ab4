//! What a [`BatchLayout`] may index on the device instead of carrying its own copy:
//! [`Resident`], the pixels of a load (`extract::HeldPixels`) and a spot set evaluated there
//! ([`ResidentSpots`]), each known by the token the backend minted for it. Host-side only;
//! imports the crate's `extract` and `psf` types.
//!
//! [`BatchLayout`]: super::BatchLayout

use ndarray::ArrayView2;

use crate::extract::gpu::GpuError;
use crate::extract::{HeldPixels, PatchInput};
use crate::psf::{HeldSpots, SpotSet};

/// What is already on the device, which a batch indexes instead of carrying its own
/// ([`BatchLayout::with_resident`](super::BatchLayout::with_resident)).
#[derive(Debug, Clone, Copy, Default)]
pub struct Resident<'a> {
    /// A work unit's pixels.
    pub pixels: Option<HeldPixels>,
    /// A spot set evaluated on the device.
    pub spots: Option<&'a ResidentSpots>,
}

/// The shape `(rows, cols)` of `pix` and `ivar` when they can be loaded whole: contiguous
/// row-major arrays of one non-empty shape (the layout the device copy has).
pub fn loadable(pix: ArrayView2<'_, f64>, ivar: ArrayView2<'_, f64>) -> Option<(usize, usize)> {
    let ok = pix.is_standard_layout()
        && ivar.is_standard_layout()
        && pix.dim() == ivar.dim()
        && !pix.is_empty();
    ok.then(|| pix.dim())
}

/// Where `inp`'s pixels lie in `held`: None when the patch carries no load (its views hold
/// its pixels), their `(row, col)` there when it names `held`. A patch naming another load, or
/// a place beyond `held`'s edges, is refused.
pub fn place_in(
    held: Option<HeldPixels>,
    inp: &PatchInput<'_>,
) -> Result<Option<(usize, usize)>, GpuError> {
    let Some(at) = inp.loaded else {
        return Ok(None);
    };
    let (ispec, iwave) = (inp.patch.ispec, inp.patch.iwave);
    let h = match held {
        Some(h) if h.id == at.id => h,
        _ => {
            return Err(GpuError::PixelsElsewhere {
                ispec,
                iwave,
                load: at.id,
                here: held.map(|h| h.id),
            })
        }
    };
    let (ny, nx) = inp.pix.dim();
    if at.row + ny > h.rows || at.col + nx > h.cols {
        return Err(GpuError::Kernel(format!(
            "patch at fiber {ispec}, bin {iwave}: its {ny} × {nx} pixels at row {}, column {} \
             of {} reach beyond its {} × {}",
            at.row, at.col, h.id, h.rows, h.cols
        )));
    }
    Ok(Some((at.row, at.col)))
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
