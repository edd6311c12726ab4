//! Dense normal equations of a batch of patches on the GPU (`kernels/normal.cu`), for cuSOLVER's
//! batched Cholesky: per patch a dense, column-major, fiber-major (`u = f·nwavetot + w`)
//! `AᵀWA` with the regularisation on its diagonal, `AᵀWp` and `AᵀW1`, kept on the device.
//!
//! [`BatchLayout`] flattens a batch into the kernels' input arrays (a work unit's resident
//! pixels and spots included); [`UploadedLayout`] puts it on the device and [`build_into`]
//! launches the kernels. The host twin that mirrors them is `twins::normal`. Imports `device`
//! and the crate's `extract` and `psf` types.
//!
//! Layout of the outputs, `nmax` the largest unknown count of the batch: patch `b`'s
//! `(AᵀWA)[v, u]` is `ata[(b·nmax + u)·nmax + v]` (both triangles, exactly symmetric), and
//! `atp[b·nmax + u]`, `atw1[b·nmax + u]` its vectors. potrfBatched needs one size for the whole
//! batch, so a patch with fewer unknowns (a bundle-edge subbundle: 6 fibers instead of 7) is
//! padded with identity columns and zero right-hand sides, which decouple exactly and solve
//! to 0.

use std::collections::HashMap;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::launch::{self, kernel_params, Guards};

use super::device::Gpu;
use super::GpuError;
use crate::extract::PatchInput;
use crate::psf::SpotSet;
use ndarray::ArrayView2;

/// Threads per block of `normal_dense`: a column of 518 rows takes five strides; more threads
/// would idle on the ~89 % of rows that do not overlap column u's spot.
pub const DENSE_THREADS: u32 = 128;
/// Threads per block of `normal_regularize`; must equal `REG_THREADS` in kernels/normal.cu
/// (its shared reduction array has that size and its tree needs a power of two).
pub const REG_THREADS: u32 = 256;
/// The dynamic shared memory a block may take without opting in (spot u is staged there).
const MAX_DYNAMIC_SMEM: usize = 48 * 1024;
/// `gridDim.y` (the patch index of `normal_dense`) is limited to 65535 by the hardware.
const MAX_GRID_Y: usize = 65_535;

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("normal.cu cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("normal equations: {what}"), e)
}

/// A batch flattened into the kernels' input arrays (host-side; uploaded by
/// [`UploadedLayout::upload`]).
///
/// Per patch `b`: `patch[4b..4b+4] = {n, window ny, window nx, ld}` (an `int4` on the device),
/// `win_off[b]`, the offset of the window's first pixel in `pix` and `ivar`, whose rows are `ld`
/// apart, and `scr_off[b]`, the offset of its pixels in the per-pixel scratch arrays of the
/// chi2 stage (windows concatenated, each row-major and contiguous).
/// Per unknown slot `b·nmax + u` (fiber-major `u`; slots `u ≥ n` are padding and hold zeros):
/// `spot_off`, the offset of its spot (`ny·nx` row-major values) in `spots`, and `geom[4·slot..]
/// = {row0, col0, iy0, iy1}` as in `cpu::normal::SpotGeom`.
///
/// `pix`/`ivar` and `spots` are either the batch's own copies (the windows concatenated, `ld`
/// = window width; the spots it uses, each once) or empty, when the layout indexes arrays
/// already on the device ([`Resident`]): a work unit's pixels uploaded once for all its
/// patches, a spot set evaluated on the device. Then `win_off` and `spot_off` are offsets
/// into those arrays.
#[derive(Debug, Clone)]
pub struct BatchLayout {
    /// Patches in the batch.
    pub npatch: usize,
    /// The largest unknown count: every patch's matrix is `nmax × nmax`.
    pub nmax: usize,
    /// Spot rows (the same for every patch of a batch).
    pub ny: usize,
    /// Spot columns.
    pub nx: usize,
    /// `{n, window ny, window nx, ld}` per patch.
    pub patch: Vec<i32>,
    /// Offset of each patch's window in `pix` and `ivar`.
    pub win_off: Vec<i64>,
    /// Offset of each patch's window in the per-pixel scratch arrays.
    pub scr_off: Vec<i64>,
    /// Window pixels of the batch: the scratch arrays' length.
    pub npix: usize,
    /// The windows' image values, concatenated (empty when the pixels are resident).
    pub pix: Vec<f64>,
    /// The windows' inverse variances, concatenated (likewise).
    pub ivar: Vec<f64>,
    /// Every distinct spot the batch uses, once (empty when the spots are resident).
    pub spots: Vec<f64>,
    /// Elements `pix` and `ivar` must hold on the device: every window ends before it.
    pub pix_len: usize,
    /// Elements the spot array must hold on the device.
    pub spots_len: usize,
    /// Whether `win_off` indexes the resident pixels rather than `pix`.
    pub pixels_resident: bool,
    /// Which resident pixels, when it does.
    pub pixels_key: Option<ResidentPixels>,
    /// Whether `spot_off` indexes the resident spot set rather than `spots`.
    pub spots_resident: bool,
    /// Offset in `spots` of each unknown's spot, `[npatch·nmax]`.
    pub spot_off: Vec<i64>,
    /// `{row0, col0, iy0, iy1}` per unknown, `[npatch·nmax·4]`.
    pub geom: Vec<i32>,
}

