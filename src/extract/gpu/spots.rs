//! Spots on the GPU: `kernels/spots.cu`, its launcher, and `twin`, a plain-Rust copy of the
//! kernel's per-warp algorithm and memory layout.
//!
//! The twin exists because most machines that build this crate have no GPU: it runs the
//! kernel's indexing (flattened tables, shared-memory layout with its aliasing, the lanes'
//! strided loops and the warp's reduction order) against `psf::spots::evaluate`, so that what
//! is left to a GPU test is the CUDA arithmetic itself (erf, exp, FMA contraction). Both the
//! twin and the launcher take their inputs from [`flatten`], so the twin test checks that too.
//! Keep the kernel, [`Layout`] and [`twin`] in step: a change to one is a change to all three.

use cudarc::driver::{CudaFunction, CudaSlice, DriverError, LaunchConfig, PushKernelArg};

use super::device::Gpu;
use super::GpuError;
use crate::psf::{Psf, PsfError, SpotGrid, SpotSet};

/// Lanes per warp: the kernel maps one spot onto one warp.
const WARP: usize = 32;
/// Dynamic shared memory a block may use without opting in to more (every GPU since sm_20).
const SHARED_LIMIT: usize = 48 * 1024;
/// Most warps (spots) per block; fewer when a spot's scratch is large.
const MAX_WARPS: usize = 8;
/// `hermite::pixel_integrals` keeps its Gaussian recurrence in a 64-edge array.
const MAX_RECURRENCE_EDGES: usize = 64;

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

    /// Parameter rows per fiber: GHSIGX, GHSIGY and every GH-i-j.
    pub fn nrow(&self) -> usize {
        2 + (self.ghdegx + 1) * (self.ghdegy + 1)
    }

    /// Spots in the block.
    pub fn nspot(&self) -> usize {
        self.nfiber * self.nwave
    }
}

/// The kernel's inputs, flattened from a [`Psf`], a fiber range and a wavelength grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotInputs {
    /// First fiber (index into the PSF's tables) of the block.
    pub fibermin: usize,
    /// Sizes.
    pub shape: SpotShape,
    /// XTRACE rows of the block's fibers, `[f·ncx + k]`.
    pub xtrace: Vec<f64>,
    /// YTRACE rows, `[f·ncy + k]`.
    pub ytrace: Vec<f64>,
    /// GHSIGX, GHSIGY, then GH-i-j at row `2 + i·(ghdegy+1) + j` (`GhIndex` order):
    /// `[(f·nrow + r)·ncp + k]`.
    pub params: Vec<f64>,
    /// wavemin, wavemax of XTRACE, YTRACE and the PSF HDU (GHSIGX's range, which every
    /// parameter row shares).
    pub ranges: [f64; 6],
    /// The wavelength grid.
    pub waves: Vec<f64>,
}

/// Flattens what the kernel needs for fibers `fibermin .. fibermin + nfiber` at `waves`, with
/// the checks `psf::spots::evaluate` makes.
pub fn flatten(
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotInputs, PsfError> {
    crate::psf::spots::check_fibers(psf, fibermin, nfiber)?;
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
    };
    let fibers = fibermin..fibermin + nfiber;
    let rows = |set: &crate::psf::LegendreSet| -> Vec<f64> {
        fibers
            .clone()
            .flat_map(|f| set.coeff.row(f).to_vec())
            .collect()
    };
    let order: Vec<usize> = [index.sigx, index.sigy]
        .into_iter()
        .chain(index.gh.iter().copied())
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
    /// x, y, GHSIGX, GHSIGY, GH-i-j.
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
        let gx = par + 4 + dx * dy;
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
            grid_dim: (blocks as u32, 1, 1),
            block_dim: ((warps * WARP) as u32, 1, 1),
            shared_mem_bytes: (warps * per_warp) as u32,
        },
        layout.size,
    ))
}

