//! The fast CPU path against the dense oracle, on small synthetic patches.

use ndarray::{s, Array2};

use super::{chi2, extract_patch, normal, oracle, Workspace};
use crate::extract::{ExtractOptions, ModelFlux, PatchInput};
use crate::patch::{pixels, PatchOptions, Plan, WaveGrid};
use crate::psf::{spots, LegendreSet, Psf, PsfParam};

/// A small PSF with straight, slightly tilted traces: `nfiber` fibers 7 px apart.
pub(crate) fn toy_psf(nfiber: usize, ghdeg: usize) -> Psf {
    let (wmin, wmax) = (5000.0, 6000.0);
    let set = |f: &dyn Fn(usize) -> Vec<f64>| LegendreSet {
        wavemin: wmin,
        wavemax: wmax,
        coeff: Array2::from_shape_fn((nfiber, 2), |(i, k)| f(i)[k]),
    };
    let mut params = vec![
        PsfParam {
            name: "GHSIGX".into(),
            series: set(&|_| vec![1.05, 0.03]),
        },
        PsfParam {
            name: "GHSIGY".into(),
            series: set(&|_| vec![1.1, 0.05]),
        },
    ];
    for i in 0..=ghdeg {
        for j in 0..=ghdeg {
            let c0 = if i == 0 && j == 0 {
                1.0
            } else {
                0.02 / (1 + i + j) as f64
            };
            params.push(PsfParam {
                name: format!("GH-{i}-{j}"),
                series: set(&|_| vec![c0, 0.01]),
            });
        }
    }
    Psf {
        npix_x: 7 * nfiber + 20,
        npix_y: 1300,
        hsizex: 4,
        hsizey: 3,
        ghdegx: ghdeg,
        ghdegy: ghdeg,
        legdeg: 1,
        fibermin: 0,
        fiber0: 0,
        xtrace: set(&|i| vec![10.0 + 7.0 * i as f64 + 0.37, 0.6]),
        ytrace: set(&|_| vec![650.0, 600.0]),
        params,
        psferr: None,
        in_psf: None,
        camera: None,
    }
}

/// `nfiber` toy fibers in one bundle of `nsubbundles`, with their grid from `wmin` to `wmax`
/// by 1 Å, plan and spots, and a smooth image with noise-like structure.
struct ToyScene {
    psf: Psf,
    popts: PatchOptions,
    plan: Plan,
    spots: spots::SpotSet,
    pix: Array2<f64>,
}

impl ToyScene {
    fn new(nfiber: usize, nsubbundles: usize, wavepad: usize, (wmin, wmax): (f64, f64)) -> Self {
        let psf = toy_psf(nfiber, 2);
        let popts = PatchOptions {
            bundlesize: nfiber,
            nsubbundles,
            nwavestep: 20,
            wavepad,
            ..Default::default()
        };
        let grid = WaveGrid::new(wmin, wmax, 1.0, &popts).unwrap();
        let plan = Plan::new(0, nfiber, grid.wave.len(), psf.nfiber(), &popts);
        let spots = spots::evaluate(&psf, 0, nfiber, &grid.padded).unwrap();
        let pix = Array2::from_shape_fn((psf.npix_y, psf.npix_x), |(r, c)| {
            100.0 + 30.0 * ((r as f64 * 0.37).sin() + (c as f64 * 0.61).cos())
        });
        ToyScene {
            psf,
            popts,
            plan,
            spots,
            pix,
        }
    }
}

/// Per-patch options without regularisation, with `model_image` and `leverage`.
fn toy_options(model_image: Option<ModelFlux>, leverage: bool) -> ExtractOptions {
    ExtractOptions {
        regularize: 0.0,
        psferr: 0.01,
        ndiag: 3,
        model_image,
        leverage,
    }
}

