//! `--ivar-from-model` (issue 14 item 1): each pixel's variance from the model, not the data.
//!
//! DESI's preproc computes a pixel's variance from the pixel itself, `r + max(pix, 0)` (`r` the
//! read-noise term, in electrons²). A pixel that fluctuates low gets more weight, and the
//! extracted flux comes out biased low (about half a sigma per bin). With the option the
//! read-noise term is recovered pixel by pixel from what preproc wrote, `r = 1/ivar −
//! max(pix, 0)`, and the frame is extracted twice (`prepare::extract_prepared`):
//! 1. with the light of each pixel taken from its unmasked neighbours along the trace
//!    ([`ivar_from_neighbours`]), which follow none of the pixel's own noise, so that this
//!    pass's flux, and the model made from it, are unbiased;
//! 2. with `r + max(model, 0)`, the model being the first pass's model image (the deconvolved
//!    flux through the PSF, `ModelFlux::Deconvolved`) with each pixel's own value taken out by
//!    its leverage ([`leave_one_out`]): a fitted model follows the pixels' noise by their
//!    leverage, and would bring back a tenth of the bias.
//!
//! Twice is enough: on a frame simulated through the real r PSF the second pass's flux has
//! a mean pull of +0.02 and chi²/dof 1.01 against the truth (README). A third pass would cost
//! another extraction for what is within the noise.
//!
//! The model holds the light of the extracted fibers only: pixels lit by fibers that are not
//! extracted get the read-noise term and the extracted fibers' light in the second pass.
//! Extract every lit fiber (a whole frame) for an unbiased variance at the edges of the
//! extracted set.
//!
//! Pure arithmetic on the image planes: imports nothing of the crate.

use std::ops::Range;

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Zip};

/// Electrons per unit of an image whose header has `bunit` and `gain` (values as text): 1 when
/// BUNIT says electrons (or when there is no BUNIT: preproc images are in electrons), else
/// GAIN. The second value is what the log should say about it, when anything.
pub fn image_gain(
    bunit: Option<&str>,
    gain: Option<&str>,
) -> Result<(f64, Option<String>), String> {
    let Some(bunit) = bunit else {
        return Ok((
            1.0,
            Some("the image has no BUNIT: taken to be in electrons, as preproc writes".into()),
        ));
    };
    let unit = bunit.trim().to_ascii_lowercase();
    if ["electron", "electrons", "e-", "e"].contains(&unit.as_str()) {
        return Ok((1.0, None));
    }
    match gain.and_then(|g| g.trim().parse::<f64>().ok()) {
        Some(g) if g.is_finite() && g > 0.0 => Ok((
            g,
            Some(format!(
                "the image is in {bunit}, not electrons: its variance is taken as read noise + \
                 max(model, 0) / GAIN with GAIN = {g} electrons per {bunit}"
            )),
        )),
        _ => Err(format!(
            "BUNIT is '{bunit}', not electron, and the header has no positive GAIN: \
             --ivar-from-model cannot tell the Poisson term of the variance"
        )),
    }
}

