//! Host twin of kernels/chi2.cu: `chi2_pixels` then `chi2_project` run on the host with the
//! kernels' per-thread algorithm, the same indexing and the same roundings, tested bit for bit
//! against the CPU backend (and, in `emu`, against the CUDA source itself). Test-only; imports
//! the product's `chi2` and `normal` layouts.

pub(super) use super::super::chi2::*;
use super::super::device::Gpu;
use super::super::normal::{BatchLayout, OnDevice, UploadedLayout};
use super::super::GpuError;
use crate::extract::PatchInput;

/// One patch's entry of [`Chi2Layout::dims`].
#[derive(Debug, Clone, Copy)]
pub(in crate::extract::gpu::twins) struct Dims {
    pub nsp: usize,
    pub nwt: usize,
    pub core0: usize,
    pub ncore: usize,
    pub wavepad: usize,
    pub nkeep: usize,
    pub nstep: usize,
}

impl Chi2Layout {
    /// Patch `b`'s entry of [`Chi2Layout::dims`].
    pub(in crate::extract::gpu::twins) fn dims(&self, b: usize) -> Dims {
        let d = &self.dims[8 * b..8 * b + 8];
        Dims {
            nsp: d[0] as usize,
            nwt: d[1] as usize,
            core0: d[2] as usize,
            ncore: d[3] as usize,
            wavepad: d[4] as usize,
            nkeep: d[5] as usize,
            nstep: d[6] as usize,
        }
    }
}

/// One unknown's spot placement, widened (the kernel's `SpotGeom`).
#[derive(Debug, Clone, Copy)]
pub(in crate::extract::gpu::twins) struct Geom {
    pub row0: i64,
    pub col0: i64,
    pub iy0: i64,
    pub iy1: i64,
}

pub(in crate::extract::gpu::twins) fn geom_of(l: &BatchLayout, slot: usize) -> Geom {
    let g = &l.geom[4 * slot..4 * slot + 4];
    Geom {
        row0: g[0] as i64,
        col0: g[1] as i64,
        iy0: g[2] as i64,
        iy1: g[3] as i64,
    }
}

/// A fiber's span in a row tile: `[wlo, whi)` bins, `[cmin, cmax)` columns (`stage_tile`).
#[derive(Debug, Clone, Copy)]
pub(in crate::extract::gpu::twins) struct Span {
    pub wlo: i64,
    pub whi: i64,
    pub cmin: i64,
    pub cmax: i64,
}

const SPAN_HIGH: i64 = i32::MAX as i64;

const SPAN_LOW: i64 = i32::MIN as i64;

/// `stage_tile` of kernels/chi2.cu: per fiber in `[flo, fhi)`, the bins in `[blo, bhi)` whose
/// spots reach rows `[r0, r1)` and the columns they cover (the kernel's integer atomics give
/// the same min and max in any order). The staged copies of geometry, coefficients and spot
/// offsets are the layout's own arrays here.
#[allow(clippy::too_many_arguments)]
pub(in crate::extract::gpu::twins) fn twin_stage(
    l: &BatchLayout,
    base: usize,
    d: Dims,
    (flo, fhi): (usize, usize),
    (blo, bhi): (usize, usize),
    r0: i64,
    r1: i64,
) -> Vec<Span> {
    let mut span = vec![
        Span {
            wlo: SPAN_HIGH,
            whi: SPAN_LOW,
            cmin: SPAN_HIGH,
            cmax: SPAN_LOW,
        };
        d.nsp
    ];
    for u in 0..d.nsp * d.nwt {
        let (f, w) = (u / d.nwt, u % d.nwt);
        if f < flo || f >= fhi || w < blo || w >= bhi {
            continue;
        }
        let g = geom_of(l, base + u);
        let lo = (g.row0 + g.iy0).max(r0);
        let hi = (g.row0 + g.iy1).min(r1);
        if lo < hi {
            let s = &mut span[f];
            s.wlo = s.wlo.min(w as i64);
            s.whi = s.whi.max(w as i64 + 1);
            s.cmin = s.cmin.min(g.col0);
            s.cmax = s.cmax.max(g.col0 + l.nx as i64);
        }
    }
    span
}

