//! `spextract extract`: one frame, one process, no MPI needed.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::{ExtractArgs, ExtractionFlags};
use crate::config::Config;
use crate::extract::engine::BackendKind;
use crate::pipeline::frame::FrameResult;
pub use crate::pipeline::prepare::{
    check_extracted, extract_prepared, frame_meta, header_value, prepare_frame, write_outputs,
    Prepared,
};
use crate::pipeline::progress::{count, rate_text, wave_range};

/// Merges flags over the configuration file and validates the result.
pub fn resolve_config(flags: &ExtractionFlags) -> Result<Config> {
    let mut cfg = Config::load(flags.config.as_deref())?;
    let e = &mut cfg.extract;
    if let Some(w) = &flags.wavelength {
        e.wavelength = w.clone();
    }
    e.specmin = flags.specmin.unwrap_or(e.specmin);
    e.nspec = flags.nspec.unwrap_or(e.nspec);
    e.regularize = flags.regularize.unwrap_or(e.regularize);
    e.psferr = flags.psferr.unwrap_or(e.psferr);
    e.allow_camera_mismatch |= flags.allow_camera_mismatch;
    e.model_flux = flags.model_flux.unwrap_or(e.model_flux);
    e.ivar_from_model |= flags.ivar_from_model;
    let p = &mut cfg.patch;
    p.bundlesize = flags.bundlesize.unwrap_or(p.bundlesize);
    p.nsubbundles = flags.nsubbundles.unwrap_or(p.nsubbundles);
    p.nwavestep = flags.nwavestep.unwrap_or(p.nwavestep);
    p.wavepad = flags.wavepad.unwrap_or(p.wavepad);
    p.wavepad_frac = flags.wavepad_frac.unwrap_or(p.wavepad_frac);
    p.pixpad_frac = flags.pixpad_frac.unwrap_or(p.pixpad_frac);
    cfg.run.threads = flags.threads.unwrap_or(cfg.run.threads);
    cfg.validate()?;
    Ok(cfg)
}

/// Resolves the configuration, then reads the single frame named by `--psf` and `--image`.
pub fn prepare(flags: &ExtractionFlags, model_image: bool) -> Result<Prepared> {
    prepare_with(&resolve_config(flags)?, flags, model_image)
}

/// [`prepare`] under an already resolved configuration.
fn prepare_with(cfg: &Config, flags: &ExtractionFlags, model_image: bool) -> Result<Prepared> {
    let psf_path = flags
        .psf
        .as_deref()
        .context("no PSF given: pass --psf (or a list of frames)")?;
    let image_path = flags
        .image
        .as_deref()
        .context("no image given: pass --image (or a list of frames)")?;

    let progress = !flags.no_progress
        && cfg
            .run
            .progress
            .unwrap_or_else(|| std::io::stderr().is_terminal());
    let prep = prepare_frame(cfg, psf_path, image_path, model_image, progress)?;
    info!("{}", prep.read_summary());
    Ok(prep)
}

/// Runs the extraction of a prepared frame on `threads` threads, with progress.
pub fn run_extraction(
    prep: &Prepared,
    threads: usize,
    progress: bool,
    backend: &mut dyn crate::extract::Backend,
) -> Result<FrameResult> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting worker threads")?;
    let total = prep.plan.npatch();
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        // The bar takes what the terminal's width leaves (80 columns leave it about 20).
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{wide_bar} {pos}/{len} patches, {msg}, {rate}, eta {eta}",
            )
            .expect("valid template")
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate_text(s.per_sec(), "patches"));
                },
            ),
        );
        bar.set_message(format!("0/{} bundles", prep.plan.bundles.len()));
        crate::pipeline::progress::show(&bar);
        bar
    });
    let nbundle = prep.plan.bundles.len();
    let start = Instant::now();
    // Without a bar, a log line per bundle finished.
    let logged_bundles = std::sync::atomic::AtomicUsize::new(0);
    // Called as patches finish, from any of the pool's threads.
    let report = |done: usize, total: usize| {
        let bundles = nbundle * done / total.max(1);
        match &bar {
            Some(bar) => {
                // Two passes (--ivar-from-model) count the patches twice.
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(format!("{bundles}/{nbundle} bundles"));
            }
            None => {
                let before =
                    logged_bundles.fetch_max(bundles, std::sync::atomic::Ordering::Relaxed);
                if bundles > before {
                    info!(
                        "{bundles}/{nbundle} bundles: {done}/{total} patches, {}",
                        rate_text(
                            done as f64 / start.elapsed().as_secs_f64().max(1e-9),
                            "patches"
                        )
                    );
                }
            }
        }
    };
    let res = pool.install(|| extract_prepared(prep, backend, &report));
    if let Some(bar) = bar {
        crate::pipeline::progress::hide();
        bar.finish_and_clear();
    }
    let res = res?;
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
    let cfg = resolve_config(&args.flags)?;
    if args.flags.image.is_some()
        && args.output.is_some()
        && !args.select.any()
        && cfg.frames.is_empty()
    {
        single(args, &cfg)?;
        return Ok(true);
    }
    many(args, cfg)
}

