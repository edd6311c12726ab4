//! The floor a card sets for the GPU backend's work (issue 4): per stage, the FP64 flops it
//! does and the bytes it must move, and the time those take at the card's peak rates.
//!
//! A measured stage time means little on its own: 20 ms for the decorrelation is good or bad
//! depending on how much arithmetic it is. The floor of a stage is
//! `max(flops / FP64 peak, bytes / bandwidth)`, and the ratio of the measured time to it says
//! how much any rewrite could still win, and whether to look for it in the arithmetic or in
//! the memory traffic. So the counts follow what the backend does, not what the mathematics
//! strictly needs: the dense `nmax × nmax` normal matrices, the potrf of the identity-padded
//! patches at `nmax`, the full Jacobi rotations, the intermediate buffers one kernel writes and
//! the next reads. A floor of a better algorithm would be another model.
//!
//! What is counted, and why:
//! * **Flops**: FP64 operations as the kernels and libraries issue them, an FMA counting 2
//!   (the peak counts it so). Division, square root, `exp` and `erf` are several FP64
//!   instructions on the GPU (a reciprocal estimate then Newton steps, or a polynomial); they
//!   are charged [`DIV_FLOPS`], [`SQRT_FLOPS`], [`EXP_FLOPS`], [`ERF_FLOPS`] (two flops per
//!   instruction of CUDA's implementations, estimated). Integer and index work (the overlap
//!   tests of `normal`, the span pruning of `chi2`) is not FP64 and is not counted.
//! * **Bytes**: what must at least cross device memory for a kernel or library call as the
//!   backend makes it: every input it reads once and every output it writes once, with
//!   perfect caching within the call. Data shared by the patches of a batch (a spot used by
//!   two neighbouring patches, the DCT basis) is counted once per call; a buffer one call
//!   writes and the next reads (`AᵀWA` between `normal` and potrf, `Y` between trsm and gemm,
//!   the per-pixel χ² between the two chi2 kernels) is counted on both sides. Shared memory
//!   and registers are not device memory.
//! * **On-chip bytes**, a third ceiling beside the two the floor is made of: the traffic
//!   through each SM's shared memory and L1 (one path, 128 B per clock per SM), which the
//!   kernels that keep their working set on chip can saturate before the FP64 units. The
//!   Jacobi of `decorrelate` is the case in point: each 2×2 update of a rotation pair does 24
//!   flops for ~128 bytes of shared-memory loads and stores, where the SM does 128 FP64 flops
//!   per 128 bytes, so its on-chip time is several times its FP64 time. Counted per thread
//!   access (8 bytes a double), leaving out the operands a whole warp reads from one address
//!   (broadcasts cost one access for the warp) and ignoring bank conflicts (which only add),
//!   for this crate's kernels; not for cuBLAS/cuSOLVER. It is reported beside the floor, not
//!   folded into it, so that the floor stays what the issue asks: FP64 and memory bandwidth.
//! * **Which peak**: cuBLAS and cuSOLVER (the `solve` stage) can use the FP64 tensor cores
//!   (DMMA) on sm_80 and later, so that stage is held to the tensor-core rate (whether the
//!   batched potrf and trsm at these sizes do is theirs to choose; a floor takes the faster
//!   rate); the kernels of this crate are scalar `fma` code, held to the vector rate.
//! * **Transfers** (`h2d`, `d2h`): what cannot be avoided if the spots are computed on the
//!   device: the pixels and inverse variances of the union of a batch's windows, once, in f64
//!   (the backend's type); the PSF coefficient tables; and back only the per-bin outputs the
//!   frame keeps. They are held to the achievable rate of pinned memory. Not counted: the
//!   spots' corners, which the host can take from the traces itself
//!   ([`crate::psf::spots::corners`]), and anything a batch uploads or downloads beyond that
//!   (a work unit's whole rectangle rather than its windows, per-pixel intermediates).
//!
//! Sizes come from a [`FrameShape`], built from a real plan, PSF and wavelength grid by
//! [`FrameShape::of_plan`] (exact spot overlaps from the traces), or by hand in tests. The
//! stage names are [`STAGES`](crate::extract::gpu::backend::STAGES), the names the benchmark's measured times are keyed by.
//!
//! Imports the backend's stage names, `patch` and `psf`; no device code.

use rayon::prelude::*;

use crate::patch::{pixels, plan, Patch, PixelWindow, Plan, WaveGrid};
use crate::psf::{Psf, PsfError, SpotSet};

/// Flops charged for an FP64 division: a reciprocal estimate and ~7 FMA-class instructions
/// of Newton refinement and rounding fix-up, two flops each (the peak's unit).
pub const DIV_FLOPS: f64 = 16.0;
/// Flops charged for an FP64 square root (reciprocal square-root estimate and refinement).
pub const SQRT_FLOPS: f64 = 16.0;
/// Flops charged for CUDA's `exp`: range reduction and a degree-11 polynomial, ~16 instructions.
pub const EXP_FLOPS: f64 = 32.0;
/// Flops charged for CUDA's `erf`: a piecewise polynomial or rational form with an `exp` in
/// the tails, ~28 instructions.
pub const ERF_FLOPS: f64 = 56.0;
/// Jacobi sweeps per 74×74 block on the real PSF: 6–9 per block over a bundle, 7–8 typical
/// (`decorrelate::MAX_SWEEPS` docs). Each is counted as a full sweep.
pub const TYPICAL_SWEEPS: f64 = 7.5;

/// Bytes of an f64.
const F64: f64 = 8.0;

/// A card's peak rates, from NVIDIA's datasheets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CardPeak {
    /// Which card.
    pub name: &'static str,
    /// FP64 on the vector units, flop/s (an FMA is 2 flops).
    pub fp64_flops: f64,
    /// FP64 on the tensor cores (DMMA), flop/s.
    pub fp64_tensor_flops: f64,
    /// Device-memory bandwidth, B/s.
    pub mem_bw: f64,
    /// Achievable host↔device bandwidth of pinned memory in one direction, B/s.
    pub pcie_bw: f64,
    /// Shared memory / L1 bandwidth of all SMs together, B/s: 128 B per clock per SM (32
    /// banks of 4 bytes) × SMs × the boost clock at which the datasheet's FP64 rate is quoted.
    pub onchip_bw: f64,
}

impl CardPeak {
    /// H100 SXM5 80 GB HBM3 (NVIDIA H100 Tensor Core GPU datasheet: FP64 34 TFLOPS, FP64
    /// Tensor Core 67 TFLOPS, 3.35 TB/s). PCIe Gen5 x16 is 64 GB/s per direction on paper
    /// (the datasheet's 128 GB/s counts both); ~55 GB/s is typical of pinned copies
    /// (`bandwidthTest`), pageable host memory getting less.
    pub const H100_SXM: CardPeak = CardPeak {
        name: "H100 SXM 80GB HBM3",
        fp64_flops: 34e12,
        fp64_tensor_flops: 67e12,
        mem_bw: 3.35e12,
        pcie_bw: 55e9,
        // 132 SMs at 1.98 GHz (132 × 64 FP64 FMA × 2 × 1.98 GHz = the 34 TFLOPS above).
        onchip_bw: 132.0 * 128.0 * 1.98e9,
    };
    /// H100 PCIe 80 GB HBM2e (same datasheet: 26 / 51 TFLOPS, 2.0 TB/s; PCIe Gen5).
    pub const H100_PCIE: CardPeak = CardPeak {
        name: "H100 PCIe 80GB",
        fp64_flops: 26e12,
        fp64_tensor_flops: 51e12,
        mem_bw: 2.0e12,
        pcie_bw: 55e9,
        // 114 SMs at 1.755 GHz.
        onchip_bw: 114.0 * 128.0 * 1.755e9,
    };
    /// H200 SXM 141 GB HBM3e (NVIDIA H200 datasheet: FP64 34 TFLOPS, FP64 Tensor Core 67
    /// TFLOPS, 4.8 TB/s; PCIe Gen5 as the H100).
    pub const H200: CardPeak = CardPeak {
        name: "H200 SXM 141GB HBM3e",
        fp64_flops: 34e12,
        fp64_tensor_flops: 67e12,
        mem_bw: 4.8e12,
        pcie_bw: 55e9,
        onchip_bw: 132.0 * 128.0 * 1.98e9,
    };
    /// A100 SXM4 80 GB (NVIDIA A100 datasheet: FP64 9.7, FP64 Tensor Core 19.5 TFLOPS,
    /// 2,039 GB/s; PCIe Gen4 x16, 32 GB/s per direction on paper, ~25 GB/s pinned).
    pub const A100_80GB: CardPeak = CardPeak {
        name: "A100 SXM4 80GB",
        fp64_flops: 9.7e12,
        fp64_tensor_flops: 19.5e12,
        mem_bw: 2.039e12,
        pcie_bw: 25e9,
        // 108 SMs at 1.41 GHz.
        onchip_bw: 108.0 * 128.0 * 1.41e9,
    };
    /// A100 40 GB (same datasheet: 1,555 GB/s), the GPUs of Perlmutter's 40 GB nodes.
    pub const A100_40GB: CardPeak = CardPeak {
        name: "A100 40GB",
        fp64_flops: 9.7e12,
        fp64_tensor_flops: 19.5e12,
        mem_bw: 1.555e12,
        pcie_bw: 25e9,
        onchip_bw: 108.0 * 128.0 * 1.41e9,
    };

