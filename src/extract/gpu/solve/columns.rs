//! The core columns of `C = (AᵀWA)⁻¹` ([`Solver::core_columns`], step 5 of the module docs of
//! `solve`): what a window pixel's leverage needs for `--ivar-from-model`. Imports the plan and
//! the stage's helpers (`super`), `device`, `normal`'s dense batch and cudarc's cuBLAS bindings.

use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::libraries::blas_ok;
use super::plan::{at, ColumnArrays, SolvePlan};
use super::{bad, cuda, int, PatchShape, Solver};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::normal::DenseBatch;
use crate::extract::gpu::GpuError;

/// `C[:, core]` of every patch of a batch, on the device (layout in the module docs of `solve`).
pub struct CoreColumns {
    /// Leading dimension of each column (= nmax).
    pub ld: usize,
    /// Per patch `b`: offset in `z` of its first column.
    pub off: Vec<i64>,
    /// `z[off[b] + i·ld + v] = C[v, k0_b + i]` for `i < ncols_b`, `v < n_b` (other elements:
    /// unspecified, never read).
    pub z: CudaSlice<f64>,
}

impl Solver {
    /// `C[:, core] = L⁻ᵀ Y` of every patch of `dense`, which this solver's last `solve_into`
    /// factored (`Y = L⁻¹E` is still in its workspace): one Trans trsm per group on the whole
    /// factor, in place in `Y`, which is then handed over as `Z` (the next solve allocates
    /// another). Queued on the stream, nothing waited for; a later kernel on the same stream
    /// reads the result. Refused unless the last solve was of `dense`'s unknowns and `shapes`
    /// (and not taken already). Where that solve's `info` was not 0, the patch's columns are
    /// meaningless.
    pub fn core_columns(
        &mut self,
        gpu: &Gpu,
        dense: &DenseBatch,
        shapes: &[PatchShape],
    ) -> Result<CoreColumns, GpuError> {
        if !Arc::ptr_eq(&gpu.stream, &self.stream) {
            return Err(bad(
                "the solver's handles are bound to another stream".into()
            ));
        }
        let plan = SolvePlan::new(dense.npatch, dense.nmax, &dense.n, shapes)?;
        let (npatch, nmax) = (plan.npatch, plan.nmax);
        if dense.ata.len() != npatch * nmax * nmax {
            return Err(bad(format!(
                "device batch of {} values for {npatch} factors of {nmax}",
                dense.ata.len()
            )));
        }
        match &self.solved {
            Some((n, s)) if *n == dense.n && s == shapes => {}
            _ => {
                return Err(bad(
                    "the core columns need the solve of this batch just before".into(),
                ))
            }
        }
        let mut z = match self.y.take() {
            Some(y) if y.len() >= plan.z_len() => y,
            _ => return Err(bad("the solve left no Y".into())),
        };
        self.solved = None;
        let off = (0..npatch)
            .map(|b| i64::try_from(plan.z(b)))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| bad("Z's offsets overflow".into()))?;
        let st = self.stream.clone();
        st.context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        {
            // The guards keep cudarc's stream ordering until the calls are queued.
            let (ata_p, _g_ata) = dense.ata.device_ptr(&st);
            let (z_p, _g_z) = z.device_ptr_mut(&st);
            let arrays = ColumnArrays::new(&plan, ata_p, z_p);
            let ptrs = gpu
                .upload(&arrays.host)
                .map_err(cuda("uploading the pointer arrays"))?;
            let (ptrs_p, _g_ptrs) = ptrs.device_ptr(&st);
            let parr = |off: usize| at::<u64>(ptrs_p, off);
            let nmax_i = int(nmax, "nmax")?;
            let one = 1.0f64;
            for (g, &(full, slabs)) in plan.groups.iter().zip(&arrays.groups) {
                let count = int(g.patches.len(), "patches in a group")?;
                let (n, ncols) = (int(g.k0 + g.m, "n")?, int(g.ncols(), "columns")?);
                // SAFETY: `parr(full)` holds count device pointers to L[0, 0] of the group's
                // patches: an n × n lower triangle with lda = nmax inside the patch's nmax ×
                // nmax matrix in `dense.ata` (npatch·nmax², checked above), since n = k0 + m ≤
                // nmax. `parr(slabs)` holds count pointers to distinct slabs of Z, the solve's
                // Y (ldb = nmax ≥ n): n rows × ncols ≤ ncols_max columns, the last element at
                // (ncols_max − 1)·nmax + nmax − 1 < slab, so inside z_len ≤ z.len(). alpha is a
                // host scalar (host pointer mode) read during the call; the pointer array and
                // the buffers outlive the call's execution (freed in stream order).
                blas_ok("cublasDtrsmBatched", unsafe {
                    cublas::cublasDtrsmBatched(
                        self.blas,
                        cublas::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                        cublas::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                        cublas::cublasOperation_t::CUBLAS_OP_T,
                        cublas::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                        n,
                        ncols,
                        &one,
                        parr(full) as *const *const f64,
                        nmax_i,
                        parr(slabs) as *const *mut f64,
                        nmax_i,
                        count,
                    )
                })?;
            }
            // `ptrs` drops here, after the calls that read it are queued: freed in stream order.
        }
        Ok(CoreColumns { ld: nmax, off, z })
    }
}
