//! The two library choices of the GPU backend, measured at the real sizes on the frame's own
//! matrices: the Cholesky factorisation at 518 unknowns (cuSOLVER's `potrfBatched`, which
//! `solve` uses, against one `potrf` call per matrix), and the eigendecomposition of the 74×74
//! fiber blocks (this crate's Jacobi kernel in `decorrelate.cu`, against cuSOLVER's
//! `XsyevBatched` followed by the readout kernel; the batched Jacobi `syevjBatched` stops at
//! n = 32), both routes whole, from the covariance blocks to flux, fluxivar and resolution,
//! with their agreement. `spextract bench --backend gpu` runs this on the first chunk of the
//! frame and prints the comparison, which BENCHMARKS.md records; the backend takes
//! [`EigenRoute::PREFERRED`].
//!
//! Each call is run once untimed (the libraries set up lazily), then timed with events on the
//! stream; the inputs are copied afresh before each run, the factorisations being in place.
//!
//! Imports the GPU stages' layouts, launchers and library handles from `extract::gpu`.

use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{sys::CUevent_flags, CudaSlice, DevicePtr, DevicePtrMut};

use crate::extract::gpu::backend::blocks_of;
use crate::extract::gpu::decorrelate::{self as decor, DecorrLayout, EigenRoute, MAX_SWEEPS};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::normal::{self, BatchLayout, OnDevice, UploadedLayout};
use crate::extract::gpu::solve::{solver_ok, PatchShape, Solver};
use crate::extract::gpu::GpuError;
use crate::extract::DIAG_EPSILON;
use crate::extract::{ExtractOptions, PatchInput};

/// One choice: the routine the backend uses and its alternative, timed on the same inputs.
#[derive(Debug, Clone)]
pub struct Measured {
    /// What is decided.
    pub what: &'static str,
    /// Matrix side.
    pub n: usize,
    /// Matrices per call.
    pub batch: usize,
    /// The backend's routine and its seconds.
    pub chosen: (&'static str, f64),
    /// The alternative and its seconds.
    pub other: (&'static str, f64),
    /// Largest difference between the two results relative to the largest entry, where both
    /// compute the same thing.
    pub agree: Option<f64>,
}

impl Measured {
    /// A markdown table of `rows`.
    pub fn table(rows: &[Measured]) -> String {
        let mut out = String::from(
            "| choice | n | batch | used | ms | alternative | ms | alternative / used | max rel. diff |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for m in rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {} |\n",
                m.what,
                m.n,
                m.batch,
                m.chosen.0,
                m.chosen.1 * 1e3,
                m.other.0,
                m.other.1 * 1e3,
                m.other.1 / m.chosen.1.max(1e-12),
                m.agree.map_or("–".into(), |d| format!("{d:.1e}")),
            ));
        }
        out
    }
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("measuring the library choices: {what}"), e)
}

/// Seconds `step(false)` takes on `gpu`'s stream, after one untimed run; `step(true)` runs
/// before each (restoring in-place inputs) and is not timed.
fn timed(gpu: &Gpu, step: &mut dyn FnMut(bool) -> Result<(), GpuError>) -> Result<f64, GpuError> {
    step(true)?;
    step(false)?;
    step(true)?;
    let st = &gpu.stream;
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let t0 = st.record_event(flags).map_err(cuda("recording an event"))?;
    step(false)?;
    let t1 = st.record_event(flags).map_err(cuda("recording an event"))?;
    let ms = t0.elapsed_ms(&t1).map_err(cuda("reading events"))?;
    Ok(f64::from(ms) / 1e3)
}

/// Largest |a - b| over the lower triangles of column-major `n × n` matrices, relative to the
/// largest |a|.
fn lower_diff(a: &[f64], b: &[f64], n: usize) -> f64 {
    let (mut d, mut m) = (0.0f64, 0.0f64);
    for (ma, mb) in a.chunks(n * n).zip(b.chunks(n * n)) {
        for j in 0..n {
            for i in j..n {
                d = d.max((ma[j * n + i] - mb[j * n + i]).abs());
                m = m.max(ma[j * n + i].abs());
            }
        }
    }
    d / m.max(f64::MIN_POSITIVE)
}