/// `gather_pixel` of kernels/chi2.cu: `Σ coef_u · spot_u(r, c)` over the unknowns of fibers
/// `[flo, fhi)` whose spot covers window pixel `(r, c)`, in increasing `u`.
#[allow(clippy::too_many_arguments)]
fn twin_gather(
    l: &BatchLayout,
    base: usize,
    span: &[Span],
    coef: &[f64],
    r: i64,
    c: i64,
    nwt: usize,
    (flo, fhi): (usize, usize),
) -> f64 {
    let nx = l.nx as i64;
    let mut acc = 0.0f64;
    for (f, s) in span.iter().enumerate().take(fhi).skip(flo) {
        if c < s.cmin || c >= s.cmax {
            continue;
        }
        for w in s.wlo..s.whi {
            let u = f * nwt + w as usize;
            let g = geom_of(l, base + u);
            let iy = r - g.row0;
            if iy < g.iy0 || iy >= g.iy1 {
                continue;
            }
            let ix = c - g.col0;
            if ix < 0 || ix >= nx {
                continue;
            }
            let so = l.spot_off[base + u] as usize;
            // `a * b` then `+` are the kernel's __dmul_rn and __dadd_rn.
            acc += coef[base + u] * l.spots[so + (iy * nx + ix) as usize];
        }
    }
    acc
}

/// Host twin of `chi2_pixels` followed by `chi2_project`: the same blocks, the same
/// per-thread work in the same order, the same roundings. Every output starts as NaN so that
/// an element the algorithm fails to write shows up, as the GPU test's poisoned buffers do.
pub fn twin(layout: &BatchLayout, dims: &Chi2Layout, x: &[f64], psferr: f64) -> HostChi2 {
    let l = layout;
    assert_eq!(x.len(), l.npatch * l.nmax, "x is [npatch·nmax]");
    let npix = dims.npix;
    let mut out = HostChi2 {
        model: vec![f64::NAN; npix],
        chi2: vec![f64::NAN; npix],
        valid: vec![f64::NAN; npix],
        chi2pix: vec![f64::NAN; dims.npatch * dims.slots()],
        pixmask: vec![f64::NAN; dims.npatch * dims.slots()],
    };
    for b in 0..l.npatch {
        for tile in 0..dims.tiles() {
            twin_pixels_block(l, dims, b, tile, x, psferr, &mut out);
        }
    }
    for b in 0..l.npatch {
        for t in 0..dims.slots() {
            twin_project_thread(l, dims, b, t, &mut out);
        }
    }
    out
}

/// Block `(tile, b)` of `chi2_pixels`.
fn twin_pixels_block(
    l: &BatchLayout,
    dims: &Chi2Layout,
    b: usize,
    tile: usize,
    x: &[f64],
    psferr: f64,
    out: &mut HostChi2,
) {
    let (wny, wnx) = (l.patch[4 * b + 1] as i64, l.patch[4 * b + 2] as i64);
    let r0 = (tile * TILE_ROWS) as i64;
    if r0 >= wny {
        return;
    }
    let r1 = (r0 + TILE_ROWS as i64).min(wny);
    let d = dims.dims(b);
    let base = b * l.nmax;
    let all = (0, d.nsp);
    let span = twin_stage(l, base, d, all, (0, d.nwt), r0, r1);
    let (off, soff) = (l.win_off[b], l.scr_off[b]);
    let ld = l.patch[4 * b + 3] as i64;
    // Thread k's pixels (threads stride over the tile; each pixel is independent).
    for k in 0..(r1 - r0) * wnx {
        let (r, c) = (r0 + k / wnx, k % wnx);
        let m = twin_gather(l, base, &span, x, r, c, d.nwt, all);
        let p = (off + r * ld + c) as usize;
        let q = (soff + r * wnx + c) as usize;
        let w = l.ivar[p];
        let tm = psferr * m + 1e-32;
        let modelivar = 1.0 / (tm * tm);
        let tot = if modelivar > 0.0 && w > 0.0 {
            1.0 / (1.0 / modelivar + 1.0 / w)
        } else {
            0.0
        };
        let dd = l.pix[p] - m;
        out.model[q] = m;
        out.chi2[q] = dd * dd * tot;
        out.valid[q] = if tot > 0.0 { 1.0 } else { 0.0 };
    }
}

