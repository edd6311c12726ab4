//! Model, per-pixel χ², chi2pix and pixmask fraction of a batch of patches on the GPU
//! (`kernels/chi2.cu`; docs/science.md §5.6–5.7), from each patch's solution `x` left on the
//! device by the solve. (The model image and leverage are `model`'s, from the same layouts.)
//!
//! The batch's windows, spots and per-unknown geometry are [`BatchLayout`]'s (uploaded once
//! and shared with the normal-equation stage); [`Chi2Layout`] adds each patch's fiber and bin
//! counts; [`launch()`] queues the kernels on device buffers. The host twin that mirrors them
//! (tested bit for bit against the CPU backend) is `twins::chi2`. Imports `device`, `normal`
//! and the crate's `extract` types.
//!
//! Thread mapping and determinism (details in kernels/chi2.cu): `chi2_pixels` gives each
//! window pixel to one thread, which *gathers* the products
//! `x_u · spot_u(pixel)` of the unknowns covering it in increasing `u`, the CPU's
//! `add_spots` order; `chi2_project` gives each (core fiber, kept bin) to one thread, which
//! sums over its spot's pixels in `cpu::chi2::project`'s order. No floating-point atomics, so
//! the outputs do not depend on scheduling, and they equal the CPU backend's bits for the
//! same `x`.
//!
//! Output layout: `model`, `chi2` and `valid` hold one value per window pixel,
//! windows concatenated as `BatchLayout::pix`; `chi2pix` and `pixmask` hold patch `b`'s core
//! fiber `c`, kept bin `j` at `(b·ncmax + c)·nkmax + j` (zero past the patch's own counts).

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::launch::{self, kernel_params, Guards};

use super::device::Gpu;
use super::normal::{BatchLayout, LayoutBuffers};
use super::GpuError;
use crate::extract::PatchInput;

/// Window rows per block of `chi2_pixels`. A tile only bounds which
/// bins a block considers (the sums do not depend on it): 8 rows of a ~50-column window are
/// ~3 pixels per thread, and each pixel then tests the bins whose spots reach the tile's
/// `8 + ny` rows, in the fibers whose spots reach its column.
pub const TILE_ROWS: usize = 8;
/// Threads per block of `chi2_pixels`.
pub const PIXEL_THREADS: u32 = 128;
/// Threads per block of `chi2_project` (one output slot each).
pub const PROJECT_THREADS: u32 = 128;
/// The dynamic shared memory a block may take without opting in (a patch's unknowns are
/// staged there).
pub(super) const MAX_DYNAMIC_SMEM: usize = 48 * 1024;
/// `gridDim.y` (the patch index) is limited to 65535 by the hardware.
const MAX_GRID_Y: usize = 65_535;

kernel_params! {
    /// `chi2_pixels`' parameters (kernels/params.cuh): sizes and psferr, then the device
    /// addresses of the batch layout, the solutions, and the three per-pixel outputs.
    pub struct Chi2PixelsParams {
        pub tile_rows: i32,
        pub nmax: i32,
        pub nx: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub psferr: f64,
        pub patch: u64,
        pub dims: u64,
        pub win_off: u64,
        pub scr_off: u64,
        pub pix: u64,
        pub ivar: u64,
        pub spots: u64,
        pub spot_off: u64,
        pub geom: u64,
        pub x: u64,
        pub model: u64,
        pub chi2: u64,
        pub valid: u64,
    }
}

kernel_params! {
    /// `chi2_project`'s parameters (kernels/params.cuh): sizes, then the device addresses of
    /// the batch layout, chi2_pixels' outputs, and the two per-slot outputs.
    pub struct Chi2ProjectParams {
        pub nmax: i32,
        pub nx: i32,
        pub ncmax: i32,
        pub nkmax: i32,
        pub patch: u64,
        pub dims: u64,
        pub win_off: u64,
        pub scr_off: u64,
        pub ivar: u64,
        pub spots: u64,
        pub spot_off: u64,
        pub geom: u64,
        pub chi2: u64,
        pub valid: u64,
        pub chi2pix: u64,
        pub pixmask: u64,
    }
}

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("chi2.cu cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("chi2: {what}"), e)
}