/// `legendre_series` of the kernel: `Σ_k c[k]·P_k(u)`, P_k as `legendre::vander` computes it,
/// summed in increasing k like `spots::trace_series`.
fn legendre_series(c: &[f64], u: f64) -> f64 {
    let (mut sum, mut pm2, mut pm1) = (0.0, 0.0, 0.0);
    for (k, &ck) in c.iter().enumerate() {
        let p = match k {
            0 => 1.0,
            1 => u,
            _ => {
                let kf = k as f64;
                ((2.0 * kf - 1.0) * u * pm1 - (kf - 1.0) * pm2) / kf
            }
        };
        sum += ck * p;
        pm2 = pm1;
        pm1 = p;
    }
    sum
}

fn reduced(wave: f64, lo: f64, hi: f64) -> f64 {
    2.0 * (wave - lo) / (hi - lo) - 1.0
}

/// `edge_gaussians` of the kernel (one lane's sequential loop).
fn edge_gaussians(g: &mut [f64], half: f64, offset: f64, sigma: f64) {
    let nedge = g.len();
    if nedge <= MAX_RECURRENCE_EDGES {
        let h = 1.0 / sigma;
        let u0 = (-half - 0.5 - offset) / sigma;
        let step = (-h * h).exp();
        let a = (half + 0.5 + offset).round().max(0.0);
        let anchor = if a < (nedge - 1) as f64 {
            a as usize
        } else {
            nedge - 1
        };
        let ua = u0 + anchor as f64 * h;
        g[anchor] = (-0.5 * ua * ua).exp();
        let mut ratio = (-ua * h - 0.5 * h * h).exp();
        for e in anchor + 1..nedge {
            g[e] = g[e - 1] * ratio;
            ratio *= step;
        }
        let mut ratio = (ua * h - 0.5 * h * h).exp();
        for e in (0..anchor).rev() {
            g[e] = g[e + 1] * ratio;
            ratio *= step;
        }
    } else {
        for (e, ge) in g.iter_mut().enumerate() {
            let u = (e as f64 - half - 0.5 - offset) / sigma;
            *ge = (-0.5 * u * u).exp();
        }
    }
}

/// `edge_row` of the kernel: `row[m] = He_m(u)·g/√(2π)` for `m < deg`, `row[deg] = erf(u/√2)`.
fn edge_row(row: &mut [f64], e: usize, deg: usize, half: f64, offset: f64, sigma: f64, gauss: f64) {
    let u = (e as f64 - half - 0.5 - offset) / sigma;
    let g = gauss * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let (mut hm2, mut hm1) = (0.0, 0.0);
    for (m, r) in row[..deg].iter_mut().enumerate() {
        let he = match m {
            0 => 1.0,
            1 => u,
            _ => u * hm1 - (m - 1) as f64 * hm2,
        };
        *r = he * g;
        hm2 = hm1;
        hm1 = he;
    }
    row[deg] = libm::erf(u * std::f64::consts::FRAC_1_SQRT_2);
}

/// The tasks lane `lane` takes in a phase of `n` tasks: `lane, lane + 32, …`.
fn lane_tasks(lane: usize, n: usize) -> impl Iterator<Item = usize> {
    (lane..n).step_by(WARP)
}

