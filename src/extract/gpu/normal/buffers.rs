//! The normal-equations stage's device buffers: [`DenseBatch`] (the outputs),
//! [`DevicePixels`] (a work unit's pixels, uploaded once), [`OnDevice`] (the resident arrays a
//! layout indexes), [`UploadedLayout`] (a [`BatchLayout`] on the device) and the
//! [`LayoutBuffers`] the launchers take. Imports the parent's errors, `layout`, `resident`
//! and `gpu::device`.

use cudarc::driver::CudaSlice;
use ndarray::ArrayView2;

use super::layout::BatchLayout;
use super::resident::loadable;
use super::{bad, cuda};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::GpuError;
use crate::extract::HeldPixels;

/// A batch's normal equations on the device, in the layout of the module docs.
pub struct DenseBatch {
    /// Patches.
    pub npatch: usize,
    /// Matrix size and leading dimension of every patch.
    pub nmax: usize,
    /// Unknowns of each patch (the rest of its `nmax` is identity padding).
    pub n: Vec<usize>,
    /// `AᵀWA + diag(λ² + ε)`, `[npatch·nmax·nmax]`, column-major per patch.
    pub ata: CudaSlice<f64>,
    /// `AᵀWp`, `[npatch·nmax]`.
    pub atp: CudaSlice<f64>,
    /// `AᵀW1`, `[npatch·nmax]`.
    pub atw1: CudaSlice<f64>,
}

impl DenseBatch {
    /// Device buffers sized for `layout` (zeroed only so that they hold defined values; the
    /// kernels write every element).
    pub fn alloc(gpu: &Gpu, layout: &BatchLayout) -> Result<DenseBatch, GpuError> {
        let (npatch, nmax) = (layout.npatch, layout.nmax);
        let st = &gpu.stream;
        Ok(DenseBatch {
            npatch,
            nmax,
            n: (0..npatch).map(|b| layout.n(b)).collect(),
            ata: st
                .alloc_zeros(npatch * nmax * nmax)
                .map_err(cuda("allocating AᵀWA"))?,
            atp: st
                .alloc_zeros(npatch * nmax)
                .map_err(cuda("allocating AᵀWp"))?,
            atw1: st
                .alloc_zeros(npatch * nmax)
                .map_err(cuda("allocating AᵀW1"))?,
        })
    }
}

/// A work unit's pixels on the device, uploaded once for all the batches cut from them (or
/// received there), under the token the patches' windows name.
pub struct DevicePixels {
    /// Their token and shape.
    pub held: HeldPixels,
    /// Image values, row-major.
    pub pix: CudaSlice<f64>,
    /// Inverse variance, row-major.
    pub ivar: CudaSlice<f64>,
}

impl DevicePixels {
    /// Copies `pix` and `ivar` to the device; None when they are not contiguous row-major
    /// arrays of one shape (the batches then carry their own windows).
    pub fn upload(
        gpu: &Gpu,
        pix: ArrayView2<'_, f64>,
        ivar: ArrayView2<'_, f64>,
    ) -> Result<Option<DevicePixels>, GpuError> {
        let (Some((rows, cols)), Some(p), Some(w)) = (
            loadable(pix.view(), ivar.view()),
            pix.as_slice(),
            ivar.as_slice(),
        ) else {
            return Ok(None);
        };
        let st = &gpu.stream;
        Ok(Some(DevicePixels {
            held: HeldPixels::mint(rows, cols),
            pix: st
                .clone_htod(p)
                .map_err(cuda("uploading the unit's pixels"))?,
            ivar: st
                .clone_htod(w)
                .map_err(cuda("uploading the unit's ivar"))?,
        }))
    }

    /// Pixels filled elsewhere (received by CUDA-aware MPI), `rows × cols` each, under a
    /// fresh token; None unless both arrays hold exactly that many values, at least one.
    pub fn adopt(
        pix: CudaSlice<f64>,
        ivar: CudaSlice<f64>,
        rows: usize,
        cols: usize,
    ) -> Option<DevicePixels> {
        let n = rows.checked_mul(cols).filter(|&n| n > 0)?;
        (pix.len() == n && ivar.len() == n).then(|| DevicePixels {
            held: HeldPixels::mint(rows, cols),
            pix,
            ivar,
        })
    }
}

/// The arrays already on the device that a layout built with [`Resident`](super::Resident)
/// indexes.
#[derive(Clone, Copy, Default)]
pub struct OnDevice<'a> {
    /// A work unit's pixels.
    pub pixels: Option<&'a DevicePixels>,
    /// The values of the resident spot set, `[(fiber·nwave + wave)·ny·nx + …]`.
    pub spots: Option<&'a CudaSlice<f64>>,
}

