//! `spextract extract`: one frame, one process, no MPI needed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::{ExtractArgs, ExtractionFlags};
use crate::config::{self, Config};
use crate::extract::cpu::CpuBackend;
use crate::extract::ExtractOptions;
use crate::io::frame::{write_frame, write_model_image, Frame, FrameMeta};
use crate::io::image::{read_preproc, Preproc};
use crate::io::psf::read_psf;
use crate::patch::{PatchOptions, Plan, WaveGrid};
use crate::pipeline::frame::{extract_frame, finalize, FrameResult};
use crate::psf::Psf;

/// Everything resolved and loaded for one frame's extraction.
pub struct Prepared {
    /// Where the PSF came from.
    pub psf_path: PathBuf,
    /// Where the image came from.
    pub image_path: PathBuf,
    /// The PSF.
    pub psf: Psf,
    /// The image, ivar masked.
    pub preproc: Preproc,
    /// Output and padded grids.
    pub grid: WaveGrid,
    /// The patches.
    pub plan: Plan,
    /// Patch geometry options.
    pub patch: PatchOptions,
    /// Per-patch options.
    pub opts: ExtractOptions,
    /// Worker threads.
    pub threads: usize,
    /// Whether to draw a progress bar.
    pub progress: bool,
}

/// The value of `key` in raw FITS header cards, without quotes.
pub fn header_value(cards: &[String], key: &str) -> Option<String> {
    cards.iter().find_map(|c| {
        let (k, rest) = c.split_at(c.len().min(8));
        if k.trim_end() != key || !rest.starts_with('=') {
            return None;
        }
        let v = rest[1..].trim();
        if let Some(stripped) = v.strip_prefix('\'') {
            let end = stripped.find('\'').unwrap_or(stripped.len());
            Some(stripped[..end].trim_end().to_string())
        } else {
            Some(v.split('/').next().unwrap_or("").trim().to_string())
        }
    })
}

/// The output grid `[wmin, wmax, dw]`, which must lie inside the PSF's wavelength range.
fn wave_grid(w: [f64; 3], cfg: &Config, psf: &Psf, psf_path: &Path) -> Result<WaveGrid> {
    let grid = WaveGrid::new(w[0], w[1], w[2], &cfg.patch).map_err(anyhow::Error::msg)?;
    let (lo, hi) = psf.wave_range();
    let (gmin, gmax) = (grid.wave[0], grid.wave[grid.wave.len() - 1]);
    if gmin < lo || gmax > hi {
        bail!(
            "wavelength range {gmin:.2}..{gmax:.2} Å is outside the PSF {} range {lo}..{hi} Å",
            psf_path.display()
        );
    }
    let (pmin, pmax) = (grid.padded[0], grid.padded[grid.padded.len() - 1]);
    if pmin < lo || pmax > hi {
        warn!("patch padding {pmin:.2}..{pmax:.2} Å extrapolates the PSF beyond {lo}..{hi} Å");
    }
    Ok(grid)
}

