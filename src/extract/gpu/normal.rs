//! Dense normal equations of a batch of patches on the GPU (`kernels/normal.cu`), for cuSOLVER's
//! batched Cholesky: per patch a dense, column-major, fiber-major (`u = f·nwavetot + w`)
//! `AᵀWA` with the regularisation on its diagonal, `AᵀWp` and `AᵀW1`, kept on the device.
//!
//! [`BatchLayout`] flattens a batch into the kernels' input arrays; [`twin`] runs the kernels'
//! per-thread algorithm on the host, with the same indexing and the same (explicitly rounded)
//! arithmetic, so that the kernels' logic is tested against the CPU path on machines without a
//! GPU; [`build`] uploads a layout and launches the kernels.
//!
//! Layout of the outputs, `nmax` the largest unknown count of the batch: patch `b`'s
//! `(AᵀWA)[v, u]` is `ata[(b·nmax + u)·nmax + v]` (both triangles, exactly symmetric), and
//! `atp[b·nmax + u]`, `atw1[b·nmax + u]` its vectors. potrfBatched needs one size for the whole
//! batch, so a patch with fewer unknowns (a bundle-edge subbundle: 6 fibers instead of 7) is
//! padded with identity columns and zero right-hand sides, which decouple exactly and solve
//! to 0.

