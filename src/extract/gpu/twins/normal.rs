//! Host twin of kernels/normal.cu: `normal_dense` then `normal_regularize` run on the host
//! with the kernels' per-thread algorithm, the same indexing and the same (explicitly rounded)
//! arithmetic, tested against the CPU backend; plus the one-call [`build`] and the download
//! the GPU tests use. Test-only; re-exports the product's `normal`.

use super::super::device::Gpu;
pub(super) use super::super::normal::*;
use super::super::GpuError;
use crate::extract::PatchInput;

/// The batch's normal equations on the host (from [`twin`] or [`DenseBatch::download`]).
#[derive(Debug, Clone)]
pub struct HostDense {
    /// Patches.
    pub npatch: usize,
    /// Matrix size (leading dimension) of every patch.
    pub nmax: usize,
    /// `AᵀWA` per patch, column-major `nmax × nmax`, fiber-major unknowns.
    pub ata: Vec<f64>,
    /// `AᵀWp`, `[npatch·nmax]`.
    pub atp: Vec<f64>,
    /// `AᵀW1`, `[npatch·nmax]`.
    pub atw1: Vec<f64>,
}

impl HostDense {
    /// `(AᵀWA)[v, u]` of patch `b`.
    pub fn ata(&self, b: usize, v: usize, u: usize) -> f64 {
        self.ata[(b * self.nmax + u) * self.nmax + v]
    }
}

/// One unknown's spot placement, widened to i64 (the kernel's `SpotGeom`).
#[derive(Debug, Clone, Copy)]
struct Geom {
    row0: i64,
    col0: i64,
    iy0: i64,
    iy1: i64,
}

impl BatchLayout {
    fn geom(&self, slot: usize) -> Geom {
        let g = &self.geom[4 * slot..4 * slot + 4];
        Geom {
            row0: g[0] as i64,
            col0: g[1] as i64,
            iy0: g[2] as i64,
            iy1: g[3] as i64,
        }
    }
}

/// Host twin of `normal_dense` followed by `normal_regularize`: the same blocks, the same
/// per-thread work in the same order, the same roundings (`a * b` in Rust is `__dmul_rn`,
/// `mul_add` is `fma`). Every output starts as NaN so that an element the algorithm fails to
/// write shows up, as the GPU test's poisoned buffers do.
pub fn twin(layout: &BatchLayout, regularize: f64, epsilon: f64) -> HostDense {
    let (npatch, nmax) = (layout.npatch, layout.nmax);
    let mut out = HostDense {
        npatch,
        nmax,
        ata: vec![f64::NAN; npatch * nmax * nmax],
        atp: vec![f64::NAN; npatch * nmax],
        atw1: vec![f64::NAN; npatch * nmax],
    };
    for b in 0..npatch {
        for u in 0..nmax {
            twin_dense_block(layout, b, u, &mut out);
        }
    }
    for b in 0..npatch {
        twin_regularize_block(layout, b, regularize, epsilon, &mut out);
    }
    out
}

/// Block `(u, b)` of `normal_dense`.
fn twin_dense_block(l: &BatchLayout, b: usize, u: usize, out: &mut HostDense) {
    let nmax = l.nmax;
    let n = l.n(b);
    let ld = l.patch[4 * b + 3] as i64;
    let base = b * nmax;
    let col = &mut out.ata[(base + u) * nmax..(base + u + 1) * nmax];
    if u >= n {
        for (v, c) in col.iter_mut().enumerate() {
            *c = if v == u { 1.0 } else { 0.0 };
        }
        out.atp[base + u] = 0.0;
        out.atw1[base + u] = 0.0;
        return;
    }
    let (ny, nx) = (l.ny as i64, l.nx as i64);
    let nps = l.ny * l.nx;
    let so = l.spot_off[base + u] as usize;
    // The kernel's shared-memory copy of spot u.
    let su = &l.spots[so..so + nps];
    let gu = l.geom(base + u);
    let off = l.win_off[b] as usize;
    let (pix, w) = (&l.pix[off..], &l.ivar[off..]);
    // Thread v's work (threads stride over v; each entry is independent of the others).
    for (v, c) in col.iter_mut().enumerate() {
        let mut a = 0.0;
        if v < n {
            let gv = l.geom(base + v);
            let sv = &l.spots[l.spot_off[base + v] as usize..];
            a = pair_sum(su, sv, gu, gv, ny, nx, w, ld);
        }
        *c = a;
    }
    // Thread 0: AᵀWp and AᵀW1 of u.
    let (mut rhs, mut fw) = (0.0f64, 0.0f64);
    for iy in gu.iy0..gu.iy1 {
        let r = (gu.row0 + iy) * ld + gu.col0;
        for ix in 0..nx {
            let ws = su[(iy * nx + ix) as usize] * w[(r + ix) as usize];
            rhs = ws.mul_add(pix[(r + ix) as usize], rhs);
            fw += ws;
        }
    }
    out.atp[base + u] = rhs;
    out.atw1[base + u] = fw;
}

