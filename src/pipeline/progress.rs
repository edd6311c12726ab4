//! What an operator reads while a run goes: counts with their nouns, wavelength ranges to the
//! grid's precision, rates and times left; the progress of a many-frame run (a bar on a
//! terminal, a line now and then in a batch log) as rank 0 learns it from the writers; and the
//! one bar on screen, which log lines are written around so that they do not tear it.
//!
//! Imports nothing of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// In a batch log, a progress line at least this often while frames are in flight.
pub const LINE_EVERY: Duration = Duration::from_secs(60);
/// ... and one each time a frame finishes, but not closer than this to the last line (the
/// last frame always gets one).
pub const LINE_MIN_GAP: Duration = Duration::from_secs(10);

/// `n` and its noun, plural unless `n` is 1: "1 thread", "2 threads".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The decimals that show a wavelength step `dw` (Å) exactly, up to 4: 0.8 → 1, 0.25 → 2,
/// 1 → 0. The grid's wavelengths are then shown to that precision, not to the float noise
/// that `wmin + i·dw` carries.
pub fn step_decimals(dw: f64) -> usize {
    (0..4)
        .find(|&d| {
            let scaled = dw * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(4)
}

/// A wavelength grid as "6050.0..6450.0 Å in steps of 0.8 Å" (empty grid: "no bins").
pub fn wave_range(wave: &[f64]) -> String {
    let (Some(&lo), Some(&hi)) = (wave.first(), wave.last()) else {
        return "no bins".into();
    };
    if wave.len() < 2 {
        return format!("{lo} Å");
    }
    let dw = (hi - lo) / (wave.len() - 1) as f64;
    let d = step_decimals(dw);
    format!("{lo:.d$}..{hi:.d$} Å in steps of {dw:.d$} Å")
}

/// A span of time for people: "45 s", "12 min", "3.4 h".
pub fn duration_text(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        "unknown".into()
    } else if secs < 90.0 {
        format!("{secs:.0} s")
    } else if secs < 90.0 * 60.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// A rate with its noun and one decimal: "112.7 patches/s".
pub fn rate_text(per_s: f64, nouns: &str) -> String {
    format!("{per_s:.1} {nouns}/s")
}

/// What a writer's "wrote" line says of the count: this rank's frames written, out of the
/// frames the run has to extract where this rank knows it (rank 0, which looked at the
/// outputs), else out of the frames listed.
pub fn written_text(here: usize, to_extract: Option<usize>, listed: usize) -> String {
    match to_extract {
        Some(t) if t == listed => format!("{here} of {} written on this rank", count(t, "frame")),
        Some(t) => format!(
            "{here} of {} to extract written on this rank ({listed} listed)",
            count(t, "frame")
        ),
        None => format!(
            "{} written on this rank, of {listed} listed in the run",
            count(here, "frame")
        ),
    }
}

/// What a writer tells rank 0 about a frame, for the run's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameNote {
    /// Its assembly began; it was cut into this many units.
    Begun(usize),
    /// One more of its units came back.
    Unit,
    /// It was written (true) or failed (false).
    Done(bool),
}

/// A many-frame run's progress as rank 0 knows it.
#[derive(Debug)]
pub struct FramesProgress {
    total: usize,
    finished: BTreeSet<usize>,
    failed: usize,
    /// Frames being assembled: units back, units in all (0 until the frame's ticket came).
    in_flight: BTreeMap<usize, (usize, usize)>,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
}

impl FramesProgress {
    /// `total` frames to extract; a bar on stderr when `bar` (a terminal), else lines in the
    /// log.
    pub fn new(total: usize, bar: bool) -> FramesProgress {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                // The message is cut to what the terminal's width leaves.
                indicatif::ProgressStyle::with_template("{bar:20} {pos}/{len} frames, {wide_msg}")
                    .expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(500));
            show(&b);
            b
        });
        FramesProgress {
            total,
            finished: BTreeSet::new(),
            failed: 0,
            in_flight: BTreeMap::new(),
            start: Instant::now(),
            bar,
            last_line: None,
        }
    }

    /// A writer's note about frame `job`; a line in the log when one is due.
    pub fn note(&mut self, job: usize, note: FrameNote) {
        if self.finished.contains(&job) {
            return;
        }
        match note {
            FrameNote::Begun(units) => self.in_flight.entry(job).or_default().1 = units,
            FrameNote::Unit => self.in_flight.entry(job).or_default().0 += 1,
            FrameNote::Done(ok) => {
                self.in_flight.remove(&job);
                self.finished.insert(job);
                self.failed += usize::from(!ok);
            }
        }
        self.show_if_due(matches!(note, FrameNote::Done(_)), Instant::now());
    }

    /// Called every turn of rank 0's loop: the bar's numbers, or a line when one is due.
    pub fn tick(&mut self) {
        self.show_if_due(false, Instant::now());
    }

    fn show_if_due(&mut self, frame_finished: bool, now: Instant) {
        if let Some(bar) = &self.bar {
            bar.set_position(self.finished.len() as u64);
            bar.set_message(self.status(now, false));
            return;
        }
        let last_frame = self.finished.len() == self.total;
        if line_due(self.last_line, self.start, now, frame_finished, last_frame) {
            self.last_line = Some(now);
            tracing::info!("progress: {}", self.status(now, true));
        }
    }

    /// "2 of 10 frames done (1 failed); in flight: 1 frame, 3 of 10 units; 5 min elapsed,
    /// 23.1 frames/h, about 20 min left". `full` adds the counts that the bar shows itself.
    pub fn status(&self, now: Instant, full: bool) -> String {
        let elapsed = now.duration_since(self.start).as_secs_f64();
        let (units_back, units) = self
            .in_flight
            .values()
            .fold((0, 0), |(a, b), &(d, n)| (a + d, b + n));
        let fraction: f64 = self
            .in_flight
            .values()
            .filter(|(_, n)| *n > 0)
            .map(|&(d, n)| d.min(n) as f64 / n as f64)
            .sum();
        status_text(&Status {
            done: self.finished.len(),
            total: self.total,
            failed: self.failed,
            frames_in_flight: self.in_flight.len(),
            units_back,
            units,
            done_fraction: self.finished.len() as f64 + fraction,
            elapsed_s: elapsed,
            full,
        })
    }

    /// Clears the bar (the summary follows).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            hide();
            bar.finish_and_clear();
        }
    }
}

