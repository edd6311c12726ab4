//! Spots speak frame fibers: a PSF that holds some of the frame's fibers (a work unit's
//! `Psf::subset`) gives, for those fibers, the whole PSF's spots under the same labels, and
//! refuses the others by name.

use super::*;
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};

fn whole() -> Psf {
    synthetic_psf(&SynthPsfOptions {
        nfiber: 60,
        fibermin: 500,
        ..Default::default()
    })
}

fn waves() -> Vec<f64> {
    (0..7).map(|i| 6000.0 + 150.0 * i as f64).collect()
}

fn same(a: &SpotSet, b: &SpotSet) {
    assert_eq!(a.grid, b.grid);
    assert_eq!((a.ny, a.nx), (b.ny, b.nx));
    assert_eq!(a.values, b.values);
    assert_eq!((&a.xc, &a.yc), (&b.xc, &b.yc));
    assert_eq!((&a.x, &a.y), (&b.x, &b.y));
}

#[test]
fn a_subsets_spots_are_the_whole_psfs_under_frame_fibers() {
    let psf = whole();
    let unit = psf.subset(25, 25).unwrap();
    assert_eq!((unit.fiber0, unit.fibers()), (25, 25..50));
    // Its header fiber numbers follow its rows.
    assert_eq!(unit.fibermin, 525);
    for (first, n) in [(25, 25), (30, 7), (49, 1)] {
        let part = evaluate(&unit, first, n, &waves()).unwrap();
        assert_eq!(part.grid.fibermin, first);
        same(&part, &evaluate(&psf, first, n, &waves()).unwrap());
        same(
            &corners(&unit, first, n, &waves()).unwrap(),
            &corners(&psf, first, n, &waves()).unwrap(),
        );
    }
    // A subset of a subset still counts frame fibers.
    let inner = unit.subset(40, 5).unwrap();
    assert_eq!((inner.fiber0, inner.fibermin), (40, 540));
    same(
        &evaluate(&inner, 41, 3, &waves()).unwrap(),
        &evaluate(&psf, 41, 3, &waves()).unwrap(),
    );
}

#[test]
fn fibers_a_psf_does_not_hold_are_refused_by_name() {
    let unit = whole().subset(25, 25).unwrap();
    let mut set = evaluate(&unit, 25, 0, &[]).unwrap();
    for (first, n) in [(0, 5), (20, 10), (45, 10), (50, 1)] {
        let wanted = first..first + n;
        let refused = |e: PsfError| match e {
            PsfError::FibersNotHeld { wanted: w, held } => {
                assert_eq!((w, held), (wanted.clone(), 25..50));
            }
            other => panic!("fibers {wanted:?}: {other}"),
        };
        refused(evaluate(&unit, first, n, &waves()).unwrap_err());
        refused(evaluate_into(&unit, first, n, &waves(), &mut set).unwrap_err());
        refused(corners(&unit, first, n, &waves()).unwrap_err());
        refused(unit.subset(first, n).unwrap_err());
    }
    // No fibers are anyone's: the empty set a frame starts from.
    let empty = evaluate(&unit, 0, 0, &[]).unwrap();
    assert_eq!((empty.grid.fibermin, empty.grid.nfiber), (0, 0));
    let e = evaluate(&unit, 45, 10, &waves()).unwrap_err().to_string();
    assert_eq!(
        e,
        "fibers 45..55 requested from a PSF holding fibers 25..50"
    );
}
