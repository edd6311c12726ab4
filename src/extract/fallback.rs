//! The CPU's share of a device backend's batch: the patches the device could not finish (a
//! factorisation that failed, an indefinite covariance block, a non-finite output) extracted
//! by the CPU backend, which retries them with regularisation exactly as it would its own, so
//! that the semantics stay the CPU's. Imports `cpu` and the extract types only.

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