impl Drop for FramesProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether a batch-log progress line is due at `now`: when a frame finished, unless the last
/// line is under [`LINE_MIN_GAP`] old (the last frame always); otherwise every
/// [`LINE_EVERY`] since the last line (or the start).
pub fn line_due(
    last: Option<Instant>,
    start: Instant,
    now: Instant,
    frame_finished: bool,
    last_frame: bool,
) -> bool {
    let since = now.duration_since(last.unwrap_or(start));
    if frame_finished {
        last_frame || last.is_none() || since >= LINE_MIN_GAP
    } else {
        since >= LINE_EVERY
    }
}

/// The numbers of a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    /// Frames finished (written or failed).
    pub done: usize,
    /// Frames to extract in the run.
    pub total: usize,
    /// Of the finished, those that failed.
    pub failed: usize,
    /// Frames being assembled.
    pub frames_in_flight: usize,
    /// Their units back.
    pub units_back: usize,
    /// Their units in all.
    pub units: usize,
    /// Frames done, counting the parts of those in flight.
    pub done_fraction: f64,
    /// Seconds since the run began.
    pub elapsed_s: f64,
    /// With the frame counts (a log line), or without (the bar shows them).
    pub full: bool,
}

/// A progress line from its numbers; see [`FramesProgress::status`]. Without `full` (the
/// bar's message, beside its own frame count) it is kept short: "3/10 units in flight,
/// 10.0 frames/h, ETA 45 min".
pub fn status_text(s: &Status) -> String {
    let hours = s.elapsed_s / 3600.0;
    let per_hour = (s.done_fraction > 0.0 && hours > 0.0).then(|| s.done_fraction / hours);
    let left = s.total as f64 - s.done_fraction;
    let left = per_hour
        .filter(|_| left > 0.0)
        .map(|r| duration_text(left / r * 3600.0));
    if !s.full {
        let mut parts = Vec::new();
        if s.frames_in_flight > 0 {
            parts.push(format!("{}/{} units in flight", s.units_back, s.units));
        }
        match per_hour {
            Some(r) => parts.push(format!("{r:.1} frames/h")),
            None => parts.push(format!("{} elapsed", duration_text(s.elapsed_s))),
        }
        if let Some(l) = left {
            parts.push(format!("ETA {l}"));
        }
        return parts.join(", ");
    }
    let mut parts = Vec::new();
    let failed = if s.failed > 0 {
        format!(" ({} failed)", s.failed)
    } else {
        String::new()
    };
    parts.push(format!(
        "{} of {} done{failed}",
        s.done,
        count(s.total, "frame")
    ));
    if s.frames_in_flight > 0 {
        parts.push(format!(
            "in flight: {}, {} of {} back",
            count(s.frames_in_flight, "frame"),
            s.units_back,
            count(s.units, "unit")
        ));
    }
    let mut times = vec![format!("{} elapsed", duration_text(s.elapsed_s))];
    if let Some(r) = per_hour {
        times.push(format!("{r:.1} frames/h"));
    }
    if let Some(l) = left {
        times.push(format!("about {l} left"));
    }
    parts.push(times.join(", "));
    parts.join("; ")
}

/// The bar on screen, if any: log lines are written around it.
static SHOWN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Log lines go around `bar` from now on.
pub fn show(bar: &indicatif::ProgressBar) {
    if let Ok(mut s) = SHOWN.lock() {
        *s = Some(bar.clone());
    }
}

/// No bar on screen any more.
pub fn hide() {
    if let Ok(mut s) = SHOWN.lock() {
        *s = None;
    }
}

/// stderr for log lines: while a bar is shown, it is lifted for the line and drawn again
/// below it, so that neither tears the other.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrAroundBar;

