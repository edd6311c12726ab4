//! The chain of stages for one chunk on one lane: [`GpuBackend::queue`] puts every stage and
//! the copies back on the lane's stream without waiting, [`GpuBackend::collect`] waits and
//! reads the results. Imports each stage's launcher (`normal`, `solve`, `decorrelate`,
//! `chi2`, `model`, `unit`), the backend's state, clock and assembly (`super`), and `extract`'s
//! types.

use std::ops::Range;

use super::super::chi2;
use super::super::decorrelate::{self as decor, DecorrLayout, EigenRoute, HostDecorr, MAX_SWEEPS};
use super::super::model::{self, ModelBatch};
use super::super::normal::{self, BatchLayout, OnDevice, Resident};
use super::super::solve::{self, PatchShape};
use super::super::unit;
use super::super::GpuError;
use super::assemble::{blocks_of, ChainOutputs};
use super::clock::{Marks, StageClock};
use super::GpuBackend;
use crate::extract::DIAG_EPSILON;
use crate::extract::{ExtractOptions, PatchInput};

/// A chunk queued on a lane: where its results will be and how to read them.
pub(super) struct Queued {
    pub(super) lane: usize,
    range: Range<usize>,
    blocks: Vec<(usize, usize)>,
    dims: chi2::Chi2Layout,
    npatch: usize,
    nblock: usize,
    ncol: usize,
    nd2: usize,
    marks: Marks,
    /// The numbers went into the unit's arrays: only the statuses come back.
    on_device: bool,
    /// The model image's parts come back, and the leverage with them.
    model: Option<bool>,
}

