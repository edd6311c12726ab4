//! The coordinator (world rank 0): hands frames to readers one at a time, on request, and no
//! new one once a stop signal came; collects every rank's summary into the run's report.
//!
//! Imports `comm` and `report`.

use std::collections::VecDeque;
use std::time::Duration;

use tracing::{info, warn};

use super::event_loop::Rank;
use super::{Layout, RunError, RunOptions};
use crate::pipeline::comm::{Msg, RankSummary};
use crate::pipeline::progress::count;
use crate::pipeline::report::{FrameCounts, FrameFailure, RunReport, REPORT_VERSION};

/// The frames still to hand out and the summaries in.
pub(super) struct Coordinator {
    todo: VecDeque<usize>,
    nranks: usize,
    summaries: Vec<RankSummary>,
}

impl Coordinator {
    /// Every frame not already complete, in list order.
    pub fn new(opts: &RunOptions, layout: &Layout) -> Coordinator {
        Coordinator {
            todo: (0..opts.jobs.len())
                .filter(|j| !opts.skipped.contains(j))
                .collect(),
            nranks: layout.nodes.iter().map(Vec::len).sum(),
            summaries: Vec::new(),
        }
    }

    /// Logs what the run is about to do.
    pub fn announce(&self, opts: &RunOptions, layout: &Layout) {
        info!(
            "{} frames listed ({} already complete, skipped) on {} node(s), {} rank(s): \
             {} reader(s), {} writer(s), {} compute rank(s) x {}",
            opts.jobs.len(),
            opts.skipped.len(),
            layout.nodes.len(),
            self.nranks,
            layout.readers.iter().map(Vec::len).sum::<usize>(),
            layout.writers.iter().map(Vec::len).sum::<usize>(),
            layout.computes.iter().map(Vec::len).sum::<usize>(),
            count(opts.threads, "thread")
        );
        if let Some(cut) = layout.roles_cut(opts.readers_per_node, opts.writers_per_node) {
            warn!("{cut}");
        }
    }

    /// A reader asks for a frame: the next one, or none once stopping.
    pub fn on_req_frame(
        &mut self,
        r: &mut Rank,
        from: usize,
        level: usize,
    ) -> Result<(), RunError> {
        let next = if level > 0 {
            None
        } else {
            self.todo.pop_front()
        };
        r.send(from, Msg::Frame(next))
    }

    /// A rank's summary, which only rank 0 takes.
    pub fn on_summary(&mut self, rank: usize, from: usize, s: RankSummary) -> Result<(), RunError> {
        if rank != 0 {
            return Err(RunError::SummaryNotToZero { from, rank });
        }
        self.summaries.push(s);
        Ok(())
    }

    /// Whether every rank's summary is in.
    pub fn all_in(&self) -> bool {
        self.summaries.len() == self.nranks
    }

    /// What it waits on, for the watchdog.
    pub fn waiting(&self) -> Option<String> {
        (!self.all_in()).then(|| {
            format!(
                "coordinator: {} of {} rank summaries in",
                self.summaries.len(),
                self.nranks
            )
        })
    }

    /// The run's report, from every rank's summary.
    pub fn report(self, opts: &RunOptions, layout: &Layout, wall: Duration) -> RunReport {
        let summaries = self.summaries;
        let mut written = Vec::new();
        let mut failed = Vec::new();
        let mut roles = Vec::new();
        let mut unit_bytes = 0u64;
        let mut bytes_sent = 0u64;
        for s in summaries {
            written.extend(s.written);
            failed.extend(s.failed);
            unit_bytes += s.unit_bytes.iter().map(|(_, b)| b).sum::<u64>();
            bytes_sent += s.times.bytes_sent;
            roles.push(s.times);
        }
        roles.sort_by_key(|r| r.rank);
        failed.sort_by_key(|f| f.0);
        failed.dedup_by_key(|f| f.0);
        let listed = opts.jobs.len();
        let frames = FrameCounts {
            listed,
            written: written.len(),
            skipped: opts.skipped.len(),
            failed: failed.len(),
            abandoned: listed - written.len() - opts.skipped.len() - failed.len(),
        };
        let nodes = layout.nodes.len();
        let wall_s = wall.as_secs_f64();
        let per_frame = |b: u64| {
            if frames.written > 0 {
                b as f64 / frames.written as f64
            } else {
                0.0
            }
        };
        let nranks = layout.nodes.iter().map(Vec::len).sum();
        let bytes_per_frame = if nranks > 1 {
            per_frame(bytes_sent)
        } else {
            per_frame(unit_bytes)
        };
        RunReport {
            version: REPORT_VERSION,
            spextract: env!("CARGO_PKG_VERSION").to_string(),
            label: opts
                .label
                .clone()
                .unwrap_or_else(|| format!("{} x{nodes}", opts.backend)),
            backend: opts.backend.to_string(),
            nodes,
            ranks: nranks,
            threads_per_rank: opts.threads,
            wall_s,
            frames,
            frames_per_node_hour: RunReport::compute_rate(frames.written, wall_s, nodes),
            bytes_per_frame,
            interrupted: frames.abandoned > 0,
            roles,
            failures: failed
                .into_iter()
                .map(|(job, error)| FrameFailure {
                    image: opts.jobs[job].image.clone(),
                    output: opts.jobs[job].output.clone(),
                    error,
                })
                .collect(),
        }
    }
}
