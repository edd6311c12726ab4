//! The stage's decomposition of a batch, shared by the device path and its twin
//! (`twins::solve`): the sizes and trsm groups ([`SolvePlan`], [`Group`]), every offset the
//! pointer arrays are built from, and those arrays ([`PointerArrays`], and [`ColumnArrays`]
//! for the core columns), from device addresses or stand-ins. Plain arithmetic: imports only
//! the stage's error helpers (`super`).

use super::{bad, int, PatchShape};
use crate::extract::gpu::GpuError;

/// Patches that share the sizes of one trsm call, and of its per-fiber Gram calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// First core unknown, `core_fiber·nwavetot`: rows and columns of `L` solved with start here.
    pub k0: usize,
    /// Rows of the trailing triangle, `n − k0` (the identity padding is left out).
    pub m: usize,
    /// Core fibers.
    pub ncore: usize,
    /// Bins per fiber.
    pub nwt: usize,
    /// The patches, increasing.
    pub patches: Vec<usize>,
}

impl Group {
    /// Columns of `E`: the core unknowns.
    pub fn ncols(&self) -> usize {
        self.ncore * self.nwt
    }
}

/// The stage's decomposition of a batch, shared by the device path and its twin (`twins::solve`): sizes, the
/// trsm groups, and every offset (in elements) the pointer arrays are built from.
#[derive(Debug, Clone)]
pub struct SolvePlan {
    /// Patches.
    pub npatch: usize,
    /// Size and leading dimension of every patch's matrix.
    pub nmax: usize,
    /// Side of an output block: the largest `nwavetot`.
    pub nw: usize,
    /// Blocks per patch: the largest core-fiber count.
    pub ncore_max: usize,
    /// Columns of a patch's slab of `Y`: the largest `ncore·nwavetot`.
    pub ncols_max: usize,
    /// Elements of a patch's slab of `Y`, `ncols_max·(nmax + 1)` (see the module docs).
    pub slab: usize,
    /// The trsm groups, in increasing `(k0, m, ncore, nwt)`.
    pub groups: Vec<Group>,
    /// Per patch, the offset of its slab of `Y` (then `Z`): slabs of `slab` elements in group
    /// order, the groups concatenated (see [`SolvePlan::z_units`]).
    z_off: Vec<usize>,
}

impl SolvePlan {
    /// Checks `shapes` against a batch of `npatch` matrices of size `nmax` whose patches have
    /// `n[b]` unknowns, and groups the patches.
    pub fn new(
        npatch: usize,
        nmax: usize,
        n: &[usize],
        shapes: &[PatchShape],
    ) -> Result<SolvePlan, GpuError> {
        if npatch == 0 || nmax == 0 {
            return Err(bad(format!("{npatch} patches of {nmax} unknowns")));
        }
        if shapes.len() != npatch || n.len() != npatch {
            return Err(bad(format!(
                "{} shapes and {} unknown counts for {npatch} patches",
                shapes.len(),
                n.len()
            )));
        }
        let mut keyed =
            std::collections::BTreeMap::<(usize, usize, usize, usize), Vec<usize>>::new();
        for (b, (s, &nb)) in shapes.iter().zip(n).enumerate() {
            if s.nwavetot == 0 || s.ncore == 0 || s.core_fiber + s.ncore > s.nfiber {
                return Err(bad(format!("patch {b}: core fibers of {s:?}")));
            }
            if s.nunknown() != nb || nb > nmax {
                return Err(bad(format!(
                    "patch {b}: {s:?} has {} unknowns, the batch {nb} (of at most {nmax})",
                    s.nunknown()
                )));
            }
            let k0 = s.core_fiber * s.nwavetot;
            keyed
                .entry((k0, nb - k0, s.ncore, s.nwavetot))
                .or_default()
                .push(b);
        }
        let nw = shapes.iter().map(|s| s.nwavetot).max().unwrap_or(0);
        let ncore_max = shapes.iter().map(|s| s.ncore).max().unwrap_or(0);
        let ncols_max = shapes
            .iter()
            .map(|s| s.ncore * s.nwavetot)
            .max()
            .unwrap_or(0);
        let slab = ncols_max * (nmax + 1);
        // Every size handed to cuBLAS/cuSOLVER is a 32-bit int, and the strided copies that
        // build E (one a group) index Y with one.
        int(nmax + 1, "nmax + 1")?;
        int(npatch * nmax, "x's length")?;
        int(npatch * slab, "Y's length")?;
        int(npatch * ncore_max * nw * nw, "the blocks' length")?;
        let groups: Vec<Group> = keyed
            .into_iter()
            .map(|((k0, m, ncore, nwt), patches)| Group {
                k0,
                m,
                ncore,
                nwt,
                patches,
            })
            .collect();
        let mut z_off = vec![0; npatch];
        for (slot, &b) in groups.iter().flat_map(|g| &g.patches).enumerate() {
            z_off[b] = slot * slab;
        }
        Ok(SolvePlan {
            npatch,
            nmax,
            nw,
            ncore_max,
            ncols_max,
            slab,
            groups,
            z_off,
        })
    }