/// Host arrays whose copies are already on the device, which a batch indexes instead of
/// carrying its own ([`BatchLayout::with_resident`]).
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

/// The geometry of a spot set whose values are on the device only: a [`SpotSet`] with no
/// values and this geometry is taken to be that set (the GPU backend's `evaluate_spots` leaves
/// exactly that on the host).
#[derive(Debug, Clone, PartialEq)]
pub struct ResidentSpots {
    /// Fibers and wavelengths (`fibermin` is not compared: callers renumber it).
    pub nfiber: usize,
    /// Wavelengths per fiber.
    pub nwave: usize,
    /// Spot rows.
    pub ny: usize,
    /// Spot columns.
    pub nx: usize,
    /// Each spot's first column.
    pub xc: Vec<i64>,
    /// Each spot's first row.
    pub yc: Vec<i64>,
}

impl ResidentSpots {
    /// The geometry of `set`.
    pub fn of(set: &SpotSet) -> ResidentSpots {
        ResidentSpots {
            nfiber: set.grid.nfiber,
            nwave: set.grid.nwave,
            ny: set.ny,
            nx: set.nx,
            xc: set.xc.clone(),
            yc: set.yc.clone(),
        }
    }

    /// Values on the device.
    pub fn len(&self) -> usize {
        self.nfiber * self.nwave * self.ny * self.nx
    }

    /// Whether the set has no spot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `set` is this one: values left on the device, the same geometry.
    pub fn holds(&self, set: &SpotSet) -> bool {
        set.values.is_empty()
            && (set.grid.nfiber, set.grid.nwave, set.ny, set.nx)
                == (self.nfiber, self.nwave, self.ny, self.nx)
            && set.xc == self.xc
            && set.yc == self.yc
    }
}