/// The per-patch sizes the chi2 kernels need beyond [`BatchLayout`], flattened (host side;
/// uploaded by the launchers, 32 bytes a patch).
///
/// `dims[8b..8b+8] = {nspecpad, nwavetot, core0, ncore, wavepad, nkeep, nstep, 0}` (two
/// `int4` on the device), `core0` being the first core fiber among the solved ones.
#[derive(Debug, Clone)]
pub struct Chi2Layout {
    /// Patches.
    pub npatch: usize,
    /// Unknown slots per patch, as in the layout.
    pub nmax: usize,
    /// Window pixels of the whole batch (`BatchLayout::npix`).
    pub npix: usize,
    /// The largest core-fiber count: chi2pix rows per patch.
    pub ncmax: usize,
    /// The largest kept-bin count: chi2pix columns per patch.
    pub nkmax: usize,
    /// The largest solved-fiber count (sizes the fiber spans in shared memory).
    pub nspmax: usize,
    /// The tallest window (sizes the grid of the per-pixel kernels).
    pub max_wny: usize,
    /// Eight ints per patch, see above.
    pub dims: Vec<i32>,
    /// The layout's `{n, window ny, window nx, 0}` per patch, to check a launch pairs these
    /// dims with the layout they were built for.
    sizes: Vec<i32>,
    /// The layout's spot width.
    nx: usize,
    /// The layout's scratch offset of each window (`BatchLayout::scr_off`).
    scr_off: Vec<i64>,
}

impl Chi2Layout {
    /// The sizes of `batch`, which `layout` flattens. Fails when they disagree or do not
    /// describe a patch (core fibers outside the solved ones, kept bins beyond the core).
    pub fn new(batch: &[PatchInput<'_>], layout: &BatchLayout) -> Result<Chi2Layout, GpuError> {
        if batch.len() != layout.npatch {
            return Err(bad(format!(
                "{} patches for a layout of {}",
                batch.len(),
                layout.npatch
            )));
        }
        let mut dims = Vec::with_capacity(8 * batch.len());
        let (mut ncmax, mut nkmax, mut nspmax, mut max_wny) = (0, 0, 0, 0);
        for (b, inp) in batch.iter().enumerate() {
            let p = &inp.patch;
            if layout.n(b) != p.nunknown() {
                return Err(bad(format!(
                    "patch {b} has {} unknowns, its layout slot {}",
                    p.nunknown(),
                    layout.n(b)
                )));
            }
            let core0 = p.core_fiber_offset();
            let nstep = p.nwavetot.checked_sub(2 * p.wavepad);
            match nstep {
                Some(nstep) if core0 + p.nspec <= p.nspecpad && p.nwave_keep <= nstep => {
                    for v in [
                        p.nspecpad,
                        p.nwavetot,
                        core0,
                        p.nspec,
                        p.wavepad,
                        p.nwave_keep,
                        nstep,
                        0,
                    ] {
                        dims.push(launch::int(v, "a patch's size")?);
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "patch {b}: core fibers {core0}+{} of {}, {} kept of {} bins with \
                         padding {}",
                        p.nspec, p.nspecpad, p.nwave_keep, p.nwavetot, p.wavepad
                    )))
                }
            }
            ncmax = ncmax.max(p.nspec);
            nkmax = nkmax.max(p.nwave_keep);
            nspmax = nspmax.max(p.nspecpad);
            max_wny = max_wny.max(layout.patch[4 * b + 1] as usize);
        }
        if ncmax == 0 || nkmax == 0 || layout.npix == 0 {
            // CUDA refuses zero-byte allocations (and empty grids), and there would be nothing
            // to compute.
            return Err(bad(
                "no core fiber, no kept bin or no window pixel in the batch".into(),
            ));
        }
        if i32::try_from(ncmax * nkmax).is_err() {
            return Err(bad(format!("{ncmax} × {nkmax} output slots overflow i32")));
        }
        Ok(Chi2Layout {
            npatch: layout.npatch,
            nmax: layout.nmax,
            npix: layout.npix,
            ncmax,
            nkmax,
            nspmax,
            max_wny,
            dims,
            sizes: layout.patch.clone(),
            nx: layout.nx,
            scr_off: layout.scr_off.clone(),
        })
    }

    /// Output slots per patch.
    pub fn slots(&self) -> usize {
        self.ncmax * self.nkmax
    }

    /// Dynamic shared memory of the per-pixel kernels: `int4 sg[nmax]`, `double sc[nmax]`,
    /// `long long so[nmax]`, `int span[4·nspmax]`.
    pub(super) fn smem(&self) -> usize {
        self.nmax * (16 + 8 + 8) + 16 * self.nspmax
    }

    /// Row tiles per patch (gridDim.x of the per-pixel kernels).
    pub(super) fn tiles(&self) -> usize {
        self.max_wny.div_ceil(TILE_ROWS)
    }

    /// The spot width.
    pub fn nx(&self) -> usize {
        self.nx
    }

    /// Where patch `b`'s window lies in the per-pixel outputs: its first value, rows and
    /// columns.
    pub fn window(&self, b: usize) -> (usize, usize, usize) {
        let at = |k: usize| usize::try_from(self.sizes[4 * b + k]).unwrap_or(0);
        (usize::try_from(self.scr_off[b]).unwrap_or(0), at(1), at(2))
    }

    /// Patch `b`'s unknowns and its core unknowns (`ncore·nwavetot`).
    pub fn core_columns(&self, b: usize) -> (usize, usize) {
        let at = |v: i32| usize::try_from(v).unwrap_or(0);
        let d = &self.dims[8 * b..8 * b + 4];
        (at(self.sizes[4 * b]), at(d[3]) * at(d[1]))
    }

    /// Index of core fiber `c`, kept bin `j` of patch `b` in `chi2pix` and `pixmask`.
    pub fn slot(&self, b: usize, c: usize, j: usize) -> usize {
        (b * self.ncmax + c) * self.nkmax + j
    }
}

