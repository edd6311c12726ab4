//! The two library choices of the GPU backend, measured at the real sizes on the frame's own
//! matrices: the Cholesky factorisation at 518 unknowns (cuSOLVER's `potrfBatched`, which
//! `solve` uses, against one `potrf` call per matrix), and the eigendecomposition of the 74×74
//! fiber blocks (this crate's Jacobi kernel in `decorrelate.cu`, against cuSOLVER's
//! `XsyevBatched`; the batched Jacobi `syevjBatched` stops at n = 32). The Jacobi kernel does
//! more than the eigendecomposition (Q, R, flux and fluxivar too), so where it is faster the
//! comparison is conservative. `spextract bench --backend gpu` runs this on the first chunk of
//! the frame and prints the comparison, which BENCHMARKS.md records.
//!
//! Each call is run once untimed (the libraries set up lazily), then timed with events on the
//! stream; the inputs are copied afresh before each run, the factorisations being in place.

use std::ffi::c_void;

use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{sys::CUevent_flags, CudaSlice, DevicePtr, DevicePtrMut};

use super::backend::blocks_of;
use super::decorrelate::{self as decor, DecorrLayout, MAX_SWEEPS};
use super::device::Gpu;
use super::normal::{self, BatchLayout, OnDevice, UploadedLayout};
use super::solve::{solver_ok, PatchShape, Solver};
use super::GpuError;
use crate::extract::cpu::DIAG_EPSILON;
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
    move |e| GpuError::Cuda(format!("measuring the library choices: {what}: {e:?}"))
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
    let mut out = decor::DecorrBatch::alloc(gpu, &dl)?;
    let t_jacobi = timed(gpu, &mut |prepare| {
        if prepare {
            return Ok(());
        }
        decor::decorrelate_into(gpu, &dk, &dl, &sol.blocks, &sol.x, MAX_SWEEPS, &mut out)
    })?;

    // XsyevBatched on every nw × nw block slot of the solve's layout (slots past a patch's
    // core fibers are zero matrices: cheap, and counted in the batch).
    let nw = sol.nw;
    let nslots = sol.npatch * sol.ncore_max;
    let mut a: CudaSlice<f64> = st.alloc_zeros(nslots * nw * nw).map_err(cuda("alloc"))?;
    let mut w: CudaSlice<f64> = st.alloc_zeros(nslots * nw).map_err(cuda("alloc"))?;
    let mut einfo: CudaSlice<i32> = st.alloc_zeros(nslots).map_err(cuda("alloc"))?;
    let mut params: cusolver::cusolverDnParams_t = std::ptr::null_mut();
    // SAFETY: creates a parameter object, destroyed below.
    solver_ok("cusolverDnCreateParams", unsafe {
        cusolver::cusolverDnCreateParams(&mut params)
    })?;
    let r64 = cusolver::cudaDataType::CUDA_R_64F;
    let vectors = cusolver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
    let sized = {
        let (ap, _g1) = a.device_ptr_mut(st);
        let (wp, _g2) = w.device_ptr_mut(st);
        // SAFETY: a workspace query for nslots nw × nw double matrices (leading dimension nw)
        // and their eigenvalues; nothing is written but the two sizes.
        solver_ok("cusolverDnXsyevBatched_bufferSize", unsafe {
            cusolver::cusolverDnXsyevBatched_bufferSize(
                dn,
                params,
                vectors,
                lower,
                nw as i64,
                r64,
                ap as *const c_void,
                nw as i64,
                r64,
                wp as *const c_void,
                r64,
                &mut dev_bytes,
                &mut host_bytes,
                nslots as i64,
            )
        })
    };
    let result = sized.and_then(|()| {
        let mut dev_work: CudaSlice<u8> =
            st.alloc_zeros(dev_bytes.max(1)).map_err(cuda("alloc"))?;
        let mut host_work = vec![0u8; host_bytes.max(1)];
        timed(gpu, &mut |prepare| {
            if prepare {
                return st
                    .memcpy_dtod(&sol.blocks, &mut a)
                    .map_err(cuda("copying the blocks"));
            }
            {
                let (ap, _g1) = a.device_ptr_mut(st);
                let (wp, _g2) = w.device_ptr_mut(st);
                let (dp, _g3) = dev_work.device_ptr_mut(st);
                let (ip, _g4) = einfo.device_ptr_mut(st);
                // SAFETY: nslots column-major nw × nw matrices in `a` (overwritten with the
                // eigenvectors), nslots·nw eigenvalues in `w`, the device and host workspaces
                // of the sizes the query returned, nslots info ints; the host workspace lives
                // until the stream is synchronised (elapsed_ms waits for the end event).
                solver_ok("cusolverDnXsyevBatched", unsafe {
                    cusolver::cusolverDnXsyevBatched(
                        dn,
                        params,
                        vectors,
                        lower,
                        nw as i64,
                        r64,
                        ap as *mut c_void,
                        nw as i64,
                        r64,
                        wp as *mut c_void,
                        r64,
                        dp as *mut c_void,
                        dev_bytes,
                        host_work.as_mut_ptr() as *mut c_void,
                        host_bytes,
                        ip as *mut i32,
                        nslots as i64,
                    )
                })
            }
        })
    });
    // SAFETY: the object created above, no longer used.
    let destroyed = solver_ok("cusolverDnDestroyParams", unsafe {
        cusolver::cusolverDnDestroyParams(params)
    });
    let t_syev = result?;
    destroyed?;
    let eigen = Measured {
        what: "74×74 fiber blocks",
        n: nw,
        batch: dl.nblock,
        chosen: ("Jacobi kernel (+ Q, R, flux)", t_jacobi),
        other: ("XsyevBatched (eigen only)", t_syev),
        agree: None,
    };
    Ok(vec![cholesky, eigen])
}