impl BatchLayout {
    /// Flattens `batch` with its own copies of the windows and spots.
    pub fn new(batch: &[PatchInput<'_>]) -> Result<BatchLayout, GpuError> {
        Self::with_resident(batch, &Resident::default())
    }

    /// Flattens `batch`, indexing the resident pixels when every window is a slice of them
    /// and the resident spots when every patch's set is that one; otherwise the batch carries
    /// its own copies. Fails on what the kernels cannot index: an empty batch, spots of
    /// different sizes, a spot column outside its window, sizes beyond `i32`, or spots whose
    /// values are on the device but not the resident set.
    pub fn with_resident(
        batch: &[PatchInput<'_>],
        resident: &Resident,
    ) -> Result<BatchLayout, GpuError> {
        let first = batch
            .first()
            .ok_or_else(|| bad("the batch is empty".into()))?;
        let (ny, nx) = (first.spots.ny, first.spots.nx);
        let nmax = batch.iter().map(|i| i.patch.nunknown()).max().unwrap_or(0);
        if nmax == 0 || ny == 0 || nx == 0 {
            return Err(bad(format!(
                "no unknowns or empty spots (nmax {nmax}, spots {ny}×{nx})"
            )));
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        if !fits(nmax) || !fits(ny * nx) {
            return Err(bad(format!(
                "{nmax} unknowns or {ny}×{nx} spots overflow i32"
            )));
        }
        let npatch = batch.len();
        let nps = ny * nx;
        // Resident pixels: every window must be a slice of them, else the batch copies all.
        let pix_offsets: Option<Vec<usize>> = resident
            .pixels
            .as_ref()
            .and_then(|r| batch.iter().map(|inp| r.offset_of(inp)).collect());
        // A batch's patches share a few sets: compare each set with the resident one once.
        let mut held: Vec<(usize, bool)> = Vec::new();
        let spots_resident = match resident.spots {
            Some(r) => batch.iter().all(|inp| {
                let key = inp.spots as *const SpotSet as usize;
                match held.iter().find(|(k, _)| *k == key) {
                    Some(&(_, h)) => h,
                    None => {
                        let h = r.holds(inp.spots);
                        held.push((key, h));
                        h
                    }
                }
            }),
            None => false,
        };
        if !spots_resident && batch.iter().any(|inp| inp.spots.values.is_empty()) {
            return Err(bad(
                "a spot set whose values are on the device is not the one resident there".into(),
            ));
        }
        let mut out = BatchLayout {
            npatch,
            nmax,
            ny,
            nx,
            patch: Vec::with_capacity(4 * npatch),
            win_off: Vec::with_capacity(npatch),
            scr_off: Vec::with_capacity(npatch),
            npix: 0,
            pix: Vec::new(),
            ivar: Vec::new(),
            spots: Vec::new(),
            pix_len: 0,
            spots_len: 0,
            pixels_resident: pix_offsets.is_some(),
            pixels_key: resident.pixels.filter(|_| pix_offsets.is_some()),
            spots_resident,
            spot_off: vec![0; npatch * nmax],
            geom: vec![0; 4 * npatch * nmax],
        };
        // A batch may span bundles (several spot sets) and neighbouring patches share spots
        // (the wavelength padding overlaps), so each spot is stored once, keyed by its set and
        // its index there.
        let mut seen: HashMap<(usize, usize), i64> = HashMap::new();
        for (b, inp) in batch.iter().enumerate() {
            inp.check().map_err(|e| bad(e.to_string()))?;
            let s = inp.spots;
            if (s.ny, s.nx) != (ny, nx) {
                return Err(bad(format!(
                    "spots of {}×{} and {ny}×{nx} in one batch",
                    s.ny, s.nx
                )));
            }
            let (wny, wnx) = (inp.window.ny(), inp.window.nx());
            if !fits(wny) || !fits(wnx) {
                return Err(bad(format!("a {wny}×{wnx} window overflows i32")));
            }
            let ld = match (&pix_offsets, &resident.pixels) {
                (Some(offs), Some(r)) => {
                    out.win_off.push(offs[b] as i64);
                    r.ld()
                }
                _ => {
                    out.win_off.push(out.pix.len() as i64);
                    // `iter` walks a view in logical row-major order, whatever its strides (a
                    // window is a slice of the CCD), which is the contiguous layout indexed.
                    out.pix.extend(inp.pix.iter());
                    out.ivar.extend(inp.ivar.iter());
                    wnx
                }
            };
            if !fits(ld) {
                return Err(bad(format!("a row stride of {ld} overflows i32")));
            }
            let p = &inp.patch;
            for v in [p.nunknown(), wny, wnx, ld] {
                out.patch.push(launch::int(v, "a patch's size")?);
            }
            out.scr_off.push(out.npix as i64);
            out.npix += wny * wnx;
            let set = s as *const crate::psf::SpotSet as usize;
            let f0 = p.specmin - s.grid.fibermin;
            let (sny, snx, nyw) = (ny as i64, nx as i64, wny as i64);
            for f in 0..p.nspecpad {
                for w in 0..p.nwavetot {
                    let u = f * p.nwavetot + w;
                    let i = s.index(f0 + f, p.iwave + w);
                    let row0 = s.yc[i] - inp.window.ymin;
                    let col0 = s.xc[i] - inp.window.xmin;
                    // The window spans every spot's columns (pixels::window), which is what
                    // lets the kernel skip column bounds; a window cut otherwise is refused.
                    if col0 < 0 || col0 + snx > wnx as i64 {
                        return Err(bad(format!(
                            "patch {b}: spot {u} spans columns {col0}..{} of a {wnx}-column \
                             window",
                            col0 + snx
                        )));
                    }
                    // Rows are compared as `row0 + iy` in i32 in the kernel.
                    if row0.abs() > (i32::MAX / 2) as i64 {
                        return Err(bad(format!("patch {b}: spot {u} at window row {row0}")));
                    }
                    let iy0 = (-row0).clamp(0, sny);
                    let iy1 = (nyw - row0).clamp(0, sny);
                    let slot = b * nmax + u;
                    let int = |v: i64| {
                        i32::try_from(v)
                            .map_err(|_| bad(format!("patch {b}: spot {u} at {v} overflows i32")))
                    };
                    out.geom[4 * slot..4 * slot + 4].copy_from_slice(&[
                        int(row0)?,
                        int(col0)?,
                        int(iy0)?,
                        int(iy1)?,
                    ]);
                    out.spot_off[slot] = if spots_resident {
                        (i * nps) as i64
                    } else {
                        *seen.entry((set, i)).or_insert_with(|| {
                            let off = out.spots.len() as i64;
                            out.spots
                                .extend_from_slice(&s.values[i * nps..(i + 1) * nps]);
                            off
                        })
                    };
                }
            }
        }
        out.pix_len = match &resident.pixels {
            Some(r) if out.pixels_resident => r.len(),
            _ => out.pix.len(),
        };
        out.spots_len = match resident.spots {
            Some(r) if spots_resident => r.len(),
            _ => out.spots.len(),
        };
        Ok(out)
    }

    /// Unknowns of patch `b`.
    pub fn n(&self, b: usize) -> usize {
        self.patch[4 * b] as usize
    }
}

/// The two kernels of normal.cu, loaded once and reused batch after batch.
pub struct Kernels {
    dense: CudaFunction,
    regularize: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the PTX cache) and loads normal.cu on `gpu`.
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("normal.cu")?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| GpuError::Kernel(format!("normal.cu has no {name}: {e:?}")))
        };
        Ok(Kernels {
            dense: get("normal_dense")?,
            regularize: get("normal_regularize")?,
        })
    }
}

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