/// Merges flags over the configuration file, validates, then reads the PSF and the image.
pub fn prepare(flags: &ExtractionFlags, model_image: bool) -> Result<Prepared> {
    let mut cfg = Config::load(flags.config.as_deref())?;
    let e = &mut cfg.extract;
    if let Some(w) = &flags.wavelength {
        e.wavelength = w.clone();
    }
    e.specmin = flags.specmin.unwrap_or(e.specmin);
    e.nspec = flags.nspec.unwrap_or(e.nspec);
    e.regularize = flags.regularize.unwrap_or(e.regularize);
    e.psferr = flags.psferr.unwrap_or(e.psferr);
    let p = &mut cfg.patch;
    p.bundlesize = flags.bundlesize.unwrap_or(p.bundlesize);
    p.nsubbundles = flags.nsubbundles.unwrap_or(p.nsubbundles);
    p.nwavestep = flags.nwavestep.unwrap_or(p.nwavestep);
    p.wavepad = flags.wavepad.unwrap_or(p.wavepad);
    p.wavepad_frac = flags.wavepad_frac.unwrap_or(p.wavepad_frac);
    p.pixpad_frac = flags.pixpad_frac.unwrap_or(p.pixpad_frac);
    cfg.run.threads = flags.threads.unwrap_or(cfg.run.threads);
    cfg.validate()?;
    let psf_path = flags
        .psf
        .as_deref()
        .context("no PSF given: pass --psf (or a list of frames)")?;
    let image_path = flags
        .image
        .as_deref()
        .context("no image given: pass --image (or a list of frames)")?;

    let psf = read_psf(psf_path)?;
    // What the PSF alone can refuse, before the (larger) image is read.
    let specmin = cfg.extract.specmin;
    let nfiber = psf.nfiber();
    if specmin >= nfiber {
        bail!(
            "specmin {specmin} is past the last fiber of the PSF {}, which has {nfiber} fibers",
            psf_path.display()
        );
    }
    let nspec = match cfg.extract.nspec {
        0 => nfiber - specmin,
        n if specmin + n > nfiber => bail!(
            "fibers {specmin}..{} requested but the PSF {} has {nfiber} fibers",
            specmin + n,
            psf_path.display()
        ),
        n => n,
    };
    let given = (!cfg.extract.wavelength.is_empty()).then(|| {
        let w = &cfg.extract.wavelength;
        [w[0], w[1], w[2]]
    });
    let grid_given = match given {
        Some(w) => Some(wave_grid(w, &cfg, &psf, psf_path)?),
        None => None,
    };

    let t0 = Instant::now();
    let preproc = read_preproc(image_path, cfg.extract.mask_bits)?;
    info!(
        "read {} ({}x{}) in {:.2}s: {} pixels masked by MASK bits, {} NaN/Inf pixels treated as masked",
        image_path.display(),
        preproc.image.nrows(),
        preproc.image.ncols(),
        t0.elapsed().as_secs_f64(),
        preproc.masked_by_bits,
        preproc.nonfinite
    );
    if preproc.image.dim() != (psf.npix_y, psf.npix_x) {
        bail!(
            "{}: image is {} rows x {} columns but the PSF {} describes a {} x {} CCD",
            image_path.display(),
            preproc.image.nrows(),
            preproc.image.ncols(),
            psf_path.display(),
            psf.npix_y,
            psf.npix_x
        );
    }
    let grid = match grid_given {
        Some(g) => g,
        None => {
            let camera = header_value(&preproc.header, "CAMERA").unwrap_or_default();
            let w = config::camera_wavelength(&camera).with_context(|| {
                format!(
                    "{}: no --wavelength given and CAMERA '{camera}' is not b, r or z",
                    image_path.display()
                )
            })?;
            wave_grid(w, &cfg, &psf, psf_path)?
        }
    };
    let plan = Plan::new(specmin, nspec, grid.wave.len(), psf.nfiber(), &cfg.patch);
    let psferr = if cfg.extract.psferr >= 0.0 {
        cfg.extract.psferr
    } else {
        psf.psferr.unwrap_or(0.01)
    };
    let opts = ExtractOptions {
        regularize: cfg.extract.regularize,
        psferr,
        ndiag: psf.hsizey,
        model_image,
    };
    let progress = !flags.no_progress
        && cfg
            .run
            .progress
            .unwrap_or_else(|| std::io::stderr().is_terminal());
    Ok(Prepared {
        psf_path: psf_path.to_path_buf(),
        image_path: image_path.to_path_buf(),
        psf,
        preproc,
        grid,
        plan,
        patch: cfg.patch,
        opts,
        threads: config::resolve_threads(cfg.run.threads),
        progress,
    })
}

