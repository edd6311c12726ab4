//! Host twin of kernels/unit.cu's `unit_scatter` (a chunk's kept bins scattered into the
//! work unit's fiber × bin arrays), for the emulator test. Test-only; re-exports the
//! product's `unit`.

pub(super) use super::super::unit::*;
use crate::patch::Patch;

/// A chunk's outputs on the host, as the twin reads them.
pub struct HostChunk<'a> {
    /// potrf's info per patch.
    pub info: &'a [i32],
    /// Decorrelation status per block.
    pub status: &'a [i32],
    /// Columns per block.
    pub ncol: usize,
    /// `[nblock·ncol]`.
    pub flux: &'a [f64],
    /// `[nblock·ncol]`.
    pub fluxivar: &'a [f64],
    /// `[nblock·nd2·ncol]`.
    pub resolution: &'a [f64],
    /// chi2 slots `[npatch·ncmax·nkmax]`.
    pub chi2pix: &'a [f64],
    /// Same layout.
    pub pixmask: &'a [f64],
    /// Core fibers per patch in the chi2 slots.
    pub ncmax: usize,
    /// Kept bins per fiber in the chi2 slots.
    pub nkmax: usize,
}

/// The host twin of `unit_scatter`: writes the chunk's good blocks into `out` (the five
/// arrays of `shape`, in [`DeviceUnit::parts`] order).
pub fn twin(place: &[i32], chunk: &HostChunk<'_>, shape: &UnitShape, out: &mut [Vec<f64>; 5]) {
    let (nwave, nd2, ncol) = (shape.nwave, shape.nd2, chunk.ncol);
    for (k, p) in place.chunks_exact(5).enumerate() {
        let [b, c, row, w0, nk] = [p[0], p[1], p[2], p[3], p[4]].map(|v| v as usize);
        if chunk.info[b] != 0 || chunk.status[k] != 0 {
            continue;
        }
        for j in 0..nk {
            let u = row * nwave + w0 + j;
            let s = (b * chunk.ncmax + c) * chunk.nkmax + j;
            let d = k * ncol + j;
            out[0][u] = chunk.flux[d];
            out[1][u] = chunk.fluxivar[d];
            out[3][u] = chunk.chi2pix[s];
            out[4][u] = chunk.pixmask[s];
            for e in 0..nd2 {
                out[2][(row * nd2 + e) * nwave + w0 + j] =
                    chunk.resolution[(k * nd2 + e) * ncol + j];
            }
        }
    }
}

mod tests {
    use super::*;

    #[test]
    fn a_patch_outside_the_unit_is_refused_with_its_place() {
        let shape = UnitShape {
            specmin: 10,
            nspec: 5,
            nwave: 40,
            nd2: 3,
        };
        let patch = Patch {
            bundle: 0,
            ispec: 12,
            nspec: 4,
            specmin: 12,
            nspecpad: 4,
            iwave: 30,
            nwave_keep: 10,
            nwavetot: 10,
            wavepad: 0,
        };
        let e = shape.row_of(&patch).unwrap_err().to_string();
        assert!(e.contains("fiber 12") && e.contains("10..15"), "{e}");
        let inside = Patch { nspec: 3, ..patch };
        assert_eq!(shape.row_of(&inside).unwrap(), 2);
        assert_eq!(shape.part_lens(), [200, 200, 600, 200, 200]);
    }
}
