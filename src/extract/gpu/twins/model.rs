//! Host twin of `model_image` (kernels/chi2.cu): each patch's part of the model image and the
//! pixels' leverage on it, with the kernel's per-thread algorithm, indexing and roundings. The
//! image is tested bit for bit against the CPU backend (for the CPU's own solution), the
//! leverage against it to rounding (from exact covariance columns), and in `emu` the CUDA
//! source against this twin. Test-only; imports the product's `model`, `chi2` and `normal`
//! layouts and `twins::chi2`'s staging.

pub(super) use super::super::model::*;
use super::chi2::{geom_of, twin_stage, Chi2Layout, TILE_ROWS};
use super::normal::BatchLayout;

/// The covariance columns on the host, as [`Columns`] lays them out on the device.
#[derive(Clone, Copy)]
pub struct HostColumns<'a> {
    pub z: &'a [f64],
    pub off: &'a [i64],
    pub ld: usize,
}

/// Host twin of `model_image` over every block: the image, and the leverage when `columns`
/// are given. Outputs start as NaN, so that a pixel the algorithm fails to write shows up.
pub fn twin(
    layout: &BatchLayout,
    dims: &Chi2Layout,
    x: &[f64],
    columns: Option<HostColumns<'_>>,
) -> ModelBatch<Vec<f64>> {
    let l = layout;
    assert_eq!(x.len(), l.npatch * l.nmax, "x is [npatch·nmax]");
    let mut out = ModelBatch {
        image: vec![f64::NAN; dims.npix],
        leverage: columns.map(|_| vec![f64::NAN; dims.npix]),
    };
    for b in 0..l.npatch {
        for tile in 0..dims.tiles() {
            twin_block(l, dims, b, tile, x, columns, &mut out);
        }
    }
    out
}

/// Block `(tile, b)` of `model_image`.
fn twin_block(
    l: &BatchLayout,
    dims: &Chi2Layout,
    b: usize,
    tile: usize,
    x: &[f64],
    columns: Option<HostColumns<'_>>,
    out: &mut ModelBatch<Vec<f64>>,
) {
    let (wny, wnx) = (l.patch[4 * b + 1] as i64, l.patch[4 * b + 2] as i64);
    let r0 = (tile * TILE_ROWS) as i64;
    if r0 >= wny {
        return;
    }
    let r1 = (r0 + TILE_ROWS as i64).min(wny);
    let d = dims.dims(b);
    let base = b * l.nmax;
    let span = twin_stage(l, base, d, (0, d.nsp), (0, d.nwt), r0, r1);
    let (off, soff) = (l.win_off[b], l.scr_off[b]);
    let ld = l.patch[4 * b + 3] as i64;
    let nx = l.nx as i64;
    let (blo, bhi) = (d.wavepad as i64, (d.wavepad + d.nstep) as i64);
    let k0 = d.core0 * d.nwt;
    // The spot value of unknown `u` at window pixel (r, c), None where its spot does not reach.
    let covers = |u: usize, r: i64, c: i64| -> Option<f64> {
        let g = geom_of(l, base + u);
        let (iy, ix) = (r - g.row0, c - g.col0);
        if iy < g.iy0 || iy >= g.iy1 || ix < 0 || ix >= nx {
            return None;
        }
        Some(l.spots[l.spot_off[base + u] as usize + (iy * nx + ix) as usize])
    };
    for k in 0..(r1 - r0) * wnx {
        let (r, c) = (r0 + k / wnx, k % wnx);
        let (mut img, mut h) = (0.0f64, 0.0f64);
        for f in d.core0..d.core0 + d.ncore {
            let s = span[f];
            if c < s.cmin || c >= s.cmax {
                continue;
            }
            for w in s.wlo.max(blo)..s.whi.min(bhi) {
                let u = f * d.nwt + w as usize;
                let Some(a) = covers(u, r, c) else {
                    continue;
                };
                img += x[base + u] * a;
                if let Some(cols) = columns {
                    let col = &cols.z[cols.off[b] as usize + (u - k0) * cols.ld..];
                    let mut sum = 0.0f64;
                    for (f2, s2) in span.iter().enumerate().take(d.nsp) {
                        if c < s2.cmin || c >= s2.cmax {
                            continue;
                        }
                        for w2 in s2.wlo..s2.whi {
                            let v = f2 * d.nwt + w2 as usize;
                            if let Some(a2) = covers(v, r, c) {
                                sum += col[v] * a2;
                            }
                        }
                    }
                    h += a * sum;
                }
            }
        }
        let q = (soff + r * wnx + c) as usize;
        out.image[q] = img;
        if let Some(lev) = out.leverage.as_mut() {
            lev[q] = h * l.ivar[(off + r * ld + c) as usize];
        }
    }
}