/// Thread `t` of block row `b` of `chi2_project`.
fn twin_project_thread(l: &BatchLayout, dims: &Chi2Layout, b: usize, t: usize, out: &mut HostChi2) {
    let (c, j) = (t / dims.nkmax, t % dims.nkmax);
    let o = b * dims.slots() + t;
    let d = dims.dims(b);
    if c >= d.ncore || j >= d.nkeep {
        out.chi2pix[o] = 0.0;
        out.pixmask[o] = 0.0;
        return;
    }
    let slot = b * l.nmax + (d.core0 + c) * d.nwt + d.wavepad + j;
    let g = geom_of(l, slot);
    let s = &l.spots[l.spot_off[slot] as usize..];
    let (wnx, ld) = (l.patch[4 * b + 2] as i64, l.patch[4 * b + 3] as i64);
    let (off, soff) = (l.win_off[b], l.scr_off[b]);
    let nx = l.nx;
    let (mut pm, mut num, mut den) = (0.0f64, 0.0f64, 0.0f64);
    for iy in g.iy0..g.iy1 {
        let row = (off + (g.row0 + iy) * ld + g.col0) as usize;
        let srow = (soff + (g.row0 + iy) * wnx + g.col0) as usize;
        let (mut rp, mut rn, mut rd) = (0.0f64, 0.0f64, 0.0f64);
        for ix in 0..nx {
            let sv = s[iy as usize * nx + ix];
            let masked = if l.ivar[row + ix] == 0.0 { 1.0 } else { 0.0 };
            rp += sv * masked;
            rn += sv * out.chi2[srow + ix];
            rd += sv * out.valid[srow + ix];
        }
        pm += rp;
        num += rn;
        den += rd;
    }
    out.pixmask[o] = pm;
    out.chi2pix[o] = if den > 0.0 { num / den } else { 0.0 };
}

impl Chi2Batch {
    /// Copies the results back (waits for the kernels).
    pub fn download(&self, gpu: &Gpu) -> Result<HostChi2, GpuError> {
        let st = &gpu.stream;
        Ok(HostChi2 {
            model: st.clone_dtoh(&self.model).map_err(cuda("downloading"))?,
            chi2: st.clone_dtoh(&self.chi2).map_err(cuda("downloading"))?,
            valid: st.clone_dtoh(&self.valid).map_err(cuda("downloading"))?,
            chi2pix: st.clone_dtoh(&self.chi2pix).map_err(cuda("downloading"))?,
            pixmask: st.clone_dtoh(&self.pixmask).map_err(cuda("downloading"))?,
        })
    }
}

