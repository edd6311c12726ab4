//! Spots on the GPU: `kernels/spots.cu` and its launcher. Both the launcher and the host twin
//! (`twins::spots`, a plain-Rust copy of the kernel's per-warp algorithm and memory layout)
//! take their inputs from [`flatten`], so the twin test checks that too. Keep the kernel,
//! [`Layout`] and the twin in step: a change to one is a change to all three. Imports `device`
//! and the crate's `psf` types.

use cudarc::driver::{CudaFunction, CudaSlice, DriverError, LaunchConfig, PushKernelArg};

use super::launch::{self, kernel_params, Guards};

use super::device::Gpu;
use super::GpuError;
use crate::psf::tail::TAIL_PARAMS;
use crate::psf::{HeldSpots, Psf, PsfError, SpotGrid, SpotSet, SpotValues};

/// Lanes per warp: the kernel maps one spot onto one warp.
pub(super) const WARP: usize = 32;
/// Dynamic shared memory a block may use without opting in to more (every GPU since sm_20).
const SHARED_LIMIT: usize = 48 * 1024;
/// Most warps (spots) per block; fewer when a spot's scratch is large.
const MAX_WARPS: usize = 8;

/// The sizes the kernel is launched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpotShape {
    /// Fibers in the flattened tables.
    pub nfiber: usize,
    /// Wavelengths.
    pub nwave: usize,
    /// Spot half width (HSIZEX).
    pub hsizex: usize,
    /// Spot half height (HSIZEY).
    pub hsizey: usize,
    /// Hermite degree along x.
    pub ghdegx: usize,
    /// Hermite degree along y.
    pub ghdegy: usize,
    /// Coefficients per XTRACE row.
    pub ncx: usize,
    /// Coefficients per YTRACE row.
    pub ncy: usize,
    /// Coefficients per parameter-table row.
    pub ncp: usize,
    /// Whether the PSF has tails (`psf::tail`): five more parameter rows per fiber, added to
    /// each spot before clipping.
    pub tail: bool,
}

impl SpotShape {
    /// Spot width.
    pub fn nx(&self) -> usize {
        2 * self.hsizex + 1
    }

    /// Spot height.
    pub fn ny(&self) -> usize {
        2 * self.hsizey + 1
    }

    /// Parameter rows per fiber: GHSIGX, GHSIGY, every GH-i-j and the tail's, if any.
    pub fn nrow(&self) -> usize {
        2 + (self.ghdegx + 1) * (self.ghdegy + 1) + self.ntail()
    }

    /// Tail rows per fiber: 5 for a PSF with tails, else 0.
    pub fn ntail(&self) -> usize {
        if self.tail {
            TAIL_PARAMS.len()
        } else {
            0
        }
    }

    /// Spots in the block.
    pub fn nspot(&self) -> usize {
        self.nfiber * self.nwave
    }
}

/// The kernel's inputs, flattened from a [`Psf`], a fiber range and a wavelength grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotInputs {
    /// First frame fiber of the block (the label of the set it gives).
    pub fibermin: usize,
    /// Sizes.
    pub shape: SpotShape,
    /// XTRACE rows of the block's fibers, `[f·ncx + k]`.
    pub xtrace: Vec<f64>,
    /// YTRACE rows, `[f·ncy + k]`.
    pub ytrace: Vec<f64>,
    /// GHSIGX, GHSIGY, then GH-i-j at row `2 + i·(ghdegy+1) + j` (`GhIndex` order), then
    /// with tails TAILAMP … TAILINDE (`TAIL_PARAMS` order): `[(f·nrow + r)·ncp + k]`.
    pub params: Vec<f64>,
    /// wavemin, wavemax of XTRACE, YTRACE and the PSF HDU (GHSIGX's range, which every
    /// parameter row shares).
    pub ranges: [f64; 6],
    /// The wavelength grid.
    pub waves: Vec<f64>,
}

