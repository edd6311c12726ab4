//! Frame → bundles → subbundles → wavelength patches, with gpu_specter's padding rules.

/// How a frame is cut into patches (gpu_specter `spex` options).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatchOptions {
    /// Fibers per bundle; bundles are extracted independently.
    pub bundlesize: usize,
    /// Subbundles per bundle (desispec default 5).
    pub nsubbundles: usize,
    /// Core wavelength bins per patch.
    pub nwavestep: usize,
    /// Base wavelength padding on each side of a patch, in bins.
    pub wavepad: usize,
    /// Extra padding as a fraction of `wavepad` (total `wavepad + int(wavepad·wavepad_frac)`).
    pub wavepad_frac: f64,
    /// Fraction of the padding rows kept on each side of a patch's core rows.
    pub pixpad_frac: f64,
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            bundlesize: 25,
            nsubbundles: 5,
            nwavestep: 50,
            wavepad: 10,
            wavepad_frac: 0.2,
            pixpad_frac: 0.8,
        }
    }
}

impl PatchOptions {
    /// Total padding in bins on each side of a patch's core (12 by default).
    pub fn wavepad_total(&self) -> usize {
        self.wavepad + (self.wavepad as f64 * self.wavepad_frac) as usize
    }

    /// Checks the options are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.bundlesize == 0 || self.bundlesize > 10_000 {
            return Err(format!(
                "bundlesize {} must be in 1..=10000",
                self.bundlesize
            ));
        }
        if self.nsubbundles == 0 || self.nsubbundles > self.bundlesize {
            return Err(format!(
                "nsubbundles {} must be in 1..=bundlesize ({})",
                self.nsubbundles, self.bundlesize
            ));
        }
        if self.nwavestep == 0 || self.nwavestep > 10_000 {
            return Err(format!("nwavestep {} must be in 1..=10000", self.nwavestep));
        }
        if self.wavepad > 10_000 || !(0.0..=10.0).contains(&self.wavepad_frac) {
            return Err("wavepad must be ≤ 10000 and wavepad_frac in [0, 10]".into());
        }
        if !(0.0..=1.0).contains(&self.pixpad_frac) {
            return Err(format!(
                "pixpad_frac {} must be in [0, 1]",
                self.pixpad_frac
            ));
        }
        Ok(())
    }
}

/// The extraction wavelength grid and its padded extension.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaveGrid {
    /// Output grid, `numpy.arange(wmin, wmax + dw/2, dw)`.
    pub wave: Vec<f64>,
    /// Padded grid: `pad` bins below, the output grid, `pad + nwavestep` bins above.
    pub padded: Vec<f64>,
    /// Bins of padding below the output grid in `padded`.
    pub pad: usize,
}

impl WaveGrid {
    /// Builds the grid as numpy's `arange` does (step `(wmin + dw) - wmin`, length
    /// `ceil((stop - start) / step)`).
    pub fn new(wmin: f64, wmax: f64, dw: f64, opts: &PatchOptions) -> Result<WaveGrid, String> {
        if !(dw > 0.0) || !wmin.is_finite() || !wmax.is_finite() || wmax < wmin {
            return Err(format!(
                "wavelength range {wmin},{wmax},{dw} is not an increasing range with a positive step"
            ));
        }
        let stop = wmax + dw / 2.0;
        let n = ((stop - wmin) / dw).ceil();
        if !(1.0..=1.0e6).contains(&n) {
            return Err(format!(
                "wavelength range {wmin},{wmax},{dw} gives {n} bins"
            ));
        }
        let n = n as usize;
        let step = (wmin + dw) - wmin;
        let wave: Vec<f64> = (0..n).map(|i| wmin + i as f64 * step).collect();
        let pad = opts.wavepad_total();
        let last = wave[n - 1];
        let mut padded = Vec::with_capacity(n + 2 * pad + opts.nwavestep);
        padded.extend((0..pad).map(|i| wmin - (pad - i) as f64 * dw));
        padded.extend_from_slice(&wave);
        padded.extend((1..=pad + opts.nwavestep).map(|i| last + i as f64 * dw));
        Ok(WaveGrid { wave, padded, pad })
    }

    /// `numpy.gradient(wave)`: the bin width used for per-Ångström units.
    pub fn dwave(&self) -> Vec<f64> {
        let w = &self.wave;
        let n = w.len();
        if n < 2 {
            return vec![1.0; n];
        }
        (0..n)
            .map(|i| {
                if i == 0 {
                    w[1] - w[0]
                } else if i == n - 1 {
                    w[n - 1] - w[n - 2]
                } else {
                    (w[i + 1] - w[i - 1]) / 2.0
                }
            })
            .collect()
    }
}

/// One patch: core fibers × core wavelengths, with its padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Patch {
    /// Index of the bundle within the plan.
    pub bundle: usize,
    /// First core fiber (absolute).
    pub ispec: usize,
    /// Core fibers.
    pub nspec: usize,
    /// First fiber solved for, including the padding neighbour (absolute).
    pub specmin: usize,
    /// Fibers solved for (core plus 0, 1 or 2 neighbours).
    pub nspecpad: usize,
    /// First core bin in the output grid; also the patch's first bin in the padded grid.
    pub iwave: usize,
    /// Core bins written to the output (`nwavestep`, fewer for the last patch).
    pub nwave_keep: usize,
    /// Bins solved for: `nwavestep + 2·wavepad`.
    pub nwavetot: usize,
    /// Bins of padding below the core.
    pub wavepad: usize,
}