impl GpuBackend {
    /// Queues the whole chain for `chunk` (patches `range` of the batch) on lane `li`, the
    /// results copied into the lane's pinned buffers; nothing is waited for.
    pub(super) fn queue(
        &mut self,
        li: usize,
        range: Range<usize>,
        chunk: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Queued, GpuError> {
        // Everything the host computes comes first, so that the stream runs the stages back
        // to back.
        let resident = Resident {
            pixels: self.pixels.as_ref().map(|p| p.held),
            spots: self.resident.as_ref().map(|r| &r.key),
        };
        let layout = BatchLayout::with_resident(chunk, &resident)?;
        let shapes: Vec<PatchShape> = chunk.iter().map(|i| PatchShape::of(&i.patch)).collect();
        let nmax = layout.nmax;
        let ncore_max = shapes.iter().map(|s| s.ncore).max().unwrap_or(0);
        let nw = shapes.iter().map(|s| s.nwavetot).max().unwrap_or(0);
        // Every block, whether or not its patch factors: see the module docs.
        let factored = vec![0; chunk.len()];
        let (ids, blocks) = blocks_of(chunk, &factored, nmax, ncore_max, nw, opts.ndiag);
        let dl = DecorrLayout::new(&blocks)?;
        let dims = chi2::Chi2Layout::new(chunk, &layout)?;

        let lane = &mut self.lanes[li];
        let gpu = &lane.gpu;
        // The lane's last chunk was collected: its stream is idle and its staging free.
        gpu.restage()?;
        let mut marks = Marks::new();
        StageClock::mark(&mut marks, gpu, "start")?;
        let on_device = OnDevice {
            pixels: self.pixels.as_ref(),
            spots: self.resident.as_ref().map(|r| r.device.values()),
        };
        let up = normal::UploadedLayout::upload(gpu, &layout, on_device)?;
        let buf = up.buffers();
        StageClock::mark(&mut marks, gpu, "h2d")?;
        let mut dense = normal::DenseBatch::alloc(gpu, &layout)?;
        normal::build_into(
            gpu,
            &self.normal,
            &buf,
            opts.regularize,
            DIAG_EPSILON,
            &mut dense,
        )?;
        StageClock::mark(&mut marks, gpu, "normal")?;
        let mut sol = lane.solver.solve(gpu, &mut dense, &shapes)?;
        StageClock::mark(&mut marks, gpu, "solve")?;
        // The leverage needs C's columns of the core unknowns, from the factor in `dense`.
        let columns = match (opts.model_image, opts.leverage) {
            (Some(_), true) => Some(lane.solver.core_columns(gpu, &dense, &shapes)?),
            _ => None,
        };
        if (sol.nmax, sol.ncore_max, sol.nw) != (nmax, ncore_max, nw) {
            return Err(GpuError::Kernel(format!(
                "the solve laid out {} × {} blocks of {}, the chain expected {nmax} × \
                 {ncore_max} of {nw}",
                sol.nmax, sol.ncore_max, sol.nw
            )));
        }
        // Freed in stream order, after the solve has read it.
        drop(dense);
        StageClock::mark(&mut marks, gpu, "columns")?;
        let d = match self.eigen {
            EigenRoute::Jacobi => {
                decor::decorrelate(gpu, &self.decor, &dl, &sol.blocks, &sol.x, MAX_SWEEPS)?
            }
            EigenRoute::Syev => decor::decorrelate_by_syev(
                gpu,
                &self.decor,
                &mut lane.solver,
                &dl,
                &mut sol.blocks,
                sol.nw,
                sol.npatch * sol.ncore_max,
                &sol.x,
            )?,
        };
        StageClock::mark(&mut marks, gpu, "decorrelate")?;
        let mut c2 = chi2::Chi2Batch::alloc(gpu, &dims)?;
        chi2::launch(gpu, &self.chi2, &buf, &dims, &sol.x, opts.psferr, &mut c2)?;
        StageClock::mark(&mut marks, gpu, "chi2")?;
        let image = match opts.model_image {
            Some(_) => {
                let mut m = ModelBatch::alloc(gpu, &dims, columns.is_some())?;
                let cols = columns.as_ref().map(|c| model::Columns {
                    z: &c.z,
                    off: &c.off,
                    ld: c.ld,
                });
                model::launch(gpu, &self.chi2, &buf, &dims, &sol.x, cols, &mut m)?;
                Some(m)
            }
            None => None,
        };
        StageClock::mark(&mut marks, gpu, "model")?;
        let on_device = match self.unit.as_mut() {
            Some(u) => {
                let place = unit::placement(chunk, &ids, &u.shape)?;
                let outputs = unit::ChunkOutputs {
                    info: &sol.info,
                    dec: &d,
                    chi2: &c2,
                    dims: &dims,
                };
                unit::scatter(gpu, &self.unit_kernels, &place, &outputs, u)?;
                StageClock::mark(&mut marks, gpu, "unit")?;
                true
            }
            None => false,
        };
        if let Some(m) = &image {
            lane.image.download(gpu, &m.image)?;
            if let Some(h) = &m.leverage {
                lane.leverage.download(gpu, h)?;
            }
        }
        lane.info.download(gpu, &sol.info)?;
        lane.potrs.download(gpu, &sol.potrs_info)?;
        lane.status.download(gpu, &d.status)?;
        if !on_device {
            lane.flux.download(gpu, &d.flux)?;
            lane.fluxivar.download(gpu, &d.fluxivar)?;
            lane.resolution.download(gpu, &d.resolution)?;
            lane.chi2pix.download(gpu, &c2.chi2pix)?;
            lane.pixmask.download(gpu, &c2.pixmask)?;
        }
        StageClock::mark(&mut marks, gpu, "d2h")?;
        Ok(Queued {
            lane: li,
            range,
            blocks: ids,
            dims,
            npatch: chunk.len(),
            nblock: d.nblock,
            ncol: d.ncol,
            nd2: d.nd2,
            marks,
            on_device,
            model: image.as_ref().map(|m| m.leverage.is_some()),
        })
        // The device buffers drop here, freed in stream order after the copies.
    }

    /// Waits for a queued chunk and reads its results.
    pub(super) fn collect(&mut self, q: Queued) -> Result<(Range<usize>, ChainOutputs), GpuError> {
        let lane = &self.lanes[q.lane];
        // The copies into the pinned buffers carry no event of their own (see `Pinned`); the
        // lane holds only this chunk, queued last.
        lane.gpu
            .stream
            .synchronize()
            .map_err(|e| GpuError::driver("waiting for a chunk", e))?;
        let (nb, ncol) = (q.nblock, q.ncol);
        solve::check_potrs_info(lane.potrs.read(1)?[0])?;
        let info = lane.info.read(q.npatch)?;
        if q.on_device {
            let status = lane.status.read(nb)?;
            self.clock.settle(q.marks)?;
            return Ok((
                q.range,
                ChainOutputs {
                    info,
                    blocks: q.blocks,
                    dec: None,
                    c2: chi2::HostChi2 {
                        model: Vec::new(),
                        chi2: Vec::new(),
                        valid: Vec::new(),
                        chi2pix: Vec::new(),
                        pixmask: Vec::new(),
                    },
                    dims: q.dims,
                    model: None,
                    on_device: Some(status),
                },
            ));
        }
        let dec = HostDecorr {
            nblock: nb,
            ncol,
            nd2: q.nd2,
            flux: lane.flux.read(nb * ncol)?,
            fluxivar: lane.fluxivar.read(nb * ncol)?,
            resolution: lane.resolution.read(nb * q.nd2 * ncol)?,
            status: lane.status.read(nb)?,
            // Not brought back: the chain does not use them.
            sweeps: Vec::new(),
        };
        let nslot = q.dims.npatch * q.dims.slots();
        let c2 = chi2::HostChi2 {
            model: Vec::new(),
            chi2: Vec::new(),
            valid: Vec::new(),
            chi2pix: lane.chi2pix.read(nslot)?,
            pixmask: lane.pixmask.read(nslot)?,
        };
        let model = match q.model {
            Some(leverage) => Some(ModelBatch {
                image: lane.image.read(q.dims.npix)?,
                leverage: if leverage {
                    Some(lane.leverage.read(q.dims.npix)?)
                } else {
                    None
                },
            }),
            None => None,
        };
        self.clock.settle(q.marks)?;
        Ok((
            q.range,
            ChainOutputs {
                info,
                blocks: q.blocks,
                dec: Some(dec),
                c2,
                dims: q.dims,
                model,
                on_device: None,
            },
        ))
    }
}
