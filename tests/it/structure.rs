//! Properties every frame must have: the same bits whatever the thread count, ivar > 0 on every
//! bin that was extracted, nothing on the bins that were not (NODATA) or whose pixels carry no
//! data or give non-finite numbers, and a resolution band that holds nearly all of each row.

use std::path::{Path, PathBuf};

use spextract::cli::compare::band_retention;
use spextract::io::frame::{read_frame, Frame};

use crate::common::{
    assert_no_output, band_row_sums, shared_data, small_ccd, SmallCcd, MIN_BAND_RETENTION, NODATA,
    SMALL_GRID,
};

/// Asserts the ivar/NODATA contract; returns the number of NODATA bins.
#[track_caller]
fn assert_ivar_and_nodata(f: &Frame) -> usize {
    let mut nodata = 0;
    for ((i, j), &m) in f.mask.indexed_iter() {
        let (iv, fl) = (f.ivar[[i, j]], f.flux[[i, j]]);
        assert!(
            iv.is_finite() && fl.is_finite(),
            "fiber {i} bin {j}: flux {fl}, ivar {iv}"
        );
        assert!(f.chi2pix[[i, j]].is_finite(), "fiber {i} bin {j}: chi2pix");
        if m & NODATA != 0 {
            nodata += 1;
            assert_eq!((fl, iv), (0.0, 0.0), "NODATA fiber {i} bin {j}");
        } else {
            assert!(
                iv > 0.0,
                "fiber {i} bin {j}: ivar {iv} without NODATA (mask {m:#x})"
            );
        }
    }
    nodata
}

/// Asserts that every measured row of the band keeps ≥ 0.995 of its weight, and that the
/// crate's `band_retention` (what `spextract compare` prints) agrees with this independent sum.
#[track_caller]
fn assert_band(f: &Frame, min_rows: usize) {
    let rows = band_row_sums(f);
    assert!(rows.len() >= min_rows, "only {} rows measured", rows.len());
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| !(r.2 >= MIN_BAND_RETENTION))
        .take(10)
        .collect();
    assert!(
        bad.is_empty(),
        "rows (fiber, bin, sum) below {MIN_BAND_RETENTION}: {bad:?}"
    );
    let min = rows.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
    let b = band_retention(f).expect("rows to measure");
    assert_eq!(b.nrows, rows.len());
    assert!((b.min - min).abs() < 1e-12, "{b:?} vs {min}");
    eprintln!("band retention: {b:?}");
}

fn assert_bit_identical(a: &Frame, b: &Frame) {
    let bits = |v: &f64| v.to_bits();
    assert_eq!(a.specmin, b.specmin);
    assert_eq!(a.wave, b.wave);
    for (name, x, y) in [
        ("FLUX", &a.flux, &b.flux),
        ("IVAR", &a.ivar, &b.ivar),
        ("CHI2PIX", &a.chi2pix, &b.chi2pix),
    ] {
        assert_eq!(x.dim(), y.dim(), "{name}");
        let diff = x
            .iter()
            .zip(y.iter())
            .filter(|(p, q)| bits(p) != bits(q))
            .count();
        assert_eq!(diff, 0, "{name}: {diff} values differ");
    }
    assert_eq!(a.resolution.dim(), b.resolution.dim());
    let diff = a
        .resolution
        .iter()
        .zip(b.resolution.iter())
        .filter(|(p, q)| bits(p) != bits(q))
        .count();
    assert_eq!(diff, 0, "RESOLUTION: {diff} values differ");
    assert_eq!(a.mask, b.mask, "MASK");
}