    /// The card a CUDA device name (`cuDeviceGetName`, e.g. "NVIDIA H100 80GB HBM3") denotes,
    /// or None for a card without figures here (H100/H200 NVL, A100 80GB PCIe, others).
    pub fn from_device_name(name: &str) -> Option<CardPeak> {
        let n = name.to_ascii_lowercase();
        let has = |s: &str| n.contains(s);
        if has("nvl") {
            None
        } else if has("h200") {
            Some(CardPeak::H200)
        } else if has("h100") && has("pcie") {
            Some(CardPeak::H100_PCIE)
        } else if has("h100") && (has("hbm3") || has("sxm")) {
            Some(CardPeak::H100_SXM)
        } else if has("a100") && has("80gb") && !has("pcie") {
            Some(CardPeak::A100_80GB)
        } else if has("a100") && !has("80gb") {
            Some(CardPeak::A100_40GB)
        } else {
            None
        }
    }
}

/// The peak a stage is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// Scalar FP64 (`fma`) code and device memory: this crate's kernels.
    Vector,
    /// FP64 tensor cores and device memory: cuBLAS and cuSOLVER.
    Tensor,
    /// The host↔device link (no flops).
    Pcie,
}

/// The work of one stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageCost {
    /// One of [`STAGES`](crate::extract::gpu::backend::STAGES).
    pub stage: &'static str,
    /// FP64 flops (an FMA is 2).
    pub flops: f64,
    /// Bytes through device memory, or over the link for a transfer.
    pub bytes: f64,
    /// Bytes through shared memory and L1 (0 where not modelled: cuBLAS/cuSOLVER, transfers).
    pub onchip_bytes: f64,
    /// Which peak applies.
    pub pipe: Pipe,
}

impl StageCost {
    fn zero(stage: &'static str, pipe: Pipe) -> StageCost {
        StageCost {
            stage,
            flops: 0.0,
            bytes: 0.0,
            onchip_bytes: 0.0,
            pipe,
        }
    }

    /// Seconds the flops take at the card's peak for this stage's pipe.
    pub fn flop_s(&self, card: &CardPeak) -> f64 {
        match self.pipe {
            Pipe::Vector => self.flops / card.fp64_flops,
            Pipe::Tensor => self.flops / card.fp64_tensor_flops,
            Pipe::Pcie => 0.0,
        }
    }

    /// Seconds the bytes take at the card's bandwidth (device memory, or the link).
    pub fn byte_s(&self, card: &CardPeak) -> f64 {
        match self.pipe {
            Pipe::Pcie => self.bytes / card.pcie_bw,
            _ => self.bytes / card.mem_bw,
        }
    }

    /// The floor: the stage cannot take less than either.
    pub fn floor_s(&self, card: &CardPeak) -> f64 {
        self.flop_s(card).max(self.byte_s(card))
    }

    /// Seconds the on-chip traffic takes at the card's shared-memory/L1 bandwidth.
    pub fn onchip_s(&self, card: &CardPeak) -> f64 {
        self.onchip_bytes / card.onchip_bw
    }

    /// The floor with the on-chip ceiling too: the least time the stage's kernels as written
    /// can take.
    pub fn kernel_floor_s(&self, card: &CardPeak) -> f64 {
        self.floor_s(card).max(self.onchip_s(card))
    }

    /// What sets the floor.
    pub fn bound(&self, card: &CardPeak) -> &'static str {
        match self.pipe {
            Pipe::Pcie => "PCIe",
            _ if self.byte_s(card) > self.flop_s(card) => "bytes",
            Pipe::Vector => "flops (vector)",
            Pipe::Tensor => "flops (tensor)",
        }
    }
}

/// Spot sizes and PSF table sizes (what the spots kernel's work depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpotDims {
    /// Spot rows, `2·hsizey + 1`.
    pub ny: usize,
    /// Spot columns, `2·hsizex + 1`.
    pub nx: usize,
    /// Hermite degree along x.
    pub ghdegx: usize,
    /// Hermite degree along y.
    pub ghdegy: usize,
    /// Legendre coefficients of XTRACE.
    pub ncx: usize,
    /// Of YTRACE.
    pub ncy: usize,
    /// Of each PSF parameter.
    pub ncp: usize,
}

impl SpotDims {
    /// The sizes of `psf`.
    pub fn of(psf: &Psf) -> Result<SpotDims, PsfError> {
        let index = psf.gh_index()?;
        Ok(SpotDims {
            ny: psf.spot_ny(),
            nx: psf.spot_nx(),
            ghdegx: psf.ghdegx,
            ghdegy: psf.ghdegy,
            ncx: psf.xtrace.coeff.ncols(),
            ncy: psf.ytrace.coeff.ncols(),
            ncp: psf.params[index.sigx].series.coeff.ncols(),
        })
    }

    /// Pixels of a spot.
    pub fn pixels(&self) -> usize {
        self.ny * self.nx
    }

    /// Parameter rows the kernel evaluates per spot: GHSIGX, GHSIGY and every GH-i-j.
    pub fn nrow(&self) -> usize {
        2 + (self.ghdegx + 1) * (self.ghdegy + 1)
    }

    /// Doubles of PSF tables per fiber (traces and parameter rows).
    pub fn table_doubles(&self) -> usize {
        self.ncx + self.ncy + self.nrow() * self.ncp
    }
}

/// The sizes of one patch and the spot overlaps inside its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PatchCounts {
    /// Fibers solved for (`Patch::nspecpad`).
    pub nfiber: usize,
    /// First core fiber among them.
    pub core_fiber: usize,
    /// Core fibers.
    pub ncore: usize,
    /// Bins per fiber (`nwavetot`).
    pub nwavetot: usize,
    /// Padding bins on each side of the core.
    pub wavepad: usize,
    /// Core bins kept in the output.
    pub nkeep: usize,
    /// Pixels of the window.
    pub window_pixels: usize,
    /// Σ over unknowns of the pixels of its spot inside the window (the nonzeros of `A`).
    pub spot_pixels: usize,
    /// Σ over ordered pairs of unknowns `(u, v)`, `u = v` included, of the window pixels both
    /// spots cover: the products `normal` sums.
    pub pair_pixels: usize,
    /// Σ over the core fibers' kept bins of their spots' pixels inside the window (what
    /// `chi2_project` sums).
    pub core_pixels: usize,
    /// Distinct window pixels those spots cover (what `chi2_project` reads).
    pub core_cover: usize,
}