/// Covariance columns laid out as [`Columns`] for the patches of `dims`: the patches' slabs in
/// `order`, columns `ld` apart, `value(b, v, i)` in rows `v < n_b` of patch `b`'s column `i`,
/// and NaN in the rows below, which the kernel must not read (a stray read poisons the
/// leverage). Returns the columns and each patch's offset.
pub(super) fn lay_out_columns(
    dims: &Chi2Layout,
    ld: usize,
    order: impl IntoIterator<Item = usize>,
    mut value: impl FnMut(usize, usize, usize) -> f64,
) -> (Vec<f64>, Vec<i64>) {
    let (mut z, mut off) = (Vec::new(), vec![0i64; dims.npatch]);
    for b in order {
        let (n, ncols) = dims.core_columns(b);
        off[b] = z.len() as i64;
        for i in 0..ncols {
            let mut col = vec![f64::NAN; ld];
            for (v, c) in col.iter_mut().enumerate().take(n) {
                *c = value(b, v, i);
            }
            z.extend(col);
        }
    }
    (z, off)
}

/// Per-patch options that ask for the model image and the leverage.
fn model_options(ndiag: usize) -> crate::extract::ExtractOptions {
    crate::extract::ExtractOptions {
        regularize: 0.0,
        psferr: 0.01,
        ndiag,
        model_image: Some(crate::extract::ModelFlux::Deconvolved),
        leverage: true,
    }
}

mod tests {
    use ndarray::Array2;
    use ndarray_linalg::Inverse;

    use super::super::chi2::tests::{
        batch_x, bundle_scene, cpu_solution, toy_scene, CpuSolution, Diff,
    };
    use super::super::scene::Scene;
    use super::*;
    use crate::extract::cpu::{extract_patch, oracle, Workspace};
    use crate::extract::ExtractOptions;

    /// Exact covariance columns of the core unknowns of every patch (the dense inverse of the
    /// CPU's regularised normal matrix), `ld = nmax`.
    fn exact_columns(
        inputs: &[crate::extract::PatchInput<'_>],
        dims: &Chi2Layout,
        nmax: usize,
        opts: &ExtractOptions,
    ) -> (Vec<f64>, Vec<i64>) {
        let covs: Vec<Array2<f64>> = inputs
            .iter()
            .map(|inp| {
                let a = oracle::projection_matrix(inp);
                let (icov, _) = oracle::normal_equations(inp, &a, opts);
                icov.inv().expect("a positive definite patch")
            })
            .collect();
        let k0 = |b: usize| inputs[b].patch.core_fiber_offset() * inputs[b].patch.nwavetot;
        lay_out_columns(dims, nmax, 0..inputs.len(), |b, v, i| {
            covs[b][[v, k0(b) + i]]
        })
    }

    /// The twin against the CPU backend on `scene`: [image, leverage] differences, the image
    /// from the CPU's own x, the leverage from exact columns.
    fn compare_with_cpu(scene: &Scene, ndiag: usize) -> [Diff; 2] {
        let opts = model_options(ndiag);
        let inputs = scene.inputs();
        let layout = BatchLayout::new(&inputs).unwrap();
        let dims = Chi2Layout::new(&inputs, &layout).unwrap();
        let sols: Vec<CpuSolution> = inputs.iter().map(|i| cpu_solution(i, &opts)).collect();
        assert!(sols.iter().all(|s| !s.retried), "a patch needed the retry");
        let x = batch_x(&layout, &sols);
        let (z, off) = exact_columns(&inputs, &dims, layout.nmax, &opts);
        let cols = HostColumns {
            z: &z,
            off: &off,
            ld: layout.nmax,
        };
        let got = twin(&layout, &dims, &x, Some(cols));
        let lev = got.leverage.as_ref().expect("asked for");
        assert!(got.image.iter().chain(lev).all(|v| v.is_finite()));
        let mut ws = Workspace::default();
        let mut d = [Diff::default(); 2];
        let mut covered = 0;
        for (b, inp) in inputs.iter().enumerate() {
            let res = extract_patch(inp, &opts, &mut ws);
            let (Some(m), Some(h)) = (res.model, res.leverage) else {
                panic!("patch {b}: the CPU gave no model or leverage");
            };
            let window = |v: &[f64]| ModelBatch::window(&dims, b, v).unwrap();
            let (gm, gh): (Array2<f64>, Array2<f64>) = (window(&got.image), window(lev));
            d[0].add(Diff::of(gm.as_slice().unwrap(), m.as_slice().unwrap()));
            d[1].add(Diff::of(gh.as_slice().unwrap(), h.as_slice().unwrap()));
            covered += h.iter().filter(|&&v| v > 0.01).count();
        }
        assert!(covered > 0, "no pixel with a leverage over 0.01");
        d
    }

    /// The image is the CPU's bit for bit for the CPU's own solution (the kernel sums the same
    /// products in the same order); the leverage, summed in another order from the exact
    /// covariance, agrees with the CPU's band to rounding.
    #[test]
    fn twin_matches_the_cpu_backend_on_toy_patches() {
        let d = compare_with_cpu(&toy_scene(21), 3);
        eprintln!(
            "model twin vs CPU, toy PSF: image {:?}, leverage {:?}",
            d[0], d[1]
        );
        assert_eq!(d[0].differ, 0, "{:?}", d[0]);
        assert!(d[1].rel < 1e-9, "{:?}", d[1]);
    }

    #[test]
    fn twin_matches_the_cpu_backend_on_the_real_psf() {
        if crate::io::shared_data("psf-r0-00067784.fits").is_none() {
            eprintln!("skipping: the real PSF is not in ../shared/data");
            return;
        }
        // A bundle-edge subbundle (6 fibers, no left neighbour) and a middle one (k0 > 0).
        let (scene, ndiag, what) = bundle_scene(Some(&[0usize, 47 + 23]), 22);
        assert_eq!(what, "real PSF");
        let d = compare_with_cpu(&scene, ndiag);
        eprintln!(
            "model twin vs CPU, real PSF: image {:?}, leverage {:?}",
            d[0], d[1]
        );
        assert_eq!(d[0].differ, 0, "{:?}", d[0]);
        assert!(d[1].rel < 1e-9, "{:?}", d[1]);
    }
}

mod gpu_tests {
    use rayon::prelude::*;

