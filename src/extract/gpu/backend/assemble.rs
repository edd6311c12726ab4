//! What a chain's outputs become: the decorrelation blocks a chunk's patches give
//! ([`blocks_of`]), and per patch its result or None where the CPU must take over
//! ([`assemble`]), wherever the chain ran (on the device, or through the twins in the tests).
//! Imports the stages' layouts and host outputs (`decorrelate`, `chi2`) and `extract`'s types;
//! nothing of the backend's own.

use super::super::chi2;
use super::super::decorrelate::{Block, HostDecorr, Status};
use super::super::model::ModelBatch;
use crate::extract::{ExtractOptions, PatchInfo, PatchInput, PatchResult};

/// The per-patch outputs of a chain, wherever it ran.
pub(in crate::extract::gpu) struct ChainOutputs {
    /// potrf's info per patch (0: factored).
    pub(in crate::extract::gpu) info: Vec<i32>,
    pub(in crate::extract::gpu) blocks: Vec<(usize, usize)>,
    pub(in crate::extract::gpu) dec: Option<HostDecorr>,
    pub(in crate::extract::gpu) c2: chi2::HostChi2,
    pub(in crate::extract::gpu) dims: chi2::Chi2Layout,
    /// The model image's parts and the leverage, per window pixel, when the batch asked.
    pub(in crate::extract::gpu) model: Option<ModelBatch<Vec<f64>>>,
    /// When the numbers went into the unit's arrays on the device: each block's decorrelation
    /// status, all that comes back (`dec` and `c2` are then empty).
    pub(in crate::extract::gpu) on_device: Option<Vec<i32>>,
}

/// The decorrelation blocks of the patches whose factorisation succeeded: `(patch, core
/// fiber)` of each, and their layout over the solve stage's buffers.
pub(crate) fn blocks_of(
    batch: &[PatchInput<'_>],
    sol_info: &[i32],
    nmax: usize,
    ncore_max: usize,
    nw: usize,
    ndiag: usize,
) -> (Vec<(usize, usize)>, Vec<Block>) {
    let mut ids = Vec::new();
    let mut blocks = Vec::new();
    for (b, inp) in batch.iter().enumerate() {
        if sol_info[b] != 0 {
            continue;
        }
        let p = &inp.patch;
        for c in 0..p.nspec {
            // Block (b, c) of the solve stage: column-major nw × nw at this offset.
            let cov_off = (b * ncore_max + c) * nw * nw;
            blocks.push(Block::for_patch(p, ndiag, c, cov_off, nw, b * nmax));
            ids.push((b, c));
        }
    }
    (ids, blocks)
}

/// Per patch, the result the chain produced, or None where the CPU must take over.
pub(in crate::extract::gpu) fn assemble(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    out: &ChainOutputs,
) -> Vec<Option<PatchResult>> {
    let mut results: Vec<Option<PatchResult>> = batch
        .iter()
        .enumerate()
        .map(|(b, inp)| (out.info[b] == 0).then(|| PatchResult::empty(&inp.patch, opts.ndiag)))
        .collect();
    if let Some(status) = &out.on_device {
        for r in results.iter_mut().flatten() {
            *r = PatchResult::on_device(PatchInfo::default(), None);
        }
        for (k, &(b, _)) in out.blocks.iter().enumerate() {
            if status[k] != Status::Ok.code() {
                results[b] = None;
            }
        }
        return results;
    }
    let nd2 = 2 * opts.ndiag + 1;
    if let Some(dec) = &out.dec {
        for (k, &(b, c)) in out.blocks.iter().enumerate() {
            let Some(res) = results[b].as_mut() else {
                continue;
            };
            if dec.status(k) != Some(Status::Ok) {
                tracing::debug!(
                    "patch {b} fiber {c}: decorrelation status {:?}",
                    dec.status(k)
                );
                results[b] = None;
                continue;
            }
            for j in 0..batch[b].patch.nwave_keep {
                res.flux[[c, j]] = dec.flux(k, j);
                res.fluxivar[[c, j]] = dec.fluxivar(k, j);
                for d in 0..nd2 {
                    res.resolution[[c, d, j]] = dec.resolution(k, d, j);
                }
                res.chi2pix[[c, j]] = out.c2.chi2pix[out.dims.slot(b, c, j)];
                res.pixmask_fraction[[c, j]] = out.c2.pixmask[out.dims.slot(b, c, j)];
            }
        }
    }
    if let Some(m) = &out.model {
        for (b, r) in results.iter_mut().enumerate() {
            let Some(res) = r.as_mut() else {
                continue;
            };
            res.model = ModelBatch::window(&out.dims, b, &m.image);
            res.leverage = m
                .leverage
                .as_ref()
                .and_then(|h| ModelBatch::window(&out.dims, b, h));
            if res.model.is_none() || res.leverage.is_some() != m.leverage.is_some() {
                // Outputs shorter than the layout: the CPU takes the patch.
                *r = None;
            }
        }
    }
    results
}