#[test]
fn fast_path_matches_dense_oracle() {
    let ToyScene {
        psf,
        popts,
        plan,
        spots,
        pix,
    } = ToyScene::new(12, 3, 5, (5200.0, 5260.0));
    // A few masked rows.
    let mut ivar = Array2::from_elem(pix.dim(), 0.01);
    for r in 300..1000 {
        if r % 97 == 0 {
            ivar.slice_mut(s![r, ..]).fill(0.0);
        }
    }
    let opts = toy_options(Some(ModelFlux::Decorrelated), false);
    let mut ws = Workspace::default();
    let mut checked = 0;
    for p in plan.patches.iter().flatten() {
        let window = pixels::window(p, &spots, popts.pixpad_frac);
        assert!(window.on_ccd(psf.npix_y, psf.npix_x));
        let inp = PatchInput::from_ccd(*p, window, pix.view(), ivar.view(), &spots);
        let fast = extract_patch(&inp, &opts, &mut ws);
        let dense = oracle::extract_patch_dense(&inp, &opts).expect("oracle solves");
        assert!(!fast.info.failed && !fast.info.retried);
        for ((a, b), iv) in fast.flux.iter().zip(&dense.flux).zip(&dense.fluxivar) {
            let pull = (a - b).abs() * iv.sqrt();
            assert!(pull < 1e-6, "flux pull {pull}: {a} vs {b}");
        }
        for (a, b) in fast.fluxivar.iter().zip(&dense.fluxivar) {
            assert!((a - b).abs() <= 1e-8 * b.abs(), "ivar {a} vs {b}");
        }
        for (a, b) in fast.resolution.iter().zip(&dense.resolution) {
            assert!((a - b).abs() < 1e-9, "resolution {a} vs {b}");
        }
        for (a, b) in fast.chi2pix.iter().zip(&dense.chi2pix) {
            assert!(
                (a - b).abs() <= 1e-8 * (1.0 + b.abs()),
                "chi2pix {a} vs {b}"
            );
        }
        for (a, b) in fast.pixmask_fraction.iter().zip(&dense.pixmask_fraction) {
            assert!((a - b).abs() < 1e-12);
        }
        let (fm, dm) = (fast.model.unwrap(), dense.model.unwrap());
        for (a, b) in fm.iter().zip(&dm) {
            assert!((a - b).abs() <= 1e-8 * (1.0 + b.abs()));
        }
        checked += 1;
    }
    assert_eq!(checked, plan.npatch());
}

