//! The unit-on-device mode of the cuda-aware-mpi build: pixels adopted from an MPI receive
//! instead of uploaded ([`GpuBackend::adopt_pixels`]), and results written into the unit's
//! arrays on the device ([`GpuBackend::begin_unit`] to [`GpuBackend::take_unit`], with the
//! CPU's results uploaded over their cells by `keep_on_device`). Imports the backend's state
//! (`super`), `normal`'s pixels, `unit`'s arrays and `extract`'s types.

use super::super::normal::DevicePixels;
use super::super::unit::{DeviceUnit, UnitShape};
use super::super::GpuError;
use super::GpuBackend;
use crate::extract::{ExtractError, PatchInput, PatchResult, PixelLoad};

impl GpuBackend {
    /// Takes `pixels` (filled elsewhere, e.g. received by CUDA-aware MPI) as the unit's
    /// pixels, in place of a [`Backend::load_pixels`](crate::extract::Backend::load_pixels):
    /// the patches whose `loaded` names the load returned read them there. Their host views
    /// only stand for the device copy and are never read; a patch the CPU must retry gets its
    /// window from a host copy downloaded once per unit.
    pub fn adopt_pixels(&mut self, pixels: DevicePixels) -> PixelLoad {
        self.settle_lanes();
        let load = PixelLoad::Held(pixels.held);
        self.pixels = Some(pixels);
        self.adopted = true;
        self.host_pixels = None;
        load
    }

    /// How many adopted units had their pixels downloaded for the CPU.
    pub fn pixel_downloads(&self) -> usize {
        self.pixel_downloads
    }

    /// From now until [`GpuBackend::take_unit`], batches write their results into zeroed unit
    /// arrays of `shape` on the device, and return results marked `on_device` without numbers.
    pub fn begin_unit(&mut self, shape: UnitShape) -> Result<(), ExtractError> {
        self.settle_lanes();
        self.unit = None;
        self.unit = Some(DeviceUnit::zeros(&self.gpu, shape).map_err(|e| self.error(e))?);
        Ok(())
    }

    /// The unit's arrays, complete (every stream that wrote them finished), ending unit mode.
    pub fn take_unit(&mut self) -> Result<Option<DeviceUnit>, ExtractError> {
        self.settle_lanes();
        self.gpu
            .stream
            .synchronize()
            .map_err(|e| self.error(GpuError::driver("finishing the unit", e)))?;
        Ok(self.unit.take())
    }

    /// In unit mode, the host results (the CPU's) uploaded over their patches' cells, and every
    /// result marked as on the device; otherwise `results` as they are.
    pub(super) fn keep_on_device(
        &mut self,
        batch: &[PatchInput<'_>],
        results: Vec<PatchResult>,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        let Some(u) = self.unit.as_mut() else {
            return Ok(results);
        };
        let mut out = Vec::with_capacity(results.len());
        let mut failed = None;
        for (inp, r) in batch.iter().zip(results) {
            if !r.info.on_device {
                if let Err(e) = u.upload_patch(&self.gpu, &inp.patch, &r) {
                    failed = Some(e);
                    break;
                }
            }
            // The starved bins went up as zeros; the frame still marks them NODATA.
            let mut kept = PatchResult::on_device(r.info, r.model);
            kept.ccd_light = r.ccd_light;
            out.push(kept);
        }
        match failed {
            Some(e) => Err(self.error(e)),
            None => Ok(out),
        }
    }
}