impl PatchCounts {
    /// Unknowns.
    pub fn nunknown(&self) -> usize {
        self.nfiber * self.nwavetot
    }

    /// Core bins (`nwavetot − 2·wavepad`).
    pub fn nstep(&self) -> usize {
        self.nwavetot.saturating_sub(2 * self.wavepad)
    }

    /// The counts of `patch` from the corner `(row0, col0)` of each unknown's spot in window
    /// coordinates (fiber-major, `u = f·nwavetot + w`), the window's `(rows, columns)` and the
    /// spot's `(ny, nx)`. Spots are clipped to the window as the kernels clip them.
    pub fn from_corners(
        patch: &Patch,
        corners: &[(i64, i64)],
        window: (usize, usize),
        spot: (usize, usize),
    ) -> PatchCounts {
        assert_eq!(corners.len(), patch.nunknown(), "one corner per unknown");
        let (wny, wnx) = (window.0 as i64, window.1 as i64);
        let (sny, snx) = (spot.0 as i64, spot.1 as i64);
        // Each spot's part inside the window: rows [r0, r1), columns [c0, c1).
        let clip = |&(row0, col0): &(i64, i64)| {
            let (r0, r1) = (row0.max(0), (row0 + sny).min(wny));
            let (c0, c1) = (col0.max(0), (col0 + snx).min(wnx));
            (r0 < r1 && c0 < c1).then_some((r0, r1, c0, c1))
        };
        let mut rects: Vec<(i64, i64, i64, i64)> = corners.iter().filter_map(clip).collect();
        let area = |r: &(i64, i64, i64, i64)| ((r.1 - r.0) * (r.3 - r.2)) as usize;
        let spot_pixels: usize = rects.iter().map(area).sum();
        // Ordered pairs: each unordered pair twice, plus every spot with itself. Sorted by
        // first row, the spots overlapping rect i from below start before it ends.
        rects.sort_unstable();
        let mut cross = 0usize;
        for (i, a) in rects.iter().enumerate() {
            for b in rects[i + 1..].iter().take_while(|b| b.0 < a.1) {
                let rows = a.1.min(b.1) - a.0.max(b.0);
                let cols = a.3.min(b.3) - a.2.max(b.2);
                if rows > 0 && cols > 0 {
                    cross += (rows * cols) as usize;
                }
            }
        }
        let nwt = patch.nwavetot;
        let core0 = patch.core_fiber_offset();
        let mut covered = vec![false; (wny * wnx).max(0) as usize];
        let mut core_pixels = 0usize;
        for c in 0..patch.nspec {
            for j in 0..patch.nwave_keep {
                let u = (core0 + c) * nwt + patch.wavepad + j;
                if let Some(r) = clip(&corners[u]) {
                    core_pixels += area(&r);
                    for row in r.0..r.1 {
                        let at = (row * wnx) as usize;
                        covered[at + r.2 as usize..at + r.3 as usize].fill(true);
                    }
                }
            }
        }
        PatchCounts {
            nfiber: patch.nspecpad,
            core_fiber: core0,
            ncore: patch.nspec,
            nwavetot: nwt,
            wavepad: patch.wavepad,
            nkeep: patch.nwave_keep,
            window_pixels: (wny * wnx).max(0) as usize,
            spot_pixels,
            pair_pixels: spot_pixels + 2 * cross,
            core_pixels,
            core_cover: covered.iter().filter(|&&c| c).count(),
        }
    }

    /// The counts of `patch` read through `window`, its spots' corners taken from `spots`
    /// (only `xc`, `yc` are read: [`crate::psf::spots::corners`] is enough).
    pub fn of(patch: &Patch, window: &PixelWindow, spots: &SpotSet) -> PatchCounts {
        let f0 = patch.specmin - spots.grid.fibermin;
        let mut corners = Vec::with_capacity(patch.nunknown());
        for f in 0..patch.nspecpad {
            for w in 0..patch.nwavetot {
                let i = spots.index(f0 + f, patch.iwave + w);
                corners.push((spots.yc[i] - window.ymin, spots.xc[i] - window.xmin));
            }
        }
        PatchCounts::from_corners(
            patch,
            &corners,
            (window.ny(), window.nx()),
            (spots.ny, spots.nx),
        )
    }
}

/// One batch: the patches the backend gets in one `extract_batch` call (a bundle's patches
/// that lie on the CCD, in the pipeline).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchShape {
    /// The patches.
    pub patches: Vec<PatchCounts>,
    /// Spots the spots kernel evaluates for the batch (its fibers × the padded grid).
    pub spots_evaluated: usize,
    /// Distinct spots the patches use (read by `normal` and `chi2_pixels`).
    pub unique_spots: usize,
    /// Pixels of the union of the patches' windows.
    pub region_pixels: usize,
    /// Fibers whose PSF tables the batch needs.
    pub psf_fibers: usize,
    /// Bins of the padded wavelength grid.
    pub nwave_padded: usize,
}

impl BatchShape {
    /// Size of every patch's matrix in the batch: the largest unknown count.
    pub fn nmax(&self) -> usize {
        self.patches
            .iter()
            .map(PatchCounts::nunknown)
            .max()
            .unwrap_or(0)
    }

    /// Decorrelation blocks: one per core fiber.
    pub fn nblock(&self) -> usize {
        self.patches.iter().map(|p| p.ncore).sum()
    }

    fn max_of(&self, f: impl Fn(&PatchCounts) -> usize) -> usize {
        self.patches.iter().map(f).max().unwrap_or(0)
    }
}

/// The work of a frame: spot and PSF sizes, batches.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameShape {
    /// Spot and PSF table sizes.
    pub spot: SpotDims,
    /// Half-width of the resolution band (`ExtractOptions::ndiag`, the PSF's HSIZEY).
    pub ndiag: usize,
    /// Jacobi sweeps per block, each counted as a full sweep ([`TYPICAL_SWEEPS`]).
    pub jacobi_sweeps: f64,
    /// The batches.
    pub batches: Vec<BatchShape>,
}

impl FrameShape {
    /// Patches in the frame.
    pub fn npatch(&self) -> usize {
        self.batches.iter().map(|b| b.patches.len()).sum()
    }

    /// Decorrelation blocks in the frame.
    pub fn nblock(&self) -> usize {
        self.batches.iter().map(BatchShape::nblock).sum()
    }

    /// The shape of extracting `plan` with `psf` on `grid`, `bundles_per_batch` bundles per
    /// batch as the pipeline groups them (`pipeline::frame`): the spots' corners from the
    /// traces, each patch's window (`pixpad_frac`), patches wholly off the CCD dropped (those
    /// that leave it are extracted whole, their pixels off it masked, and read only the pixels
    /// on it). The plan's
    /// fibers are the PSF's (fiber 0 of the plan is the PSF's first).
    pub fn of_plan(
        psf: &Psf,
        plan: &Plan,
        grid: &WaveGrid,
        pixpad_frac: f64,
        ndiag: usize,
        bundles_per_batch: usize,
    ) -> Result<FrameShape, PsfError> {
        let spot = SpotDims::of(psf)?;
        let mut batches = Vec::new();
        for group in plan.patches.chunks(bundles_per_batch.max(1)) {
            let patches: Vec<Patch> = group.iter().flatten().copied().collect();
            if patches.is_empty() {
                continue;
            }
            let (fmin, nfib) = plan::fiber_span(&patches);
            let set = crate::psf::spots::corners(psf, fmin, nfib, &grid.padded)?;
            let kept: Vec<(Patch, PixelWindow)> = patches
                .iter()
                .map(|p| (*p, pixels::window(p, &set, pixpad_frac)))
                .filter(|(_, w)| w.clip(psf.npix_y, psf.npix_x).is_some())
                .collect();
            if kept.is_empty() {
                continue;
            }
            let counts: Vec<PatchCounts> = kept
                .par_iter()
                .map(|(p, w)| PatchCounts::of(p, w, &set))
                .collect();
            let nwave = grid.padded.len();
            let mut used = vec![false; nfib * nwave];
            for (p, _) in &kept {
                for f in p.specmin - fmin..p.specmin - fmin + p.nspecpad {
                    used[f * nwave + p.iwave..f * nwave + p.iwave + p.nwavetot].fill(true);
                }
            }
            let windows: Vec<PixelWindow> = kept
                .iter()
                .filter_map(|(_, w)| w.clip(psf.npix_y, psf.npix_x))
                .collect();
            batches.push(BatchShape {
                patches: counts,
                spots_evaluated: nfib * nwave,
                unique_spots: used.iter().filter(|&&u| u).count(),
                region_pixels: union_pixels(&windows),
                psf_fibers: nfib,
                nwave_padded: nwave,
            });
        }
        Ok(FrameShape {
            spot,
            ndiag,
            jacobi_sweeps: TYPICAL_SWEEPS,
            batches,
        })
    }
}

