//! The reader's side of `--ivar-from-model` in a list, driven message by message in one
//! process (the compute rank's part played here): a frame's first pass comes back and is cut
//! again; a failed first-pass unit fails the frame alone; a second stop between the passes
//! drops the frame once its units are back, and only then is the reader done.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::event_loop::Rank;
use super::super::{Layout, RunOptions};
use super::Reader;
use crate::config::Config;
use crate::extract::cpu::CpuBackend;
use crate::extract::engine::BackendKind;
use crate::pipeline::comm::{LocalComm, Msg, RankSummary};
use crate::pipeline::joblist::FrameJob;
use crate::pipeline::report::RoleTimes;
use crate::pipeline::unit::{self, ModelPart, UnitInput, UnitPass};
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};
use crate::simulate::{write_simulation, SimOptions};

/// A 25-fiber exposure on a small CCD with IVAR from its pixels, and the run of it with
/// `--ivar-from-model`, one bundle per unit: its frame is one unit.
fn run_of(dir: &Path) -> RunOptions {
    let psf = synthetic_psf(&SynthPsfOptions {
        nfiber: 25,
        first_fiber_x: 20.0,
        npix_x: 240,
        npix_y: 1000,
        wavemin: 6000.0,
        wavemax: 6500.0,
        ..SynthPsfOptions::default()
    });
    let (psf_path, image) = (dir.join("psf.fits"), dir.join("preproc.fits"));
    crate::io::write_psf(&psf_path, &psf).unwrap();
    let sim = SimOptions {
        wmin: 6050.0,
        wmax: 6450.0,
        ivar_from_data: true,
        ..SimOptions::default()
    };
    write_simulation(&psf, &sim, &image, &dir.join("truth.fits")).unwrap();
    let mut cfg = Config::default();
    cfg.extract.wavelength = vec![6050.0, 6450.0, 0.8];
    cfg.extract.ivar_from_model = true;
    RunOptions {
        cfg,
        jobs: vec![FrameJob {
            image,
            psf: psf_path,
            output: dir.join("frame.fits"),
        }],
        skipped: Vec::new(),
        overwrite: false,
        readers_per_node: 1,
        writers_per_node: 1,
        prefetch: 1,
        unit_bundles: 1,
        ranks_per_gpu: 1,
        watchdog_s: 600.0,
        threads: 1,
        backend: BackendKind::Cpu,
        label: None,
        report: None,
        progress_bar: false,
    }
}

