//! Tests of the simulator.

use super::*;
use crate::io::{read_preproc, read_truth, EXTRACT_MASK_BITS};
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};

/// A small CCD: 30 fibers over 300 columns, 5550–7830 Å over 1000 rows.
fn small_psf() -> Psf {
    synthetic_psf(&SynthPsfOptions {
        nfiber: 30,
        bundle_size: 10,
        first_fiber_x: 20.0,
        npix_x: 300,
        npix_y: 1000,
        y_per_angstrom: 1000.0 / 2280.0,
        smile: 5.0,
        ..Default::default()
    })
}

fn small_opts() -> SimOptions {
    SimOptions {
        specmin: 10,
        nspec: 10,
        wmin: 6000.0,
        wmax: 6400.0,
        dead_fibers: vec![13],
        ..Default::default()
    }
}

#[test]
fn truth_grid_pads_the_extraction_grid() {
    let wave = truth_grid(&SimOptions::default());
    // numpy.arange(5760, 7620.4, 0.8) has 2326 bins; 12 below, 62 above.
    assert_eq!(wave.len(), 12 + 2326 + 62);
    assert!((wave[0] - (5760.0 - 12.0 * 0.8)).abs() < 1e-9);
    assert_eq!(wave[12], 5760.0);
    assert!((wave[12 + 2325] - 7620.0).abs() < 1e-9);
    assert!((wave[wave.len() - 1] - (7620.0 + 62.0 * 0.8)).abs() < 1e-9);
}

#[test]
fn same_seed_same_image() {
    let psf = small_psf();
    let a = simulate(&psf, &small_opts()).unwrap();
    let b = simulate(&psf, &small_opts()).unwrap();
    assert_eq!(a.image, b.image);
    assert_eq!(a.ivar, b.ivar);
    assert_eq!(a.mask, b.mask);
    assert_eq!(a.truth, b.truth);
    let c = simulate(
        &psf,
        &SimOptions {
            seed: 2,
            ..small_opts()
        },
    )
    .unwrap();
    assert_ne!(a.image, c.image);
}

#[test]
fn photons_are_conserved_and_noise_matches_ivar() {
    let psf = small_psf();
    let opts = small_opts();
    let sim = simulate(&psf, &opts).unwrap();
    // Every spot of this grid lies wholly on the CCD, and spots sum to 1.
    let total: f64 = sim.truth.phot.sum();
    let rel = (sim.model.sum() - total).abs() / total;
    assert!(rel < 1e-10, "model {} vs truth {total}", sim.model.sum());
    assert!(sim
        .truth
        .phot
        .row(13 - opts.specmin)
        .iter()
        .all(|&p| p == 0.0));
    assert!(sim.truth.phot.row(0).iter().all(|&p| p > 0.0));
    assert_eq!(sim.truth.flux, &sim.truth.phot / opts.dw);
    assert_eq!(sim.fibermap.len(), 30);
    assert_eq!(sim.fibermap.objtype[19], "SKY");

    let (mut n, mut sum, mut sum2, mut masked) = (0.0, 0.0, 0.0, 0);
    for (((&im, &iv), &m), &model) in sim
        .image
        .iter()
        .zip(sim.ivar.iter())
        .zip(sim.mask.iter())
        .zip(sim.model.iter())
    {
        if m != 0 {
            masked += 1;
            assert_eq!(iv, 0.0);
            continue;
        }
        if iv > 0.0 {
            let expect = 1.0 / (model + 9.0);
            assert!((iv as f64 - expect).abs() <= 1e-6 * expect);
            let pull = (im as f64 - model) * (iv as f64).sqrt();
            n += 1.0;
            sum += pull;
            sum2 += pull * pull;
        } else {
            assert_eq!((im, model), (0.0, 0.0), "light outside the simulated band");
        }
    }
    let (mean, sd) = (sum / n, (sum2 / n - (sum / n).powi(2)).sqrt());
    assert!(
        mean.abs() < 0.01 && (sd - 1.0).abs() < 0.02,
        "pulls {mean} ± {sd} over {n}"
    );
    assert!(masked >= opts.n_cosmics, "{masked}");
    assert!(sim.mask.iter().any(|&m| m == 16) && sim.mask.iter().any(|&m| m == 1));
}

#[test]
fn written_simulation_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (img, tru) = (
        dir.path().join("preproc.fits"),
        dir.path().join("truth.fits"),
    );
    let psf = small_psf();
    let opts = SimOptions {
        in_psf: "psf-synth.fits".into(),
        ..small_opts()
    };
    let sim = write_simulation(&psf, &opts, &img, &tru).unwrap();
    let pre = read_preproc(&img, EXTRACT_MASK_BITS).unwrap();
    assert_eq!(pre.fibermap_rows, Some(30));
    assert_eq!(
        pre.masked_by_bits,
        sim.mask.iter().filter(|&&m| m != 0).count()
    );
    assert!(pre
        .image
        .iter()
        .zip(sim.image.iter())
        .all(|(&a, &b)| a == b as f64));
    for key in [
        "FLAVOR  = 'science",
        "SIMULATD=",
        "SIMSEED =",
        "IN_PSF  = 'psf-synth.fits'",
    ] {
        assert!(pre.header.iter().any(|c| c.starts_with(key)), "{key}");
    }
    assert_eq!(read_truth(&tru).unwrap(), sim.truth);
}

#[test]
fn options_outside_the_psf_are_refused() {
    let psf = small_psf();
    let err = simulate(
        &psf,
        &SimOptions {
            specmin: 25,
            ..small_opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("fibers 25..35"), "{err}");
    let err = simulate(
        &psf,
        &SimOptions {
            wmax: 7900.0,
            ..small_opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("leaves the PSF range"), "{err}");
    let err = simulate(
        &psf,
        &SimOptions {
            dw: 1e-9,
            ..small_opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("bins (at most"), "{err}");
    let err = simulate(
        &psf,
        &SimOptions {
            dw: f64::NAN,
            ..small_opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
}

/// `ivar_from_data` computes IVAR from the noisy pixel as DESI's preproc does, with the same
/// pixels as the default (the noise does not depend on how IVAR is computed).
#[test]
fn ivar_from_data_follows_the_noisy_pixel() {
    let psf = small_psf();
    let model_ivar = simulate(&psf, &small_opts()).unwrap();
    let opts = SimOptions {
        ivar_from_data: true,
        ..small_opts()
    };
    let sim = simulate(&psf, &opts).unwrap();
    assert_eq!(sim.image, model_ivar.image);
    assert_eq!(sim.mask, model_ivar.mask);
    let mut lit = 0;
    for ((&im, &iv), &m) in sim.image.iter().zip(sim.ivar.iter()).zip(sim.mask.iter()) {
        if m != 0 || iv == 0.0 {
            continue;
        }
        let expect = 1.0 / (9.0 + (im as f64).max(0.0));
        assert!(
            (iv as f64 - expect).abs() <= 1e-6 * expect,
            "{iv} vs {expect}"
        );
        lit += 1;
    }
    assert!(lit > 10_000);
    assert_ne!(sim.ivar, model_ivar.ivar);
}