/// Pixels of the union of `windows`, row by row.
pub fn union_pixels(windows: &[PixelWindow]) -> usize {
    let (Some(lo), Some(hi)) = (
        windows.iter().map(|w| w.ymin).min(),
        windows.iter().map(|w| w.ymax).max(),
    ) else {
        return 0;
    };
    let mut total = 0usize;
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for row in lo..hi {
        spans.clear();
        spans.extend(
            windows
                .iter()
                .filter(|w| w.ymin <= row && row < w.ymax && w.xmin < w.xmax)
                .map(|w| (w.xmin, w.xmax)),
        );
        spans.sort_unstable();
        let mut end = i64::MIN;
        for &(a, b) in &spans {
            let a = a.max(end);
            if b > a {
                total += (b - a) as usize;
                end = b;
            }
        }
    }
    total
}

/// Flops of a Cholesky factorisation of order `n` (LAPACK's count: `n³/3 + n²/2 + n/6`,
/// which is the integer `n(n+1)(2n+1)/6`).
pub fn potrf_flops(n: usize) -> f64 {
    (n * (n + 1) * (2 * n + 1) / 6) as f64
}

/// Flops of solving with a Cholesky factor of order `n` for `nrhs` right-hand sides (two
/// triangular solves).
pub fn potrs_flops(n: usize, nrhs: usize) -> f64 {
    2.0 * (n * n * nrhs) as f64
}

/// Flops of a triangular solve with an `m × m` triangle for `ncols` columns (`m²·ncols`).
pub fn trsm_flops(m: usize, ncols: usize) -> f64 {
    (m * m * ncols) as f64
}

/// Flops of a product of an `m × k` and a `k × n` matrix: `2·m·n·k`.
pub fn gemm_flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * (m * n * k) as f64
}

/// Elements of a triangle of order `n`, diagonal included.
fn tri(n: usize) -> f64 {
    (n * (n + 1) / 2) as f64
}

/// Flops of `legendre_series` of `n` terms in kernels/spots.cu.
fn legendre_flops(n: usize) -> f64 {
    2.0 * n.min(2) as f64 + n.saturating_sub(2) as f64 * (8.0 + DIV_FLOPS)
}

/// Flops of `edge_gaussians` on `nedge` edges.
fn edge_gaussian_flops(nedge: usize) -> f64 {
    if nedge <= 64 {
        4.0 * EXP_FLOPS + 2.0 * DIV_FLOPS + 20.0 + 2.0 * nedge as f64
    } else {
        nedge as f64 * (EXP_FLOPS + DIV_FLOPS + 5.0)
    }
}

/// FP64 flops of one spot in kernels/spots.cu, phase by phase.
pub fn spot_flops(d: &SpotDims) -> f64 {
    let (nx, ny) = (d.nx as f64, d.ny as f64);
    let (dx, dy) = ((d.ghdegx + 1) as f64, (d.ghdegy + 1) as f64);
    // 1: three reduced wavelengths, the traces and every parameter row.
    let series = 3.0 * (4.0 + DIV_FLOPS)
        + legendre_flops(d.ncx)
        + legendre_flops(d.ncy)
        + d.nrow() as f64 * legendre_flops(d.ncp);
    // 2: the Gaussian at the edges of both axes.
    let gauss = edge_gaussian_flops(d.nx + 1) + edge_gaussian_flops(d.ny + 1);
    // 3: per edge, u, the Hermite recurrence and erf.
    let edge = |deg: f64| 5.0 + DIV_FLOPS + 4.0 * deg + ERF_FLOPS;
    let edges = (nx + 1.0) * edge(dx - 1.0) + (ny + 1.0) * edge(dy - 1.0);
    // 4: pixel integrals (a difference each, the Gaussian's with a halving).
    let integrals = dx * nx + dy * ny + nx + ny;
    // 5, 6: the two small products (FMA-contracted), the clip and the partial sums.
    let products = 2.0 * dx * dy * nx + 2.0 * dy * ny * nx + ny * nx;
    // 7: normalisation, a division per pixel; corners.
    series + gauss + edges + integrals + products + ny * nx * DIV_FLOPS + 10.0
}

/// FP64 flops of one Jacobi sweep of the decorrelation kernel on a block of order `n`: every
/// round's rotations computed and applied to A (the 2×2 blocks of every pair of pairs) and V,
/// and the convergence test over every pair that precedes it.
pub fn jacobi_sweep_flops(n: usize) -> f64 {
    let m = (n + (n & 1)) as f64;
    let h = m / 2.0;
    let test_pair = 2.0 + 2.0 * SQRT_FLOPS;
    // The test, then the tangent, cosine and sine of each pair of a round.
    let rotation = test_pair + 8.0 + 2.0 * SQRT_FLOPS + 3.0 * DIV_FLOPS;
    let round = h * rotation + h * (h - 1.0) / 2.0 * 24.0 + 4.0 * h + 6.0 * m * h;
    m * (m - 1.0) / 2.0 * test_pair + (m - 1.0) * round
}

/// FP64 flops of the decorrelation kernel on one block: the DCT basis change, `sweeps`
/// sweeps, then `Q`, `s`, `R`, the flux.
fn decorrelate_block_flops(n: usize, nrow: usize, nstep: usize, sweeps: f64) -> f64 {
    let (nf, nrf) = (n as f64, nrow as f64);
    let basis = 2.0 * nf * nf * nf + nf * nf * (nf + 1.0);
    let after = nf * (2.0 * SQRT_FLOPS + DIV_FLOPS)
        + nf * nf
        + 2.0 * nrf * nf * nf
        + nrf * nf * (1.0 + DIV_FLOPS)
        + nstep as f64 * (2.0 * nf + 1.0);
    // Each sweep starts with a test; the last test, which finds every pair small, is extra.
    let m = (n + (n & 1)) as f64;
    let last_test = m * (m - 1.0) / 2.0 * (2.0 + 2.0 * SQRT_FLOPS);
    basis + sweeps * jacobi_sweep_flops(n) + last_test + after
}

/// Shared-memory bytes of one spot in kernels/spots.cu: the two small products (the
/// coefficient and the `py` entry are warp-uniform) and the scratch the phases hand on.
pub fn spot_onchip_bytes(d: &SpotDims) -> f64 {
    let (nx, ny) = (d.nx as f64, d.ny as f64);
    let (dx, dy) = ((d.ghdegx + 1) as f64, (d.ghdegy + 1) as f64);
    // 5: px per term, tmp written; 6: tmp per term, the spot written; 7: read back.
    let products = dx * dy * nx + dy * nx + dy * ny * nx + 2.0 * ny * nx;
    // 3, 4: the edge rows written; two read and one written per pixel integral.
    let edges = (nx + 1.0) * dx + (ny + 1.0) * dy + 3.0 * (dx * nx + dy * ny);
    F64 * (products + edges)
}

