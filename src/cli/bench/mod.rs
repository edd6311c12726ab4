//! `spextract bench`: times one frame's extraction at several thread counts, against the dense
//! oracle (the straightforward eigendecomposition route of gpu_specter's CPU path) timed on a
//! sample of the same patches in the same process. With `--backend gpu`, also the GPU's
//! stage times against the floor the card sets (`cost`) and the two library choices timed at
//! the real sizes (`choice`).

use std::time::Instant;

use anyhow::Result;
use clap::Args;

use super::compare::diff_frames;
use super::extract::{prepare, run_extraction};
use super::ExtractionFlags;
use crate::extract::cpu::oracle;
use crate::extract::gpu::backend::GpuBackend;
use crate::extract::gpu::decorrelate::EigenRoute;
use crate::extract::gpu::solve;
use crate::extract::PatchInput;
use crate::patch::{pixels, Patch, PixelWindow};
use crate::pipeline::frame::FrameResult;
use crate::pipeline::prepare::{frame_of, Prepared};
use crate::psf::{spots, SpotSet};

/// `spextract bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Inputs and options (`--threads` is ignored: see `--thread-counts`).
    #[command(flatten)]
    pub flags: ExtractionFlags,
    /// Thread counts to time, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub thread_counts: Vec<usize>,
    /// Patches of the first bundle to time with the dense oracle (0: skip).
    #[arg(long, default_value_t = 10)]
    pub oracle_patches: usize,
    /// Backends to time on the same frame, in order (`cpu`, `gpu`): the GPU backend on device
    /// 0, once, with the host threads of the first thread count.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub backend: Vec<String>,
}

pub use crate::pipeline::report::peak_rss_mib;

pub mod choice;
pub mod cost;

/// The node the benchmark runs on, for frames per node-hour.
struct Node {
    cores: usize,
    gpus: usize,
}

