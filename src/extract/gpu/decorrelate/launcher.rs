//! The launchers of decorrelate.cu: its [`Kernels`], the kernels' parameter structs
//! (mirrored in `kernels/params.cuh`), [`launch_config`], the Jacobi route ([`decorrelate`],
//! [`decorrelate_into`]) and the eigen route ([`decorrelate_by_syev`],
//! [`decorrelate_eigen_into`]), with the checks and uploads both share (`prepare_launch`).
//! Imports the parent's constants and errors, `layout`, `batch`, `gpu::launch`,
//! `gpu::device` and `gpu::solve`.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::batch::DecorrBatch;
use super::layout::DecorrLayout;
use super::{bad, cuda, THREADS};
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::launch::{self, kernel_params, Guards};
use crate::extract::gpu::solve::{EigenBatch, Solver};
use crate::extract::gpu::GpuError;

/// The kernel, loaded once, with its dynamic shared-memory limit raised to the device's.
pub struct Kernels {
    func: CudaFunction,
    eigen: CudaFunction,
    /// The most dynamic shared memory a launch may request on this device.
    pub max_dynamic_smem: usize,
}

impl Kernels {
    /// Compiles (or takes from the PTX cache) and loads decorrelate.cu on `gpu`, and opts the
    /// kernel in to the device's largest dynamic shared memory (89 KB at 74×74, over the 48 KB
    /// a kernel gets without opting in).
    pub fn load(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let module = gpu.module("decorrelate.cu")?;
        let optin = gpu
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda("querying the shared-memory limit"))?;
        let mut max_dyn = optin;
        let mut load = |name: &str| -> Result<CudaFunction, GpuError> {
            let func = module
                .load_function(name)
                .map_err(|e| GpuError::Kernel(format!("decorrelate.cu has no {name}: {e:?}")))?;
            let fixed = func
                .get_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(cuda("querying the kernel's static shared memory"))?;
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                optin - fixed,
            )
            .map_err(cuda("raising the dynamic shared-memory limit"))?;
            max_dyn = max_dyn.min(optin - fixed);
            Ok(func)
        };
        let func = load("decorrelate")?;
        let eigen = load("decorrelate_eigen")?;
        Ok(Kernels {
            func,
            eigen,
            max_dynamic_smem: max_dyn.max(0) as usize,
        })
    }
}

kernel_params! {
    /// `decorrelate`'s parameters (kernels/params.cuh): sizes and the sweep limit, then the
    /// device addresses of the blocks' parameters and offsets, the covariances, solutions and
    /// starting bases it reads, and the outputs it writes.
    pub struct DecorrelateParams {
        pub ld: i32,
        pub ncol: i32,
        pub nd2: i32,
        pub max_sweeps: i32,
        pub params: u64,
        pub offs: u64,
        pub cov: u64,
        pub x: u64,
        pub basis: u64,
        pub flux: u64,
        pub fluxivar: u64,
        pub resolution: u64,
        pub status: u64,
        pub sweeps: u64,
    }
}

kernel_params! {
    /// `decorrelate_eigen`'s parameters (kernels/params.cuh): sizes, then the device addresses
    /// of the blocks' parameters and offsets, syev's eigenpairs and infos, the solutions, and
    /// the outputs (`decorrelate`'s).
    pub struct DecorrelateEigenParams {
        pub ld: i32,
        pub ncol: i32,
        pub nd2: i32,
        /// Explicit padding (0), so that no byte of the struct is undefined.
        pub pad0: i32,
        pub params: u64,
        pub offs: u64,
        pub evec: u64,
        pub eval: u64,
        pub einfo: u64,
        pub x: u64,
        pub flux: u64,
        pub fluxivar: u64,
        pub resolution: u64,
        pub status: u64,
        pub sweeps: u64,
    }
}

/// Both kernels' launch for `layout`: one block of [`THREADS`] per covariance block, with
/// [`DecorrLayout::smem_bytes`] of dynamic shared memory.
pub fn launch_config(layout: &DecorrLayout) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (launch::dim(layout.nblock, "covariance blocks")?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: launch::dim(layout.smem_bytes(), "shared memory")?,
    })
}

/// Decorrelates the blocks of `layout` on `gpu` from the device buffers `cov` and `x` (the
/// previous stages' outputs), queued on the GPU's stream.
pub fn decorrelate(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    max_sweeps: u32,
) -> Result<DecorrBatch, GpuError> {
    let mut out = DecorrBatch::alloc(gpu, layout)?;
    decorrelate_into(gpu, kernels, layout, cov, x, max_sweeps, &mut out)?;
    Ok(out)
}