impl Patch {
    /// Unknowns in the patch's linear system.
    pub fn nunknown(&self) -> usize {
        self.nspecpad * self.nwavetot
    }

    /// Offset of the first core fiber within the solved fibers.
    pub fn core_fiber_offset(&self) -> usize {
        self.ispec - self.specmin
    }
}

/// The fibers `(first, count)` that `patches` solve for, padding neighbours included: the
/// fibers whose spots they need.
pub fn fiber_span(patches: &[Patch]) -> (usize, usize) {
    let lo = patches.iter().map(|p| p.specmin).min().unwrap_or(0);
    let hi = patches
        .iter()
        .map(|p| p.specmin + p.nspecpad)
        .max()
        .unwrap_or(lo);
    (lo, hi - lo)
}

/// All patches of a frame, in bundle, subbundle, wavelength order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// First fiber extracted.
    pub specmin: usize,
    /// Fibers extracted.
    pub nspec: usize,
    /// Bundles as `(first fiber, fibers)`.
    pub bundles: Vec<(usize, usize)>,
    /// Patches grouped by bundle: `patches[b]`.
    pub patches: Vec<Vec<Patch>>,
}

impl Plan {
    /// Cuts fibers `specmin .. specmin + nspec` and `nwave` output bins into patches.
    /// `nfiber_psf` bounds the padding neighbours.
    pub fn new(
        specmin: usize,
        nspec: usize,
        nwave: usize,
        nfiber_psf: usize,
        opts: &PatchOptions,
    ) -> Plan {
        let pad = opts.wavepad_total();
        let nwavetot = opts.nwavestep + 2 * pad;
        let mut bundles = Vec::new();
        let mut patches = Vec::new();
        let end = specmin + nspec;
        let mut bspecmin = specmin;
        while bspecmin < end {
            let bnspec = opts.bundlesize.min(end - bspecmin);
            let b = bundles.len();
            bundles.push((bspecmin, bnspec));
            let mut list = Vec::new();
            // numpy.array_split: the first (n % k) pieces get one more element.
            let (q, r) = (bnspec / opts.nsubbundles, bnspec % opts.nsubbundles);
            let mut ispec = bspecmin;
            for s in 0..opts.nsubbundles {
                let nsub = q + usize::from(s < r);
                if nsub == 0 {
                    continue;
                }
                // gpu_specter get_spec_padding: one neighbour on each side unless at a bundle
                // boundary; neighbours must exist in the PSF.
                let rel_lo = ispec - bspecmin;
                let rel_hi = rel_lo + nsub;
                let lo = if !rel_lo.is_multiple_of(opts.bundlesize) {
                    ispec - 1
                } else {
                    ispec
                };
                let hi = if !rel_hi.is_multiple_of(opts.bundlesize) {
                    (ispec + nsub + 1).min(nfiber_psf)
                } else {
                    ispec + nsub
                };
                let mut iwave = 0;
                while iwave < nwave {
                    list.push(Patch {
                        bundle: b,
                        ispec,
                        nspec: nsub,
                        specmin: lo,
                        nspecpad: hi - lo,
                        iwave,
                        nwave_keep: opts.nwavestep.min(nwave - iwave),
                        nwavetot,
                        wavepad: pad,
                    });
                    iwave += opts.nwavestep;
                }
                ispec += nsub;
            }
            patches.push(list);
            bspecmin += bnspec;
        }
        Plan {
            specmin,
            nspec,
            bundles,
            patches,
        }
    }

    /// Total number of patches.
    pub fn npatch(&self) -> usize {
        self.patches.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r_camera_grid_has_2326_bins_and_2400_padded() {
        let opts = PatchOptions::default();
        let g = WaveGrid::new(5760.0, 7620.0, 0.8, &opts).unwrap();
        assert_eq!(g.wave.len(), 2326);
        assert_eq!(g.pad, 12);
        assert_eq!(g.padded.len(), 2326 + 12 + 62);
        assert_eq!(g.padded[12], 5760.0);
        assert!((g.padded[0] - (5760.0 - 12.0 * 0.8)).abs() < 1e-9);
    }

    #[test]
    fn full_frame_plan_matches_gpu_specter_layout() {
        let opts = PatchOptions::default();
        let plan = Plan::new(0, 500, 2326, 500, &opts);
        assert_eq!(plan.bundles.len(), 20);
        assert_eq!(plan.npatch(), 20 * 5 * 47);
        let b0 = &plan.patches[0];
        assert_eq!(
            (b0[0].specmin, b0[0].nspecpad, b0[0].nunknown()),
            (0, 6, 444)
        );
        let mid = b0.iter().find(|p| p.ispec == 10).unwrap();
        assert_eq!((mid.specmin, mid.nspecpad, mid.nunknown()), (9, 7, 518));
        let last = b0.last().unwrap();
        assert_eq!((last.ispec, last.specmin, last.nspecpad), (20, 19, 6));
        assert_eq!(last.nwave_keep, 26);
    }

    #[test]
    fn partial_bundle_pads_with_existing_neighbour_only() {
        let opts = PatchOptions::default();
        let plan = Plan::new(490, 10, 100, 500, &opts);
        assert_eq!(plan.bundles, vec![(490, 10)]);
        let p = &plan.patches[0];
        assert_eq!(p.iter().map(|p| p.nspec).sum::<usize>(), 10 * 2);
        let top = p.iter().find(|p| p.ispec == 498).unwrap();
        assert_eq!((top.specmin, top.nspecpad), (497, 3));
    }
}