/// Lets the reader step (at stop `level`) until `want` holds of the messages it sent, which
/// are returned; panics after a minute.
fn step_until(
    reader: &mut Reader,
    r: &mut Rank,
    level: usize,
    want: impl Fn(&[Msg]) -> bool,
) -> Vec<Msg> {
    let t0 = Instant::now();
    let mut sent = Vec::new();
    loop {
        reader.step(r, level, false).unwrap();
        while let Some((_, m)) = r.comm.try_recv().unwrap() {
            sent.push(m);
        }
        if want(&sent) {
            return sent;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{sent:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The units handed out among `sent`, with where their results go.
fn work(sent: &mut Vec<Msg>) -> Vec<(UnitInput, usize)> {
    let mut units = Vec::new();
    sent.retain(|m| match m {
        Msg::Work(u, to) => {
            units.push((u.as_ref().clone(), *to));
            false
        }
        _ => true,
    });
    units
}

fn rank<'a>(comm: &'a mut LocalComm, opts: &'a RunOptions, layout: &'a Layout) -> Rank<'a> {
    Rank {
        comm,
        opts,
        layout,
        rank: 0,
        node: 0,
        start: Instant::now(),
        times: RoleTimes::default(),
        summary: RankSummary::default(),
    }
}

/// A reader started on the run's one frame, once it has handed its first units to compute
/// rank 0: the reader, those units with where their results go, and its other messages.
fn first_units(r: &mut Rank) -> (Reader, Vec<(UnitInput, usize)>, Vec<Msg>) {
    let mut reader = Reader::start(r);
    reader.on_frame(Some(0));
    reader.on_req_work(0);
    let mut sent = step_until(&mut reader, r, 0, |s| {
        s.iter().any(|m| matches!(m, Msg::Work(..)))
    });
    let units = work(&mut sent);
    (reader, units, sent)
}

#[test]
fn a_first_pass_comes_back_and_the_frame_is_cut_again_for_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let opts = run_of(dir.path());
    let layout = Layout::new(vec![vec![0]], 1, 1);
    let mut comm = LocalComm::default();
    let mut r = rank(&mut comm, &opts, &layout);
    let (mut reader, first, sent) = first_units(&mut r);
    assert_eq!(first.len(), 1, "{sent:?}");
    let (u, to) = &first[0];
    // The first pass's results come back to the reader; no ticket has gone to the writer.
    assert_eq!((u.pass, *to), (UnitPass::Model, 0));
    assert!(u.setup.opts.leverage && u.setup.opts.model_image.is_some());
    assert!(
        !sent.iter().any(|m| matches!(m, Msg::Ticket(_))),
        "{sent:?}"
    );
    // Nothing more to hand out until the share is back, and no end of work either.
    reader.on_frame(None);
    reader.on_req_work(0);
    let sent = step_until(&mut reader, &mut r, 0, |_| true);
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, Msg::Work(..) | Msg::NoWork)),
        "{sent:?}"
    );
    assert!(reader.waiting().unwrap().contains("1 between passes"));

    let result = unit::compute(u, &mut CpuBackend, None).map_err(|e| e.to_string());
    reader
        .on_model_part(&mut r, 0, ModelPart::of(u, result))
        .unwrap();
    let mut sent = step_until(&mut reader, &mut r, 0, |s| {
        s.iter().any(|m| matches!(m, Msg::Work(..)))
    });
    let second = work(&mut sent);
    let (u2, to2) = &second[0];
    assert_eq!((u2.pass, *to2), (UnitPass::Final, 0));
    assert!(!u2.setup.opts.leverage && u2.setup.opts.model_image.is_none());
    // Same pixels, another IVAR: the variance now comes from the model.
    assert_eq!((u2.pix.dim(), u2.y0, u2.x0), (u.pix.dim(), u.y0, u.x0));
    assert_ne!(u2.ivar, u.ivar);
    let ticket = sent
        .iter()
        .find_map(|m| match m {
            Msg::Ticket(t) => Some(t),
            _ => None,
        })
        .expect("the second pass's ticket goes to the writer");
    assert_eq!(ticket.all_units(), 2);
    assert!(ticket.first_pass.as_ref().unwrap().stats.patches > 0);
    // Then the compute rank is told there is no more work, and the reader is done.
    reader.on_req_work(0);
    let sent = step_until(&mut reader, &mut r, 0, |s| {
        s.iter().any(|m| matches!(m, Msg::NoWork))
    });
    assert!(reader.done, "{sent:?}");
}

#[test]
fn a_failed_first_pass_unit_fails_its_frame_and_a_second_stop_drops_one_between_passes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = run_of(dir.path());
    let layout = Layout::new(vec![vec![0]], 1, 1);
    for stop in [false, true] {
        let mut comm = LocalComm::default();
        let mut r = rank(&mut comm, &opts, &layout);
        let (mut reader, mut units, _) = first_units(&mut r);
        let (u, _) = units.remove(0);
        reader.on_frame(None);
        reader.on_req_work(0);
        let level = if stop {
            // Told twice while its unit is out: the reader waits for the unit, then drops it.
            let sent = step_until(&mut reader, &mut r, 2, |_| true);
            assert!(!sent.iter().any(|m| matches!(m, Msg::NoWork)), "{sent:?}");
            2
        } else {
            0
        };
        let part = ModelPart::of(&u, Err("the solver gave up".into()));
        reader.on_model_part(&mut r, 0, part).unwrap();
        let sent = step_until(&mut reader, &mut r, level, |s| {
            s.iter().any(|m| matches!(m, Msg::NoWork))
        });
        let failed: Vec<&String> = sent
            .iter()
            .filter_map(|m| match m {
                Msg::FrameFailed(0, e) => Some(e),
                _ => None,
            })
            .collect();
        if stop {
            assert!(failed.is_empty(), "{sent:?}");
        } else {
            assert_eq!(failed, ["unit 0: the solver gave up"], "{sent:?}");
        }
        assert!(!sent.iter().any(|m| matches!(m, Msg::Work(..))), "{sent:?}");
        assert!(reader.done, "{sent:?}");
    }
}