/// What the kernel's warp `spot` does, with `s` standing for its shared memory (`Layout`).
/// Phases run one after the other, which is what the kernel's `__syncwarp()`s guarantee; within
/// a phase the lanes' tasks are independent, so their order does not matter except in the
/// normalising sum, which follows the kernel's lanes and shuffle tree exactly.
fn warp_spot(
    inp: &SpotInputs,
    l: &Layout,
    spot: usize,
    s: &mut [f64],
    dst: &mut [f64],
) -> (f64, f64, i64, i64) {
    let sh = &inp.shape;
    let (nx, ny) = (sh.nx(), sh.ny());
    let (dx, dy) = (sh.ghdegx + 1, sh.ghdegy + 1);
    let nrow = sh.nrow();
    let fiber = spot / sh.nwave;
    let wave = inp.waves[spot - fiber * sh.nwave];
    let r = &inp.ranges;

    // Phase 1: the series.
    let up = reduced(wave, r[4], r[5]);
    for lane in 0..WARP {
        for t in lane_tasks(lane, 2 + nrow) {
            s[l.par + t] = match t {
                0 => legendre_series(
                    &inp.xtrace[fiber * sh.ncx..(fiber + 1) * sh.ncx],
                    reduced(wave, r[0], r[1]),
                ),
                1 => legendre_series(
                    &inp.ytrace[fiber * sh.ncy..(fiber + 1) * sh.ncy],
                    reduced(wave, r[2], r[3]),
                ),
                _ => {
                    let row = (fiber * nrow + (t - 2)) * sh.ncp;
                    legendre_series(&inp.params[row..row + sh.ncp], up)
                }
            };
        }
    }
    let (x, y, sigx, sigy) = (s[l.par], s[l.par + 1], s[l.par + 2], s[l.par + 3]);
    let (halfx, halfy) = ((nx / 2) as f64, (ny / 2) as f64);
    let offx = x - (x + 0.5).floor();
    let offy = y - (y + 0.5).floor();

    // Phase 2: lanes 0 and 1.
    edge_gaussians(&mut s[l.gx..l.gx + nx + 1], halfx, offx, sigx);
    edge_gaussians(&mut s[l.gy..l.gy + ny + 1], halfy, offy, sigy);

    // Phase 3: every edge of both axes.
    for lane in 0..WARP {
        for t in lane_tasks(lane, (nx + 1) + (ny + 1)) {
            if t <= nx {
                let g = s[l.gx + t];
                let row = &mut s[l.sx + t * dx..l.sx + (t + 1) * dx];
                edge_row(row, t, dx - 1, halfx, offx, sigx, g);
            } else {
                let e = t - (nx + 1);
                let g = s[l.gy + e];
                let row = &mut s[l.sy + e * dy..l.sy + (e + 1) * dy];
                edge_row(row, e, dy - 1, halfy, offy, sigy, g);
            }
        }
    }

    // Phase 4: pixel integrals.
    for lane in 0..WARP {
        for t in lane_tasks(lane, dx * nx + dy * ny) {
            let (npix, deg, m, k, sc, o) = if t < dx * nx {
                (nx, dx - 1, t / nx, t % nx, l.sx, l.px)
            } else {
                let u = t - dx * nx;
                (ny, dy - 1, u / ny, u % ny, l.sy, l.py)
            };
            let lo = sc + k * (deg + 1);
            let hi = lo + (deg + 1);
            s[o + m * npix + k] = if m == 0 {
                0.5 * (s[hi + deg] - s[lo + deg])
            } else {
                s[lo + m - 1] - s[hi + m - 1]
            };
        }
    }

    // Phase 5: tmp.
    for lane in 0..WARP {
        for t in lane_tasks(lane, dy * nx) {
            let (j, ix) = (t / nx, t % nx);
            let mut acc = 0.0;
            for i in 0..dx {
                acc += s[l.par + 4 + i * dy + j] * s[l.px + i * nx + ix];
            }
            s[l.tmp + t] = acc;
        }
    }

    // Phase 6: the clipped spot and each lane's partial sum, then the shuffle-down tree.
    let mut partial = [0.0f64; WARP];
    for (lane, part) in partial.iter_mut().enumerate() {
        for p in lane_tasks(lane, ny * nx) {
            let (iy, ix) = (p / nx, p % nx);
            let mut v = 0.0;
            for j in 0..dy {
                v += s[l.py + j * ny + iy] * s[l.tmp + j * nx + ix];
            }
            if v < 0.0 {
                v = 0.0;
            }
            s[l.out + p] = v;
            *part += v;
        }
    }
    let mut off = WARP / 2;
    while off > 0 {
        // __shfl_down_sync: lane i receives lane i + off's value, or its own past the end;
        // every lane adds at once, hence the copy.
        let before = partial;
        for (lane, part) in partial.iter_mut().enumerate() {
            *part += if lane + off < WARP {
                before[lane + off]
            } else {
                before[lane]
            };
        }
        off /= 2;
    }
    let sum = partial[0];

    // Phase 7: normalise and write.
    for lane in 0..WARP {
        for p in lane_tasks(lane, ny * nx) {
            let v = s[l.out + p];
            dst[p] = if sum > 0.0 { v / sum } else { v };
        }
    }
    let xc = (x - sh.hsizex as f64 + 0.5).floor() as i64;
    let yc = (y - sh.hsizey as f64 + 0.5).floor() as i64;
    (x, y, xc, yc)
}