/// Many frames through the pipeline (any number of ranks, or this process alone).
fn many(args: &ExtractArgs, mut cfg: Config) -> Result<bool> {
    use super::select;
    use crate::pipeline::joblist::FrameJob;
    use crate::pipeline::{env, run};
    if args.model_image.is_some() {
        bail!("--model-image is for a single frame (--psf, --image, --output), not a list");
    }
    let (r, rc) = (&args.run, &mut cfg.run);
    rc.backend = r.backend.unwrap_or(rc.backend);
    rc.readers_per_node = r.readers_per_node.unwrap_or(rc.readers_per_node);
    rc.writers_per_node = r.writers_per_node.unwrap_or(rc.writers_per_node);
    rc.prefetch = r.prefetch.unwrap_or(rc.prefetch);
    rc.unit_bundles = r.unit_bundles.unwrap_or(rc.unit_bundles);
    rc.ranks_per_gpu = r.ranks_per_gpu.unwrap_or(rc.ranks_per_gpu);
    rc.watchdog = r.watchdog.unwrap_or(rc.watchdog);
    cfg.validate()?;
    let launch = env::launch();
    // Every rank applies the same limits; rank 0 alone says so.
    let (prefetch, prefetch_cut) = env::cap_prefetch(cfg.run.prefetch);
    cfg.run.prefetch = prefetch;
    let threads = env::thread_count(cfg.run.threads);
    if launch.rank == 0 {
        for why in [prefetch_cut, threads.warning()].into_iter().flatten() {
            warn!("{why}");
        }
    }
    let threads = threads.threads;
    let f = &args.flags;
    let single = match (&f.image, &f.psf, &args.output) {
        (Some(image), Some(psf), Some(output)) => Some(FrameJob {
            image: image.clone(),
            psf: psf.clone(),
            output: output.clone(),
        }),
        (None, None, None) => None,
        _ => bail!("--image, --psf and --output name one frame and go together"),
    };
    let config_dir = f.config.as_deref().and_then(Path::parent);
    let jobs = select::resolve(&args.select, &cfg.frames, config_dir, single)?;
    let rc = cfg.run.clone();
    let backend = choose_backend(rc.backend)?;
    // Only rank 0 hands out frames, so only it looks at the outputs (each look reads a frame).
    let mut skipped = Vec::new();
    if launch.rank == 0 {
        remove_leftovers(jobs.iter().map(|j| j.output.as_path()));
        if !args.overwrite {
            let refused = existing_outputs(&jobs, &cfg, &mut skipped);
            if !refused.is_empty() {
                let msg = refusal(&refused, jobs.len());
                if launch.under_mpi {
                    // The other ranks wait for this one in MPI_Init, and a launcher need not
                    // end a job when one rank exits (srun without --kill-on-bad-exit).
                    tracing::error!("{msg}");
                    run::abort_job(2);
                }
                bail!(msg);
            }
        }
        if let Some(msg) = env::oversubscription(launch.local_size, threads, env::node_cores()) {
            warn!("{msg}");
        }
    }
    let opts = run::RunOptions {
        jobs,
        skipped,
        // Without --overwrite nothing was at the outputs of the frames to do (or the run was
        // refused above); one that appears meanwhile is not replaced, and that frame fails.
        overwrite: args.overwrite,
        readers_per_node: rc.readers_per_node,
        writers_per_node: rc.writers_per_node,
        prefetch: rc.prefetch,
        unit_bundles: rc.unit_bundles,
        ranks_per_gpu: rc.ranks_per_gpu,
        watchdog_s: rc.watchdog,
        threads,
        backend,
        label: args.run.label.clone(),
        report: args.run.report.clone(),
        // Under a launcher stderr is a pipe: rank 0 then logs progress lines instead.
        progress_bar: !args.flags.no_progress
            && rc.progress.unwrap_or(true)
            && std::io::stderr().is_terminal(),
        cfg,
    };
    let stop = run::StopSignal::install()?;
    let Some(report) = run::execute(&opts, &stop)? else {
        return Ok(true);
    };
    eprint!("{}", summary_text(&report));
    if let Some(path) = &opts.report {
        report
            .write_json(path)
            .with_context(|| format!("writing the report {}", path.display()))?;
        info!("report written to {}", path.display());
    }
    Ok(report.frames.failed == 0 && report.frames.abandoned == 0)
}