/// A [`BatchLayout`]'s arrays on the device, as the kernels of normal.cu and chi2.cu take
/// them. Built only by [`UploadedLayout::buffers`], which establishes what the launchers'
/// SAFETY notes rely on: `patch`, `win_off`, `scr_off`, `spot_off` and `geom` hold the
/// layout's arrays, `pix`/`ivar` hold at least `pix_len` elements and `spots` at least
/// `spots_len`, every window and spot the layout indexes lying inside them
/// ([`BatchLayout::with_resident`]'s bounds).
pub struct LayoutBuffers<'a> {
    pub(in crate::extract::gpu) npatch: usize,
    pub(in crate::extract::gpu) nmax: usize,
    pub(in crate::extract::gpu) ny: usize,
    pub(in crate::extract::gpu) nx: usize,
    pub(in crate::extract::gpu) npix: usize,
    pub(in crate::extract::gpu) sizes: &'a [i32],
    pub(in crate::extract::gpu) n: Vec<usize>,
    pub(in crate::extract::gpu) patch: &'a CudaSlice<i32>,
    pub(in crate::extract::gpu) win_off: &'a CudaSlice<i64>,
    pub(in crate::extract::gpu) scr_off: &'a CudaSlice<i64>,
    pub(in crate::extract::gpu) pix: &'a CudaSlice<f64>,
    pub(in crate::extract::gpu) ivar: &'a CudaSlice<f64>,
    pub(in crate::extract::gpu) spots: &'a CudaSlice<f64>,
    pub(in crate::extract::gpu) spot_off: &'a CudaSlice<i64>,
    pub(in crate::extract::gpu) geom: &'a CudaSlice<i32>,
}

/// A [`BatchLayout`] on the device: its own arrays uploaded, the resident ones borrowed.
pub struct UploadedLayout<'a> {
    npatch: usize,
    nmax: usize,
    ny: usize,
    nx: usize,
    npix: usize,
    sizes: Vec<i32>,
    n: Vec<usize>,
    patch: CudaSlice<i32>,
    win_off: CudaSlice<i64>,
    scr_off: CudaSlice<i64>,
    spot_off: CudaSlice<i64>,
    geom: CudaSlice<i32>,
    pix: Source<'a>,
    ivar: Source<'a>,
    spots: Source<'a>,
}

/// A buffer the layout uploaded itself, or one already on the device.
enum Source<'a> {
    Own(CudaSlice<f64>),
    Resident(&'a CudaSlice<f64>),
}

impl Source<'_> {
    fn get(&self) -> &CudaSlice<f64> {
        match self {
            Source::Own(b) => b,
            Source::Resident(b) => b,
        }
    }
}

impl<'a> UploadedLayout<'a> {
    /// Copies `layout`'s arrays to the device, borrowing the resident ones it indexes from
    /// `on_device`. Fails when those are missing or are not the arrays (or sizes) the layout
    /// was built against.
    pub fn upload(
        gpu: &Gpu,
        layout: &BatchLayout,
        on_device: OnDevice<'a>,
    ) -> Result<UploadedLayout<'a>, GpuError> {
        let own = |v: &[f64], what: &'static str| -> Result<Source<'a>, GpuError> {
            Ok(Source::Own(gpu.upload(v).map_err(cuda(what))?))
        };
        let (pix, ivar) = if layout.pixels_resident {
            match on_device.pixels {
                Some(d) if Some(d.held) == layout.pixels_held && d.held.len() >= layout.pix_len => {
                    (Source::Resident(&d.pix), Source::Resident(&d.ivar))
                }
                _ => {
                    return Err(bad(
                        "the layout indexes a unit's pixels that are not on the device".into(),
                    ))
                }
            }
        } else {
            (
                own(&layout.pix, "uploading pixels")?,
                own(&layout.ivar, "uploading ivar")?,
            )
        };
        let spots = if layout.spots_resident {
            match on_device.spots {
                Some(v) if v.len() >= layout.spots_len => Source::Resident(v),
                _ => {
                    return Err(bad(
                        "the layout indexes a spot set that is not on the device".into(),
                    ))
                }
            }
        } else {
            own(&layout.spots, "uploading spots")?
        };
        Ok(UploadedLayout {
            npatch: layout.npatch,
            nmax: layout.nmax,
            ny: layout.ny,
            nx: layout.nx,
            npix: layout.npix,
            sizes: layout.patch.clone(),
            n: (0..layout.npatch).map(|b| layout.n(b)).collect(),
            patch: gpu
                .upload(&layout.patch)
                .map_err(cuda("uploading patch sizes"))?,
            win_off: gpu
                .upload(&layout.win_off)
                .map_err(cuda("uploading window offsets"))?,
            scr_off: gpu
                .upload(&layout.scr_off)
                .map_err(cuda("uploading scratch offsets"))?,
            spot_off: gpu
                .upload(&layout.spot_off)
                .map_err(cuda("uploading spot offsets"))?,
            geom: gpu
                .upload(&layout.geom)
                .map_err(cuda("uploading spot geometry"))?,
            pix,
            ivar,
            spots,
        })
    }

    /// The buffers as the launchers take them.
    pub fn buffers(&self) -> LayoutBuffers<'_> {
        LayoutBuffers {
            npatch: self.npatch,
            nmax: self.nmax,
            ny: self.ny,
            nx: self.nx,
            npix: self.npix,
            sizes: &self.sizes,
            n: self.n.clone(),
            patch: &self.patch,
            win_off: &self.win_off,
            scr_off: &self.scr_off,
            pix: self.pix.get(),
            ivar: self.ivar.get(),
            spots: self.spots.get(),
            spot_off: &self.spot_off,
            geom: &self.geom,
        }
    }
}