/// A work unit's pixels on the device, uploaded once for all the batches cut from them.
pub struct DevicePixels {
    /// Which host arrays they are copies of.
    pub key: ResidentPixels,
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
        let (Some(key), Some(p), Some(w)) = (
            ResidentPixels::of(pix.view(), ivar.view()),
            pix.as_slice(),
            ivar.as_slice(),
        ) else {
            return Ok(None);
        };
        let st = &gpu.stream;
        Ok(Some(DevicePixels {
            key,
            pix: st
                .clone_htod(p)
                .map_err(cuda("uploading the unit's pixels"))?,
            ivar: st
                .clone_htod(w)
                .map_err(cuda("uploading the unit's ivar"))?,
        }))
    }
}

/// The arrays already on the device that a layout built with [`Resident`] indexes.
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
    pub(super) npatch: usize,
    pub(super) nmax: usize,
    pub(super) ny: usize,
    pub(super) nx: usize,
    pub(super) npix: usize,
    pub(super) sizes: &'a [i32],
    pub(super) n: Vec<usize>,
    pub(super) patch: &'a CudaSlice<i32>,
    pub(super) win_off: &'a CudaSlice<i64>,
    pub(super) scr_off: &'a CudaSlice<i64>,
    pub(super) pix: &'a CudaSlice<f64>,
    pub(super) ivar: &'a CudaSlice<f64>,
    pub(super) spots: &'a CudaSlice<f64>,
    pub(super) spot_off: &'a CudaSlice<i64>,
    pub(super) geom: &'a CudaSlice<i32>,
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
                Some(d) if Some(d.key) == layout.pixels_key && d.key.len() >= layout.pix_len => {
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

kernel_params! {
    /// `normal_dense`'s parameters (kernels/params.cuh): sizes, then the device addresses of
    /// the batch layout it reads and of AᵀWA, AᵀWp and AᵀW1, which it writes.
    pub struct NormalDenseParams {
        pub nmax: i32,
        pub ny: i32,
        pub nx: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub patch: u64,
        pub win_off: u64,
        pub pix: u64,
        pub ivar: u64,
        pub spots: u64,
        pub spot_off: u64,
        pub geom: u64,
        pub ata: u64,
        pub atp: u64,
        pub atw1: u64,
    }
}

kernel_params! {
    /// `normal_regularize`'s parameters (kernels/params.cuh): nmax, the patches and AᵀW1 it
    /// reads, the regularisation constants, and AᵀWA, whose diagonal it writes.
    pub struct NormalRegularizeParams {
        pub nmax: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub patch: u64,
        pub atw1: u64,
        pub regularize: f64,
        pub epsilon: f64,
        pub ata: u64,
    }
}

/// `normal_dense`'s launch: a block of [`DENSE_THREADS`] per unknown slot and patch, with an
/// `ny × nx` spot of doubles in dynamic shared memory.
pub fn dense_config(
    npatch: usize,
    nmax: usize,
    ny: usize,
    nx: usize,
) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (
            launch::dim(nmax, "unknowns")?,
            launch::dim(npatch, "patches")?,
            1,
        ),
        block_dim: (DENSE_THREADS, 1, 1),
        shared_mem_bytes: launch::dim(ny * nx * std::mem::size_of::<f64>(), "shared memory")?,
    })
}

