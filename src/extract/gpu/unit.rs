//! A work unit's results kept on the device, for the cuda-aware-mpi build's output path: each
//! chunk's kept bins are scattered (`unit.cu`) into the unit's fiber × bin arrays, the CPU's
//! results for the patches the device could not finish are uploaded over theirs, and the
//! arrays then travel to the writer straight from device memory.
//!
//! Imports `device` and the stages' output types of this backend, and `extract`'s patch
//! types; nothing of the pipeline.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::launch::{self, kernel_params, Guards};

use super::chi2::{Chi2Batch, Chi2Layout};
use super::decorrelate::DecorrBatch;
use super::device::Gpu;
use super::GpuError;
use crate::extract::{PatchInput, PatchResult};
use crate::patch::Patch;

/// Threads per block of `unit_scatter` (a block's kept bins, ≤ nwavestep).
pub const SCATTER_THREADS: u32 = 64;

kernel_params! {
    /// `unit_scatter`'s parameters (kernels/params.cuh): the chunk's and unit's sizes, then
    /// the device addresses of what it reads (placements, potrf's info, the decorrelation's
    /// status and outputs, chi2pix and pixmask) and of the unit's five arrays it writes.
    pub struct UnitScatterParams {
        pub nblock: i32,
        pub ncol: i32,
        pub nd2: i32,
        pub nwave: i32,
        pub ncmax: i32,
        pub nkmax: i32,
        pub place: u64,
        pub info: u64,
        pub status: u64,
        pub flux: u64,
        pub fluxivar: u64,
        pub resolution: u64,
        pub chi2pix: u64,
        pub pixmask: u64,
        pub u_flux: u64,
        pub u_ivar: u64,
        pub u_resolution: u64,
        pub u_chi2pix: u64,
        pub u_pixmask: u64,
    }
}

/// `unit_scatter`'s launch: one block of [`SCATTER_THREADS`] per decorrelation block.
pub fn scatter_config(nblock: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (launch::dim(nblock, "decorrelation blocks")?, 1, 1),
        block_dim: (SCATTER_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("unit.cu cannot take this chunk: {msg}"))
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("unit results: {what}"), e)
}

/// The fibers and bins of a unit's result arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnitShape {
    /// Frame fiber of row 0.
    pub specmin: usize,
    /// Fibers (rows).
    pub nspec: usize,
    /// Bins of the output grid.
    pub nwave: usize,
    /// Resolution diagonals (`2·ndiag + 1`).
    pub nd2: usize,
}

impl UnitShape {
    /// Values of flux, ivar, chi2pix and pixmask each.
    pub fn cells(&self) -> usize {
        self.nspec * self.nwave
    }

    /// Values of the resolution.
    pub fn resolution_cells(&self) -> usize {
        self.cells() * self.nd2
    }

    /// Values of each of the five arrays, in the order [`DeviceUnit::parts`] gives them.
    pub fn part_lens(&self) -> [usize; 5] {
        let c = self.cells();
        [c, c, self.resolution_cells(), c, c]
    }

    /// The unit row of `patch`'s first core fiber, when its fibers lie inside the unit.
    pub(super) fn row_of(&self, patch: &Patch) -> Result<usize, GpuError> {
        let inside = patch.ispec >= self.specmin
            && patch.ispec + patch.nspec <= self.specmin + self.nspec
            && patch.iwave + patch.nwave_keep <= self.nwave;
        if !inside {
            return Err(bad(format!(
                "patch at fiber {}, bin {} ({} fibers, {} bins) lies outside the unit's fibers \
                 {}..{} and {} bins",
                patch.ispec,
                patch.iwave,
                patch.nspec,
                patch.nwave_keep,
                self.specmin,
                self.specmin + self.nspec,
                self.nwave
            )));
        }
        Ok(patch.ispec - self.specmin)
    }
}

/// A unit's results on the device, zero where nothing was written (dropped patches).
pub struct DeviceUnit {
    /// Rows and bins.
    pub shape: UnitShape,
    /// Decorrelated flux `[nspec·nwave]`.
    pub flux: CudaSlice<f64>,
    /// Its inverse variance.
    pub ivar: CudaSlice<f64>,
    /// Resolution `[(row·nd2 + diagonal)·nwave + bin]`.
    pub resolution: CudaSlice<f64>,
    /// chi2pix.
    pub chi2pix: CudaSlice<f64>,
    /// PSF-weighted masked fraction.
    pub pixmask: CudaSlice<f64>,
}