/// Uploads `batch` and `x`, runs the stage and downloads its results.
pub(super) fn run(
    gpu: &Gpu,
    batch: &[PatchInput<'_>],
    x: &[f64],
    psferr: f64,
) -> Result<HostChi2, GpuError> {
    let layout = BatchLayout::new(batch)?;
    let dims = Chi2Layout::new(batch, &layout)?;
    let kernels = Kernels::load(gpu)?;
    let up = UploadedLayout::upload(gpu, &layout, OnDevice::default())?;
    let buf = up.buffers();
    let st = &gpu.stream;
    let xd = st.clone_htod(x).map_err(cuda("uploading x"))?;
    let mut out = Chi2Batch::alloc(gpu, &dims)?;
    launch(gpu, &kernels, &buf, &dims, &xd, psferr, &mut out)?;
    out.download(gpu)
}

pub(in crate::extract::gpu::twins) mod tests {
    use rayon::prelude::*;

    use super::*;
    use crate::extract::cpu::lapack;
    use crate::extract::cpu::{chi2 as cpu_chi2, decorrelate, normal as cpu_normal};
    use crate::extract::cpu::{extract_patch, Workspace};
    use crate::extract::gpu::device;
    use crate::extract::gpu::twins::scene::{Bundle, Masked, Pixels, Recipe, Scene, Trim};
    use crate::extract::ExtractOptions;

    /// A simulated exposure (every spot of the set at a random flux plus noise, so that the
    /// solve is well posed and χ² ~ 1), a copy of `patches[trim]` whose window cuts spots
    /// (kept core ones included) and leaves some wholly outside, and every pixel of one core
    /// spot of the first patch masked (its chi2pix has no valid pixel: the `den = 0` branch).
    fn recipe(trim: usize) -> Recipe {
        Recipe {
            trim: Some(Trim::IntoKept(trim)),
            pixels: Pixels::Exposure,
            masked: Some(Masked::MiddleKeptBin),
        }
    }

    /// 12 toy fibers in 3 subbundles (5, 6 and 5 fibers solved: mixed sizes, so padding), four
    /// wavelength patches each (the last keeps fewer bins than it solves), and a trimmed copy
    /// of a middle patch.
    pub(in crate::extract::gpu::twins) fn toy_scene(seed: u64) -> Scene {
        Bundle::toy(3).into_scene(seed, recipe(5))
    }

    /// `picks` of a whole bundle at the real size ([`Bundle::real_size`]), all of it for
    /// `None`, and a trimmed copy of the middle one; with the PSF's `hsizey`.
    pub(in crate::extract::gpu::twins) fn bundle_scene(
        picks: Option<&[usize]>,
        seed: u64,
    ) -> (Scene, usize, &'static str) {
        let bundle = Bundle::real_size().pick(picks);
        let (hsizey, what) = (bundle.psf.hsizey, bundle.what);
        let recipe = recipe(bundle.patches.len() / 2);
        (bundle.into_scene(seed, recipe), hsizey, what)
    }

    /// What `cpu::extract_patch` solves for: `x` (fiber-major) and the flux of every core bin
    /// (`[c·nstep + j]`, all nstep of them), which checks that the solve reproduced is its own.
    pub(in crate::extract::gpu::twins) struct CpuSolution {
        pub x: Vec<f64>,
        flux: Vec<f64>,
        pub retried: bool,
    }

    /// cpu::solve's steps up to the flux, with the CPU's own modules: the same x bit for bit
    /// as extract_patch, which does not expose it.
    fn cpu_solve(
        inp: &PatchInput<'_>,
        ndiag: usize,
        reg: f64,
        eps: f64,
    ) -> Option<(Vec<f64>, Vec<f64>)> {
        lapack::single_threaded_blas();
        let p = inp.patch;
        let nps = inp.spots.ny * inp.spots.nx;
        let mut geom = Vec::new();
        cpu_normal::geometry(inp, &mut geom);
        let n = geom.len();
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
        cpu_normal::regularization(&fw, reg, eps, &mut diag);
        let nwt = p.nwavetot;
        let nstep = nwt - 2 * p.wavepad;
        let layout = decorrelate::Layout {
            nspecpad: p.nspecpad,
            nwavetot: nwt,
            core_fiber: p.core_fiber_offset(),
            ncore: p.nspec,
            row_lo: p.wavepad.saturating_sub(ndiag),
            row_hi: (p.wavepad + nstep + ndiag).min(nwt),
        };
        let system = decorrelate::BandSystem {
            pairs: &pairs,
            diag: &diag,
            rhs: &rhs,
            kd,
        };
        let (mut r, mut s) = (Vec::new(), Vec::new());
        let mut work = decorrelate::DecorrWork::default();
        let x = work.run(layout, &system, &mut r, &mut s).ok()?.to_vec();
        let nrow = layout.row_hi - layout.row_lo;
        let mut flux = vec![0.0; p.nspec * nstep];
        for c in 0..p.nspec {
            let f = layout.core_fiber + c;
            let xf = &x[f * nwt..(f + 1) * nwt];
            for j in 0..nstep {
                let ri = p.wavepad + j - layout.row_lo;
                let row = &r[(c * nrow + ri) * nwt..(c * nrow + ri + 1) * nwt];
                flux[c * nstep + j] = row.iter().zip(xf).map(|(a, b)| a * b).sum();
            }
        }
        flux.iter().all(|v| v.is_finite()).then_some((x, flux))
    }

    /// extract_patch's attempts: the options' regularisation with ε = 1e-15, then the retry
    /// (regularize ≥ 1e-4, ε = 1e-8), as cpu/mod.rs does.
    pub(in crate::extract::gpu::twins) fn cpu_solution(
        inp: &PatchInput<'_>,
        opts: &ExtractOptions,
    ) -> CpuSolution {
        let tries = [
            (opts.regularize, 1e-15, false),
            (opts.regularize.max(1e-4), 1e-8, true),
        ];
        for (reg, eps, retried) in tries {
            if let Some((x, flux)) = cpu_solve(inp, opts.ndiag, reg, eps) {
                return CpuSolution { x, flux, retried };
            }
        }
        panic!("the CPU cannot solve patch {:?}", inp.patch);
    }

    /// x of every patch in the batch layout (`[b·nmax + u]`), padding slots NaN: NaN where the
    /// kernels must not read, so that a stray read poisons an output.
    pub(in crate::extract::gpu::twins) fn batch_x(
        layout: &BatchLayout,
        sols: &[CpuSolution],
    ) -> Vec<f64> {
        let nmax = layout.nmax;
        let mut x = vec![f64::NAN; layout.npatch * nmax];
        for (b, s) in sols.iter().enumerate() {
            x[b * nmax..b * nmax + s.x.len()].copy_from_slice(&s.x);
        }
        x
    }

    /// Largest |a − b| relative to the largest |b|, and how many elements differ in any bit.
    #[derive(Debug, Default, Clone, Copy)]
    pub(in crate::extract::gpu::twins) struct Diff {
        pub rel: f64,
        pub differ: usize,
        pub count: usize,
    }

    impl Diff {
        pub(in crate::extract::gpu::twins) fn of(a: &[f64], b: &[f64]) -> Diff {
            assert_eq!(a.len(), b.len());
            let scale = b
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()))
                .max(f64::MIN_POSITIVE);
            let mut d = Diff {
                count: a.len(),
                ..Diff::default()
            };
            for (x, y) in a.iter().zip(b) {
                if x.to_bits() != y.to_bits() {
                    d.differ += 1;
                    d.rel = d.rel.max((x - y).abs() / scale);
                    if x.is_nan() || y.is_nan() {
                        d.rel = f64::INFINITY;
                    }
                }
            }
            d
        }

        pub(in crate::extract::gpu::twins) fn add(&mut self, o: Diff) {
            self.rel = self.rel.max(o.rel);
            self.differ += o.differ;
            self.count += o.count;
        }
    }

    /// The twin against the CPU backend on `scene`: per patch, the model and per-pixel χ²
    /// against cpu::chi2 for the CPU's own x, chi2pix and pixmask fraction against
    /// `extract_patch` itself. Returns the differences [model, χ², chi2pix, pixmask] and
    /// asserts what the scene must exercise.
    fn compare_twin_with_cpu(scene: &Scene, opts: &ExtractOptions) -> [Diff; 4] {
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        let dims = Chi2Layout::new(&inputs, &layout).unwrap();
        let sols: Vec<CpuSolution> = inputs.iter().map(|i| cpu_solution(i, opts)).collect();
        let x = batch_x(&layout, &sols);
        let got = twin(&layout, &dims, &x, opts.psferr);
        // Every output written, and nothing read from x's NaN slots.
        for (name, v) in [
            ("model", &got.model),
            ("chi2", &got.chi2),
            ("valid", &got.valid),
            ("chi2pix", &got.chi2pix),
            ("pixmask", &got.pixmask),
        ] {
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name} has a non-finite value"
            );
        }
        let mut d = [Diff::default(); 4];
        let (mut cut, mut den_zero, mut partial) = (0, 0, 0);
        let mut ws = Workspace::default();
        let mut geom = Vec::new();
        let (mut m, mut c2, mut val) = (Vec::new(), Vec::new(), Vec::new());
        for (b, (inp, sol)) in inputs.iter().zip(&sols).enumerate() {
            let p = inp.patch;
            let res = extract_patch(inp, opts, &mut ws);
            assert!(!res.info.failed, "patch {b} failed on the CPU");
            assert_eq!(res.info.retried, sol.retried, "patch {b}");
            // The reproduced solve is extract_patch's: its kept flux is the same to the bit.
            let nstep = p.nwavetot - 2 * p.wavepad;
            for c in 0..p.nspec {
                for j in 0..p.nwave_keep {
                    assert_eq!(
                        res.flux[[c, j]].to_bits(),
                        sol.flux[c * nstep + j].to_bits(),
                        "patch {b} flux ({c}, {j})"
                    );
                }
            }
            cpu_normal::geometry(inp, &mut geom);
            cpu_chi2::model(inp, &geom, &sol.x, &mut m);
            cpu_chi2::pixel_chi2(inp, &m, opts.psferr, &mut c2, &mut val);
            let off = layout.win_off[b] as usize;
            let win = off..off + m.len();
            d[0].add(Diff::of(&got.model[win.clone()], &m));
            d[1].add(Diff::of(&got.chi2[win.clone()], &c2));
            d[1].add(Diff::of(&got.valid[win], &val));
            let mut ours = (Vec::new(), Vec::new());
            for c in 0..dims.ncmax {
                for j in 0..dims.nkmax {
                    let o = dims.slot(b, c, j);
                    if c < p.nspec && j < p.nwave_keep {
                        ours.0.push(got.chi2pix[o]);
                        ours.1.push(got.pixmask[o]);
                        let g = geom[(p.core_fiber_offset() + c) * p.nwavetot + p.wavepad + j];
                        cut += usize::from(g.iy0 > 0 || g.iy1 < inp.spots.ny);
                        let den = cpu_chi2::project(inp, &g, &val);
                        den_zero += usize::from(den == 0.0 && got.pixmask[o] > 0.5);
                        partial += usize::from(got.pixmask[o] > 0.0 && got.pixmask[o] < 0.5);
                    } else {
                        assert_eq!((got.chi2pix[o], got.pixmask[o]), (0.0, 0.0), "padding slot");
                    }
                }
            }
            d[2].add(Diff::of(&ours.0, res.chi2pix.as_slice().unwrap()));
            d[3].add(Diff::of(&ours.1, res.pixmask_fraction.as_slice().unwrap()));
        }
        assert!(
            cut > 0 && den_zero > 0 && partial > 0,
            "the scene must have cut spots ({cut}), a wholly masked spot ({den_zero}) and \
             partly masked ones ({partial}) among the outputs"
        );
        assert!(
            layout.n(0) != layout.nmax || inputs.iter().any(|i| i.patch.nunknown() < layout.nmax)
        );
        assert!(inputs
            .iter()
            .any(|i| i.patch.nwave_keep < i.patch.nwavetot - 2 * i.patch.wavepad));
        d
    }

    fn report(what: &str, d: &[Diff; 4]) {
        let names = ["model", "chi2/valid", "chi2pix", "pixmask"];
        let parts: Vec<String> = names
            .iter()
            .zip(d)
            .map(|(n, d)| {
                format!(
                    "{n} {}/{} differ (max rel {:.1e})",
                    d.differ, d.count, d.rel
                )
            })
            .collect();
        eprintln!("twin vs CPU, {what}: {}", parts.join(", "));
    }

    #[test]
    fn twin_matches_the_cpu_backend_bit_for_bit_on_toy_patches() {
        let scene = toy_scene(11);
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag: 3,
            model_image: None,
            leverage: false,
        };
        let d = compare_twin_with_cpu(&scene, &opts);
        report("toy PSF", &d);
        // The twin rounds exactly as cpu::chi2 does, in the same order, on the CPU's own x.
        assert!(d.iter().all(|d| d.differ == 0), "{d:?}");
    }

    #[test]
    fn twin_matches_the_cpu_backend_bit_for_bit_on_the_real_psf() {
        if crate::io::shared_data("psf-r0-00067784.fits").is_none() {
            eprintln!("skipping: the real PSF is not in ../shared/data");
            return;
        }
        // Bundle-edge subbundles (6 fibers), middle ones (7), the first and last bins.
        let picks = [0usize, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10];
        let (scene, ndiag, what) = bundle_scene(Some(&picks), 12);
        assert_eq!(what, "real PSF");
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag,
            model_image: None,
            leverage: false,
        };
        let d = compare_twin_with_cpu(&scene, &opts);
        report("real PSF", &d);
        assert!(d.iter().all(|d| d.differ == 0), "{d:?}");
    }

    #[test]
    fn layout_refuses_mismatched_batches() {
        let scene = toy_scene(13);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        let err = Chi2Layout::new(&inputs[1..], &layout)
            .unwrap_err()
            .to_string();
        assert!(err.contains("patches for a layout"), "{err}");
        // A patch swapped for one of another size no longer matches its slot.
        let mut other = scene.inputs();
        let big = (0..other.len())
            .find(|&k| other[k].patch.nunknown() != other[0].patch.nunknown())
            .expect("the toy scene mixes patch sizes");
        other.swap(0, big);
        let err = Chi2Layout::new(&other, &layout).unwrap_err().to_string();
        assert!(err.contains("unknowns, its layout slot"), "{err}");
        let dims = Chi2Layout::new(&inputs, &layout).unwrap();
        assert_eq!(
            dims.ncmax,
            inputs.iter().map(|i| i.patch.nspec).max().unwrap()
        );
        assert_eq!(
            dims.nkmax,
            inputs.iter().map(|i| i.patch.nwave_keep).max().unwrap()
        );
        assert!(dims.smem() <= MAX_DYNAMIC_SMEM);
    }

    /// chi2.cu on GPU 0 against the twin (≤ 1e-12 relative; the kernels use only explicitly
    /// rounded IEEE operations in the twin's order, so the expected difference is none), on a
    /// whole bundle at the real size, outputs poisoned with NaN before each run, and a second
    /// run giving the same bits (no dependence on scheduling).
    #[test]
    fn gpu_matches_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let kernels = Kernels::load(&gpu).expect("chi2.cu compiles and loads");
        let (scene, ndiag, what) = bundle_scene(None, 14);
        let inputs = scene.inputs();
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag,
            model_image: None,
            leverage: false,
        };
        let layout = BatchLayout::new(&inputs).unwrap();
        let dims = Chi2Layout::new(&inputs, &layout).unwrap();
        assert_eq!(layout.nmax, 7 * 74);
        let sols: Vec<CpuSolution> = inputs.par_iter().map(|i| cpu_solution(i, &opts)).collect();
        let x = batch_x(&layout, &sols);
        let tw = twin(&layout, &dims, &x, opts.psferr);

        let up = UploadedLayout::upload(&gpu, &layout, OnDevice::default()).unwrap();
        let buf = up.buffers();
        let st = &gpu.stream;
        let xd = st.clone_htod(&x).unwrap();
        let mut out = Chi2Batch::alloc(&gpu, &dims).unwrap();
        let mut runs = Vec::new();
        for _ in 0..2 {
            for b in [&mut out.model, &mut out.chi2, &mut out.valid] {
                st.memcpy_htod(&vec![f64::NAN; dims.npix], b).unwrap();
            }
            let nslot = dims.npatch * dims.slots();
            for b in [&mut out.chi2pix, &mut out.pixmask] {
                st.memcpy_htod(&vec![f64::NAN; nslot], b).unwrap();
            }
            launch(&gpu, &kernels, &buf, &dims, &xd, opts.psferr, &mut out).unwrap();
            let got = out.download(&gpu).unwrap();
            // The poison and the twin's initial values are the same NaN: require every
            // element written, so that one left unwritten by both cannot compare equal.
            for v in [
                &got.model,
                &got.chi2,
                &got.valid,
                &got.chi2pix,
                &got.pixmask,
            ] {
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "an output was left unwritten"
                );
            }
            let d = [
                Diff::of(&got.model, &tw.model),
                {
                    let mut d = Diff::of(&got.chi2, &tw.chi2);
                    d.add(Diff::of(&got.valid, &tw.valid));
                    d
                },
                Diff::of(&got.chi2pix, &tw.chi2pix),
                Diff::of(&got.pixmask, &tw.pixmask),
            ];
            eprintln!(
                "GPU ({}) vs twin, {} patches, {what}, {:.1} M window pixels:",
                gpu.info.name,
                inputs.len(),
                dims.npix as f64 / 1e6
            );
            report("GPU", &d);
            for (k, d) in d.iter().enumerate() {
                // A NaN (an element left unwritten) makes rel infinite.
                assert!(d.rel <= 1e-12, "output {k}: {d:?}");
            }
            runs.push(got);
        }
        let (a, b) = (&runs[0], &runs[1]);
        for (x, y) in [
            (&a.model, &b.model),
            (&a.chi2, &b.chi2),
            (&a.chi2pix, &b.chi2pix),
            (&a.pixmask, &b.pixmask),
        ] {
            assert_eq!(Diff::of(x, y).differ, 0, "two runs differ");
        }
        // The one-call convenience gives the same results.
        let once = run(&gpu, &inputs, &x, opts.psferr).unwrap();
        assert_eq!(Diff::of(&once.chi2pix, &a.chi2pix).differ, 0);
    }
}
