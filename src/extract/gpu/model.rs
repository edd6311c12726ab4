//! Each patch's part of the model image on the GPU, and the pixels' leverage on it
//! (`model_image` in `kernels/chi2.cu`; docs/science.md §5.8): what `--model-image` and the
//! first pass of `--ivar-from-model` ask of a batch, from the solutions `x` and, for the
//! leverage, the covariance columns of the core unknowns (`solve::CoreColumns`) that the solve
//! leaves on the device. Only the deconvolved flux's image is computed here: the decorrelated
//! one needs every core bin's decorrelated flux, which the decorrelation does not keep, so such
//! batches stay on the CPU (`backend`).
//!
//! The kernel gathers, per window pixel, over the batch's staged unknowns exactly as
//! `chi2_pixels` does (its launch is that kernel's: [`launch_config`]), and writes one value
//! per window pixel in the scratch layout of [`BatchLayout`](super::normal::BatchLayout);
//! [`ModelBatch::window`] cuts a patch's window back out. The host twin that mirrors it is `twins::model`. Imports `device`,
//! `launch`, `normal`'s layout and buffers, and `chi2`'s sizes and tiling.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use ndarray::Array2;

use super::chi2::{self, Chi2Layout, PIXEL_THREADS, TILE_ROWS};
use super::device::Gpu;
use super::launch::{self, kernel_params, Guards};
use super::normal::LayoutBuffers;
use super::GpuError;

kernel_params! {
    /// `model_image`'s parameters (kernels/params.cuh): sizes, then the device addresses of the
    /// batch layout, the solutions, the covariance columns (0: no leverage) and the outputs.
    pub struct ModelImageParams {
        pub tile_rows: i32,
        pub nmax: i32,
        pub nx: i32,
        /// Leading dimension of the covariance columns (0 without them).
        pub cov_ld: i32,
        pub patch: u64,
        pub dims: u64,
        pub win_off: u64,
        pub scr_off: u64,
        pub ivar: u64,
        pub spots: u64,
        pub spot_off: u64,
        pub geom: u64,
        pub x: u64,
        pub cov: u64,
        pub cov_off: u64,
        pub image: u64,
        pub leverage: u64,
    }
}

/// The covariance columns of the core unknowns as the kernel reads them: patch `b`'s column
/// `i` (core unknown `k0 + i`), row `v`, at `z[off[b] + i·ld + v]` = `C[v, k0 + i]`.
#[derive(Clone, Copy)]
pub struct Columns<'a> {
    /// The columns, on the device.
    pub z: &'a CudaSlice<f64>,
    /// Each patch's first column in `z`.
    pub off: &'a [i64],
    /// Leading dimension of a column.
    pub ld: usize,
}

/// The stage's outputs: one value per window pixel, windows concatenated as
/// `BatchLayout::scr_off` places them.
pub struct ModelBatch<T> {
    /// The patches' parts of the model image.
    pub image: T,
    /// Each pixel's leverage on it (when asked for).
    pub leverage: Option<T>,
}

impl ModelBatch<CudaSlice<f64>> {
    /// Device buffers for the windows of `dims`, with the leverage when `leverage`.
    pub fn alloc(
        gpu: &Gpu,
        dims: &Chi2Layout,
        leverage: bool,
    ) -> Result<ModelBatch<CudaSlice<f64>>, GpuError> {
        let st = &gpu.stream;
        let buf = || {
            st.alloc_zeros(dims.npix)
                .map_err(chi2::cuda("allocating the model"))
        };
        Ok(ModelBatch {
            image: buf()?,
            leverage: if leverage { Some(buf()?) } else { None },
        })
    }
}

impl ModelBatch<Vec<f64>> {
    /// Patch `b`'s window of `values` (one of this batch's host outputs): `wny × wnx` from its
    /// scratch offset.
    pub fn window(dims: &Chi2Layout, b: usize, values: &[f64]) -> Option<Array2<f64>> {
        let (off, wny, wnx) = dims.window(b);
        let cells = values.get(off..off + wny * wnx)?;
        Array2::from_shape_vec((wny, wnx), cells.to_vec()).ok()
    }
}

/// `model_image`'s launch for `dims` (that of `chi2_pixels`: a block per row tile and patch,
/// the unknowns staged in `Chi2Layout::smem` bytes of shared memory) and its scalar
/// parameters, addresses left 0. `cov_ld` is the columns' leading dimension, 0 without them.
pub fn launch_config(
    dims: &Chi2Layout,
    cov_ld: usize,
) -> Result<(LaunchConfig, ModelImageParams), GpuError> {
    let (cfg, _) = chi2::pixels_launch(dims, 0.0)?;
    debug_assert_eq!(cfg.block_dim.0, PIXEL_THREADS);
    let p = ModelImageParams {
        tile_rows: launch::int(TILE_ROWS, "tile rows")?,
        nmax: launch::int(dims.nmax, "unknowns")?,
        nx: launch::int(dims.nx(), "spot width")?,
        cov_ld: launch::int(cov_ld, "the columns' leading dimension")?,
        ..ModelImageParams::default()
    };
    Ok((cfg, p))
}

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("model_image cannot take this batch: {msg}"))
}