impl DeviceUnit {
    /// Zeroed arrays for `shape`.
    pub fn zeros(gpu: &Gpu, shape: UnitShape) -> Result<DeviceUnit, GpuError> {
        if shape.cells() == 0 {
            return Err(bad(format!("a unit of {shape:?} holds nothing")));
        }
        let st = &gpu.stream;
        let z = |n: usize| st.alloc_zeros::<f64>(n).map_err(cuda("allocating"));
        let [a, b, r, c, d] = shape.part_lens();
        Ok(DeviceUnit {
            shape,
            flux: z(a)?,
            ivar: z(b)?,
            resolution: z(r)?,
            chi2pix: z(c)?,
            pixmask: z(d)?,
        })
    }

    /// The five arrays in the order they travel: flux, ivar, resolution, chi2pix, pixmask.
    pub fn parts(&self) -> [&CudaSlice<f64>; 5] {
        [
            &self.flux,
            &self.ivar,
            &self.resolution,
            &self.chi2pix,
            &self.pixmask,
        ]
    }

    /// Writes a host result over the cells of `patch` (a CPU retry's, or the zeros of a
    /// failed patch), queued on `gpu`'s stream after what is already there.
    pub fn upload_patch(
        &mut self,
        gpu: &Gpu,
        patch: &Patch,
        r: &PatchResult,
    ) -> Result<(), GpuError> {
        let s = self.shape;
        let row0 = s.row_of(patch)?;
        let (w0, nk) = (patch.iwave, patch.nwave_keep);
        if r.flux.dim() != (patch.nspec, nk) || r.resolution.dim() != (patch.nspec, s.nd2, nk) {
            return Err(bad(format!(
                "a result of {:?} bins and {:?} resolution for a patch of {} fibers × {nk} bins \
                 and {} diagonals",
                r.flux.dim(),
                r.resolution.dim(),
                patch.nspec,
                s.nd2
            )));
        }
        let st = &gpu.stream;
        let put = |dst: &mut CudaSlice<f64>, at: usize, src: Vec<f64>| {
            st.memcpy_htod(&src, &mut dst.slice_mut(at..at + src.len()))
                .map_err(cuda("uploading a CPU result"))
        };
        for c in 0..patch.nspec {
            let at = (row0 + c) * s.nwave + w0;
            put(&mut self.flux, at, r.flux.row(c).to_vec())?;
            put(&mut self.ivar, at, r.fluxivar.row(c).to_vec())?;
            put(&mut self.chi2pix, at, r.chi2pix.row(c).to_vec())?;
            put(&mut self.pixmask, at, r.pixmask_fraction.row(c).to_vec())?;
            for d in 0..s.nd2 {
                let at = ((row0 + c) * s.nd2 + d) * s.nwave + w0;
                let v = r.resolution.slice(ndarray::s![c, d, ..]).to_vec();
                put(&mut self.resolution, at, v)?;
            }
        }
        Ok(())
    }
}

/// Where each decorrelation block of a chunk goes: `{patch, core fiber, unit row, first bin,
/// kept bins}` per block (`blocks` as `backend::blocks_of` lists them).
pub fn placement(
    batch: &[PatchInput<'_>],
    blocks: &[(usize, usize)],
    shape: &UnitShape,
) -> Result<Vec<i32>, GpuError> {
    let mut place = Vec::with_capacity(5 * blocks.len());
    for &(b, c) in blocks {
        let p = &batch[b].patch;
        let row = shape.row_of(p)? + c;
        for v in [b, c, row, p.iwave, p.nwave_keep] {
            place.push(i32::try_from(v).map_err(|_| bad(format!("{v} overflows i32")))?);
        }
    }
    Ok(place)
}

/// `unit.cu` on a device.
pub struct Kernels {
    scatter: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the cache) and loads unit.cu on `gpu`.
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("unit.cu")?;
        Ok(Kernels {
            scatter: module
                .load_function("unit_scatter")
                .map_err(|e| GpuError::Kernel(format!("unit.cu has no unit_scatter: {e:?}")))?,
        })
    }
}

/// A chunk's outputs on the device that `unit_scatter` reads.
pub struct ChunkOutputs<'a> {
    /// potrf's info per patch.
    pub info: &'a CudaSlice<i32>,
    /// The decorrelation's outputs.
    pub dec: &'a DecorrBatch,
    /// The chi2 stage's outputs.
    pub chi2: &'a Chi2Batch,
    /// Their slot layout.
    pub dims: &'a Chi2Layout,
}

