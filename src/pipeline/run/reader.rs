//! The reader role: asks rank 0 for frames while it holds fewer than `prefetch`, reads and cuts
//! each on its own thread, sends each frame's ticket to the frame's writer, and hands units to
//! the compute ranks that ask, in the order they asked. Once no frame is left it answers each
//! of its compute ranks no-more-work, then tells the node's writers it is done.
//!
//! With `--ivar-from-model` a frame goes round twice: its first pass's units send their share
//! of the model image back here (`ModelPart`); once all are in, the reader thread puts the
//! frame's model together, derives the second pass's IVAR from it and cuts the frame again,
//! and only that cut goes to the writer. The frame waits here between the passes.
//!
//! Imports `comm`, `unit`, `prepare` and, in the cuda-aware-mpi build, `device_path`.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use ndarray::{s, Array2};
use tracing::{info, warn};

use super::event_loop::Rank;
use super::RunError;
use crate::pipeline::comm::Msg;
use crate::pipeline::prepare::{first_pass_ivar, prepare_frame, second_pass_ivar, Prepared};
use crate::pipeline::progress::{count, FrameNote};
use crate::pipeline::run::RunOptions;
use crate::pipeline::unit::{
    self, FirstPass, FrameModel, FrameTicket, ModelPart, UnitError, UnitInput, UnitPass,
};

/// What the reader thread is asked to do.
enum ReadJob {
    /// Read frame `job` of the list and cut it.
    Read(usize),
    /// Cut a frame again for its second pass, from its first pass's model.
    Second(Box<Between>),
}

/// A frame cut by the reader thread.
enum Cut {
    /// Units whose results go to the frame's writer (its only pass, or its second), and for a
    /// second pass the rank that computed each unit's first.
    Final(Box<FrameTicket>, Vec<UnitInput>, Vec<usize>),
    /// The first pass of `--ivar-from-model`: units whose model shares come back here.
    First(Box<Prepared>, f64, Vec<UnitInput>),
}

/// What the reader thread hands back: the frame, its cut with a line for the log, or why it
/// could not be read or cut, and how long it took.
type ReadDone = (usize, Result<(Cut, String), String>, Duration);

/// A frame between the passes of `--ivar-from-model`.
struct Between {
    /// The frame's index in the list.
    job: usize,
    prep: Box<Prepared>,
    /// Electrons per image unit, for the second pass's variance.
    gain: f64,
    /// The first pass's shares, by unit.
    parts: Vec<Option<ModelPart>>,
    /// The rank that computed each unit's share.
    owners: Vec<usize>,
    /// First-pass units handed out, and come back.
    handed: usize,
    received: usize,
    /// The first unit that failed, which fails the frame.
    failed: Option<String>,
    /// The run stopped (twice): the frame is dropped once its units handed out are back.
    abandoned: bool,
}

impl Between {
    fn all_back(&self) -> bool {
        self.received == self.parts.len()
    }
}

/// A frame's units waiting to be handed out.
struct Queued {
    /// Sent to the writer ahead of the first unit (None once sent, and for a first pass).
    ticket: Option<FrameTicket>,
    /// A unit of the frame has been handed out (a frame in flight, which a stop lets finish).
    begun: bool,
    units: VecDeque<UnitInput>,
    /// For a second pass, the rank that computed each unit's first, which still holds its
    /// spots: a unit goes back there when that rank asks.
    owners: Vec<usize>,
}

/// A reader's state between turns of the loop.
pub(super) struct Reader {
    jobs_tx: Option<Sender<ReadJob>>,
    done_rx: Receiver<ReadDone>,
    requested: bool,
    exhausted: bool,
    reading: usize,
    /// Frames cut and waiting.
    queue: VecDeque<Queued>,
    /// Frames between their passes, by list index.
    between: HashMap<usize, Between>,
    waiting: VecDeque<usize>,
    computes: Vec<usize>,
    finished: Vec<usize>,
    /// Every compute rank it serves has been told no-more-work.
    pub done: bool,
    /// Compute ranks that take their units' pixels as parts for device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    device_ranks: std::collections::HashSet<usize>,
}

/// Reads and cuts frame `job` of the run: for its only pass, or for the first of two.
fn read_and_cut(o: &RunOptions, job: usize) -> Result<(Cut, String), String> {
    let j = &o.jobs[job];
    let prep = prepare_frame(&o.cfg, &j.psf, &j.image, false, false).map_err(|e| e.one_line())?;
    let read = prep.read_summary();
    let cut = match prep.ivar_model_gain {
        None => {
            let ivar = &prep.preproc.ivar;
            let ivar_of = |rows, cols| ivar.slice(s![rows, cols]).to_owned();
            let units = unit::cut(&prep, UnitPass::Final, job, o.unit_bundles, &ivar_of)
                .map_err(|e| e.to_string())?;
            let t = unit::ticket(&prep, job, units.len(), j.output.clone(), o.overwrite, None);
            Cut::Final(Box::new(t), units, Vec::new())
        }
        Some(gain) => {
            let ivar_of = |rows, cols| first_pass_ivar(&prep, gain, rows, cols);
            let units = unit::cut(&prep, UnitPass::Model, job, o.unit_bundles, &ivar_of)
                .map_err(|e| e.to_string())?;
            let first = Cut::First(Box::new(prep), gain, units);
            return Ok((first, read + "; first pass"));
        }
    };
    Ok((cut, read))
}

