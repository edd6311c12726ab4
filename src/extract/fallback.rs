//! The CPU's share of a device backend's batch: the patches the device could not finish (a
//! factorisation that failed, an indefinite covariance block, a non-finite output) extracted
//! by the CPU backend, which retries them with regularisation exactly as it would its own, so
//! that the semantics stay the CPU's; and the patches whose windows leave the CCD, which a
//! device backend never takes ([`device_on_ccd`]). Imports `cpu` and the extract types only.

use super::cpu::CpuBackend;
use super::{Backend, ExtractError, ExtractOptions, PatchInfo, PatchInput, PatchResult};

/// `partial` (one entry per patch of `batch`: the device's result, or None) completed by the
/// CPU backend. The device's results keep only their `on_device` mark of the info.
pub fn complete_on_cpu(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    partial: Vec<Option<PatchResult>>,
) -> Result<Vec<PatchResult>, ExtractError> {
    let missing: Vec<PatchInput<'_>> = partial
        .iter()
        .zip(batch)
        .filter(|(r, _)| r.is_none())
        .map(|(_, inp)| inp.clone())
        .collect();
    let mut from_cpu = CpuBackend.extract_batch(&missing, opts)?.into_iter();
    let mut out = Vec::with_capacity(partial.len());
    for r in partial {
        match r {
            Some(mut r) => {
                r.info = PatchInfo {
                    on_device: r.info.on_device,
                    ..PatchInfo::default()
                };
                out.push(r);
            }
            None => out.push(from_cpu.next().ok_or_else(|| ExtractError::Backend {
                backend: "cpu",
                msg: "returned fewer results than patches".into(),
            })?),
        }
    }
    Ok(out)
}

/// `device`'s results for the patches of `batch` whose windows lie on the CCD, None for the
/// others, which [`complete_on_cpu`] then extracts. A device backend's kernels index windows
/// cut from the pixels it holds, all on the CCD; a window that leaves the CCD needs a padded
/// copy with the pixels off it masked, which the CPU makes. Such patches are few (at the ends
/// of a grid that reaches beyond the CCD) and the batch of the rest is the one the device
/// took before they were extracted at all.
pub fn device_on_ccd<E>(
    batch: &[PatchInput<'_>],
    device: impl FnOnce(&[PatchInput<'_>]) -> Result<Vec<Option<PatchResult>>, E>,
) -> Result<Vec<Option<PatchResult>>, E> {
    if !batch.iter().any(PatchInput::leaves_ccd) {
        return device(batch);
    }
    let on: Vec<PatchInput<'_>> = batch.iter().filter(|i| !i.leaves_ccd()).cloned().collect();
    let mut from_device = if on.is_empty() {
        Vec::new()
    } else {
        device(&on)?
    }
    .into_iter();
    Ok(batch
        .iter()
        .map(|i| {
            if i.leaves_ccd() {
                None
            } else {
                from_device.next().flatten()
            }
        })
        .collect())
}