use std::collections::HashMap;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

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

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Cuda(format!("normal equations: {what}: {e:?}"))
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
            crate::extract::cpu::check_input(inp).map_err(|e| bad(e.to_string()))?;
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
            out.patch
                .extend([p.nunknown() as i32, wny as i32, wnx as i32, ld as i32]);
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
                    out.geom[4 * slot..4 * slot + 4].copy_from_slice(&[
                        row0 as i32,
                        col0 as i32,
                        iy0 as i32,
                        iy1 as i32,
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

    fn geom(&self, slot: usize) -> Geom {
        let g = &self.geom[4 * slot..4 * slot + 4];
        Geom {
            row0: g[0] as i64,
            col0: g[1] as i64,
            iy0: g[2] as i64,
            iy1: g[3] as i64,
        }
    }
}

/// The batch's normal equations on the host (from [`twin`] or [`DenseBatch::download`]).
#[derive(Debug, Clone)]
pub struct HostDense {
    /// Patches.
    pub npatch: usize,
    /// Matrix size (leading dimension) of every patch.
    pub nmax: usize,
    /// `AᵀWA` per patch, column-major `nmax × nmax`, fiber-major unknowns.
    pub ata: Vec<f64>,
    /// `AᵀWp`, `[npatch·nmax]`.
    pub atp: Vec<f64>,
    /// `AᵀW1`, `[npatch·nmax]`.
    pub atw1: Vec<f64>,
}

impl HostDense {
    /// `(AᵀWA)[v, u]` of patch `b`.
    pub fn ata(&self, b: usize, v: usize, u: usize) -> f64 {
        self.ata[(b * self.nmax + u) * self.nmax + v]
    }
}

/// One unknown's spot placement, widened to i64 (the kernel's `SpotGeom`).
#[derive(Debug, Clone, Copy)]
struct Geom {
    row0: i64,
    col0: i64,
    iy0: i64,
    iy1: i64,
}

/// Host twin of `normal_dense` followed by `normal_regularize`: the same blocks, the same
/// per-thread work in the same order, the same roundings (`a * b` in Rust is `__dmul_rn`,
/// `mul_add` is `fma`). Every output starts as NaN so that an element the algorithm fails to
/// write shows up, as the GPU test's poisoned buffers do.
pub fn twin(layout: &BatchLayout, regularize: f64, epsilon: f64) -> HostDense {
    let (npatch, nmax) = (layout.npatch, layout.nmax);
    let mut out = HostDense {
        npatch,
        nmax,
        ata: vec![f64::NAN; npatch * nmax * nmax],
        atp: vec![f64::NAN; npatch * nmax],
        atw1: vec![f64::NAN; npatch * nmax],
    };
    for b in 0..npatch {
        for u in 0..nmax {
            twin_dense_block(layout, b, u, &mut out);
        }
    }
    for b in 0..npatch {
        twin_regularize_block(layout, b, regularize, epsilon, &mut out);
    }
    out
}

/// Block `(u, b)` of `normal_dense`.
fn twin_dense_block(l: &BatchLayout, b: usize, u: usize, out: &mut HostDense) {
    let nmax = l.nmax;
    let n = l.n(b);
    let ld = l.patch[4 * b + 3] as i64;
    let base = b * nmax;
    let col = &mut out.ata[(base + u) * nmax..(base + u + 1) * nmax];
    if u >= n {
        for (v, c) in col.iter_mut().enumerate() {
            *c = if v == u { 1.0 } else { 0.0 };
        }
        out.atp[base + u] = 0.0;
        out.atw1[base + u] = 0.0;
        return;
    }
    let (ny, nx) = (l.ny as i64, l.nx as i64);
    let nps = l.ny * l.nx;
    let so = l.spot_off[base + u] as usize;
    // The kernel's shared-memory copy of spot u.
    let su = &l.spots[so..so + nps];
    let gu = l.geom(base + u);
    let off = l.win_off[b] as usize;
    let (pix, w) = (&l.pix[off..], &l.ivar[off..]);
    // Thread v's work (threads stride over v; each entry is independent of the others).
    for (v, c) in col.iter_mut().enumerate() {
        let mut a = 0.0;
        if v < n {
            let gv = l.geom(base + v);
            let sv = &l.spots[l.spot_off[base + v] as usize..];
            a = pair_sum(su, sv, gu, gv, ny, nx, w, ld);
        }
        *c = a;
    }
    // Thread 0: AᵀWp and AᵀW1 of u.
    let (mut rhs, mut fw) = (0.0f64, 0.0f64);
    for iy in gu.iy0..gu.iy1 {
        let r = (gu.row0 + iy) * ld + gu.col0;
        for ix in 0..nx {
            let ws = su[(iy * nx + ix) as usize] * w[(r + ix) as usize];
            rhs = ws.mul_add(pix[(r + ix) as usize], rhs);
            fw += ws;
        }
    }
    out.atp[base + u] = rhs;
    out.atw1[base + u] = fw;
}

/// `pair_sum` of kernels/normal_common.cuh: `Σ su·sv·w` over the window pixels both spots
/// cover (`w`'s rows `ld` apart), multiplying the spots first and walking the overlap in
/// window row-major order.
#[allow(clippy::too_many_arguments)]
fn pair_sum(
    su: &[f64],
    sv: &[f64],
    gu: Geom,
    gv: Geom,
    ny: i64,
    nx: i64,
    w: &[f64],
    ld: i64,
) -> f64 {
    let dy = gv.row0 - gu.row0;
    let dx = gv.col0 - gu.col0;
    if dy >= ny || -dy >= ny || dx >= nx || -dx >= nx {
        return 0.0;
    }
    let rlo = (gu.row0 + gu.iy0).max(gv.row0 + gv.iy0);
    let rhi = (gu.row0 + gu.iy1).min(gv.row0 + gv.iy1);
    let clo = gu.col0.max(gv.col0);
    let chi = gu.col0.min(gv.col0) + nx;
    let mut acc = 0.0f64;
    for r in rlo..rhi {
        let ru = (r - gu.row0) * nx - gu.col0;
        let rv = (r - gv.row0) * nx - gv.col0;
        let rw = r * ld;
        for c in clo..chi {
            acc =
                (su[(ru + c) as usize] * sv[(rv + c) as usize]).mul_add(w[(rw + c) as usize], acc);
        }
    }
    acc
}

/// Block `b` of `normal_regularize`: the tree max of AᵀW1 over `REG_THREADS` threads, then
/// `cpu::normal::regularization`'s term added to each diagonal entry.
fn twin_regularize_block(
    l: &BatchLayout,
    b: usize,
    regularize: f64,
    epsilon: f64,
    out: &mut HostDense,
) {
    let nt = REG_THREADS as usize;
    let nmax = l.nmax;
    let n = l.n(b);
    let base = b * nmax;
    let mut red = vec![f64::NEG_INFINITY; nt];
    for (t, r) in red.iter_mut().enumerate() {
        // f64::max ignores a NaN operand as CUDA's fmax does.
        *r = (t..n)
            .step_by(nt)
            .fold(f64::NEG_INFINITY, |m, u| m.max(out.atw1[base + u]));
    }
    let mut s = nt / 2;
    while s > 0 {
        for t in 0..s {
            red[t] = red[t].max(red[t + s]);
        }
        s /= 2;
    }
    let minweight = 1e-4 * red[0];
    let reg2 = regularize * regularize;
    for u in 0..n {
        let fw = out.atw1[base + u];
        let lambda2 = if fw < minweight {
            let d = minweight - fw;
            d * d
        } else {
            reg2
        };
        let diag = &mut out.ata[(base + u) * nmax + u];
        *diag += lambda2 + epsilon;
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

    /// Copies the batch back (waits for the kernels; tests and diagnostics).
    pub fn download(&self, gpu: &Gpu) -> Result<HostDense, GpuError> {
        let st = &gpu.stream;
        Ok(HostDense {
            npatch: self.npatch,
            nmax: self.nmax,
            ata: st.clone_dtoh(&self.ata).map_err(cuda("downloading AᵀWA"))?,
            atp: st.clone_dtoh(&self.atp).map_err(cuda("downloading AᵀWp"))?,
            atw1: st
                .clone_dtoh(&self.atw1)
                .map_err(cuda("downloading AᵀW1"))?,
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

/// Builds the regularised normal equations of `batch` on `gpu` (queued on its stream; the
/// buffers stay on the device for the batched Cholesky).
pub fn build(
    gpu: &Gpu,
    batch: &[PatchInput<'_>],
    regularize: f64,
    epsilon: f64,
) -> Result<DenseBatch, GpuError> {
    let layout = BatchLayout::new(batch)?;
    let kernels = Kernels::load(gpu)?;
    let up = UploadedLayout::upload(gpu, &layout, OnDevice::default())?;
    let mut out = DenseBatch::alloc(gpu, &layout)?;
    build_into(gpu, &kernels, &up.buffers(), regularize, epsilon, &mut out)?;
    Ok(out)
}

/// [`build`] from an uploaded layout into existing buffers (a pipeline reuses them from batch
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
    let (patch, win_off, pix, ivar, spots, spot_off, geom) = (
        buf.patch,
        buf.win_off,
        buf.pix,
        buf.ivar,
        buf.spots,
        buf.spot_off,
        buf.geom,
    );
    // Checked by BatchLayout::with_resident (nmax, ny·nx fit i32).
    let (nmax_i, ny_i, nx_i) = (nmax as i32, buf.ny as i32, buf.nx as i32);

    let cfg = LaunchConfig {
        grid_dim: (nmax as u32, npatch as u32, 1),
        block_dim: (DENSE_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut launch = st.launch_builder(&kernels.dense);
    launch
        .arg(&nmax_i)
        .arg(&ny_i)
        .arg(&nx_i)
        .arg(patch)
        .arg(win_off)
        .arg(pix)
        .arg(ivar)
        .arg(spots)
        .arg(spot_off)
        .arg(geom)
        .arg(&mut out.ata)
        .arg(&mut out.atp)
        .arg(&mut out.atw1);
    // SAFETY: 13 arguments in normal_dense's order and types: int nmax, ny, nx (i32); patch
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

    let cfg = LaunchConfig {
        grid_dim: (npatch as u32, 1, 1),
        block_dim: (REG_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = st.launch_builder(&kernels.regularize);
    launch
        .arg(&nmax_i)
        .arg(patch)
        .arg(&out.atw1)
        .arg(&regularize)
        .arg(&epsilon)
        .arg(&mut out.ata);
    // SAFETY: 6 arguments in normal_regularize's order and types: int nmax (i32), patch
    // (int4, aligned as above), atw1 (f64, read), regularize and epsilon (f64 by value), ata
    // (f64, written). One block per patch b < npatch with exactly REG_THREADS threads, the size
    // of the kernel's static reduction array; it touches atw1[b·nmax + u] and the diagonal
    // (b·nmax + u)·nmax + u for u < n_b ≤ nmax, inside the buffers checked above. Same stream
    // as normal_dense, so it runs after the AᵀW1 it reads is written.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching normal_regularize"))?;
    Ok(())
}

#[cfg(test)]
use crate::extract::cpu::normal as cpu_normal;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::gpu::device;
    use crate::extract::gpu::scene::{Bundle, Masked, Pixels, Recipe, Scene, Trim};

    /// Random pixels, a copy of `patches[trim]` whose window cuts some of its spots and leaves
    /// some wholly outside, and one unknown of the first patch with every pixel of its spot
    /// masked: AᵀW1 = 0, below 1e-4·max, so the regularisation's first branch is exercised.
    fn recipe(trim: usize) -> Recipe {
        Recipe {
            trim: Some(Trim::Rows(trim)),
            pixels: Pixels::Random,
            masked: Some(Masked::MiddleBin),
        }
    }

    /// 12 toy fibers in 3 subbundles (5, 6 and 5 fibers solved: mixed sizes, so padding), four
    /// wavelength patches each, and a trimmed copy of a middle patch.
    fn toy_scene(seed: u64) -> Scene {
        Bundle::toy(3).into_scene(seed, recipe(5))
    }

    /// `picks` of a whole bundle at the real size ([`Bundle::real_size`]), all of it for
    /// `None`, and a trimmed copy of the middle one.
    fn bundle_scene(picks: Option<&[usize]>, seed: u64) -> (Scene, &'static str) {
        let bundle = Bundle::real_size().pick(picks);
        let (what, recipe) = (bundle.what, recipe(bundle.patches.len() / 2));
        (bundle.into_scene(seed, recipe), what)
    }

    /// The CPU path's normal equations of one patch, scattered into a dense fiber-major
    /// `n × n` column-major matrix with the regularisation on the diagonal.
    struct CpuDense {
        n: usize,
        ata: Vec<f64>,
        atp: Vec<f64>,
        atw1: Vec<f64>,
    }

    fn cpu_dense(inp: &PatchInput<'_>, regularize: f64, epsilon: f64) -> CpuDense {
        let mut geom = Vec::new();
        cpu_normal::geometry(inp, &mut geom);
        let n = geom.len();
        let nps = inp.spots.ny * inp.spots.nx;
        let (mut pairs, mut atp, mut atw1) = (Vec::new(), vec![0.0; n], vec![0.0; n]);
        let mut wspot = vec![0.0; n * nps];
        cpu_normal::build(
            inp,
            &geom,
            &mut cpu_normal::Normal {
                pairs: &mut pairs,
                rhs: &mut atp,
                fluxweight: &mut atw1,
                wspot: &mut wspot,
            },
        );
        let mut diag = Vec::new();
        cpu_normal::regularization(&atw1, regularize, epsilon, &mut diag);
        let (nsp, nwt) = (inp.patch.nspecpad, inp.patch.nwavetot);
        // Wavelength-major p = w·nsp + f → fiber-major u = f·nwt + w.
        let unperm = |p: u32| (p as usize % nsp) * nwt + p as usize / nsp;
        let mut ata = vec![0.0; n * n];
        for &(p, q, v) in &pairs {
            let (a, b) = (unperm(p), unperm(q));
            ata[a * n + b] = v;
            ata[b * n + a] = v;
        }
        for (u, d) in diag.iter().enumerate() {
            ata[u * n + u] += d;
        }
        CpuDense { n, ata, atp, atw1 }
    }

    fn max_abs(v: &[f64]) -> f64 {
        v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
    }

    /// Compares `got` with the CPU path patch by patch and returns the largest differences of
    /// AᵀWA, AᵀWp and AᵀW1, each relative to the patch's largest entry of that quantity.
    /// Also asserts what must hold exactly: every element written (finite), the padding an
    /// identity, the matrix bitwise symmetric, and zero exactly where the CPU has no pair.
    fn compare_with_cpu(
        got: &HostDense,
        inputs: &[PatchInput<'_>],
        regularize: f64,
        epsilon: f64,
    ) -> [f64; 3] {
        let nmax = got.nmax;
        assert_eq!(got.npatch, inputs.len());
        let mut worst = [0.0f64; 3];
        for (b, inp) in inputs.iter().enumerate() {
            let cpu = cpu_dense(inp, regularize, epsilon);
            let n = cpu.n;
            let scale = max_abs(&cpu.ata);
            assert!(scale > 0.0);
            for u in 0..nmax {
                for v in 0..nmax {
                    let g = got.ata(b, v, u);
                    assert!(g.is_finite(), "patch {b}: AᵀWA[{v}, {u}] = {g}");
                    if u < n && v < n {
                        let c = cpu.ata[u * n + v];
                        assert_eq!(
                            g.to_bits(),
                            got.ata(b, u, v).to_bits(),
                            "symmetry {b} {u} {v}"
                        );
                        assert_eq!(g == 0.0, c == 0.0, "patch {b} ({v}, {u}): {g} vs {c}");
                        worst[0] = worst[0].max((g - c).abs() / scale);
                    } else {
                        let want = if u == v { 1.0 } else { 0.0 };
                        assert_eq!(g, want, "patch {b}: padding ({v}, {u})");
                    }
                }
            }
            for (k, (all, cpu_v)) in [(&got.atp, &cpu.atp), (&got.atw1, &cpu.atw1)]
                .into_iter()
                .enumerate()
            {
                let g = &all[b * nmax..(b + 1) * nmax];
                let scale = max_abs(cpu_v);
                for (u, &x) in g.iter().enumerate() {
                    assert!(x.is_finite(), "patch {b}: vector {k} [{u}] = {x}");
                    if u < n {
                        worst[k + 1] = worst[k + 1].max((x - cpu_v[u]).abs() / scale);
                    } else {
                        assert_eq!(x, 0.0, "patch {b}: padding of vector {k} at {u}");
                    }
                }
            }
        }
        worst
    }

    /// What the scenes promise: trimmed spots, spots wholly outside, masked pixels, and an
    /// unknown whose every pixel is masked.
    fn assert_scene_covers_edge_cases(layout: &BatchLayout, inputs: &[PatchInput<'_>]) {
        let ny = layout.ny as i32;
        let slots =
            (0..layout.npatch).flat_map(|b| (0..layout.n(b)).map(move |u| b * layout.nmax + u));
        let (mut cut_top, mut cut_bottom, mut outside) = (0, 0, 0);
        for s in slots {
            let g = &layout.geom[4 * s..4 * s + 4];
            cut_top += usize::from(g[2] > 0 && g[2] < g[3]);
            cut_bottom += usize::from(g[3] < ny && g[2] < g[3]);
            outside += usize::from(g[3] <= g[2]);
        }
        assert!(
            cut_top > 0 && cut_bottom > 0 && outside > 0,
            "{cut_top} {cut_bottom} {outside}"
        );
        assert!(inputs.iter().all(|i| i.ivar.iter().any(|&v| v == 0.0)));
        let cpu = cpu_dense(&inputs[0], 0.0, 0.0);
        assert!(cpu.atw1.contains(&0.0) && max_abs(&cpu.atw1) > 0.0);
        assert!(
            layout.n(0) != layout.nmax || inputs.iter().any(|i| i.patch.nunknown() < layout.nmax)
        );
    }

    #[test]
    fn layout_matches_the_cpu_geometry_pixels_and_spots() {
        let scene = toy_scene(1);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.npatch, inputs.len());
        assert_eq!(
            layout.nmax,
            inputs.iter().map(|i| i.patch.nunknown()).max().unwrap()
        );
        let nps = layout.ny * layout.nx;
        let mut geom = Vec::new();
        let mut stored = 0;
        for (b, inp) in inputs.iter().enumerate() {
            cpu_normal::geometry(inp, &mut geom);
            assert_eq!(layout.n(b), geom.len());
            let (wny, wnx) = (inp.window.ny(), inp.window.nx());
            assert_eq!(
                &layout.patch[4 * b + 1..4 * b + 3],
                &[wny as i32, wnx as i32]
            );
            let off = layout.win_off[b] as usize;
            for r in 0..wny {
                for c in 0..wnx {
                    assert_eq!(layout.pix[off + r * wnx + c], inp.pix[[r, c]]);
                    assert_eq!(layout.ivar[off + r * wnx + c], inp.ivar[[r, c]]);
                }
            }
            for s in 0..layout.nmax {
                let slot = b * layout.nmax + s;
                let ours = &layout.geom[4 * slot..4 * slot + 4];
                match geom.get(s) {
                    Some(g) => {
                        let want = [g.row0 as i32, g.col0 as i32, g.iy0 as i32, g.iy1 as i32];
                        assert_eq!(ours, &want, "patch {b} unknown {s}");
                        let so = layout.spot_off[slot] as usize;
                        assert_eq!(
                            &layout.spots[so..so + nps],
                            &inp.spots.values[g.spot..g.spot + nps]
                        );
                    }
                    None => {
                        assert_eq!(ours, &[0, 0, 0, 0]);
                        assert_eq!(layout.spot_off[slot], 0);
                    }
                }
            }
            stored += geom.len();
        }
        // Neighbouring patches share their padding bins' spots, stored once.
        assert!(layout.spots.len() < stored * nps);
        assert_eq!(layout.spots.len() % nps, 0);
    }

    #[test]
    fn layout_refuses_what_the_kernel_cannot_index() {
        assert!(BatchLayout::new(&[])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let scene = toy_scene(2);
        let mut inputs = scene.inputs();
        // A window one column narrower than its spots: the kernel reads no column bounds.
        let inp = &mut inputs[1];
        inp.window.xmax -= 1;
        let nx = inp.window.nx();
        inp.pix = inp.pix.slice_move(ndarray::s![.., ..nx]);
        inp.ivar = inp.ivar.slice_move(ndarray::s![.., ..nx]);
        let err = BatchLayout::new(&inputs).unwrap_err().to_string();
        assert!(err.contains("spans columns"), "{err}");
    }

    #[test]
    fn twin_matches_the_cpu_on_toy_patches() {
        let scene = toy_scene(3);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_scene_covers_edge_cases(&layout, &inputs);
        for (reg, eps) in [(0.0, 1e-15), (0.05, 1e-8)] {
            let got = twin(&layout, reg, eps);
            let worst = compare_with_cpu(&got, &inputs, reg, eps);
            eprintln!(
                "twin vs CPU, toy (regularize {reg}): AᵀWA {:.1e}, AᵀWp {:.1e}, AᵀW1 {:.1e}",
                worst[0], worst[1], worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-13), "{worst:?}");
        }
    }

    #[test]
    fn twin_matches_the_cpu_on_real_psf_patches() {
        if crate::io::shared_data("psf-r0-00067784.fits").is_none() {
            eprintln!("skipping: the real PSF is not in ../shared/data");
            return;
        }
        // Bundle-edge subbundles (6 fibers), middle ones (7), the first and last bins.
        let picks = [0usize, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10];
        let (scene, what) = bundle_scene(Some(&picks), 4);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(what, "real PSF");
        assert_eq!(layout.nmax, 7 * 74);
        assert_scene_covers_edge_cases(&layout, &inputs);
        let bytes = 8 * (layout.pix.len() + layout.ivar.len() + layout.spots.len())
            + 4 * (layout.patch.len() + layout.geom.len())
            + 8 * (layout.win_off.len() + layout.spot_off.len());
        eprintln!(
            "real PSF layout: {} patches, {:.0} kB of inputs per patch, {:.2} MB of outputs",
            layout.npatch,
            bytes as f64 / layout.npatch as f64 / 1e3,
            8.0 * (layout.nmax * layout.nmax + 2 * layout.nmax) as f64 / 1e6
        );
        let got = twin(&layout, 0.0, 1e-15);
        let worst = compare_with_cpu(&got, &inputs, 0.0, 1e-15);
        eprintln!(
            "twin vs CPU, real PSF: AᵀWA {:.1e}, AᵀWp {:.1e}, AᵀW1 {:.1e}",
            worst[0], worst[1], worst[2]
        );
        assert!(worst.iter().all(|&w| w <= 1e-13), "{worst:?}");
    }

    /// normal.cu on GPU 0 against the CPU path (≤ 1e-12 of the largest entry) and against the
    /// twin, on a whole bundle at the real size, with outputs poisoned with NaN beforehand.
    #[test]
    fn gpu_matches_the_cpu_and_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let kernels = Kernels::load(&gpu).expect("normal.cu compiles and loads");
        let (scene, what) = bundle_scene(None, 5);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.nmax, 7 * 74);
        assert_scene_covers_edge_cases(&layout, &inputs);
        let mut out = DenseBatch::alloc(&gpu, &layout).unwrap();
        for (reg, eps) in [(0.0, 1e-15), (1e-4, 1e-8)] {
            let st = &gpu.stream;
            st.memcpy_htod(&vec![f64::NAN; out.ata.len()], &mut out.ata)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.atp.len()], &mut out.atp)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.atw1.len()], &mut out.atw1)
                .unwrap();
            let up = UploadedLayout::upload(&gpu, &layout, OnDevice::default()).unwrap();
            build_into(&gpu, &kernels, &up.buffers(), reg, eps, &mut out).unwrap();
            let got = out.download(&gpu).unwrap();
            let worst = compare_with_cpu(&got, &inputs, reg, eps);
            let tw = twin(&layout, reg, eps);
            let mut differ = 0usize;
            let mut twin_worst = 0.0f64;
            for (g, t) in [
                (&got.ata, &tw.ata),
                (&got.atp, &tw.atp),
                (&got.atw1, &tw.atw1),
            ] {
                let scale = max_abs(t);
                for (a, b) in g.iter().zip(t.iter()) {
                    differ += usize::from(a.to_bits() != b.to_bits());
                    twin_worst = twin_worst.max((a - b).abs() / scale);
                }
            }
            eprintln!(
                "GPU ({}) vs CPU, {} patches, {what}, regularize {reg}: AᵀWA {:.1e}, AᵀWp \
                 {:.1e}, AᵀW1 {:.1e}; vs twin: {differ} elements differ, max {twin_worst:.1e}",
                gpu.info.name,
                inputs.len(),
                worst[0],
                worst[1],
                worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-12), "{worst:?}");
            // The twin rounds exactly as the kernel is written to; anything beyond rounding
            // noise means the two have drifted apart.
            assert!(twin_worst <= 1e-14, "GPU vs twin {twin_worst:e}");
        }
        // The one-call entry point gives the same buffers.
        let once = build(&gpu, &inputs, 1e-4, 1e-8)
            .unwrap()
            .download(&gpu)
            .unwrap();
        let again = out.download(&gpu).unwrap();
        assert!(once
            .ata
            .iter()
            .zip(&again.ata)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(once
            .atp
            .iter()
            .zip(&again.atp)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