/// `spextract bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let prep = prepare(&args.flags, false)?;
    let load = t0.elapsed().as_secs_f64();
    let npatch = prep.plan.npatch();
    println!(
        "frame: {} fibers x {} bins, {} patches; inputs read in {:.2}s",
        prep.plan.nspec,
        prep.grid.wave.len(),
        npatch,
        load
    );
    // Frames per hour are for a whole frame of the PSF's fibers on this grid, scaled from the
    // fibers timed (extraction time is proportional to the number of patches).
    let full = prep.psf.nfiber() as f64 / prep.plan.nspec.max(1) as f64;
    println!(
        "frames/hour: {} fibers timed, scaled x{full:.1} to the PSF's {} (extraction only, no I/O)",
        prep.plan.nspec,
        prep.psf.nfiber()
    );
    println!(
        "| backend | threads | wall s | s/patch | spots s | solve s | assemble s | frames/hour | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut one_thread = None;
    // Per backend: the best frame time per core or per GPU used (a node-hour holds
    // cores / threads CPU runs side by side, or one run per GPU).
    let mut best: Vec<(String, f64)> = Vec::new();
    let mut best_node: Vec<(String, f64)> = Vec::new();
    let mut gpu_stages: Vec<(&'static str, f64)> = Vec::new();
    let mut gpu_bundles = 1;
    let node = Node {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        gpus: crate::extract::gpu::device::probe().map_or(0, |d| d.len()),
    };
    // The first CPU frame and the GPU's steady-state frame, compared in f64 at the end: the
    // files store float32, whose rounding hides agreement below ~1e-7 relative.
    let mut frames: Vec<(String, FrameResult)> = Vec::new();
    for name in &args.backend {
        // Opening the GPU (and compiling its kernels on first use) is not part of the timing.
        let mut gpu_engine = if name == "gpu" {
            Some(GpuBackend::new(0)?)
        } else {
            None
        };
        let mut cpu_engine = crate::extract::cpu::CpuBackend;
        // The GPU runs the frame twice at the first thread count: the first run pays for the
        // libraries' lazy set-up and the memory pool's growth, the second is the steady state;
        // a third takes the decorrelation's other eigen route, for the whole frame's time.
        let counts: Vec<usize> = if name == "gpu" {
            let first = args.thread_counts.first().copied().unwrap_or(1);
            let runs = if solve::syev_batched_present() { 3 } else { 2 };
            vec![first; runs]
        } else {
            args.thread_counts.clone()
        };
        let other_route = EigenRoute::PREFERRED.other();
        let other_label = format!("gpu ({})", other_route.name());
        for (run, threads) in counts.into_iter().enumerate() {
            let engine: &mut dyn crate::extract::Backend = match gpu_engine.as_mut() {
                Some(g) => {
                    if run == 2 {
                        g.set_eigen_route(other_route);
                    }
                    g
                }
                None => &mut cpu_engine,
            };
            engine.take_stage_times();
            let t = Instant::now();
            let res = run_extraction(&prep, threads.max(1), false, engine)?;
            let wall = t.elapsed().as_secs_f64();
            let stages = engine.take_stage_times();
            if name == "gpu" && run == 1 {
                gpu_stages = stages;
                gpu_bundles = engine.bundles_per_batch();
            }
            let name = if name == "gpu" && run == 0 {
                "gpu (first run)"
            } else if name == "gpu" && run == 2 {
                other_label.as_str()
            } else {
                name.as_str()
            };
            if threads == 1 && name == "cpu" {
                one_thread = Some(wall);
            }
            let st = &res.stats;
            println!(
                "| {} | {} | {:.2} | {:.2e} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
                name,
                threads,
                wall,
                wall / st.patches.max(1) as f64,
                st.spots.as_secs_f64(),
                st.solve.as_secs_f64(),
                st.assemble.as_secs_f64(),
                3600.0 / (wall * full),
                peak_rss_mib()
            );
            if (name == "cpu" || name == "gpu") && !frames.iter().any(|(n, _)| n == name) {
                frames.push((name.to_string(), res));
            }
            let per_frame = wall * full;
            match best.iter_mut().find(|(n, _)| n == name) {
                Some((_, b)) => *b = b.min(per_frame),
                None => best.push((name.to_string(), per_frame)),
            }
            // Frames per node-hour: a CPU node runs cores / threads frames at once, a GPU
            // node one per GPU.
            let side_by_side = if name == "cpu" {
                node.cores as f64 / threads.max(1) as f64
            } else {
                node.gpus.max(1) as f64
            };
            let per_node_hour = 3600.0 / per_frame * side_by_side;
            match best_node.iter_mut().find(|(n, _)| n == name) {
                Some((_, b)) => *b = b.max(per_node_hour),
                None => best_node.push((name.to_string(), per_node_hour)),
            }
        }
    }
    if !gpu_stages.is_empty() {
        print_gpu_stages(&prep, &gpu_stages, gpu_bundles)?;
    }
    print_ratios(&best, &best_node, &node);
    print_parity(&frames, &prep)?;
    if args.oracle_patches > 0 {
        print_oracle(&prep, args.oracle_patches, one_thread)?;
    }
    Ok(())
}

/// The GPU's time per stage in the steady-state run, against the floor the card sets, and
/// the library choices.
fn print_gpu_stages(
    prep: &Prepared,
    gpu_stages: &[(&'static str, f64)],
    gpu_bundles: usize,
) -> Result<()> {
    let total: f64 = gpu_stages.iter().map(|(_, s)| s).sum();
    println!("GPU time per stage, steady-state run (CUDA events on the stream):");
    println!("| stage | GPU s | share |");
    println!("|---|---|---|");
    for (stage, secs) in gpu_stages {
        println!(
            "| {stage} | {secs:.3} | {:.1} % |",
            100.0 * secs / total.max(1e-12)
        );
    }
    println!("| all | {total:.3} | |");
    // The same stages against the floor the card's FP64 rate and bandwidths set for this
    // frame (BENCHMARKS.md, "the floor an H100 sets").
    let device = crate::extract::gpu::device::probe()
        .ok()
        .and_then(|d| d.first().map(|d| d.name.clone()))
        .unwrap_or_default();
    match cost::CardPeak::from_device_name(&device) {
        Some(card) => {
            let shape = cost::FrameShape::of_plan(
                &prep.psf,
                &prep.plan,
                &prep.grid,
                prep.patch.pixpad_frac,
                prep.opts.ndiag,
                gpu_bundles,
            )?;
            let costs = cost::frame_costs(&shape);
            println!("{}", cost::render_table(&costs, &card, gpu_stages));
        }
        None => println!("no peak figures for {device:?}: floor table skipped"),
    }
    // A failure here (a cuSOLVER without XsyevBatched, say) leaves the figures above.
    if let Err(e) = print_library_choices(prep) {
        println!("library choices not measured: {e:#}");
    }
    Ok(())
}

/// Frames per node-hour per backend, and the GPU against the CPU per node-hour and per frame.
fn print_ratios(best: &[(String, f64)], best_node: &[(String, f64)], node: &Node) {
    for (name, fph) in best_node {
        println!(
            "{name}: {fph:.0} frames per node-hour on this node ({} cores, {} GPUs)",
            node.cores, node.gpus
        );
    }
    if let (Some((_, cpu)), Some((_, gpu))) = (
        best_node.iter().find(|(n, _)| n == "cpu"),
        best_node.iter().find(|(n, _)| n == "gpu"),
    ) {
        println!("per node-hour: gpu {:.1}x cpu", gpu / cpu);
    }
    if let (Some((_, cpu)), Some((_, gpu))) = (
        best.iter().find(|(n, _)| n == "cpu"),
        best.iter().find(|(n, _)| n == "gpu"),
    ) {
        // One process drives one GPU: frames per GPU-hour is the GPU run's frames per hour.
        println!(
            "per frame: cpu {cpu:.2} s, gpu {gpu:.2} s ({:.0} frames per GPU-hour): gpu {:.1}x cpu",
            3600.0 / gpu,
            cpu / gpu
        );
    }
}

/// The first CPU frame against the GPU's steady-state frame, in f64.
fn print_parity(frames: &[(String, FrameResult)], prep: &Prepared) -> Result<()> {
    if let (Some((_, cpu)), Some((_, gpu))) = (
        frames.iter().find(|(n, _)| n == "cpu"),
        frames.iter().find(|(n, _)| n == "gpu"),
    ) {
        let d = diff_frames(&frame_of(gpu, &prep.grid), &frame_of(cpu, &prep.grid))?;
        println!(
            "gpu vs cpu on this frame, in f64 (before the file's float32): {} bins, max pull \
             {:.3e}, median pull {:.3e}, max |Δresolution| {:.3e}, max |Δivar|/ivar {:.3e}, \
             ivar > 0 in one only {}, non-finite {}",
            d.nbins,
            d.max_pull,
            d.median_pull,
            d.max_dres,
            d.max_divar,
            d.ivar_disagree,
            d.nonfinite
        );
    }
    Ok(())
}

/// The fast path against the dense oracle, per patch on one thread, on `count` patches of
/// bundle 0; extrapolated to the frame when a one-thread CPU run timed it.
fn print_oracle(prep: &Prepared, count: usize, one_thread: Option<f64>) -> Result<()> {
    let npatch = prep.plan.npatch();
    let patches: Vec<_> = prep.plan.patches[0].iter().take(count).copied().collect();
    let sample = Sample::of(prep, &patches)?;
    let mut ws = crate::extract::cpu::Workspace::default();
    let (mut t_fast, mut t_dense, mut n) = (0.0, 0.0, 0usize);
    for inp in sample.inputs(prep) {
        let t = Instant::now();
        let _ = crate::extract::cpu::extract_patch(&inp, &prep.opts, &mut ws);
        t_fast += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = oracle::extract_patch_dense(&inp, &prep.opts);
        t_dense += t.elapsed().as_secs_f64();
        n += 1;
    }
    if n > 0 {
        println!(
            "per patch, one thread, {n} patches of bundle 0: fast {:.2e} s, dense oracle {:.2e} s, ratio {:.1}x",
            t_fast / n as f64,
            t_dense / n as f64,
            t_dense / t_fast
        );
        if let Some(w) = one_thread {
            println!(
                "dense oracle extrapolated to the frame on one thread: {:.0} s ({:.1}x the fast path's {:.2} s)",
                t_dense / n as f64 * npatch as f64,
                t_dense / n as f64 * npatch as f64 / w,
                w
            );
        }
    }
    Ok(())
}

/// The backend's two library choices timed on the first two bundles' patches (as one chunk):
/// the batched Cholesky against one call per matrix, the Jacobi kernel against cuSOLVER's
/// batched eigensolver (`choice`).
fn print_library_choices(prep: &Prepared) -> Result<()> {
    use crate::extract::gpu::device::Gpu;
    let patches: Vec<_> = prep
        .plan
        .patches
        .iter()
        .take(2)
        .flatten()
        .copied()
        .collect();
    if patches.is_empty() {
        return Ok(());
    }
    let sample = Sample::of(prep, &patches)?;
    let inputs = sample.inputs(prep);
    if inputs.is_empty() {
        return Ok(());
    }
    let gpu = Gpu::open(0)?;
    // cudarc panics when a library lacks a symbol (XsyevBatched came with CUDA 12.6).
    let rows = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        choice::measure(&gpu, &inputs, &prep.opts)
    }))
    .map_err(|_| anyhow::anyhow!("a CUDA library lacks a routine the measurement calls"))??;
    println!(
        "library choices on {} patches of bundles 0-1 ({}):",
        inputs.len(),
        gpu.info.name
    );
    print!("{}", choice::Measured::table(&rows));
    Ok(())
}

/// Some patches of the frame with their spots, the windows of those on the CCD.
struct Sample {
    spots: SpotSet,
    items: Vec<(Patch, PixelWindow)>,
}

impl Sample {
    fn of(prep: &Prepared, patches: &[Patch]) -> Result<Sample> {
        let (fmin, nfib) = crate::patch::plan::fiber_span(patches);
        let spots = spots::evaluate(&prep.psf, fmin, nfib, &prep.grid.padded)?;
        let items = patches
            .iter()
            .map(|p| (*p, pixels::window(p, &spots, prep.patch.pixpad_frac)))
            .filter(|(_, w)| w.on_ccd(prep.psf.npix_y, prep.psf.npix_x))
            .collect();
        Ok(Sample { spots, items })
    }

    /// The patches as a backend takes them, cut from the whole CCD.
    fn inputs<'a>(&'a self, prep: &'a Prepared) -> Vec<PatchInput<'a>> {
        self.items
            .iter()
            .map(|(p, w)| {
                PatchInput::from_ccd(
                    *p,
                    *w,
                    prep.preproc.image.view(),
                    prep.preproc.ivar.view(),
                    &self.spots,
                )
            })
            .collect()
    }
}
