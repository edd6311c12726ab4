//! The cuda-aware-mpi build's path for a GPU compute rank: a unit's pixels arrive by MPI in
//! device memory and stay there, and its results leave from device memory to the writer.
//!
//! The frame code cuts a batch's windows out of host views of the unit's pixels; here no host
//! array holds them. A [`StandIn`] reserves an address range of the pixels' size without
//! memory behind it (an inaccessible mapping: a read through it faults instead of returning
//! stale numbers), whose views the frame code slices into windows as usual. The backend adopts
//! the device copy and answers its load token, which the unit's region carries instead of
//! being loaded, so that every patch names where its window lies in that copy. A patch the CPU
//! must retry gets its window from a host copy the backend downloads then, once per unit.
//!
//! Imports `extract::gpu` (backend, unit arrays) and the pipeline's `unit`, `frame` and `comm`.

use ndarray::{Array2, Array3, ArrayView2};

use super::comm::{Msg, Part, Parts};
use super::frame::FrameResult;
use super::unit::{self, UnitInput, UnitOutput};
use crate::extract::gpu::backend::GpuBackend;
use crate::extract::gpu::normal::DevicePixels;
use crate::extract::gpu::unit::{DeviceUnit, UnitShape};

/// Why a unit's pixels or results could not take the device path, naming the unit (its frame,
/// and the rank it came from on the writer's side).
#[derive(Debug, thiserror::Error)]
pub enum DevicePathError {
    /// No address range for a unit's pixels.
    #[error("{0}")]
    Reserve(String),
    /// What arrived does not fit the unit.
    #[error("{unit}: {why}")]
    Unit {
        /// The unit, its frame (and sender).
        unit: String,
        /// What does not fit.
        why: String,
    },
}

/// An address range standing for a unit's image and ivar (`rows × cols` f64 each, one after
/// the other), with no memory behind it.
#[derive(Debug)]
pub struct StandIn {
    base: *mut libc::c_void,
    bytes: usize,
    rows: usize,
    cols: usize,
}

// SAFETY: the mapping is never read or written through (see `views`), so sharing its address
// between threads shares nothing.
unsafe impl Send for StandIn {}

impl StandIn {
    /// Reserves the range for `rows × cols` pixels.
    pub fn reserve(rows: usize, cols: usize) -> Result<StandIn, DevicePathError> {
        let n = rows
            .checked_mul(cols)
            .filter(|&n| n > 0)
            .ok_or_else(|| DevicePathError::Reserve(format!("a unit of {rows} × {cols} pixels")))?;
        let bytes = 2 * n * std::mem::size_of::<f64>();
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; PROT_NONE and MAP_NORESERVE make it address space only.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DevicePathError::Reserve(format!(
                "reserving {bytes} bytes of address space for a unit's pixels: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(StandIn {
            base,
            bytes,
            rows,
            cols,
        })
    }