/// `normal_regularize`'s launch: a block of exactly [`REG_THREADS`] (its static reduction
/// array's size) per patch.
pub fn regularize_config(npatch: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (launch::dim(npatch, "patches")?, 1, 1),
        block_dim: (REG_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The normal equations of an uploaded layout into existing buffers (a pipeline reuses them from batch
/// to batch).
pub fn build_into(
    gpu: &Gpu,
    kernels: &Kernels,
    buf: &LayoutBuffers<'_>,
    regularize: f64,
    epsilon: f64,
    out: &mut DenseBatch,
) -> Result<(), GpuError> {
    let (npatch, nmax) = (buf.npatch, buf.nmax);
    if out.npatch != npatch
        || out.nmax != nmax
        || out.ata.len() != npatch * nmax * nmax
        || out.atp.len() != npatch * nmax
        || out.atw1.len() != npatch * nmax
    {
        return Err(bad(format!(
            "output buffers for {} patches of {} unknowns, layout of {npatch} × {nmax}",
            out.npatch, out.nmax
        )));
    }
    if npatch > MAX_GRID_Y {
        return Err(bad(format!(
            "{npatch} patches, at most {MAX_GRID_Y} per launch"
        )));
    }
    let smem = buf.ny * buf.nx * std::mem::size_of::<f64>();
    if smem > MAX_DYNAMIC_SMEM {
        return Err(bad(format!(
            "a {}×{} spot needs {smem} bytes of shared memory, over {MAX_DYNAMIC_SMEM}",
            buf.ny, buf.nx
        )));
    }
    out.n = buf.n.clone();
    let st = &gpu.stream;
    let (nmax_i, ny_i, nx_i) = (
        launch::int(nmax, "unknowns")?,
        launch::int(buf.ny, "spot height")?,
        launch::int(buf.nx, "spot width")?,
    );

    let cfg = dense_config(npatch, nmax, buf.ny, buf.nx)?;
    debug_assert_eq!(cfg.shared_mem_bytes as usize, smem);
    let mut g = Guards::default();
    let args = NormalDenseParams {
        nmax: nmax_i,
        ny: ny_i,
        nx: nx_i,
        pad0: 0,
        patch: g.read(buf.patch, st),
        win_off: g.read(buf.win_off, st),
        pix: g.read(buf.pix, st),
        ivar: g.read(buf.ivar, st),
        spots: g.read(buf.spots, st),
        spot_off: g.read(buf.spot_off, st),
        geom: g.read(buf.geom, st),
        ata: g.write(&mut out.ata, st),
        atp: g.write(&mut out.atp, st),
        atw1: g.write(&mut out.atw1, st),
    };
    let mut launch = st.launch_builder(&kernels.dense);
    launch.arg(&args);
    // SAFETY: NormalDenseParams is normal_dense's one parameter (kernels/params.cuh, layout
    // tested), its addresses those of live buffers whose guards (`g`) outlive the launch:
    // int nmax, ny, nx (i32); patch
    // (i32 × 4 per patch, read as int4: device allocations are 256-byte aligned), win_off
    // (i64 = long long), pix, ivar, spots (f64), spot_off (i64), geom (i32 × 4 per unknown,
    // int4); ata, atp, atw1 (f64, written). Bounds: the grid is (nmax, npatch) and every block
    // reads patch[b] < npatch, slots b·nmax + u < npatch·nmax of spot_off/geom and writes
    // column (b·nmax + u) of ata (length nmax) and slot b·nmax + u of atp/atw1, sizes checked
    // above. LayoutBuffers' contract: each spot offset + ny·nx ≤ spots.len(), and every pixel
    // read (rows clamped to the window by iy0/iy1, columns inside it by the col0 check) lies in
    // its window at win_off with rows ld apart, inside pix/ivar. Shared memory: ny·nx doubles,
    // passed as smem.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching normal_dense"))?;
    // The guards record the events of normal_dense's launch before normal_regularize's are
    // taken.
    drop(g);

    let mut g = Guards::default();
    let args = NormalRegularizeParams {
        nmax: nmax_i,
        pad0: 0,
        patch: g.read(buf.patch, st),
        atw1: g.read(&out.atw1, st),
        regularize,
        epsilon,
        ata: g.write(&mut out.ata, st),
    };
    let mut launch = st.launch_builder(&kernels.regularize);
    launch.arg(&args);
    let cfg = regularize_config(npatch)?;
    // SAFETY: NormalRegularizeParams is normal_regularize's one parameter (kernels/params.cuh,
    // layout tested), its addresses those of live buffers whose guards (`g`) outlive the
    // launch: int nmax (i32), patch
    // (int4, aligned as above), atw1 (f64, read), regularize and epsilon (f64 by value), ata
    // (f64, written). One block per patch b < npatch with exactly REG_THREADS threads, the size
    // of the kernel's static reduction array; it touches atw1[b·nmax + u] and the diagonal
    // (b·nmax + u)·nmax + u for u < n_b ≤ nmax, inside the buffers checked above. Same stream
    // as normal_dense, so it runs after the AᵀW1 it reads is written.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching normal_regularize"))?;
    drop(g);
    Ok(())
}
