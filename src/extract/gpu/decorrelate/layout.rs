//! [`Block`], one covariance block and where its inputs are, and [`DecorrLayout`], a batch of
//! them flattened into the kernels' parameter arrays on the host (with [`smem_bytes`], the
//! shared memory a launch takes). Imports the parent's constants and errors, `basis`,
//! `gpu::launch` and the crate's `patch` types.

use super::basis::dct_basis;
use super::{bad, NPARAM};
use crate::extract::gpu::launch;
use crate::extract::gpu::GpuError;
use crate::patch::Patch;

/// One covariance block to decorrelate and where its inputs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Size of `C_ff` (the patch's `nwavetot`).
    pub n: usize,
    /// Offset of `C_ff[0, 0]` in the covariance buffer.
    pub cov_off: usize,
    /// Leading dimension: `C_ff[i, j]` is at `cov_off + j·cov_ld + i` (only `i ≥ j` is read).
    pub cov_ld: usize,
    /// Offset of the fiber's first unknown in the solution buffer (`n` consecutive values).
    pub x_off: usize,
    /// First row of `Q` needed (`wavepad - ndiag` on the CPU).
    pub row_lo: usize,
    /// One past the last row needed.
    pub row_hi: usize,
    /// Padding bins below the core.
    pub wavepad: usize,
    /// Core bins: flux and fluxivar are produced for all of them (the model image needs them).
    pub nstep: usize,
    /// Core bins kept in the output: the resolution is produced for these.
    pub nkeep: usize,
    /// Half-width of the resolution band.
    pub ndiag: usize,
}

impl Block {
    /// Core fiber `core` (0-based among the patch's core fibers) of `p`, with `cpu::solve`'s
    /// rows and bins; `x_patch` is the offset of the patch's fiber-major solution
    /// (`u = f·nwavetot + w`) in the solution buffer.
    pub fn for_patch(
        p: &Patch,
        ndiag: usize,
        core: usize,
        cov_off: usize,
        cov_ld: usize,
        x_patch: usize,
    ) -> Block {
        let nwt = p.nwavetot;
        let nstep = nwt.saturating_sub(2 * p.wavepad);
        Block {
            n: nwt,
            cov_off,
            cov_ld,
            x_off: x_patch + (p.core_fiber_offset() + core) * nwt,
            row_lo: p.wavepad.saturating_sub(ndiag),
            row_hi: (p.wavepad + nstep + ndiag).min(nwt),
            wavepad: p.wavepad,
            nstep,
            nkeep: p.nwave_keep,
            ndiag,
        }
    }
}

/// A batch of blocks flattened into the kernel's arrays (host-side; see the kernel's header).
#[derive(Debug, Clone)]
pub struct DecorrLayout {
    /// Blocks.
    pub nblock: usize,
    /// The shared-memory size parameter: the largest block size rounded up to even.
    pub ld: usize,
    /// Output columns per block: the largest `nstep`.
    pub ncol: usize,
    /// Resolution rows per block: the largest `2·ndiag + 1`.
    pub nd2: usize,
    /// `{n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag}` per block.
    pub params: Vec<i32>,
    /// `{cov_off, x_off, basis_off}` per block.
    pub offs: Vec<i64>,
    /// The starting bases of the Jacobi: [`dct_basis`] of each distinct block size, once.
    pub basis: Vec<f64>,
    /// The covariance buffer must hold at least this many values.
    pub cov_need: usize,
    /// The solution buffer must hold at least this many values.
    pub x_need: usize,
}

/// Bytes of dynamic shared memory for size parameter `ld` (even): A and V (`ld²` doubles each),
/// cos, sin, tan of `ld/2` rotations, an `ld`-double work vector, then `ld/2` p's and q's.
pub fn smem_bytes(ld: usize) -> usize {
    8 * (2 * ld * ld + 3 * (ld / 2) + ld) + 4 * 2 * (ld / 2)
}

