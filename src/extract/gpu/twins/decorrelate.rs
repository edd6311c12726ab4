//! Host twin of kernels/decorrelate.cu: the per-block Jacobi and readout of `decorrelate`,
//! and the readout of `decorrelate_eigen` from eigenpairs computed elsewhere, with the kernels'
//! per-thread algorithm and roundings, tested against the CPU path's own decorrelation
//! (compiled a second time below as `cpu_decorrelate`). Test-only; re-exports the product's
//! `decorrelate`.

use rayon::prelude::*;

pub(super) use super::super::decorrelate::*;
use super::super::device::Gpu;
use super::super::GpuError;
use super::solve::Solver;
use crate::patch::Patch;

/// `JACOBI_TOL` of the kernel: a pair is rotated while `|a_pq| > TOL·√|a_pp|·√|a_qq|`.
const JACOBI_TOL: f64 = 1e-15;

/// `JACOBI_TAU_BIG` of the kernel: beyond it `τ²` could overflow and `t = 1/(2|τ|)` is used.
const JACOBI_TAU_BIG: f64 = 1e150;

/// One block's parameters as the kernel reads them back from the flattened arrays.
#[derive(Debug, Clone, Copy)]
struct Params {
    n: usize,
    cov_ld: usize,
    row_lo: usize,
    row_hi: usize,
    wavepad: usize,
    nstep: usize,
    nkeep: usize,
    ndiag: usize,
    cov_off: usize,
    x_off: usize,
    basis_off: usize,
}

impl DecorrLayout {
    fn block(&self, b: usize) -> Params {
        let p = &self.params[NPARAM * b..NPARAM * (b + 1)];
        Params {
            n: p[0] as usize,
            cov_ld: p[1] as usize,
            row_lo: p[2] as usize,
            row_hi: p[3] as usize,
            wavepad: p[4] as usize,
            nstep: p[5] as usize,
            nkeep: p[6] as usize,
            ndiag: p[7] as usize,
            cov_off: self.offs[3 * b] as usize,
            x_off: self.offs[3 * b + 1] as usize,
            basis_off: self.offs[3 * b + 2] as usize,
        }
    }
}

/// Whether `a_pq` still has to be rotated away (`off_is_large` of the kernel).
fn off_is_large(apq: f64, app: f64, aqq: f64) -> bool {
    let scale = JACOBI_TOL * (app.abs().sqrt() * aqq.abs().sqrt());
    !(apq.abs() <= scale)
}

/// `jacobi_tan` of the kernel: tan θ of the rotation zeroing `a_pq`.
fn jacobi_tan(app: f64, aqq: f64, apq: f64) -> f64 {
    let tau = (aqq - app) / (2.0 * apq);
    let at = tau.abs();
    let t = if at > JACOBI_TAU_BIG {
        0.5 / at
    } else {
        1.0 / (at + tau.mul_add(tau, 1.0).sqrt())
    };
    if tau < 0.0 {
        -t
    } else {
        t
    }
}

/// `round_pair` of the kernel: pair `k` of round `r` of the round-robin ordering of `m` (even).
fn round_pair(r: usize, k: usize, m: usize) -> (usize, usize) {
    let (a, b) = if k == 0 {
        (m - 1, r)
    } else {
        ((r + k) % (m - 1), (r + (m - 1) - k) % (m - 1))
    };
    (a.min(b), a.max(b))
}

/// One block's outputs, as the kernel writes them.
struct BlockOut {
    flux: Vec<f64>,
    fluxivar: Vec<f64>,
    resolution: Vec<f64>,
    status: Status,
    sweeps: usize,
}

impl BlockOut {
    /// A failed block's outputs: NaN, as the kernels' `fill_failed` writes them.
    fn failed(ncol: usize, nd2: usize, status: Status, sweeps: usize) -> BlockOut {
        BlockOut {
            flux: vec![f64::NAN; ncol],
            fluxivar: vec![f64::NAN; ncol],
            resolution: vec![f64::NAN; nd2 * ncol],
            status,
            sweeps,
        }
    }
}

/// Host twin of the kernel: every block run through the kernel's algorithm (blocks in
/// parallel on the rayon pool; each block's arithmetic is sequential and fixed, as the
/// kernel's per-thread work is). Panics if `cov` or `x` is shorter than the layout needs.
pub fn twin(layout: &DecorrLayout, cov: &[f64], x: &[f64], max_sweeps: u32) -> HostDecorr {
    assert!(
        cov.len() >= layout.cov_need && x.len() >= layout.x_need,
        "covariance ({}) or solution ({}) shorter than the layout needs ({}, {})",
        cov.len(),
        x.len(),
        layout.cov_need,
        layout.x_need
    );
    let outs: Vec<BlockOut> = (0..layout.nblock)
        .into_par_iter()
        .map(|b| twin_block(layout, b, cov, x, max_sweeps as usize))
        .collect();
    collect_outs(layout, outs)
}

/// The blocks' outputs concatenated as the kernels write them.
fn collect_outs(layout: &DecorrLayout, outs: Vec<BlockOut>) -> HostDecorr {
    let mut res = HostDecorr {
        nblock: layout.nblock,
        ncol: layout.ncol,
        nd2: layout.nd2,
        flux: Vec::with_capacity(layout.nblock * layout.ncol),
        fluxivar: Vec::with_capacity(layout.nblock * layout.ncol),
        resolution: Vec::with_capacity(layout.nblock * layout.nd2 * layout.ncol),
        status: Vec::with_capacity(layout.nblock),
        sweeps: Vec::with_capacity(layout.nblock),
    };
    for o in outs {
        res.flux.extend(o.flux);
        res.fluxivar.extend(o.fluxivar);
        res.resolution.extend(o.resolution);
        res.status.push(o.status.code());
        res.sweeps.push(o.sweeps as i32);
    }
    res
}

