//! Device time per stage ([`StageClock`]), from events a stream records between the stages
//! ([`Marks`]). Imports `device` and the backend's stage names only.

use cudarc::driver::{sys::CUevent_flags, CudaEvent};

use super::super::device::Gpu;
use super::super::GpuError;
use super::TIMED_STAGES;

/// Device time per stage, from events recorded on a stream between the stages. A stage's
/// time is its stream's time between its mark and the previous one. With two lanes in flight
/// their stages overlap, so the sum over stages can exceed the GPU's wall time.
pub(super) struct StageClock {
    totals: [f64; TIMED_STAGES.len()],
}

/// Events recorded on one stream: (the stage that ends there, the event).
pub(super) type Marks = Vec<(&'static str, CudaEvent)>;

impl StageClock {
    pub(super) fn new() -> StageClock {
        StageClock {
            totals: [0.0; TIMED_STAGES.len()],
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
            if let Some(i) = TIMED_STAGES.iter().position(|s| *s == w[1].0) {
                self.totals[i] += f64::from(ms) / 1e3;
            }
        }
        Ok(())
    }

    pub(super) fn take(&mut self) -> Vec<(&'static str, f64)> {
        let out = TIMED_STAGES.iter().copied().zip(self.totals).collect();
        self.totals = [0.0; TIMED_STAGES.len()];
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::STAGES;
    use super::TIMED_STAGES;

    /// The clock times every stage of the cost model's list, under the same names, and each
    /// stage once.
    #[test]
    fn the_timed_stages_are_the_modelled_ones_and_the_model_image_s() {
        assert_eq!(TIMED_STAGES[..STAGES.len()], STAGES);
        let mut names = TIMED_STAGES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TIMED_STAGES.len());
    }
}
