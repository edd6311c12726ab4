//! The stages' shared test fixture: a bundle's spots (toy, or the real PSF at the real size)
//! and a [`Scene`] of pixels over the union of some of its patches' windows, with the edge
//! cases a [`Recipe`] asks for: a trimmed copy of one patch, masked pixels, a wholly masked
//! spot.

use ndarray::Array2;
use rand::{Rng, SeedableRng};

use crate::extract::cpu::tests::toy_psf;
use crate::extract::PatchInput;
use crate::patch::{pixels, Patch, PatchOptions, PixelWindow, Plan, WaveGrid};
use crate::psf::{spots, Psf, SpotSet};

/// Bundle 0 of a PSF: its spots over a wavelength grid and its patches.
pub(super) struct Bundle {
    pub psf: Psf,
    pub popts: PatchOptions,
    pub grid: WaveGrid,
    pub spots: SpotSet,
    /// The patches a scene of it holds: every patch of the bundle, subbundle by subbundle,
    /// until [`Bundle::pick`] or the caller changes them.
    pub patches: Vec<Patch>,
    /// "real PSF" or "toy PSF".
    pub what: &'static str,
}

impl Bundle {
    fn new(
        psf: Psf,
        popts: PatchOptions,
        grid: WaveGrid,
        nfiber: usize,
        what: &'static str,
    ) -> Bundle {
        let plan = Plan::new(0, nfiber, grid.wave.len(), psf.nfiber(), &popts);
        let spots = spots::evaluate(&psf, 0, nfiber, &grid.padded).unwrap();
        let patches = plan.patches[0].clone();
        Bundle {
            psf,
            popts,
            grid,
            spots,
            patches,
            what,
        }
    }

    /// 12 toy fibers in `nsubbundles` subbundles, 32 bins (5200 to 5260 Å by 1 with 5 bins of
    /// padding each side), patches of 20 bins: four wavelength patches per subbundle.
    pub(super) fn toy(nsubbundles: usize) -> Bundle {
        let popts = PatchOptions {
            bundlesize: 12,
            nsubbundles,
            nwavestep: 20,
            wavepad: 5,
            ..Default::default()
        };
        let grid = WaveGrid::new(5200.0, 5260.0, 1.0, &popts).unwrap();
        Bundle::new(toy_psf(12, 2), popts, grid, 12, "toy PSF")
    }

    /// A whole bundle at the real size (25 fibers, subbundles of 6 or 7 fibers × 74 bins): on
    /// the real PSF when the shared data is there, else on a toy PSF of 25 fibers.
    pub(super) fn real_size() -> Bundle {
        let popts = PatchOptions::default();
        match crate::io::shared_data("psf-r0-00067784.fits") {
            Some(path) => {
                let grid = WaveGrid::new(5760.0, 7620.0, 0.8, &popts).unwrap();
                let psf = crate::io::psf::read_psf(&path).unwrap();
                Bundle::new(psf, popts, grid, 25, "real PSF")
            }
            None => {
                let grid = WaveGrid::new(5100.0, 5900.0, 1.0, &popts).unwrap();
                Bundle::new(toy_psf(25, 2), popts, grid, 25, "toy PSF")
            }
        }
    }

    /// Keeps the patches at `picks` (one past the end stands for the last), all of them for
    /// `None`.
    pub(super) fn pick(mut self, picks: Option<&[usize]>) -> Bundle {
        if let Some(k) = picks {
            let all = &self.patches;
            self.patches = k.iter().map(|&k| all[k.min(all.len() - 1)]).collect();
        }
        self
    }

    /// A [`Scene`] of the bundle's spots over its patches' windows, with what `recipe` asks
    /// for, its pixels drawn from `seed`.
    pub(super) fn into_scene(self, seed: u64, recipe: Recipe) -> Scene {
        let pixpad_frac = self.popts.pixpad_frac;
        Scene::new(self.spots, &self.patches, pixpad_frac, seed, recipe)
    }
}

/// How a trimmed copy of one patch is appended: `patches[k]` whose window loses at least
/// `ny + 2` rows at the top and 3 at the bottom, so that some of its spots are cut (iy0 > 0,
/// iy1 < ny) and some lie wholly outside it (iy1 ≤ iy0).
#[derive(Clone, Copy)]
pub(super) enum Trim {
    /// Exactly `ny + 2` rows at the top.
    Rows(usize),
    /// At least to the middle of the first kept core bin's spot too (the wavelength padding
    /// alone spans more than ny rows on the real PSF), so that kept outputs see a cut spot.
    IntoKept(usize),
}

/// What the pixels hold. Either way ~3 % of them and every 41st row are masked, as cosmics and
/// bad rows leave.
#[derive(Clone, Copy, Default)]
pub(super) enum Pixels {
    /// Uniform in [-20, 400) with inverse variances uniform in [0.002, 0.05).
    #[default]
    Random,
    /// Every spot of the set at a random flux in [20, 400) plus Gaussian noise of variance
    /// 9 + signal, inverse variance 1 / variance: the solve is well posed and χ² ~ 1.
    Exposure,
}

/// Which spot of the first patch has every pixel masked.
#[derive(Clone, Copy)]
pub(super) enum Masked {
    /// The first solved fiber's, in the middle of all the patch's bins.
    MiddleBin,
    /// The first core fiber's, in the middle of the kept bins.
    MiddleKeptBin,
}