/// The chi2 stage's results on the host (the backend's downloads, or the twin's).
#[derive(Debug, Clone)]
pub struct HostChi2 {
    /// `A·x` per window pixel.
    pub model: Vec<f64>,
    /// Per-pixel χ² with the PSF error term.
    pub chi2: Vec<f64>,
    /// 1 where the total inverse variance is positive, else 0.
    pub valid: Vec<f64>,
    /// `[(b·ncmax + c)·nkmax + j]` (see [`Chi2Layout::slot`]).
    pub chi2pix: Vec<f64>,
    /// Same layout.
    pub pixmask: Vec<f64>,
}

/// The kernels of chi2.cu, loaded once and reused batch after batch.
pub struct Kernels {
    pixels: CudaFunction,
    project: CudaFunction,
    model: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the PTX cache) and loads chi2.cu on `gpu`.
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("chi2.cu")?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| GpuError::Kernel(format!("chi2.cu has no {name}: {e:?}")))
        };
        Ok(Kernels {
            pixels: get("chi2_pixels")?,
            project: get("chi2_project")?,
            model: get("model_image")?,
        })
    }

    /// `model_image` (launched by `model`).
    pub(super) fn model(&self) -> &CudaFunction {
        &self.model
    }
}

/// The chi2 stage's outputs on the device, in the layout of the module docs.
pub struct Chi2Batch {
    /// `A·x` per window pixel.
    pub model: CudaSlice<f64>,
    /// Per-pixel χ².
    pub chi2: CudaSlice<f64>,
    /// Per-pixel validity (1 or 0).
    pub valid: CudaSlice<f64>,
    /// chi2pix, `[npatch·ncmax·nkmax]`.
    pub chi2pix: CudaSlice<f64>,
    /// pixmask fraction, same layout.
    pub pixmask: CudaSlice<f64>,
}

impl Chi2Batch {
    /// Device buffers sized for `dims` (zeroed only so that they hold defined values; the
    /// kernels write every element).
    pub fn alloc(gpu: &Gpu, dims: &Chi2Layout) -> Result<Chi2Batch, GpuError> {
        let st = &gpu.stream;
        let (npix, nslot) = (dims.npix, dims.npatch * dims.slots());
        Ok(Chi2Batch {
            model: st.alloc_zeros(npix).map_err(cuda("allocating the model"))?,
            chi2: st.alloc_zeros(npix).map_err(cuda("allocating chi2"))?,
            valid: st.alloc_zeros(npix).map_err(cuda("allocating valid"))?,
            chi2pix: st.alloc_zeros(nslot).map_err(cuda("allocating chi2pix"))?,
            pixmask: st.alloc_zeros(nslot).map_err(cuda("allocating pixmask"))?,
        })
    }
}