/// Block `b` of the kernel. The kernel's parallel loops become sequential loops here; each of
/// them is made of independent tasks (disjoint entries read and written), so their order does
/// not change a bit of the result.
fn twin_block(l: &DecorrLayout, b: usize, cov: &[f64], x: &[f64], max_sweeps: usize) -> BlockOut {
    let k = l.block(b);
    let (ncol, nd2) = (l.ncol, l.nd2);
    let n = k.n;
    let m = n + (n & 1);
    let h = m / 2;
    let failed = |status: Status, sweeps: usize| BlockOut::failed(ncol, nd2, status, sweeps);

    // Load: the lower triangle, mirrored; padding row/column of the identity.
    let c = &cov[k.cov_off..];
    let mut a = vec![0.0f64; m * m];
    let mut bad = false;
    for (e, ae) in a.iter_mut().enumerate() {
        let (i, j) = (e % m, e / m);
        *ae = if i < n && j < n {
            let val = if i >= j {
                c[j * k.cov_ld + i]
            } else {
                c[i * k.cov_ld + j]
            };
            bad |= !val.is_finite();
            val
        } else if i == j {
            1.0
        } else {
            0.0
        };
    }
    if bad {
        return failed(Status::NonfiniteInput, 0);
    }

    // A ← ŨᵀAŨ, V ← Ũ: T = AŨ in V's storage, then the lower triangle of ŨᵀT, mirrored.
    let u = &l.basis[k.basis_off..k.basis_off + n * n];
    let mut v = vec![0.0f64; m * m];
    for (e, ve) in v.iter_mut().enumerate() {
        let (i, j) = (e % m, e / m);
        *ve = if i < n && j < n {
            (0..n).fold(0.0, |acc, t| a[t * m + i].mul_add(u[j * n + t], acc))
        } else if i == j {
            1.0
        } else {
            0.0
        };
    }
    for e in 0..m * m {
        let (i, j) = (e % m, e / m);
        if i < j {
            continue;
        }
        let val = if i < n && j < n {
            (0..n).fold(0.0, |acc, t| u[i * n + t].mul_add(v[j * m + t], acc))
        } else if i == j {
            1.0
        } else {
            0.0
        };
        a[j * m + i] = val;
        a[i * m + j] = val;
    }
    for (e, ve) in v.iter_mut().enumerate() {
        let (i, j) = (e % m, e / m);
        *ve = if i < n && j < n {
            u[j * n + i]
        } else if i == j {
            1.0
        } else {
            0.0
        };
    }

    let (mut rc, mut rs, mut rt) = (vec![0.0; h], vec![0.0; h], vec![0.0; h]);
    let (mut rp, mut rq) = (vec![0usize; h], vec![0usize; h]);
    let mut sweep = 0;
    let converged = loop {
        let large = (0..m * m).any(|e| {
            let (i, j) = (e % m, e / m);
            i < j && off_is_large(a[e], a[i * m + i], a[j * m + j])
        });
        if !large {
            break true;
        }
        if sweep == max_sweeps {
            break false;
        }
        sweep += 1;
        for r in 0..m - 1 {
            // Phase 1 (threads k < h).
            for t in 0..h {
                let (p, q) = round_pair(r, t, m);
                let (app, aqq, apq) = (a[p * m + p], a[q * m + q], a[q * m + p]);
                let tan = if off_is_large(apq, app, aqq) {
                    jacobi_tan(app, aqq, apq)
                } else {
                    0.0
                };
                let cs = 1.0 / tan.mul_add(tan, 1.0).sqrt();
                rc[t] = cs;
                rs[t] = tan * cs;
                rt[t] = tan;
                rp[t] = p;
                rq[t] = q;
            }
            if rt.iter().all(|&t| t == 0.0) {
                continue;
            }
            // Phase 2a: the 2×2 blocks of A.
            for e in 0..h * h {
                let (k1, k2) = (e % h, e / h);
                if k1 > k2 || (rt[k1] == 0.0 && rt[k2] == 0.0) {
                    continue;
                }
                let (p, q) = (rp[k1], rq[k1]);
                if k1 == k2 {
                    let t1 = rt[k1];
                    let apq = a[q * m + p];
                    a[p * m + p] = (-t1).mul_add(apq, a[p * m + p]);
                    a[q * m + q] = t1.mul_add(apq, a[q * m + q]);
                    a[q * m + p] = 0.0;
                    a[p * m + q] = 0.0;
                    continue;
                }
                let (p2, q2) = (rp[k2], rq[k2]);
                let (c1, s1, c2, s2) = (rc[k1], rs[k1], rc[k2], rs[k2]);
                let (va, vb, vd, ve) = (a[p2 * m + p], a[q2 * m + p], a[p2 * m + q], a[q2 * m + q]);
                let mp0 = c2.mul_add(va, -(s2 * vb));
                let mp1 = s2.mul_add(va, c2 * vb);
                let mq0 = c2.mul_add(vd, -(s2 * ve));
                let mq1 = s2.mul_add(vd, c2 * ve);
                let bp0 = c1.mul_add(mp0, -(s1 * mq0));
                let bp1 = c1.mul_add(mp1, -(s1 * mq1));
                let bq0 = s1.mul_add(mp0, c1 * mq0);
                let bq1 = s1.mul_add(mp1, c1 * mq1);
                a[p2 * m + p] = bp0;
                a[p * m + p2] = bp0;
                a[q2 * m + p] = bp1;
                a[p * m + q2] = bp1;
                a[p2 * m + q] = bq0;
                a[q * m + p2] = bq0;
                a[q2 * m + q] = bq1;
                a[q * m + q2] = bq1;
            }
            // Phase 2b: V's columns.
            for e in 0..m * h {
                let (i, t) = (e % m, e / m);
                if rt[t] == 0.0 {
                    continue;
                }
                let (cs, sn) = (rc[t], rs[t]);
                let (ip, iq) = (rp[t] * m + i, rq[t] * m + i);
                let (x0, x1) = (v[ip], v[iq]);
                v[ip] = cs.mul_add(x0, -(sn * x1));
                v[iq] = sn.mul_add(x0, cs * x1);
            }
        }
    };
    if !converged {
        return failed(Status::NotConverged, sweep);
    }

    twin_readout(&k, ncol, nd2, m, &mut a, &mut v, x, sweep)
}

/// The readout both kernels share (`readout` in the kernel file): λ_k in `a[k·m + k]`, the
/// eigenvectors in the first `n` columns of `v` (leading dimension `m`).
#[allow(clippy::too_many_arguments)]
fn twin_readout(
    k: &Params,
    ncol: usize,
    nd2: usize,
    m: usize,
    a: &mut [f64],
    v: &mut [f64],
    x: &[f64],
    sweep: usize,
) -> BlockOut {
    let n = k.n;
    let nrow = k.row_hi - k.row_lo;
    let failed = |status: Status, sweeps: usize| BlockOut::failed(ncol, nd2, status, sweeps);
    let mut aux = vec![0.0f64; m];
    let mut bad = false;
    for t in 0..n {
        let lam = a[t * m + t];
        bad |= !(lam > 0.0) || !lam.is_finite();
        aux[t] = 1.0 / lam.sqrt().sqrt();
    }
    if bad {
        return failed(Status::BadEigenvalue, sweep);
    }
    for e in 0..n * n {
        let (i, t) = (e % n, e / n);
        v[t * m + i] *= aux[t];
    }
    // Q rows into A's storage, row-major [ri][j].
    for (e, ae) in a[..nrow * n].iter_mut().enumerate() {
        let (ri, j) = (e / n, e % n);
        let r = k.row_lo + ri;
        let mut acc = 0.0f64;
        for t in 0..n {
            acc = v[t * m + r].mul_add(v[t * m + j], acc);
        }
        *ae = acc;
    }
    for ri in 0..nrow {
        let mut s = 0.0f64;
        for j in 0..n {
            s += a[ri * n + j];
        }
        aux[ri] = s;
    }
    for e in 0..nrow * n {
        a[e] /= aux[e / n];
    }

    let xf = &x[k.x_off..k.x_off + n];
    let mut out = BlockOut {
        flux: vec![0.0; ncol],
        fluxivar: vec![0.0; ncol],
        resolution: vec![0.0; nd2 * ncol],
        status: Status::Ok,
        sweeps: sweep,
    };
    let mut bad = false;
    for j in 0..k.nstep {
        let ri = k.wavepad + j - k.row_lo;
        let row = &a[ri * n..ri * n + n];
        let mut f = 0.0f64;
        for (rw, xw) in row.iter().zip(xf) {
            f = rw.mul_add(*xw, f);
        }
        let fi = aux[ri] * aux[ri];
        if j < k.nkeep {
            bad |= !f.is_finite() || !fi.is_finite();
        }
        out.flux[j] = f;
        out.fluxivar[j] = fi;
    }
    for d in 0..=2 * k.ndiag {
        for j in 0..k.nkeep {
            let rr = k.wavepad + j + d - k.ndiag - k.row_lo;
            out.resolution[d * ncol + j] = a[rr * n + k.wavepad + j];
        }
    }
    if bad {
        out.status = Status::NonfiniteOutput;
    }
    out
}