/// Each flux choice projects its own flux for the core fibers' core bins: `decorrelated` is
/// gpu_specter's image as spextract wrote it before the choice existed, bit for bit (`R·f` of
/// every core bin through `chi2::add_spots` in unknown order); `deconvolved` is `A_core · f`,
/// as the dense oracle computes it.
#[test]
fn model_image_projects_the_chosen_flux() {
    let ToyScene {
        popts,
        plan,
        spots,
        pix,
        ..
    } = ToyScene::new(12, 3, 5, (5200.0, 5260.0));
    let ivar = Array2::from_elem(pix.dim(), 0.01);
    let opts = |which| toy_options(Some(which), false);
    let mut ws = Workspace::default();
    let mut checked = 0;
    for p in plan.patches.iter().flatten() {
        let nwt = p.nwavetot;
        if p.nwave_keep != nwt - 2 * p.wavepad {
            continue; // a last, short patch keeps fewer bins than it models
        }
        let window = pixels::window(p, &spots, popts.pixpad_frac);
        let inp = PatchInput::from_ccd(*p, window, pix.view(), ivar.view(), &spots);
        let dec = extract_patch(&inp, &opts(ModelFlux::Decorrelated), &mut ws);
        let mut geom = Vec::new();
        normal::geometry(&inp, &mut geom);
        let core = p.core_fiber_offset();
        let mut coef = vec![0.0; geom.len()];
        for c in 0..p.nspec {
            for j in 0..p.nwave_keep {
                coef[(core + c) * nwt + p.wavepad + j] = dec.flux[[c, j]];
            }
        }
        let mut expect = vec![0.0; window.ny() * window.nx()];
        chi2::add_spots(
            &inp,
            &geom,
            &coef,
            core * nwt..(core + p.nspec) * nwt,
            &mut expect,
        );
        let got = dec.model.unwrap();
        assert!(got
            .iter()
            .zip(&expect)
            .all(|(a, b)| a.to_bits() == b.to_bits()));

        let dcv = extract_patch(&inp, &opts(ModelFlux::Deconvolved), &mut ws);
        let dense = oracle::extract_patch_dense(&inp, &opts(ModelFlux::Deconvolved)).unwrap();
        let (fm, dm) = (dcv.model.unwrap(), dense.model.unwrap());
        for (a, b) in fm.iter().zip(&dm) {
            assert!((a - b).abs() <= 1e-8 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // The two images differ: R smooths the flux before it is projected.
        let diff = fm
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff > 1e-3,
            "deconvolved and decorrelated models agree to {diff}"
        );
        checked += 1;
    }
    assert!(checked > 0);
}

/// Each pixel's leverage on the model image, from the band of `C` the solve keeps, is the
/// dense hat matrix's diagonal over the core fibers' core bins; and it is what the model
/// does when the pixel moves.
#[test]
fn leverage_is_the_hat_matrix_diagonal() {
    let ToyScene {
        popts,
        plan,
        spots,
        pix,
        ..
    } = ToyScene::new(12, 3, 5, (5200.0, 5260.0));
    let ivar = Array2::from_shape_fn(pix.dim(), |(r, c)| 0.01 + 0.001 * ((r + c) % 5) as f64);
    let opts = toy_options(Some(ModelFlux::Deconvolved), true);
    let mut ws = Workspace::default();
    let p = plan.patches[0][1];
    let window = pixels::window(&p, &spots, popts.pixpad_frac);
    let inp = PatchInput::from_ccd(p, window, pix.view(), ivar.view(), &spots);
    let fast = extract_patch(&inp, &opts, &mut ws);
    let dense = oracle::extract_patch_dense(&inp, &opts).unwrap();
    let (h, hd) = (fast.leverage.unwrap(), dense.leverage.unwrap());
    let hmax = hd.iter().copied().fold(0.0, f64::max);
    // The core bins' share of the hat matrix's diagonal (it may pass 1 where the padding
    // bins' share is negative).
    assert!(hmax > 0.05, "{hmax}");
    for (a, b) in h.iter().zip(&hd) {
        assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // The model moves by h when the pixel of the largest leverage moves by one.
    let (k, _) = h
        .iter()
        .enumerate()
        .fold((0, 0.0), |m, (k, &v)| if v > m.1 { (k, v) } else { m });
    let (ry, rx) = (k / window.nx(), k % window.nx());
    let mut moved = pix.clone();
    moved[[window.ymin as usize + ry, window.xmin as usize + rx]] += 1.0;
    let inp2 = PatchInput::from_ccd(p, window, moved.view(), ivar.view(), &spots);
    let after = extract_patch(&inp2, &opts, &mut ws).model.unwrap();
    let before = extract_patch(&inp, &opts, &mut ws).model.unwrap();
    let dm = after[[ry, rx]] - before[[ry, rx]];
    assert!((dm - h[[ry, rx]]).abs() < 1e-6, "{dm} vs {}", h[[ry, rx]]);
}

#[test]
fn resolution_rows_sum_to_one_and_the_band_keeps_them() {
    let psf = toy_psf(10, 2);
    let popts = PatchOptions {
        bundlesize: 10,
        nsubbundles: 2,
        nwavestep: 30,
        wavepad: 8,
        ..Default::default()
    };
    let grid = WaveGrid::new(5300.0, 5360.0, 1.0, &popts).unwrap();
    let plan = Plan::new(0, 10, grid.wave.len(), psf.nfiber(), &popts);
    let spots = spots::evaluate(&psf, 0, 10, &grid.padded).unwrap();
    let pix = Array2::from_elem((psf.npix_y, psf.npix_x), 50.0);
    let ivar = Array2::from_elem(pix.dim(), 0.02);
    let ndiag = 3;
    let opts = ExtractOptions {
        regularize: 0.0,
        psferr: 0.01,
        ndiag,
        model_image: None,
        leverage: false,
    };
    let mut ws = Workspace::default();
    for p in plan.patches.iter().flatten() {
        let window = pixels::window(p, &spots, popts.pixpad_frac);
        let inp = PatchInput::from_ccd(*p, window, pix.view(), ivar.view(), &spots);
        let res = extract_patch(&inp, &opts, &mut ws);
        assert!(!res.info.failed);
        let nwt = p.nwavetot;
        let row_lo = p.wavepad - ndiag;
        let nrow = ws.s.len() / p.nspec;
        for c in 0..p.nspec {
            for j in 0..p.nwave_keep {
                let ri = p.wavepad + j - row_lo;
                let row = &ws.r[(c * nrow + ri) * nwt..(c * nrow + ri + 1) * nwt];
                let total: f64 = row.iter().sum();
                assert!((total - 1.0).abs() < 1e-12, "row sum {total}");
                let jj = p.wavepad + j;
                let band: f64 = row[jj - ndiag..=jj + ndiag].iter().sum();
                assert!(band > 0.99, "band keeps {band}");
                assert!(res.fluxivar[[c, j]] > 0.0);
            }
        }
    }
}

/// Bundle 0 of the real DESI PSF and the shared preproc image, on the r grid, for the tests
/// that check a route against another on real patches.
pub(crate) struct RealBundle0 {
    pub img: crate::io::image::Preproc,
    pub popts: PatchOptions,
    pub plan: Plan,
    pub spots: crate::psf::SpotSet,
    pub opts: ExtractOptions,
}

/// Patches of [`RealBundle0`] at the bundle's lower edge (6 fibers), its middle (7) and the
/// end of the grid.
pub(crate) const EDGE_MIDDLE_END: [usize; 6] = [0, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10];

impl RealBundle0 {
    /// None, saying so, when ../shared/data is missing.
    pub fn load() -> Option<RealBundle0> {
        let (Some(psf_path), Some(img_path)) = (
            crate::io::shared_data("psf-r0-00067784.fits"),
            crate::io::shared_data("preproc-r0-b00.fits.gz"),
        ) else {
            eprintln!("skipping: the real PSF or preproc is not in ../shared/data");
            return None;
        };
        let psf = crate::io::psf::read_psf(&psf_path).unwrap();
        let img =
            crate::io::image::read_preproc(&img_path, crate::io::image::EXTRACT_MASK_BITS).unwrap();
        let popts = PatchOptions::default();
        let grid = WaveGrid::new(5760.0, 7620.0, 0.8, &popts).unwrap();
        let plan = Plan::new(0, 25, grid.wave.len(), psf.nfiber(), &popts);
        let spots = spots::evaluate(&psf, 0, 25, &grid.padded).unwrap();
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag: psf.hsizey,
            model_image: None,
            leverage: false,
        };
        Some(RealBundle0 {
            img,
            popts,
            plan,
            spots,
            opts,
        })
    }

    /// Patches `picks` of the bundle, cut from the whole CCD.
    pub fn inputs(&self, picks: &[usize]) -> Vec<PatchInput<'_>> {
        picks
            .iter()
            .map(|&k| {
                let p = self.plan.patches[0][k];
                let w = pixels::window(&p, &self.spots, self.popts.pixpad_frac);
                PatchInput::from_ccd(
                    p,
                    w,
                    self.img.image.view(),
                    self.img.ivar.view(),
                    &self.spots,
                )
            })
            .collect()
    }
}