/// Flattens what the kernel needs for frame fibers `fibermin .. fibermin + nfiber` at `waves`
/// (the PSF rows that hold them), with the checks `psf::spots::evaluate` makes.
pub fn flatten(
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotInputs, PsfError> {
    let fibers = psf.rows(fibermin, nfiber)?;
    psf.validate()?;
    let index = psf.gh_index()?;
    let sigx = &psf.params[index.sigx].series;
    let shape = SpotShape {
        nfiber,
        nwave: waves.len(),
        hsizex: psf.hsizex,
        hsizey: psf.hsizey,
        ghdegx: psf.ghdegx,
        ghdegy: psf.ghdegy,
        ncx: psf.xtrace.coeff.ncols(),
        ncy: psf.ytrace.coeff.ncols(),
        ncp: sigx.coeff.ncols(),
        tail: index.tail.is_some(),
    };
    let rows = |set: &crate::psf::LegendreSet| -> Vec<f64> {
        fibers
            .clone()
            .flat_map(|f| set.coeff.row(f).to_vec())
            .collect()
    };
    let order: Vec<usize> = [index.sigx, index.sigy]
        .into_iter()
        .chain(index.gh.iter().copied())
        .chain(index.tail.iter().flat_map(|t| t.rows))
        .collect();
    let mut params = Vec::with_capacity(nfiber * shape.nrow() * shape.ncp);
    for f in fibers.clone() {
        for &r in &order {
            params.extend(psf.params[r].series.coeff.row(f).iter());
        }
    }
    Ok(SpotInputs {
        fibermin,
        shape,
        xtrace: rows(&psf.xtrace),
        ytrace: rows(&psf.ytrace),
        params,
        ranges: [
            psf.xtrace.wavemin,
            psf.xtrace.wavemax,
            psf.ytrace.wavemin,
            psf.ytrace.wavemax,
            sigx.wavemin,
            sigx.wavemax,
        ],
        waves: waves.to_vec(),
    })
}

/// Offsets (in doubles) of one warp's shared memory: `spot_layout` in kernels/spots.cu, field
/// for field (the comment at the top of the kernel draws it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// x, y, GHSIGX, GHSIGY, GH-i-j, then the tail's five if any.
    pub par: usize,
    /// exp(-u²/2) at the x edges.
    pub gx: usize,
    /// exp(-u²/2) at the y edges.
    pub gy: usize,
    /// Per x edge: G_m for m < ghdegx, then erf.
    pub sx: usize,
    /// Per y edge.
    pub sy: usize,
    /// Pixel integrals along x.
    pub px: usize,
    /// The clipped spot: aliases `gx .. px + dx·nx`, which are dead once it is written.
    pub out: usize,
    /// Pixel integrals along y.
    pub py: usize,
    /// Σ_i GH-i-j · px_i.
    pub tmp: usize,
    /// Doubles per warp.
    pub size: usize,
}

impl Layout {
    /// The layout for `shape`.
    pub fn new(shape: &SpotShape) -> Layout {
        let (nx, ny) = (shape.nx(), shape.ny());
        let (dx, dy) = (shape.ghdegx + 1, shape.ghdegy + 1);
        let par = 0;
        let gx = par + 4 + dx * dy + shape.ntail();
        let gy = gx + nx + 1;
        let sx = gy + ny + 1;
        let sy = sx + (nx + 1) * dx;
        let px = sy + (ny + 1) * dy;
        let dead_end = px + dx * nx;
        let out = gx;
        let py = dead_end.max(out + ny * nx);
        let tmp = py + dy * ny;
        Layout {
            par,
            gx,
            gy,
            sx,
            sy,
            px,
            out,
            py,
            tmp,
            size: tmp + dy * nx,
        }
    }
}