impl DecorrLayout {
    /// Flattens `blocks`, refusing what the kernel cannot index: an empty batch, an empty or
    /// oversized block, rows that do not cover the bins read, sizes beyond `i32`.
    pub fn new(blocks: &[Block]) -> Result<DecorrLayout, GpuError> {
        if blocks.is_empty() {
            return Err(bad("the batch is empty".into()));
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        let mut out = DecorrLayout {
            nblock: blocks.len(),
            ld: 0,
            ncol: 0,
            nd2: 0,
            params: Vec::with_capacity(NPARAM * blocks.len()),
            offs: Vec::with_capacity(3 * blocks.len()),
            basis: Vec::new(),
            cov_need: 0,
            x_need: 0,
        };
        let mut basis_at: std::collections::HashMap<usize, usize> = Default::default();
        for (b, k) in blocks.iter().enumerate() {
            let fail = |what: &str| Err(bad(format!("block {b}: {what} ({k:?})")));
            if k.n == 0 || k.cov_ld < k.n {
                return fail("empty, or leading dimension below its size");
            }
            // The rows read: wavepad - ndiag .. wavepad + nkeep + ndiag for the resolution,
            // wavepad .. wavepad + nstep for the flux (cpu::solve needs wavepad ≥ ndiag too).
            if k.ndiag > k.wavepad
                || k.row_lo > k.wavepad - k.ndiag
                || k.nkeep > k.nstep
                || k.row_hi < k.wavepad + k.nstep.max(k.nkeep + k.ndiag)
                || k.row_hi > k.n
            {
                return fail("rows row_lo..row_hi do not cover the bins read, or exceed n");
            }
            let m = k.n + (k.n & 1);
            // Offsets and products formed in the kernel: m², ld², j·cov_ld, 2·ndiag + 1.
            if !fits(k.cov_ld) || !fits(smem_bytes(m)) || !fits(2 * k.ndiag + 1) {
                return fail("sizes overflow i32");
            }
            out.ld = out.ld.max(m);
            out.ncol = out.ncol.max(k.nstep);
            out.nd2 = out.nd2.max(2 * k.ndiag + 1);
            let cov_end = k.cov_off + (k.n - 1) * k.cov_ld + k.n;
            out.cov_need = out.cov_need.max(cov_end);
            out.x_need = out.x_need.max(k.x_off + k.n);
            for v in [
                k.n, k.cov_ld, k.row_lo, k.row_hi, k.wavepad, k.nstep, k.nkeep, k.ndiag,
            ] {
                out.params.push(launch::int(v, "a block's size")?);
            }
            let off = |v: usize| i64::try_from(v).map_err(|_| bad(format!("block {b}: offset")));
            out.offs.push(off(k.cov_off)?);
            out.offs.push(off(k.x_off)?);
            let basis_off = *basis_at.entry(k.n).or_insert_with(|| {
                let at = out.basis.len();
                out.basis.extend(dct_basis(k.n));
                at
            });
            out.offs.push(off(basis_off)?);
        }
        // The output arrays are indexed with 64-bit products in the kernel; the per-block
        // extents (ncol, nd2·ncol) are ints.
        if out.ncol == 0 || !fits(out.nd2 * out.ncol) || !fits(out.nblock) {
            return Err(bad(format!(
                "{} blocks of {} columns × {} diagonals",
                out.nblock, out.ncol, out.nd2
            )));
        }
        Ok(out)
    }

    /// For the eigen route: the side `l` of the covariance slots and how many slots the
    /// blocks reach, when every block's `cov_ld` is `l` and its `cov_off` a whole number of
    /// `l × l` slots (the solve's layout, which `decorrelate_eigen` indexes eigenvalues by).
    pub fn slots(&self) -> Result<(usize, usize), GpuError> {
        // params[NPARAM·b + 1] is block b's cov_ld, offs[3b] its cov_off (`new`).
        let cov_ld = |b: usize| self.params[NPARAM * b + 1] as usize;
        // Offsets were made from usizes (`new`): they convert back.
        let cov_off = |b: usize| usize::try_from(self.offs[3 * b]).unwrap_or(usize::MAX);
        let l = cov_ld(0);
        let mut need = 0;
        for b in 0..self.nblock {
            let (ld, off) = (cov_ld(b), cov_off(b));
            if ld != l || !off.is_multiple_of(l * l) {
                return Err(bad(format!(
                    "block {b} is not a {l} × {l} slot (offset {off}, leading dimension {ld})"
                )));
            }
            need = need.max(off / (l * l) + 1);
        }
        Ok((l, need))
    }

    /// Dynamic shared memory of a launch.
    pub fn smem_bytes(&self) -> usize {
        smem_bytes(self.ld)
    }
}
