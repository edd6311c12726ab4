//! The writer role: puts each frame back together from its units (outputs that arrive before
//! the frame's ticket wait for it), and writes each complete frame atomically on its own
//! thread. It is done once the node's compute and reader ranks are and nothing is being
//! written; frames still incomplete then are abandoned (a stopped run).
//!
//! Imports `unit` (assembly), `prepare` (writing) and `frame`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use tracing::{info, warn};

use super::event_loop::Rank;
use super::RunError;
use crate::pipeline::frame::FrameResult;
use crate::pipeline::prepare::{check_extracted, write_outputs};
use crate::pipeline::progress::{written_text, FrameNote};
use crate::pipeline::unit::{Assembly, FrameTicket, UnitOutput};

/// What the writer thread hands back: the frame, whether it was written, and how long it took.
type WriteDone = (usize, Result<(), String>, Duration);

/// A writer's state between turns of the loop.
pub(super) struct Writer {
    frames_tx: Option<Sender<(FrameTicket, FrameResult)>>,
    done_rx: Receiver<WriteDone>,
    assemblies: HashMap<usize, Assembly>,
    early: HashMap<usize, Vec<UnitOutput>>,
    writing: usize,
    computes_left: usize,
    readers_left: usize,
    written: usize,
    /// Nothing is left to come or to write.
    pub done: bool,
}

impl Writer {
    /// Starts the writer thread of rank `r`.
    pub fn start(r: &Rank) -> Writer {
        let (frames_tx, frames_rx) = unbounded::<(FrameTicket, FrameResult)>();
        let (done_tx, done_rx) = unbounded::<WriteDone>();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                for (ticket, mut res) in frames_rx {
                    let t0 = Instant::now();
                    let w = write_frame_file(&ticket, &mut res);
                    if done_tx.send((ticket.job, w, t0.elapsed())).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the writer thread");
        Writer {
            frames_tx: Some(frames_tx),
            done_rx,
            assemblies: HashMap::new(),
            early: HashMap::new(),
            writing: 0,
            computes_left: r.layout.computes[r.node].len(),
            readers_left: r.layout.readers[r.node].len(),
            written: 0,
            done: false,
        }
    }

    /// A frame's ticket: its assembly begins, with the outputs that came before it.
    pub fn on_ticket(&mut self, r: &mut Rank, t: FrameTicket) -> Result<(), RunError> {
        let job = t.job;
        r.note(job, FrameNote::Begun(t.all_units()))?;
        let mut a = Assembly::new(t);
        for out in self.early.remove(&job).unwrap_or_default() {
            a.add(out)?;
            r.note(job, FrameNote::Unit)?;
        }
        self.assemblies.insert(job, a);
        Ok(())
    }

    /// A computed unit to its frame's assembly (or kept until the frame's ticket arrives).
    pub fn on_output(&mut self, r: &mut Rank, out: UnitOutput) -> Result<(), RunError> {
        match self.assemblies.get_mut(&out.job) {
            Some(a) => {
                let job = out.job;
                a.add(out)?;
                r.note(job, FrameNote::Unit)?;
            }
            None => self.early.entry(out.job).or_default().push(out),
        }
        Ok(())
    }

    /// A compute rank of the node will send no more outputs.
    pub fn on_compute_done(&mut self) {
        self.computes_left = self.computes_left.saturating_sub(1);
    }

    /// A reader of the node will send no more tickets.
    pub fn on_reader_done(&mut self) {
        self.readers_left = self.readers_left.saturating_sub(1);
    }

    /// Whether it holds a frame, assembling or being written.
    pub fn has_frames(&self) -> bool {
        self.writing > 0 || !self.assemblies.is_empty()
    }

    /// Whether the writer thread is writing.
    pub fn working(&self) -> bool {
        self.writing > 0
    }

    /// Complete frames to the writer thread, written ones counted. Returns whether anything
    /// moved.
    pub fn step(&mut self, r: &mut Rank) -> Result<bool, RunError> {
        let mut moved = false;
        let complete: Vec<usize> = self
            .assemblies
            .iter()
            .filter(|(_, a)| a.complete())
            .map(|(&j, _)| j)
            .collect();
        for job in complete {
            moved = true;
            let a = self.assemblies.remove(&job).expect("listed above");
            let t0 = Instant::now();
            match a.finish() {
                Ok((ticket, res)) => {
                    if let Some(tx) = &self.frames_tx {
                        let _ = tx.send((ticket, res));
                        self.writing += 1;
                    }
                }
                Err(e) => r.frame_failed(job, e.to_string(), true)?,
            }
            r.times.write_s += t0.elapsed().as_secs_f64();
        }
        while let Ok((job, res, took)) = self.done_rx.try_recv() {
            moved = true;
            self.writing -= 1;
            r.times.write_s += took.as_secs_f64();
            match res {
                Ok(()) => {
                    self.written += 1;
                    info!(
                        "wrote {} ({}; {:.1} s since start)",
                        r.opts.jobs[job].output.display(),
                        written_text(self.written, r.to_extract(), r.opts.jobs.len()),
                        r.start.elapsed().as_secs_f64()
                    );
                    r.summary.written.push(job);
                    r.note(job, FrameNote::Done(true))?;
                }
                Err(e) => r.frame_failed(job, e, true)?,
            }
        }
        if !self.done && self.computes_left == 0 && self.readers_left == 0 && self.writing == 0 {
            self.done = true;
            self.frames_tx = None;
            for (job, _) in self.assemblies.drain() {
                warn!(
                    "frame {} abandoned: the run stopped before all its units came back",
                    r.describe(job)
                );
            }
        }
        Ok(moved)
    }

    /// What it waits on, for the watchdog; None once done.
    pub fn waiting(&self) -> Option<String> {
        (!self.done).then(|| {
            format!(
                "writer: {} frame(s) assembling, {} being written, waiting on {} compute and {} \
                 reader rank(s) to finish",
                self.assemblies.len(),
                self.writing,
                self.computes_left,
                self.readers_left
            )
        })
    }
}

/// Finalises and writes one assembled frame; the error is one line.
fn write_frame_file(ticket: &FrameTicket, res: &mut FrameResult) -> Result<(), String> {
    let image = std::path::Path::new(&ticket.meta.in_img);
    check_extracted(res, &ticket.grid, ticket.npatch, image).map_err(|e| e.one_line())?;
    if let Some(dir) = ticket.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    write_outputs(
        res,
        &ticket.grid,
        &ticket.meta,
        &ticket.output,
        None,
        ticket.overwrite,
    )
    .map_err(|e| e.one_line())
}