/// Runs the extraction of a prepared frame on `threads` threads, with progress.
pub fn run_extraction(prep: &Prepared, threads: usize, progress: bool) -> Result<FrameResult> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting worker threads")?;
    let total = prep.plan.npatch();
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} patches ({msg}) {per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar
    });
    let nbundle = prep.plan.bundles.len();
    let mut bundles_done = 0;
    let start = Instant::now();
    let mut report = |done: usize, total: usize| {
        bundles_done += 1;
        match &bar {
            Some(bar) => {
                bar.set_position(done as u64);
                bar.set_message(format!("bundle {bundles_done}/{nbundle}"));
            }
            None => info!(
                "bundle {bundles_done}/{nbundle}: {done}/{total} patches, {:.1} patches/s",
                done as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ),
        }
    };
    let mut backend = CpuBackend;
    let res = pool.install(|| {
        extract_frame(
            &prep.psf,
            prep.preproc.image.view(),
            prep.preproc.ivar.view(),
            &prep.grid,
            &prep.plan,
            prep.patch.pixpad_frac,
            &prep.opts,
            &mut backend,
            &mut report,
        )
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(res)
}

/// Fails early, before any work, when an output exists and may not be replaced, or when its
/// folder does not exist or does not take new files (probed by creating and removing a file
/// there, since outputs are written to a temporary beside them and renamed).
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a directory, not an output file", path.display());
    }
    let name = path
        .file_name()
        .with_context(|| format!("{}: output path has no file name", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{}: the output folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(
        ".{}.probe-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .with_context(|| {
            format!(
                "{}: cannot create files in {}",
                path.display(),
                dir.display()
            )
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `spextract extract`: one frame given by `--psf --image --output`, in this process; or many
/// frames through the pipeline.
pub fn run(args: &ExtractArgs) -> Result<bool> {
    if args.flags.image.is_some() && args.output.is_some() && !args.select.any() {
        single(args)?;
        return Ok(true);
    }
    crate::pipeline::run::run(args)
}

fn single(args: &ExtractArgs) -> Result<()> {
    let output = args.output.as_deref().expect("checked by run");
    check_output(output, args.overwrite)?;
    if let Some(m) = &args.model_image {
        check_output(m, args.overwrite)?;
    }
    let start = Instant::now();
    let prep = prepare(&args.flags, args.model_image.is_some())?;
    info!(
        "extracting fibers {}..{} on {} bins ({}..{} Å) in {} patches with {} threads",
        prep.plan.specmin,
        prep.plan.specmin + prep.plan.nspec,
        prep.grid.wave.len(),
        prep.grid.wave[0],
        prep.grid.wave[prep.grid.wave.len() - 1],
        prep.plan.npatch(),
        prep.threads
    );
    let res = run_extraction(&prep, prep.threads, prep.progress)?;
    let st = &res.stats;
    info!(
        "extracted {} patches in {:.2}s (spots {:.2}s, solve {:.2}s, assemble {:.2}s); {} retried, {} failed, {} dropped off the CCD",
        st.patches,
        start.elapsed().as_secs_f64(),
        st.spots.as_secs_f64(),
        st.solve.as_secs_f64(),
        st.assemble.as_secs_f64(),
        st.retried,
        st.failed,
        st.dropped
    );
    check_extracted(&res, prep.plan.npatch())?;
    write_outputs(
        &prep,
        &res,
        output,
        args.model_image.as_deref(),
        args.overwrite,
    )?;
    info!(
        "wrote {} in {:.2}s total",
        output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Refuses a frame in which nothing was extracted; warns about failed patches.
pub fn check_extracted(res: &FrameResult, npatch: usize) -> Result<()> {
    let st = &res.stats;
    if st.failed + st.dropped >= npatch {
        bail!(
            "nothing was extracted: of {} patches, {} left the CCD and {} failed even with \
             regularisation; no output written",
            npatch,
            st.dropped,
            st.failed
        );
    }
    if st.failed > 0 {
        warn!(
            "{} patches failed even with regularisation: their bins have ivar 0 and mask NODATA",
            st.failed
        );
    }
    Ok(())
}

/// Finalises and writes a frame (and the model image when one was computed).
pub fn write_outputs(
    prep: &Prepared,
    res: &FrameResult,
    output: &Path,
    model_image: Option<&Path>,
    overwrite: bool,
) -> Result<()> {
    let fin = finalize(res, &prep.grid);
    let frame = Frame {
        specmin: res.specmin,
        wave: res.wave.clone(),
        flux: fin.flux,
        ivar: fin.ivar,
        mask: fin.mask,
        resolution: res.resolution.clone(),
        chi2pix: res.chi2pix.clone(),
    };
    let meta = FrameMeta {
        header: prep.preproc.header.clone(),
        in_psf: prep.psf_path.display().to_string(),
        in_img: prep.image_path.display().to_string(),
        orig_psf: prep.psf.in_psf.clone(),
        fibermap_from: prep.preproc.has_fibermap.then(|| prep.image_path.clone()),
        extra: vec![
            (
                "PSFERR".into(),
                format!("{}", prep.opts.psferr),
                "PSF model error used by chi2pix".into(),
            ),
            (
                "REGULARI".into(),
                format!("{}", prep.opts.regularize),
                "regularisation".into(),
            ),
        ],
    };
    write_frame(output, &frame, &meta, overwrite)?;
    if let (Some(path), Some(model)) = (model_image, &res.model) {
        write_model_image(path, model, overwrite)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::header_value;

    #[test]
    fn header_values_lose_quotes_and_comments() {
        let cards = vec![
            format!("{:<80}", "CAMERA  = 'r0      '           / camera"),
            format!("{:<80}", "EXPID   =                67784 / exposure"),
        ];
        assert_eq!(header_value(&cards, "CAMERA").as_deref(), Some("r0"));
        assert_eq!(header_value(&cards, "EXPID").as_deref(), Some("67784"));
        assert_eq!(header_value(&cards, "NIGHT"), None);
    }
}