kernel_params! {
    /// `spots`' parameters (kernels/params.cuh): the device addresses of the PSF tables it
    /// reads and of the five outputs it writes, then the shape's sizes, the per-warp
    /// shared-memory stride and whether the PSF has tails (ints after the addresses, the last
    /// one explicit padding kept zero, so that nothing has implicit padding).
    pub struct SpotsParams {
        pub xtrace: u64,
        pub ytrace: u64,
        pub params: u64,
        pub ranges: u64,
        pub waves: u64,
        pub values: u64,
        pub xc: u64,
        pub yc: u64,
        pub xs: u64,
        pub ys: u64,
        pub ncx: i32,
        pub ncy: i32,
        pub ncp: i32,
        pub nfiber: i32,
        pub nwave: i32,
        pub hsizex: i32,
        pub hsizey: i32,
        pub ghdegx: i32,
        pub ghdegy: i32,
        pub warp_stride: i32,
        pub tail: i32,
        pub pad0: i32,
    }
}

impl SpotsParams {
    /// The sizes of `shape` and the per-warp `stride` (from [`launch_config`]), addresses 0.
    pub fn sizes(shape: &SpotShape, stride: usize) -> Result<SpotsParams, GpuError> {
        let int = |v: usize, what: &str| launch::int(v, what);
        Ok(SpotsParams {
            ncx: int(shape.ncx, "x coefficients")?,
            ncy: int(shape.ncy, "y coefficients")?,
            ncp: int(shape.ncp, "Legendre coefficients")?,
            nfiber: int(shape.nfiber, "fibers")?,
            nwave: int(shape.nwave, "wavelengths")?,
            hsizex: int(shape.hsizex, "HSIZEX")?,
            hsizey: int(shape.hsizey, "HSIZEY")?,
            ghdegx: int(shape.ghdegx, "GHDEGX")?,
            ghdegy: int(shape.ghdegy, "GHDEGY")?,
            warp_stride: int(stride, "warp stride")?,
            tail: i32::from(shape.tail),
            ..SpotsParams::default()
        })
    }
}