/// Sorts the outputs already there: frames of this very request go to `skipped` (their
/// indices); the others (stale frames, frames that do not say what they hold, other files)
/// come back as `output: why`.
fn existing_outputs(
    jobs: &[crate::pipeline::joblist::FrameJob],
    cfg: &Config,
    skipped: &mut Vec<usize>,
) -> Vec<String> {
    use crate::pipeline::joblist::{output_state, OutputState};
    use crate::pipeline::request::FrameRequest;
    let mut refused = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let state = output_state(&job.output, || {
            FrameRequest::new(cfg, &job.image, &job.psf).map_err(|e| e.to_string())
        });
        match state.problem() {
            Some(why) => refused.push(format!("{}: {why}", job.output.display())),
            None if state == OutputState::Complete => skipped.push(i),
            None => {}
        }
    }
    refused
}

/// The error of a run refused for the files at its outputs, listing the first few.
fn refusal(refused: &[String], listed: usize) -> String {
    const SHOWN: usize = 10;
    let mut msg = format!(
        "outputs already there that are not frames of what this run asks for ({} of \
         {listed}); nothing was done. Pass --overwrite to replace them (every output is then \
         redone), or name other outputs:",
        refused.len()
    );
    for r in refused.iter().take(SHOWN) {
        msg.push_str("\n  ");
        msg.push_str(r);
    }
    if refused.len() > SHOWN {
        msg.push_str(&format!("\n  ... and {} more", refused.len() - SHOWN));
    }
    msg
}

/// Removes the temporaries that killed writers left beside the outputs (frames, model images,
/// any output written through a temporary), in each output folder once. Temporaries whose
/// writer still runs on this host, or that another host wrote, are left, and said so.
fn remove_leftovers<'a>(outputs: impl IntoIterator<Item = &'a Path>) {
    let folders: std::collections::BTreeSet<&Path> = outputs
        .into_iter()
        .map(|o| match o.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        })
        .collect();
    for folder in folders {
        let found = crate::io::leftover_temporaries(folder);
        for stale in &found.stale {
            match std::fs::remove_file(stale) {
                Ok(()) => info!("removed {}, left by an interrupted run", stale.display()),
                Err(e) => warn!("could not remove {}: {e}", stale.display()),
            }
        }
        if let Some(first) = found.busy.first() {
            info!(
                "left {} temporary file(s) in {} (first: {}): their writer is still running",
                found.busy.len(),
                folder.display(),
                first.display()
            );
        }
        if let Some(first) = found.elsewhere.first() {
            warn!(
                "left {} temporary file(s) in {} (first: {}): written on another host, whose \
                 processes cannot be checked from here; remove them once no run writes there",
                found.elsewhere.len(),
                folder.display(),
                first.display()
            );
        }
    }
}

/// The end-of-run summary printed on rank 0.
pub fn summary_text(r: &crate::pipeline::report::RunReport) -> String {
    use std::fmt::Write;
    let f = &r.frames;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} frames: {} written, {} skipped (already complete), {} failed, {} abandoned{}",
        f.listed,
        f.written,
        f.skipped,
        f.failed,
        f.abandoned,
        if r.interrupted { " (interrupted)" } else { "" }
    );
    let moved = if r.ranks > 1 {
        format!(
            "{:.1} MB sent between ranks per frame",
            r.bytes_per_frame / 1e6
        )
    } else {
        format!(
            "{:.1} MB of pixels in work units per frame (one process: nothing crosses MPI)",
            r.bytes_per_frame / 1e6
        )
    };
    let _ = writeln!(
        s,
        "wall {:.1} s on {} node(s), {} rank(s) x {}: {:.0} frames per node-hour; {moved}",
        r.wall_s,
        r.nodes,
        r.ranks,
        count(r.threads_per_rank, "thread"),
        r.frames_per_node_hour,
    );
    let _ = writeln!(
        s,
        "{:>5} {:>4} {:<22} {:>8} {:>10} {:>9} {:>8} {:>8} {:>6} {:>9}",
        "rank",
        "node",
        "role",
        "read s",
        "transfer s",
        "compute s",
        "write s",
        "idle s",
        "units",
        "peak MiB"
    );
    for t in &r.roles {
        let _ = writeln!(
            s,
            "{:>5} {:>4} {:<22} {:>8.2} {:>10.2} {:>9.2} {:>8.2} {:>8.2} {:>6} {:>9.0}",
            t.rank,
            t.node,
            t.role,
            t.read_s,
            t.transfer_s,
            t.compute_s,
            t.write_s,
            t.idle_s,
            t.units,
            t.peak_rss_mib
        );
    }
    let (device, downloaded): (usize, usize) = r.roles.iter().fold((0, 0), |(a, b), t| {
        (a + t.device_units, b + t.pixel_downloads)
    });
    if device > 0 {
        let _ = writeln!(
            s,
            "CUDA-aware MPI: {device} unit(s) received into GPU memory; {downloaded} of them \
             downloaded to the host for CPU retries"
        );
    }
    if !r.failures.is_empty() {
        let _ = writeln!(s, "failed frames:");
        for fl in &r.failures {
            let _ = writeln!(
                s,
                "  {}  ->  {}\n    {}",
                fl.image.display(),
                fl.output.display(),
                fl.error
            );
        }
    }
    s
}