    /// Offset of patch `b`'s matrix (and factor) in `ata`.
    pub fn factor(&self, b: usize) -> usize {
        b * self.nmax * self.nmax
    }

    /// Offset of `L[k0, k0]` of patch `b`: the trailing triangle its trsm solves with.
    pub fn trailing(&self, b: usize, k0: usize) -> usize {
        self.factor(b) + k0 * (self.nmax + 1)
    }

    /// Offset of patch `b`'s `x`.
    pub fn x(&self, b: usize) -> usize {
        b * self.nmax
    }

    /// Offset in `Y` of row `k0` of patch `b`'s slab, where its trsm's `B` starts (row `r`
    /// of that operand is unknown `k0 + r`; the rows above stay zero).
    pub fn y(&self, b: usize, k0: usize) -> usize {
        self.z(b) + k0
    }

    /// Offset in `Y` of core fiber `c`'s first nonzero row in its first column: row `k0 +
    /// c·nwt` and column `c·nwt` of patch `b`'s slab.
    pub fn y_fiber(&self, b: usize, k0: usize, c: usize, nwt: usize) -> usize {
        self.y(b, k0) + c * nwt * (self.nmax + 1)
    }

    /// Offset of patch `b`'s block of core fiber `c` in `blocks`.
    pub fn block(&self, b: usize, c: usize) -> usize {
        (b * self.ncore_max + c) * self.nw * self.nw
    }

    /// Elements of `blocks`.
    pub fn blocks_len(&self) -> usize {
        self.npatch * self.ncore_max * self.nw * self.nw
    }

    /// The most unit entries of `E` one strided copy writes (a group's, [`SolvePlan::z_units`]):
    /// the length the vector of ones needs.
    pub fn units(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.patches.len() * self.ncols_max)
            .max()
            .unwrap_or(0)
    }

    /// Offset of patch `b`'s slab of `Y` (and `Z`, the same buffer once the columns are
    /// solved for): row `v` of column `i` (unknown `v` of `L⁻¹E`'s column for core unknown
    /// `k0 + i`, then `C[v, k0 + i]`) is at `z(b) + i·nmax + v`.
    pub fn z(&self, b: usize) -> usize {
        self.z_off[b]
    }

    /// Elements of `Y`: a slab per patch.
    pub fn z_len(&self) -> usize {
        self.npatch * self.slab
    }

    /// `E`'s unit entries in `Y` for group `g`: the first index and the count of the progression
    /// `first + i·(nmax + 1)`, `i < count`. The group's slabs are consecutive from
    /// `z(g.patches[0])`, so entry `i = j·ncols_max + c` lands at `z(b_j) + c·nmax + k0 + c`:
    /// row `k0 + c` of column `c` of its `j`th patch's slab. For `c < ncols` that row is below
    /// `n ≤ nmax`, inside column `c`; the entries of columns `c ≥ ncols` (which no call reads)
    /// may run past row `nmax` into column `c + 1`, still a column `≥ ncols` (or the slab's
    /// last `ncols_max` elements, past its columns), and the last one, at `(count − 1)·(nmax +
    /// 1) + k0 = |g|·slab − (nmax + 1 − k0)` from the group's start, stays inside the group's
    /// slabs as `k0 < n ≤ nmax`.
    pub fn z_units(&self, g: &Group) -> (usize, usize) {
        (
            self.z(g.patches[0]) + g.k0,
            g.patches.len() * self.ncols_max,
        )
    }
}

