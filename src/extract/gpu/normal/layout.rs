//! [`BatchLayout`]: a batch of patches flattened into the kernels' input arrays on the host,
//! indexing a work unit's resident pixels and spots where it can. Imports the parent's errors
//! and `resident`, `gpu::launch`, and the crate's `extract` and `psf` types.

use std::collections::HashMap;

use super::bad;
use super::resident::{place_in, Resident};
use crate::extract::gpu::launch;
use crate::extract::gpu::GpuError;
use crate::extract::{HeldPixels, PatchInput};

/// A batch flattened into the kernels' input arrays (host-side; uploaded by
/// [`UploadedLayout::upload`](super::UploadedLayout::upload)).
///
/// Per patch `b`: `patch[4b..4b+4] = {n, window ny, window nx, ld}` (an `int4` on the device),
/// `win_off[b]`, the offset of the window's first pixel in `pix` and `ivar`, whose rows are `ld`
/// apart, and `scr_off[b]`, the offset of its pixels in the per-pixel scratch arrays of the
/// chi2 stage (windows concatenated, each row-major and contiguous).
/// Per unknown slot `b·nmax + u` (fiber-major `u`; slots `u ≥ n` are padding and hold zeros):
/// `spot_off`, the offset of its spot (`ny·nx` row-major values) in `spots`, and `geom[4·slot..]
/// = {row0, col0, iy0, iy1}` as in `cpu::normal::SpotGeom`.
///
/// `pix`/`ivar` and `spots` are either the batch's own copies (the windows concatenated, `ld`
/// = window width; the spots it uses, each once) or empty, when the layout indexes arrays
/// already on the device ([`Resident`]): a work unit's pixels uploaded once for all its
/// patches, a spot set evaluated on the device. Then `win_off` and `spot_off` are offsets
/// into those arrays.
#[derive(Debug, Clone)]
pub struct BatchLayout {
    /// Patches in the batch.
    pub npatch: usize,
    /// The largest unknown count: every patch's matrix is `nmax × nmax`.
    pub nmax: usize,
    /// Spot rows (the same for every patch of a batch).
    pub ny: usize,
    /// Spot columns.
    pub nx: usize,
    /// `{n, window ny, window nx, ld}` per patch.
    pub patch: Vec<i32>,
    /// Offset of each patch's window in `pix` and `ivar`.
    pub win_off: Vec<i64>,
    /// Offset of each patch's window in the per-pixel scratch arrays.
    pub scr_off: Vec<i64>,
    /// Window pixels of the batch: the scratch arrays' length.
    pub npix: usize,
    /// The windows' image values, concatenated (empty when the pixels are resident).
    pub pix: Vec<f64>,
    /// The windows' inverse variances, concatenated (likewise).
    pub ivar: Vec<f64>,
    /// Every distinct spot the batch uses, once (empty when the spots are resident).
    pub spots: Vec<f64>,
    /// Elements `pix` and `ivar` must hold on the device: every window ends before it.
    pub pix_len: usize,
    /// Elements the spot array must hold on the device.
    pub spots_len: usize,
    /// Whether `win_off` indexes the resident pixels rather than `pix`.
    pub pixels_resident: bool,
    /// Which resident pixels, when it does.
    pub pixels_held: Option<HeldPixels>,
    /// Whether `spot_off` indexes the resident spot set rather than `spots`.
    pub spots_resident: bool,
    /// Offset in `spots` of each unknown's spot, `[npatch·nmax]`.
    pub spot_off: Vec<i64>,
    /// `{row0, col0, iy0, iy1}` per unknown, `[npatch·nmax·4]`.
    pub geom: Vec<i32>,
}

