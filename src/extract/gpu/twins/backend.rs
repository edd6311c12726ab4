//! The whole chain through the stages' host twins, and the backend's tests: the chain of
//! twins against the CPU backend on whole batches, the scheduler, and (on a GPU) the backend
//! against the CPU. Test-only; re-exports the product's `backend`.

use std::collections::VecDeque;
use std::ops::Range;

pub(super) use super::super::backend::assemble::{assemble, blocks_of, ChainOutputs};
pub(super) use super::super::backend::host::with_host_spots;
pub(super) use super::super::backend::schedule::{chunk_ranges, schedule, Chunks};
pub(super) use super::super::backend::*;
use super::super::GpuError;
use super::chi2;
use super::decorrelate::{self as decor, DecorrLayout, EigenRoute, MAX_SWEEPS};
use super::model::{self, HostColumns};
use super::normal::{self, BatchLayout, DevicePixels, Resident, ResidentSpots};
use super::solve::{self, PatchShape};
use super::unit::{self, UnitShape};
use crate::extract::cpu::CpuBackend;
use crate::extract::fallback::complete_on_cpu;
use crate::extract::DIAG_EPSILON;
use crate::extract::{Backend, ExtractOptions, HeldPixels, PatchInput, PatchResult, PixelLoad};
use crate::psf::{HeldSpots, SpotSet, SpotValues};

