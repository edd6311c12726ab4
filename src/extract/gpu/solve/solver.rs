//! The [`Solver`]'s handles, made on one stream, and the stage's sequence of batched calls
//! ([`Solver::solve_into`], steps in the module docs of `solve`). Imports the plan, the
//! library checks and the outputs (`super`), `device`, `normal`'s dense batch and cudarc's
//! cuBLAS/cuSOLVER bindings.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::libraries::{blas_ok, check_libraries, solver_ok};
use super::plan::{at, PointerArrays, SolvePlan};
use super::{bad, cuda, int, PatchShape, SolveBatch, Solver};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::normal::DenseBatch;
use crate::extract::gpu::GpuError;

impl Solver {
    /// The cuSOLVER handle, bound to this solver's stream (for `choice`'s measurements).
    pub(crate) fn dn_handle(&self) -> cusolver::cusolverDnHandle_t {
        self.dn
    }

    /// Creates the handles on `gpu`'s stream, after checking the libraries.
    pub fn new(gpu: &Gpu) -> Result<Solver, GpuError> {
        check_libraries()?;
        gpu.ctx
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        // Null handles first, so that Drop releases whatever was created if a step fails.
        let mut s = Solver {
            stream: gpu.stream.clone(),
            blas: std::ptr::null_mut(),
            dn: std::ptr::null_mut(),
            y: None,
            ones: None,
            syev: None,
            solved: None,
        };
        let raw = s.stream.cu_stream();
        // SAFETY: writes one handle into `s.blas`; the context is current (bound above).
        blas_ok("cublasCreate_v2", unsafe {
            cublas::cublasCreate_v2(&mut s.blas)
        })?;
        // SAFETY: a live handle and the raw stream of `s.stream`, which `s` keeps alive for as
        // long as the handle (Drop destroys the handle before the fields drop).
        blas_ok("cublasSetStream_v2", unsafe {
            cublas::cublasSetStream_v2(s.blas, raw as cublas::cudaStream_t)
        })?;
        // Host pointer mode: alpha and beta are host scalars, read during the call.
        // SAFETY: a live handle; the mode is a valid enum value.
        blas_ok("cublasSetPointerMode_v2", unsafe {
            cublas::cublasSetPointerMode_v2(
                s.blas,
                cublas::cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST,
            )
        })?;
        // Plain IEEE double arithmetic (no FP64 emulation): the twin and the CPU comparison
        // assume it.
        // SAFETY: a live handle; the mode is a valid enum value.
        blas_ok("cublasSetMathMode", unsafe {
            cublas::cublasSetMathMode(s.blas, cublas::cublasMath_t::CUBLAS_DEFAULT_MATH)
        })?;
        // SAFETY: writes one handle into `s.dn`; the context is current.
        solver_ok("cusolverDnCreate", unsafe {
            cusolver::cusolverDnCreate(&mut s.dn)
        })?;
        // SAFETY: a live handle and the stream kept alive by `s`, as for cuBLAS.
        solver_ok("cusolverDnSetStream", unsafe {
            cusolver::cusolverDnSetStream(s.dn, raw as cusolver::cudaStream_t)
        })?;
        Ok(s)
    }

    /// Makes the vector of ones that the strided copies build `E` from hold at least `units`.
    pub(super) fn grow_ones(&mut self, gpu: &Gpu, units: usize) -> Result<(), GpuError> {
        if self.ones.as_ref().is_none_or(|o| o.len() < units) {
            self.ones = Some(
                gpu.upload(&vec![1.0f64; units])
                    .map_err(cuda("uploading ones"))?,
            );
        }
        Ok(())
    }

    /// Allocates the outputs and runs the stage (see [`Solver::solve_into`]).
    pub fn solve(
        &mut self,
        gpu: &Gpu,
        dense: &mut DenseBatch,
        shapes: &[PatchShape],
    ) -> Result<SolveBatch, GpuError> {
        let mut out = SolveBatch::alloc(gpu, dense, shapes)?;
        self.solve_into(gpu, dense, shapes, &mut out)?;
        Ok(out)
    }