/// The kernel's computation on the CPU, warp by warp, from the same flattened inputs and with
/// the same shared-memory layout (filled with NaN before each spot, so that a read of a slot
/// the kernel would not have written shows in the result).
pub fn twin(inp: &SpotInputs) -> SpotSet {
    let sh = &inp.shape;
    let l = Layout::new(sh);
    let npix = sh.ny() * sh.nx();
    let nspot = sh.nspot();
    let mut set = SpotSet {
        grid: SpotGrid {
            fibermin: inp.fibermin,
            nfiber: sh.nfiber,
            nwave: sh.nwave,
        },
        ny: sh.ny(),
        nx: sh.nx(),
        values: vec![f64::NAN; nspot * npix],
        xc: vec![i64::MIN; nspot],
        yc: vec![i64::MIN; nspot],
        x: vec![f64::NAN; nspot],
        y: vec![f64::NAN; nspot],
    };
    let mut s = vec![f64::NAN; l.size];
    for spot in 0..nspot {
        s.fill(f64::NAN);
        let dst = &mut set.values[spot * npix..(spot + 1) * npix];
        let (x, y, xc, yc) = warp_spot(inp, &l, spot, &mut s, dst);
        set.x[spot] = x;
        set.y[spot] = y;
        set.xc[spot] = xc;
        set.yc[spot] = yc;
    }
    set
}