/// Every pointer array of one run, in one vector (uploaded at once), and where each batched
/// call's array starts in it. Built by the device path from the buffers' device addresses and
/// by the twin from stand-in addresses, so that the twin reads the very arrays the calls get.
pub(in crate::extract::gpu) struct PointerArrays {
    /// The pointers.
    pub(in crate::extract::gpu) host: Vec<u64>,
    /// potrf's and potrs's `A`: patch `b`'s matrix (`npatch` entries).
    pub(in crate::extract::gpu) factors: usize,
    /// potrs's `B`: patch `b`'s `x` (`npatch` entries).
    pub(in crate::extract::gpu) x: usize,
    /// One per group of the plan.
    pub(in crate::extract::gpu) groups: Vec<GroupArrays>,
}

/// A group's pointer arrays (one entry per patch of the group, in its order).
pub(in crate::extract::gpu) struct GroupArrays {
    /// trsm's `A`: `L[k0, k0]`.
    pub(in crate::extract::gpu) l22: usize,
    /// trsm's `B`: row `k0` of the patch's slab of `Y`.
    pub(in crate::extract::gpu) y: usize,
    /// Per core fiber, gemm's `A` and `B` (`Y_f`) and `C` (`C_ff`).
    pub(in crate::extract::gpu) fibers: Vec<(usize, usize)>,
}

impl PointerArrays {
    /// The arrays for `plan` with the buffers at device addresses `ata`, `x`, `y`, `blocks`.
    pub(in crate::extract::gpu) fn new(
        plan: &SolvePlan,
        ata: u64,
        x: u64,
        y: u64,
        blocks: u64,
    ) -> PointerArrays {
        let mut host: Vec<u64> = Vec::new();
        let factors = host.len();
        host.extend((0..plan.npatch).map(|b| at::<f64>(ata, plan.factor(b))));
        let xo = host.len();
        host.extend((0..plan.npatch).map(|b| at::<f64>(x, plan.x(b))));
        let mut groups = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            let l22 = host.len();
            host.extend(
                g.patches
                    .iter()
                    .map(|&b| at::<f64>(ata, plan.trailing(b, g.k0))),
            );
            let yo = host.len();
            host.extend(g.patches.iter().map(|&b| at::<f64>(y, plan.y(b, g.k0))));
            let mut fibers = Vec::with_capacity(g.ncore);
            for c in 0..g.ncore {
                let yf = host.len();
                host.extend(
                    g.patches
                        .iter()
                        .map(|&b| at::<f64>(y, plan.y_fiber(b, g.k0, c, g.nwt))),
                );
                let cf = host.len();
                host.extend(
                    g.patches
                        .iter()
                        .map(|&b| at::<f64>(blocks, plan.block(b, c))),
                );
                fibers.push((yf, cf));
            }
            groups.push(GroupArrays { l22, y: yo, fibers });
        }
        PointerArrays {
            host,
            factors,
            x: xo,
            groups,
        }
    }
}

/// The pointer arrays of [`Solver::core_columns`](super::Solver::core_columns), in one vector:
/// its own upload, since it runs after the stage's calls, on a buffer (`Z`) they do not have.
pub(in crate::extract::gpu) struct ColumnArrays {
    /// The pointers.
    pub(in crate::extract::gpu) host: Vec<u64>,
    /// Per group of the plan, where the two arrays of its trsm calls start (one entry per patch
    /// of the group, in its order): `A`, the full factor `L[0, 0]`, and `B`, the patch's slab of
    /// `Z`.
    pub(in crate::extract::gpu) groups: Vec<(usize, usize)>,
}

impl ColumnArrays {
    /// The arrays for `plan` with the factors at device address `ata` and `Z` at `z`.
    pub(in crate::extract::gpu) fn new(plan: &SolvePlan, ata: u64, z: u64) -> ColumnArrays {
        let mut host: Vec<u64> = Vec::with_capacity(2 * plan.npatch);
        let mut groups = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            let l = host.len();
            host.extend(g.patches.iter().map(|&b| at::<f64>(ata, plan.factor(b))));
            let zo = host.len();
            host.extend(g.patches.iter().map(|&b| at::<f64>(z, plan.z(b))));
            groups.push((l, zo));
        }
        ColumnArrays { host, groups }
    }
}

/// A device address `off` elements of `T` past `base`.
pub(super) fn at<T>(base: u64, off: usize) -> u64 {
    base + (off * std::mem::size_of::<T>()) as u64
}