/// [`decorrelate`] into existing buffers (a pipeline reuses them from batch to batch).
pub fn decorrelate_into(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    max_sweeps: u32,
    out: &mut DecorrBatch,
) -> Result<(), GpuError> {
    let max_sweeps = i32::try_from(max_sweeps).map_err(|_| bad("max_sweeps > i32".into()))?;
    let LaunchArgs {
        cfg,
        ld_i,
        ncol_i,
        nd2_i,
        params,
        offs,
    } = prepare_launch(gpu, kernels, layout, cov, x, out)?;
    let basis = gpu
        .upload(&layout.basis)
        .map_err(cuda("uploading the starting bases"))?;
    let st = &gpu.stream;
    let mut g = Guards::default();
    let args = DecorrelateParams {
        ld: ld_i,
        ncol: ncol_i,
        nd2: nd2_i,
        max_sweeps,
        params: g.read(&params, st),
        offs: g.read(&offs, st),
        cov: g.read(cov, st),
        x: g.read(x, st),
        basis: g.read(&basis, st),
        flux: g.write(&mut out.flux, st),
        fluxivar: g.write(&mut out.fluxivar, st),
        resolution: g.write(&mut out.resolution, st),
        status: g.write(&mut out.status, st),
        sweeps: g.write(&mut out.sweeps, st),
    };
    let mut launch = st.launch_builder(&kernels.func);
    launch.arg(&args);
    // SAFETY: DecorrelateParams is `decorrelate`'s one parameter (kernels/params.cuh, layout
    // tested), its addresses those of live buffers whose guards (`g`) outlive the launch:
    // int ld, ncol, nd2, max_sweeps (i32); params (i32, 8 per block) and offs (i64 = long long,
    // 3 per block), built together by DecorrLayout::new for nblock blocks; cov, x and basis
    // (f64, read); flux, fluxivar, resolution (f64), status and sweeps (i32), written. Bounds:
    // one thread block per b < nblock = gridDim.x; it reads params[8b..8b+8], offs[3b..3b+3],
    // the lower triangle of C at cov_off + j·cov_ld + i (i, j < n, ≤ cov_need ≤ cov.len(),
    // checked above), x[x_off..x_off + n] (≤ x_need ≤ x.len()) and basis[basis_off..
    // basis_off + n²] (DecorrLayout::new appended an n × n basis there); it writes flux/fluxivar[b·ncol..
    // (b+1)·ncol], resolution[b·nd2·ncol..(b+1)·nd2·ncol], status[b], sweeps[b], all inside
    // the buffers checked above. Rows read in shared memory: DecorrLayout::new checked
    // row_lo ≤ wavepad - ndiag, wavepad + max(nstep, nkeep + ndiag) ≤ row_hi ≤ n, so every
    // Q/R row index lies in 0..nrow and every column in 0..n. Shared memory: smem_bytes(ld)
    // with ld ≥ every block's m = n rounded up to even, the carve-up the kernel makes, within
    // the limit set by Kernels::load (checked above). THREADS equals the kernel's
    // __launch_bounds__.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching decorrelate"))?;
    drop(g);
    // params, offs and basis drop here: cudarc frees them in stream order, after the kernel.
    Ok(())
}

/// The eigen route on a solve's outputs: `XsyevBatched` over every covariance slot of `blocks`
/// (`nslot` of `nw × nw`, overwritten with eigenvectors), then the readout; queued on the
/// stream of `gpu`, which must be `solver`'s.
#[allow(clippy::too_many_arguments)]
pub fn decorrelate_by_syev(
    gpu: &Gpu,
    kernels: &Kernels,
    solver: &mut Solver,
    layout: &DecorrLayout,
    blocks: &mut CudaSlice<f64>,
    nw: usize,
    nslot: usize,
    x: &CudaSlice<f64>,
) -> Result<DecorrBatch, GpuError> {
    let eig = solver.eigen_in_place(blocks, nw, nslot)?;
    let mut out = DecorrBatch::alloc(gpu, layout)?;
    decorrelate_eigen_into(gpu, kernels, layout, blocks, &eig, x, &mut out)?;
    Ok(out)
}