/// Block and grid for `shape`, and the per-warp shared-memory stride in doubles: as many warps
/// per block (up to 8) as fit the 48 KiB every device grants without opting in.
pub fn launch_config(shape: &SpotShape) -> Result<(LaunchConfig, usize), GpuError> {
    let layout = Layout::new(shape);
    let per_warp = layout.size * std::mem::size_of::<f64>();
    let warps = (SHARED_LIMIT / per_warp).min(MAX_WARPS);
    if warps == 0 {
        return Err(GpuError::Kernel(format!(
            "spots: a {}×{} spot of Hermite degrees {}×{} needs {per_warp} bytes of shared \
             memory, more than the {SHARED_LIMIT} a block may use (use the CPU backend)",
            shape.ny(),
            shape.nx(),
            shape.ghdegx,
            shape.ghdegy
        )));
    }
    let nspot = shape.nspot();
    let blocks = nspot.div_ceil(warps);
    if nspot > i32::MAX as usize || blocks > i32::MAX as usize {
        return Err(GpuError::Kernel(format!(
            "spots: {nspot} spots in one launch is more than the kernel indexes"
        )));
    }
    Ok((
        LaunchConfig {
            grid_dim: (launch::dim(blocks, "spot blocks")?, 1, 1),
            block_dim: (launch::dim(warps * WARP, "threads")?, 1, 1),
            shared_mem_bytes: launch::dim(warps * per_warp, "shared memory")?,
        },
        layout.size,
    ))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(DriverError) -> GpuError {
    move |e| GpuError::driver(format!("spots: {what}"), e)
}

/// The flattened inputs on the device. Built only by [`DeviceInputs::upload`], so every
/// buffer's length is the one `shape` implies (the launch relies on it).
pub struct DeviceInputs {
    fibermin: usize,
    shape: SpotShape,
    xtrace: CudaSlice<f64>,
    ytrace: CudaSlice<f64>,
    params: CudaSlice<f64>,
    ranges: CudaSlice<f64>,
    waves: CudaSlice<f64>,
}

impl DeviceInputs {
    /// Copies `inp` to the device; the block must not be empty (CUDA refuses zero-byte
    /// allocations).
    pub fn upload(gpu: &Gpu, inp: &SpotInputs) -> Result<DeviceInputs, GpuError> {
        let sh = &inp.shape;
        if sh.nspot() == 0 {
            return Err(GpuError::Kernel(
                "spots: an empty block of fibers × wavelengths has nothing to upload".into(),
            ));
        }
        let lengths = [
            (inp.xtrace.len(), sh.nfiber * sh.ncx),
            (inp.ytrace.len(), sh.nfiber * sh.ncy),
            (inp.params.len(), sh.nfiber * sh.nrow() * sh.ncp),
            (inp.waves.len(), sh.nwave),
        ];
        if lengths.iter().any(|(have, want)| have != want) {
            return Err(GpuError::Kernel(format!(
                "spots: inputs disagree with their shape {sh:?}: (length, expected) {lengths:?}"
            )));
        }
        let s = &gpu.stream;
        Ok(DeviceInputs {
            fibermin: inp.fibermin,
            shape: *sh,
            xtrace: s
                .clone_htod(&inp.xtrace)
                .map_err(cuda("uploading XTRACE"))?,
            ytrace: s
                .clone_htod(&inp.ytrace)
                .map_err(cuda("uploading YTRACE"))?,
            params: s
                .clone_htod(&inp.params)
                .map_err(cuda("uploading the PSF table"))?,
            ranges: s
                .clone_htod(&inp.ranges[..])
                .map_err(cuda("uploading ranges"))?,
            waves: s
                .clone_htod(&inp.waves)
                .map_err(cuda("uploading wavelengths"))?,
        })
    }
}

/// A [`SpotSet`] on the device, in the same layout, under the token its host geometry carries.
pub struct DeviceSpots {
    pub(super) held: HeldSpots,
    pub(super) grid: SpotGrid,
    pub(super) ny: usize,
    pub(super) nx: usize,
    pub(super) values: CudaSlice<f64>,
    pub(super) xc: CudaSlice<i64>,
    pub(super) yc: CudaSlice<i64>,
    pub(super) x: CudaSlice<f64>,
    pub(super) y: CudaSlice<f64>,
}

impl DeviceSpots {
    /// Zeroed buffers for the spots of `inp`.
    pub fn zeros(gpu: &Gpu, inp: &DeviceInputs) -> Result<DeviceSpots, GpuError> {
        let sh = &inp.shape;
        let n = sh.nspot();
        let s = &gpu.stream;
        Ok(DeviceSpots {
            held: HeldSpots::mint(),
            grid: Self::grid_of(inp),
            ny: sh.ny(),
            nx: sh.nx(),
            values: s
                .alloc_zeros(n * sh.ny() * sh.nx())
                .map_err(cuda("allocating spot values"))?,
            xc: s.alloc_zeros(n).map_err(cuda("allocating xc"))?,
            yc: s.alloc_zeros(n).map_err(cuda("allocating yc"))?,
            x: s.alloc_zeros(n).map_err(cuda("allocating x"))?,
            y: s.alloc_zeros(n).map_err(cuda("allocating y"))?,
        })
    }

    pub(super) fn grid_of(inp: &DeviceInputs) -> SpotGrid {
        SpotGrid {
            fibermin: inp.fibermin,
            nfiber: inp.shape.nfiber,
            nwave: inp.shape.nwave,
        }
    }

    /// The spot values `[(fiber·nwave + wave)·ny·nx + iy·nx + ix]`.
    pub fn values(&self) -> &CudaSlice<f64> {
        &self.values
    }

    /// The token the set's host geometry carries.
    pub fn held(&self) -> HeldSpots {
        self.held
    }

    /// Copies the set's geometry back to the host, its values held here under
    /// [`DeviceSpots::held`]: the set as the GPU backend hands it to the pipeline, whose
    /// windows need the corners only (waits for the stream).
    pub fn download_geometry(&self, gpu: &Gpu) -> Result<SpotSet, GpuError> {
        let s = &gpu.stream;
        Ok(SpotSet {
            grid: self.grid,
            ny: self.ny,
            nx: self.nx,
            values: SpotValues::Held(self.held),
            xc: s.clone_dtoh(&self.xc).map_err(cuda("downloading xc"))?,
            yc: s.clone_dtoh(&self.yc).map_err(cuda("downloading yc"))?,
            x: s.clone_dtoh(&self.x).map_err(cuda("downloading x"))?,
            y: s.clone_dtoh(&self.y).map_err(cuda("downloading y"))?,
        })
    }

    /// Copies the set back to the host (waits for the stream).
    pub fn download(&self, gpu: &Gpu) -> Result<SpotSet, GpuError> {
        let mut set = self.download_geometry(gpu)?;
        set.values = SpotValues::Host(
            gpu.stream
                .clone_dtoh(&self.values)
                .map_err(cuda("downloading spot values"))?,
        );
        Ok(set)
    }
}

/// The loaded `spots` kernel.
pub struct SpotsKernel {
    func: CudaFunction,
}

impl SpotsKernel {
    /// Compiles (or takes from the PTX cache) and loads kernels/spots.cu.
    pub fn load(gpu: &Gpu) -> Result<SpotsKernel, GpuError> {
        let module = gpu.module("spots.cu")?;
        let func = module
            .load_function("spots")
            .map_err(|e| GpuError::Kernel(format!("spots.cu has no kernel `spots`: {e:?}")))?;
        Ok(SpotsKernel { func })
    }

    /// Queues the evaluation of every spot of `inp` into `out` on the GPU's stream.
    pub fn launch(
        &self,
        gpu: &Gpu,
        inp: &DeviceInputs,
        out: &mut DeviceSpots,
    ) -> Result<(), GpuError> {
        let sh = &inp.shape;
        let nspot = sh.nspot();
        // The kernel writes exactly these many elements: check before it runs.
        if out.grid != DeviceSpots::grid_of(inp)
            || out.values.len() != nspot * sh.ny() * sh.nx()
            || [out.xc.len(), out.yc.len(), out.x.len(), out.y.len()] != [nspot; 4]
        {
            return Err(GpuError::Kernel(format!(
                "spots: output buffers for {:?} given for inputs of shape {sh:?}",
                out.grid
            )));
        }
        if nspot == 0 {
            return Ok(());
        }
        let (cfg, stride) = launch_config(sh)?;
        let sizes = SpotsParams::sizes(sh, stride)?;
        let st = &gpu.stream;
        let mut g = Guards::default();
        let args = SpotsParams {
            xtrace: g.read(&inp.xtrace, st),
            ytrace: g.read(&inp.ytrace, st),
            params: g.read(&inp.params, st),
            ranges: g.read(&inp.ranges, st),
            waves: g.read(&inp.waves, st),
            values: g.write(&mut out.values, st),
            xc: g.write(&mut out.xc, st),
            yc: g.write(&mut out.yc, st),
            xs: g.write(&mut out.x, st),
            ys: g.write(&mut out.y, st),
            ..sizes
        };
        let mut b = st.launch_builder(&self.func);
        b.arg(&args);
        // SAFETY: SpotsParams is `spots`' one parameter (kernels/params.cuh, layout tested):
        // the addresses of live buffers whose guards (`g`) outlive the launch, xtrace, ytrace,
        // params, ranges, waves (f64, read), values, xs, ys (f64) and xc, yc (i64 = long long),
        // written; then twelve ints (ncx, ncy, ncp, nfiber, nwave, hsizex, hsizey, ghdegx,
        // ghdegy, warp_stride, tail, pad0) from SpotsParams::sizes of this shape. Buffer
        // lengths: DeviceInputs::upload checked the tables against the shape the kernel indexes
        // them with, `ranges` has 6 elements, and the outputs were checked above to hold nspot
        // spots of ny×nx; the grid covers nspot warps and the kernel returns for warps past
        // it. Shared memory is `warps × stride` doubles, the stride being Layout::new's size,
        // which the kernel re-derives and compares against (trapping if it would not fit).
        unsafe { b.launch(cfg) }.map_err(cuda("launching"))?;
        drop(g);
        Ok(())
    }
}
