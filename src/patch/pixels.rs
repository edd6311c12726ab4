//! The pixel rectangle a patch reads (gpu_specter `get_xyrange` and the `pixpad_frac` trim).

use super::Patch;
use crate::psf::SpotSet;

/// Rows `ymin..ymax` and columns `xmin..xmax` of the CCD that a patch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelWindow {
    /// First column.
    pub xmin: i64,
    /// One past the last column.
    pub xmax: i64,
    /// First row (after trimming the padding rows).
    pub ymin: i64,
    /// One past the last row.
    pub ymax: i64,
}

impl PixelWindow {
    /// Rows in the window.
    pub fn ny(&self) -> usize {
        self.ymax.saturating_sub(self.ymin).max(0) as usize
    }

    /// Columns in the window.
    pub fn nx(&self) -> usize {
        self.xmax.saturating_sub(self.xmin).max(0) as usize
    }

    /// Whether the window lies on a CCD of `npix_y × npix_x` pixels. gpu_specter's CPU path
    /// drops patches whose rows leave the CCD (docs/science.md §2); here such a patch is
    /// extracted with the pixels off the CCD masked ([`PixelWindow::clip`]), and columns
    /// outside it are treated as rows are rather than wrapping around as numpy slicing would.
    pub fn on_ccd(&self, npix_y: usize, npix_x: usize) -> bool {
        self.clip(npix_y, npix_x) == Some(*self)
    }

    /// The part of the window on a CCD of `npix_y × npix_x` pixels, or None when no pixel of
    /// it is, when the window is empty, or when it is larger than the CCD in either direction:
    /// no patch spans a whole CCD, and the window of traces gone wild (a corrupt PSF) would
    /// otherwise be allocated whole to hold the pixels off the CCD.
    pub fn clip(&self, npix_y: usize, npix_x: usize) -> Option<PixelWindow> {
        if self.ny() > npix_y || self.nx() > npix_x {
            return None;
        }
        let part = PixelWindow {
            xmin: self.xmin.max(0),
            xmax: self.xmax.min(npix_x as i64),
            ymin: self.ymin.max(0),
            ymax: self.ymax.min(npix_y as i64),
        };
        (part.ymax > part.ymin && part.xmax > part.xmin).then_some(part)
    }
}

/// Bounding box `(xmin, xmax, ymin, ymax)` of the spots of `nfib` fibers from fiber offset
/// `f0` and `nw` bins from wave index `w0` of `spots`.
fn xyrange(spots: &SpotSet, f0: usize, nfib: usize, w0: usize, nw: usize) -> (i64, i64, i64, i64) {
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (i64::MAX, i64::MIN, i64::MAX, i64::MIN);
    for f in f0..f0 + nfib {
        for w in w0..w0 + nw {
            let i = spots.index(f, w);
            xmin = xmin.min(spots.xc[i]);
            xmax = xmax.max(spots.xc[i]);
            ymin = ymin.min(spots.yc[i]);
            ymax = ymax.max(spots.yc[i]);
        }
    }
    (xmin, xmax + spots.nx as i64, ymin, ymax + spots.ny as i64)
}

/// The pixel window of `patch`, given spots on the padded grid for fibers starting at
/// `spots.grid.fibermin`.
pub fn window(patch: &Patch, spots: &SpotSet, pixpad_frac: f64) -> PixelWindow {
    let f0 = patch.specmin - spots.grid.fibermin;
    let w0 = patch.iwave;
    let (xmin, xmax, ypadmin, ypadmax) = xyrange(spots, f0, patch.nspecpad, w0, patch.nwavetot);
    let (_, _, ymin, ymax) = xyrange(
        spots,
        f0,
        patch.nspecpad,
        w0 + patch.wavepad,
        patch.nwavetot - 2 * patch.wavepad,
    );
    // `1 - pixpad_frac` is evaluated in f64 as gpu_specter does (0.19999999999999996 for 0.8).
    let ypadlo = ((ymin - ypadmin) as f64 * (1.0 - pixpad_frac)) as i64;
    let ypadhi = ((ymax - ypadmin) as f64 + (ypadmax - ymax) as f64 * pixpad_frac) as i64;
    PixelWindow {
        xmin,
        xmax,
        ymin: ypadmin + ypadlo,
        ymax: ypadmin + ypadhi,
    }
}

#[cfg(test)]
mod tests {
    use super::PixelWindow;

    #[test]
    fn clip_keeps_the_part_on_the_ccd() {
        let w = PixelWindow {
            xmin: -3,
            xmax: 40,
            ymin: 90,
            ymax: 130,
        };
        let on = w.clip(100, 50).unwrap();
        assert_eq!((on.xmin, on.xmax, on.ymin, on.ymax), (0, 40, 90, 100));
        assert!(!w.on_ccd(100, 50) && on.on_ccd(100, 50));
        assert_eq!(on.clip(100, 50), Some(on));
        // A window larger than the CCD (corrupt traces), or whose size overflows, is no
        // patch's: nothing of it is extracted.
        let wild = PixelWindow { ymin: -200, ..w };
        assert_eq!(wild.clip(100, 50), None);
        let overflowing = PixelWindow {
            ymin: i64::MIN,
            ymax: i64::MAX,
            ..w
        };
        assert_eq!(overflowing.ny(), usize::try_from(i64::MAX).unwrap());
        assert_eq!(overflowing.clip(100, 50), None);
        let off = PixelWindow {
            ymin: -20,
            ymax: 0,
            ..w
        };
        assert_eq!(off.clip(100, 50), None);
        assert!(!off.on_ccd(100, 50));
    }
}