/// Shared-memory bytes of one Jacobi sweep on a block of order `n` (see [`jacobi_sweep_flops`]
/// for the work): per thread access, the operands a warp shares left out.
pub fn jacobi_sweep_onchip_bytes(n: usize) -> f64 {
    let m = (n + (n & 1)) as f64;
    let h = m / 2.0;
    // The test reads a_pq and a_pp of each pair (a_qq is the warp's).
    let test = m * (m - 1.0) / 2.0 * 16.0;
    // Phase 1: three entries read; c, s, t and p, q (ints) written.
    let rotations = h * (24.0 + 32.0);
    // 2a: per pair of pairs, the first pair's t, p, q, c, s (the second's are the warp's),
    // four entries read and eight written; per rotated pair, t, p, q, three read, four written.
    let blocks = h * (h - 1.0) / 2.0 * (8.0 + 8.0 + 16.0 + 32.0 + 64.0) + h * 72.0;
    // 2b: per row and pair, two entries of V read and written (c, s, p, q are the warp's).
    let v = m * h * 32.0;
    test + (m - 1.0) * (rotations + blocks + v)
}

/// Shared-memory and L1 bytes of the decorrelation kernel on one block.
fn decorrelate_block_onchip(n: usize, nrow: usize, nstep: usize, nd2col: f64, sweeps: f64) -> f64 {
    let (nf, nrf, m) = (n as f64, nrow as f64, (n + (n & 1)) as f64);
    // Load: each entry through L1, then stored.
    let load = 16.0 * m * m;
    // T = A U (A's entry per term; U's is the warp's), stored; UᵀT (U's entry per term), two
    // stores per lower entry; V = U.
    let basis = F64 * (nf * nf * nf + m * m)
        + F64 * (nf * nf * (nf + 1.0) / 2.0 + m * (m + 1.0))
        + 16.0 * m * m;
    // λ, W, Q (W's entry per term), s, R, the flux (Q's row per term), the diagonals.
    let after = 16.0 * nf
        + 16.0 * nf * nf
        + F64 * (nrf * nf * nf + nrf * nf)
        + F64 * nrf * nf
        + 16.0 * nrf * nf
        + F64 * nstep as f64 * nf
        + F64 * nd2col;
    let last_test = m * (m - 1.0) / 2.0 * 16.0;
    load + basis + sweeps * jacobi_sweep_onchip_bytes(n) + last_test + after
}

/// The cost of one batch, stage by stage (in [`STAGES`](crate::extract::gpu::backend::STAGES) order).
pub fn batch_costs(shape: &FrameShape, batch: &BatchShape) -> Vec<StageCost> {
    let d = &shape.spot;
    let npix = d.pixels() as f64;
    let npatch = batch.patches.len() as f64;
    let nmax = batch.nmax();
    let nm = nmax as f64;
    // Per slot of the batch's flattened layout: geometry (int4) and spot offset (i64).
    let slot_bytes = 16.0 + 8.0;
    let spots_bytes = batch.unique_spots as f64 * npix * F64;

    // spots: every spot of the batch's fibers on the padded grid, written once.
    let mut spots = StageCost::zero("spots", Pipe::Vector);
    spots.flops = batch.spots_evaluated as f64 * spot_flops(d);
    spots.bytes = batch.spots_evaluated as f64 * (npix + 4.0) * F64
        + (batch.psf_fibers * d.table_doubles() + batch.nwave_padded) as f64 * F64;
    spots.onchip_bytes = batch.spots_evaluated as f64 * spot_onchip_bytes(d);

    // normal: dense AᵀWA (both triangles, nmax² per patch), AᵀWp, AᵀW1, regularisation.
    let mut normal = StageCost::zero("normal", Pipe::Vector);
    normal.bytes = spots_bytes;
    for p in &batch.patches {
        let n = p.nunknown() as f64;
        normal.flops += 3.0 * p.pair_pixels as f64 + 4.0 * p.spot_pixels as f64 + 4.0 * n;
        normal.bytes += 2.0 * p.window_pixels as f64 * F64
            + n * slot_bytes
            + (nm * nm + 2.0 * nm) * F64
            + 3.0 * n * F64;
        // On chip: per shared pixel su, sv and w (each lane walks its own overlap); per pair
        // visited, v's geometry and offset; spot u staged; AᵀWp's su, w, p.
        normal.onchip_bytes += 24.0 * p.pair_pixels as f64
            + 24.0 * n * n
            + 16.0 * npix * n
            + 24.0 * p.spot_pixels as f64;
    }

    // solve: potrf and potrs at nmax, E, trsm on the trailing triangle, the Gram blocks.
    let mut solve = StageCost::zero("solve", Pipe::Tensor);
    let nw = batch.max_of(|p| p.nwavetot);
    let ncore_max = batch.max_of(|p| p.ncore);
    let ncols_max = batch.max_of(|p| p.ncore * p.nwavetot);
    let slab = (ncols_max * (nmax + 1)) as f64;
    for p in &batch.patches {
        let nwt = p.nwavetot;
        let k0 = p.core_fiber * nwt;
        let m = p.nunknown() - k0;
        let ncols = p.ncore * nwt;
        solve.flops += potrf_flops(nmax) + potrs_flops(nmax, 1) + trsm_flops(m, ncols);
        // x from AᵀWp; memsets of the blocks and of Y; E's unit entries.
        solve.bytes += 2.0 * nm * F64
            + (ncore_max * nw * nw) as f64 * F64
            + slab * F64
            + 2.0 * ncols_max as f64 * F64;
        // potrf reads and writes the lower triangle; potrs reads it and updates x.
        solve.bytes += 3.0 * tri(nmax) * F64 + 2.0 * nm * F64;
        // trsm: the trailing triangle, Y read and written.
        solve.bytes += tri(m) * F64 + 2.0 * (m * ncols) as f64 * F64;
        for c in 0..p.ncore {
            let k = m - c * nwt;
            solve.flops += gemm_flops(nwt, nwt, k);
            solve.bytes += (k * nwt + nwt * nwt) as f64 * F64;
        }
    }

    // decorrelate: one block per core fiber.
    let mut decor = StageCost::zero("decorrelate", Pipe::Vector);
    let nd2 = (2 * shape.ndiag + 1) as f64;
    let ncol = batch.max_of(PatchCounts::nstep) as f64;
    // The DCT basis, once per batch (one block size).
    decor.bytes = (nw * nw) as f64 * F64;
    for p in &batch.patches {
        let n = p.nwavetot;
        let nstep = p.nstep();
        let row_lo = p.wavepad.saturating_sub(shape.ndiag);
        let row_hi = (p.wavepad + nstep + shape.ndiag).min(n);
        let nrow = row_hi.saturating_sub(row_lo);
        let per_block = decorrelate_block_flops(n, nrow, nstep, shape.jacobi_sweeps);
        decor.flops += p.ncore as f64 * per_block;
        // C_ff's lower triangle, x_f, parameters; flux, fluxivar, resolution, status.
        let io = (tri(n) + n as f64 + (2.0 + nd2) * ncol) * F64 + 32.0 + 24.0 + 8.0;
        decor.bytes += p.ncore as f64 * io;
        decor.onchip_bytes += p.ncore as f64
            * decorrelate_block_onchip(n, nrow, nstep, nd2 * ncol, shape.jacobi_sweeps);
    }

    // chi2: chi2_pixels (model gather and χ² per pixel), chi2_project (per core kept bin).
    let mut chi2 = StageCost::zero("chi2", Pipe::Vector);
    let slots = (ncore_max * batch.max_of(|p| p.nkeep)) as f64;
    chi2.bytes = spots_bytes;
    for p in &batch.patches {
        let (wp, n) = (p.window_pixels as f64, p.nunknown() as f64);
        let kept = (p.ncore * p.nkeep) as f64;
        chi2.flops += 2.0 * p.spot_pixels as f64
            + wp * (7.0 + 4.0 * DIV_FLOPS)
            + 6.0 * p.core_pixels as f64
            + kept * DIV_FLOPS;
        // pixels: pix, ivar, x and the layout in; model, chi2, valid out.
        chi2.bytes += 2.0 * wp * F64 + n * (F64 + slot_bytes) + 3.0 * wp * F64;
        // project: ivar, chi2, valid under the core spots, those spots, chi2pix and pixmask.
        chi2.bytes +=
            3.0 * p.core_cover as f64 * F64 + kept * (npix * F64 + slot_bytes) + 2.0 * slots * F64;
        // On chip: the spot value per covering unknown (the candidate's geometry, coefficient
        // and offset are the warp's), pix, ivar and the three stores per pixel; the spot,
        // ivar, χ² and validity per pixel projected. (The staging of a patch's unknowns by
        // each row tile is left out.)
        chi2.onchip_bytes += F64 * p.spot_pixels as f64 + 40.0 * wp + 32.0 * p.core_pixels as f64;
    }

    // Transfers: the batch's pixels and ivar once, PSF tables and grid, patch descriptors;
    // back the kept bins' flux, ivar, resolution, chi2pix, pixmask and the statuses.
    let mut h2d = StageCost::zero("h2d", Pipe::Pcie);
    h2d.bytes = 2.0 * batch.region_pixels as f64 * F64
        + (batch.psf_fibers * d.table_doubles() + batch.nwave_padded) as f64 * F64
        + npatch * 64.0;
    let mut d2h = StageCost::zero("d2h", Pipe::Pcie);
    for p in &batch.patches {
        d2h.bytes += (p.ncore * p.nkeep) as f64 * (4.0 + nd2) * F64 + 4.0 * (1 + p.ncore) as f64;
    }
    vec![h2d, spots, normal, solve, decor, chi2, d2h]
}