/// `pair_sum` of kernels/normal_common.cuh: `Σ su·sv·w` over the window pixels both spots
/// cover (`w`'s rows `ld` apart), multiplying the spots first and walking the overlap in
/// window row-major order.
#[allow(clippy::too_many_arguments)]
fn pair_sum(
    su: &[f64],
    sv: &[f64],
    gu: Geom,
    gv: Geom,
    ny: i64,
    nx: i64,
    w: &[f64],
    ld: i64,
) -> f64 {
    let dy = gv.row0 - gu.row0;
    let dx = gv.col0 - gu.col0;
    if dy >= ny || -dy >= ny || dx >= nx || -dx >= nx {
        return 0.0;
    }
    let rlo = (gu.row0 + gu.iy0).max(gv.row0 + gv.iy0);
    let rhi = (gu.row0 + gu.iy1).min(gv.row0 + gv.iy1);
    let clo = gu.col0.max(gv.col0);
    let chi = gu.col0.min(gv.col0) + nx;
    let mut acc = 0.0f64;
    for r in rlo..rhi {
        let ru = (r - gu.row0) * nx - gu.col0;
        let rv = (r - gv.row0) * nx - gv.col0;
        let rw = r * ld;
        for c in clo..chi {
            acc =
                (su[(ru + c) as usize] * sv[(rv + c) as usize]).mul_add(w[(rw + c) as usize], acc);
        }
    }
    acc
}

/// Block `b` of `normal_regularize`: the tree max of AᵀW1 over `REG_THREADS` threads, then
/// `cpu::normal::regularization`'s term added to each diagonal entry.
fn twin_regularize_block(
    l: &BatchLayout,
    b: usize,
    regularize: f64,
    epsilon: f64,
    out: &mut HostDense,
) {
    let nt = REG_THREADS as usize;
    let nmax = l.nmax;
    let n = l.n(b);
    let base = b * nmax;
    let mut red = vec![f64::NEG_INFINITY; nt];
    for (t, r) in red.iter_mut().enumerate() {
        // f64::max ignores a NaN operand as CUDA's fmax does.
        *r = (t..n)
            .step_by(nt)
            .fold(f64::NEG_INFINITY, |m, u| m.max(out.atw1[base + u]));
    }
    let mut s = nt / 2;
    while s > 0 {
        for t in 0..s {
            red[t] = red[t].max(red[t + s]);
        }
        s /= 2;
    }
    let minweight = 1e-4 * red[0];
    let reg2 = regularize * regularize;
    for u in 0..n {
        let fw = out.atw1[base + u];
        let lambda2 = if fw < minweight {
            let d = minweight - fw;
            d * d
        } else {
            reg2
        };
        let diag = &mut out.ata[(base + u) * nmax + u];
        *diag += lambda2 + epsilon;
    }
}