/// The edge cases a [`Scene`] is made with beyond its patches' windows and masked pixels.
#[derive(Clone, Copy, Default)]
pub(super) struct Recipe {
    pub trim: Option<Trim>,
    pub pixels: Pixels,
    pub masked: Option<Masked>,
}

/// Spots plus pixels over the union of some patches' windows.
pub(super) struct Scene {
    pub spots: SpotSet,
    pub pix: Array2<f64>,
    pub ivar: Array2<f64>,
    pub origin: (usize, usize),
    pub items: Vec<(Patch, PixelWindow)>,
}

impl Scene {
    /// `patches` with their windows, plus what `recipe` asks for, pixels drawn from `seed`.
    fn new(
        spots: SpotSet,
        patches: &[Patch],
        pixpad_frac: f64,
        seed: u64,
        recipe: Recipe,
    ) -> Scene {
        let mut items: Vec<(Patch, PixelWindow)> = patches
            .iter()
            .map(|p| (*p, pixels::window(p, &spots, pixpad_frac)))
            .collect();
        let (ny, nx) = (spots.ny, spots.nx);
        if let Some(trim) = recipe.trim {
            let (Trim::Rows(k) | Trim::IntoKept(k)) = trim;
            let (p, w) = items[k];
            let mut ymin = w.ymin + ny as i64 + 2;
            if let Trim::IntoKept(_) = trim {
                let first = spots.index(p.ispec - spots.grid.fibermin, p.iwave + p.wavepad);
                ymin = ymin.max(spots.yc[first] + ny as i64 / 2);
            }
            let cut = PixelWindow {
                ymin,
                ymax: w.ymax - 3,
                ..w
            };
            items.push((p, cut));
        }
        let ymin = items.iter().map(|(_, w)| w.ymin).min().unwrap();
        let ymax = items.iter().map(|(_, w)| w.ymax).max().unwrap();
        let xmin = items.iter().map(|(_, w)| w.xmin).min().unwrap();
        let xmax = items.iter().map(|(_, w)| w.xmax).max().unwrap();
        assert!(ymin >= 0 && xmin >= 0, "windows start at ({ymin}, {xmin})");
        let shape = ((ymax - ymin) as usize, (xmax - xmin) as usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (pix, mut ivar) = match recipe.pixels {
            Pixels::Random => {
                let pix = Array2::from_shape_fn(shape, |_| rng.gen_range(-20.0..400.0));
                let ivar = Array2::from_shape_fn(shape, |(r, _)| {
                    if r % 41 == 7 || rng.gen::<f64>() < 0.03 {
                        0.0
                    } else {
                        rng.gen_range(0.002..0.05)
                    }
                });
                (pix, ivar)
            }
            Pixels::Exposure => exposure(&spots, (ymin, xmin), shape, &mut rng),
        };
        if let Some(masked) = recipe.masked {
            let (p, _) = items[0];
            let i = match masked {
                Masked::MiddleBin => {
                    spots.index(p.specmin - spots.grid.fibermin, p.iwave + p.nwavetot / 2)
                }
                Masked::MiddleKeptBin => spots.index(
                    p.ispec - spots.grid.fibermin,
                    p.iwave + p.wavepad + p.nwave_keep / 2,
                ),
            };
            let (r0, c0) = ((spots.yc[i] - ymin) as usize, (spots.xc[i] - xmin) as usize);
            ivar.slice_mut(ndarray::s![r0..r0 + ny, c0..c0 + nx])
                .fill(0.0);
        }
        Scene {
            spots,
            pix,
            ivar,
            origin: (ymin as usize, xmin as usize),
            items,
        }
    }

    pub(super) fn inputs(&self) -> Vec<PatchInput<'_>> {
        self.items
            .iter()
            .map(|(p, w)| {
                PatchInput::from_region(
                    *p,
                    *w,
                    *w,
                    self.pix.view(),
                    self.ivar.view(),
                    self.origin,
                    &self.spots,
                )
            })
            .collect()
    }
}

/// [`Pixels::Exposure`] over the `shape` pixels from `origin`: (pixels, inverse variances).
fn exposure(
    spots: &SpotSet,
    (ymin, xmin): (i64, i64),
    (nyr, nxr): (usize, usize),
    rng: &mut rand_chacha::ChaCha8Rng,
) -> (Array2<f64>, Array2<f64>) {
    let (ny, nx) = (spots.ny, spots.nx);
    let mut img = Array2::<f64>::zeros((nyr, nxr));
    for i in 0..spots.xc.len() {
        let flux = rng.gen_range(20.0..400.0);
        for iy in 0..ny {
            for ix in 0..nx {
                let (r, c) = (
                    spots.yc[i] + iy as i64 - ymin,
                    spots.xc[i] + ix as i64 - xmin,
                );
                if (0..nyr as i64).contains(&r) && (0..nxr as i64).contains(&c) {
                    img[[r as usize, c as usize]] +=
                        flux * spots.values()[i * ny * nx + iy * nx + ix];
                }
            }
        }
    }
    let mut ivar = Array2::zeros((nyr, nxr));
    let mut pix = Array2::zeros((nyr, nxr));
    for ((r, c), &m) in img.indexed_iter() {
        let var = 9.0 + m.max(0.0);
        let z: f64 = rng.sample(rand_distr::StandardNormal);
        pix[[r, c]] = m + var.sqrt() * z;
        let masked = r % 41 == 7 || rng.gen::<f64>() < 0.03;
        ivar[[r, c]] = if masked { 0.0 } else { 1.0 / var };
    }
    (pix, ivar)
}