/// The whole chain through the stages' host twins.
fn twin_chain(batch: &[PatchInput<'_>], opts: &ExtractOptions) -> Result<ChainOutputs, GpuError> {
    twin_chain_on(batch, opts, &BatchLayout::new(batch)?)
}

/// The chain of twins on `layout` (of `batch`), whose pixel and spot arrays hold what the
/// device would: the batch's copies, or the resident arrays it indexes.
fn twin_chain_on(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    layout: &BatchLayout,
) -> Result<ChainOutputs, GpuError> {
    let dense = normal::twin(layout, opts.regularize, DIAG_EPSILON);
    let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
    let (sol, factor) = solve::twin_factored(&dense, &shapes)?;
    // As on the device: every block, those of a patch that did not factor dropped later.
    let factored = vec![0; batch.len()];
    let (ids, blocks) = blocks_of(
        batch,
        &factored,
        sol.nmax,
        sol.ncore_max,
        sol.nw,
        opts.ndiag,
    );
    let dl = DecorrLayout::new(&blocks)?;
    let dec = decor::twin(&dl, &sol.blocks, &sol.x, MAX_SWEEPS);
    let dims = chi2::Chi2Layout::new(batch, layout)?;
    let c2 = chi2::twin(layout, &dims, &sol.x, opts.psferr);
    let model = match (opts.model_image, opts.leverage) {
        (None, _) => None,
        (Some(_), false) => Some(model::twin(layout, &dims, &sol.x, None)),
        (Some(_), true) => {
            let c = solve::twin_core_columns(&sol, &factor, &shapes)?;
            let cols = HostColumns {
                z: &c.z,
                off: &c.off,
                ld: c.ld,
            };
            Some(model::twin(layout, &dims, &sol.x, Some(cols)))
        }
    };
    Ok(ChainOutputs {
        info: sol.info,
        blocks: ids,
        dec: Some(dec),
        c2,
        dims,
        model,
        on_device: None,
    })
}

mod tests {
    use cudarc::cublas::{result::CublasError, sys::cublasStatus_t};
    use cudarc::cusolver::{result::CusolverError, sys::cusolverStatus_t};
    use cudarc::driver::{sys::CUresult, DriverError};

    use super::*;
    use crate::extract::cpu::tests::{toy_psf, RealBundle0, EDGE_MIDDLE_END};
    use crate::patch::{pixels, Patch, PatchOptions, PixelWindow, Plan, WaveGrid};
    use crate::psf::spots;
    use ndarray::Array2;

    /// Compares a chain's results with the CPU backend's: the parity figures, max pull
    /// 1e-6 and |ΔR| 1e-9.
    fn compare(cpu: &[PatchResult], other: &[PatchResult]) -> (f64, f64) {
        let (mut pull, mut dr) = (0.0f64, 0.0f64);
        for (a, b) in cpu.iter().zip(other) {
            for ((fa, fb), iv) in a.flux.iter().zip(&b.flux).zip(&a.fluxivar) {
                pull = pull.max((fa - fb).abs() * iv.sqrt());
            }
            for (ra, rb) in a.resolution.iter().zip(&b.resolution) {
                dr = dr.max((ra - rb).abs());
            }
            for (ia, ib) in a.fluxivar.iter().zip(&b.fluxivar) {
                assert!(
                    (ia - ib).abs() <= 1e-9 * ia.abs().max(1e-300),
                    "fluxivar {ia} vs {ib}"
                );
            }
            for (ca, cb) in a.chi2pix.iter().zip(&b.chi2pix) {
                assert!(
                    (ca - cb).abs() <= 1e-8 * ca.abs().max(1.0),
                    "chi2pix {ca} vs {cb}"
                );
            }
            for (ma, mb) in a.pixmask_fraction.iter().zip(&b.pixmask_fraction) {
                assert!((ma - mb).abs() <= 1e-12, "pixmask {ma} vs {mb}");
            }
        }
        (pull, dr)
    }

    /// One bundle of the toy PSF with noise-free data and a few masked pixels: the patches the
    /// pipeline would send as one batch, cut from the whole CCD.
    struct Toy {
        set: SpotSet,
        pix: Array2<f64>,
        ivar: Array2<f64>,
        items: Vec<(Patch, PixelWindow)>,
        opts: ExtractOptions,
    }

    impl Toy {
        fn new() -> Toy {
            let psf = toy_psf(10, 3);
            let opts_p = PatchOptions {
                bundlesize: 10,
                nsubbundles: 2,
                nwavestep: 20,
                ..PatchOptions::default()
            };
            let grid = WaveGrid::new(5200.0, 5400.0, 1.0, &opts_p).unwrap();
            let plan = Plan::new(0, 10, grid.wave.len(), 10, &opts_p);
            let set = spots::evaluate(&psf, 0, 10, &grid.padded).unwrap();
            let (ny, nx) = (psf.npix_y, psf.npix_x);
            let mut pix = Array2::<f64>::zeros((ny, nx));
            let mut ivar = Array2::<f64>::from_elem((ny, nx), 1.0);
            for (i, v) in pix.iter_mut().enumerate() {
                *v = 10.0 + (i % 7) as f64;
            }
            for i in (0..ny * nx).step_by(97) {
                ivar[[i / nx, i % nx]] = 0.0;
            }
            let items: Vec<(Patch, PixelWindow)> = plan.patches[0]
                .iter()
                .map(|p| (*p, pixels::window(p, &set, opts_p.pixpad_frac)))
                .filter(|(_, w)| w.on_ccd(ny, nx))
                .collect();
            assert!(items.len() >= 4, "a batch of several patches");
            let opts = ExtractOptions {
                regularize: 0.0,
                psferr: 0.01,
                ndiag: psf.hsizey,
                model_image: None,
                leverage: false,
            };
            Toy {
                set,
                pix,
                ivar,
                items,
                opts,
            }
        }

        /// The toy's set as a device backend hands it out (its values held under a fresh
        /// token), and the device's record of it.
        fn held(&self) -> (SpotSet, ResidentSpots) {
            let held = HeldSpots::mint();
            let mut geometry = self.set.clone();
            geometry.values = SpotValues::Held(held);
            let len = self.set.values().len();
            (geometry, ResidentSpots { held, len })
        }

        fn inputs<'a>(&'a self, set: &'a SpotSet) -> Vec<PatchInput<'a>> {
            self.items
                .iter()
                .map(|(p, w)| PatchInput::from_ccd(*p, *w, self.pix.view(), self.ivar.view(), set))
                .collect()
        }

        /// The toy's pixels as a device backend holds them after loading them.
        fn held_pixels(&self) -> HeldPixels {
            HeldPixels::mint(self.pix.nrows(), self.pix.ncols())
        }

        /// [`Toy::inputs`] whose windows name where they lie in `held`.
        fn inputs_in<'a>(&'a self, set: &'a SpotSet, held: HeldPixels) -> Vec<PatchInput<'a>> {
            let mut inputs = self.inputs(set);
            for inp in &mut inputs {
                inp.loaded = PixelLoad::Held(held).place(inp.ccd, (0, 0));
            }
            inputs
        }
    }

    /// `batch` through the chain of twins, every patch from the chain itself (none handed back
    /// to the CPU), as the results the backend returns.
    fn through_the_chain(batch: &[PatchInput<'_>], opts: &ExtractOptions) -> Vec<PatchResult> {
        let out = twin_chain(batch, opts).expect("twin chain");
        let done = assemble(batch, opts, &out);
        assert!(
            done.iter().all(Option::is_some),
            "the chain left patches to the CPU"
        );
        complete_on_cpu(batch, opts, done).unwrap()
    }

    /// Runs `chain` on the toy batch and checks it against the CPU backend at the issue's
    /// parity figures.
    fn toy_batch_check(chain: &dyn Fn(&[PatchInput<'_>], &ExtractOptions) -> Vec<PatchResult>) {
        let toy = Toy::new();
        let inputs = toy.inputs(&toy.set);
        let cpu = CpuBackend.extract_batch(&inputs, &toy.opts).unwrap();
        let other = chain(&inputs, &toy.opts);
        let (pull, dr) = compare(&cpu, &other);
        eprintln!(
            "{} patches: max pull {pull:.2e}, max |dR| {dr:.2e}",
            inputs.len()
        );
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
    }

    /// Runs `chain` on the toy batch asking for the model image and the leverage, and checks
    /// both against the CPU backend's: the image to 1e-9 of its largest value, the leverage to
    /// 1e-9 (it is at most about 1). The chain solves and inverts its own way, so not bit for
    /// bit.
    fn toy_model_check(chain: &dyn Fn(&[PatchInput<'_>], &ExtractOptions) -> Vec<PatchResult>) {
        let toy = Toy::new();
        let inputs = toy.inputs(&toy.set);
        let opts = ExtractOptions {
            model_image: Some(crate::extract::ModelFlux::Deconvolved),
            leverage: true,
            ..toy.opts
        };
        let cpu = CpuBackend.extract_batch(&inputs, &opts).unwrap();
        let other = chain(&inputs, &opts);
        let (mut dm, mut dh, mut mmax, mut hmax) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (b, (a, o)) in cpu.iter().zip(&other).enumerate() {
            let pair = |x: &Option<Array2<f64>>, y: &Option<Array2<f64>>, what: &str| {
                let (Some(x), Some(y)) = (x, y) else {
                    panic!("patch {b}: no {what}");
                };
                assert_eq!(x.dim(), y.dim(), "patch {b}: {what}'s window");
                x.iter()
                    .zip(y)
                    .map(|(p, q)| (*p, (p - q).abs()))
                    .collect::<Vec<_>>()
            };
            for (v, d) in pair(&a.model, &o.model, "model image") {
                (mmax, dm) = (mmax.max(v.abs()), dm.max(d));
            }
            for (v, d) in pair(&a.leverage, &o.leverage, "leverage") {
                (hmax, dh) = (hmax.max(v.abs()), dh.max(d));
            }
        }
        eprintln!(
            "{} patches: model image max |Δ| {dm:.2e} of {mmax:.2e}, leverage max |Δ| {dh:.2e} \
             of {hmax:.2e}",
            inputs.len()
        );
        assert!(
            mmax > 0.0 && hmax > 0.05,
            "an empty model ({mmax}) or leverage ({hmax})"
        );
        assert!(dm <= 1e-9 * mmax, "model image: max |Δ| {dm:e} of {mmax:e}");
        assert!(dh <= 1e-9, "leverage: max |Δ| {dh:e}");
    }

    /// The chain of twins gives the model image and the leverage the CPU backend gives: the
    /// design of the first pass of `--ivar-from-model` on the device, on a machine without one.
    #[test]
    fn the_chain_of_twins_gives_the_cpu_backends_model_image_and_leverage() {
        toy_model_check(&through_the_chain);
    }

    /// The chain as the GPU backend runs it in the pipeline: the windows index the CCD's
    /// pixels uploaded once (each patch naming its place in that load) and the spot set left
    /// on the device (the host holding its geometry under the set's token). Through the twins, with the arrays the device would hold, it gives the
    /// bit-identical results of the chain on the batch's own copies.
    #[test]
    fn the_chain_on_resident_pixels_and_spots_matches_the_chain_on_copies() {
        let toy = Toy::new();
        let (geometry, key) = toy.held();
        let held = toy.held_pixels();
        let inputs = toy.inputs_in(&geometry, held);
        let resident = Resident {
            pixels: Some(held),
            spots: Some(&key),
        };
        let mut layout = BatchLayout::with_resident(&inputs, &resident).unwrap();
        assert!(layout.pixels_resident && layout.spots_resident);
        assert!(layout.pix.is_empty() && layout.spots.is_empty());
        assert_eq!(layout.pix_len, toy.pix.len());
        assert_eq!(layout.spots_len, toy.set.values().len());
        assert!(layout
            .patch
            .chunks(4)
            .all(|p| p[3] as usize == toy.pix.ncols()));
        // What the device holds.
        layout.pix = toy.pix.iter().copied().collect();
        layout.ivar = toy.ivar.iter().copied().collect();
        layout.spots = toy.set.values().to_vec();
        let on_device = twin_chain_on(&inputs, &toy.opts, &layout).unwrap();
        let copies = toy.inputs(&toy.set);
        let own = twin_chain(&copies, &toy.opts).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (on_device.dec.as_ref().unwrap(), own.dec.as_ref().unwrap());
        assert_eq!(bits(&a.flux), bits(&b.flux));
        assert_eq!(bits(&a.fluxivar), bits(&b.fluxivar));
        assert_eq!(bits(&a.resolution), bits(&b.resolution));
        assert_eq!(bits(&on_device.c2.chi2pix), bits(&own.c2.chi2pix));
        assert_eq!(bits(&on_device.c2.pixmask), bits(&own.c2.pixmask));
        assert_eq!(bits(&on_device.c2.model), bits(&own.c2.model));
        assert_eq!(on_device.info, own.info);
        // And the CPU fallback gets the values back for such a set.
        let hosted = with_host_spots(&inputs, Some((&key, &toy.set)), None).unwrap();
        assert!(hosted.iter().all(|i| std::ptr::eq(i.spots, &toy.set)));
        assert!(with_host_spots(&inputs, None, None).is_err());
    }

    /// What a layout refuses or falls back from: spots whose values are on the device but
    /// not the resident set are an error; windows that name no load, and spot sets other than
    /// the resident one, make the batch carry its own copies.
    #[test]
    fn resident_layouts_fall_back_or_refuse() {
        let toy = Toy::new();
        let (geometry, _) = toy.held();
        let err = BatchLayout::new(&toy.inputs(&geometry)).unwrap_err();
        assert!(err.to_string().contains("not the one resident"), "{err}");
        // Another set: held under another token.
        let (_, key) = toy.held();
        let resident = Resident {
            pixels: Some(toy.held_pixels()),
            spots: Some(&key),
        };
        let inputs = toy.inputs(&toy.set);
        let layout = BatchLayout::with_resident(&inputs, &resident).unwrap();
        assert!(!layout.pixels_resident && !layout.spots_resident);
        assert_eq!(layout.pix.len(), layout.npix);
        assert!(layout.patch.chunks(4).all(|p| p[3] == p[2]));
        assert!(BatchLayout::with_resident(&toy.inputs(&geometry), &resident).is_err());
        // A non-contiguous array cannot be resident.
        let t = toy.pix.t();
        assert!(normal::loadable(t, toy.ivar.t()).is_none());
    }

    /// A window is found in the device's pixels by the load it names, not by where its views
    /// point: a window that names a load other than the one on the device (an earlier one, or
    /// none there) is refused by name, and so is a place beyond the load's edges.
    #[test]
    fn a_window_in_a_stale_load_is_refused_by_name() {
        let toy = Toy::new();
        let (stale, now) = (toy.held_pixels(), toy.held_pixels());
        let inputs = toy.inputs_in(&toy.set, stale);
        for here in [Some(now), None] {
            let resident = Resident {
                pixels: here,
                spots: None,
            };
            let err = BatchLayout::with_resident(&inputs, &resident).unwrap_err();
            assert!(
                matches!(err, GpuError::PixelsElsewhere { load, here: h, .. } if load == stale.id && h == here.map(|p| p.id)),
                "{err}"
            );
            assert!(
                err.to_string().contains("not in the pixels on this device"),
                "{err}"
            );
        }
        let current = toy.inputs_in(&toy.set, now);
        let resident = Resident {
            pixels: Some(now),
            spots: None,
        };
        assert!(
            BatchLayout::with_resident(&current, &resident)
                .unwrap()
                .pixels_resident
        );
        let smaller = HeldPixels {
            rows: current[0].ccd.ymax as usize - 1,
            ..now
        };
        let err = normal::place_in(Some(smaller), &current[0]).unwrap_err();
        assert!(err.to_string().contains("reach beyond"), "{err}");
    }

    /// A set is recognised by the token of the evaluation that holds it, not by its geometry:
    /// a set of the same geometry held under another token (another backend's, or this
    /// one's before its last evaluation) is refused by name, by the layout and by the CPU's
    /// share of a batch, and the CPU backend refuses a held set rather than reading values it
    /// does not have.
    #[test]
    fn a_set_held_under_another_token_is_refused_by_name() {
        let toy = Toy::new();
        let (mine, key) = toy.held();
        let (stale, _) = toy.held();
        assert_eq!(
            (stale.xc.clone(), stale.yc.clone()),
            (mine.xc.clone(), mine.yc.clone())
        );
        let resident = Resident {
            pixels: None,
            spots: Some(&key),
        };
        assert!(BatchLayout::with_resident(&toy.inputs(&mine), &resident).is_ok());
        let inputs = toy.inputs(&stale);
        let err = BatchLayout::with_resident(&inputs, &resident).unwrap_err();
        assert!(
            matches!(err, GpuError::SpotsElsewhere { set, here } if Some(set) == stale.held() && here == Some(key.held)),
            "{err}"
        );
        let err = with_host_spots(&inputs, Some((&key, &toy.set)), None).unwrap_err();
        assert!(matches!(err, GpuError::SpotsElsewhere { .. }), "{err}");
        assert!(err.to_string().contains("not the one resident"), "{err}");
        let err = CpuBackend.extract_batch(&inputs, &toy.opts).unwrap_err();
        assert!(
            err.to_string().contains("held by a device backend"),
            "{err}"
        );
    }

    /// The stages' host twins chained as the device chains them agree with the CPU backend at
    /// the parity figures: the GPU design, end to end, on a machine without a GPU.
    #[test]
    fn the_chain_of_twins_matches_the_cpu_backend() {
        toy_batch_check(&through_the_chain);
    }

    /// The GPU backend's route for patches whose windows leave the CCD: the device (here the
    /// chain of twins) gets only those on the CCD, the CPU the others, with the pixels off
    /// the CCD masked. The whole batch matches the CPU backend's: bit for bit on the patches
    /// the CPU took, at the parity figures on the rest.
    #[test]
    fn patches_leaving_the_ccd_go_to_the_cpu_the_rest_through_the_chain() {
        use crate::extract::fallback::device_on_ccd;
        let toy = Toy::new();
        // A CCD that ends in the middle of the last patch's window.
        let last = toy
            .items
            .iter()
            .map(|(_, w)| *w)
            .max_by_key(|w| w.ymax)
            .unwrap();
        let cut = (last.ymin + last.ny() as i64 / 2) as usize;
        let (pix, ivar) = (
            toy.pix.slice(ndarray::s![..cut, ..]),
            toy.ivar.slice(ndarray::s![..cut, ..]),
        );
        let inputs: Vec<PatchInput<'_>> = toy
            .items
            .iter()
            .filter(|(_, w)| w.ymin < cut as i64)
            .map(|(p, w)| PatchInput::from_ccd(*p, *w, pix, ivar, &toy.set))
            .collect();
        let edge = inputs.iter().filter(|i| i.leaves_ccd()).count();
        assert!(
            edge > 0 && edge < inputs.len(),
            "{edge} of {}",
            inputs.len()
        );
        let mut taken = 0;
        let done = device_on_ccd(&inputs, |on| {
            assert!(on.iter().all(|i| !i.leaves_ccd()));
            taken = on.len();
            Ok::<_, GpuError>(assemble(on, &toy.opts, &twin_chain(on, &toy.opts)?))
        })
        .unwrap();
        assert_eq!(taken + edge, inputs.len());
        let got = complete_on_cpu(&inputs, &toy.opts, done).unwrap();
        let cpu = CpuBackend.extract_batch(&inputs, &toy.opts).unwrap();
        let (pull, dr) = compare(&cpu, &got);
        assert!(
            pull <= 1e-6 && dr <= 1e-9,
            "max pull {pull:e}, max |dR| {dr:e}"
        );
        let bits = |a: &Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (i, (a, b)) in inputs.iter().zip(cpu.iter().zip(&got)) {
            assert_eq!(a.ccd_light.is_some(), i.leaves_ccd());
            assert_eq!(b.ccd_light.is_some(), i.leaves_ccd());
            if i.leaves_ccd() {
                assert_eq!(bits(&a.flux), bits(&b.flux));
                assert_eq!(bits(&a.fluxivar), bits(&b.fluxivar));
                assert_eq!(a.ccd_light, b.ccd_light);
            }
        }
    }

    /// The real DESI PSF and the shared preproc (bundle 0): patches at the bundle's lower edge
    /// (6 fibers), its middle and the grid's end, as one batch through the chain of twins.
    #[test]
    fn the_chain_of_twins_matches_the_cpu_backend_on_the_real_psf() {
        let Some(real) = RealBundle0::load() else {
            return;
        };
        let (inputs, opts) = (real.inputs(&EDGE_MIDDLE_END), real.opts);
        let cpu = CpuBackend.extract_batch(&inputs, &opts).unwrap();
        let other = through_the_chain(&inputs, &opts);
        let (pull, dr) = compare(&cpu, &other);
        eprintln!(
            "real PSF, {} patches: max pull {pull:.2e}, max |dR| {dr:.2e}",
            inputs.len()
        );
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
    }

    /// A stand-in for the device: records what is queued and collected, and runs out of
    /// memory on chunks larger than `fits`.
    struct Recorder {
        fits: usize,
        in_flight: Vec<(usize, Range<usize>)>,
        collected: Vec<usize>,
        most_in_flight: usize,
        settled: Vec<usize>,
    }

    impl Chunks for Recorder {
        type Queued = (usize, Range<usize>);

        fn lane_of(q: &Self::Queued) -> usize {
            q.0
        }

        fn queue(&mut self, lane: usize, range: Range<usize>) -> Result<Self::Queued, GpuError> {
            assert!(
                self.in_flight.iter().all(|(l, _)| *l != lane),
                "lane {lane} given a chunk while its last is in flight"
            );
            if range.len() > self.fits {
                return Err(GpuError::driver(
                    "allocating",
                    DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
                ));
            }
            self.in_flight.push((lane, range.clone()));
            self.most_in_flight = self.most_in_flight.max(self.in_flight.len());
            Ok((lane, range))
        }

        fn settle(&mut self, lane: usize) -> Result<(), GpuError> {
            self.settled.push(lane);
            Ok(())
        }

        fn collect(&mut self, q: Self::Queued) -> Result<(), GpuError> {
            let k = self.in_flight.iter().position(|x| *x == q).unwrap();
            self.in_flight.remove(k);
            self.collected.extend(q.1);
            Ok(())
        }
    }

    /// The chunk schedule: every patch collected exactly once, two chunks in flight at most
    /// and never two on one lane, halving on out-of-memory down to what fits, and an error
    /// when one patch does not fit.
    #[test]
    fn chunks_alternate_lanes_and_halve_on_out_of_memory() {
        let mut r = Recorder {
            fits: usize::MAX,
            in_flight: Vec::new(),
            collected: Vec::new(),
            most_in_flight: 0,
            settled: Vec::new(),
        };
        schedule(&mut r, 1000, 470, 2).unwrap();
        assert_eq!(r.collected.len(), 1000);
        let mut seen = r.collected.clone();
        seen.sort_unstable();
        assert!(seen.iter().copied().eq(0..1000));
        assert_eq!(r.most_in_flight, 2);
        assert!(r.in_flight.is_empty());
        assert_eq!(
            chunk_ranges(1000, 470),
            VecDeque::from([0..334, 334..668, 668..1000])
        );

        let mut r = Recorder {
            fits: 100,
            in_flight: Vec::new(),
            collected: Vec::new(),
            most_in_flight: 0,
            settled: Vec::new(),
        };
        schedule(&mut r, 1000, 470, 2).unwrap();
        let mut seen = r.collected.clone();
        seen.sort_unstable();
        assert!(seen.iter().copied().eq(0..1000), "each patch once");
        assert!(
            !r.settled.is_empty(),
            "the failing lane is waited for before a retry"
        );
        for (msg, err) in [
            (
                "allocating: CUDA_ERROR_OUT_OF_MEMORY",
                GpuError::driver(
                    "allocating",
                    DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
                ),
            ),
            (
                "potrfBatched: CUSOLVER_STATUS_ALLOC_FAILED",
                GpuError::cusolver(
                    "potrfBatched",
                    CusolverError(cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED),
                ),
            ),
            (
                "gemmBatched: CUBLAS_STATUS_ALLOC_FAILED",
                GpuError::cublas(
                    "gemmBatched",
                    CublasError(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
                ),
            ),
        ] {
            assert!(err.is_out_of_memory(), "{msg}");
        }
        assert!(!GpuError::driver(
            "launching",
            DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)
        )
        .is_out_of_memory());

        let mut r = Recorder {
            fits: 0,
            in_flight: Vec::new(),
            collected: Vec::new(),
            most_in_flight: 0,
            settled: Vec::new(),
        };
        let err = schedule(&mut r, 5, 470, 2).unwrap_err();
        assert!(err.to_string().contains("OUT_OF_MEMORY"), "{err}");
    }

    /// On a GPU: a frame through the pipeline's loop, as `extract` runs it (spots evaluated
    /// and kept on the device, the CCD's pixels uploaded once, several bundles per batch in
    /// chunks on two lanes), agrees with the CPU backend's frame at the figures.
    #[test]
    fn gpu_backend_in_the_frame_loop_matches_the_cpu_backend() {
        if let Err(e) = crate::extract::gpu::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let toy = crate::pipeline::frame::tests::ToyFrame::new();
        let run = |backend: &mut dyn Backend| toy.extract(backend);
        let cpu = run(&mut CpuBackend);
        let mut gpu = GpuBackend::new(0).expect("GPU backend");
        let got = run(&mut gpu);
        let stages = gpu.take_stage_times();
        let (mut pull, mut dr) = (0.0f64, 0.0f64);
        for ((a, b), iv) in cpu.flux.iter().zip(&got.flux).zip(&cpu.ivar) {
            pull = pull.max((a - b).abs() * iv.sqrt());
        }
        for (a, b) in cpu.resolution.iter().zip(&got.resolution) {
            dr = dr.max((a - b).abs());
        }
        eprintln!(
            "frame loop on {}: max pull {pull:.2e}, max |dR| {dr:.2e}; stage seconds {stages:?}",
            gpu.device().name
        );
        assert_eq!(cpu.nodata, got.nodata);
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
        assert!(stages.iter().any(|(_, s)| *s > 0.0), "no stage was timed");
    }

    /// On a GPU: the device backend agrees with the CPU backend at the same figures, by either
    /// eigen route of the decorrelation.
    #[test]
    fn gpu_backend_matches_the_cpu_backend() {
        if let Err(e) = crate::extract::gpu::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let mut backend = GpuBackend::new(0).expect("GPU backend");
        let mut routes = vec![EigenRoute::Jacobi];
        if solve::syev_batched_present() {
            routes.push(EigenRoute::Syev);
        }
        for route in routes {
            eprintln!("decorrelation by the {}:", route.name());
            backend.set_eigen_route(route);
            let cell = std::cell::RefCell::new(&mut backend);
            toy_batch_check(&|batch, opts| cell.borrow_mut().extract_batch(batch, opts).unwrap());
        }
        eprintln!("with the model image and the leverage:");
        let cell = std::cell::RefCell::new(&mut backend);
        toy_model_check(&|batch, opts| cell.borrow_mut().extract_batch(batch, opts).unwrap());
    }

    /// `unit::twin` places each block's numbers where `assemble` puts the patch's: on a chain
    /// of twins over a real-PSF-like toy batch, the unit arrays equal the per-patch results.
    #[test]
    fn the_unit_twin_places_what_assemble_returns() {
        let toy = Toy::new();
        let inputs = toy.inputs(&toy.set);
        let opts = toy.opts;
        let out = twin_chain(&inputs, &opts).unwrap();
        let results = assemble(&inputs, &opts, &out);
        let (specmin, last) = inputs.iter().fold((usize::MAX, 0), |(a, b), i| {
            (a.min(i.patch.ispec), b.max(i.patch.ispec + i.patch.nspec))
        });
        let nwave = inputs
            .iter()
            .map(|i| i.patch.iwave + i.patch.nwave_keep)
            .max()
            .unwrap();
        let shape = UnitShape {
            specmin,
            nspec: last - specmin,
            nwave,
            nd2: 2 * opts.ndiag + 1,
        };
        let place = unit::placement(&inputs, &out.blocks, &shape).unwrap();
        let dec = out.dec.as_ref().unwrap();
        let chunk = unit::HostChunk {
            info: &out.info,
            status: &dec.status,
            ncol: dec.ncol,
            flux: &dec.flux,
            fluxivar: &dec.fluxivar,
            resolution: &dec.resolution,
            chi2pix: &out.c2.chi2pix,
            pixmask: &out.c2.pixmask,
            ncmax: out.dims.ncmax,
            nkmax: out.dims.nkmax,
        };
        let mut arrays = shape.part_lens().map(|n| vec![f64::NAN; n]);
        unit::twin(&place, &chunk, &shape, &mut arrays);
        let mut checked = 0;
        for (inp, r) in inputs.iter().zip(&results) {
            let (p, r) = (
                &inp.patch,
                r.as_ref().expect("the toy's patches all factor"),
            );
            for c in 0..p.nspec {
                for j in 0..p.nwave_keep {
                    let u = (p.ispec - specmin + c) * nwave + p.iwave + j;
                    assert_eq!(arrays[0][u].to_bits(), r.flux[[c, j]].to_bits());
                    assert_eq!(arrays[1][u].to_bits(), r.fluxivar[[c, j]].to_bits());
                    assert_eq!(arrays[3][u].to_bits(), r.chi2pix[[c, j]].to_bits());
                    assert_eq!(arrays[4][u].to_bits(), r.pixmask_fraction[[c, j]].to_bits());
                    for d in 0..shape.nd2 {
                        let v = arrays[2]
                            [((p.ispec - specmin + c) * shape.nd2 + d) * nwave + p.iwave + j];
                        assert_eq!(v.to_bits(), r.resolution[[c, d, j]].to_bits());
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "{checked} cells");
    }

    /// On a GPU: a frame kept on the device at both ends (pixels adopted, the region carrying
    /// their load and views of zeros that must never be read, results scattered into the
    /// unit's arrays) gives the host path's frame bit for bit.
    #[test]
    fn a_unit_kept_on_the_device_matches_the_host_path_bit_for_bit() {
        if let Err(e) = crate::extract::gpu::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let toy = crate::pipeline::frame::tests::ToyFrame::new();
        let mut gpu = GpuBackend::new(0).expect("GPU backend");
        let host = toy.extract(&mut gpu);
        // Stand-ins whose values must never be read: zeros would give another frame.
        let zeros = Array2::<f64>::zeros(toy.pix.dim());
        let zeros_ivar = Array2::<f64>::zeros(toy.pix.dim());
        let st = gpu.gpu.stream.clone();
        let pixels = DevicePixels::adopt(
            st.clone_htod(toy.pix.as_slice().unwrap()).unwrap(),
            st.clone_htod(toy.ivar.as_slice().unwrap()).unwrap(),
            toy.pix.nrows(),
            toy.pix.ncols(),
        )
        .unwrap();
        let load = gpu.adopt_pixels(pixels);
        let shape = UnitShape {
            specmin: 0,
            nspec: toy.plan.nspec,
            nwave: toy.grid.wave.len(),
            nd2: 2 * toy.opts.ndiag + 1,
        };
        gpu.begin_unit(shape).unwrap();
        let work = crate::pipeline::frame::BundleWork {
            psf: &toy.psf,
            region: crate::pipeline::frame::Region {
                pix: zeros.view(),
                ivar: zeros_ivar.view(),
                y0: 0,
                x0: 0,
                loaded: Some(load),
            },
            grid: &toy.grid,
            plan: &toy.plan,
            bundles: 0..toy.plan.bundles.len(),
            pixpad_frac: toy.popts.pixpad_frac,
        };
        let fr =
            crate::pipeline::frame::extract_bundles(&work, &toy.opts, &mut gpu, &|_, _| {}, None)
                .unwrap();
        let unit = gpu.take_unit().unwrap().expect("the unit's arrays");
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let flat = |a: &ndarray::Array2<f64>| a.iter().copied().collect::<Vec<_>>();
        let parts = unit.parts().map(|d| st.clone_dtoh(d).unwrap());
        assert_eq!(bits(&parts[0]), bits(&flat(&host.flux)));
        assert_eq!(bits(&parts[1]), bits(&flat(&host.ivar)));
        assert_eq!(
            bits(&parts[2]),
            bits(&host.resolution.iter().copied().collect::<Vec<_>>())
        );
        assert_eq!(bits(&parts[3]), bits(&flat(&host.chi2pix)));
        assert_eq!(bits(&parts[4]), bits(&flat(&host.pixmask_fraction)));
        assert_eq!(fr.nodata, host.nodata);
        assert_eq!(
            (fr.stats.retried, fr.stats.failed),
            (host.stats.retried, host.stats.failed)
        );
        eprintln!(
            "unit kept on {}: identical to the host path; {} retried, pixels downloaded {} time(s)",
            gpu.device().name,
            fr.stats.retried,
            gpu.pixel_downloads()
        );
    }
}