impl BatchLayout {
    /// Flattens `batch` with its own copies of the windows and spots.
    pub fn new(batch: &[PatchInput<'_>]) -> Result<BatchLayout, GpuError> {
        Self::with_resident(batch, &Resident::default())
    }

    /// Flattens `batch`, indexing the resident pixels when every patch's window lies in them
    /// ([`PatchInput::loaded`]) and the resident spots when every patch's set is that one;
    /// otherwise the batch carries its own copies. A window in another load is refused
    /// ([`GpuError::PixelsElsewhere`]). Fails on what the kernels cannot index: an empty batch, spots of
    /// different sizes, a spot column outside its window, sizes beyond `i32`, or spots whose
    /// values are held elsewhere than in the resident set ([`GpuError::SpotsElsewhere`]).
    pub fn with_resident(
        batch: &[PatchInput<'_>],
        resident: &Resident,
    ) -> Result<BatchLayout, GpuError> {
        let first = batch
            .first()
            .ok_or_else(|| bad("the batch is empty".into()))?;
        let (ny, nx) = (first.spots.ny, first.spots.nx);
        let nmax = batch.iter().map(|i| i.patch.nunknown()).max().unwrap_or(0);
        if nmax == 0 || ny == 0 || nx == 0 {
            return Err(bad(format!(
                "no unknowns or empty spots (nmax {nmax}, spots {ny}×{nx})"
            )));
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        if !fits(nmax) || !fits(ny * nx) {
            return Err(bad(format!(
                "{nmax} unknowns or {ny}×{nx} spots overflow i32"
            )));
        }
        let npatch = batch.len();
        let nps = ny * nx;
        // Resident pixels: every window must lie in them, else the batch copies all.
        let places = batch
            .iter()
            .map(|inp| place_in(resident.pixels, inp))
            .collect::<Result<Vec<_>, _>>()?;
        let pix_offsets: Option<Vec<usize>> = resident.pixels.and_then(|h| {
            places
                .iter()
                .map(|p| p.map(|(row, col)| row * h.cols + col))
                .collect()
        });
        let spots_resident = resident
            .spots
            .is_some_and(|r| batch.iter().all(|inp| r.holds(inp.spots)));
        if !spots_resident {
            if let Some(set) = batch.iter().find_map(|inp| inp.spots.held()) {
                return Err(GpuError::SpotsElsewhere {
                    set,
                    here: resident.spots.map(|r| r.held),
                });
            }
        }
        let mut out = BatchLayout {
            npatch,
            nmax,
            ny,
            nx,
            patch: Vec::with_capacity(4 * npatch),
            win_off: Vec::with_capacity(npatch),
            scr_off: Vec::with_capacity(npatch),
            npix: 0,
            pix: Vec::new(),
            ivar: Vec::new(),
            spots: Vec::new(),
            pix_len: 0,
            spots_len: 0,
            pixels_resident: pix_offsets.is_some(),
            pixels_held: resident.pixels.filter(|_| pix_offsets.is_some()),
            spots_resident,
            spot_off: vec![0; npatch * nmax],
            geom: vec![0; 4 * npatch * nmax],
        };
        // A batch may span bundles (several spot sets) and neighbouring patches share spots
        // (the wavelength padding overlaps), so each spot is stored once, keyed by its set and
        // its index there.
        let mut seen: HashMap<(usize, usize), i64> = HashMap::new();
        for (b, inp) in batch.iter().enumerate() {
            inp.check().map_err(|e| bad(e.to_string()))?;
            let s = inp.spots;
            if (s.ny, s.nx) != (ny, nx) {
                return Err(bad(format!(
                    "spots of {}×{} and {ny}×{nx} in one batch",
                    s.ny, s.nx
                )));
            }
            let (wny, wnx) = (inp.window.ny(), inp.window.nx());
            if !fits(wny) || !fits(wnx) {
                return Err(bad(format!("a {wny}×{wnx} window overflows i32")));
            }
            let ld = match (&pix_offsets, &resident.pixels) {
                (Some(offs), Some(h)) => {
                    out.win_off.push(offs[b] as i64);
                    h.cols
                }
                _ => {
                    out.win_off.push(out.pix.len() as i64);
                    // `iter` walks a view in logical row-major order, whatever its strides (a
                    // window is a slice of the CCD), which is the contiguous layout indexed.
                    out.pix.extend(inp.pix.iter());
                    out.ivar.extend(inp.ivar.iter());
                    wnx
                }
            };
            if !fits(ld) {
                return Err(bad(format!("a row stride of {ld} overflows i32")));
            }
            let p = &inp.patch;
            for v in [p.nunknown(), wny, wnx, ld] {
                out.patch.push(launch::int(v, "a patch's size")?);
            }
            out.scr_off.push(out.npix as i64);
            out.npix += wny * wnx;
            let set = s as *const crate::psf::SpotSet as usize;
            let f0 = p.specmin - s.grid.fibermin;
            let (sny, snx, nyw) = (ny as i64, nx as i64, wny as i64);
            for f in 0..p.nspecpad {
                for w in 0..p.nwavetot {
                    let u = f * p.nwavetot + w;
                    let i = s.index(f0 + f, p.iwave + w);
                    let row0 = s.yc[i] - inp.window.ymin;
                    let col0 = s.xc[i] - inp.window.xmin;
                    // The window spans every spot's columns (pixels::window), which is what
                    // lets the kernel skip column bounds; a window cut otherwise is refused.
                    if col0 < 0 || col0 + snx > wnx as i64 {
                        return Err(bad(format!(
                            "patch {b}: spot {u} spans columns {col0}..{} of a {wnx}-column \
                             window",
                            col0 + snx
                        )));
                    }
                    // Rows are compared as `row0 + iy` in i32 in the kernel.
                    if row0.abs() > (i32::MAX / 2) as i64 {
                        return Err(bad(format!("patch {b}: spot {u} at window row {row0}")));
                    }
                    let iy0 = (-row0).clamp(0, sny);
                    let iy1 = (nyw - row0).clamp(0, sny);
                    let slot = b * nmax + u;
                    let int = |v: i64| {
                        i32::try_from(v)
                            .map_err(|_| bad(format!("patch {b}: spot {u} at {v} overflows i32")))
                    };
                    out.geom[4 * slot..4 * slot + 4].copy_from_slice(&[
                        int(row0)?,
                        int(col0)?,
                        int(iy0)?,
                        int(iy1)?,
                    ]);
                    out.spot_off[slot] = if spots_resident {
                        (i * nps) as i64
                    } else {
                        *seen.entry((set, i)).or_insert_with(|| {
                            let off = out.spots.len() as i64;
                            out.spots
                                .extend_from_slice(&s.values()[i * nps..(i + 1) * nps]);
                            off
                        })
                    };
                }
            }
        }
        out.pix_len = match &resident.pixels {
            Some(r) if out.pixels_resident => r.len(),
            _ => out.pix.len(),
        };
        out.spots_len = match resident.spots {
            Some(r) if spots_resident => r.len,
            _ => out.spots.len(),
        };
        Ok(out)
    }

    /// Unknowns of patch `b`.
    pub fn n(&self, b: usize) -> usize {
        self.patch[4 * b] as usize
    }
}