/// The cost of a frame: [`batch_costs`] summed over its batches.
pub fn frame_costs(shape: &FrameShape) -> Vec<StageCost> {
    let mut total: Option<Vec<StageCost>> = None;
    for b in &shape.batches {
        let costs = batch_costs(shape, b);
        match total.as_mut() {
            None => total = Some(costs),
            Some(t) => {
                for (t, c) in t.iter_mut().zip(costs) {
                    t.flops += c.flops;
                    t.bytes += c.bytes;
                    t.onchip_bytes += c.onchip_bytes;
                }
            }
        }
    }
    total.unwrap_or_else(|| {
        // No batch: the stages with nothing to do.
        let empty = BatchShape {
            patches: Vec::new(),
            spots_evaluated: 0,
            unique_spots: 0,
            region_pixels: 0,
            psf_fibers: 0,
            nwave_padded: 0,
        };
        batch_costs(shape, &empty)
    })
}

/// A markdown table of `costs` on `card`: `| stage | GFLOP | GB | floor ms | bound | on-chip
/// GB | on-chip ms |`, then `| measured ms | x floor |` when `measured` (seconds per stage,
/// keyed by [`STAGES`](crate::extract::gpu::backend::STAGES) names) is not empty; totals for the device stages and for everything
/// run one after the other; and a last line with the totals when each stage is held to the
/// larger of its floor and its on-chip time ([`StageCost::kernel_floor_s`]).
pub fn render_table(costs: &[StageCost], card: &CardPeak, measured: &[(&str, f64)]) -> String {
    let with = !measured.is_empty();
    let lookup = |stage: &str| measured.iter().find(|(s, _)| *s == stage).map(|m| m.1);
    let ms = |s: f64| format!("{:.2}", s * 1e3);
    let mut out = format!("floor on {}\n\n", card.name);
    out.push_str("| stage | GFLOP | GB | floor ms | bound | on-chip GB | on-chip ms |");
    out.push_str(if with {
        " measured ms | x floor |\n|---|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|---|---|\n"
    });
    // Cells: name, GFLOP, GB, floor, bound, on-chip GB, on-chip ms; then the measurement.
    let mut row = |cells: [String; 7], floor: f64, m: Option<f64>| {
        out.push_str(&format!("| {} |", cells.join(" | ")));
        if with {
            match m {
                Some(s) if floor > 0.0 => out.push_str(&format!(" {} | {:.1} |", ms(s), s / floor)),
                Some(s) => out.push_str(&format!(" {} | – |", ms(s))),
                None => out.push_str(" – | – |"),
            }
        }
        out.push('\n');
    };
    for c in costs {
        let (gflop, onchip_gb, onchip_ms) = match c.pipe {
            Pipe::Pcie => ("–".into(), "–".into(), "–".into()),
            _ if c.onchip_bytes == 0.0 => (format!("{:.1}", c.flops / 1e9), "–".into(), "–".into()),
            _ => (
                format!("{:.1}", c.flops / 1e9),
                format!("{:.2}", c.onchip_bytes / 1e9),
                ms(c.onchip_s(card)),
            ),
        };
        let floor = c.floor_s(card);
        row(
            [
                c.stage.to_string(),
                gflop,
                format!("{:.3}", c.bytes / 1e9),
                ms(floor),
                c.bound(card).to_string(),
                onchip_gb,
                onchip_ms,
            ],
            floor,
            lookup(c.stage),
        );
    }
    let mut lines = Vec::new();
    for (name, all) in [("**device stages**", false), ("**all, in sequence**", true)] {
        let picked: Vec<&StageCost> = costs
            .iter()
            .filter(|c| all || c.pipe != Pipe::Pcie)
            .collect();
        let total = |f: &dyn Fn(&StageCost) -> f64| picked.iter().map(|c| f(c)).sum::<f64>();
        let floor = total(&|c| c.floor_s(card));
        let m = picked.iter().map(|c| lookup(c.stage)).sum::<Option<f64>>();
        row(
            [
                name.to_string(),
                format!("{:.1}", total(&|c| c.flops) / 1e9),
                format!("{:.3}", total(&|c| c.bytes) / 1e9),
                ms(floor),
                "sum".into(),
                format!("{:.2}", total(&|c| c.onchip_bytes) / 1e9),
                ms(total(&|c| c.onchip_s(card))),
            ],
            floor,
            m,
        );
        lines.push(ms(total(&|c| c.kernel_floor_s(card))));
    }
    out.push_str(&format!(
        "\nEach stage held to the larger of its floor and its on-chip time: {} ms (device \
         stages), {} ms (all, in sequence).\n",
        lines[0], lines[1]
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::gpu::backend::STAGES;
    use crate::patch::{PatchOptions, Plan};

    fn patch(nspecpad: usize, core: usize, nspec: usize, nwavetot: usize, wavepad: usize) -> Patch {
        Patch {
            bundle: 0,
            ispec: 10 + core,
            nspec,
            specmin: 10,
            nspecpad,
            iwave: 0,
            nwave_keep: nwavetot - 2 * wavepad,
            nwavetot,
            wavepad,
        }
    }

    fn stage(costs: &[StageCost], name: &str) -> StageCost {
        *costs.iter().find(|c| c.stage == name).unwrap()
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn dense_kernels_counts_by_hand() {
        // potrf: LAPACK's n³/3 + n²/2 + n/6, i.e. 1 at n = 1 (a square root), 8/3 + 2 + 1/3
        // = 5 at n = 2 (two square roots, a division, a multiply-add), n³/3 for large n.
        assert_eq!(potrf_flops(1), 1.0);
        assert_eq!(potrf_flops(2), 5.0);
        assert!(rel(potrf_flops(1000), 1e9 / 3.0) < 2e-3);
        assert_eq!(potrs_flops(3, 1), 18.0);
        assert_eq!(trsm_flops(4, 2), 32.0);
        assert_eq!(gemm_flops(2, 3, 4), 48.0);
        assert_eq!(tri(4), 10.0);
    }

    #[test]
    fn overlaps_of_two_spots_by_hand() {
        // Two unknowns (one fiber, two bins) of 3×4 spots in a 10×10 window, the second one
        // row down and one column right: they share 2×3 pixels.
        let p = patch(1, 0, 1, 2, 0);
        let c = PatchCounts::from_corners(&p, &[(0, 0), (1, 1)], (10, 10), (3, 4));
        assert_eq!(c.window_pixels, 100);
        assert_eq!(c.spot_pixels, 24);
        assert_eq!(c.pair_pixels, 24 + 2 * 6);
        // Both are core kept bins: 24 pixels summed, 12 + 12 - 6 distinct.
        assert_eq!((c.core_pixels, c.core_cover), (24, 18));
        // Clipped by the window: the second spot half out of the bottom (rows 8..11 of 10).
        let c = PatchCounts::from_corners(&p, &[(7, 0), (8, 0)], (10, 10), (3, 4));
        assert_eq!(c.spot_pixels, 12 + 8);
        assert_eq!(c.pair_pixels, 20 + 2 * 8);
        // Far apart: no cross term.
        let c = PatchCounts::from_corners(&p, &[(0, 0), (5, 5)], (10, 10), (3, 4));
        assert_eq!(c.pair_pixels, c.spot_pixels);
    }

    #[test]
    fn union_of_windows_by_hand() {
        let w = |ymin, ymax, xmin, xmax| PixelWindow {
            xmin,
            xmax,
            ymin,
            ymax,
        };
        assert_eq!(union_pixels(&[]), 0);
        assert_eq!(union_pixels(&[w(0, 2, 0, 3)]), 6);
        // Overlapping 2×3 and 2×3 sharing one row and two columns: 6 + 6 - 2.
        assert_eq!(union_pixels(&[w(0, 2, 0, 3), w(1, 3, 1, 4)]), 10);
        // Nested.
        assert_eq!(union_pixels(&[w(0, 4, 0, 4), w(1, 2, 1, 2)]), 16);
    }

    /// A synthetic frame: `nbatch` batches of `npatch` patches of `nfib` fibers × 74 bins,
    /// spots of 11×17 one row apart along the fiber and 7 columns apart across fibers.
    fn synthetic(nbatch: usize, npatch: usize, nfib: usize) -> FrameShape {
        let (nwt, pad) = (74, 12);
        let p = patch(nfib, 1, nfib - 2, nwt, pad);
        let corners: Vec<(i64, i64)> = (0..nfib * nwt)
            .map(|u| (((u % nwt) as i64) - 5, 7 * (u / nwt) as i64))
            .collect();
        let counts = PatchCounts::from_corners(&p, &corners, (80, 7 * nfib + 17), (11, 17));
        let batch = BatchShape {
            patches: vec![counts; npatch],
            spots_evaluated: 25 * 2400,
            unique_spots: 25 * 2400,
            region_pixels: npatch * 80 * (7 * nfib + 17),
            psf_fibers: 25,
            nwave_padded: 2400,
        };
        FrameShape {
            spot: SpotDims {
                ny: 11,
                nx: 17,
                ghdegx: 6,
                ghdegy: 6,
                ncx: 7,
                ncy: 7,
                ncp: 2,
            },
            ndiag: 5,
            jacobi_sweeps: TYPICAL_SWEEPS,
            batches: vec![batch; nbatch],
        }
    }

    #[test]
    fn stages_are_named_and_scale_with_the_frame() {
        let one = frame_costs(&synthetic(1, 10, 7));
        let two = frame_costs(&synthetic(2, 10, 7));
        let names: Vec<&str> = one.iter().map(|c| c.stage).collect();
        assert_eq!(names, STAGES);
        for (a, b) in one.iter().zip(&two) {
            assert!(a.bytes > 0.0, "{} moves no bytes", a.stage);
            assert!(
                a.pipe == Pipe::Pcie || a.flops > 0.0,
                "{} does no flops",
                a.stage
            );
            assert!(rel(b.flops, 2.0 * a.flops) < 1e-12 && rel(b.bytes, 2.0 * a.bytes) < 1e-12);
        }
        // More fibers per patch: more work in every device stage.
        let wide = frame_costs(&synthetic(1, 10, 8));
        let device = ["normal", "solve", "decorrelate", "chi2"];
        for (a, b) in one
            .iter()
            .zip(&wide)
            .filter(|(a, _)| device.contains(&a.stage))
        {
            assert!(b.flops > a.flops && b.bytes > a.bytes, "{}", a.stage);
        }
        // More sweeps: more decorrelation flops, nothing else.
        let mut s = synthetic(1, 10, 7);
        s.jacobi_sweeps += 1.0;
        let more = frame_costs(&s);
        assert!(stage(&more, "decorrelate").flops > stage(&one, "decorrelate").flops);
        assert_eq!(stage(&more, "solve"), stage(&one, "solve"));
        // An empty frame: every stage, nothing to do.
        let none = frame_costs(&FrameShape {
            batches: Vec::new(),
            ..synthetic(1, 1, 7)
        });
        assert_eq!(none.iter().map(|c| c.stage).collect::<Vec<_>>(), STAGES);
        assert!(none.iter().all(|c| c.flops == 0.0 && c.bytes < 1e5));
    }

    #[test]
    fn the_solve_counts_follow_the_calls() {
        // One middle patch of the real size alone: n = 518 = nmax, k0 = 74, m = 444, 370
        // core columns, Gram products of 444, 370, …, 148 rows.
        let s = synthetic(1, 1, 7);
        let solve = stage(&frame_costs(&s), "solve");
        let gram: f64 = (0..5).map(|c| gemm_flops(74, 74, 444 - 74 * c)).sum();
        let want = potrf_flops(518) + potrs_flops(518, 1) + trsm_flops(444, 370) + gram;
        assert!(rel(solve.flops, want) < 1e-12);
        assert_eq!(solve.pipe, Pipe::Tensor);
        // The Jacobi sweep at n = 74 is ~2.7 Mflop (≈ 8·n³ with the rotations' arithmetic).
        let sweep = jacobi_sweep_flops(74);
        assert!((2.0e6..4.0e6).contains(&sweep), "{sweep}");
        // An odd block is padded to even.
        assert_eq!(jacobi_sweep_flops(73), jacobi_sweep_flops(74));
        // The rotations' 2×2 updates move ~5 shared-memory bytes per flop: on an H100, whose
        // SMs move 1 byte per FP64 flop, a sweep is several times longer on chip than in the
        // FP64 units.
        let per_flop = jacobi_sweep_onchip_bytes(74) / jacobi_sweep_flops(74);
        assert!((2.0..10.0).contains(&per_flop), "{per_flop}");
    }

    #[test]
    fn floors_bounds_and_cards() {
        let c = StageCost {
            stage: "solve",
            flops: 67e9,
            bytes: 3.35e9,
            onchip_bytes: 0.0,
            pipe: Pipe::Tensor,
        };
        let h100 = CardPeak::H100_SXM;
        assert!(rel(c.floor_s(&h100), 1e-3) < 1e-12);
        assert_eq!(c.bound(&h100), "flops (tensor)");
        let v = StageCost {
            pipe: Pipe::Vector,
            ..c
        };
        assert!(rel(v.floor_s(&h100), 67.0 / 34.0 * 1e-3) < 1e-12);
        // The H200's bandwidth makes a byte-bound stage faster, not a flop-bound one.
        let b = StageCost { flops: 1e9, ..v };
        assert_eq!(b.bound(&h100), "bytes");
        assert!(b.floor_s(&CardPeak::H200) < b.floor_s(&h100));
        assert_eq!(v.floor_s(&CardPeak::H200), v.floor_s(&h100));
        let t = StageCost {
            stage: "h2d",
            flops: 0.0,
            bytes: 55e9,
            onchip_bytes: 0.0,
            pipe: Pipe::Pcie,
        };
        assert!(rel(t.floor_s(&h100), 1.0) < 1e-12);
        assert_eq!(t.bound(&h100), "PCIe");
        // The on-chip ceiling: 33.4 TB/s on an H100 SXM; it raises kernel_floor_s only.
        let o = StageCost {
            onchip_bytes: 2.0 * h100.onchip_bw * v.floor_s(&h100),
            ..v
        };
        assert!(rel(o.onchip_s(&h100), 2.0 * v.floor_s(&h100)) < 1e-12);
        assert_eq!(o.floor_s(&h100), v.floor_s(&h100));
        assert_eq!(o.kernel_floor_s(&h100), o.onchip_s(&h100));
        assert!(rel(h100.onchip_bw, 33.45e12) < 1e-3);
        let name = |s| CardPeak::from_device_name(s).map(|c| c.name);
        assert_eq!(name("NVIDIA H100 80GB HBM3"), Some(h100.name));
        assert_eq!(name("NVIDIA H100 PCIe"), Some(CardPeak::H100_PCIE.name));
        assert_eq!(name("NVIDIA H200"), Some(CardPeak::H200.name));
        assert_eq!(
            name("NVIDIA A100-SXM4-80GB"),
            Some(CardPeak::A100_80GB.name)
        );
        assert_eq!(
            name("NVIDIA A100-SXM4-40GB"),
            Some(CardPeak::A100_40GB.name)
        );
        assert_eq!(name("NVIDIA H100 NVL"), None);
        assert_eq!(name("NVIDIA GeForce RTX 4090"), None);
    }

    #[test]
    fn the_table_renders_with_and_without_measurements() {
        let costs = frame_costs(&synthetic(2, 10, 7));
        let card = CardPeak::H100_SXM;
        let t = render_table(&costs, &card, &[]);
        assert!(t.contains("| stage | GFLOP | GB | floor ms | bound | on-chip GB | on-chip ms |\n"));
        assert!(t.contains("larger of its floor and its on-chip time"));
        for s in STAGES {
            assert!(t.contains(&format!("| {s} |")), "{s} missing:\n{t}");
        }
        assert!(t.contains("**all, in sequence**"));
        assert!(!t.contains("x floor"));
        let floor = stage(&costs, "decorrelate").floor_s(&card);
        let t = render_table(
            &costs,
            &card,
            &[("decorrelate", 3.0 * floor), ("spots", 1e-3)],
        );
        assert!(t.contains("measured ms | x floor |"));
        let line = t
            .lines()
            .find(|l| l.starts_with("| decorrelate |"))
            .unwrap();
        assert!(line.ends_with(" 3.0 |"), "{line}");
        let line = t.lines().find(|l| l.starts_with("| normal |")).unwrap();
        assert!(line.ends_with("– | – |"), "{line}");
        // Every row has the same number of cells as the header.
        let cells = |l: &str| l.matches('|').count();
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert!(rows.iter().all(|l| cells(l) == cells(rows[0])), "{t}");
    }

    /// Patches whose windows leave the CCD are extracted (their pixels off it masked), so the
    /// frame's shape counts them; only windows wholly off it are dropped.
    #[test]
    fn patches_at_the_ccd_edge_count_and_read_their_part_on_it() {
        use crate::psf::synth::{synthetic_psf, SynthPsfOptions};
        let psf = synthetic_psf(&SynthPsfOptions {
            nfiber: 50,
            ..SynthPsfOptions::default()
        });
        let opts = PatchOptions::default();
        // The synthetic PSF's grid ends lie past the CCD's rows at 5560 Å.
        let grid = WaveGrid::new(5560.0, 6400.0, 0.8, &opts).unwrap();
        let plan = Plan::new(0, 50, grid.wave.len(), psf.nfiber(), &opts);
        let shape =
            FrameShape::of_plan(&psf, &plan, &grid, opts.pixpad_frac, psf.hsizey, 1).unwrap();
        let (mut on, mut edge) = (0, 0);
        let mut region = 0;
        for group in &plan.patches {
            let (fmin, nfib) = crate::patch::plan::fiber_span(group);
            let set = crate::psf::spots::corners(&psf, fmin, nfib, &grid.padded).unwrap();
            let mut windows = Vec::new();
            for p in group {
                let w = pixels::window(p, &set, opts.pixpad_frac);
                match w.clip(psf.npix_y, psf.npix_x) {
                    Some(c) if c == w => on += 1,
                    Some(_) => edge += 1,
                    None => continue,
                }
                windows.push(w.clip(psf.npix_y, psf.npix_x).unwrap());
            }
            region += union_pixels(&windows);
        }
        assert!(edge > 0, "the grid must leave the CCD for this test");
        assert_eq!(shape.npatch(), on + edge);
        let shape_region: usize = shape.batches.iter().map(|b| b.region_pixels).sum();
        assert_eq!(shape_region, region);
    }

    /// The full DESI r frame (500 fibers, 5760–7620 Å by 0.8 Å: 2326 bins, 4700 patches)
    /// with the real PSF on an H100 SXM: the table of BENCHMARKS.md (`cargo test --lib
    /// full_r_frame_floor -- --nocapture`). Skips when ../shared is missing.
    #[test]
    fn full_r_frame_floor_on_an_h100() {
        let Some(path) = crate::io::shared_data("psf-r0-00067784.fits") else {
            return;
        };
        let psf = crate::io::psf::read_psf(&path).unwrap();
        let opts = PatchOptions::default();
        let grid = WaveGrid::new(5760.0, 7620.0, 0.8, &opts).unwrap();
        let plan = Plan::new(0, 500, grid.wave.len(), psf.nfiber(), &opts);
        let shape =
            FrameShape::of_plan(&psf, &plan, &grid, opts.pixpad_frac, psf.hsizey, 1).unwrap();
        assert_eq!(plan.npatch(), 4700);
        assert_eq!(shape.batches.len(), 20);
        let d = &shape.spot;
        let mid = shape.batches[0]
            .patches
            .iter()
            .find(|p| p.nfiber == 7)
            .unwrap();
        println!(
            "spots {}×{} (Hermite {}×{}, Legendre {}/{}/{}); {} patches ({} dropped off the \
             CCD), {} blocks; nmax {}; middle patch: {} unknowns, window {} px, {} spot px, \
             {:.0} overlap px per unknown",
            d.ny,
            d.nx,
            d.ghdegx,
            d.ghdegy,
            d.ncx,
            d.ncy,
            d.ncp,
            shape.npatch(),
            plan.npatch() - shape.npatch(),
            shape.nblock(),
            shape.batches[0].nmax(),
            mid.nunknown(),
            mid.window_pixels,
            mid.spot_pixels,
            mid.pair_pixels as f64 / mid.nunknown() as f64
        );
        let region: usize = shape.batches.iter().map(|b| b.region_pixels).sum();
        let windows: usize = shape
            .batches
            .iter()
            .flat_map(|b| &b.patches)
            .map(|p| p.window_pixels)
            .sum();
        let unique: usize = shape.batches.iter().map(|b| b.unique_spots).sum();
        println!(
            "pixels: union of windows {region}, windows summed {windows} ({:.2}x); spots used \
             {unique} of {} evaluated",
            windows as f64 / region as f64,
            shape
                .batches
                .iter()
                .map(|b| b.spots_evaluated)
                .sum::<usize>()
        );
        let costs = frame_costs(&shape);
        println!("{}", render_table(&costs, &CardPeak::H100_SXM, &[]));
        for card in [CardPeak::H200, CardPeak::A100_40GB] {
            let sum = |f: &dyn Fn(&StageCost) -> f64| costs.iter().map(f).sum::<f64>();
            println!(
                "{}: floor {:.1} ms, with the on-chip ceiling {:.1} ms (all, in sequence)",
                card.name,
                sum(&|c| c.floor_s(&card)) * 1e3,
                sum(&|c| c.kernel_floor_s(&card)) * 1e3
            );
        }
        let total: f64 = costs.iter().map(|c| c.floor_s(&CardPeak::H100_SXM)).sum();
        assert!(total > 1e-3 && total < 1.0, "floor {total} s per frame");
    }
}