/// Checks that `buf` and `dims` describe the same batch and that the per-pixel kernels can
/// be launched for it; returns the shared-memory bytes of those kernels.
pub(super) fn check_shapes(buf: &LayoutBuffers<'_>, dims: &Chi2Layout) -> Result<usize, GpuError> {
    if buf.npatch != dims.npatch
        || buf.nmax != dims.nmax
        || buf.npix != dims.npix
        || buf.nx != dims.nx
        || buf.sizes != dims.sizes.as_slice()
    {
        return Err(bad(format!(
            "sizes built for {} patches × {} unknowns and {} pixels, buffers of {} × {} and {}",
            dims.npatch, dims.nmax, dims.npix, buf.npatch, buf.nmax, buf.npix
        )));
    }
    if dims.npatch > MAX_GRID_Y {
        return Err(bad(format!(
            "{} patches, at most {MAX_GRID_Y} per launch",
            dims.npatch
        )));
    }
    let smem = dims.smem();
    if smem > MAX_DYNAMIC_SMEM {
        return Err(bad(format!(
            "{} unknowns need {smem} bytes of shared memory, over {MAX_DYNAMIC_SMEM}",
            dims.nmax
        )));
    }
    Ok(smem)
}

/// `chi2_pixels`' launch for `dims` (a block per row tile and patch, the unknowns staged in
/// `Chi2Layout::smem` bytes of shared memory) and its scalar parameters, addresses left 0.
pub fn pixels_launch(
    dims: &Chi2Layout,
    psferr: f64,
) -> Result<(LaunchConfig, Chi2PixelsParams), GpuError> {
    let cfg = LaunchConfig {
        grid_dim: (
            launch::dim(dims.tiles(), "row tiles")?,
            launch::dim(dims.npatch, "patches")?,
            1,
        ),
        block_dim: (PIXEL_THREADS, 1, 1),
        shared_mem_bytes: launch::dim(dims.smem(), "shared memory")?,
    };
    let p = Chi2PixelsParams {
        tile_rows: launch::int(TILE_ROWS, "tile rows")?,
        nmax: launch::int(dims.nmax, "unknowns")?,
        nx: launch::int(dims.nx, "spot width")?,
        psferr,
        ..Chi2PixelsParams::default()
    };
    Ok((cfg, p))
}