/// Cuts a frame whose first pass is back for its second, with the variance from its model.
fn cut_again(o: &RunOptions, job: usize, b: Between) -> Result<(Cut, String), UnitError> {
    let Between {
        prep,
        gain,
        parts,
        owners,
        ..
    } = b;
    let parts: Vec<ModelPart> = parts.into_iter().flatten().collect();
    let first_units = parts.len();
    let (model, stats) = FrameModel::new(prep.preproc.image.dim(), parts)?;
    let ivar_of = |rows: Range<usize>, cols: Range<usize>| {
        let (m, h) = model.over(rows.clone(), cols.clone());
        let mut ivar = Array2::zeros(m.dim());
        second_pass_ivar(
            &prep,
            gain,
            (rows, cols),
            m.view(),
            h.view(),
            ivar.view_mut(),
        );
        ivar
    };
    let units = unit::cut(&prep, UnitPass::Final, job, o.unit_bundles, &ivar_of)?;
    let j = &o.jobs[job];
    let first = FirstPass {
        units: first_units,
        stats,
    };
    let t = unit::ticket(
        &prep,
        job,
        units.len(),
        j.output.clone(),
        o.overwrite,
        Some(first),
    );
    let line = format!(
        "{}: second pass, with the variance from the first pass's model",
        prep.image_path.display()
    );
    Ok((Cut::Final(Box::new(t), units, owners), line))
}

