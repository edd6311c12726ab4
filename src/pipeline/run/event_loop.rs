//! One rank's event loop: the only caller of MPI on the rank. Each turn it takes every message
//! that has arrived to the role it is for, lets each role take a step (reader, compute,
//! writer, in that order), sends the rank's summary to rank 0 once its roles are done, and
//! accounts idle time; between turns it sleeps briefly, or only yields while sends are in
//! flight.
//!
//! Imports the run's roles and `comm`, `report`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::compute::Compute;
use super::coordinator::Coordinator;
use super::reader::Reader;
use super::watch::{start_watchdog, Heartbeat, StopSignal};
use super::writer::Writer;
use super::{Layout, RunError, RunOptions};
use crate::pipeline::comm::{Comm, Msg, RankSummary};
use crate::pipeline::progress::{FrameNote, FramesProgress};
use crate::pipeline::report::{RoleTimes, RunReport};

/// What the roles of a rank share, handed to their methods by the loop: the way to the other
/// ranks (used only on the loop's thread), the run, and the rank's books.
pub(super) struct Rank<'a> {
    /// The other ranks.
    pub comm: &'a mut dyn Comm,
    /// The run.
    pub opts: &'a RunOptions,
    /// Who does what.
    pub layout: &'a Layout,
    /// This rank.
    pub rank: usize,
    /// Its node.
    pub node: usize,
    /// When the rank started.
    pub start: Instant,
    /// Its time split, bytes and units.
    pub times: RoleTimes,
    /// What it reports to rank 0 at the end.
    pub summary: RankSummary,
}

impl Rank<'_> {
    /// Sends `msg` to `to`, counting the bytes that crossed.
    pub fn send(&mut self, to: usize, msg: Msg) -> Result<(), RunError> {
        self.times.bytes_sent += self.comm.send(to, msg)?;
        Ok(())
    }

    /// Tells rank 0 how frame `job` is getting on, for its progress display (not counted in
    /// the bytes sent: it is not the frame's data).
    pub fn note(&mut self, job: usize, note: FrameNote) -> Result<(), RunError> {
        self.comm.send(0, Msg::Progress(job, note))?;
        Ok(())
    }

    /// Counts a frame that failed in the summary and tells rank 0. `log`: this rank found
    /// the failure and says it (a reader's failures are said by the reader, once).
    pub fn frame_failed(&mut self, job: usize, error: String, log: bool) -> Result<(), RunError> {
        if log {
            warn!("frame {} failed: {error}", self.describe(job));
        }
        self.summary.failed.push((job, error));
        self.note(job, FrameNote::Done(false))
    }

    /// Frames to extract in the run, where this rank knows (rank 0 alone looks at the outputs
    /// and knows which are skipped).
    pub fn to_extract(&self) -> Option<usize> {
        (self.rank == 0).then(|| self.opts.jobs.len() - self.opts.skipped.len())
    }

    /// The frame's image, for logs.
    pub fn describe(&self, job: usize) -> String {
        self.opts
            .jobs
            .get(job)
            .map_or_else(|| format!("#{job}"), |j| j.image.display().to_string())
    }
}

/// The role a message is for, or the error naming the message and the role this rank lacks.
fn role<'a, T>(
    slot: &'a mut Option<T>,
    what: &'static str,
    role: &'static str,
) -> Result<&'a mut T, RunError> {
    slot.as_mut().ok_or(RunError::NotMine { what, role })
}

