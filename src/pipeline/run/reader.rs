//! The reader role: asks rank 0 for frames while it holds fewer than `prefetch`, reads and cuts
//! each on its own thread, sends each frame's ticket to the frame's writer, and hands units to
//! the compute ranks that ask, in the order they asked. Once no frame is left it answers each
//! of its compute ranks no-more-work, then tells the node's writers it is done.
//!
//! Imports `comm`, `unit`, `prepare` and, in the cuda-aware-mpi build, `device_path`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use tracing::{info, warn};

use super::event_loop::Rank;
use super::RunError;
use crate::pipeline::comm::Msg;
use crate::pipeline::prepare::prepare_frame;
use crate::pipeline::progress::count;
use crate::pipeline::unit::{self, FrameTicket, UnitInput};

/// What the reader thread hands back: a frame cut into units, or why it could not be.
type ReadDone = (
    usize,
    Result<(FrameTicket, Vec<UnitInput>, String), String>,
    Duration,
);

/// A reader's state between turns of the loop.
pub(super) struct Reader {
    jobs_tx: Option<Sender<usize>>,
    done_rx: Receiver<ReadDone>,
    requested: bool,
    exhausted: bool,
    reading: usize,
    /// Frames cut and waiting: the ticket (None once sent) and the units not yet handed out.
    queue: VecDeque<(Option<FrameTicket>, VecDeque<UnitInput>)>,
    waiting: VecDeque<usize>,
    computes: Vec<usize>,
    finished: Vec<usize>,
    /// Every compute rank it serves has been told no-more-work.
    pub done: bool,
    /// Compute ranks that take their units' pixels as parts for device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    device_ranks: std::collections::HashSet<usize>,
}

impl Reader {
    /// Starts the reader thread of rank `r`.
    pub fn start(r: &Rank) -> Reader {
        let (jobs_tx, jobs_rx) = unbounded::<usize>();
        let (done_tx, done_rx) = unbounded::<ReadDone>();
        let o = r.opts.clone();
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                for job in jobs_rx {
                    let t0 = Instant::now();
                    let j = &o.jobs[job];
                    let res = prepare_frame(&o.cfg, &j.psf, &j.image, false, false)
                        .map_err(|e| e.one_line())
                        .and_then(|prep| {
                            unit::cut(&prep, job, o.unit_bundles, j.output.clone(), o.overwrite)
                                .map(|(t, u)| (t, u, prep.read_summary()))
                                .map_err(|e| e.to_string())
                        });
                    if done_tx.send((job, res, t0.elapsed())).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the reader thread");
        Reader {
            jobs_tx: Some(jobs_tx),
            done_rx,
            requested: false,
            exhausted: false,
            reading: 0,
            queue: VecDeque::new(),
            waiting: VecDeque::new(),
            computes: r.layout.computes_of(r.rank),
            finished: Vec::new(),
            done: false,
            #[cfg(feature = "cuda-aware-mpi")]
            device_ranks: Default::default(),
        }
    }

    /// Rank 0's answer: a frame to read, or none left.
    pub fn on_frame(&mut self, job: Option<usize>) {
        self.requested = false;
        match job {
            Some(j) => {
                self.reading += 1;
                if let Some(tx) = &self.jobs_tx {
                    let _ = tx.send(j);
                }
            }
            None => self.exhausted = true,
        }
    }

    /// A compute rank asks for a unit.
    pub fn on_req_work(&mut self, from: usize) {
        self.waiting.push_back(from);
    }

    /// A compute rank asks for a unit, its pixels as parts for device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    pub fn on_req_work_parts(&mut self, from: usize) {
        self.waiting.push_back(from);
        self.device_ranks.insert(from);
    }

    /// Whether the reader thread is reading.
    pub fn working(&self) -> bool {
        self.reading > 0
    }

