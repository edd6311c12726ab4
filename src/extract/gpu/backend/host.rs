//! Host copies for the CPU's retries: spot values downloaded once per spot set and adopted
//! pixels once per unit ([`GpuBackend::cpu_batch`]), and the batch rebuilt over them
//! ([`with_host_spots`]). Imports the backend's state (`super`), the resident set's record
//! and the windows' places in a load (`normal`), `extract`'s fallback and types, and `psf`'s spot sets.

use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayView2};

use super::super::normal::{place_in, ResidentSpots};
use super::super::GpuError;
use super::GpuBackend;
use crate::extract::fallback::complete_on_cpu;
use crate::extract::{ExtractError, ExtractOptions, HeldPixels, PatchInput, PatchResult};
use crate::psf::SpotSet;

/// `batch` with spot values on the host for the CPU: patches whose set is the resident one
/// (values held on the device) get its host copy, which the caller has downloaded; a set held
/// elsewhere is refused.
///
/// With `pixels` (the adopted pixels' host copy), the windows are taken from that copy where
/// the patches' `loaded` places them: the batch's own views then only stand for the device's
/// pixels.
pub(in crate::extract::gpu) fn with_host_spots<'c>(
    batch: &'c [PatchInput<'_>],
    resident: Option<(&'c ResidentSpots, &'c SpotSet)>,
    pixels: Option<&'c HostPixels>,
) -> Result<Vec<PatchInput<'c>>, GpuError> {
    batch
        .iter()
        .map(|inp| {
            let spots: &'c SpotSet = match inp.spots.held() {
                None => inp.spots,
                Some(set) => match resident {
                    Some((key, host)) if key.holds(inp.spots) => host,
                    _ => {
                        return Err(GpuError::SpotsElsewhere {
                            set,
                            here: resident.map(|(key, _)| key.held),
                        })
                    }
                },
            };
            let (pix, ivar) = match pixels {
                Some(h) => h.window_of(inp)?,
                // PatchInput is invariant in its lifetime: rebuild it with views of this borrow.
                None => (inp.pix.view(), inp.ivar.view()),
            };
            Ok(PatchInput {
                patch: inp.patch,
                window: inp.window,
                ccd: inp.ccd,
                pix,
                ivar,
                spots,
                loaded: inp.loaded,
            })
        })
        .collect()
}

/// The host copy of adopted pixels, downloaded when the CPU first needs them.
pub(in crate::extract::gpu) struct HostPixels {
    held: HeldPixels,
    pix: Array2<f64>,
    ivar: Array2<f64>,
}

impl HostPixels {
    /// `inp`'s window in the copy, where its `loaded` places it (its views stand for the
    /// adopted pixels).
    fn window_of(
        &self,
        inp: &PatchInput<'_>,
    ) -> Result<(ArrayView2<'_, f64>, ArrayView2<'_, f64>), GpuError> {
        let (ny, nx) = inp.pix.dim();
        let (r, c) = place_in(Some(self.held), inp)?.ok_or_else(|| {
            GpuError::Kernel(format!(
                "patch at fiber {}, bin {}: its window is not in the pixels adopted from MPI",
                inp.patch.ispec, inp.patch.iwave
            ))
        })?;
        let cut = ndarray::s![r..r + ny, c..c + nx];
        Ok((self.pix.slice(cut), self.ivar.slice(cut)))
    }
}

impl GpuBackend {
    /// The CPU's results for the patches of `batch` that `done` leaves out (all of them when
    /// `done` is None), with spot values brought to the host as the CPU needs them.
    pub(super) fn cpu_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
        done: Option<Vec<Option<PatchResult>>>,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        let done = done.unwrap_or_else(|| vec![None; batch.len()]);
        if done.iter().all(Option::is_some) {
            return complete_on_cpu(batch, opts, done);
        }
        let resident_set = self.resident.as_ref().map(|r| r.key);
        let on_device = batch
            .iter()
            .any(|i| resident_set.is_some_and(|k| k.holds(i.spots)));
        if let Some(res) = self.resident.as_mut().filter(|_| on_device) {
            if res.host.is_none() {
                match res.device.download(&self.gpu) {
                    Ok(host) => res.host = Some(host),
                    Err(e) => return Err(self.error(e)),
                }
            }
        }
        let to_download = self
            .pixels
            .as_ref()
            .filter(|_| self.adopted && self.host_pixels.is_none());
        if let Some(p) = to_download {
            let (ny, nx) = (p.held.rows, p.held.cols);
            let down = |v: &CudaSlice<f64>| -> Result<Array2<f64>, GpuError> {
                let host = self.gpu.stream.clone_dtoh(v).map_err(|e| {
                    GpuError::driver("downloading the unit's pixels for the CPU", e)
                })?;
                Array2::from_shape_vec((ny, nx), host)
                    .map_err(|e| GpuError::Kernel(format!("the unit's pixels: {e}")))
            };
            let host = down(&p.pix).and_then(|pix| {
                Ok(HostPixels {
                    held: p.held,
                    pix,
                    ivar: down(&p.ivar)?,
                })
            });
            self.host_pixels = Some(host.map_err(|e| self.error(e))?);
            self.pixel_downloads += 1;
        }
        let resident = self
            .resident
            .as_ref()
            .and_then(|r| Some((&r.key, r.host.as_ref()?)));
        let pixels = self.host_pixels.as_ref().filter(|_| self.adopted);
        let hosted = with_host_spots(batch, resident, pixels).map_err(|e| self.error(e))?;
        complete_on_cpu(&hosted, opts, done)
    }
}