/// One rank's event loop.
pub(super) fn run_rank(
    comm: &mut dyn Comm,
    layout: &Layout,
    opts: &RunOptions,
    stop: &StopSignal,
) -> Result<Option<RunReport>, RunError> {
    let start = Instant::now();
    let rank = comm.rank();
    let node = layout.node_of(rank);
    let roles = layout.roles(rank);
    let hb = Arc::new(Heartbeat::new(start));
    start_watchdog(hb.clone(), roles.name(), opts.watchdog_s, 3);
    info!(
        "roles: {} on node {node}, pid {}",
        roles.name(),
        std::process::id()
    );
    let mut coordinator = Coordinator::new(opts, layout);
    let mut progress = None;
    if rank == 0 {
        coordinator.announce(opts, layout);
        progress = Some(FramesProgress::new(
            opts.jobs.len() - opts.skipped.len(),
            opts.progress_bar,
        ));
    }
    let mut r = Rank {
        comm,
        opts,
        layout,
        rank,
        node,
        start,
        times: RoleTimes {
            rank,
            node,
            role: roles.name(),
            ..Default::default()
        },
        summary: RankSummary::default(),
    };
    let mut reader = roles.reader.then(|| Reader::start(&r));
    let mut compute = roles.compute.then(|| Compute::start(&r));
    let mut writer = roles.writer.then(|| Writer::start(&r));

    let mut summary_sent = false;
    let mut idle_since: Option<Instant> = None;
    loop {
        let level = stop.level();
        let mut moved = false;

        // Messages.
        while let Some((from, msg)) = r.comm.try_recv()? {
            moved = true;
            let t0 = Instant::now();
            match msg {
                Msg::ReqFrame => coordinator.on_req_frame(&mut r, from, level)?,
                Msg::Frame(job) => role(&mut reader, "a frame", "read")?.on_frame(job),
                Msg::ReqWork => role(&mut reader, "a work request", "read")?.on_req_work(from),
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::ReqWorkParts => {
                    role(&mut reader, "a work request", "read")?.on_req_work_parts(from)
                }
                Msg::Work(u, w) => role(&mut compute, "work", "compute")?.on_work(*u, w),
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::WorkParts(u, w, dims, parts) => role(&mut compute, "work", "compute")?
                    .on_work_parts(from, *u, w, dims, parts)?,
                Msg::NoWork => role(&mut compute, "no-more-work", "compute")?.on_no_work(),
                Msg::Ticket(t) => role(&mut writer, "a ticket", "write")?.on_ticket(&mut r, *t)?,
                Msg::FrameFailed(job, e) => r.frame_failed(job, e, false)?,
                Msg::Output(out) => {
                    role(&mut writer, "a unit output", "write")?.on_output(&mut r, *out)?
                }
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::OutputParts(out, shape, parts) => {
                    let out =
                        crate::pipeline::device_path::output_from_parts(*out, shape, parts, from)?;
                    role(&mut writer, "a unit output", "write")?.on_output(&mut r, out)?
                }
                Msg::ModelPart(p) => {
                    role(&mut reader, "a model share", "read")?.on_model_part(&mut r, from, *p)?
                }
                Msg::ComputeDone => role(&mut writer, "compute-done", "write")?.on_compute_done(),
                Msg::ReaderDone => role(&mut writer, "reader-done", "write")?.on_reader_done(),
                Msg::Summary(s) => coordinator.on_summary(rank, from, *s)?,
                Msg::Progress(job, note) => {
                    if let Some(p) = progress.as_mut() {
                        p.note(job, note);
                    }
                }
            }
            r.times.transfer_s += t0.elapsed().as_secs_f64();
        }

        if let Some(rd) = reader.as_mut() {
            // prefetch 0, one process: the next frame only once the last one is written.
            let sequential_wait = opts.prefetch == 0
                && (compute.as_ref().is_some_and(Compute::has_units)
                    || writer.as_ref().is_some_and(Writer::has_frames));
            moved |= rd.step(&mut r, level, sequential_wait)?;
        }
        if let Some(c) = compute.as_mut() {
            moved |= c.step(&mut r)?;
        }
        if let Some(w) = writer.as_mut() {
            moved |= w.step(&mut r)?;
        }
        if let Some(p) = progress.as_mut() {
            p.tick();
        }

        // The end: this rank's summary to rank 0 once its roles are done.
        let roles_done = reader.as_ref().is_none_or(|x| x.done)
            && compute.as_ref().is_none_or(|x| x.done)
            && writer.as_ref().is_none_or(|x| x.done);
        if roles_done && !summary_sent {
            summary_sent = true;
            let mut s = std::mem::take(&mut r.summary);
            r.times.peak_rss_mib = crate::pipeline::report::peak_rss_mib();
            r.times.received = r.comm.receive_times();
            s.times = r.times.clone();
            // Not counted in bytes_sent: the books are closed.
            r.comm.send(0, Msg::Summary(Box::new(s)))?;
            moved = true;
        }
        let flushed = r.comm.flush();
        if summary_sent && flushed && (rank != 0 || coordinator.all_in()) {
            break;
        }

        // Idle: nothing moved and no role's thread is working.
        let working = reader.as_ref().is_some_and(Reader::working)
            || compute.as_ref().is_some_and(Compute::working)
            || writer.as_ref().is_some_and(Writer::working);
        if moved || working {
            if let Some(t) = idle_since.take() {
                r.times.idle_s += t.elapsed().as_secs_f64();
            }
        } else {
            idle_since.get_or_insert_with(Instant::now);
        }
        if moved {
            hb.beat();
        } else {
            let waiting = [
                reader.as_ref().and_then(Reader::waiting),
                compute.as_ref().and_then(Compute::waiting),
                writer.as_ref().and_then(Writer::waiting),
                (rank == 0).then(|| coordinator.waiting()).flatten(),
            ];
            hb.waiting_on(waiting.into_iter().flatten().collect::<Vec<_>>().join("; "));
            if flushed {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                // Sends in flight: a large one to a device buffer travels in fragments that
                // each wait for this rank's next MPI call, so keep calling (flush) instead of
                // sleeping between them.
                std::thread::yield_now();
            }
        }
    }
    if rank != 0 {
        return Ok(None);
    }
    if let Some(mut p) = progress {
        p.finish();
    }
    Ok(Some(coordinator.report(opts, layout, start.elapsed())))
}