/// Queues `unit_scatter` for a chunk: its blocks (`place`, from [`placement`]) read from the
/// chunk's outputs, gated by potrf's info and the decorrelation's status, into `unit`.
pub fn scatter(
    gpu: &Gpu,
    kernels: &Kernels,
    place: &[i32],
    chunk: &ChunkOutputs<'_>,
    unit: &mut DeviceUnit,
) -> Result<(), GpuError> {
    let (info, d, c2, dims) = (chunk.info, chunk.dec, chunk.chi2, chunk.dims);
    let nblock = place.len() / 5;
    let s = unit.shape;
    let nslot = dims.npatch * dims.slots();
    if !place.len().is_multiple_of(5)
        || nblock != d.nblock
        || d.nd2 != s.nd2
        || info.len() != dims.npatch
        || c2.chi2pix.len() != nslot
        || c2.pixmask.len() != nslot
        || d.flux.len() != d.nblock * d.ncol
        || d.resolution.len() != d.nblock * d.nd2 * d.ncol
    {
        return Err(bad(format!(
            "{} placements for {} blocks of {} diagonals (unit: {}), {} infos for {} patches, \
             {} chi2 slots for {nslot}",
            place.len(),
            d.nblock,
            d.nd2,
            s.nd2,
            info.len(),
            dims.npatch,
            c2.chi2pix.len()
        )));
    }
    // What the kernel indexes, checked here where the layouts are known.
    for p in place.chunks_exact(5) {
        let [b, c, row, w0, nk] = [p[0], p[1], p[2], p[3], p[4]].map(|v| v as usize);
        if b >= dims.npatch
            || c >= dims.ncmax
            || nk > dims.nkmax
            || nk > d.ncol
            || row >= s.nspec
            || w0 + nk > s.nwave
        {
            return Err(bad(format!(
                "block of patch {b}, fiber {c}, row {row}, bins {w0}..{} outside the chunk's \
                 {} patches × {} fibers × {} bins or the unit's {} × {}",
                w0 + nk,
                dims.npatch,
                dims.ncmax,
                dims.nkmax.min(d.ncol),
                s.nspec,
                s.nwave
            )));
        }
    }
    if nblock == 0 {
        return Ok(());
    }
    let st = &gpu.stream;
    let place_d = gpu
        .upload(place)
        .map_err(cuda("uploading the placements"))?;
    let as_i32 = |v: usize| i32::try_from(v).map_err(|_| bad(format!("{v} overflows i32")));
    let (nb, ncol, nd2) = (as_i32(nblock)?, as_i32(d.ncol)?, as_i32(d.nd2)?);
    let (nwave, ncmax, nkmax) = (as_i32(s.nwave)?, as_i32(dims.ncmax)?, as_i32(dims.nkmax)?);
    let mut g = Guards::default();
    let params = UnitScatterParams {
        nblock: nb,
        ncol,
        nd2,
        nwave,
        ncmax,
        nkmax,
        place: g.read(&place_d, st),
        info: g.read(info, st),
        status: g.read(&d.status, st),
        flux: g.read(&d.flux, st),
        fluxivar: g.read(&d.fluxivar, st),
        resolution: g.read(&d.resolution, st),
        chi2pix: g.read(&c2.chi2pix, st),
        pixmask: g.read(&c2.pixmask, st),
        u_flux: g.write(&mut unit.flux, st),
        u_ivar: g.write(&mut unit.ivar, st),
        u_resolution: g.write(&mut unit.resolution, st),
        u_chi2pix: g.write(&mut unit.chi2pix, st),
        u_pixmask: g.write(&mut unit.pixmask, st),
    };
    let mut l = st.launch_builder(&kernels.scatter);
    l.arg(&params);
    let cfg = scatter_config(nblock)?;
    // SAFETY: UnitScatterParams is the kernel's one parameter (params.cuh, layout tested), its
    // addresses those of live buffers whose guards (`g`) outlive the launch: place (i32,
    // 5·nblock), info (i32, npatch), status (i32, nblock); flux, fluxivar (f64, nblock·ncol),
    // resolution (f64, nblock·nd2·ncol), chi2pix, pixmask (f64, npatch·ncmax·nkmax); the
    // unit's five arrays (f64, written). Block k < nblock reads place[5k..5k+5], info[b] with
    // b < npatch, status[k]; for j < nk ≤ min(ncol, nkmax) it reads d[k·ncol + j], slot
    // (b·ncmax + c)·nkmax + j with c < ncmax, and writes row·nwave + w0 + j with row < nspec,
    // w0 + nk ≤ nwave (all checked above), and the resolution likewise with e < nd2.
    unsafe { l.launch(cfg) }.map_err(cuda("launching unit_scatter"))?;
    // The guards record the read and write events now that the launch is queued.
    drop(g);
    // place_d drops here: freed in stream order, after the kernel.
    Ok(())
}