    /// Queues the stage for `dense` (one shape per patch) on the stream: factors `dense.ata`
    /// in place (its upper triangle is left as cuSOLVER's workspace) and writes `out`. Nothing is
    /// waited for; `SolveBatch::download` (test-only) or a later stage on the same stream sees the results.
    pub fn solve_into(
        &mut self,
        gpu: &Gpu,
        dense: &mut DenseBatch,
        shapes: &[PatchShape],
        out: &mut SolveBatch,
    ) -> Result<(), GpuError> {
        if !Arc::ptr_eq(&gpu.stream, &self.stream) {
            return Err(bad(
                "the solver's handles are bound to another stream".into()
            ));
        }
        let plan = SolvePlan::new(dense.npatch, dense.nmax, &dense.n, shapes)?;
        let (npatch, nmax) = (plan.npatch, plan.nmax);
        if dense.ata.len() != npatch * nmax * nmax || dense.atp.len() != npatch * nmax {
            return Err(bad(format!(
                "device batch of {} and {} values for {npatch} patches of {nmax}",
                dense.ata.len(),
                dense.atp.len()
            )));
        }
        if (out.npatch, out.nmax, out.nw, out.ncore_max) != (npatch, nmax, plan.nw, plan.ncore_max)
            || out.x.len() != npatch * nmax
            || out.blocks.len() != plan.blocks_len()
            || out.info.len() != npatch
        {
            return Err(bad(format!(
                "outputs for {} patches ({}, {} × {}, {} blocks), plan of {npatch} ({nmax}, {} × \
                 {}, {} blocks)",
                out.npatch,
                out.nmax,
                out.nw,
                out.nw,
                out.ncore_max,
                plan.nw,
                plan.nw,
                plan.ncore_max
            )));
        }
        let st = self.stream.clone();
        st.context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;

        // Workspace, grown when a batch needs more (or taken by `core_columns`).
        self.solved = None;
        let ylen = plan.z_len();
        if self.y.as_ref().is_none_or(|y| y.len() < ylen) {
            self.y = None;
            self.y = Some(st.alloc_zeros(ylen).map_err(cuda("allocating Y"))?);
        }
        self.grow_ones(gpu, plan.units())?;
        let (Some(y), Some(ones)) = (self.y.as_mut(), self.ones.as_ref()) else {
            unreachable!("allocated above");
        };

        // potrs solves in place: start x from AᵀWp. Then zero the blocks (those of absent
        // core fibers stay so) and Y (E's zeros).
        st.memcpy_dtod(&dense.atp, &mut out.x)
            .map_err(cuda("copying AᵀWp into x"))?;
        st.memset_zeros(&mut out.blocks)
            .map_err(cuda("zeroing the blocks"))?;
        st.memset_zeros(&mut y.slice_mut(0..ylen))
            .map_err(cuda("zeroing Y"))?;

        // Device addresses; the guards keep cudarc's stream ordering until the calls are queued.
        let (ata_p, _g_ata) = dense.ata.device_ptr_mut(&st);
        let (x_p, _g_x) = out.x.device_ptr_mut(&st);
        let (blk_p, _g_blk) = out.blocks.device_ptr_mut(&st);
        let (info_p, _g_info) = out.info.device_ptr_mut(&st);
        let (pinfo_p, _g_pinfo) = out.potrs_info.device_ptr_mut(&st);
        let (y_p, _g_y) = y.device_ptr_mut(&st);
        let (ones_p, _g_ones) = ones.device_ptr(&st);

        // Every pointer array, in one upload.
        let arrays = PointerArrays::new(&plan, ata_p, x_p, y_p, blk_p);
        let ptrs = gpu
            .upload(&arrays.host)
            .map_err(cuda("uploading the pointer arrays"))?;
        let (ptrs_p, _g_ptrs) = ptrs.device_ptr(&st);
        let parr = |off: usize| at::<u64>(ptrs_p, off);

        let (nmax_i, npatch_i) = (int(nmax, "nmax")?, int(npatch, "patches")?);
        let lower_s = cusolver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;

        // SAFETY: `parr(arrays.factors)` is a device array of npatch pointers, each to a column-major
        // nmax × nmax matrix with lda = nmax inside `dense.ata` (npatch·nmax² elements, checked
        // above); `info_p` is a device array of npatch ints (`out.info`, checked). The pointer
        // array (`ptrs`) and all buffers outlive the call's execution: they are dropped after
        // it is queued, and cudarc frees them in stream order.
        solver_ok("cusolverDnDpotrfBatched", unsafe {
            cusolver::cusolverDnDpotrfBatched(
                self.dn,
                lower_s,
                nmax_i,
                parr(arrays.factors) as *mut *mut f64,
                nmax_i,
                info_p as *mut c_int,
                npatch_i,
            )
        })?;
        // SAFETY: the same factor pointers (lda = nmax); `parr(arrays.x)` holds npatch device
        // pointers to nmax-vectors in `out.x` (npatch·nmax, checked), ldb = nmax, nrhs = 1 (the
        // only value cuSOLVER supports); `pinfo_p` is one device int. Lifetimes as above.
        solver_ok("cusolverDnDpotrsBatched", unsafe {
            cusolver::cusolverDnDpotrsBatched(
                self.dn,
                lower_s,
                nmax_i,
                1,
                parr(arrays.factors) as *mut *mut f64,
                nmax_i,
                parr(arrays.x) as *mut *mut f64,
                nmax_i,
                pinfo_p as *mut c_int,
                npatch_i,
            )
        })?;

        let stride = int(nmax + 1, "nmax + 1")?;
        let (one, zero) = (1.0f64, 0.0f64);
        for (g, gp) in plan.groups.iter().zip(&arrays.groups) {
            // E: per group, ones at row k0 + i of column i of each slab (module docs).
            let (first, units) = plan.z_units(g);
            let units = int(units, "E's unit entries")?;
            // SAFETY: reads `units` ≤ plan.units() contiguous doubles of `ones` (grown to that
            // above) and writes y[first + i·(nmax + 1)] for i < units: the last index is below
            // the end of the group's slabs, z(g.patches[0]) + |g|·slab ≤ z_len = ylen ≤ y.len()
            // (`SolvePlan::z_units`).
            blas_ok("cublasDcopy_v2", unsafe {
                cublas::cublasDcopy_v2(
                    self.blas,
                    units,
                    ones_p as *const f64,
                    1,
                    at::<f64>(y_p, first) as *mut f64,
                    stride,
                )
            })?;
            let count = int(g.patches.len(), "patches in a group")?;
            let (m, ncols, nwt) = (
                int(g.m, "m")?,
                int(g.ncols(), "columns")?,
                int(g.nwt, "nwt")?,
            );
            // SAFETY: `parr(gp.l22)` holds count device pointers to L[k0, k0] of the group's
            // patches: an m × m lower triangle with lda = nmax, inside the patch's matrix since
            // k0 + m = n ≤ nmax. `parr(gp.y)` holds count pointers to row k0 of distinct slabs of
            // Y (ldb = nmax ≥ n): m rows × ncols ≤ ncols_max columns, the last element at
            // (ncols_max − 1)·nmax + k0 + m − 1 < slab. alpha is a host scalar (host pointer
            // mode) read during the call.
            blas_ok("cublasDtrsmBatched", unsafe {
                cublas::cublasDtrsmBatched(
                    self.blas,
                    cublas::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                    cublas::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    cublas::cublasOperation_t::CUBLAS_OP_N,
                    cublas::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                    m,
                    ncols,
                    &one,
                    parr(gp.l22) as *const *const f64,
                    nmax_i,
                    parr(gp.y) as *const *mut f64,
                    nmax_i,
                    count,
                )
            })?;
            for (c, &(yf, cf)) in gp.fibers.iter().enumerate() {
                let k = int(g.m - c * g.nwt, "Gram rows")?;
                let ldc = int(plan.nw, "nw")?;
                // SAFETY: `parr(yf)` holds count pointers to row k0 + c·nwt and column c·nwt of
                // a slab: a k × nwt operand (k = m − c·nwt rows, so it ends at slab row n ≤ nmax;
                // lda = nmax ≥ k), read as both A (transposed) and B. `parr(cf)` holds count pointers to
                // nw × nw blocks of `out.blocks` (ldc = nw ≥ nwt, the block at plan.block(b, c)
                // with c < ncore ≤ ncore_max, inside blocks_len()). alpha/beta are host scalars.
                blas_ok("cublasDgemmBatched", unsafe {
                    cublas::cublasDgemmBatched(
                        self.blas,
                        cublas::cublasOperation_t::CUBLAS_OP_T,
                        cublas::cublasOperation_t::CUBLAS_OP_N,
                        nwt,
                        nwt,
                        k,
                        &one,
                        parr(yf) as *const *const f64,
                        nmax_i,
                        parr(yf) as *const *const f64,
                        nmax_i,
                        &zero,
                        parr(cf) as *const *mut f64,
                        ldc,
                        count,
                    )
                })?;
            }
        }
        self.solved = Some((dense.n.clone(), shapes.to_vec()));
        // `ptrs` drops here, after the calls that read it are queued: freed in stream order.
        Ok(())
    }
}