/// Resolves `--backend` (else the configuration's) for this machine and logs the choice: "cpu",
/// or the request itself where it leads to the GPU ("auto" keeps its fallback to the CPU for
/// a GPU backend that then fails to start, in `extract::engine::start`).
fn choose_backend(requested: BackendKind) -> Result<BackendKind> {
    use crate::extract::engine::{choose, Choice};
    match choose(requested)? {
        Choice::Cpu(why) => {
            info!("backend: cpu ({why})");
            Ok(BackendKind::Cpu)
        }
        Choice::Gpu(why) => {
            info!("backend: gpu ({why})");
            Ok(requested)
        }
    }
}

fn single(args: &ExtractArgs, cfg: &Config) -> Result<()> {
    let output = args.output.as_deref().expect("checked by run");
    let backend = choose_backend(args.run.backend.unwrap_or(cfg.run.backend))?;
    if let (Some(image), Some(psf)) = (&args.flags.image, &args.flags.psf) {
        let job = crate::pipeline::joblist::FrameJob {
            image: image.clone(),
            psf: psf.clone(),
            output: output.to_path_buf(),
        };
        crate::pipeline::joblist::check_single_outputs(&job, args.model_image.as_deref())?;
    }
    check_output(output, args.overwrite)?;
    if let Some(m) = &args.model_image {
        check_output(m, args.overwrite)?;
    }
    if let Some(why) = crate::pipeline::env::thread_count(cfg.run.threads).warning() {
        warn!("{why}");
    }
    remove_leftovers(std::iter::once(output).chain(args.model_image.as_deref()));
    let start = Instant::now();
    let prep = prepare_with(cfg, &args.flags, args.model_image.is_some())?;
    info!(
        "extracting fibers {}..{} on {} bins ({}) in {} patches with {}",
        prep.plan.specmin,
        prep.plan.specmin + prep.plan.nspec,
        prep.grid.wave.len(),
        wave_range(&prep.grid.wave),
        prep.plan.npatch(),
        count(prep.threads, "thread")
    );
    // One process: the first visible GPU.
    let mut engine = crate::extract::engine::start(backend, |_| Ok(0))?.boxed();
    let mut res = run_extraction(&prep, prep.threads, prep.progress, engine.as_mut())?;
    let st = &res.stats;
    // --ivar-from-model extracts every patch twice: the timings are both passes', the counts
    // the second's (`extract_prepared`).
    let twice = if prep.ivar_model_gain.is_some() {
        " twice"
    } else {
        ""
    };
    info!(
        "extracted {} patches{twice} in {:.2}s (spots {:.2}s, solve {:.2}s, assemble {:.2}s); {} retried, {} failed, {} dropped off the CCD, {} at its edge ({} bins with < {} of their light on it NODATA)",
        st.patches,
        start.elapsed().as_secs_f64(),
        st.spots.as_secs_f64(),
        st.solve.as_secs_f64(),
        st.assemble.as_secs_f64(),
        st.retried,
        st.failed,
        st.dropped,
        st.edge,
        st.starved,
        crate::extract::MIN_CCD_LIGHT
    );
    let stages = engine.take_stage_times();
    if stages.iter().any(|(_, s)| *s > 0.0) {
        let parts: Vec<String> = stages
            .iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(stage, s)| format!("{stage} {s:.3}"))
            .collect();
        info!("device seconds by stage: {}", parts.join(", "));
    }
    check_extracted(&mut res, &prep.grid, prep.plan.npatch(), &prep.image_path)
        .with_context(|| prep.image_path.display().to_string())?;
    write_outputs(
        &res,
        &prep.grid,
        &frame_meta(&prep),
        output,
        args.model_image.as_deref().zip(prep.opts.model_image),
        args.overwrite,
    )?;
    info!(
        "wrote {} in {:.2}s total",
        output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
