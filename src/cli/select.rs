//! The flags that name many frames (`--frames`, `--specprod`, `--night`, `--expid`,
//! `--camera`, `--psf-source`, `--output-dir`), their value parsers, and their conversion into
//! the job list's plain [`Selection`].
//!
//! Imports `pipeline::joblist`, which resolves the selection into frames.

use std::path::{Path, PathBuf};

use crate::pipeline::joblist::{
    self, CameraSpec, Expids, FrameJob, JobListError, PsfSource, Selection, ARMS,
};

/// Which PSF extracts a frame of a desispec production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PsfSourceArg {
    /// The exposure's own PSF, exposures/{night}/{expid}/psf-{camera}-{expid}.fits: the night's
    /// PSF with its traces re-fitted to this exposure (what desi_proc extracts with).
    Exposure,
    /// The night's PSF, calibnight/{night}/psfnight-{camera}-{night}.fits.
    Night,
}

impl From<PsfSourceArg> for PsfSource {
    fn from(a: PsfSourceArg) -> PsfSource {
        match a {
            PsfSourceArg::Exposure => PsfSource::Exposure,
            PsfSourceArg::Night => PsfSource::Night,
        }
    }
}

/// The command-line ways of naming many frames (flattened into `spextract extract`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FrameSelection {
    /// A list of frames: one `image psf output` triple per line, separated by whitespace (so
    /// paths cannot contain spaces); blank lines and `#` comments are skipped. Relative paths
    /// are relative to the folder of the list file, not to the current directory.
    #[arg(long, value_name = "LIST")]
    pub frames: Option<PathBuf>,
    /// A desispec production ($DESI_SPECTRO_REDUX/$SPECPROD): extract the exposures named by
    /// --night and --expid from its preproc/{night}/{expid}/preproc-{camera}-{expid}.fits[.gz],
    /// writing exposures/{night}/{expid}/frame-{camera}-{expid}.fits.
    #[arg(long, value_name = "DIR")]
    pub specprod: Option<PathBuf>,
    /// Night(s) of the --specprod exposures, YYYYMMDD, comma-separated.
    #[arg(long, value_name = "YYYYMMDD", value_delimiter = ',', value_parser = parse_night)]
    pub night: Vec<u32>,
    /// Exposure ids under --night, comma-separated; A-B takes every exposure from A to B that
    /// the nights hold (e.g. 67784,67790-67795). A single id must be found.
    #[arg(long, value_name = "EXPIDS", value_delimiter = ',', value_parser = parse_expids)]
    pub expid: Vec<Expids>,
    /// Cameras, comma-separated: r0, b1, …; b, r or z for that arm of all ten spectrographs; all
    /// for the 30 cameras (the default). A camera an exposure lacks is left out with a warning.
    #[arg(long, value_name = "CAMERAS", value_delimiter = ',', value_parser = parse_camera)]
    pub camera: Vec<CameraSpec>,
    /// PSF of the --specprod frames (default: exposure).
    #[arg(long, value_enum)]
    pub psf_source: Option<PsfSourceArg>,
    /// Write the --specprod frames under DIR/{night}/{expid}/ instead of the production's
    /// exposures/ folder.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

impl FrameSelection {
    /// Whether any many-frame option was given.
    pub fn any(&self) -> bool {
        self.selection().any()
    }

    /// The selection as the job list takes it.
    pub fn selection(&self) -> Selection {
        Selection {
            frames: self.frames.clone(),
            specprod: self.specprod.clone(),
            night: self.night.clone(),
            expid: self.expid.clone(),
            camera: self.camera.clone(),
            psf_source: self.psf_source.map(PsfSource::from),
            output_dir: self.output_dir.clone(),
        }
    }
}