/// The acceptance check of the fast route: on the real DESI PSF and the shared preproc image,
/// it agrees with the dense eigendecomposition oracle to a maximum pull of 1e-6, on patches at
/// the bundle's lower edge (6 fibers), in its middle (7), and at the end of the grid.
#[test]
fn fast_path_matches_dense_oracle_on_the_real_psf() {
    let Some(real) = RealBundle0::load() else {
        return;
    };
    let opts = real.opts;
    let mut ws = Workspace::default();
    let mut worst = 0.0f64;
    for inp in real.inputs(&EDGE_MIDDLE_END) {
        let fast = extract_patch(&inp, &opts, &mut ws);
        let dense = oracle::extract_patch_dense(&inp, &opts).expect("oracle solves");
        for ((a, b), (ia, ib)) in fast
            .flux
            .iter()
            .zip(&dense.flux)
            .zip(fast.fluxivar.iter().zip(&dense.fluxivar))
        {
            let pull = (a - b).abs() / (1.0 / ia + 1.0 / ib).sqrt();
            worst = worst.max(pull);
        }
        for (a, b) in fast.resolution.iter().zip(&dense.resolution) {
            assert!((a - b).abs() < 1e-9, "resolution {a} vs {b}");
        }
    }
    eprintln!("fast vs dense oracle on the real PSF: max pull {worst:.2e}");
    assert!(worst < 1e-6, "max pull {worst}");
}