impl DenseBatch {
    /// Copies the batch back (waits for the kernels; tests and diagnostics).
    pub fn download(&self, gpu: &Gpu) -> Result<HostDense, GpuError> {
        let st = &gpu.stream;
        Ok(HostDense {
            npatch: self.npatch,
            nmax: self.nmax,
            ata: st.clone_dtoh(&self.ata).map_err(cuda("downloading AᵀWA"))?,
            atp: st.clone_dtoh(&self.atp).map_err(cuda("downloading AᵀWp"))?,
            atw1: st
                .clone_dtoh(&self.atw1)
                .map_err(cuda("downloading AᵀW1"))?,
        })
    }
}

/// Builds the regularised normal equations of `batch` on `gpu` (queued on its stream; the
/// buffers stay on the device for the batched Cholesky).
pub fn build(
    gpu: &Gpu,
    batch: &[PatchInput<'_>],
    regularize: f64,
    epsilon: f64,
) -> Result<DenseBatch, GpuError> {
    let layout = BatchLayout::new(batch)?;
    let kernels = Kernels::load(gpu)?;
    let up = UploadedLayout::upload(gpu, &layout, OnDevice::default())?;
    let mut out = DenseBatch::alloc(gpu, &layout)?;
    build_into(gpu, &kernels, &up.buffers(), regularize, epsilon, &mut out)?;
    Ok(out)
}

use crate::extract::cpu::normal as cpu_normal;

mod tests {
    use super::*;
    use crate::extract::gpu::device;
    use crate::extract::gpu::twins::scene::{Bundle, Masked, Pixels, Recipe, Scene, Trim};

    /// Random pixels, a copy of `patches[trim]` whose window cuts some of its spots and leaves
    /// some wholly outside, and one unknown of the first patch with every pixel of its spot
    /// masked: AᵀW1 = 0, below 1e-4·max, so the regularisation's first branch is exercised.
    fn recipe(trim: usize) -> Recipe {
        Recipe {
            trim: Some(Trim::Rows(trim)),
            pixels: Pixels::Random,
            masked: Some(Masked::MiddleBin),
        }
    }

    /// 12 toy fibers in 3 subbundles (5, 6 and 5 fibers solved: mixed sizes, so padding), four
    /// wavelength patches each, and a trimmed copy of a middle patch.
    fn toy_scene(seed: u64) -> Scene {
        Bundle::toy(3).into_scene(seed, recipe(5))
    }

    /// `picks` of a whole bundle at the real size ([`Bundle::real_size`]), all of it for
    /// `None`, and a trimmed copy of the middle one.
    fn bundle_scene(picks: Option<&[usize]>, seed: u64) -> (Scene, &'static str) {
        let bundle = Bundle::real_size().pick(picks);
        let (what, recipe) = (bundle.what, recipe(bundle.patches.len() / 2));
        (bundle.into_scene(seed, recipe), what)
    }

    /// The CPU path's normal equations of one patch, scattered into a dense fiber-major
    /// `n × n` column-major matrix with the regularisation on the diagonal.
    struct CpuDense {
        n: usize,
        ata: Vec<f64>,
        atp: Vec<f64>,
        atw1: Vec<f64>,
    }

    fn cpu_dense(inp: &PatchInput<'_>, regularize: f64, epsilon: f64) -> CpuDense {
        let mut geom = Vec::new();
        cpu_normal::geometry(inp, &mut geom);
        let n = geom.len();
        let nps = inp.spots.ny * inp.spots.nx;
        let (mut pairs, mut atp, mut atw1) = (Vec::new(), vec![0.0; n], vec![0.0; n]);
        let mut wspot = vec![0.0; n * nps];
        cpu_normal::build(
            inp,
            &geom,
            &mut cpu_normal::Normal {
                pairs: &mut pairs,
                rhs: &mut atp,
                fluxweight: &mut atw1,
                wspot: &mut wspot,
            },
        );
        let mut diag = Vec::new();
        cpu_normal::regularization(&atw1, regularize, epsilon, &mut diag);
        let (nsp, nwt) = (inp.patch.nspecpad, inp.patch.nwavetot);
        // Wavelength-major p = w·nsp + f → fiber-major u = f·nwt + w.
        let unperm = |p: u32| (p as usize % nsp) * nwt + p as usize / nsp;
        let mut ata = vec![0.0; n * n];
        for &(p, q, v) in &pairs {
            let (a, b) = (unperm(p), unperm(q));
            ata[a * n + b] = v;
            ata[b * n + a] = v;
        }
        for (u, d) in diag.iter().enumerate() {
            ata[u * n + u] += d;
        }
        CpuDense { n, ata, atp, atw1 }
    }

    fn max_abs(v: &[f64]) -> f64 {
        v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
    }

    /// Compares `got` with the CPU path patch by patch and returns the largest differences of
    /// AᵀWA, AᵀWp and AᵀW1, each relative to the patch's largest entry of that quantity.
    /// Also asserts what must hold exactly: every element written (finite), the padding an
    /// identity, the matrix bitwise symmetric, and zero exactly where the CPU has no pair.
    fn compare_with_cpu(
        got: &HostDense,
        inputs: &[PatchInput<'_>],
        regularize: f64,
        epsilon: f64,
    ) -> [f64; 3] {
        let nmax = got.nmax;
        assert_eq!(got.npatch, inputs.len());
        let mut worst = [0.0f64; 3];
        for (b, inp) in inputs.iter().enumerate() {
            let cpu = cpu_dense(inp, regularize, epsilon);
            let n = cpu.n;
            let scale = max_abs(&cpu.ata);
            assert!(scale > 0.0);
            for u in 0..nmax {
                for v in 0..nmax {
                    let g = got.ata(b, v, u);
                    assert!(g.is_finite(), "patch {b}: AᵀWA[{v}, {u}] = {g}");
                    if u < n && v < n {
                        let c = cpu.ata[u * n + v];
                        assert_eq!(
                            g.to_bits(),
                            got.ata(b, u, v).to_bits(),
                            "symmetry {b} {u} {v}"
                        );
                        assert_eq!(g == 0.0, c == 0.0, "patch {b} ({v}, {u}): {g} vs {c}");
                        worst[0] = worst[0].max((g - c).abs() / scale);
                    } else {
                        let want = if u == v { 1.0 } else { 0.0 };
                        assert_eq!(g, want, "patch {b}: padding ({v}, {u})");
                    }
                }
            }
            for (k, (all, cpu_v)) in [(&got.atp, &cpu.atp), (&got.atw1, &cpu.atw1)]
                .into_iter()
                .enumerate()
            {
                let g = &all[b * nmax..(b + 1) * nmax];
                let scale = max_abs(cpu_v);
                for (u, &x) in g.iter().enumerate() {
                    assert!(x.is_finite(), "patch {b}: vector {k} [{u}] = {x}");
                    if u < n {
                        worst[k + 1] = worst[k + 1].max((x - cpu_v[u]).abs() / scale);
                    } else {
                        assert_eq!(x, 0.0, "patch {b}: padding of vector {k} at {u}");
                    }
                }
            }
        }
        worst
    }

    /// What the scenes promise: trimmed spots, spots wholly outside, masked pixels, and an
    /// unknown whose every pixel is masked.
    fn assert_scene_covers_edge_cases(layout: &BatchLayout, inputs: &[PatchInput<'_>]) {
        let ny = layout.ny as i32;
        let slots =
            (0..layout.npatch).flat_map(|b| (0..layout.n(b)).map(move |u| b * layout.nmax + u));
        let (mut cut_top, mut cut_bottom, mut outside) = (0, 0, 0);
        for s in slots {
            let g = &layout.geom[4 * s..4 * s + 4];
            cut_top += usize::from(g[2] > 0 && g[2] < g[3]);
            cut_bottom += usize::from(g[3] < ny && g[2] < g[3]);
            outside += usize::from(g[3] <= g[2]);
        }
        assert!(
            cut_top > 0 && cut_bottom > 0 && outside > 0,
            "{cut_top} {cut_bottom} {outside}"
        );
        assert!(inputs.iter().all(|i| i.ivar.iter().any(|&v| v == 0.0)));
        let cpu = cpu_dense(&inputs[0], 0.0, 0.0);
        assert!(cpu.atw1.contains(&0.0) && max_abs(&cpu.atw1) > 0.0);
        assert!(
            layout.n(0) != layout.nmax || inputs.iter().any(|i| i.patch.nunknown() < layout.nmax)
        );
    }

    #[test]
    fn layout_matches_the_cpu_geometry_pixels_and_spots() {
        let scene = toy_scene(1);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.npatch, inputs.len());
        assert_eq!(
            layout.nmax,
            inputs.iter().map(|i| i.patch.nunknown()).max().unwrap()
        );
        let nps = layout.ny * layout.nx;
        let mut geom = Vec::new();
        let mut stored = 0;
        for (b, inp) in inputs.iter().enumerate() {
            cpu_normal::geometry(inp, &mut geom);
            assert_eq!(layout.n(b), geom.len());
            let (wny, wnx) = (inp.window.ny(), inp.window.nx());
            assert_eq!(
                &layout.patch[4 * b + 1..4 * b + 3],
                &[wny as i32, wnx as i32]
            );
            let off = layout.win_off[b] as usize;
            for r in 0..wny {
                for c in 0..wnx {
                    assert_eq!(layout.pix[off + r * wnx + c], inp.pix[[r, c]]);
                    assert_eq!(layout.ivar[off + r * wnx + c], inp.ivar[[r, c]]);
                }
            }
            for s in 0..layout.nmax {
                let slot = b * layout.nmax + s;
                let ours = &layout.geom[4 * slot..4 * slot + 4];
                match geom.get(s) {
                    Some(g) => {
                        let want = [g.row0 as i32, g.col0 as i32, g.iy0 as i32, g.iy1 as i32];
                        assert_eq!(ours, &want, "patch {b} unknown {s}");
                        let so = layout.spot_off[slot] as usize;
                        assert_eq!(
                            &layout.spots[so..so + nps],
                            &inp.spots.values()[g.spot..g.spot + nps]
                        );
                    }
                    None => {
                        assert_eq!(ours, &[0, 0, 0, 0]);
                        assert_eq!(layout.spot_off[slot], 0);
                    }
                }
            }
            stored += geom.len();
        }
        // Neighbouring patches share their padding bins' spots, stored once.
        assert!(layout.spots.len() < stored * nps);
        assert_eq!(layout.spots.len() % nps, 0);
    }

    #[test]
    fn layout_refuses_what_the_kernel_cannot_index() {
        assert!(BatchLayout::new(&[])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let scene = toy_scene(2);
        let mut inputs = scene.inputs();
        // A window one column narrower than its spots: the kernel reads no column bounds.
        let inp = &mut inputs[1];
        inp.window.xmax -= 1;
        inp.ccd.xmax -= 1;
        let nx = inp.window.nx();
        inp.pix = inp.pix.slice_move(ndarray::s![.., ..nx]);
        inp.ivar = inp.ivar.slice_move(ndarray::s![.., ..nx]);
        let err = BatchLayout::new(&inputs).unwrap_err().to_string();
        assert!(err.contains("spans columns"), "{err}");
    }

    #[test]
    fn twin_matches_the_cpu_on_toy_patches() {
        let scene = toy_scene(3);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_scene_covers_edge_cases(&layout, &inputs);
        for (reg, eps) in [(0.0, 1e-15), (0.05, 1e-8)] {
            let got = twin(&layout, reg, eps);
            let worst = compare_with_cpu(&got, &inputs, reg, eps);
            eprintln!(
                "twin vs CPU, toy (regularize {reg}): AᵀWA {:.1e}, AᵀWp {:.1e}, AᵀW1 {:.1e}",
                worst[0], worst[1], worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-13), "{worst:?}");
        }
    }

    #[test]
    fn twin_matches_the_cpu_on_real_psf_patches() {
        if crate::io::shared_data("psf-r0-00067784.fits").is_none() {
            eprintln!("skipping: the real PSF is not in ../shared/data");
            return;
        }
        // Bundle-edge subbundles (6 fibers), middle ones (7), the first and last bins.
        let picks = [0usize, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10];
        let (scene, what) = bundle_scene(Some(&picks), 4);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(what, "real PSF");
        assert_eq!(layout.nmax, 7 * 74);
        assert_scene_covers_edge_cases(&layout, &inputs);
        let bytes = 8 * (layout.pix.len() + layout.ivar.len() + layout.spots.len())
            + 4 * (layout.patch.len() + layout.geom.len())
            + 8 * (layout.win_off.len() + layout.spot_off.len());
        eprintln!(
            "real PSF layout: {} patches, {:.0} kB of inputs per patch, {:.2} MB of outputs",
            layout.npatch,
            bytes as f64 / layout.npatch as f64 / 1e3,
            8.0 * (layout.nmax * layout.nmax + 2 * layout.nmax) as f64 / 1e6
        );
        let got = twin(&layout, 0.0, 1e-15);
        let worst = compare_with_cpu(&got, &inputs, 0.0, 1e-15);
        eprintln!(
            "twin vs CPU, real PSF: AᵀWA {:.1e}, AᵀWp {:.1e}, AᵀW1 {:.1e}",
            worst[0], worst[1], worst[2]
        );
        assert!(worst.iter().all(|&w| w <= 1e-13), "{worst:?}");
    }

    /// normal.cu on GPU 0 against the CPU path (≤ 1e-12 of the largest entry) and against the
    /// twin, on a whole bundle at the real size, with outputs poisoned with NaN beforehand.
    #[test]
    fn gpu_matches_the_cpu_and_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let kernels = Kernels::load(&gpu).expect("normal.cu compiles and loads");
        let (scene, what) = bundle_scene(None, 5);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        assert_eq!(layout.nmax, 7 * 74);
        assert_scene_covers_edge_cases(&layout, &inputs);
        let mut out = DenseBatch::alloc(&gpu, &layout).unwrap();
        for (reg, eps) in [(0.0, 1e-15), (1e-4, 1e-8)] {
            let st = &gpu.stream;
            st.memcpy_htod(&vec![f64::NAN; out.ata.len()], &mut out.ata)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.atp.len()], &mut out.atp)
                .unwrap();
            st.memcpy_htod(&vec![f64::NAN; out.atw1.len()], &mut out.atw1)
                .unwrap();
            let up = UploadedLayout::upload(&gpu, &layout, OnDevice::default()).unwrap();
            build_into(&gpu, &kernels, &up.buffers(), reg, eps, &mut out).unwrap();
            let got = out.download(&gpu).unwrap();
            let worst = compare_with_cpu(&got, &inputs, reg, eps);
            let tw = twin(&layout, reg, eps);
            let mut differ = 0usize;
            let mut twin_worst = 0.0f64;
            for (g, t) in [
                (&got.ata, &tw.ata),
                (&got.atp, &tw.atp),
                (&got.atw1, &tw.atw1),
            ] {
                let scale = max_abs(t);
                for (a, b) in g.iter().zip(t.iter()) {
                    differ += usize::from(a.to_bits() != b.to_bits());
                    twin_worst = twin_worst.max((a - b).abs() / scale);
                }
            }
            eprintln!(
                "GPU ({}) vs CPU, {} patches, {what}, regularize {reg}: AᵀWA {:.1e}, AᵀWp \
                 {:.1e}, AᵀW1 {:.1e}; vs twin: {differ} elements differ, max {twin_worst:.1e}",
                gpu.info.name,
                inputs.len(),
                worst[0],
                worst[1],
                worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1e-12), "{worst:?}");
            // The twin rounds exactly as the kernel is written to; anything beyond rounding
            // noise means the two have drifted apart.
            assert!(twin_worst <= 1e-14, "GPU vs twin {twin_worst:e}");
        }
        // The one-call entry point gives the same buffers.
        let once = build(&gpu, &inputs, 1e-4, 1e-8)
            .unwrap()
            .download(&gpu)
            .unwrap();
        let again = out.download(&gpu).unwrap();
        assert!(once
            .ata
            .iter()
            .zip(&again.ata)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(once
            .atp
            .iter()
            .zip(&again.atp)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