/// Host twin of `decorrelate_eigen`: the readout from eigenpairs computed elsewhere (`evec`
/// and `eval` in the layout of [`Solver::eigen_in_place`](super::solve::Solver::eigen_in_place)
/// over slots of `cov_ld × cov_ld` at the blocks' covariance offsets, `einfo` per slot).
pub fn twin_eigen(
    layout: &DecorrLayout,
    evec: &[f64],
    eval: &[f64],
    einfo: &[i32],
    x: &[f64],
) -> HostDecorr {
    let outs: Vec<BlockOut> = (0..layout.nblock)
        .into_par_iter()
        .map(|b| {
            let k = layout.block(b);
            let (n, l) = (k.n, k.cov_ld);
            let m = n + (n & 1);
            let slot = k.cov_off / (l * l);
            if einfo[slot] != 0 {
                return BlockOut::failed(layout.ncol, layout.nd2, Status::NotConverged, 0);
            }
            let k0 = l - n;
            let stray = |t: usize| {
                let vk = &evec[k.cov_off + (k0 + t) * l..k.cov_off + (k0 + t + 1) * l];
                let pad = vk[n..].iter().fold(0.0f64, |acc, v| v.mul_add(*v, acc));
                !(pad < 0.5)
            };
            if k0 > 0 && (0..n).any(stray) {
                return BlockOut::failed(layout.ncol, layout.nd2, Status::BadEigenvalue, 0);
            }
            let (mut a, mut v) = (vec![0.0f64; m * m], vec![0.0f64; m * m]);
            for t in 0..n {
                for i in 0..n {
                    v[t * m + i] = evec[k.cov_off + (k0 + t) * l + i];
                }
                a[t * m + t] = eval[slot * l + k0 + t];
            }
            twin_readout(&k, layout.ncol, layout.nd2, m, &mut a, &mut v, x, 0)
        })
        .collect();
    collect_outs(layout, outs)
}

/// Uploads `cov` and `x`, decorrelates and downloads (tests, diagnostics and small batches).
pub fn decorrelate_host(
    gpu: &Gpu,
    kernels: &Kernels,
    layout: &DecorrLayout,
    cov: &[f64],
    x: &[f64],
    max_sweeps: u32,
) -> Result<HostDecorr, GpuError> {
    let st = &gpu.stream;
    let cov_d = st.clone_htod(cov).map_err(cuda("uploading covariances"))?;
    let x_d = st.clone_htod(x).map_err(cuda("uploading solutions"))?;
    decorrelate(gpu, kernels, layout, &cov_d, &x_d, max_sweeps)?.download(gpu)
}

/// The CPU path's decorrelation, compiled a second time for the tests (`cpu::decorrelate` is
/// private to the CPU backend): its exact code, with `super::lapack` and `super::simd`
/// resolved to the two modules below.
#[path = "../../cpu/decorrelate.rs"]
#[allow(clippy::duplicate_mod)] // on purpose: the reference must be the CPU's own code
mod cpu_decorrelate;

/// The CPU path's normal equations (for the systems `cpu_decorrelate` solves).
use crate::extract::cpu::normal as cpu_normal;

/// `cpu_decorrelate`'s `super::simd`: the CPU's own file.
#[path = "../../cpu/simd.rs"]
#[allow(clippy::duplicate_mod)]
mod simd;

/// `cpu_decorrelate`'s `super::lapack`: the CPU's routines, with `syevd` also recording each
/// matrix it is handed. Those matrices are the covariance blocks `C_ff` exactly as the CPU
/// computes them (its selected inversion keeps them in a private field, and dsyevd overwrites
/// them with eigenvectors), so the tests feed the kernel's twin the CPU's very inputs.
mod lapack {
    use std::cell::RefCell;

    pub use crate::extract::cpu::lapack::{pbtrs_lower, SyevdWork};

    thread_local! {
        /// The matrices `syevd` was called on by this thread, concatenated.
        pub static SEEN: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    }

    pub fn syevd(n: usize, a: &mut [f64], w: &mut [f64], work: &mut SyevdWork) -> i32 {
        SEEN.with(|s| s.borrow_mut().extend_from_slice(&a[..n * n]));
        crate::extract::cpu::lapack::syevd(n, a, w, work)
    }
}

mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::extract::cpu::lapack::{single_threaded_blas, syevd, SyevdWork};
    use crate::extract::gpu::device;
    use crate::extract::gpu::twins::scene::{Bundle, Recipe, Scene};
    use crate::extract::{ExtractOptions, PatchInput};

    use crate::extract::DIAG_EPSILON;

    /// Bundle 0 at the real size ([`Bundle::real_size`]) with random pixels (~3 % of them and
    /// every 41st row masked: unevenly constrained bins make the covariance blocks less
    /// benign), the options to extract it with, and which PSF it is on. Every patch of the
    /// bundle with `all_patches`, else five: the first, a middle and the last (short: nkeep <
    /// nstep) of the first subbundle, a middle one of the second, the very last.
    fn bundle_scene(all_patches: bool, seed: u64) -> (Scene, ExtractOptions, &'static str) {
        let mut bundle = Bundle::real_size();
        if !all_patches {
            let all = &bundle.patches;
            let last0 = all
                .iter()
                .position(|p| p.nwave_keep < bundle.popts.nwavestep)
                .expect("the grid does not end on a patch boundary");
            let picks = [0, last0 / 2, last0, last0 + 1 + last0 / 2, all.len() - 1];
            bundle.patches = picks.iter().map(|&k| all[k]).collect();
        }
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag: bundle.psf.hsizey,
            model_image: None,
            leverage: false,
        };
        let what = bundle.what;
        (bundle.into_scene(seed, Recipe::default()), opts, what)
    }

    /// The CPU path on one patch: its covariance blocks and solution (the kernel's inputs) and
    /// its decorrelated outputs, read out as `cpu::solve` does.
    struct CpuRef {
        patch: Patch,
        /// Fiber-major solution of the patch.
        x: Vec<f64>,
        /// `C_ff` of each core fiber, `[c][nwt²]` (exactly symmetric).
        blocks: Vec<f64>,
        /// Flux of every core bin, `[c][nstep]`.
        flux: Vec<f64>,
        /// `s²`, `[c][nstep]`.
        fluxivar: Vec<f64>,
        /// `Rdiag`, `[c][2·ndiag + 1][nkeep]`.
        res: Vec<f64>,
    }

    /// Runs the CPU's own normal equations and decorrelation (with the `lapack` spy recording
    /// C_ff), reads the results out like `cpu::solve`, and checks that readout bit for bit
    /// against `cpu::extract_patch`, so that what the GPU side is compared with is the CPU
    /// backend's output.
    fn cpu_reference(inp: &PatchInput<'_>, opts: &ExtractOptions) -> CpuRef {
        single_threaded_blas();
        let p = inp.patch;
        let mut geom = Vec::new();
        cpu_normal::geometry(inp, &mut geom);
        let n = geom.len();
        let nps = inp.spots.ny * inp.spots.nx;
        let (mut pairs, mut rhs, mut fw) = (Vec::new(), vec![0.0; n], vec![0.0; n]);
        let mut wspot = vec![0.0; n * nps];
        let kd = cpu_normal::build(
            inp,
            &geom,
            &mut cpu_normal::Normal {
                pairs: &mut pairs,
                rhs: &mut rhs,
                fluxweight: &mut fw,
                wspot: &mut wspot,
            },
        );
        let mut diag = Vec::new();
        cpu_normal::regularization(&fw, opts.regularize, DIAG_EPSILON, &mut diag);
        let (nwt, ndiag, nkeep, ncore) = (p.nwavetot, opts.ndiag, p.nwave_keep, p.nspec);
        let nstep = nwt - 2 * p.wavepad;
        let layout = cpu_decorrelate::Layout {
            nspecpad: p.nspecpad,
            nwavetot: nwt,
            core_fiber: p.core_fiber_offset(),
            ncore,
            row_lo: p.wavepad.saturating_sub(ndiag),
            row_hi: (p.wavepad + nstep + ndiag).min(nwt),
        };
        let system = cpu_decorrelate::BandSystem {
            pairs: &pairs,
            diag: &diag,
            rhs: &rhs,
            kd,
        };
        lapack::SEEN.with(|s| s.borrow_mut().clear());
        let (mut r, mut s) = (Vec::new(), Vec::new());
        let mut work = cpu_decorrelate::DecorrWork::default();
        let x = work
            .run(layout, &system, &mut r, &mut s)
            .expect("the CPU decorrelates the patch")
            .to_vec();
        let blocks = lapack::SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()));
        assert_eq!(blocks.len(), ncore * nwt * nwt);
        let nrow = layout.row_hi - layout.row_lo;
        let nd2 = 2 * ndiag + 1;
        let mut out = CpuRef {
            patch: p,
            x,
            blocks,
            flux: vec![0.0; ncore * nstep],
            fluxivar: vec![0.0; ncore * nstep],
            res: vec![0.0; ncore * nd2 * nkeep],
        };
        // cpu::solve's readout, line for line.
        for c in 0..ncore {
            let f = layout.core_fiber + c;
            let xf = &out.x[f * nwt..(f + 1) * nwt];
            for j in 0..nstep {
                let ri = p.wavepad + j - layout.row_lo;
                let row = &r[(c * nrow + ri) * nwt..(c * nrow + ri + 1) * nwt];
                out.flux[c * nstep + j] = row.iter().zip(xf).map(|(a, b)| a * b).sum();
                let sv = s[c * nrow + ri];
                out.fluxivar[c * nstep + j] = sv * sv;
                if j < nkeep {
                    for k in 0..nd2 {
                        let rr = p.wavepad + j + k - ndiag - layout.row_lo;
                        out.res[(c * nd2 + k) * nkeep + j] =
                            r[(c * nrow + rr) * nwt + p.wavepad + j];
                    }
                }
            }
        }
        let cpu = crate::extract::cpu::extract_patch(
            inp,
            opts,
            &mut crate::extract::cpu::Workspace::default(),
        );
        assert!(!cpu.info.retried && !cpu.info.failed, "{:?}", cpu.info);
        for c in 0..ncore {
            for j in 0..nkeep {
                assert_eq!(
                    cpu.flux[[c, j]].to_bits(),
                    out.flux[c * nstep + j].to_bits()
                );
                assert_eq!(
                    cpu.fluxivar[[c, j]].to_bits(),
                    out.fluxivar[c * nstep + j].to_bits()
                );
                for k in 0..nd2 {
                    assert_eq!(
                        cpu.resolution[[c, k, j]].to_bits(),
                        out.res[(c * nd2 + k) * nkeep + j].to_bits()
                    );
                }
            }
        }
        out
    }

    /// The kernel's inputs for `refs`: the blocks concatenated (leading dimension nwt), the
    /// solutions concatenated, one [`Block`] per (patch, core fiber).
    fn flatten(refs: &[CpuRef], ndiag: usize) -> (Vec<Block>, Vec<f64>, Vec<f64>) {
        let (mut blocks, mut cov, mut x) = (Vec::new(), Vec::new(), Vec::new());
        for r in refs {
            let nwt = r.patch.nwavetot;
            let x_patch = x.len();
            x.extend_from_slice(&r.x);
            for c in 0..r.patch.nspec {
                let cov_off = cov.len();
                cov.extend_from_slice(&r.blocks[c * nwt * nwt..(c + 1) * nwt * nwt]);
                blocks.push(Block::for_patch(&r.patch, ndiag, c, cov_off, nwt, x_patch));
            }
        }
        (blocks, cov, x)
    }

    /// The solve's layout of the same inputs, for the eigen route: one `l × l` slot per core
    /// fiber (`l` the largest nwavetot plus `pad`), `C_ff` in its top-left corner, zeros
    /// elsewhere; returns the blocks, the slots, the solutions and `l`.
    fn flatten_slots(
        refs: &[CpuRef],
        ndiag: usize,
        pad: usize,
    ) -> (Vec<Block>, Vec<f64>, Vec<f64>, usize) {
        let l = refs.iter().map(|r| r.patch.nwavetot).max().unwrap() + pad;
        let (mut blocks, mut slots, mut x) = (Vec::new(), Vec::new(), Vec::new());
        for r in refs {
            let nwt = r.patch.nwavetot;
            let x_patch = x.len();
            x.extend_from_slice(&r.x);
            for c in 0..r.patch.nspec {
                let off = slots.len();
                slots.resize(off + l * l, 0.0);
                for j in 0..nwt {
                    for i in 0..nwt {
                        slots[off + j * l + i] = r.blocks[c * nwt * nwt + j * nwt + i];
                    }
                }
                blocks.push(Block::for_patch(&r.patch, ndiag, c, off, l, x_patch));
            }
        }
        (blocks, slots, x, l)
    }

    /// What `Solver::eigen_in_place` makes of the slots, by LAPACK's dsyevd: the eigenvectors
    /// over the slots, the eigenvalues ascending, an info per slot.
    fn host_eigen(slots: &mut [f64], l: usize) -> (Vec<f64>, Vec<i32>) {
        let mut eval = vec![0.0; slots.len() / l];
        let mut work = SyevdWork::default();
        let info = slots
            .chunks_mut(l * l)
            .zip(eval.chunks_mut(l))
            .map(|(a, w)| syevd(l, a, w, &mut work))
            .collect();
        (eval, info)
    }

    fn max_abs(v: impl IntoIterator<Item = f64>) -> f64 {
        v.into_iter().fold(0.0f64, |m, x| m.max(x.abs()))
    }

    /// Compares `got` with the CPU block by block; returns the largest differences of flux
    /// (relative to the block's largest |flux|), fluxivar (elementwise relative) and
    /// resolution (relative to the block's largest |Rdiag|). Asserts what must hold exactly:
    /// status Ok and the padding of every row written 0.
    fn compare_with_cpu(got: &HostDecorr, refs: &[CpuRef], ndiag: usize) -> [f64; 3] {
        let nd2 = 2 * ndiag + 1;
        let mut worst = [0.0f64; 3];
        let mut b = 0;
        for r in refs {
            let p = r.patch;
            let (nstep, nkeep) = (p.nwavetot - 2 * p.wavepad, p.nwave_keep);
            for c in 0..p.nspec {
                assert_eq!(got.status(b), Some(Status::Ok), "block {b}");
                let cf = &r.flux[c * nstep..(c + 1) * nstep];
                let ci = &r.fluxivar[c * nstep..(c + 1) * nstep];
                let cr = &r.res[c * nd2 * nkeep..(c + 1) * nd2 * nkeep];
                let fscale = max_abs(cf.iter().copied());
                let rscale = max_abs(cr.iter().copied());
                for j in 0..got.ncol {
                    let (f, fi) = (got.flux(b, j), got.fluxivar(b, j));
                    if j < nstep {
                        worst[0] = worst[0].max((f - cf[j]).abs() / fscale);
                        worst[1] = worst[1].max((fi - ci[j]).abs() / ci[j]);
                    } else {
                        assert_eq!((f, fi), (0.0, 0.0), "block {b} bin {j}");
                    }
                    for k in 0..got.nd2 {
                        let g = got.resolution(b, k, j);
                        if k < nd2 && j < nkeep {
                            worst[2] = worst[2].max((g - cr[k * nkeep + j]).abs() / rscale);
                        } else {
                            assert_eq!(g, 0.0, "block {b} diagonal {k} bin {j}");
                        }
                    }
                }
                b += 1;
            }
        }
        assert_eq!(b, got.nblock);
        // NaN differences would have been dropped by f64::max.
        assert!(worst.iter().all(|w| w.is_finite()), "{worst:?}");
        assert!(got
            .flux
            .iter()
            .chain(&got.fluxivar)
            .chain(&got.resolution)
            .all(|v| v.is_finite()));
        worst
    }

    fn sweep_summary(got: &HostDecorr) -> (i32, i32, f64) {
        let (lo, hi) = (
            got.sweeps.iter().min().unwrap(),
            got.sweeps.iter().max().unwrap(),
        );
        let mean = got.sweeps.iter().map(|&s| s as f64).sum::<f64>() / got.nblock as f64;
        (*lo, *hi, mean)
    }

    #[test]
    fn twin_matches_the_cpu_decorrelation() {
        let (scene, opts, what) = bundle_scene(false, 11);
        let inputs = scene.inputs();
        let ndiag = opts.ndiag;
        let refs: Vec<CpuRef> = inputs.iter().map(|i| cpu_reference(i, &opts)).collect();
        assert!(refs
            .iter()
            .any(|r| r.patch.nwave_keep < r.patch.nwavetot - 2 * r.patch.wavepad));
        let (blocks, cov, x) = flatten(&refs, ndiag);
        let layout = DecorrLayout::new(&blocks).unwrap();
        assert_eq!(layout.ld, 74);
        let got = twin(&layout, &cov, &x, MAX_SWEEPS);
        let worst = compare_with_cpu(&got, &refs, ndiag);
        let (lo, hi, mean) = sweep_summary(&got);
        eprintln!(
            "twin vs CPU, {} ({} blocks of {}², ndiag {ndiag}): flux {:.1e}, fluxivar {:.1e}, \
             resolution {:.1e}; Jacobi sweeps {lo}..={hi} (mean {mean:.2})",
            what, layout.nblock, layout.ld, worst[0], worst[1], worst[2]
        );
        assert!(worst.iter().all(|&w| w <= 1e-10), "{worst:?}");
        assert!(hi < MAX_SWEEPS as i32);
    }

    /// The eigen route's readout (`twin_eigen`) from LAPACK's eigenpairs of the solve's slots,
    /// against the CPU backend: with slots of the blocks' own size and with three more rows of
    /// padding (as a patch with fewer bins than its batch's largest gets); a block made
    /// indefinite in a padded slot is caught, and a slot whose syev failed is reported as such.
    #[test]
    fn twin_eigen_matches_the_cpu_decorrelation() {
        let (scene, opts, what) = bundle_scene(false, 11);
        let inputs = scene.inputs();
        let ndiag = opts.ndiag;
        let refs: Vec<CpuRef> = inputs.iter().map(|i| cpu_reference(i, &opts)).collect();
        for pad in [0, 3] {
            let (blocks, mut slots, x, l) = flatten_slots(&refs, ndiag, pad);
            let layout = DecorrLayout::new(&blocks).unwrap();
            assert_eq!(layout.slots().unwrap(), (l, blocks.len()));
            let (eval, info) = host_eigen(&mut slots, l);
            let got = twin_eigen(&layout, &slots, &eval, &info, &x);
            let worst = compare_with_cpu(&got, &refs, ndiag);
            eprintln!(
                "twin_eigen (dsyevd) vs CPU, {what}, slots of {l}: flux {:.1e}, fluxivar \
                 {:.1e}, resolution {:.1e}",
                worst[0], worst[1], worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-10), "{worst:?}");
        }
        let (blocks, mut slots, x, l) = flatten_slots(&refs, ndiag, 3);
        slots[0] = -slots[0];
        let layout = DecorrLayout::new(&blocks).unwrap();
        let (eval, mut info) = host_eigen(&mut slots, l);
        info[1] = 5;
        let got = twin_eigen(&layout, &slots, &eval, &info, &x);
        assert_eq!(got.status(0), Some(Status::BadEigenvalue));
        assert_eq!(got.status(1), Some(Status::NotConverged));
        assert!(got.flux[..2 * got.ncol].iter().all(|v| v.is_nan()));
        assert!((2..got.nblock).all(|b| got.status(b) == Some(Status::Ok)));
    }

    /// A random symmetric positive-definite `n × n` matrix with eigenvalues spread
    /// log-uniformly over `[lo, hi]`, exactly symmetric, column-major.
    fn random_spd(n: usize, lo: f64, hi: f64, rng: &mut impl Rng) -> Vec<f64> {
        // Random orthogonal U: the eigenvectors of a random symmetric matrix.
        let mut u = vec![0.0; n * n];
        for j in 0..n {
            for i in j..n {
                let v: f64 = rng.gen_range(-1.0..1.0);
                u[j * n + i] = v;
                u[i * n + j] = v;
            }
        }
        let mut w = vec![0.0; n];
        assert_eq!(syevd(n, &mut u, &mut w, &mut SyevdWork::default()), 0);
        let lam: Vec<f64> = (0..n)
            .map(|_| lo * (hi / lo).powf(rng.gen::<f64>()))
            .collect();
        let mut c = vec![0.0; n * n];
        for j in 0..n {
            for i in j..n {
                let v: f64 = (0..n).map(|k| u[k * n + i] * lam[k] * u[k * n + j]).sum();
                c[j * n + i] = v;
                c[i * n + j] = v;
            }
        }
        c
    }

    /// A random covariance of neighbouring bins, shaped like the real blocks: `σ_i σ_j ρ^|i-j|`
    /// (an AR(1) covariance, positive definite, condition ~((1+ρ)/(1-ρ))²) with a smooth random
    /// `σ` (as the flux errors of neighbouring bins are), `ρ ∈ [0.5, 0.9]`, plus a small random
    /// symmetric perturbation. Its `Q` rows have positive sums with little cancellation, as the
    /// real ones do, so that `R = Q/s` is well conditioned; a generic SPD matrix's (or a
    /// bin-to-bin random σ's) row sums cancel by 10³ and more, which would measure that
    /// cancellation rather than the Jacobi.
    fn random_covariance(n: usize, rng: &mut impl Rng) -> Vec<f64> {
        let (amp, phase): (f64, f64) = (rng.gen_range(0.1..0.5), rng.gen_range(0.0..6.3));
        let sigma: Vec<f64> = (0..n)
            .map(|i| 1.0 + amp * (0.2 * i as f64 + phase).sin())
            .collect();
        let rho: f64 = rng.gen_range(0.5..0.9);
        let mut c = vec![0.0; n * n];
        for j in 0..n {
            for i in j..n {
                let noise = if i == j {
                    0.0
                } else {
                    rng.gen_range(-0.01..0.01)
                };
                let v = sigma[i] * sigma[j] * (rho.powi((i - j) as i32) + noise);
                c[j * n + i] = v;
                c[i * n + j] = v;
            }
        }
        let mut w = vec![0.0; n];
        let mut a = c.clone();
        assert_eq!(syevd(n, &mut a, &mut w, &mut SyevdWork::default()), 0);
        assert!(w[0] > 0.0, "not positive definite: {}", w[0]);
        c
    }

    /// The reference for one block: dsyevd and `Q = (VΛ^{-1/4})(VΛ^{-1/4})ᵀ` as
    /// `cpu::decorrelate::block_inverse_sqrt` computes it, then `cpu::solve`'s readout:
    /// `(flux[nstep], fluxivar[nstep], res[nd2][nkeep])`.
    fn lapack_reference(c: &[f64], x: &[f64], k: &Block) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let n = k.n;
        let mut a = c.to_vec();
        let mut w = vec![0.0; n];
        assert_eq!(syevd(n, &mut a, &mut w, &mut SyevdWork::default()), 0);
        let q = |r: usize, j: usize| -> f64 {
            (0..n)
                .map(|t| a[t * n + r] * a[t * n + j] * w[t].powf(-0.5))
                .sum()
        };
        let rows: Vec<Vec<f64>> = (0..n).map(|r| (0..n).map(|j| q(r, j)).collect()).collect();
        let s: Vec<f64> = rows.iter().map(|r| r.iter().sum()).collect();
        let rr = |r: usize, j: usize| rows[r][j] / s[r];
        let flux = (0..k.nstep)
            .map(|j| (0..n).map(|t| rr(k.wavepad + j, t) * x[t]).sum())
            .collect();
        let ivar = (0..k.nstep).map(|j| s[k.wavepad + j].powi(2)).collect();
        let nd2 = 2 * k.ndiag + 1;
        let mut res = vec![0.0; nd2 * k.nkeep];
        for d in 0..nd2 {
            for j in 0..k.nkeep {
                res[d * k.nkeep + j] = rr(k.wavepad + j + d - k.ndiag, k.wavepad + j);
            }
        }
        (flux, ivar, res)
    }

    /// Blocks of odd and even sizes (the odd ones take the padded path), with leading
    /// dimensions larger than their sizes, in one batch; flux and resolution against dsyevd.
    #[test]
    fn twin_matches_lapack_on_random_blocks_of_every_size() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let sizes = [1usize, 2, 3, 7, 20, 33, 74, 75];
        let (mut blocks, mut cov, mut x, mut mats) = (vec![], vec![], vec![], vec![]);
        for &n in &sizes {
            let c = random_covariance(n, &mut rng);
            let wavepad = n / 4;
            let ndiag = wavepad.min(2);
            let nstep = n - 2 * wavepad;
            let nkeep = nstep - usize::from(nstep > 1);
            let cov_ld = n + 3;
            let cov_off = cov.len() + 5;
            // Garbage around and above the diagonal: the kernel reads only the lower triangle.
            cov.resize(cov_off + n * cov_ld, f64::NAN);
            for j in 0..n {
                for i in j..n {
                    cov[cov_off + j * cov_ld + i] = c[j * n + i];
                }
            }
            let x_off = x.len() + 2;
            x.resize(x_off, f64::NAN);
            x.extend((0..n).map(|_| rng.gen_range(-50.0..500.0)));
            let k = Block {
                n,
                cov_off,
                cov_ld,
                x_off,
                row_lo: wavepad - ndiag,
                row_hi: (wavepad + nstep + ndiag).min(n),
                wavepad,
                nstep,
                nkeep,
                ndiag,
            };
            blocks.push(k);
            mats.push(c);
        }
        let layout = DecorrLayout::new(&blocks).unwrap();
        assert_eq!(layout.ld, 76);
        let got = twin(&layout, &cov, &x, MAX_SWEEPS);
        let mut worst = [0.0f64; 3];
        for (b, k) in blocks.iter().enumerate() {
            assert_eq!(got.status(b), Some(Status::Ok), "n = {}", k.n);
            let (flux, ivar, res) = lapack_reference(&mats[b], &x[k.x_off..k.x_off + k.n], k);
            let fscale = max_abs(flux.iter().copied());
            let rscale = max_abs(res.iter().copied());
            for j in 0..layout.ncol {
                if j < k.nstep {
                    worst[0] = worst[0].max((got.flux(b, j) - flux[j]).abs() / fscale);
                    worst[1] = worst[1].max((got.fluxivar(b, j) - ivar[j]).abs() / ivar[j]);
                } else {
                    assert_eq!((got.flux(b, j), got.fluxivar(b, j)), (0.0, 0.0));
                }
                for d in 0..layout.nd2 {
                    let g = got.resolution(b, d, j);
                    if d <= 2 * k.ndiag && j < k.nkeep {
                        worst[2] = worst[2].max((g - res[d * k.nkeep + j]).abs() / rscale);
                    } else {
                        assert_eq!(g, 0.0);
                    }
                }
            }
        }
        let (lo, hi, _) = sweep_summary(&got);
        eprintln!(
            "twin vs dsyevd, sizes {sizes:?}: flux {:.1e}, fluxivar {:.1e}, \
             resolution {:.1e}; sweeps {lo}..={hi}",
            worst[0], worst[1], worst[2]
        );
        assert!(worst.iter().all(|&w| w <= 1e-12), "{worst:?}");
        // A 1×1 block needs no rotation; every other one does.
        assert_eq!(got.sweeps[0], 0);
        assert!(got.sweeps[1..].iter().all(|&s| s > 0));
    }

    /// A batch exercising every status: a good block, a non-positive-definite one, one with a
    /// NaN in its lower triangle, its copy with NaNs only above the diagonal (not read), a
    /// diagonal one (R = I), and a good block whose x holds an infinity.
    fn failure_batch() -> (Vec<Block>, Vec<f64>, Vec<f64>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
        let n = 74;
        let good = random_spd(n, 0.1, 100.0, &mut rng);
        let mut not_pd = good.clone();
        not_pd[0] = -not_pd[0];
        let mut nan_lower = good.clone();
        nan_lower[3 * n + 40] = f64::NAN;
        let mut nan_upper = good.clone();
        for j in 0..n {
            for i in 0..j {
                nan_upper[j * n + i] = f64::NAN;
            }
        }
        let diag: Vec<f64> = (0..n * n)
            .map(|e| {
                if e % n == e / n {
                    1.0 + (e / n) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let mats = [&good, &not_pd, &nan_lower, &nan_upper, &diag, &good];
        let x_good: Vec<f64> = (0..n).map(|_| rng.gen_range(-50.0..500.0)).collect();
        let mut x_inf = x_good.clone();
        x_inf[30] = f64::INFINITY;
        let mut cov = Vec::new();
        let mut x = Vec::new();
        let mut blocks = Vec::new();
        for (b, c) in mats.iter().enumerate() {
            let (cov_off, x_off) = (cov.len(), x.len());
            cov.extend_from_slice(c);
            x.extend_from_slice(if b == 5 { &x_inf } else { &x_good });
            blocks.push(Block {
                n,
                cov_off,
                cov_ld: n,
                x_off,
                row_lo: 7,
                row_hi: 69,
                wavepad: 12,
                nstep: 50,
                nkeep: 50,
                ndiag: 5,
            });
        }
        (blocks, cov, x)
    }

    fn check_failure_batch(got: &HostDecorr, x: &[f64]) {
        use Status::*;
        let want = [Ok, BadEigenvalue, NonfiniteInput, Ok, Ok, NonfiniteOutput];
        for (b, w) in want.iter().enumerate() {
            assert_eq!(got.status(b), Some(*w), "block {b}");
        }
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let row = |v: &[f64], b: usize, len: usize| bits(&v[b * len..(b + 1) * len]);
        let (ncol, nres) = (got.ncol, got.nd2 * got.ncol);
        // Failed blocks are all NaN; the rest of the batch is untouched by them.
        for b in [1, 2] {
            assert!(got.flux[b * ncol..(b + 1) * ncol]
                .iter()
                .all(|v| v.is_nan()));
            assert!(got.fluxivar[b * ncol..(b + 1) * ncol]
                .iter()
                .all(|v| v.is_nan()));
            assert!(got.resolution[b * nres..(b + 1) * nres]
                .iter()
                .all(|v| v.is_nan()));
        }
        assert_eq!(got.sweeps[2], 0);
        // Only the lower triangle is read.
        assert_eq!(row(&got.flux, 0, ncol), row(&got.flux, 3, ncol));
        assert_eq!(row(&got.resolution, 0, nres), row(&got.resolution, 3, nres));
        assert_eq!(got.sweeps[0], got.sweeps[3]);
        // Diagonal: R = I, so flux = x and fluxivar = 1/λ, to the rounding of the Jacobi
        // (which the DCT starting basis makes work for its answer).
        let xmax = max_abs(x[4 * 74..5 * 74].iter().copied());
        for j in 0..50 {
            let w = 12 + j;
            assert!((got.flux(4, j) - x[4 * 74 + w]).abs() <= 1e-12 * xmax);
            let lam = 1.0 + w as f64;
            assert!((got.fluxivar(4, j) * lam - 1.0).abs() < 1e-12);
            for k in 0..11 {
                let want = if k == 5 { 1.0 } else { 0.0 };
                assert!((got.resolution(4, k, j) - want).abs() < 1e-12);
            }
        }
        // Non-finite output: the values are left as computed (here ±inf or NaN near bin 30).
        assert!(got.flux[5 * ncol..6 * ncol].iter().any(|v| !v.is_finite()));
        assert_eq!(row(&got.fluxivar, 5, ncol), row(&got.fluxivar, 0, ncol));
    }

    #[test]
    fn twin_reports_every_failure_as_the_cpu_would() {
        let (blocks, cov, x) = failure_batch();
        let layout = DecorrLayout::new(&blocks).unwrap();
        let got = twin(&layout, &cov, &x, MAX_SWEEPS);
        check_failure_batch(&got, &x);
        // The CPU's criterion on the non-positive-definite block: dsyevd finds a negative
        // eigenvalue, which block_inverse_sqrt turns into BadCovariance.
        let n = 74;
        let mut a = cov[n * n..2 * n * n].to_vec();
        let mut w = vec![0.0; n];
        assert_eq!(syevd(n, &mut a, &mut w, &mut SyevdWork::default()), 0);
        assert!(w[0] < 0.0, "{}", w[0]);
        // Too few sweeps: NotConverged, NaN outputs.
        for max in [0u32, 1] {
            let got = twin(&layout, &cov, &x, max);
            for b in [0, 3, 4] {
                assert_eq!(got.status(b), Some(Status::NotConverged));
                assert_eq!(got.sweeps[b], max as i32);
                assert!(got.flux[b * got.ncol..(b + 1) * got.ncol]
                    .iter()
                    .all(|v| v.is_nan()));
            }
        }
    }

    /// The starting basis is orthonormal to ~1e-15 (its error enters Q at that level).
    #[test]
    fn dct_basis_is_orthonormal() {
        for n in [1usize, 2, 3, 7, 33, 74, 75, 128] {
            let u = dct_basis(n);
            let mut worst = 0.0f64;
            for i in 0..n {
                for j in 0..n {
                    let g: f64 = (0..n).map(|k| u[i * n + k] * u[j * n + k]).sum();
                    worst = worst.max((g - if i == j { 1.0 } else { 0.0 }).abs());
                }
            }
            assert!(worst <= 2e-15, "n {n}: UᵀU - I up to {worst:e}");
        }
        assert_eq!(dct_basis(1), vec![1.0]);
    }

    /// Every pair of 0..m is visited exactly once per sweep, and each round's pairs are disjoint
    /// (what lets a round's rotations run in parallel, in place).
    #[test]
    fn round_robin_visits_every_pair_once_per_sweep() {
        for m in (2..=80).step_by(2) {
            let mut seen = vec![0u8; m * m];
            for r in 0..m - 1 {
                let mut used = vec![false; m];
                for k in 0..m / 2 {
                    let (p, q) = round_pair(r, k, m);
                    assert!(p < q && q < m, "m {m} round {r} pair {k}: ({p}, {q})");
                    assert!(!used[p] && !used[q], "m {m} round {r}: index reused");
                    used[p] = true;
                    used[q] = true;
                    seen[p * m + q] += 1;
                }
            }
            for p in 0..m {
                for q in p + 1..m {
                    assert_eq!(seen[p * m + q], 1, "m {m}: pair ({p}, {q})");
                }
            }
        }
    }

    /// The rotation zeroes a_pq (to rounding), including where τ² would overflow.
    #[test]
    fn the_rotation_annihilates_the_pair() {
        let cases = [
            (2.0, 1.0, 0.5),
            (1.0, 1.0, 0.3),
            (1.0, 5.0, -2.0),
            (1e6, 1e-3, 1e-2),
            (1.0, 1e-300, 1e-160),
            (3.0, -1e200, 1e-110),
        ];
        for (app, aqq, apq) in cases {
            let t = jacobi_tan(app, aqq, apq);
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            // (JᵀAJ)[p, q] = cs(a_pp - a_qq) + (c² - s²) a_pq.
            let bpq = c * s * (app - aqq) + (c * c - s * s) * apq;
            let scale = app.abs().max(aqq.abs()).max(apq.abs());
            assert!(
                bpq.abs() <= 4.0 * f64::EPSILON * scale,
                "{app} {aqq} {apq}: {bpq}"
            );
            assert!(t.abs() <= 1.0, "the inner rotation: |θ| ≤ π/4");
        }
        // The overflow branch was taken by the last case.
        assert!(((-1e200f64 - 3.0) / 2e-110).abs() > JACOBI_TAU_BIG);
    }

    #[test]
    fn layout_refuses_what_the_kernel_cannot_index() {
        assert!(DecorrLayout::new(&[])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let ok = Block {
            n: 74,
            cov_off: 0,
            cov_ld: 74,
            x_off: 0,
            row_lo: 7,
            row_hi: 69,
            wavepad: 12,
            nstep: 50,
            nkeep: 50,
            ndiag: 5,
        };
        let l = DecorrLayout::new(&[
            ok,
            Block {
                cov_off: 74 * 74,
                x_off: 10,
                ..ok
            },
        ])
        .unwrap();
        assert_eq!(
            (l.cov_need, l.x_need, l.ncol, l.nd2, l.ld),
            (2 * 74 * 74, 84, 50, 11, 74)
        );
        assert_eq!(l.params.len(), 16);
        // One basis for the two blocks of the same size.
        assert_eq!(&l.offs, &[0, 0, 0, 74 * 74, 10, 0]);
        assert_eq!(l.basis.len(), 74 * 74);
        let refused = [
            Block { cov_ld: 73, ..ok },
            Block { n: 0, ..ok },
            Block { ndiag: 13, ..ok },
            Block { row_lo: 8, ..ok },
            Block { row_hi: 66, ..ok },
            Block { row_hi: 75, ..ok },
            Block { nkeep: 51, ..ok },
        ];
        for k in refused {
            assert!(DecorrLayout::new(&[ok, k]).is_err(), "{k:?}");
        }
    }

    /// The Rust constants and the kernel's `#define`s are one and the same.
    #[test]
    fn constants_match_the_kernel_source() {
        let src = crate::extract::gpu::ptx::SOURCES
            .iter()
            .find(|(n, _)| *n == "decorrelate.cu")
            .expect("decorrelate.cu is embedded")
            .1;
        let mut want = vec![
            ("DECORR_THREADS".to_string(), THREADS.to_string()),
            ("JACOBI_TOL".to_string(), format!("{JACOBI_TOL:e}")),
            ("JACOBI_TAU_BIG".to_string(), format!("{JACOBI_TAU_BIG:e}")),
        ];
        for (name, s) in [
            ("OK", Status::Ok),
            ("NONFINITE_INPUT", Status::NonfiniteInput),
            ("BAD_EIGENVALUE", Status::BadEigenvalue),
            ("NOT_CONVERGED", Status::NotConverged),
            ("NONFINITE_OUTPUT", Status::NonfiniteOutput),
        ] {
            want.push((format!("DECORR_{name}"), s.code().to_string()));
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        for (name, value) in want {
            let defined = src.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().take(3).collect();
                w == ["#define", name.as_str(), value.as_str()]
            });
            assert!(defined, "kernel source lacks #define {name} {value}");
        }
        assert_eq!(Status::from_code(5), None);
        // 74×74 needs the opt-in above 48 KB, and fits sm_90's 227 KB.
        assert_eq!(smem_bytes(74), 89_392);
        assert!(smem_bytes(74) > 48 * 1024 && smem_bytes(74) <= 227 * 1024);
    }

    /// decorrelate.cu on GPU 0 at the real size (a whole bundle: every patch × 5 core fibers),
    /// outputs poisoned with NaN beforehand, against the twin (≤ 1e-12, expected bit-identical)
    /// and the CPU backend (≤ 1e-10); then the failure batch against the twin.
    #[test]
    fn gpu_matches_the_twin_and_the_cpu() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let kernels = Kernels::load(&gpu).expect("decorrelate.cu compiles and loads");
        let (scene, opts, what) = bundle_scene(true, 12);
        let inputs = scene.inputs();
        let ndiag = opts.ndiag;
        let refs: Vec<CpuRef> = inputs.par_iter().map(|i| cpu_reference(i, &opts)).collect();
        let (blocks, cov, x) = flatten(&refs, ndiag);
        let layout = DecorrLayout::new(&blocks).unwrap();
        let st = &gpu.stream;
        let cov_d = st.clone_htod(&cov).unwrap();
        let x_d = st.clone_htod(&x).unwrap();
        let mut out = DecorrBatch::alloc(&gpu, &layout).unwrap();
        st.memcpy_htod(&vec![f64::NAN; out.flux.len()], &mut out.flux)
            .unwrap();
        st.memcpy_htod(&vec![f64::NAN; out.fluxivar.len()], &mut out.fluxivar)
            .unwrap();
        st.memcpy_htod(&vec![f64::NAN; out.resolution.len()], &mut out.resolution)
            .unwrap();
        st.memcpy_htod(&vec![-1; layout.nblock], &mut out.status)
            .unwrap();
        st.memcpy_htod(&vec![-1; layout.nblock], &mut out.sweeps)
            .unwrap();
        decorrelate_into(&gpu, &kernels, &layout, &cov_d, &x_d, MAX_SWEEPS, &mut out).unwrap();
        let got = out.download(&gpu).unwrap();
        let worst = compare_with_cpu(&got, &refs, ndiag);
        let tw = twin(&layout, &cov, &x, MAX_SWEEPS);
        assert_eq!(got.status, tw.status);
        assert_eq!(got.sweeps, tw.sweeps);
        let mut differ = 0usize;
        let mut twin_worst = 0.0f64;
        for (g, t) in [
            (&got.flux, &tw.flux),
            (&got.fluxivar, &tw.fluxivar),
            (&got.resolution, &tw.resolution),
        ] {
            let scale = max_abs(t.iter().copied());
            for (a, b) in g.iter().zip(t.iter()) {
                differ += usize::from(a.to_bits() != b.to_bits());
                twin_worst = twin_worst.max((a - b).abs() / scale);
            }
        }
        let (lo, hi, mean) = sweep_summary(&got);
        eprintln!(
            "GPU ({}) vs CPU, {} blocks ({} patches, {}): flux {:.1e}, fluxivar {:.1e}, \
             resolution {:.1e}; vs twin: {differ} values differ, max {twin_worst:.1e}; \
             sweeps {lo}..={hi} (mean {mean:.2})",
            gpu.info.name,
            layout.nblock,
            inputs.len(),
            what,
            worst[0],
            worst[1],
            worst[2]
        );
        assert!(worst.iter().all(|&w| w <= 1e-10), "{worst:?}");
        assert!(twin_worst <= 1e-12, "GPU vs twin {twin_worst:e}");

        let (blocks, cov, x) = failure_batch();
        let layout = DecorrLayout::new(&blocks).unwrap();
        for max in [MAX_SWEEPS, 1] {
            let got = decorrelate_host(&gpu, &kernels, &layout, &cov, &x, max).unwrap();
            let tw = twin(&layout, &cov, &x, max);
            if max == MAX_SWEEPS {
                check_failure_batch(&got, &x);
            }
            assert_eq!(got.status, tw.status, "max_sweeps {max}");
            assert_eq!(got.sweeps, tw.sweeps, "max_sweeps {max}");
            for (g, t) in [
                (&got.flux, &tw.flux),
                (&got.fluxivar, &tw.fluxivar),
                (&got.resolution, &tw.resolution),
            ] {
                for (a, b) in g.iter().zip(t.iter()) {
                    let same = a.to_bits() == b.to_bits()
                        || (a.is_nan() && b.is_nan())
                        || (a - b).abs() <= 1e-12 * b.abs().max(1.0);
                    assert!(same, "max_sweeps {max}: {a} vs twin {b}");
                }
            }
        }
    }

    /// The eigen route on GPU 0 at the real size: XsyevBatched over the slots of a whole
    /// bundle (plus three padding rows, so that every block sits in a larger slot, and one
    /// block made indefinite), then `decorrelate_eigen` into poisoned outputs, against the CPU
    /// (≤ 1e-10) and against `twin_eigen` fed the device's own eigenpairs (the same readout:
    /// ≤ 1e-12, expected bit-identical).
    #[test]
    fn gpu_eigen_route_matches_the_cpu_and_its_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        if !crate::extract::gpu::solve::syev_batched_present() {
            eprintln!("skipping: cuSOLVER has no XsyevBatched");
            return;
        }
        let kernels = Kernels::load(&gpu).expect("decorrelate.cu compiles and loads");
        let mut solver = Solver::new(&gpu).unwrap();
        let (scene, opts, what) = bundle_scene(true, 12);
        let inputs = scene.inputs();
        let ndiag = opts.ndiag;
        let refs: Vec<CpuRef> = inputs.par_iter().map(|i| cpu_reference(i, &opts)).collect();
        for (pad, indefinite) in [(0, false), (3, true)] {
            let (blocks, mut slots, x, l) = flatten_slots(&refs, ndiag, pad);
            if indefinite {
                slots[0] = -slots[0];
            }
            let layout = DecorrLayout::new(&blocks).unwrap();
            let st = &gpu.stream;
            let mut slots_d = st.clone_htod(&slots).unwrap();
            let x_d = st.clone_htod(&x).unwrap();
            let eig = solver
                .eigen_in_place(&mut slots_d, l, blocks.len())
                .unwrap();
            let mut out = DecorrBatch::alloc(&gpu, &layout).unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.flux.len()], &mut out.flux)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.fluxivar.len()], &mut out.fluxivar)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.resolution.len()], &mut out.resolution)
                .unwrap();
            st.memcpy_htod(&vec![-1; layout.nblock], &mut out.status)
                .unwrap();
            st.memcpy_htod(&vec![-1; layout.nblock], &mut out.sweeps)
                .unwrap();
            decorrelate_eigen_into(&gpu, &kernels, &layout, &slots_d, &eig, &x_d, &mut out)
                .unwrap();
            let got = out.download(&gpu).unwrap();
            let evec = st.clone_dtoh(&slots_d).unwrap();
            let eval = st.clone_dtoh(&eig.values).unwrap();
            let info = st.clone_dtoh(&eig.info).unwrap();
            assert!(info.iter().all(|&i| i == 0), "syev info {info:?}");
            let tw = twin_eigen(&layout, &evec, &eval, &info, &x);
            assert_eq!(got.status, tw.status);
            assert!(got.sweeps.iter().all(|&s| s == 0));
            let (mut differ, mut twin_worst) = (0usize, 0.0f64);
            for (g, t) in [
                (&got.flux, &tw.flux),
                (&got.fluxivar, &tw.fluxivar),
                (&got.resolution, &tw.resolution),
            ] {
                let scale = max_abs(t.iter().copied().filter(|v| v.is_finite()));
                for (a, b) in g.iter().zip(t.iter()) {
                    let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                    differ += usize::from(!same);
                    if !same {
                        twin_worst = twin_worst.max((a - b).abs() / scale);
                    }
                }
            }
            assert!(twin_worst <= 1e-12, "GPU vs twin {twin_worst:e}");
            if indefinite {
                assert_eq!(got.status(0), Some(Status::BadEigenvalue));
                assert!((1..got.nblock).all(|b| got.status(b) == Some(Status::Ok)));
                continue;
            }
            let worst = compare_with_cpu(&got, &refs, ndiag);
            eprintln!(
                "eigen route on GPU ({}) vs CPU, {} blocks ({} patches, {what}), slots of {l}: \
                 flux {:.1e}, fluxivar {:.1e}, resolution {:.1e}; vs twin_eigen: {differ} \
                 values differ, max {twin_worst:.1e}",
                gpu.info.name,
                layout.nblock,
                inputs.len(),
                worst[0],
                worst[1],
                worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-10), "{worst:?}");
        }
    }
}