/// The inlined band Cholesky gives LAPACK dpbtrf's factor at the real size (518 unknowns,
/// kd 58), and reports the first non-positive pivot as dpbtrf's info does (1-based there).
#[test]
fn band_cholesky_matches_dpbtrf() {
    use rand::{Rng, SeedableRng};
    let (n, kd) = (518usize, 58usize);
    let ldab = kd + 1;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut ab = vec![0.0f64; n * ldab];
    for j in 0..n {
        for d in 1..=kd.min(n - 1 - j) {
            ab[j * ldab + d] = rng.gen_range(-1.0..1.0);
        }
    }
    // Diagonally dominant, hence positive definite.
    for j in 0..n {
        ab[j * ldab] = 2.0 * kd as f64 + rng.gen_range(0.0..1.0);
    }
    let mut ours = ab.clone();
    let mut theirs = ab.clone();
    super::decorrelate::band_cholesky(n, kd, &mut ours).expect("positive definite");
    assert_eq!(super::lapack::pbtrf_lower(n, kd, &mut theirs), 0);
    let maxdiff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-300))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    assert!(maxdiff < 1e-12, "relative difference {maxdiff:e}");

    let mut bad = ab.clone();
    bad[300 * ldab] = -1.0;
    let mut lap = bad.clone();
    assert_eq!(super::decorrelate::band_cholesky(n, kd, &mut bad), Err(300));
    assert_eq!(super::lapack::pbtrf_lower(n, kd, &mut lap), 301);
}

/// A patch whose window leaves the CCD is the same patch on a taller CCD whose extra rows are
/// masked, bit for bit, apart from its bins with less than `MIN_CCD_LIGHT` of their light on
/// the CCD, whose flux, ivar and chi2pix are 0; its `ccd_light` is what the pixmask fraction
/// leaves.
#[test]
fn a_window_leaving_the_ccd_is_extracted_with_the_rows_off_it_masked() {
    use crate::extract::MIN_CCD_LIGHT;
    let ToyScene {
        popts,
        plan,
        spots,
        pix,
        ..
    } = ToyScene::new(10, 2, 8, (5300.0, 5400.0));
    let ivar = Array2::from_elem(pix.dim(), 0.01);
    let opts = toy_options(None, false);
    let p = plan.patches[0][2];
    let window = pixels::window(&p, &spots, popts.pixpad_frac);
    // The CCD ends a little below the middle of the window: some core bins keep most of their
    // light, some a part, some none.
    let cut = (window.ymin + window.ny() as i64 / 2) as usize;
    let short = (pix.slice(s![..cut, ..]), ivar.slice(s![..cut, ..]));
    let edge = PatchInput::from_ccd(p, window, short.0, short.1, &spots);
    assert!(edge.leaves_ccd() && edge.ccd.ymax == cut as i64);
    let mut masked = ivar.clone();
    masked.slice_mut(s![cut.., ..]).fill(0.0);
    let tall = PatchInput::from_ccd(p, window, pix.view(), masked.view(), &spots);
    assert!(!tall.leaves_ccd());
    let mut ws = Workspace::default();
    let a = extract_patch(&edge, &opts, &mut ws);
    let b = extract_patch(&tall, &opts, &mut ws);
    assert!(!a.info.failed && b.ccd_light.is_none());
    let light = a
        .ccd_light
        .as_ref()
        .expect("the light on the CCD of each bin");
    let (mut starved, mut kept) = (0, 0);
    for ((c, j), &l) in light.indexed_iter() {
        // The core spots lie inside the window, so the light not on the CCD is masked light.
        assert!(
            (l - (1.0 - b.pixmask_fraction[[c, j]])).abs() < 1e-12,
            "bin ({c}, {j}): light {l} vs pixmask {}",
            b.pixmask_fraction[[c, j]]
        );
        let res = |r: &crate::extract::PatchResult| {
            let mut v = vec![r.flux[[c, j]], r.fluxivar[[c, j]], r.chi2pix[[c, j]]];
            v.extend(r.resolution.slice(s![c, .., j]).iter());
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        if l < MIN_CCD_LIGHT {
            starved += 1;
            // Flux, ivar and chi2pix zeroed; the resolution column (neighbours' weights) kept.
            assert!(
                res(&a)[..3].iter().all(|&x| x == 0),
                "bin ({c}, {j}) not zeroed"
            );
            assert_eq!(res(&a)[3..], res(&b)[3..], "bin ({c}, {j})");
        } else {
            kept += 1;
            assert_eq!(res(&a), res(&b), "bin ({c}, {j})");
            assert!(a.fluxivar[[c, j]] > 0.0);
        }
        assert_eq!(
            a.pixmask_fraction[[c, j]].to_bits(),
            b.pixmask_fraction[[c, j]].to_bits()
        );
    }
    assert!(starved > 0 && kept > 0, "{starved} starved, {kept} kept");
    assert_eq!(a.starved().count(), starved);
}