/// All the frames a run must do ([`joblist::resolve`] of the flags' selection).
pub fn resolve(
    sel: &FrameSelection,
    config_frames: &[FrameJob],
    config_dir: Option<&Path>,
    single: Option<FrameJob>,
) -> Result<Vec<FrameJob>, JobListError> {
    joblist::resolve(&sel.selection(), config_frames, config_dir, single)
}

/// Parses a night `YYYYMMDD`, checking that it is a calendar date.
fn parse_night(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a night YYYYMMDD");
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().map_err(|_| bad());
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => 0,
    };
    if d == 0 || d > days {
        return Err(format!("{s:?} is not a calendar date YYYYMMDD"));
    }
    num(0..8)
}

/// Most digits of an exposure id: desispec formats them `{expid:08d}`.
const MAX_EXPID: u32 = 99_999_999;

/// Parses `EXPID` or `FIRST-LAST`.
fn parse_expids(s: &str) -> Result<Expids, String> {
    let s = s.trim();
    let one = |t: &str| -> Result<u32, String> {
        let t = t.trim();
        match t.parse::<u32>() {
            Ok(e) if e <= MAX_EXPID && t.bytes().all(|b| b.is_ascii_digit()) => Ok(e),
            _ => Err(format!(
                "{t:?} in {s:?} is not an exposure id (0 to {MAX_EXPID}); use EXPID or FIRST-LAST"
            )),
        }
    };
    match s.split_once('-') {
        None => Ok(Expids::One(one(s)?)),
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(format!("range {s:?} runs backwards"));
            }
            Ok(Expids::Range(a, b))
        }
    }
}

/// Parses a camera (`r0`), an arm (`r`) or `all`, in any case.
fn parse_camera(s: &str) -> Result<CameraSpec, String> {
    let t = s.trim().to_ascii_lowercase();
    let mut chars = t.chars();
    let spec = match (chars.next(), chars.next(), chars.next()) {
        _ if t == "all" => Some(CameraSpec::All),
        (Some(arm), None, None) if ARMS.contains(&arm) => Some(CameraSpec::Arm(arm)),
        (Some(arm), Some(sp), None) if ARMS.contains(&arm) && sp.is_ascii_digit() => {
            Some(CameraSpec::One(arm, sp as u8 - b'0'))
        }
        _ => None,
    };
    spec.ok_or_else(|| {
        format!("{s:?} is not a camera: use b0…z9, an arm b, r or z (all ten), or all")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_flags_parse_into_the_selection() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let argv = ["spextract", "extract"].iter().chain(args).copied();
            crate::cli::Cli::try_parse_from(argv).map(|cli| match cli.command {
                crate::cli::Command::Extract(a) => a.select,
                _ => unreachable!("parsed as extract"),
            })
        };
        let sel = parse(&[
            "--specprod",
            "/p",
            "--night",
            "20201214,20240229",
            "--expid",
            "67784, 67790-67795",
            "--camera",
            "R,b1,all",
            "--psf-source",
            "night",
            "--output-dir",
            "o",
        ])
        .unwrap();
        assert!(sel.any());
        assert_eq!(sel.night, [20201214, 20240229]);
        assert_eq!(sel.expid, [Expids::One(67784), Expids::Range(67790, 67795)]);
        assert_eq!(
            sel.camera,
            [
                CameraSpec::Arm('r'),
                CameraSpec::One('b', 1),
                CameraSpec::All
            ]
        );
        assert_eq!(sel.selection().psf_source, Some(PsfSource::Night));
        assert_eq!(joblist::camera_names(&sel.camera).len(), 30);
        assert!(!parse(&[]).unwrap().any());
        assert!(parse(&["--camera", "r"]).unwrap().any());
        for bad in [
            ["--night", "2020121"],
            ["--night", "20230229"],
            ["--night", "20201301"],
            ["--expid", "67790-67784"],
            ["--expid", "x"],
            ["--expid", "123456789"],
            ["--camera", "x1"],
            ["--camera", "r10"],
            ["--psf-source", "calib"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} was accepted");
        }
    }
}