/// How well IVAR follows preproc's `1/(r + max(pix, 0)/gain)` with `r` the same from pixel
/// to pixel: the median of `r` and the median of `|Δr|` between horizontally adjacent unmasked
/// pixels (0 up to float32 rounding for preproc's IVAR; about the Poisson noise when IVAR came
/// from a model instead).
pub fn read_noise_term(
    pix: ArrayView2<'_, f64>,
    ivar: ArrayView2<'_, f64>,
    gain: f64,
) -> Option<(f64, f64)> {
    let term = |p: f64, iv: f64| read_noise(iv, p, gain);
    let (mut r, mut dr) = (Vec::new(), Vec::new());
    for (prow, irow) in pix.outer_iter().zip(ivar.outer_iter()) {
        for x in 1..prow.len() {
            let (a, b) = (irow[x - 1], irow[x]);
            if a > 0.0 && b > 0.0 {
                let (ra, rb) = (term(prow[x - 1], a), term(prow[x], b));
                r.push(rb);
                dr.push((rb - ra).abs());
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        let mid = v.len() / 2;
        v.select_nth_unstable_by(mid, f64::total_cmp);
        v[mid]
    };
    (!r.is_empty()).then(|| (median(&mut r), median(&mut dr)))
}

/// Whether a read-noise term with median `r` and median step `dr` is preproc's: constant
/// within each amplifier up to float32 rounding, far below the Poisson noise of any pixel.
pub fn is_from_data(r: f64, dr: f64) -> bool {
    dr <= 1e-2 * r.abs() + 1e-2
}

/// IVAR for the first pass, with the light of each pixel taken from its unmasked neighbours
/// above and below (along the trace, where the light changes slowly) instead of from the
/// pixel: `1/(r + max(light, 0)/gain)`, the pixel itself only when both are masked. Preproc's
/// variance would bias the first pass's flux, and with it the model, low by about half a
/// sigma; this one follows no pixel's own noise. Pixels with ivar 0 stay 0. Computed for
/// image rows `rows` and columns `cols` (a work unit's rectangle; the whole image for a single
/// frame), with the neighbours of its edge pixels from outside it.
pub fn ivar_from_neighbours(
    pix: ArrayView2<'_, f64>,
    ivar: ArrayView2<'_, f64>,
    gain: f64,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Array2<f64> {
    let ny = pix.nrows();
    Array2::from_shape_fn((rows.len(), cols.len()), |(j, i)| {
        let (y, x) = (rows.start + j, cols.start + i);
        let iv = ivar[[y, x]];
        if iv <= 0.0 {
            return 0.0;
        }
        let (mut sum, mut n) = (0.0, 0);
        for yy in [y.wrapping_sub(1), y + 1] {
            if yy < ny && ivar[[yy, x]] > 0.0 {
                sum += pix[[yy, x]];
                n += 1;
            }
        }
        let p = pix[[y, x]];
        let light = if n > 0 { sum / n as f64 } else { p };
        ivar_with_light(iv, p, light, gain)
    })
}

/// The model a pixel would have without its own value: `(m − h·pix)/(1 − h)` with `h` the
/// pixel's leverage on the model `m`. A fitted model follows the noise of the pixels it was
/// fitted to by their leverage (a tenth to a few tenths near a trace), and a variance made
/// from it would weight low fluctuations up again, by that fraction; this one does not. Pixels of
/// leverage outside 0..0.99 (or not finite) keep `m`.
pub fn leave_one_out(pix: f64, model: f64, leverage: f64) -> f64 {
    let h = leverage;
    if h.is_finite() && (0.0..0.99).contains(&h) {
        (model - h * pix) / (1.0 - h)
    } else {
        model
    }
}

/// IVAR with the model in place of the data: `1/(r + max(m, 0)/gain)` where
/// `r = 1/ivar − max(pix, 0)/gain` and `m` is the model with the pixel's own value left out by
/// its leverage ([`leave_one_out`]); pixels with ivar 0 stay 0, and so does a pixel whose new
/// variance is not positive. Written into `out` (the first pass's IVAR, not needed after it),
/// in one sweep that writes nothing else: most of a partial frame's model image is pages
/// never touched.
pub fn ivar_from_model(
    pix: ArrayView2<'_, f64>,
    ivar: ArrayView2<'_, f64>,
    model: ArrayView2<'_, f64>,
    leverage: ArrayView2<'_, f64>,
    gain: f64,
    out: ArrayViewMut2<'_, f64>,
) {
    Zip::from(out)
        .and(pix)
        .and(ivar)
        .and(model)
        .and(leverage)
        .for_each(|out, &p, &iv, &m, &h| {
            *out = if iv <= 0.0 {
                0.0
            } else {
                ivar_with_light(iv, p, leave_one_out(p, m, h), gain)
            };
        });
}

/// The read-noise term of preproc's variance of a pixel of value `pix` and inverse variance
/// `iv`: `1/iv − max(pix, 0)/gain`.
fn read_noise(iv: f64, pix: f64, gain: f64) -> f64 {
    1.0 / iv - pix.max(0.0) / gain
}

/// The inverse variance of that pixel with `light` in place of its value:
/// `1/(r + max(light, 0)/gain)`, 0 where that variance is not positive.
fn ivar_with_light(iv: f64, pix: f64, light: f64, gain: f64) -> f64 {
    let var = read_noise(iv, pix, gain) + light.max(0.0) / gain;
    if var > 0.0 {
        1.0 / var
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    #[test]
    fn gain_comes_from_bunit_or_gain() {
        assert_eq!(image_gain(Some("electron"), None).unwrap(), (1.0, None));
        let (g, note) = image_gain(Some("adu"), Some("1.5")).unwrap();
        assert_eq!(g, 1.5);
        assert!(note.unwrap().contains("GAIN = 1.5"));
        let (g, note) = image_gain(None, None).unwrap();
        assert_eq!(g, 1.0);
        assert!(note.unwrap().contains("no BUNIT"));
        let err = image_gain(Some("adu"), Some("-1")).unwrap_err();
        assert!(err.contains("no positive GAIN"), "{err}");
    }

    /// The read-noise term is recovered exactly, the model replaces the data, masked pixels
    /// stay masked, and a gain scales the Poisson term.
    #[test]
    fn variance_takes_the_model_in_place_of_the_pixel() {
        let pix = array![[100.0, -5.0, 40.0]];
        let ivar = array![[1.0 / (9.0 + 100.0), 1.0 / 9.0, 0.0]];
        let model = array![[90.0, 3.0, 40.0]];
        let mut new = Array2::zeros(pix.dim());
        let none = Array2::zeros(pix.dim());
        ivar_from_model(
            pix.view(),
            ivar.view(),
            model.view(),
            none.view(),
            1.0,
            new.view_mut(),
        );
        assert!((1.0 / new[[0, 0]] - 99.0).abs() < 1e-9);
        assert!((1.0 / new[[0, 1]] - 12.0).abs() < 1e-9);
        assert_eq!(new[[0, 2]], 0.0);
        let adu = array![[1.0 / (4.0 + 100.0 / 2.0), 1.0 / 4.0, 0.0]];
        ivar_from_model(
            pix.view(),
            adu.view(),
            model.view(),
            none.view(),
            2.0,
            new.view_mut(),
        );
        assert!((1.0 / new[[0, 0]] - 49.0).abs() < 1e-9);
        let (r, dr) = read_noise_term(pix.view(), adu.view(), 2.0).unwrap();
        assert!((r - 4.0).abs() < 1e-9 && dr < 1e-9 && is_from_data(r, dr));
    }

    /// A pixel's own value is taken out of the model by its leverage before the model makes
    /// its variance; leverage outside 0..0.99 leaves the model as it is.
    #[test]
    fn the_model_leaves_each_pixel_s_own_value_out() {
        let pix = array![[100.0, 100.0, 100.0]];
        let ivar = pix.mapv(|p| 1.0 / (9.0 + p));
        let model = array![[90.0, 90.0, 90.0]];
        let leverage = array![[0.5, 0.995, f64::NAN]];
        let mut new = Array2::zeros(pix.dim());
        ivar_from_model(
            pix.view(),
            ivar.view(),
            model.view(),
            leverage.view(),
            1.0,
            new.view_mut(),
        );
        // (90 − 0.5·100)/(1 − 0.5) = 80.
        assert!((1.0 / new[[0, 0]] - 89.0).abs() < 1e-9);
        assert!((1.0 / new[[0, 1]] - 99.0).abs() < 1e-9);
        assert!((1.0 / new[[0, 2]] - 99.0).abs() < 1e-9);
    }

    /// A rectangle's first-pass IVAR is the same as the whole image's there, its edge pixels'
    /// neighbours taken from outside it.
    #[test]
    fn a_rectangle_s_neighbour_ivar_is_the_image_s() {
        let pix = Array2::from_shape_fn((6, 5), |(y, x)| (y * 7 + x * 3) as f64 - 4.0);
        let mut ivar = pix.mapv(|p| 1.0 / (9.0 + p.max(0.0)));
        ivar[[2, 1]] = 0.0;
        let whole = ivar_from_neighbours(pix.view(), ivar.view(), 1.0, 0..6, 0..5);
        let part = ivar_from_neighbours(pix.view(), ivar.view(), 1.0, 1..4, 1..3);
        assert_eq!(part, whole.slice(ndarray::s![1..4, 1..3]));
        assert_eq!(whole[[2, 1]], 0.0);
        assert_ne!(whole, ivar);
    }

    /// An IVAR from a model rather than the pixels is told apart from preproc's.
    #[test]
    fn ivar_from_a_model_is_not_taken_for_preproc_s() {
        let pix = array![[100.0, 80.0, 130.0, 95.0]];
        let ivar = pix.mapv(|_| 1.0 / (9.0 + 100.0));
        let (r, dr) = read_noise_term(pix.view(), ivar.view(), 1.0).unwrap();
        assert!(!is_from_data(r, dr), "{r} {dr}");
    }
}