    /// Finished reads in, a frame requested if there is room, units out to the compute ranks
    /// waiting; `level` is the stop signal's. Returns whether anything moved.
    pub fn step(
        &mut self,
        r: &mut Rank,
        level: usize,
        sequential_wait: bool,
    ) -> Result<bool, RunError> {
        let mut moved = false;
        while let Ok((job, res, took)) = self.done_rx.try_recv() {
            moved = true;
            self.reading -= 1;
            r.times.read_s += took.as_secs_f64();
            match res {
                Ok(_) if level > 0 => {
                    info!(
                        "{} read but not started: abandoned (stopping)",
                        r.describe(job)
                    )
                }
                Ok((ticket, units, read)) => {
                    let bytes: usize = units.iter().map(UnitInput::pixel_bytes).sum();
                    r.summary.unit_bytes.push((job, bytes as u64));
                    info!(
                        "{read}; cut into {} ({:.1} MB of pixels) in {:.2} s in all",
                        count(units.len(), "unit"),
                        bytes as f64 / 1e6,
                        took.as_secs_f64()
                    );
                    self.queue.push_back((Some(ticket), units.into()));
                }
                Err(e) => {
                    // Said here, on the rank that found it; the writer only counts it.
                    warn!("frame {} failed: {e}", r.describe(job));
                    let w = r.layout.writer_of(r.node, job);
                    r.send(w, Msg::FrameFailed(job, e))?;
                }
            }
        }
        if level > 0 {
            // No new frames; frames not yet begun are abandoned, begun ones finish unless
            // told twice.
            self.exhausted = true;
            self.queue.retain(|(t, _)| t.is_none());
            if level > 1 {
                self.queue.clear();
            }
        }
        let buffered = self.queue.len() + self.reading;
        if !self.exhausted
            && !self.requested
            && buffered < r.opts.prefetch.max(1)
            && !sequential_wait
        {
            r.send(0, Msg::ReqFrame)?;
            self.requested = true;
        }
        moved |= self.hand_out(r)?;
        if !self.done && self.computes.iter().all(|c| self.finished.contains(c)) {
            self.done = true;
            self.jobs_tx = None;
            for &w in &r.layout.writers[r.node] {
                r.send(w, Msg::ReaderDone)?;
            }
        }
        Ok(moved)
    }

    /// Units to the compute ranks waiting, each frame's ticket ahead of its first unit;
    /// no-more-work once nothing is left. Returns whether anything moved.
    fn hand_out(&mut self, r: &mut Rank) -> Result<bool, RunError> {
        let mut moved = false;
        while let Some(&c) = self.waiting.front() {
            if let Some((ticket, units)) = self.queue.front_mut() {
                let job = units.front().map(|u| u.job);
                if let (Some(t), Some(job)) = (ticket.take(), job) {
                    let w = r.layout.writer_of(r.node, job);
                    r.send(w, Msg::Ticket(Box::new(t)))?;
                }
                match units.pop_front() {
                    Some(u) => {
                        let w = r.layout.writer_of(r.node, u.job);
                        let t0 = Instant::now();
                        #[cfg(feature = "cuda-aware-mpi")]
                        let msg = if self.device_ranks.contains(&c) {
                            let (bare, dims, parts) = crate::pipeline::device_path::strip_pixels(u);
                            Msg::WorkParts(Box::new(bare), w, dims, parts)
                        } else {
                            Msg::Work(Box::new(u), w)
                        };
                        #[cfg(not(feature = "cuda-aware-mpi"))]
                        let msg = Msg::Work(Box::new(u), w);
                        r.send(c, msg)?;
                        r.times.transfer_s += t0.elapsed().as_secs_f64();
                        self.waiting.pop_front();
                        moved = true;
                    }
                    None => {
                        self.queue.pop_front();
                    }
                }
            } else if self.exhausted && self.reading == 0 && !self.requested {
                r.send(c, Msg::NoWork)?;
                self.finished.push(c);
                self.waiting.pop_front();
                moved = true;
            } else {
                break;
            }
        }
        Ok(moved)
    }

    /// What it waits on, for the watchdog; None once done.
    pub fn waiting(&self) -> Option<String> {
        (!self.done).then(|| {
            format!(
                "reader: {} frame(s) being read, {} cut, {} compute rank(s) waiting for work{}",
                self.reading,
                self.queue.len(),
                self.waiting.len(),
                if self.requested {
                    ", a frame requested from rank 0"
                } else {
                    ""
                }
            )
        })
    }
}
