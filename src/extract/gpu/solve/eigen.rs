//! The eigen route of the decorrelation: `cusolverDnXsyevBatched` on the solver's handle
//! ([`Solver::eigen_in_place`]), with its parameter object and workspaces kept between calls
//! (`SyevWork`). Imports the solver (`super`), its library checks and cudarc's cuSOLVER
//! bindings.

use cudarc::cusolver::sys as cusolver;
use cudarc::driver::{CudaSlice, DevicePtrMut};

use super::libraries::{solver_ok, SYEV_BATCHED};
use super::{bad, cuda, Solver};
use crate::extract::gpu::GpuError;

/// What `cusolverDnXsyevBatched` needs besides its operands, kept between calls.
pub(super) struct SyevWork {
    pub(super) params: cusolver::cusolverDnParams_t,
    pub(super) device: Option<CudaSlice<u8>>,
    pub(super) host: Vec<u8>,
}

/// The eigenpairs of a batch of symmetric matrices ([`Solver::eigen_in_place`]): the
/// eigenvectors overwrite the matrices; here the eigenvalues and each matrix's info.
pub struct EigenBatch {
    /// `[count·n]`, ascending per matrix.
    pub values: CudaSlice<f64>,
    /// `[count]`: 0, or syev's failure code for that matrix.
    pub info: CudaSlice<i32>,
}

impl Solver {
    /// Queues `cusolverDnXsyevBatched` on `count` column-major `n × n` symmetric matrices laid
    /// end to end in `a` (only their lower triangles are read): the eigenvectors overwrite them
    /// (column k of matrix i), the eigenvalues come back ascending. Nothing is waited for.
    pub fn eigen_in_place(
        &mut self,
        a: &mut CudaSlice<f64>,
        n: usize,
        count: usize,
    ) -> Result<EigenBatch, GpuError> {
        if n == 0 || count == 0 || a.len() < n * n * count {
            return Err(bad(format!(
                "{count} matrices of {n} × {n} in a buffer of {} values",
                a.len()
            )));
        }
        let st = self.stream.clone();
        st.context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        if self.syev.is_none() {
            let mut params: cusolver::cusolverDnParams_t = std::ptr::null_mut();
            // SAFETY: writes one parameter object, destroyed in Drop.
            solver_ok("cusolverDnCreateParams", unsafe {
                cusolver::cusolverDnCreateParams(&mut params)
            })?;
            self.syev = Some(SyevWork {
                params,
                device: None,
                host: Vec::new(),
            });
        }
        let work = self.syev.as_mut().expect("made above");
        let mut values: CudaSlice<f64> = st
            .alloc_zeros(count * n)
            .map_err(cuda("allocating eigenvalues"))?;
        let mut info: CudaSlice<i32> = st
            .alloc_zeros(count)
            .map_err(cuda("allocating syev's info"))?;
        let r64 = cusolver::cudaDataType::CUDA_R_64F;
        let vectors = cusolver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
        let lower = cusolver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let (n64, count64) = (n as i64, count as i64);
        let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
        {
            let (ap, _ga) = a.device_ptr_mut(&st);
            let (wp, _gw) = values.device_ptr_mut(&st);
            // SAFETY: a workspace query for `count` n × n double matrices (lda = n) inside `a`
            // (checked above) and their count·n eigenvalues; it writes only the two sizes.
            solver_ok("cusolverDnXsyevBatched_bufferSize", unsafe {
                cusolver::cusolverDnXsyevBatched_bufferSize(
                    self.dn,
                    work.params,
                    vectors,
                    lower,
                    n64,
                    r64,
                    ap as *const std::ffi::c_void,
                    n64,
                    r64,
                    wp as *const std::ffi::c_void,
                    r64,
                    &mut dev_bytes,
                    &mut host_bytes,
                    count64,
                )
            })?;
        }
        if work.device.as_ref().is_none_or(|d| d.len() < dev_bytes) || work.host.len() < host_bytes
        {
            // An earlier call may still read the workspaces: let it finish before they go.
            st.synchronize()
                .map_err(cuda("waiting before growing syev's workspace"))?;
            work.device = Some(
                st.alloc_zeros(dev_bytes.max(1))
                    .map_err(cuda("allocating syev's workspace"))?,
            );
            work.host = vec![0u8; host_bytes.max(1)];
        }
        let dev = work.device.as_mut().expect("allocated above");
        let (ap, _ga) = a.device_ptr_mut(&st);
        let (wp, _gw) = values.device_ptr_mut(&st);
        let (dp, _gd) = dev.device_ptr_mut(&st);
        let (ip, _gi) = info.device_ptr_mut(&st);
        // SAFETY: `count` column-major n × n matrices (lda = n) in `a`, overwritten with their
        // eigenvectors; count·n eigenvalues in `values` and count ints in `info`, allocated
        // above; device and host workspaces of at least the sizes just queried, owned by `self`
        // and only replaced after a synchronisation, so they outlive the queued call. The
        // handle is bound to this stream (Solver::new).
        solver_ok(SYEV_BATCHED, unsafe {
            cusolver::cusolverDnXsyevBatched(
                self.dn,
                work.params,
                vectors,
                lower,
                n64,
                r64,
                ap as *mut std::ffi::c_void,
                n64,
                r64,
                wp as *mut std::ffi::c_void,
                r64,
                dp as *mut std::ffi::c_void,
                dev_bytes,
                work.host.as_mut_ptr() as *mut std::ffi::c_void,
                host_bytes,
                ip as *mut i32,
                count64,
            )
        })?;
        drop((_ga, _gw, _gd, _gi));
        Ok(EigenBatch { values, info })
    }
}