impl Write for StderrAroundBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let bar = SHOWN.lock().ok().and_then(|s| s.clone());
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_say_their_noun_in_the_right_number() {
        assert_eq!(count(1, "thread"), "1 thread");
        assert_eq!(count(0, "thread"), "0 threads");
        assert_eq!(count(8, "thread"), "8 threads");
    }

    /// `5760..7620.000000000423 Å` was the float noise of `wmin + i·dw`.
    #[test]
    fn wavelengths_are_shown_to_the_grid_step() {
        use crate::patch::{PatchOptions, WaveGrid};
        let grid = WaveGrid::new(5760.0, 7620.0, 0.8, &PatchOptions::default())
            .unwrap()
            .wave;
        let last = format!("{}", grid[grid.len() - 1]);
        assert!(last.len() > 8, "the float noise is there: {last}");
        assert_eq!(wave_range(&grid), "5760.0..7620.0 Å in steps of 0.8 Å");
        let g: Vec<f64> = (0..5).map(|i| 3600.0 + i as f64 * 0.25).collect();
        assert_eq!(wave_range(&g), "3600.00..3601.00 Å in steps of 0.25 Å");
        let g: Vec<f64> = (0..3).map(|i| 5000.0 + i as f64).collect();
        assert_eq!(wave_range(&g), "5000..5002 Å in steps of 1 Å");
        assert_eq!(step_decimals(0.1 + 0.2), 1);
    }

    #[test]
    fn the_wrote_line_says_of_how_many() {
        assert_eq!(
            written_text(1, Some(3), 3),
            "1 of 3 frames written on this rank"
        );
        assert_eq!(
            written_text(2, Some(3), 5),
            "2 of 3 frames to extract written on this rank (5 listed)"
        );
        assert_eq!(
            written_text(1, None, 12),
            "1 frame written on this rank, of 12 listed in the run"
        );
    }

    #[test]
    fn rates_and_times_carry_units() {
        assert_eq!(rate_text(112.6501, "patches"), "112.7 patches/s");
        assert_eq!(duration_text(45.2), "45 s");
        assert_eq!(duration_text(720.0), "12 min");
        assert_eq!(duration_text(3.4 * 3600.0), "3.4 h");
        assert_eq!(duration_text(f64::INFINITY), "unknown");
    }

    #[test]
    fn a_status_line_gives_frames_of_total_the_frame_in_flight_rate_and_time_left() {
        let s = Status {
            done: 2,
            total: 10,
            failed: 1,
            frames_in_flight: 1,
            units_back: 5,
            units: 10,
            done_fraction: 2.5,
            elapsed_s: 900.0,
            full: true,
        };
        assert_eq!(
            status_text(&s),
            "2 of 10 frames done (1 failed); in flight: 1 frame, 5 of 10 units back; \
             15 min elapsed, 10.0 frames/h, about 45 min left"
        );
        let s = Status {
            done: 0,
            frames_in_flight: 0,
            done_fraction: 0.0,
            failed: 0,
            full: false,
            ..s
        };
        assert_eq!(status_text(&s), "15 min elapsed");
        let s = Status {
            done: 2,
            frames_in_flight: 1,
            done_fraction: 2.5,
            ..s
        };
        assert_eq!(
            status_text(&s),
            "5/10 units in flight, 10.0 frames/h, ETA 45 min"
        );
    }

    /// A batch log gets a line when a frame finishes (not closer than LINE_MIN_GAP to the
    /// last, except the last frame) and every LINE_EVERY otherwise.
    #[test]
    fn batch_lines_come_per_frame_but_not_too_often_and_at_least_every_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(line_due(None, t0, at(1), true, false), "the first frame");
        assert!(!line_due(Some(at(1)), t0, at(5), true, false), "too soon");
        assert!(
            line_due(Some(at(1)), t0, at(5), true, true),
            "the last frame"
        );
        assert!(line_due(Some(at(1)), t0, at(11), true, false));
        assert!(!line_due(None, t0, at(59), false, false));
        assert!(line_due(None, t0, at(60), false, false));
        assert!(!line_due(Some(at(30)), t0, at(80), false, false));
        assert!(line_due(Some(at(30)), t0, at(90), false, false));
    }

    #[test]
    fn notes_count_frames_once_and_units_of_those_in_flight() {
        let mut p = FramesProgress::new(3, false);
        p.note(0, FrameNote::Unit);
        p.note(0, FrameNote::Begun(4));
        p.note(0, FrameNote::Unit);
        p.note(1, FrameNote::Done(false));
        p.note(1, FrameNote::Done(false));
        let s = p.status(Instant::now(), true);
        assert!(
            s.starts_with("1 of 3 frames done (1 failed); in flight: 1 frame, 2 of 4 units back"),
            "{s}"
        );
        p.note(0, FrameNote::Done(true));
        let s = p.status(Instant::now(), true);
        assert!(s.starts_with("2 of 3 frames done (1 failed); "), "{s}");
        assert!(!s.contains("in flight"), "{s}");
    }
}