/// Checks that `columns` hold every core column `model_image` reads for `dims`: per patch,
/// `ncore·nwavetot` columns of `ld ≥ n` rows from its offset, inside `z`.
fn check_columns(dims: &Chi2Layout, columns: &Columns<'_>) -> Result<(), GpuError> {
    if columns.off.len() != dims.npatch {
        return Err(bad(format!(
            "{} column offsets for {} patches",
            columns.off.len(),
            dims.npatch
        )));
    }
    for (b, &off) in columns.off.iter().enumerate() {
        let (n, ncols) = dims.core_columns(b);
        let end = usize::try_from(off)
            .ok()
            .and_then(|o| o.checked_add(ncols.saturating_sub(1) * columns.ld + n));
        if columns.ld < n || end.is_none_or(|e| ncols > 0 && e > columns.z.len()) {
            return Err(bad(format!(
                "patch {b}: {ncols} columns of {n} unknowns at {off} (leading dimension {}) \
                 outside the {} values",
                columns.ld,
                columns.z.len()
            )));
        }
    }
    Ok(())
}

/// Queues `model_image` for the batch of `buf` with solutions `x` (`[npatch·nmax]`, as the
/// solve leaves them) into `out`; the leverage too when `out` has room for it, from `columns`.
pub fn launch(
    gpu: &Gpu,
    kernels: &chi2::Kernels,
    buf: &LayoutBuffers<'_>,
    dims: &Chi2Layout,
    x: &CudaSlice<f64>,
    columns: Option<Columns<'_>>,
    out: &mut ModelBatch<CudaSlice<f64>>,
) -> Result<(), GpuError> {
    chi2::check_shapes(buf, dims)?;
    if x.len() != dims.npatch * dims.nmax
        || out.image.len() != dims.npix
        || out.leverage.as_ref().is_some_and(|l| l.len() != dims.npix)
        || out.leverage.is_some() != columns.is_some()
    {
        return Err(bad(format!(
            "x of {} values, an image of {} pixels, leverage {}, columns {}, for {} × {} \
             unknowns and {} pixels",
            x.len(),
            out.image.len(),
            out.leverage.as_ref().map_or(0, CudaSlice::len),
            columns.is_some(),
            dims.npatch,
            dims.nmax,
            dims.npix
        )));
    }
    if let Some(c) = &columns {
        check_columns(dims, c)?;
    }
    let st = &gpu.stream;
    let dims_d = gpu
        .upload(&dims.dims)
        .map_err(chi2::cuda("uploading patch dims"))?;
    let cov_off = columns
        .as_ref()
        .map(|c| gpu.upload(c.off))
        .transpose()
        .map_err(chi2::cuda("uploading the column offsets"))?;
    let (cfg, scalars) = launch_config(dims, columns.as_ref().map_or(0, |c| c.ld))?;
    let mut g = Guards::default();
    let (cov, cov_off) = match (&columns, &cov_off) {
        (Some(c), Some(o)) => (g.read(c.z, st), g.read(o, st)),
        _ => (0, 0),
    };
    let leverage = match out.leverage.as_mut() {
        Some(l) => g.write(l, st),
        None => 0,
    };
    let params = ModelImageParams {
        patch: g.read(buf.patch, st),
        dims: g.read(&dims_d, st),
        win_off: g.read(buf.win_off, st),
        scr_off: g.read(buf.scr_off, st),
        ivar: g.read(buf.ivar, st),
        spots: g.read(buf.spots, st),
        spot_off: g.read(buf.spot_off, st),
        geom: g.read(buf.geom, st),
        x: g.read(x, st),
        cov,
        cov_off,
        image: g.write(&mut out.image, st),
        leverage,
        ..scalars
    };
    let mut l = st.launch_builder(kernels.model());
    l.arg(&params);
    // SAFETY: ModelImageParams is model_image's one parameter (params.cuh, layout tested), its
    // addresses those of live buffers whose guards (`g`) outlive the launch: patch, dims (int4,
    // as for chi2_pixels), win_off, scr_off (i64), ivar, spots (f64), spot_off (i64), geom
    // (int4), x (f64), cov (f64) and cov_off (i64) or both 0 (the kernel reads neither then,
    // and writes no leverage, whose address is then 0 too: `out.leverage` is Some exactly when
    // `columns` is, checked above); image, leverage (f64, written). Bounds as chi2_pixels'
    // (same grid, staging and shared memory, `check_shapes`): the kernel writes scratch pixels
    // of its own window only (< npix, the output lengths checked above), reads ivar at the
    // window's pixels, and, per covered core unknown u = k0 + i, column i of its patch at rows
    // v < n (check_columns: ncore·nwavetot columns of ld ≥ n rows inside z).
    unsafe { l.launch(cfg) }.map_err(chi2::cuda("launching model_image"))?;
    drop(g);
    // dims_d and cov_off drop here: cudarc frees them in stream order, after the kernel.
    Ok(())
}