/// The readout of `decorrelate_eigen` from the eigenpairs of the covariance slots, which
/// [`Solver::eigen_in_place`] wrote over them (`evec`) and into `eig`; queued on the GPU's
/// stream into `out`.
pub fn decorrelate_eigen_into(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    evec: &CudaSlice<f64>,
    eig: &EigenBatch,
    x: &CudaSlice<f64>,
    out: &mut DecorrBatch,
) -> Result<(), GpuError> {
    let LaunchArgs {
        cfg,
        ld_i,
        ncol_i,
        nd2_i,
        params,
        offs,
    } = prepare_launch(gpu, kernels, layout, evec, x, out)?;
    let (l, nslot) = layout.slots()?;
    if eig.values.len() < nslot * l || eig.info.len() < nslot {
        return Err(bad(format!(
            "{} eigenvalues and {} infos for {nslot} slots of {l}",
            eig.values.len(),
            eig.info.len()
        )));
    }
    let st = &gpu.stream;
    let mut g = Guards::default();
    let args = DecorrelateEigenParams {
        ld: ld_i,
        ncol: ncol_i,
        nd2: nd2_i,
        params: g.read(&params, st),
        offs: g.read(&offs, st),
        evec: g.read(evec, st),
        eval: g.read(&eig.values, st),
        einfo: g.read(&eig.info, st),
        x: g.read(x, st),
        flux: g.write(&mut out.flux, st),
        fluxivar: g.write(&mut out.fluxivar, st),
        resolution: g.write(&mut out.resolution, st),
        status: g.write(&mut out.status, st),
        sweeps: g.write(&mut out.sweeps, st),
        ..DecorrelateEigenParams::default()
    };
    let mut launch = st.launch_builder(&kernels.eigen);
    launch.arg(&args);
    // SAFETY: DecorrelateEigenParams is `decorrelate_eigen`'s one parameter
    // (kernels/params.cuh, layout tested), its addresses those of live buffers whose guards
    // (`g`) outlive the launch: int ld, ncol, nd2 (i32, fit: DecorrLayout::new); params (i32, 8 a
    // block) and offs (i64, 3 a block) for nblock = gridDim.x blocks; evec, eval (f64) and
    // einfo (i32), read; x (f64), read; the outputs as `decorrelate`'s. Bounds: block b reads
    // evec[cov_off + (k0 + t)·l + i] for t, i < n ≤ l, inside the slot at cov_off (≤ cov_need ≤
    // evec.len(), prepare_launch), eval[slot·l + k0 + t] and einfo[slot] with slot = cov_off / l²
    // < nslot (DecorrLayout::slots: every cov_off is a whole slot and cov_ld = l; lengths
    // checked above), x and the outputs as `decorrelate` (prepare_launch). Shared memory as
    // `decorrelate`'s, within the limit Kernels::load set for this kernel.
    unsafe { launch.launch(cfg) }.map_err(cuda("launching decorrelate_eigen"))?;
    drop(g);
    Ok(())
}

/// What both kernels' launches share: the grid and the shared memory, the sizes they take
/// as ints, and the blocks' parameters and offsets on the device.
struct LaunchArgs {
    cfg: LaunchConfig,
    ld_i: i32,
    ncol_i: i32,
    nd2_i: i32,
    params: CudaSlice<i32>,
    offs: CudaSlice<i64>,
}

/// Checks what both kernels need of a launch (outputs of the layout's sizes, inputs as long as
/// the blocks read: `cov` for the Jacobi, the eigenvectors for the eigen route, at the same
/// offsets; shared memory within the device's limit), then uploads the blocks' parameters.
fn prepare_launch(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    out: &DecorrBatch,
) -> Result<LaunchArgs, GpuError> {
    let (nb, ncol, nd2) = (layout.nblock, layout.ncol, layout.nd2);
    if out.nblock != nb
        || out.ncol != ncol
        || out.nd2 != nd2
        || out.flux.len() != nb * ncol
        || out.fluxivar.len() != nb * ncol
        || out.resolution.len() != nb * nd2 * ncol
        || out.status.len() != nb
        || out.sweeps.len() != nb
    {
        return Err(bad(format!(
            "output buffers for {} blocks × {} × {}, layout of {nb} × {ncol} × {nd2}",
            out.nblock, out.ncol, out.nd2
        )));
    }
    if cov.len() < layout.cov_need || x.len() < layout.x_need {
        return Err(bad(format!(
            "covariance ({}) or solution ({}) buffer shorter than the blocks read ({}, {})",
            cov.len(),
            x.len(),
            layout.cov_need,
            layout.x_need
        )));
    }
    let smem = layout.smem_bytes();
    if smem > kernels.max_dynamic_smem {
        return Err(bad(format!(
            "{0}×{0} blocks need {smem} bytes of shared memory, over this GPU's {1}",
            layout.ld, kernels.max_dynamic_smem
        )));
    }
    Ok(LaunchArgs {
        cfg: launch_config(layout)?,
        ld_i: launch::int(layout.ld, "block side")?,
        ncol_i: launch::int(ncol, "block columns")?,
        nd2_i: launch::int(nd2, "resolution diagonals")?,
        params: gpu
            .upload(&layout.params)
            .map_err(cuda("uploading block parameters"))?,
        offs: gpu
            .upload(&layout.offs)
            .map_err(cuda("uploading block offsets"))?,
    })
}