/// Extracts with `--threads 1` and `--threads 2`; asserts the frames are bit-identical and
/// returns the first.
fn extract_twice(dir: &Path, psf: &Path, image: &Path, grid: &str, fibers: [&str; 2]) -> Frame {
    let frames: Vec<Frame> = ["1", "2"]
        .iter()
        .map(|threads| {
            let out = dir.join(format!("frame-{threads}.fits"));
            let run = run!(
                "extract",
                "-p",
                psf,
                "-i",
                image,
                "-o",
                out,
                "-w",
                grid,
                "-s",
                fibers[0],
                "-n",
                fibers[1],
                "--threads",
                threads
            );
            run.ok();
            assert!(
                run.stderr.contains(&format!("with {threads} thread")),
                "{}",
                run.stderr
            );
            read_frame(&out).unwrap()
        })
        .collect();
    assert_bit_identical(&frames[0], &frames[1]);
    frames.into_iter().next().unwrap()
}

/// Two bundles of a synthetic PSF on 5560–6400 Å: the first patches of the central fibers
/// run off the bottom of the CCD (they were dropped whole before, NODATA).
#[test]
fn synthetic_edge_bins_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let psf = dir.path().join("psf.fits");
    run!("simulate", "--make-psf", psf, "--nfiber", "50").ok();
    let n = edge_recovery(dir.path(), &psf, (5560.0, 6400.0, 0.8), 5, 40_000);
    assert!(n >= 1000, "only {n} bins recovered");
}