    /// The image and ivar views that stand for the device's pixels: their shapes only are ever
    /// used (slicing into windows), never values.
    pub fn views(&self) -> (ArrayView2<'_, f64>, ArrayView2<'_, f64>) {
        let n = self.rows * self.cols;
        let pix = self.base as *const f64;
        // SAFETY: both views lie inside the mapping (2·n values from `base`, page-aligned so
        // f64-aligned), which lives as long as `self`. Nothing reads through them: the GPU
        // backend takes adopted pixels from the device and the CPU's windows from a
        // downloaded copy (`GpuBackend::adopt_pixels`); a read would fault, not mislead.
        unsafe {
            (
                ArrayView2::from_shape_ptr((self.rows, self.cols), pix),
                ArrayView2::from_shape_ptr((self.rows, self.cols), pix.add(n)),
            )
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // SAFETY: `base` and `bytes` are the mapping `reserve` made, unmapped once.
        unsafe {
            libc::munmap(self.base, self.bytes);
        }
    }
}

/// A unit's pixels on the device, with their stand-in.
pub struct LandedPixels {
    /// The address range the views come from.
    pub stand_in: StandIn,
    /// The device copy, under its load token.
    pub pixels: DevicePixels,
}

/// Reader side: the unit without its pixels, their shape, and the pixels as two parts.
pub fn strip_pixels(mut u: UnitInput) -> (UnitInput, [usize; 2], Parts) {
    let dims = [u.pix.nrows(), u.pix.ncols()];
    let take = |a: &mut Array2<f64>| {
        std::mem::replace(a, Array2::zeros((0, 0)))
            .into_raw_vec_and_offset()
            .0
    };
    let (pix, ivar) = (take(&mut u.pix), take(&mut u.ivar));
    (u, dims, Parts::of(vec![Part::Host(pix), Part::Host(ivar)]))
}

/// Compute side: the two parts received into device memory, as pixels the backend adopts.
pub fn land(
    job: &UnitInput,
    dims: [usize; 2],
    parts: Parts,
) -> Result<LandedPixels, DevicePathError> {
    let unit_error = |why: String| DevicePathError::Unit {
        unit: format!("unit {} of frame {}", job.unit, job.job),
        why,
    };
    let n = dims[0] * dims[1];
    let mut data = parts.data.into_iter();
    let (Some(Part::Device(pix)), Some(Part::Device(ivar)), None) =
        (data.next(), data.next(), data.next())
    else {
        return Err(unit_error(
            "its pixels did not arrive as two device arrays".into(),
        ));
    };
    if pix.len() != n || ivar.len() != n {
        return Err(unit_error(format!(
            "pixels of {} and {} values for a {} × {} rectangle",
            pix.len(),
            ivar.len(),
            dims[0],
            dims[1]
        )));
    }
    let pixels = DevicePixels::adopt(pix, ivar, dims[0], dims[1])
        .ok_or_else(|| unit_error("an empty rectangle".into()))?;
    let stand_in = StandIn::reserve(dims[0], dims[1])?;
    Ok(LandedPixels { stand_in, pixels })
}

/// Extracts a unit whose pixels are on the device. The results stay there (unless the model
/// image is asked for: that is a host array, and the unit then comes back as usual).
pub fn compute(
    job: &UnitInput,
    landed: LandedPixels,
    gpu: &mut GpuBackend,
) -> (Result<FrameResult, String>, Option<DeviceUnit>) {
    let LandedPixels { stand_in, pixels } = landed;
    let load = gpu.adopt_pixels(pixels);
    let keep_on_device = job.setup.opts.model_image.is_none();
    if keep_on_device {
        let (specmin, nspec) = job.fibers();
        let shape = UnitShape {
            specmin,
            nspec,
            nwave: job.setup.grid.wave.len(),
            nd2: 2 * job.setup.opts.ndiag + 1,
        };
        if let Err(e) = gpu.begin_unit(shape) {
            return (Err(e.to_string()), None);
        }
    }
    let (pix, ivar) = stand_in.views();
    let result = unit::compute_on(job, pix, ivar, Some(load), gpu, None).map_err(|e| e.to_string());
    let arrays = match gpu.take_unit() {
        Ok(a) => a,
        Err(e) => return (Err(e.to_string()), None),
    };
    match (result, arrays) {
        (Ok(mut fr), Some(arrays)) => {
            // The numbers travel as parts; the host's arrays of the frame code hold nothing.
            fr.flux = Array2::zeros((0, 0));
            fr.ivar = Array2::zeros((0, 0));
            fr.chi2pix = Array2::zeros((0, 0));
            fr.pixmask_fraction = Array2::zeros((0, 0));
            fr.resolution = Array3::zeros((0, 0, 0));
            (Ok(fr), Some(arrays))
        }
        (r, _) => (r, None),
    }
}

/// Compute side: the message that takes a computed unit to its writer, its numbers as
/// device parts when they stayed there.
pub fn output_msg(out: UnitOutput, arrays: Option<DeviceUnit>) -> Msg {
    match arrays {
        Some(a) => {
            let shape = a.shape;
            let parts = vec![a.flux, a.ivar, a.resolution, a.chi2pix, a.pixmask];
            Msg::OutputParts(
                Box::new(out),
                shape,
                Parts::of(parts.into_iter().map(Part::Device).collect()),
            )
        }
        None => Msg::Output(Box::new(out)),
    }
}

/// Writer side: the unit's output with the five parts (received into host memory) put back
/// into its arrays, checked against the shape the header states.
pub fn output_from_parts(
    mut out: UnitOutput,
    shape: UnitShape,
    parts: Parts,
    from: usize,
) -> Result<UnitOutput, DevicePathError> {
    let what = format!("unit {} of frame {} from rank {from}", out.unit, out.job);
    let unit_error = |why: String| DevicePathError::Unit {
        unit: what.clone(),
        why,
    };
    let lens = shape.part_lens();
    let mut host = Vec::with_capacity(5);
    for (i, p) in parts.data.into_iter().enumerate() {
        match p {
            Part::Host(v) if i < 5 && v.len() == lens[i] => host.push(v),
            p => {
                return Err(unit_error(format!(
                    "part {i} holds {p:?}, the unit's {shape:?} needs {} values in host memory",
                    lens.get(i).copied().unwrap_or(0)
                )))
            }
        }
    }
    let Ok([flux, ivar, resolution, chi2pix, pixmask]) = <[Vec<f64>; 5]>::try_from(host) else {
        return Err(unit_error(
            "fewer than the five parts of a unit's results".into(),
        ));
    };
    let fr = match out.result.as_mut() {
        Ok(fr) => fr,
        Err(_) => return Ok(out),
    };
    if fr.specmin != shape.specmin || fr.nodata.dim() != (shape.nspec, shape.nwave) {
        return Err(unit_error(format!(
            "results for fibers from {} ({:?} bins) sent as {shape:?}",
            fr.specmin,
            fr.nodata.dim()
        )));
    }
    let grid = (shape.nspec, shape.nwave);
    let arr = |v: Vec<f64>| Array2::from_shape_vec(grid, v).map_err(|e| unit_error(e.to_string()));
    fr.flux = arr(flux)?;
    fr.ivar = arr(ivar)?;
    fr.chi2pix = arr(chi2pix)?;
    fr.pixmask_fraction = arr(pixmask)?;
    fr.resolution = Array3::from_shape_vec((shape.nspec, shape.nd2, shape.nwave), resolution)
        .map_err(|e| unit_error(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::frame::FrameStats;

    #[test]
    fn a_stand_in_gives_views_of_the_units_shape() {
        let s = StandIn::reserve(30, 40).unwrap();
        let (p, v) = s.views();
        assert_eq!((p.dim(), v.dim()), ((30, 40), (30, 40)));
        let shape =
            crate::extract::gpu::normal::loadable(p, v).expect("contiguous views of one shape");
        assert_eq!((shape.0 * shape.1, shape.1), (1200, 40));
        assert!(StandIn::reserve(0, 5).is_err());
    }

    fn frame(nspec: usize, nwave: usize, nd2: usize) -> FrameResult {
        let f = |k: usize| {
            Array2::from_shape_fn((nspec, nwave), |(i, j)| (k * 1000 + i * nwave + j) as f64)
        };
        FrameResult {
            specmin: 20,
            wave: (0..nwave).map(|w| 5000.0 + w as f64).collect(),
            flux: f(1),
            ivar: f(2),
            resolution: Array3::from_shape_fn((nspec, nd2, nwave), |(i, d, j)| {
                (i * 100 + d * 10 + j) as f64 * 0.5
            }),
            chi2pix: f(3),
            pixmask_fraction: f(4),
            nodata: Array2::from_elem((nspec, nwave), false),
            model: None,
            leverage: None,
            stats: FrameStats::default(),
        }
    }

    /// The five arrays as the device keeps them (`unit.cu`'s layout), received on the host.
    fn parts_of(fr: &FrameResult) -> Parts {
        let v = |a: &Array2<f64>| Part::Host(a.iter().copied().collect());
        Parts::of(vec![
            v(&fr.flux),
            v(&fr.ivar),
            Part::Host(fr.resolution.iter().copied().collect()),
            v(&fr.chi2pix),
            v(&fr.pixmask_fraction),
        ])
    }

    #[test]
    fn results_received_as_parts_rebuild_the_unit_and_mismatches_are_named() {
        let full = frame(3, 7, 5);
        let shape = UnitShape {
            specmin: 20,
            nspec: 3,
            nwave: 7,
            nd2: 5,
        };
        let mut stripped = full.clone();
        stripped.flux = Array2::zeros((0, 0));
        stripped.resolution = Array3::zeros((0, 0, 0));
        let out = |r: FrameResult| UnitOutput {
            job: 2,
            unit: 1,
            result: Ok(r),
        };
        let got = output_from_parts(out(stripped.clone()), shape, parts_of(&full), 4).unwrap();
        let fr = got.result.unwrap();
        assert_eq!(fr.flux, full.flux);
        assert_eq!(fr.ivar, full.ivar);
        assert_eq!(fr.resolution, full.resolution);
        assert_eq!(fr.chi2pix, full.chi2pix);
        assert_eq!(fr.pixmask_fraction, full.pixmask_fraction);

        let mut short = parts_of(&full);
        if let Part::Host(v) = &mut short.data[2] {
            v.pop();
        }
        let e = output_from_parts(out(stripped.clone()), shape, short, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 4") && e.contains("part 2") && e.contains("105"),
            "{e}"
        );
        let wrong = UnitShape { nspec: 2, ..shape };
        let e = output_from_parts(out(stripped), wrong, parts_of(&frame(2, 7, 5)), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fibers from 20"), "{e}");
    }

    #[test]
    fn the_reader_strips_a_units_pixels_into_two_parts() {
        let toy = crate::pipeline::frame::tests::ToyFrame::new();
        let u = unit::tests::toy_unit(&toy, 0, unit::UnitPass::Final, 0..1);
        assert_eq!(u.fibers(), (0, 5));
        let (pix, ivar) = (u.pix.clone(), u.ivar.clone());
        let (bare, dims, parts) = strip_pixels(u);
        assert_eq!(dims, [pix.nrows(), pix.ncols()]);
        assert_eq!(bare.pixel_bytes(), 0);
        assert_eq!(parts.lens, vec![pix.len(), ivar.len()]);
        match (&parts.data[0], &parts.data[1]) {
            (Part::Host(a), Part::Host(b)) => {
                assert_eq!(a, &pix.iter().copied().collect::<Vec<_>>());
                assert_eq!(b, &ivar.iter().copied().collect::<Vec<_>>());
            }
            other => panic!("{other:?}"),
        }
    }
}