    use super::super::chi2::tests::{batch_x, bundle_scene, cpu_solution, CpuSolution, Diff};
    use super::super::chi2::Kernels;
    use super::super::normal::{OnDevice, UploadedLayout};
    use super::*;
    use crate::extract::gpu::device::{self, Gpu};

    /// On a GPU: `model_image` gives the twin's bits on a whole bundle at the real size, with
    /// the CPU's solutions and random covariance columns (`ld = nmax + 1`), with and without
    /// the leverage, outputs poisoned with NaN before each run.
    #[test]
    fn gpu_matches_the_twin() {
        if let Err(e) = device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let gpu = Gpu::open(0).expect("GPU 0 opens");
        let kernels = Kernels::load(&gpu).expect("chi2.cu compiles and loads");
        let (scene, ndiag, what) = bundle_scene(None, 15);
        let inputs = scene.inputs();
        let opts = model_options(ndiag);
        let layout = BatchLayout::new(&inputs).unwrap();
        let dims = Chi2Layout::new(&inputs, &layout).unwrap();
        let sols: Vec<CpuSolution> = inputs.par_iter().map(|i| cpu_solution(i, &opts)).collect();
        let x = batch_x(&layout, &sols);
        let ld = layout.nmax + 1;
        let (z, off) = lay_out_columns(&dims, ld, 0..layout.npatch, |b, v, i| {
            1e-4 * (((7 * v + 13 * i + b) % 29) as f64 - 14.0)
        });
        let host_cols = HostColumns {
            z: &z,
            off: &off,
            ld,
        };
        let up = UploadedLayout::upload(&gpu, &layout, OnDevice::default()).unwrap();
        let buf = up.buffers();
        let st = &gpu.stream;
        let (xd, zd) = (st.clone_htod(&x).unwrap(), st.clone_htod(&z).unwrap());
        for leverage in [false, true] {
            let want = twin(&layout, &dims, &x, leverage.then_some(host_cols));
            let mut out = ModelBatch::alloc(&gpu, &dims, leverage).unwrap();
            st.memcpy_htod(&vec![f64::NAN; dims.npix], &mut out.image)
                .unwrap();
            if let Some(l) = out.leverage.as_mut() {
                st.memcpy_htod(&vec![f64::NAN; dims.npix], l).unwrap();
            }
            let cols = leverage.then_some(Columns {
                z: &zd,
                off: &off,
                ld,
            });
            launch(&gpu, &kernels, &buf, &dims, &xd, cols, &mut out).unwrap();
            let image = st.clone_dtoh(&out.image).unwrap();
            assert!(
                image.iter().all(|v| v.is_finite()),
                "an image pixel unwritten"
            );
            let d = Diff::of(&image, &want.image);
            eprintln!("model_image on the GPU vs twin, {what}, leverage {leverage}: image {d:?}");
            assert_eq!(d.differ, 0, "{d:?}");
            if let (Some(l), Some(w)) = (&out.leverage, &want.leverage) {
                let got = st.clone_dtoh(l).unwrap();
                assert!(got.iter().all(|v| v.is_finite()), "a leverage unwritten");
                let d = Diff::of(&got, w);
                eprintln!("  leverage {d:?}");
                assert_eq!(d.differ, 0, "{d:?}");
            }
        }
    }
}
