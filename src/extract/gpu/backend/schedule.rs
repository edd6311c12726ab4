//! The chunk scheduler: a batch in chunks that alternate between the lanes, at most one in
//! flight per lane, halved when the device runs out of memory ([`schedule`], over any
//! [`Chunks`]; the tests drive it with a recorder), and the device's side of it
//! ([`GpuBackend::device_batch`]). Imports the backend's chain and assembly (`super`) and
//! `extract`'s types.

use std::collections::VecDeque;
use std::ops::Range;

use super::super::GpuError;
use super::assemble::assemble;
use super::chain::Queued;
use super::GpuBackend;
use crate::extract::{ExtractOptions, PatchInput, PatchResult};

/// Patches per chunk: two bundles at the real sizes, enough to fill an H100 in every stage
/// (normal_dense launches nmax blocks a patch, the decorrelation five), while a batch of
/// several chunks lets one lane's transfers and the host's preparation of the next chunk
/// overlap the other lane's kernels.
pub(in crate::extract::gpu) const CHUNK_PATCHES: usize = 470;

/// `0..n` in nearly equal ranges of at most `size`.
pub(in crate::extract::gpu) fn chunk_ranges(n: usize, size: usize) -> VecDeque<Range<usize>> {
    let k = n.div_ceil(size.max(1)).max(1);
    let per = n.div_ceil(k);
    (0..k)
        .map(|i| i * per..((i + 1) * per).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

impl GpuBackend {
    /// The batch through the device in chunks that alternate between the lanes ([`schedule`]).
    /// Per patch, the chain's result, or None where the CPU must take over.
    pub(super) fn device_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Vec<Option<PatchResult>>, GpuError> {
        let lanes = self.lanes.len();
        let mut run = DeviceChunks {
            backend: self,
            batch,
            opts,
            results: vec![None; batch.len()],
        };
        let scheduled = schedule(&mut run, batch.len(), CHUNK_PATCHES, lanes);
        let results = run.results;
        if let Err(e) = scheduled {
            // A chunk still in flight on the other lane may read the resident pixels and
            // spots, which the next unit frees: let it finish first.
            self.settle_lanes();
            return Err(e);
        }
        Ok(results)
    }
}

/// What [`schedule`] drives: chunks of a batch queued on lanes and collected.
pub(in crate::extract::gpu) trait Chunks {
    type Queued;
    /// The lane a queued chunk runs on.
    fn lane_of(q: &Self::Queued) -> usize;
    /// Queues patches `range` on `lane` without waiting.
    fn queue(&mut self, lane: usize, range: Range<usize>) -> Result<Self::Queued, GpuError>;
    /// Waits for a queued chunk and takes its results.
    fn collect(&mut self, q: Self::Queued) -> Result<(), GpuError>;
    /// Waits for whatever `lane` still runs: a queue that failed partway may have left work
    /// on it that reads buffers the retry would reuse.
    fn settle(&mut self, lane: usize) -> Result<(), GpuError>;
}

/// Runs patches `0..n` in chunks of at most `chunk`, alternating over `lanes` lanes with at
/// most one chunk in flight per lane: while one lane's chunk runs, the host prepares the next
/// on another. A lane's previous chunk is collected before it takes the next (its buffers
/// and handles are reused). Out of memory, everything in flight is collected (freeing its
/// memory) and the chunk is halved; a single patch that does not fit is an error.
pub(in crate::extract::gpu) fn schedule<C: Chunks>(
    c: &mut C,
    n: usize,
    chunk: usize,
    lanes: usize,
) -> Result<(), GpuError> {
    let lanes = lanes.max(1);
    let mut pending = chunk_ranges(n, chunk);
    let mut flight: VecDeque<C::Queued> = VecDeque::new();
    let mut next = 0usize;
    while let Some(range) = pending.pop_front() {
        let lane = next % lanes;
        if let Some(k) = flight.iter().position(|q| C::lane_of(q) == lane) {
            let q = flight.remove(k).expect("found above");
            c.collect(q)?;
        }
        match c.queue(lane, range.clone()) {
            Ok(q) => {
                flight.push_back(q);
                next += 1;
            }
            Err(GpuError::OutOfMemory { .. }) if range.len() > 1 => {
                c.settle(lane)?;
                while let Some(q) = flight.pop_front() {
                    c.collect(q)?;
                }
                let mid = range.start + range.len() / 2;
                tracing::warn!(
                    "GPU out of memory for {} patches; retrying as {} and {}",
                    range.len(),
                    mid - range.start,
                    range.end - mid
                );
                pending.push_front(mid..range.end);
                pending.push_front(range.start..mid);
            }
            Err(e) => return Err(e),
        }
    }
    while let Some(q) = flight.pop_front() {
        c.collect(q)?;
    }
    Ok(())
}

/// The device's side of [`schedule`]: a batch's chunks through the chain.
struct DeviceChunks<'b, 'i> {
    backend: &'b mut GpuBackend,
    batch: &'b [PatchInput<'i>],
    opts: &'b ExtractOptions,
    results: Vec<Option<PatchResult>>,
}

impl Chunks for DeviceChunks<'_, '_> {
    type Queued = Queued;

    fn lane_of(q: &Queued) -> usize {
        q.lane
    }

    fn queue(&mut self, lane: usize, range: Range<usize>) -> Result<Queued, GpuError> {
        let chunk = &self.batch[range.clone()];
        self.backend.queue(lane, range, chunk, self.opts)
    }

    fn settle(&mut self, lane: usize) -> Result<(), GpuError> {
        self.backend.lanes[lane]
            .gpu
            .stream
            .synchronize()
            .map_err(|e| GpuError::driver(format!("waiting for lane {lane} after an error"), e))
    }

    fn collect(&mut self, q: Queued) -> Result<(), GpuError> {
        let (range, out) = self.backend.collect(q)?;
        let chunk = &self.batch[range.clone()];
        for (r, slot) in assemble(chunk, self.opts, &out).into_iter().zip(range) {
            self.results[slot] = r;
        }
        Ok(())
    }
}