/// The real DESI r PSF on a grid stretched to the PSF's wavelength range (5554–7776 Å
/// where the padding still lies within it): both ends of the grid leave the CCD.
#[test]
fn real_psf_edge_bins_are_recovered() {
    let Some(data) = shared_data(&["psf-r0-00067784.fits"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let psf = data.join("psf-r0-00067784.fits");
    let n = edge_recovery(dir.path(), &psf, (5554.0, 7776.0, 0.8), 4, 100_000);
    assert!(n >= 3000, "only {n} bins recovered");
}

/// Simulates fibers 0–49 through `psf` on `grid` (seed `seed`) and extracts them, whose grid
/// leaves the CCD: the patches whose windows leave it are extracted with the pixels off it
/// masked. Every bin with at least `MIN_CCD_LIGHT` of its light on the CCD is extracted, those
/// with less are NODATA, those with less than half SOMEBADPIX; the light on the CCD is
/// computed here from the spots, independently of the extraction. The bins recovered so
/// match the truth as the others do: chi2/dof within 4σ of 1 and mean pull within 4σ of 0
/// for their number. The pipeline's work units give the same frame. Returns the number of
/// bins recovered away from the grid's ends.
fn edge_recovery(
    d: &Path,
    psf: &Path,
    (wmin, wmax, dw): (f64, f64, f64),
    seed: u64,
    band_rows: usize,
) -> usize {
    use spextract::extract::MIN_CCD_LIGHT;
    use spextract::patch::{pixels, PatchOptions, Plan, WaveGrid};
    let (image, truth) = (d.join("preproc.fits"), d.join("truth.fits"));
    let w = format!("{wmin},{wmax},{dw}");
    run!(
        "simulate",
        "-p",
        psf,
        "-i",
        image,
        "-t",
        truth,
        "-n",
        "50",
        "-w",
        w,
        "--seed",
        seed.to_string()
    )
    .ok();
    let f = extract_twice(d, psf, &image, &w, ["0", "50"]);
    let nodata = assert_ivar_and_nodata(&f);
    // The pipeline's work units carry the part on the CCD of the windows that leave it.
    let list = d.join("frames.txt");
    let piped = d.join("piped.fits");
    std::fs::write(
        &list,
        format!(
            "{} {} {}\n",
            image.display(),
            psf.display(),
            piped.display()
        ),
    )
    .unwrap();
    run!(
        "extract",
        "--frames",
        list,
        "-w",
        w,
        "-s",
        "0",
        "-n",
        "50",
        "--unit-bundles",
        "1",
        "--threads",
        "1"
    )
    .ok();
    assert_bit_identical(&read_frame(&piped).unwrap(), &f);
    let model = spextract::io::read_psf(psf).unwrap();
    let popts = PatchOptions::default();
    let grid = WaveGrid::new(wmin, wmax, dw, &popts).unwrap();
    let plan = Plan::new(0, 50, grid.wave.len(), model.nfiber(), &popts);
    let spots = spextract::psf::spots::evaluate(&model, 0, 50, &grid.padded).unwrap();
    let (ny, nx) = (model.npix_y as i64, model.npix_x as i64);
    let t = spextract::io::read_truth(&truth).unwrap();
    let off = t
        .wave
        .iter()
        .position(|w| (w - grid.wave[0]).abs() < 1e-6)
        .unwrap();
    let nd = f.resolution.shape()[1] / 2;
    let nwave = grid.wave.len();
    assert_eq!(f.flux.dim(), (50, nwave));
    let (mut leaving, mut missing, mut starved, mut somebad, mut pulls) = (0, 0, 0, 0, Vec::new());
    for p in plan.patches.iter().flatten() {
        let window = pixels::window(p, &spots, popts.pixpad_frac);
        if window.on_ccd(ny as usize, nx as usize) {
            continue;
        }
        leaving += p.nspec * p.nwave_keep;
        if window.clip(ny as usize, nx as usize).is_none() {
            missing += p.nspec * p.nwave_keep;
        }
        for fib in p.ispec..p.ispec + p.nspec {
            for j in p.iwave..p.iwave + p.nwave_keep {
                let i = spots.index(fib, j + grid.pad);
                let v = &spots.values()[i * spots.ny * spots.nx..(i + 1) * spots.ny * spots.nx];
                let mut light = 0.0;
                for (k, s) in v.iter().enumerate() {
                    let (y, x) = (
                        spots.yc[i] + (k / spots.nx) as i64,
                        spots.xc[i] + (k % spots.nx) as i64,
                    );
                    if (0..ny).contains(&y) && (0..nx).contains(&x) {
                        light += s;
                    }
                }
                let m = f.mask[[fib, j]];
                if light < MIN_CCD_LIGHT - 1e-9 {
                    starved += 1;
                    assert_ne!(m & NODATA, 0, "fiber {fib} bin {j}: light {light}");
                    continue;
                }
                if light < MIN_CCD_LIGHT + 1e-9 {
                    continue;
                }
                assert_eq!(m & NODATA, 0, "fiber {fib} bin {j}: light {light}");
                if light < 0.5 - 1e-9 {
                    somebad += 1;
                    assert_ne!(
                        m & 1,
                        0,
                        "fiber {fib} bin {j}: light {light}, no SOMEBADPIX"
                    );
                }
                if j < nd || j + nd >= nwave {
                    continue;
                }
                // (R·t)[j] with the dia layout's offsets +nd … -nd.
                let mut rt = 0.0;
                for k in 0..2 * nd + 1 {
                    let c = j + nd - k;
                    if c < nwave {
                        rt += f.resolution[[fib, k, c]] * t.flux[[fib, off + c]];
                    }
                }
                pulls.push((f.flux[[fib, j]] - rt) * f.ivar[[fib, j]].sqrt());
            }
        }
    }
    // Patches whose windows miss the CCD altogether are NODATA whole, as before (their bins
    // have no light on it either).
    assert_eq!(
        nodata, starved,
        "NODATA bins other than those without light on the CCD"
    );
    assert!(missing <= starved);
    let n = pulls.len() as f64;
    let chi2 = pulls.iter().map(|p| p * p).sum::<f64>() / n;
    let mean = pulls.iter().sum::<f64>() / n;
    eprintln!(
        "{leaving} bins in patches whose windows leave the CCD (dropped before); {} recovered \
         away from the grid's ends ({somebad} with less than half their light on the CCD, \
         SOMEBADPIX): chi2/dof {chi2:.4}, mean pull {mean:+.4} ± {:.4}; {starved} with less \
         than {MIN_CCD_LIGHT} NODATA ({missing} in patches whose windows miss the CCD, still \
         dropped)",
        pulls.len(),
        (1.0 / n).sqrt()
    );
    assert!(starved > 0, "no bin without light on the CCD");
    assert!(
        (chi2 - 1.0).abs() < 4.0 * (2.0 / n).sqrt(),
        "chi2/dof {chi2} over {n} bins"
    );
    assert!(
        mean.abs() < 4.0 / n.sqrt(),
        "mean pull {mean} over {n} bins"
    );
    assert_band(&f, band_rows);
    pulls.len()
}

/// The shared real frame: no bin left without ivar, and the band on the real PSF.
#[test]
fn real_bundle_deterministic_and_banded() {
    let Some(data) = shared_data(&["psf-r0-00067784.fits", "preproc-r0-b00.fits.gz"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = extract_twice(
        dir.path(),
        &data.join("psf-r0-00067784.fits"),
        &data.join("preproc-r0-b00.fits.gz"),
        "5760,7620,0.8",
        ["0", "25"],
    );
    assert_eq!(assert_ivar_and_nodata(&f), 0);
    assert_band(&f, 57_000);
}

/// The small simulation with its planes changed by `edit`, written uncompressed as `name`.
fn edited_ccd(
    dir: &Path,
    ccd: &SmallCcd,
    name: &str,
    edit: impl FnOnce(&mut ndarray::Array2<f32>, &mut ndarray::Array2<f32>, &mut ndarray::Array2<i16>),
) -> PathBuf {
    let (mut image, mut ivar, mut mask) = (
        ccd.sim.image.clone(),
        ccd.sim.ivar.clone(),
        ccd.sim.mask.clone(),
    );
    edit(&mut image, &mut ivar, &mut mask);
    let path = dir.join(name);
    spextract::io::write_preproc(
        &path,
        &image,
        &ivar,
        &mask,
        &ccd.sim.header,
        Some(&ccd.sim.fibermap),
        false,
    )
    .unwrap();
    path
}

/// Extracts `image` of the small CCD, with `extra` arguments, into `dir/<image stem>-frame.fits`.
fn extract_small(
    dir: &Path,
    ccd: &SmallCcd,
    image: &Path,
    extra: &[&str],
) -> (crate::common::Run, PathBuf) {
    let stem = image.file_stem().unwrap().to_string_lossy();
    let out = dir.join(format!("{stem}-frame.fits"));
    let mut args: Vec<std::ffi::OsString> = vec![
        "extract".into(),
        "-p".into(),
        ccd.psf.clone().into(),
        "-i".into(),
        image.into(),
        "-o".into(),
        out.clone().into(),
        "-w".into(),
        SMALL_GRID.into(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    (crate::common::spextract(args), out)
}

/// For each fiber and bin of the small grid, the CCD rows its spot covers.
fn spot_rows(ccd: &SmallCcd) -> ndarray::Array2<(i64, i64)> {
    let psf = spextract::io::read_psf(&ccd.psf).unwrap();
    let g: Vec<f64> = SMALL_GRID.split(',').map(|v| v.parse().unwrap()).collect();
    let wave: Vec<f64> = (0..)
        .map(|k| g[0] + g[2] * f64::from(k))
        .take_while(|w| *w <= g[1] + 1e-9)
        .collect();
    let set = spextract::psf::spots::evaluate(&psf, 0, psf.nfiber(), &wave).unwrap();
    ndarray::Array2::from_shape_fn((psf.nfiber(), wave.len()), |(f, j)| {
        let y0 = set.yc[set.index(f, j)];
        (y0, y0 + set.ny as i64)
    })
}

/// An image whose every pixel is masked, or whose ivar is 0 everywhere, holds nothing to
/// extract: the run fails naming the image, before any work, instead of writing a frame of
/// regularisation (ivar about 6e-16 in every bin, exit 0, as it did). Fibers whose pixels are
/// all masked in an image that has data elsewhere fail the same way, after extraction.
#[test]
fn a_frame_of_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let masked = edited_ccd(d, &ccd, "all-masked.fits", |_, _, mask| mask.fill(1));
    let dark = edited_ccd(d, &ccd, "ivar-zero.fits", |_, ivar, _| ivar.fill(0.0));
    for image in [masked, dark] {
        let (run, out) = extract_small(d, &ccd, &image, &[]);
        let name = image.file_name().unwrap().to_string_lossy().into_owned();
        run.fails_with(&[&name, "no pixel has data", "nothing to extract"]);
        assert!(
            !run.stderr.contains("patches/s"),
            "it extracted:\n{}",
            run.stderr
        );
        assert_no_output(&out);
    }
    // Fibers 0..5 lie on columns 20..60 or so; columns 150.. keep their data.
    let left = edited_ccd(d, &ccd, "left-masked.fits", |_, _, mask| {
        mask.slice_mut(ndarray::s![.., ..150]).fill(1);
    });
    let (run, out) = extract_small(d, &ccd, &left, &["-s", "0", "-n", "5"]);
    run.fails_with(&[
        "left-masked.fits",
        "no bin of the frame can be written",
        "of 2505 bins, 2505 have no data",
    ]);
    assert_no_output(&out);
}

/// Rows 400..520 masked on every column: the bins whose spots lie wholly in them carry no
/// data and are written NODATA with flux and ivar 0, with a warning naming the image; bins
/// whose spots reach unmasked rows keep their ivar.
#[test]
fn bins_without_data_are_nodata_with_ivar_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let (r0, r1) = (400i64, 520i64);
    let image = edited_ccd(d, &ccd, "band-masked.fits", |_, _, mask| {
        mask.slice_mut(ndarray::s![r0 as usize..r1 as usize, ..])
            .fill(1);
    });
    let (run, out) = extract_small(d, &ccd, &image, &[]);
    run.ok();
    let f = read_frame(&out).unwrap();
    let nodata = assert_ivar_and_nodata(&f);
    let rows = spot_rows(&ccd);
    let mut inside = 0;
    for ((i, j), &(y0, y1)) in rows.indexed_iter() {
        let is_nodata = f.mask[[i, j]] & NODATA != 0;
        if y0 >= r0 && y1 <= r1 {
            inside += 1;
            assert!(
                is_nodata,
                "fiber {i} bin {j}: spot on rows {y0}..{y1}, all masked"
            );
        } else if is_nodata {
            let centre = (y0 + y1) / 2;
            assert!(
                (r0..r1).contains(&centre),
                "fiber {i} bin {j}: NODATA with its spot on rows {y0}..{y1}"
            );
        }
    }
    assert!(
        inside > 0 && nodata >= inside,
        "{inside} spots inside, {nodata} NODATA"
    );
    assert!(
        run.stderr.contains("band-masked.fits")
            && run
                .stderr
                .contains(&format!("{nodata} of {} bins have no data", f.flux.len())),
        "{}",
        run.stderr
    );
}

/// An image of 1e38 gives fluxes beyond float32's range: the frame is refused rather than
/// written with FLUX = +inf in every bin (exit 0, as it did). With 1e38 on some rows only,
/// the bins they ruin are written NODATA with flux and ivar 0, and a warning says so; no value
/// in the file is infinite.
#[test]
fn non_finite_results_are_never_written_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ccd = small_ccd(d);
    let huge = edited_ccd(d, &ccd, "huge.fits", |image, _, _| image.fill(1e38));
    let (run, out) = extract_small(d, &ccd, &huge, &[]);
    run.fails_with(&[
        "huge.fits",
        "no bin of the frame can be written",
        "not finite",
    ]);
    assert_no_output(&out);

    let part = edited_ccd(d, &ccd, "huge-rows.fits", |image, _, _| {
        image.slice_mut(ndarray::s![400..520, ..]).fill(1e38);
    });
    let (run, out) = extract_small(d, &ccd, &part, &[]);
    run.ok();
    let f = read_frame(&out).unwrap();
    let nodata = assert_ivar_and_nodata(&f);
    assert!(
        f.resolution.iter().all(|v| v.is_finite()),
        "RESOLUTION holds a non-finite value"
    );
    assert!(nodata > 0, "no bin was withheld");
    assert!(
        run.stderr.contains("huge-rows.fits")
            && run.stderr.contains(&format!(
                "{nodata} of {} bins have a non-finite",
                f.flux.len()
            )),
        "{}",
        run.stderr
    );
}