/// `chi2_project`'s launch for `dims` (a thread per output slot, a grid row per patch) and
/// its scalar parameters, addresses left 0.
pub fn project_launch(dims: &Chi2Layout) -> Result<(LaunchConfig, Chi2ProjectParams), GpuError> {
    let cfg = LaunchConfig {
        grid_dim: (
            launch::dim(
                dims.slots().div_ceil(PROJECT_THREADS as usize),
                "slot blocks",
            )?,
            launch::dim(dims.npatch, "patches")?,
            1,
        ),
        block_dim: (PROJECT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let p = Chi2ProjectParams {
        nmax: launch::int(dims.nmax, "unknowns")?,
        nx: launch::int(dims.nx, "spot width")?,
        ncmax: launch::int(dims.ncmax, "core fibers")?,
        nkmax: launch::int(dims.nkmax, "kept bins")?,
        ..Chi2ProjectParams::default()
    };
    Ok((cfg, p))
}

/// Queues `chi2_pixels` then `chi2_project` for the batch of `buf` with solutions `x`
/// (`[npatch·nmax]`, fiber-major, as the solve leaves them) into `out`.
pub fn launch(
    gpu: &Gpu,
    kernels: &Kernels,
    buf: &LayoutBuffers<'_>,
    dims: &Chi2Layout,
    x: &CudaSlice<f64>,
    psferr: f64,
    out: &mut Chi2Batch,
) -> Result<(), GpuError> {
    let smem = check_shapes(buf, dims)?;
    let (npix, nslot) = (dims.npix, dims.npatch * dims.slots());
    if x.len() != dims.npatch * dims.nmax
        || [out.model.len(), out.chi2.len(), out.valid.len()] != [npix; 3]
        || [out.chi2pix.len(), out.pixmask.len()] != [nslot; 2]
    {
        return Err(bad(format!(
            "x of {} values, outputs of {} pixels and {} slots, for {} × {} unknowns, {npix} \
             pixels and {nslot} slots",
            x.len(),
            out.model.len(),
            out.chi2pix.len(),
            dims.npatch,
            dims.nmax
        )));
    }
    let st = &gpu.stream;
    let dims_d = gpu
        .upload(&dims.dims)
        .map_err(cuda("uploading patch dims"))?;
    let (cfg, scalars) = pixels_launch(dims, psferr)?;
    debug_assert_eq!(cfg.shared_mem_bytes as usize, smem);
    let mut g = Guards::default();
    let params = Chi2PixelsParams {
        patch: g.read(buf.patch, st),
        dims: g.read(&dims_d, st),
        win_off: g.read(buf.win_off, st),
        scr_off: g.read(buf.scr_off, st),
        pix: g.read(buf.pix, st),
        ivar: g.read(buf.ivar, st),
        spots: g.read(buf.spots, st),
        spot_off: g.read(buf.spot_off, st),
        geom: g.read(buf.geom, st),
        x: g.read(x, st),
        model: g.write(&mut out.model, st),
        chi2: g.write(&mut out.chi2, st),
        valid: g.write(&mut out.valid, st),
        ..scalars
    };
    let mut l = st.launch_builder(&kernels.pixels);
    l.arg(&params);
    // SAFETY: Chi2PixelsParams is chi2_pixels' one parameter (params.cuh, layout tested), its
    // addresses those of live buffers whose guards (`g`) outlive the launch: patch (i32 × 4
    // per patch, read as int4: device allocations are 256-byte aligned), dims (i32 × 8 per
    // patch, two int4), win_off, scr_off (i64 = long long), pix, ivar, spots (f64), spot_off
    // (i64), geom (i32 × 4 per unknown, int4), x (f64); model, chi2, valid (f64, written).
    // Bounds: the grid is (tiles, npatch); block (tile, b) reads patch[b], dims[2b..2b+2]
    // (uploaded from Chi2Layout, built for this layout: same sizes, checked above), and slots
    // b·nmax + u for u < n_b = nspecpad·nwavetot ≤ nmax of geom/spot_off/x (x's length checked
    // above); it returns unless its rows lie in the window; it reads pix/ivar at win_off[b] +
    // r·ld + c (inside pix_len, LayoutBuffers' contract) and writes scratch pixels scr_off[b] +
    // r·wnx + c of that window only (< npix, the output lengths checked above). Spot reads
    // stay in the spot's ny·nx values because iy is kept in [iy0, iy1) ⊆ [0, ny) and ix in
    // [0, nx); the offsets and geometry are BatchLayout::new's (LayoutBuffers' contract).
    // Shared memory: smem bytes (checked under the limit) as Chi2Layout::smem lays them out,
    // with span indexed by fibers < nspecpad ≤ nspmax.
    unsafe { l.launch(cfg) }.map_err(cuda("launching chi2_pixels"))?;

    // The guards record the events of chi2_pixels' launch before chi2_project's are taken.
    drop(g);

    let (cfg, scalars) = project_launch(dims)?;
    let mut g = Guards::default();
    let params = Chi2ProjectParams {
        patch: g.read(buf.patch, st),
        dims: g.read(&dims_d, st),
        win_off: g.read(buf.win_off, st),
        scr_off: g.read(buf.scr_off, st),
        ivar: g.read(buf.ivar, st),
        spots: g.read(buf.spots, st),
        spot_off: g.read(buf.spot_off, st),
        geom: g.read(buf.geom, st),
        chi2: g.read(&out.chi2, st),
        valid: g.read(&out.valid, st),
        chi2pix: g.write(&mut out.chi2pix, st),
        pixmask: g.write(&mut out.pixmask, st),
        ..scalars
    };
    let mut l = st.launch_builder(&kernels.project);
    l.arg(&params);
    // SAFETY: Chi2ProjectParams is chi2_project's one parameter (params.cuh, layout tested),
    // its addresses those of live buffers whose guards (`g`) outlive the launch: patch, dims
    // (int4 as above), win_off, scr_off (i64), ivar, spots (f64), spot_off (i64), geom (int4),
    // chi2, valid (f64, read: written by chi2_pixels earlier on this stream); chi2pix, pixmask
    // (f64, written). Thread t < ncmax·nkmax of patch b < npatch writes slot b·ncmax·nkmax + t
    // < nslot (lengths checked above); for c < ncore, j < nkeep it reads unknown (core0 + c)·
    // nwavetot + wavepad + j < n_b (Chi2Layout::new: core0 + ncore ≤ nspecpad, nkeep ≤ nstep,
    // wavepad + nstep ≤ nwavetot) and its spot's in-window pixels.
    unsafe { l.launch(cfg) }.map_err(cuda("launching chi2_project"))?;
    drop(g);
    // dims_d drops here: cudarc frees it in stream order, after the kernels.
    Ok(())
}