fn cuda(what: &'static str) -> impl Fn(DriverError) -> GpuError {
    move |e| GpuError::Cuda(format!("spots: {what}: {e:?}"))
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

/// A [`SpotSet`] on the device, in the same layout.
pub struct DeviceSpots {
    grid: SpotGrid,
    ny: usize,
    nx: usize,
    values: CudaSlice<f64>,
    xc: CudaSlice<i64>,
    yc: CudaSlice<i64>,
    x: CudaSlice<f64>,
    y: CudaSlice<f64>,
}

impl DeviceSpots {
    /// Zeroed buffers for the spots of `inp`.
    pub fn zeros(gpu: &Gpu, inp: &DeviceInputs) -> Result<DeviceSpots, GpuError> {
        let sh = &inp.shape;
        let n = sh.nspot();
        let s = &gpu.stream;
        Ok(DeviceSpots {
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

    fn grid_of(inp: &DeviceInputs) -> SpotGrid {
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

    /// Copies the set's geometry back to the host, leaving `values` empty: the set as the
    /// GPU backend hands it to the pipeline, whose windows need the corners only (waits for
    /// the stream).
    pub fn download_geometry(&self, gpu: &Gpu) -> Result<SpotSet, GpuError> {
        let s = &gpu.stream;
        Ok(SpotSet {
            grid: self.grid,
            ny: self.ny,
            nx: self.nx,
            values: Vec::new(),
            xc: s.clone_dtoh(&self.xc).map_err(cuda("downloading xc"))?,
            yc: s.clone_dtoh(&self.yc).map_err(cuda("downloading yc"))?,
            x: s.clone_dtoh(&self.x).map_err(cuda("downloading x"))?,
            y: s.clone_dtoh(&self.y).map_err(cuda("downloading y"))?,
        })
    }

    /// Copies the set back to the host (waits for the stream).
    pub fn download(&self, gpu: &Gpu) -> Result<SpotSet, GpuError> {
        let mut set = self.download_geometry(gpu)?;
        set.values = gpu
            .stream
            .clone_dtoh(&self.values)
            .map_err(cuda("downloading spot values"))?;
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
        // Every count below is ≤ what `Psf::validate` and `launch_config` accept (≤ 2³¹ - 1).
        let int = |v: usize| v as i32;
        let (ncx, ncy, ncp) = (int(sh.ncx), int(sh.ncy), int(sh.ncp));
        let (nfiber, nwave) = (int(sh.nfiber), int(sh.nwave));
        let (hsizex, hsizey) = (int(sh.hsizex), int(sh.hsizey));
        let (ghdegx, ghdegy) = (int(sh.ghdegx), int(sh.ghdegy));
        let stride = int(stride);
        let mut b = gpu.stream.launch_builder(&self.func);
        b.arg(&inp.xtrace)
            .arg(&ncx)
            .arg(&inp.ytrace)
            .arg(&ncy)
            .arg(&inp.params)
            .arg(&ncp)
            .arg(&inp.ranges)
            .arg(&inp.waves)
            .arg(&nfiber)
            .arg(&nwave)
            .arg(&hsizex)
            .arg(&hsizey)
            .arg(&ghdegx)
            .arg(&ghdegy)
            .arg(&stride)
            .arg(&mut out.values)
            .arg(&mut out.xc)
            .arg(&mut out.yc)
            .arg(&mut out.x)
            .arg(&mut out.y);
        // SAFETY: the 20 arguments match `spots` in kernels/spots.cu in order and type:
        // (xtrace: const double*, ncx: int), (ytrace, ncy), (params, ncp), ranges and waves
        // (const double*), seven ints (nfiber, nwave, hsizex, hsizey, ghdegx, ghdegy,
        // warp_stride; i32 here), values (double*), xc, yc (long long* ← i64 buffers), xs, ys
        // (double*); device buffers pass as their device pointers, scalars by value. Buffer
        // lengths: DeviceInputs::upload checked the tables against the shape the kernel indexes
        // them with, `ranges` has 6 elements, and the outputs were checked above to hold nspot
        // spots of ny×nx; the grid covers nspot warps and the kernel returns for warps past
        // it. Shared memory is `warps × stride` doubles, the stride being Layout::new's size,
        // which the kernel re-derives and compares against (trapping if it would not fit).
        unsafe { b.launch(cfg) }.map_err(cuda("launching"))?;
        Ok(())
    }
}

/// Spots for fibers `fibermin .. fibermin + nfiber` of `psf` at `waves`, on the GPU: the same
/// set as `psf::spots::evaluate`, x, y and corners bit for bit, values to a few ulps of each
/// spot's peak (CUDA's erf and exp, and fused multiply-adds).
pub fn evaluate(
    gpu: &Gpu,
    psf: &Psf,
    fibermin: usize,
    nfiber: usize,
    waves: &[f64],
) -> Result<SpotSet, GpuError> {
    let bad = |e: PsfError| GpuError::Kernel(format!("spots: the PSF cannot be evaluated: {e}"));
    if nfiber == 0 || waves.is_empty() {
        // Nothing to compute (the pipeline builds its reusable set this way), and CUDA refuses
        // zero-byte allocations: the CPU returns the same empty, checked set.
        return crate::psf::spots::evaluate(psf, fibermin, nfiber, waves).map_err(bad);
    }
    let inp = flatten(psf, fibermin, nfiber, waves).map_err(bad)?;
    let kernel = SpotsKernel::load(gpu)?;
    let dev = DeviceInputs::upload(gpu, &inp)?;
    let mut out = DeviceSpots::zeros(gpu, &dev)?;
    kernel.launch(gpu, &dev, &mut out)?;
    gpu.stream
        .synchronize()
        .map_err(cuda("running the kernel"))?;
    out.download(gpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psf::spots;
    use crate::psf::synth::{synthetic_psf, SynthPsfOptions};

    /// Largest |twin - cpu| over values; asserts x, y, corners equal and values within `tol`.
    fn compare_twin(psf: &Psf, fibermin: usize, nfiber: usize, waves: &[f64], tol: f64) -> f64 {
        let cpu = spots::evaluate(psf, fibermin, nfiber, waves).unwrap();
        let inp = flatten(psf, fibermin, nfiber, waves).unwrap();
        let tw = twin(&inp);
        assert_eq!(tw.grid, cpu.grid);
        assert_eq!((tw.ny, tw.nx), (cpu.ny, cpu.nx));
        assert_eq!(tw.xc, cpu.xc);
        assert_eq!(tw.yc, cpu.yc);
        // Same operations in the same order: the traces agree to the bit.
        assert_eq!(tw.x, cpu.x);
        assert_eq!(tw.y, cpu.y);
        assert_eq!(tw.values.len(), cpu.values.len());
        let mut worst = 0.0f64;
        for (i, (a, b)) in tw.values.iter().zip(&cpu.values).enumerate() {
            let d = (a - b).abs();
            assert!(d <= tol, "value {i}: twin {a} vs cpu {b}");
            worst = worst.max(d);
        }
        worst
    }

    fn grid(lo: f64, hi: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
            .collect()
    }

    /// Shapes that catch transposed or mis-strided indices: LEGDEG ≠ the traces' 7 terms,
    /// ghdegx ≠ ghdegy, hsizex ≠ hsizey, a pure Gaussian along x (degree 0), and a spot wide
    /// enough (81 edges) that the Gaussian is taken at every edge instead of by recurrence.
    #[test]
    fn twin_matches_the_cpu_on_synthetic_psfs() {
        let shapes = [
            (4, 8, 5, 4, 6),
            (3, 8, 5, 6, 6),
            (0, 40, 3, 0, 2),
            (6, 3, 9, 5, 1),
        ];
        for (legdeg, hsizex, hsizey, ghdegx, ghdegy) in shapes {
            let psf = synthetic_psf(&SynthPsfOptions {
                nfiber: 30,
                legdeg,
                hsizex,
                hsizey,
                ghdegx,
                ghdegy,
                gh_amplitude: 0.03,
                ..Default::default()
            });
            let (lo, hi) = psf.wave_range();
            // Past both ends of the range too: spots leave the CCD there.
            let waves = grid(lo - 15.0, hi + 15.0, 157);
            let worst = compare_twin(&psf, 3, 5, &waves, 1e-13);
            eprintln!(
                "twin vs cpu, synthetic LEGDEG {legdeg} HSIZE {hsizex}x{hsizey} GHDEG \
                 {ghdegx}x{ghdegy}: max |diff| {worst:.2e}"
            );
        }
    }

    #[test]
    fn twin_matches_the_cpu_on_the_real_psf() {
        let Some(path) = crate::io::shared_data("psf-r0-00067784.fits") else {
            return;
        };
        let psf = crate::io::psf::read_psf(&path).unwrap();
        let (lo, hi) = psf.wave_range();
        let waves = grid(lo - 10.0, hi + 10.0, 2400);
        let n = psf.nfiber();
        let mut worst = 0.0f64;
        for (fmin, nf) in [(0, 3), (n / 2, 2), (n - 3, 3)] {
            worst = worst.max(compare_twin(&psf, fmin, nf, &waves, 1e-13));
        }
        eprintln!("twin vs cpu, real PSF: max |diff| {worst:.2e}");
    }

    #[test]
    fn flatten_keeps_gh_index_order_and_each_tables_range() {
        let psf = synthetic_psf(&SynthPsfOptions {
            nfiber: 12,
            legdeg: 4,
            ghdegx: 3,
            ghdegy: 5,
            ..Default::default()
        });
        let waves = [6000.0, 7000.0];
        let inp = flatten(&psf, 4, 6, &waves).unwrap();
        let sh = inp.shape;
        assert_eq!(
            (sh.nfiber, sh.nwave, sh.ncx, sh.ncy, sh.ncp),
            (6, 2, 7, 7, 5)
        );
        assert_eq!(sh.nrow(), 2 + 4 * 6);
        for f in 0..6 {
            for k in 0..5 {
                let at = |r: usize| inp.params[(f * sh.nrow() + r) * sh.ncp + k];
                let coef = |name: &str| psf.param(name).unwrap().series.coeff[[4 + f, k]];
                assert_eq!(at(0), coef("GHSIGX"));
                assert_eq!(at(1), coef("GHSIGY"));
                assert_eq!(at(2 + 2 * 6 + 3), coef("GH-2-3"));
                assert_eq!(at(2 + 3 * 6 + 5), coef("GH-3-5"));
            }
            assert_eq!(inp.xtrace[f * 7 + 2], psf.xtrace.coeff[[4 + f, 2]]);
            assert_eq!(inp.ytrace[f * 7 + 6], psf.ytrace.coeff[[4 + f, 6]]);
        }
        // The parameter table's own WAVEMAX (1 Å past the traces'), not the traces'.
        assert_eq!(inp.ranges[5], psf.param("GHSIGX").unwrap().series.wavemax);
        assert_ne!(inp.ranges[5], inp.ranges[1]);
        assert!(flatten(&psf, 8, 6, &waves).is_err());
    }

    #[test]
    fn launch_config_fits_shared_memory() {
        let desi = SpotShape {
            nfiber: 25,
            nwave: 2400,
            hsizex: 8,
            hsizey: 5,
            ghdegx: 6,
            ghdegy: 6,
            ncx: 7,
            ncy: 7,
            ncp: 9,
        };
        // par 53, g 18 + 12, s 126 + 84, px 119 (out's 187 fit inside), py 77, tmp 119.
        assert_eq!(
            Layout::new(&desi).size,
            53 + 18 + 12 + 126 + 84 + 119 + 77 + 119
        );
        let (cfg, stride) = launch_config(&desi).unwrap();
        assert_eq!(stride, Layout::new(&desi).size);
        assert_eq!(cfg.block_dim, (256, 1, 1));
        assert_eq!(cfg.grid_dim, (25 * 2400 / 8, 1, 1));
        assert_eq!(cfg.shared_mem_bytes as usize, 8 * stride * 8);
        // A spot whose clipped values outgrow the dead scratch they alias.
        let big = SpotShape {
            hsizex: 30,
            hsizey: 30,
            ghdegx: 1,
            ghdegy: 1,
            ..desi
        };
        let l = Layout::new(&big);
        assert_eq!(l.py, l.out + 61 * 61);
        // The largest shapes the PSF reader accepts do not fit: a clear error, not a launch.
        let huge = SpotShape {
            hsizex: 64,
            hsizey: 64,
            ghdegx: 20,
            ghdegy: 20,
            ..desi
        };
        let err = launch_config(&huge).unwrap_err().to_string();
        assert!(err.contains("shared"), "{err}");
    }

    /// The kernel against the CPU at the real size of a bundle (25 fibers × 2400 wavelengths),
    /// on the first and last bundles, over a grid reaching past the PSF's range so that spots
    /// leave the CCD. The outputs are poisoned (NaN, i64::MIN) before the launch, so that an
    /// element the kernel fails to write cannot pass.
    #[test]
    fn gpu_spots_match_the_cpu() {
        if let Err(e) = super::super::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 is visible but cannot be opened");
        let psf = match crate::io::shared_data("psf-r0-00067784.fits") {
            Some(p) => crate::io::psf::read_psf(&p).unwrap(),
            None => synthetic_psf(&SynthPsfOptions::default()),
        };
        let (lo, hi) = psf.wave_range();
        let waves = grid(lo - 10.0, hi + 10.0, 2400);
        let kernel = SpotsKernel::load(&gpu).unwrap();
        let nf = psf.nfiber();
        let mut worst = 0.0f64;
        let mut off_ccd = 0usize;
        for fmin in [0, nf - 25] {
            let inp = flatten(&psf, fmin, 25, &waves).unwrap();
            let dev = DeviceInputs::upload(&gpu, &inp).unwrap();
            let sh = inp.shape;
            let n = sh.nspot();
            let s = &gpu.stream;
            let mut out = DeviceSpots {
                grid: DeviceSpots::grid_of(&dev),
                ny: sh.ny(),
                nx: sh.nx(),
                values: s
                    .clone_htod(&vec![f64::NAN; n * sh.ny() * sh.nx()])
                    .unwrap(),
                xc: s.clone_htod(&vec![i64::MIN; n]).unwrap(),
                yc: s.clone_htod(&vec![i64::MIN; n]).unwrap(),
                x: s.clone_htod(&vec![f64::NAN; n]).unwrap(),
                y: s.clone_htod(&vec![f64::NAN; n]).unwrap(),
            };
            kernel.launch(&gpu, &dev, &mut out).unwrap();
            s.synchronize().unwrap();
            let g = out.download(&gpu).unwrap();
            let cpu = spots::evaluate(&psf, fmin, 25, &waves).unwrap();
            assert_eq!(g.grid, cpu.grid);
            // The traces and corners are computed unfused: bit for bit.
            assert_eq!(g.xc, cpu.xc);
            assert_eq!(g.yc, cpu.yc);
            assert_eq!(g.x, cpu.x);
            assert_eq!(g.y, cpu.y);
            let npix = sh.ny() * sh.nx();
            for i in 0..n {
                let (a, b) = (
                    g.spot(i / sh.nwave, i % sh.nwave),
                    cpu.spot(i / sh.nwave, i % sh.nwave),
                );
                // Relative to the spot's peak: a tail pixel that cancels to ~0 has no
                // meaningful relative error of its own.
                let peak = b.iter().fold(0.0f64, |m, v| m.max(*v));
                assert!(peak > 0.0);
                for p in 0..npix {
                    let d = (a[p] - b[p]).abs() / peak;
                    assert!(
                        d <= 1e-12,
                        "fiber {} wave {}: pixel {p}: gpu {} cpu {}",
                        fmin + i / sh.nwave,
                        i % sh.nwave,
                        a[p],
                        b[p]
                    );
                    worst = worst.max(d);
                }
                let (xc, yc) = (cpu.xc[i], cpu.yc[i]);
                if xc < 0
                    || yc < 0
                    || xc + sh.nx() as i64 > psf.npix_x as i64
                    || yc + sh.ny() as i64 > psf.npix_y as i64
                {
                    off_ccd += 1;
                }
            }
            // evaluate() takes the same path with zeroed outputs.
            let e = evaluate(&gpu, &psf, fmin, 25, &waves).unwrap();
            assert_eq!(e.xc, g.xc);
            for (a, b) in e.values.iter().zip(&g.values) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
        assert!(
            off_ccd > 0,
            "no spot leaves the CCD: the edge case is not exercised"
        );
        // An empty block never reaches the device and is the CPU's empty set.
        let empty = evaluate(&gpu, &psf, 0, 0, &[]).unwrap();
        assert!(empty.values.is_empty() && empty.xc.is_empty());
        assert_eq!((empty.ny, empty.nx), (psf.spot_ny(), psf.spot_nx()));
        eprintln!(
            "gpu vs cpu on {} ({} spots off the CCD): max |diff|/peak {worst:.2e}",
            gpu.info.name, off_ccd
        );
    }
}
