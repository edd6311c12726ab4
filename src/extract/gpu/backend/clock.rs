//! Device time per stage ([`StageClock`]), from events a stream records between the stages
//! ([`Marks`]). Imports `device` and the backend's stage names only.

use cudarc::driver::{sys::CUevent_flags, CudaEvent};

use super::super::device::Gpu;
use super::super::GpuError;
use super::{MODEL_STAGES, STAGES};

/// Device time per stage, from events recorded on a stream between the stages. A stage's
/// time is its stream's time between its mark and the previous one. With two lanes in flight
/// their stages overlap, so the sum over stages can exceed the GPU's wall time.
pub(super) struct StageClock {
    totals: [f64; TIMED],
}

/// Stages timed: every batch's, then the model image's.
const TIMED: usize = STAGES.len() + MODEL_STAGES.len();

/// The timed stages' names, in the order of the totals.
fn timed() -> impl Iterator<Item = &'static str> {
    STAGES.into_iter().chain(MODEL_STAGES)
}

/// Events recorded on one stream: (the stage that ends there, the event).
pub(super) type Marks = Vec<(&'static str, CudaEvent)>;

impl StageClock {
    pub(super) fn new() -> StageClock {
        StageClock {
            totals: [0.0; TIMED],
        }
    }

    /// Records the end of `stage` (or, for "start", the beginning of a run of stages).
    pub(super) fn mark(marks: &mut Marks, gpu: &Gpu, stage: &'static str) -> Result<(), GpuError> {
        let ev = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| GpuError::driver("recording an event", e))?;
        marks.push((stage, ev));
        Ok(())
    }

    /// Adds the marked intervals to the totals (waits for the last mark).
    pub(super) fn settle(&mut self, marks: Marks) -> Result<(), GpuError> {
        for w in marks.windows(2) {
            let ms = w[0]
                .1
                .elapsed_ms(&w[1].1)
                .map_err(|e| GpuError::driver("reading an event", e))?;
            if let Some(i) = timed().position(|s| s == w[1].0) {
                self.totals[i] += f64::from(ms) / 1e3;
            }
        }
        Ok(())
    }

    pub(super) fn take(&mut self) -> Vec<(&'static str, f64)> {
        let out = timed().zip(self.totals).collect();
        self.totals = [0.0; TIMED];
        out
    }
}

#[cfg(test)]
mod tests {
    /// Each stage is timed once, under its own name.
    #[test]
    fn every_timed_stage_has_its_own_name() {
        let mut names: Vec<&str> = super::timed().collect();
        assert_eq!(names.len(), super::TIMED);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::TIMED);
    }
}