impl Reader {
    /// Starts the reader thread of rank `r`.
    pub fn start(r: &Rank) -> Reader {
        let (jobs_tx, jobs_rx) = unbounded::<ReadJob>();
        let (done_tx, done_rx) = unbounded::<ReadDone>();
        let o = r.opts.clone();
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                for todo in jobs_rx {
                    let t0 = Instant::now();
                    let (job, res) = match todo {
                        ReadJob::Read(job) => (job, read_and_cut(&o, job)),
                        ReadJob::Second(b) => {
                            let job = b.job;
                            (job, cut_again(&o, job, *b).map_err(|e| e.to_string()))
                        }
                    };
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
            between: HashMap::new(),
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
                    let _ = tx.send(ReadJob::Read(j));
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

    /// A first-pass unit's share of its frame's model. Once all are in, the frame goes to the
    /// reader thread to be cut for its second pass (or fails, if a unit did).
    pub fn on_model_part(
        &mut self,
        r: &mut Rank,
        from: usize,
        part: ModelPart,
    ) -> Result<(), RunError> {
        let (job, unit) = (part.job, part.unit);
        let Some(b) = self.between.get_mut(&job) else {
            return Err(RunError::NotMine {
                what: "a model share",
                role: "hold its frame",
            });
        };
        let nunits = b.parts.len();
        let slot = b
            .parts
            .get_mut(unit)
            .ok_or(UnitError::OutOfRange { unit, job, nunits })?;
        if slot.is_some() {
            return Err(UnitError::Twice { unit, job }.into());
        }
        b.received += 1;
        if let Err(e) = &part.result {
            b.failed.get_or_insert_with(|| format!("unit {unit}: {e}"));
        }
        *slot = Some(part);
        b.owners[unit] = from;
        r.note(job, FrameNote::Unit)?;
        self.settle(r, job)
    }

    /// Moves frame `job` on from between its passes once nothing of it is out: to the reader
    /// thread for its second cut, or out of the run (failed or abandoned).
    fn settle(&mut self, r: &mut Rank, job: usize) -> Result<(), RunError> {
        let Some(b) = self.between.get(&job) else {
            return Ok(());
        };
        if b.abandoned && b.received == b.handed {
            self.between.remove(&job);
            info!(
                "{} abandoned between its passes (stopping)",
                r.describe(job)
            );
        } else if b.all_back() {
            let b = self.between.remove(&job).expect("looked up above");
            if let Some(e) = b.failed {
                self.fail(r, job, e)?;
            } else if let Some(tx) = &self.jobs_tx {
                self.reading += 1;
                let _ = tx.send(ReadJob::Second(Box::new(b)));
            }
        }
        Ok(())
    }

    /// Says that frame `job` failed here, and counts it with its writer.
    fn fail(&mut self, r: &mut Rank, job: usize, e: String) -> Result<(), RunError> {
        warn!("frame {} failed: {e}", r.describe(job));
        let w = r.layout.writer_of(r.node, job);
        r.send(w, Msg::FrameFailed(job, e))
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
            let (cut, line) = match res {
                Ok(done) => done,
                Err(e) => {
                    // Said here, on the rank that found it; the writer only counts it.
                    self.fail(r, job, e)?;
                    continue;
                }
            };
            // A second cut belongs to a frame in flight, which only a second stop abandons.
            let second = matches!(&cut, Cut::Final(t, ..) if t.first_pass.is_some());
            if level > usize::from(second) {
                info!(
                    "{} cut but not started: abandoned (stopping)",
                    r.describe(job)
                );
                continue;
            }
            let units = match &cut {
                Cut::Final(_, u, _) | Cut::First(_, _, u) => u,
            };
            let bytes: usize = units.iter().map(UnitInput::pixel_bytes).sum();
            r.summary.unit_bytes.push((job, bytes as u64));
            info!(
                "{line}; cut into {} ({:.1} MB of pixels) in {:.2} s in all",
                count(units.len(), "unit"),
                bytes as f64 / 1e6,
                took.as_secs_f64()
            );
            match cut {
                Cut::Final(ticket, units, owners) if second => {
                    // The frame is in flight: its second pass goes ahead of frames not begun.
                    self.queue.push_front(Queued {
                        ticket: Some(*ticket),
                        begun: true,
                        units: units.into(),
                        owners,
                    })
                }
                Cut::Final(ticket, units, _) => self.queue.push_back(Queued {
                    ticket: Some(*ticket),
                    begun: false,
                    units: units.into(),
                    owners: Vec::new(),
                }),
                Cut::First(prep, gain, units) => {
                    let nunits = units.len();
                    self.between.insert(
                        job,
                        Between {
                            job,
                            prep,
                            gain,
                            parts: vec![None; nunits],
                            owners: vec![0; nunits],
                            handed: 0,
                            received: 0,
                            failed: None,
                            abandoned: false,
                        },
                    );
                    self.queue.push_back(Queued {
                        ticket: None,
                        begun: false,
                        units: units.into(),
                        owners: Vec::new(),
                    });
                    // A cut of no units would wait for shares that never come.
                    self.settle(r, job)?;
                }
            }
        }
        if level > 0 {
            // No new frames; frames not yet begun are abandoned, begun ones finish unless
            // told twice.
            self.exhausted = true;
            self.queue.retain(|q| q.begun);
            self.between.retain(|_, b| b.handed > 0);
            if level > 1 {
                self.queue.clear();
                let jobs: Vec<usize> = self.between.keys().copied().collect();
                for job in jobs {
                    if let Some(b) = self.between.get_mut(&job) {
                        b.abandoned = true;
                    }
                    self.settle(r, job)?;
                }
            }
        }
        let buffered = self.queue.len() + self.reading + self.between.len();
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
            if let Some(q) = self.queue.front_mut() {
                let own = q
                    .units
                    .iter()
                    .position(|u| q.owners.get(u.unit) == Some(&c));
                let Some(u) = q.units.remove(own.unwrap_or(0)) else {
                    self.queue.pop_front();
                    continue;
                };
                if let Some(t) = q.ticket.take() {
                    let w = r.layout.writer_of(r.node, t.job);
                    r.send(w, Msg::Ticket(Box::new(t)))?;
                }
                q.begun = true;
                // A first pass's results come back here; a frame's last pass's go to its
                // writer.
                let to = match u.pass {
                    UnitPass::Final => r.layout.writer_of(r.node, u.job),
                    UnitPass::Model => {
                        if let Some(b) = self.between.get_mut(&u.job) {
                            b.handed += 1;
                            if b.handed == 1 {
                                // Both passes, as the writer will count them.
                                r.note(u.job, FrameNote::Begun(2 * b.parts.len()))?;
                            }
                        }
                        r.rank
                    }
                };
                let t0 = Instant::now();
                #[cfg(feature = "cuda-aware-mpi")]
                let msg = if self.device_ranks.contains(&c) {
                    let (bare, dims, parts) = crate::pipeline::device_path::strip_pixels(u);
                    Msg::WorkParts(Box::new(bare), to, dims, parts)
                } else {
                    Msg::Work(Box::new(u), to)
                };
                #[cfg(not(feature = "cuda-aware-mpi"))]
                let msg = Msg::Work(Box::new(u), to);
                r.send(c, msg)?;
                r.times.transfer_s += t0.elapsed().as_secs_f64();
                self.waiting.pop_front();
                moved = true;
            } else if self.exhausted
                && self.reading == 0
                && !self.requested
                && self.between.is_empty()
            {
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
                "reader: {} frame(s) being read, {} cut, {} between passes awaiting {} \
                 first-pass unit(s), {} compute rank(s) waiting for work{}",
                self.reading,
                self.queue.len(),
                self.between.len(),
                self.between
                    .values()
                    .map(|b| b.handed - b.received)
                    .sum::<usize>(),
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

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