/// Measures both choices on `batch` (patches of one size class, as the pipeline cuts them;
/// their spots carry values).
pub fn measure(
    gpu: &Gpu,
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
) -> Result<Vec<Measured>, GpuError> {
    let st = &gpu.stream;
    let layout = BatchLayout::new(batch)?;
    let (npatch, nmax) = (layout.npatch, layout.nmax);
    let up = UploadedLayout::upload(gpu, &layout, OnDevice::default())?;
    let kernels = normal::Kernels::load(gpu)?;
    let mut dense = normal::DenseBatch::alloc(gpu, &layout)?;
    normal::build_into(
        gpu,
        &kernels,
        &up.buffers(),
        opts.regularize,
        DIAG_EPSILON,
        &mut dense,
    )?;
    let mut solver = Solver::new(gpu)?;
    let dn = solver.dn_handle();
    let lower = cusolver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let (n_i, npatch_i) = (nmax as i32, npatch as i32);
    let stride = nmax * nmax;

    // Cholesky at nmax: batched against one call per matrix, each on its own copy.
    let mut batched: CudaSlice<f64> = st.alloc_zeros(npatch * stride).map_err(cuda("alloc"))?;
    let mut looped: CudaSlice<f64> = st.alloc_zeros(npatch * stride).map_err(cuda("alloc"))?;
    let mut info: CudaSlice<i32> = st.alloc_zeros(npatch).map_err(cuda("alloc"))?;
    let base = {
        let (p, _g) = batched.device_ptr_mut(st);
        p
    };
    let ptrs: Vec<u64> = (0..npatch)
        .map(|b| base + (b * stride * 8) as u64)
        .collect();
    let ptrs = st.clone_htod(&ptrs).map_err(cuda("uploading pointers"))?;
    let t_batched = timed(gpu, &mut |prepare| {
        if prepare {
            return st
                .memcpy_dtod(&dense.ata, &mut batched)
                .map_err(cuda("copying AᵀWA"));
        }
        {
            let (pp, _g1) = ptrs.device_ptr(st);
            let (ip, _g2) = info.device_ptr_mut(st);
            // SAFETY: `ptrs` holds npatch device addresses of nmax × nmax column-major
            // matrices inside `batched` (npatch·nmax² doubles, which outlives the call); info
            // has npatch ints; the handle is bound to this stream (Solver::new).
            solver_ok("cusolverDnDpotrfBatched", unsafe {
                cusolver::cusolverDnDpotrfBatched(
                    dn,
                    lower,
                    n_i,
                    pp as *mut *mut f64,
                    n_i,
                    ip as *mut i32,
                    npatch_i,
                )
            })
        }
    })?;
    let mut lwork: i32 = 0;
    {
        let (ap, _g) = looped.device_ptr_mut(st);
        // SAFETY: queries the workspace of one nmax × nmax potrf; A is only inspected for its
        // type and leading dimension.
        solver_ok("cusolverDnDpotrf_bufferSize", unsafe {
            cusolver::cusolverDnDpotrf_bufferSize(dn, lower, n_i, ap as *mut f64, n_i, &mut lwork)
        })?;
    }
    let mut work: CudaSlice<f64> = st
        .alloc_zeros(lwork.max(1) as usize)
        .map_err(cuda("alloc"))?;
    let mut one_info: CudaSlice<i32> = st.alloc_zeros(1).map_err(cuda("alloc"))?;
    let t_looped = timed(gpu, &mut |prepare| {
        if prepare {
            return st
                .memcpy_dtod(&dense.ata, &mut looped)
                .map_err(cuda("copying AᵀWA"));
        }
        {
            let (ap, _g1) = looped.device_ptr_mut(st);
            let (wp, _g2) = work.device_ptr_mut(st);
            let (ip, _g3) = one_info.device_ptr_mut(st);
            for b in 0..npatch {
                // SAFETY: matrix b of `looped` (nmax × nmax, leading dimension nmax), the
                // workspace of lwork doubles that bufferSize asked for, one info int; all
                // stream-ordered on the handle's stream.
                solver_ok("cusolverDnDpotrf", unsafe {
                    cusolver::cusolverDnDpotrf(
                        dn,
                        lower,
                        n_i,
                        (ap + (b * stride * 8) as u64) as *mut f64,
                        n_i,
                        wp as *mut f64,
                        lwork,
                        ip as *mut i32,
                    )
                })?;
            }
            Ok(())
        }
    })?;
    let fa = st.clone_dtoh(&batched).map_err(cuda("downloading"))?;
    let fb = st.clone_dtoh(&looped).map_err(cuda("downloading"))?;
    let cholesky = Measured {
        what: "Cholesky of AᵀWA",
        n: nmax,
        batch: npatch,
        chosen: ("potrfBatched", t_batched),
        other: ("potrf per matrix", t_looped),
        agree: Some(lower_diff(&fa, &fb, nmax)),
    };
    drop((batched, looped, work));

    // The fiber blocks, as the chain makes them.
    let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
    let sol = solver.solve(gpu, &mut dense, &shapes)?;
    let sol_info = st.clone_dtoh(&sol.info).map_err(cuda("downloading info"))?;
    let (_, blocks) = blocks_of(
        batch,
        &sol_info,
        sol.nmax,
        sol.ncore_max,
        sol.nw,
        opts.ndiag,
    );
    let dl = DecorrLayout::new(&blocks)?;
    let dk = decor::Kernels::load(gpu)?;
    let (nw, nslot) = (sol.nw, sol.npatch * sol.ncore_max);
    // Both routes whole: eigenpairs and the readout into flux, fluxivar and resolution.
    let mut by_jacobi = decor::DecorrBatch::alloc(gpu, &dl)?;
    let t_jacobi = timed(gpu, &mut |prepare| {
        if prepare {
            return Ok(());
        }
        decor::decorrelate_into(
            gpu,
            &dk,
            &dl,
            &sol.blocks,
            &sol.x,
            MAX_SWEEPS,
            &mut by_jacobi,
        )
    })?;
    // XsyevBatched overwrites the slots: it runs on a copy, restored before each run.
    let mut slots: CudaSlice<f64> = st.alloc_zeros(sol.blocks.len()).map_err(cuda("alloc"))?;
    let mut by_syev = decor::DecorrBatch::alloc(gpu, &dl)?;
    let t_syev = timed(gpu, &mut |prepare| {
        if prepare {
            return st
                .memcpy_dtod(&sol.blocks, &mut slots)
                .map_err(cuda("copying the blocks"));
        }
        let eig = solver.eigen_in_place(&mut slots, nw, nslot)?;
        decor::decorrelate_eigen_into(gpu, &dk, &dl, &slots, &eig, &sol.x, &mut by_syev)
    })?;
    let (j, y) = (by_jacobi.download(gpu)?, by_syev.download(gpu)?);
    let agree = [(&j.flux, &y.flux), (&j.resolution, &y.resolution)]
        .iter()
        .map(|(a, b)| {
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let d = a
                .iter()
                .zip(b.iter())
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
            d / scale.max(f64::MIN_POSITIVE)
        })
        .fold(0.0f64, f64::max);
    let statuses_agree = j.status == y.status;
    let time = |r: EigenRoute| match r {
        EigenRoute::Syev => t_syev,
        EigenRoute::Jacobi => t_jacobi,
    };
    let (route, other) = (EigenRoute::PREFERRED, EigenRoute::PREFERRED.other());
    if !statuses_agree {
        tracing::warn!("the two eigen routes disagree on which blocks fail");
    }
    let eigen = Measured {
        what: "74×74 fiber blocks (eigen + readout)",
        n: nw,
        batch: dl.nblock,
        chosen: (route.name(), time(route)),
        other: (other.name(), time(other)),
        agree: Some(if statuses_agree { agree } else { f64::NAN }),
    };
    Ok(vec![cholesky, eigen])
}
