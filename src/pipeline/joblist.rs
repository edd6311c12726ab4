//! The job list: the frames a run must do, from a list file, from `[[frames]]` in the
//! configuration, or from a night/exposure/camera pattern over desispec's directory layout; and
//! whether an output is already complete, so that a killed run restarts where it stopped.
//!
//! Plain data in, plain data out: the command line's flags become a [`Selection`] in
//! `cli::select`. Imports `io` (reading an output back, comparing paths) and the pipeline's
//! `request` (what an output was extracted for) and `frame` (its NODATA bit).
//!
//! The pattern follows `desispec.io.meta.findfile` (desihub/desispec, py/desispec/io/meta.py):
//!
//! - `preproc  = {specprod_dir}/preproc/{night}/{expid:08d}/preproc-{camera}-{expid:08d}.fits`
//!   (recent desispec names it `.fits.gz`; `findfile` then runs `checkgzip`, which accepts the
//!   name with or without `.gz`, and so do we);
//! - `psf      = {specprod_dir}/exposures/{night}/{expid:08d}/psf-{camera}-{expid:08d}.fits`;
//! - `psfnight = {specprod_dir}/calibnight/{night}/psfnight-{camera}-{night}.fits`;
//! - `frame    = {specprod_dir}/exposures/{night}/{expid:08d}/frame-{camera}-{expid:08d}.fits`
//!   (recent desispec writes `.fits.gz`; `write_frame` writes plain FITS, so `.fits` it is).
//!
//! desi_proc (py/desispec/scripts/proc.py) extracts flats and science exposures with
//! `findfile('psf', night, expid, camera)`: the night's psfnight (or the default calibration
//! PSF when the night has none) with its traces re-fitted to this exposure by
//! `desi_compute_trace_shifts`. That is our default; `--psf-source night` takes the psfnight
//! itself, which skips the per-exposure trace shift.
//!
//! `findfile(..., outdir=DIR)` puts a file directly in DIR; `--output-dir` keeps the
//! `{night}/{expid:08d}/` folders instead, so a many-night run stays browsable.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::io::{input_key, output_key};
use crate::pipeline::request::{Comparison, FrameRequest};

/// One frame to extract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameJob {
    /// The preproc image.
    pub image: PathBuf,
    /// Its PSF.
    pub psf: PathBuf,
    /// The frame to write.
    pub output: PathBuf,
}

/// Which PSF extracts a frame of a desispec production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PsfSource {
    /// The exposure's own PSF, exposures/{night}/{expid}/psf-{camera}-{expid}.fits: the night's
    /// PSF with its traces re-fitted to this exposure (what desi_proc extracts with).
    #[default]
    Exposure,
    /// The night's PSF, calibnight/{night}/psfnight-{camera}-{night}.fits.
    Night,
}

/// Exposures named by `--expid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expids {
    /// One exposure, which must be found.
    One(u32),
    /// Every exposure from the first to the last (inclusive) that the nights hold; gaps in the
    /// numbering are normal (exposures of other nights, aborted exposures).
    Range(u32, u32),
}

impl fmt::Display for Expids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expids::One(e) => write!(f, "{e}"),
            Expids::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// Cameras named by `--camera`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraSpec {
    /// One camera: arm (`b`, `r` or `z`) and spectrograph (0–9).
    One(char, u8),
    /// One arm of all ten spectrographs.
    Arm(char),
    /// All 30 cameras.
    All,
}

/// The arms of a spectrograph.
pub const ARMS: [char; 3] = ['b', 'r', 'z'];
const SPECTROGRAPHS: u8 = 10;

impl CameraSpec {
    /// The camera names, in desispec's order (`decode_camword`: b0, r0, z0, b1, …).
    fn names(self) -> Vec<String> {
        match self {
            CameraSpec::One(arm, sp) => vec![format!("{arm}{sp}")],
            CameraSpec::Arm(arm) => (0..SPECTROGRAPHS).map(|sp| format!("{arm}{sp}")).collect(),
            CameraSpec::All => (0..SPECTROGRAPHS)
                .flat_map(|sp| ARMS.iter().map(move |arm| format!("{arm}{sp}")))
                .collect(),
        }
    }
}

/// The ways of naming many frames besides the configuration's `[[frames]]`: a list file and a
/// desispec pattern (the command line's `--frames`, `--specprod`, `--night`, ...).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// A list file of `image psf output` lines.
    pub frames: Option<PathBuf>,
    /// A desispec production.
    pub specprod: Option<PathBuf>,
    /// Nights of the production's exposures, YYYYMMDD.
    pub night: Vec<u32>,
    /// Exposures under the nights.
    pub expid: Vec<Expids>,
    /// Cameras; all 30 when empty.
    pub camera: Vec<CameraSpec>,
    /// PSF of the pattern's frames (default: exposure).
    pub psf_source: Option<PsfSource>,
    /// Folder for the pattern's frames instead of the production's exposures/.
    pub output_dir: Option<PathBuf>,
}

impl Selection {
    /// Whether any many-frame option was given.
    pub fn any(&self) -> bool {
        self.frames.is_some() || self.specprod.is_some() || self.pattern_flags().is_some()
    }

    /// The first pattern flag given (other than `--specprod`), for error messages.
    fn pattern_flags(&self) -> Option<&'static str> {
        [
            (!self.night.is_empty(), "--night"),
            (!self.expid.is_empty(), "--expid"),
            (!self.camera.is_empty(), "--camera"),
            (self.psf_source.is_some(), "--psf-source"),
            (self.output_dir.is_some(), "--output-dir"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// Errors naming the frames of a run, each naming the file, entry or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum JobListError {
    /// The list file could not be read.
    #[error("{}: cannot read the frame list: {source}", .path.display())]
    ReadList {
        /// The list file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The list file is larger than a frame list can be (a device such as /dev/zero, or the
    /// wrong file).
    #[error(
        "{}: larger than the {} MiB a frame list may be; is it the right file? (split a list \
         that long into several runs)",
        .path.display(),
        MAX_LIST_BYTES >> 20
    )]
    ListTooLarge {
        /// The list file.
        path: PathBuf,
    },
    /// A line of the list file is not an `image psf output` triple.
    #[error("{}:{line}: {msg}", .path.display())]
    ListLine {
        /// The list file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A `[[frames]]` entry of the configuration is unusable.
    #[error("[[frames]] entry {index} of the configuration: {msg}")]
    ConfigEntry {
        /// 1-based entry number.
        index: usize,
        /// What is wrong.
        msg: String,
    },
    /// The pattern flags do not name frames (a flag without the others it needs).
    #[error("{0}")]
    Pattern(String),
    /// A folder of the production could not be listed.
    #[error("{}: cannot list this folder: {source}", .path.display())]
    ListDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Exposures named by `--expid` are under none of the nights.
    #[error(
        "exposure(s) {expids} not found: no such {{expid:08d}} folder under {} for night(s) {nights}",
        .preproc.display()
    )]
    ExposuresNotFound {
        /// The single ids and ranges that found nothing.
        expids: String,
        /// `{specprod}/preproc`.
        preproc: PathBuf,
        /// The nights searched.
        nights: String,
    },
    /// Exposures named by `--expid` have a folder but no preproc image of any wanted camera.
    #[error("no preproc image of cameras {cameras} in {exposures}")]
    NoCameras {
        /// The exposure folders.
        exposures: String,
        /// The cameras looked for.
        cameras: String,
    },
    /// Two frames would write the same file.
    #[error("output {} is named twice: by {first} and by {second}", .path.display())]
    DuplicateOutput {
        /// The output.
        path: PathBuf,
        /// Where it was first named.
        first: String,
        /// Where it was named again.
        second: String,
    },
    /// A frame's output is the image or PSF of a frame: writing it would destroy an input.
    #[error("output {} of {by} is also an input of {input_of}", .path.display())]
    OutputIsInput {
        /// The output.
        path: PathBuf,
        /// Where it was named as an output.
        by: String,
        /// Where it was named as an image or PSF.
        input_of: String,
    },
    /// An output of the single frame is one of its inputs, or its other output.
    #[error(
        "{output_flag} {} is the same file as {other_flag} {}: {consequence}",
        .output.display(),
        .other.display()
    )]
    SameFile {
        /// The output's flag.
        output_flag: &'static str,
        /// The output.
        output: PathBuf,
        /// The other file's flag.
        other_flag: &'static str,
        /// The other file.
        other: PathBuf,
        /// What writing the output would do.
        consequence: &'static str,
    },
    /// Nothing to do.
    #[error(
        "no frames to extract{0}: name one with --image, --psf and --output; list them with \
         --frames LIST (lines of `image psf output`) or [[frames]] entries in --config; or \
         select a desispec production's with --specprod DIR --night YYYYMMDD --expid N[-M] \
         [--camera r0,b,...]"
    )]
    NoFrames(String),
}

/// Where a frame was named, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Single,
    Config(usize),
    List(PathBuf, usize),
    Pattern(u32, u32, String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Single => write!(f, "--image/--psf/--output"),
            Origin::Config(i) => write!(f, "[[frames]] entry {i} of the configuration"),
            Origin::List(path, line) => write!(f, "{}:{line}", path.display()),
            Origin::Pattern(night, expid, camera) => {
                write!(f, "--specprod night {night} expid {expid} camera {camera}")
            }
        }
    }
}

/// All the frames a run must do: the single frame of `--image/--psf/--output` (`single`), the
/// configuration's `[[frames]]` (relative paths taken from `config_dir`, the configuration
/// file's folder), the `--frames` list, then the `--specprod` pattern, in that order.
///
/// Two frames writing the same output, or an output that is another frame's input, are errors;
/// so is an empty result.
pub fn resolve(
    sel: &Selection,
    config_frames: &[FrameJob],
    config_dir: Option<&Path>,
    single: Option<FrameJob>,
) -> Result<Vec<FrameJob>, JobListError> {
    let mut jobs: Vec<(FrameJob, Origin)> = Vec::new();
    if let Some(job) = single {
        jobs.push((job, Origin::Single));
    }
    let base = config_dir.unwrap_or(Path::new(""));
    for (i, job) in config_frames.iter().enumerate() {
        let index = i + 1;
        for (key, p) in [
            ("image", &job.image),
            ("psf", &job.psf),
            ("output", &job.output),
        ] {
            if p.as_os_str().is_empty() {
                return Err(JobListError::ConfigEntry {
                    index,
                    msg: format!("{key} is empty"),
                });
            }
        }
        let job = FrameJob {
            image: base.join(&job.image),
            psf: base.join(&job.psf),
            output: base.join(&job.output),
        };
        jobs.push((job, Origin::Config(index)));
    }
    let mut empty_list = None;
    if let Some(list) = &sel.frames {
        let listed = read_list(list)?;
        if listed.is_empty() {
            empty_list = Some(list);
        }
        jobs.extend(listed);
    }
    jobs.extend(pattern_frames(sel)?);
    if jobs.is_empty() {
        let detail = match (empty_list, &sel.specprod) {
            (Some(p), _) => format!(" ({} has no frame lines)", p.display()),
            (None, Some(root)) => format!(
                " (the exposures found under {} have no preproc image of the cameras asked \
                 for; see the warnings above)",
                root.display()
            ),
            (None, None) => String::new(),
        };
        return Err(JobListError::NoFrames(detail));
    }
    check_outputs(&jobs)?;
    Ok(jobs.into_iter().map(|(job, _)| job).collect())
}

/// Most bytes a `--frames` list may have: some 400 000 lines of DESI paths, more frames than
/// one run does, while a device without end (/dev/zero) is refused after 64 MiB.
pub const MAX_LIST_BYTES: u64 = 64 << 20;

/// Reads a `--frames` list (a pipe such as `<(…)` too), refusing one over [`MAX_LIST_BYTES`].
fn read_list(path: &Path) -> Result<Vec<(FrameJob, Origin)>, JobListError> {
    let text = crate::io::read_text_at_most(path, MAX_LIST_BYTES)
        .map_err(|source| JobListError::ReadList {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| JobListError::ListTooLarge {
            path: path.to_path_buf(),
        })?;
    parse_list(&text, path)
}

/// Parses the text of the list file `path`; relative paths are joined to its folder.
fn parse_list(text: &str, path: &Path) -> Result<Vec<(FrameJob, Origin)>, JobListError> {
    let base = path.parent().unwrap_or(Path::new(""));
    // Editors on some systems start UTF-8 files with a byte-order mark, which would otherwise
    // become part of the first image path.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // A `#` starts a comment only at the start of a field, so `a#1.fits` stays a path.
        let fields: Vec<&str> = line
            .split_whitespace()
            .take_while(|f| !f.starts_with('#'))
            .collect();
        match fields[..] {
            [] => {}
            [image, psf, output] => {
                let job = FrameJob {
                    image: base.join(image),
                    psf: base.join(psf),
                    output: base.join(output),
                };
                jobs.push((job, Origin::List(path.to_path_buf(), i + 1)));
            }
            _ => {
                return Err(JobListError::ListLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!(
                        "expected 3 fields `image psf output`, found {}: {:?}",
                        fields.len(),
                        line.trim()
                    ),
                })
            }
        }
    }
    Ok(jobs)
}

/// The frames of the `--specprod` pattern; none without `--specprod`.
fn pattern_frames(sel: &Selection) -> Result<Vec<(FrameJob, Origin)>, JobListError> {
    let Some(root) = &sel.specprod else {
        return match sel.pattern_flags() {
            Some(flag) => Err(JobListError::Pattern(format!(
                "{flag} selects frames of a desispec production: it needs --specprod DIR"
            ))),
            None => Ok(Vec::new()),
        };
    };
    if sel.night.is_empty() || sel.expid.is_empty() {
        return Err(JobListError::Pattern(format!(
            "--specprod {} needs --night YYYYMMDD and --expid N (comma lists; ranges N-M)",
            root.display()
        )));
    }
    let preproc = root.join("preproc");
    if !preproc.is_dir() {
        return Err(JobListError::Pattern(format!(
            "--specprod {}: there is no folder {}; is this a desispec production?",
            root.display(),
            preproc.display()
        )));
    }
    let cameras = camera_names(&sel.camera);
    let nights = dedup(sel.night.iter().copied());

    // (night, expid) in the order named, and whether --expid named it alone.
    let mut exposures: Vec<(u32, u32, bool)> = Vec::new();
    let mut index: HashMap<(u32, u32), usize> = HashMap::new();
    let mut found = vec![false; sel.expid.len()];
    for &night in &nights {
        let night_dir = preproc.join(night.to_string());
        let mut listing: Option<BTreeSet<u32>> = None;
        for (k, spec) in sel.expid.iter().enumerate() {
            let (ids, single): (Vec<u32>, bool) = match *spec {
                Expids::One(e) => {
                    let here = night_dir.join(format!("{e:08}")).is_dir();
                    (if here { vec![e] } else { Vec::new() }, true)
                }
                Expids::Range(a, b) => {
                    if listing.is_none() {
                        listing = Some(list_exposures(&night_dir)?);
                    }
                    let all = listing.as_ref().map(|l| l.range(a..=b).copied().collect());
                    (all.unwrap_or_default(), false)
                }
            };
            found[k] |= !ids.is_empty();
            for e in ids {
                match index.get(&(night, e)) {
                    Some(&i) => exposures[i].2 |= single,
                    None => {
                        index.insert((night, e), exposures.len());
                        exposures.push((night, e, single));
                    }
                }
            }
        }
    }
    let missing: Vec<String> = sel
        .expid
        .iter()
        .zip(&found)
        .filter(|(_, &f)| !f)
        .map(|(spec, _)| spec.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(JobListError::ExposuresNotFound {
            expids: missing.join(", "),
            preproc,
            nights: join_display(&nights),
        });
    }

    let psf_source = sel.psf_source.unwrap_or_default();
    let mut jobs = Vec::new();
    let mut empty_named = Vec::new();
    let mut missing_psf = Vec::new();
    for &(night, expid, single) in &exposures {
        let exp_dir = preproc.join(night.to_string()).join(format!("{expid:08}"));
        let mut absent = Vec::new();
        let before = jobs.len();
        for camera in &cameras {
            let Some(image) =
                existing_fits(&exp_dir.join(format!("preproc-{camera}-{expid:08}.fits")))
            else {
                absent.push(camera.as_str());
                continue;
            };
            let psf = match psf_source {
                PsfSource::Exposure => root
                    .join("exposures")
                    .join(night.to_string())
                    .join(format!("{expid:08}"))
                    .join(format!("psf-{camera}-{expid:08}.fits")),
                PsfSource::Night => root
                    .join("calibnight")
                    .join(night.to_string())
                    .join(format!("psfnight-{camera}-{night}.fits")),
            };
            let psf = existing_fits(&psf).unwrap_or_else(|| {
                missing_psf.push(psf.clone());
                psf
            });
            let name = format!("frame-{camera}-{expid:08}.fits");
            let output = match &sel.output_dir {
                Some(dir) => dir.join(night.to_string()).join(format!("{expid:08}")),
                None => root
                    .join("exposures")
                    .join(night.to_string())
                    .join(format!("{expid:08}")),
            }
            .join(name);
            let origin = Origin::Pattern(night, expid, camera.clone());
            jobs.push((FrameJob { image, psf, output }, origin));
        }
        if jobs.len() == before && single {
            empty_named.push(exp_dir.display().to_string());
        } else if !absent.is_empty() {
            warn!(
                "{}: no preproc image of camera(s) {}; those frames are left out",
                exp_dir.display(),
                absent.join(", ")
            );
        }
    }
    if !empty_named.is_empty() {
        return Err(JobListError::NoCameras {
            exposures: empty_named.join(", "),
            cameras: cameras.join(","),
        });
    }
    if let Some(first) = missing_psf.first() {
        warn!(
            "{} frame(s) have no PSF yet (first: {}); they will fail",
            missing_psf.len(),
            first.display()
        );
    }
    Ok(jobs)
}

/// The camera names of `--camera`, without repeats; all 30 when none is given.
pub fn camera_names(specs: &[CameraSpec]) -> Vec<String> {
    if specs.is_empty() {
        return CameraSpec::All.names();
    }
    dedup(specs.iter().flat_map(|s| s.names()))
}

/// The items in first-seen order, repeats dropped.
fn dedup<T: Clone + Eq + std::hash::Hash>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

fn join_display<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The exposure folders (`{expid:08d}`, as desispec's `get_exposures` requires) of a night's
/// preproc folder; none if the night has no folder.
fn list_exposures(night_dir: &Path) -> Result<BTreeSet<u32>, JobListError> {
    let list_err = |source| JobListError::ListDir {
        path: night_dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(night_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(list_err(e)),
    };
    let mut ids = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 8 || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let (Ok(e), true) = (name.parse::<u32>(), entry.path().is_dir()) {
            ids.insert(e);
        }
    }
    Ok(ids)
}

/// `path` if it is a file, else the same name with `.gz` if that is (desispec's `checkgzip`).
fn existing_fits(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    let mut gz = path.as_os_str().to_owned();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    gz.is_file().then_some(gz)
}

/// No output written twice, and none that is some frame's input, comparing where the files
/// are (`io::output_key`, `io::input_key`: links, `..` and `//` resolved), not how they are
/// spelled.
fn check_outputs(jobs: &[(FrameJob, Origin)]) -> Result<(), JobListError> {
    let mut inputs: HashMap<PathBuf, usize> = HashMap::new();
    for (i, (job, _)) in jobs.iter().enumerate() {
        for p in [&job.image, &job.psf] {
            inputs.entry(input_key(p)).or_insert(i);
        }
    }
    let mut outputs: HashMap<PathBuf, usize> = HashMap::new();
    for (i, (job, origin)) in jobs.iter().enumerate() {
        let key = output_key(&job.output);
        if let Some(&j) = inputs.get(&key) {
            return Err(JobListError::OutputIsInput {
                path: job.output.clone(),
                by: origin.to_string(),
                input_of: jobs[j].1.to_string(),
            });
        }
        if let Some(&j) = outputs.get(&key) {
            return Err(JobListError::DuplicateOutput {
                path: job.output.clone(),
                first: jobs[j].1.to_string(),
                second: origin.to_string(),
            });
        }
        outputs.insert(key, i);
    }
    Ok(())
}

/// The single frame's outputs (`--output`, and `--model-image` when given) are neither its
/// inputs nor each other, compared as in [`resolve`].
pub fn check_single_outputs(
    job: &FrameJob,
    model_image: Option<&Path>,
) -> Result<(), JobListError> {
    let mut outputs: Vec<(&'static str, &Path)> = vec![("--output", &job.output)];
    outputs.extend(model_image.map(|m| ("--model-image", m)));
    let inputs: [(&'static str, &Path, &'static str); 2] = [
        ("--psf", &job.psf, "writing it would replace the PSF"),
        ("--image", &job.image, "writing it would replace the image"),
    ];
    let same = |output_flag, output: &Path, other_flag, other: &Path, consequence| {
        JobListError::SameFile {
            output_flag,
            output: output.to_path_buf(),
            other_flag,
            other: other.to_path_buf(),
            consequence,
        }
    };
    for &(output_flag, output) in &outputs {
        let key = output_key(output);
        for (other_flag, other, consequence) in inputs {
            if input_key(other) == key {
                return Err(same(output_flag, output, other_flag, other, consequence));
            }
        }
    }
    if let [(_, frame), (model_flag, model)] = outputs[..] {
        if output_key(model) == output_key(frame) {
            return Err(same(
                model_flag,
                model,
                "--output",
                frame,
                "the model image would replace the frame",
            ));
        }
    }
    Ok(())
}

/// What is at a frame's output path, against what this run asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputState {
    /// Nothing: the frame must be done.
    Missing,
    /// A whole frame of this very request: it can be skipped.
    Complete,
    /// A whole frame of another request, or of inputs changed since: what differs.
    Stale(Vec<String>),
    /// A whole frame that does not say what it was extracted for (written before spextract
    /// recorded it), or one whose request cannot be compared (why).
    Unverifiable(String),
    /// Something that is not a whole frame: another kind of file, a folder, a file cut short
    /// (why).
    NotAFrame(String),
}

impl OutputState {
    /// Why the file at the path is neither missing nor complete, for a message; `None` for
    /// those two.
    pub fn problem(&self) -> Option<String> {
        match self {
            OutputState::Missing | OutputState::Complete => None,
            OutputState::Stale(diffs) => Some(format!(
                "a frame extracted for another request: {}",
                diffs.join("; ")
            )),
            OutputState::Unverifiable(why) | OutputState::NotAFrame(why) => Some(why.clone()),
        }
    }
}

/// The state of an existing output against `wanted`, this run's request for it (or why it
/// could not be made; asked only when a file is there), so that a restarted run skips what a killed one finished and nothing
/// else.
///
/// The recorded request (`pipeline::request`) is read from the FLUX header first. Then the
/// whole frame is read with `read_frame`, which checks that FLUX, IVAR, MASK, WAVELENGTH,
/// RESOLUTION and CHI2PIX are present, that their shapes agree, and fails on a file cut short:
/// `write_frame` renames only complete files into place, but a file system that does not order
/// the rename after the data can still leave one after a crash. That takes about 0.1 s for a
/// 500-fiber frame (500 x 2326 bins, 11 diagonals: 70 MB, in the page cache; a cold parallel
/// file system is slower). CHECKSUM/DATASUM are not verified: the FITS wrapper writes them but
/// does not expose cfitsio's `ffvcks`.
pub fn output_state(
    path: &Path,
    wanted: impl FnOnce() -> Result<FrameRequest, String>,
) -> OutputState {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return OutputState::Missing,
        Err(e) => return OutputState::NotAFrame(format!("cannot examine it: {e}")),
        Ok(m) if !m.is_file() => {
            return OutputState::NotAFrame("it is not a regular file".into());
        }
        Ok(_) => {}
    }
    let keys = crate::pipeline::request::KEYS;
    let recorded = match crate::io::frame::read_frame_keys(path, &keys) {
        Ok(values) => values,
        Err(e) => return OutputState::NotAFrame(format!("not a frame: {e}")),
    };
    let nodata = match crate::io::frame::read_frame(path) {
        Ok(frame) => frame
            .mask
            .iter()
            .filter(|&&m| m & crate::pipeline::frame::specmask::NODATA != 0)
            .count(),
        Err(e) => return OutputState::NotAFrame(format!("not a whole frame: {e}")),
    };
    let wanted = match wanted() {
        Ok(w) => w,
        Err(why) => {
            return OutputState::Unverifiable(format!(
                "a frame, but what this run would write there cannot be told: {why}"
            ))
        }
    };
    match wanted.compare(&recorded, nodata) {
        Comparison::Same => OutputState::Complete,
        Comparison::Differs(diffs) => OutputState::Stale(diffs),
        Comparison::Unrecorded => OutputState::Unverifiable(
            "a frame that does not record what it was extracted for (written by another \
             program, or by spextract before it recorded requests), so it cannot be told \
             whether it holds what this run asks for"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::frame::{write_frame, Frame, FrameMeta};
    use ndarray::{Array2, Array3};

    fn job(image: &str, psf: &str, output: &str) -> FrameJob {
        FrameJob {
            image: image.into(),
            psf: psf.into(),
            output: output.into(),
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn names(jobs: &[FrameJob], root: &Path) -> Vec<String> {
        jobs.iter()
            .map(|j| {
                j.output
                    .strip_prefix(root)
                    .unwrap_or(&j.output)
                    .display()
                    .to_string()
            })
            .collect()
    }

    /// A production with night 20201214: exposure 67784 has r0, r1 (gzipped) and b0;
    /// 67786 has r1 only; 67788 has a folder but no image; 67900 has r0. PSFs exist for
    /// every image, psfnight for r0 and r1.
    fn production() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let night = "20201214";
        for (expid, cams) in [
            (67784, &["r0", "r1", "b0"][..]),
            (67786, &["r1"][..]),
            (67788, &[][..]),
            (67900, &["r0"][..]),
        ] {
            let exp = format!("{expid:08}");
            std::fs::create_dir_all(root.join("preproc").join(night).join(&exp)).unwrap();
            for cam in cams {
                let gz = if *cam == "r1" { ".gz" } else { "" };
                let pre = format!("preproc/{night}/{exp}/preproc-{cam}-{exp}.fits{gz}");
                touch(&root.join(pre));
                touch(&root.join(format!("exposures/{night}/{exp}/psf-{cam}-{exp}.fits")));
            }
        }
        for cam in ["r0", "r1"] {
            touch(&root.join(format!("calibnight/{night}/psfnight-{cam}-{night}.fits")));
        }
        // Not an exposure folder: ignored by range listing.
        std::fs::create_dir_all(root.join("preproc").join(night).join("67785")).unwrap();
        dir
    }

    fn pattern(root: &Path, expid: &[Expids], camera: &[CameraSpec]) -> Selection {
        Selection {
            specprod: Some(root.to_path_buf()),
            night: vec![20201214],
            expid: expid.to_vec(),
            camera: camera.to_vec(),
            ..Selection::default()
        }
    }

    #[test]
    fn list_skips_comments_and_joins_relative_paths_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("lists");
        std::fs::create_dir(&sub).unwrap();
        let list = sub.join("frames.txt");
        std::fs::write(
            &list,
            "\u{feff}# image psf output\n\n  \t\n\
             a.fits.gz  p.fits\tout/f1.fits   # first\n\
             /abs/b.fits ../p2.fits /abs/out/f2.fits\n\
             c#1.fits p.fits f3.fits\n",
        )
        .unwrap();
        let sel = Selection {
            frames: Some(list.clone()),
            ..Selection::default()
        };
        assert!(sel.any());
        let jobs = resolve(&sel, &[], None, None).unwrap();
        assert_eq!(
            jobs,
            vec![
                FrameJob {
                    image: sub.join("a.fits.gz"),
                    psf: sub.join("p.fits"),
                    output: sub.join("out/f1.fits"),
                },
                job(
                    "/abs/b.fits",
                    &sub.join("../p2.fits").to_string_lossy(),
                    "/abs/out/f2.fits"
                ),
                FrameJob {
                    image: sub.join("c#1.fits"),
                    psf: sub.join("p.fits"),
                    output: sub.join("f3.fits"),
                },
            ]
        );
    }

    #[test]
    fn bad_list_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, "# header\na.fits p.fits o.fits\nb.fits p.fits\n").unwrap();
        let sel = Selection {
            frames: Some(list.clone()),
            ..Selection::default()
        };
        let err = resolve(&sel, &[], None, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, JobListError::ListLine { line: 3, .. }),
            "{msg}"
        );
        assert!(msg.starts_with(&format!("{}:3:", list.display())), "{msg}");
        assert!(msg.contains("found 2"), "{msg}");

        let missing = dir.path().join("nope.txt");
        let sel = Selection {
            frames: Some(missing.clone()),
            ..Selection::default()
        };
        let msg = resolve(&sel, &[], None, None).unwrap_err().to_string();
        assert!(msg.contains(&*missing.to_string_lossy()), "{msg}");
    }

    /// A list without end (/dev/zero) or larger than any list is refused, naming the file,
    /// after reading at most the limit.
    #[test]
    fn endless_or_oversized_list_is_refused() {
        let sel = |p: &Path| Selection {
            frames: Some(p.to_path_buf()),
            ..Selection::default()
        };
        let zero = Path::new("/dev/zero");
        let err = resolve(&sel(zero), &[], None, None).unwrap_err();
        assert!(matches!(err, JobListError::ListTooLarge { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/dev/zero: larger than the 64 MiB"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.txt");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_LIST_BYTES + 1)
            .unwrap();
        let err = resolve(&sel(&big), &[], None, None).unwrap_err();
        assert!(matches!(err, JobListError::ListTooLarge { .. }), "{err}");
        let err = resolve(&sel(dir.path()), &[], None, None).unwrap_err();
        assert!(matches!(err, JobListError::ReadList { .. }), "{err}");
    }

    #[test]
    fn list_with_only_comments_is_no_frames() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, "# nothing yet\n\n").unwrap();
        let sel = Selection {
            frames: Some(list.clone()),
            ..Selection::default()
        };
        let err = resolve(&sel, &[], None, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, JobListError::NoFrames(_)), "{msg}");
        assert!(
            msg.contains("has no frame lines") && msg.contains("--frames"),
            "{msg}"
        );
        let err = resolve(&Selection::default(), &[], None, None).unwrap_err();
        assert!(err.to_string().contains("--specprod DIR --night"), "{err}");
    }

    #[test]
    fn config_frames_are_relative_to_the_config_folder() {
        let cfg = crate::config::Config::parse(
            "[[frames]]\nimage = \"pre/a.fits\"\npsf = \"/psf/p.fits\"\noutput = \"out/a.fits\"\n\
             [[frames]]\nimage = \"b.fits\"\npsf = \"p.fits\"\noutput = \"b-out.fits\"\n",
        )
        .unwrap();
        assert_eq!(cfg.frames.len(), 2);
        let jobs = resolve(
            &Selection::default(),
            &cfg.frames,
            Some(Path::new("/etc/run")),
            None,
        )
        .unwrap();
        assert_eq!(
            jobs,
            vec![
                job("/etc/run/pre/a.fits", "/psf/p.fits", "/etc/run/out/a.fits"),
                job("/etc/run/b.fits", "/etc/run/p.fits", "/etc/run/b-out.fits"),
            ]
        );
        assert!(crate::config::Config::parse("[[frames]]\nimage = \"a\"\npsf = \"p\"\n").is_err());
        let err = resolve(&Selection::default(), &[job("a", "", "o")], None, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("[[frames]] entry 1 of the configuration: psf is empty"),
            "{err}"
        );
    }

    #[test]
    fn pattern_expands_ranges_arms_and_leaves_out_missing_cameras() {
        let prod = production();
        let root = prod.path();
        let sel = pattern(
            root,
            &[Expids::Range(67780, 67790)],
            &[CameraSpec::Arm('r')],
        );
        let jobs = resolve(&sel, &[], None, None).unwrap();
        assert_eq!(
            names(&jobs, root),
            [
                "exposures/20201214/00067784/frame-r0-00067784.fits",
                "exposures/20201214/00067784/frame-r1-00067784.fits",
                "exposures/20201214/00067786/frame-r1-00067786.fits",
            ]
        );
        let e = "preproc/20201214/00067784";
        assert_eq!(
            jobs[0].image,
            root.join(format!("{e}/preproc-r0-00067784.fits"))
        );
        // The .fits is absent, so the .fits.gz is taken.
        assert_eq!(
            jobs[1].image,
            root.join(format!("{e}/preproc-r1-00067784.fits.gz"))
        );
        assert_eq!(
            jobs[2].psf,
            root.join("exposures/20201214/00067786/psf-r1-00067786.fits")
        );

        // Default cameras (all 30), a single id and a range; b0 comes first (desispec order).
        let sel = pattern(
            root,
            &[Expids::One(67784), Expids::Range(67786, 67786)],
            &[],
        );
        let jobs = resolve(&sel, &[], None, None).unwrap();
        let cams: Vec<_> = jobs
            .iter()
            .map(|j| j.output.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            cams,
            [
                "frame-b0-00067784.fits",
                "frame-r0-00067784.fits",
                "frame-r1-00067784.fits",
                "frame-r1-00067786.fits",
            ]
        );
    }

    #[test]
    fn pattern_psf_night_and_output_dir() {
        let prod = production();
        let root = prod.path();
        let mut sel = pattern(root, &[Expids::One(67784)], &[CameraSpec::One('r', 1)]);
        sel.psf_source = Some(PsfSource::Night);
        sel.output_dir = Some(PathBuf::from("/scratch/frames"));
        let jobs = resolve(&sel, &[], None, None).unwrap();
        assert_eq!(
            jobs,
            vec![FrameJob {
                image: root.join("preproc/20201214/00067784/preproc-r1-00067784.fits.gz"),
                psf: root.join("calibnight/20201214/psfnight-r1-20201214.fits"),
                output: PathBuf::from("/scratch/frames/20201214/00067784/frame-r1-00067784.fits"),
            }]
        );
    }

    #[test]
    fn pattern_errors_name_what_is_missing() {
        let prod = production();
        let root = prod.path();
        // An exposure under none of the nights.
        let sel = pattern(root, &[Expids::One(67784), Expids::One(67785)], &[]);
        let err = resolve(&sel, &[], None, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, JobListError::ExposuresNotFound { .. }),
            "{msg}"
        );
        assert!(msg.contains("67785") && msg.contains("20201214"), "{msg}");
        // A range that holds nothing.
        let sel = pattern(root, &[Expids::Range(1, 100)], &[]);
        let msg = resolve(&sel, &[], None, None).unwrap_err().to_string();
        assert!(msg.contains("1-100"), "{msg}");
        // A named exposure without any of the cameras asked for ...
        let sel = pattern(root, &[Expids::One(67786)], &[CameraSpec::Arm('z')]);
        let err = resolve(&sel, &[], None, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, JobListError::NoCameras { .. }), "{msg}");
        assert!(msg.contains("00067786") && msg.contains("z9"), "{msg}");
        let sel = pattern(root, &[Expids::One(67788)], &[]);
        assert!(matches!(
            resolve(&sel, &[], None, None),
            Err(JobListError::NoCameras { .. })
        ));
        // ... while in a range that exposure is only left out.
        let sel = pattern(
            root,
            &[Expids::Range(67786, 67900)],
            &[CameraSpec::One('r', 0)],
        );
        let jobs = resolve(&sel, &[], None, None).unwrap();
        assert_eq!(
            names(&jobs, root),
            ["exposures/20201214/00067900/frame-r0-00067900.fits"]
        );
        // A range whose exposures all lack the cameras asked for.
        let sel = pattern(
            root,
            &[Expids::Range(67786, 67788)],
            &[CameraSpec::Arm('z')],
        );
        let err = resolve(&sel, &[], None, None).unwrap_err();
        assert!(matches!(err, JobListError::NoFrames(_)), "{err}");
        assert!(
            err.to_string().contains("no preproc image of the cameras"),
            "{err}"
        );
        // Flags that need each other.
        let sel = Selection {
            night: vec![20201214],
            ..Selection::default()
        };
        let msg = resolve(&sel, &[], None, None).unwrap_err().to_string();
        assert!(
            msg.contains("--night") && msg.contains("--specprod"),
            "{msg}"
        );
        let mut sel = pattern(root, &[], &[]);
        sel.night.clear();
        let msg = resolve(&sel, &[], None, None).unwrap_err().to_string();
        assert!(msg.contains("needs --night"), "{msg}");
        let sel = pattern(&root.join("missing"), &[Expids::One(1)], &[]);
        let msg = resolve(&sel, &[], None, None).unwrap_err().to_string();
        assert!(msg.contains("is this a desispec production"), "{msg}");
    }

    #[test]
    fn sources_combine_and_duplicate_outputs_are_errors() {
        let prod = production();
        let root = prod.path();
        let list = root.join("frames.txt");
        let frame = "exposures/20201214/00067900/frame-r0-00067900.fits";
        std::fs::write(&list, "a.fits p.fits extra.fits\n").unwrap();
        let mut sel = pattern(root, &[Expids::One(67900)], &[]);
        sel.frames = Some(list.clone());
        let single = job("s.fits", "p.fits", "/tmp/single.fits");
        let jobs = resolve(
            &sel,
            &[job("c.fits", "p.fits", "c-out.fits")],
            Some(root),
            Some(single),
        )
        .unwrap();
        assert_eq!(
            names(&jobs, root),
            ["/tmp/single.fits", "c-out.fits", "extra.fits", frame]
        );

        // The list names the pattern's output again, spelled with `./`.
        std::fs::write(&list, format!("# x\na.fits p.fits ./{frame}\n")).unwrap();
        let err = resolve(&sel, &[], None, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, JobListError::DuplicateOutput { .. }), "{msg}");
        assert!(msg.contains(&format!("{}:2", list.display())), "{msg}");
        assert!(msg.contains("expid 67900 camera r0"), "{msg}");

        // Configuration and single frame, one relative and one absolute.
        let cwd = std::env::current_dir().unwrap();
        let single = job("s.fits", "p.fits", &cwd.join("o.fits").to_string_lossy());
        let err = resolve(
            &Selection::default(),
            &[job("a.fits", "p.fits", "./o.fits")],
            None,
            Some(single),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--image/--psf/--output") && msg.contains("entry 1"),
            "{msg}"
        );

        // An output that is another frame's input.
        let err = resolve(
            &Selection::default(),
            &[
                job("a.fits", "p.fits", "b.fits"),
                job("b.fits", "p.fits", "c.fits"),
            ],
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, JobListError::OutputIsInput { .. }), "{err}");
    }

    fn small_frame() -> Frame {
        let (nspec, nwave) = (3, 20);
        let grid = |k: f64| Array2::from_shape_fn((nspec, nwave), move |(s, w)| k * (s + w) as f64);
        Frame {
            specmin: 0,
            wave: (0..nwave).map(|i| 5760.0 + 0.8 * i as f64).collect(),
            flux: grid(1.0),
            ivar: grid(0.5),
            mask: Array2::zeros((nspec, nwave)),
            resolution: Array3::from_elem((nspec, 5, nwave), 0.2),
            chi2pix: grid(0.25),
        }
    }

    /// This run's request for a frame of `dir`'s image and PSF (small stand-in files).
    fn wanted(dir: &Path, nspec: usize) -> Result<FrameRequest, String> {
        for f in ["img.fits", "psf.fits"] {
            if !dir.join(f).exists() {
                std::fs::write(dir.join(f), f).unwrap();
            }
        }
        let mut cfg = crate::config::Config::default();
        cfg.extract.nspec = nspec;
        FrameRequest::new(&cfg, &dir.join("img.fits"), &dir.join("psf.fits"))
            .map_err(|e| e.to_string())
    }

    fn meta_of(req: &Result<FrameRequest, String>) -> FrameMeta {
        FrameMeta {
            extra: req.as_ref().unwrap().cards(),
            ..FrameMeta::default()
        }
    }

    #[test]
    fn output_state_tells_complete_from_stale_unverifiable_and_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frame-r0-00067784.fits");
        let want = wanted(dir.path(), 3);
        assert_eq!(output_state(&path, || want.clone()), OutputState::Missing);
        write_frame(&path, &small_frame(), &meta_of(&want), false).unwrap();
        assert_eq!(output_state(&path, || want.clone()), OutputState::Complete);

        // Another request over the same file (issue 12, item 1).
        let OutputState::Stale(diffs) = output_state(&path, || wanted(dir.path(), 20)) else {
            panic!("a frame of -n 3 passed for -n 20");
        };
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(
            diffs[0].contains("-n 3") && diffs[0].contains("-n 20"),
            "{diffs:?}"
        );
        // The same request, from before the patches at the CCD's edge were extracted: whole
        // without NODATA bins, stale with them (it may have dropped such patches).
        let mut before = meta_of(&want);
        before
            .extra
            .retain(|c| c.0 != crate::pipeline::request::CCD_EDGE_KEY);
        let pre_edge = dir.path().join("pre-edge.fits");
        write_frame(&pre_edge, &small_frame(), &before, false).unwrap();
        assert_eq!(
            output_state(&pre_edge, || want.clone()),
            OutputState::Complete
        );
        let mut dropped = small_frame();
        dropped.mask[[1, 0]] = crate::pipeline::frame::specmask::NODATA;
        write_frame(&pre_edge, &dropped, &before, true).unwrap();
        let OutputState::Stale(diffs) = output_state(&pre_edge, || want.clone()) else {
            panic!("a frame that may have dropped edge patches passed");
        };
        assert!(diffs[0].contains("CCD's edge"), "{diffs:?}");
        write_frame(&pre_edge, &dropped, &meta_of(&want), true).unwrap();
        assert_eq!(
            output_state(&pre_edge, || want.clone()),
            OutputState::Complete
        );
        // A frame that records no request, or a request that cannot be made.
        let old = dir.path().join("old.fits");
        write_frame(&old, &small_frame(), &FrameMeta::default(), false).unwrap();
        let OutputState::Unverifiable(why) = output_state(&old, || want.clone()) else {
            panic!("a frame without a request passed");
        };
        assert!(
            why.contains("does not record what it was extracted for"),
            "{why}"
        );
        let OutputState::Unverifiable(why) = output_state(&path, || Err("img.fits: gone".into()))
        else {
            panic!("passed without a request to compare");
        };
        assert!(why.contains("img.fits: gone"), "{why}");

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() % 2880, 0);
        for keep in [bytes.len() - 2880, bytes.len() / 2, 2880, 100, 0] {
            let cut = dir.path().join(format!("cut-{keep}.fits"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            let OutputState::NotAFrame(why) = output_state(&cut, || want.clone()) else {
                panic!("{keep} of {} bytes passed as complete", bytes.len());
            };
            assert!(why.contains(&*cut.to_string_lossy()), "{why}");
        }
        // Not a frame at all.
        let other = dir.path().join("other.fits");
        let pixels = Array2::zeros((4, 4));
        let model = crate::io::ModelImage {
            pixels: &pixels,
            flux: "deconvolved",
            specmin: 0,
            nspec: 1,
            wave: &[],
        };
        crate::io::frame::write_model_image(&other, &model, false).unwrap();
        let OutputState::NotAFrame(why) = output_state(&other, || want.clone()) else {
            panic!("a model image passed as a frame");
        };
        assert!(why.contains("FLUX"), "{why}");
        assert!(matches!(
            output_state(dir.path(), || want.clone()),
            OutputState::NotAFrame(_)
        ));
    }

    /// One output spelled through a linked folder, or with `//` and `..` (issue 12, item 4).
    #[test]
    fn duplicate_outputs_are_found_however_they_are_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("out/x")).unwrap();
        std::os::unix::fs::symlink(d.join("out"), d.join("link")).unwrap();
        for second in ["link/a.fits", "out//x/../a.fits", "out/x/../../out/a.fits"] {
            let list = d.join("frames.txt");
            std::fs::write(&list, format!("i1 p out/a.fits\ni2 p {second}\n")).unwrap();
            let sel = Selection {
                frames: Some(list.clone()),
                ..Selection::default()
            };
            let err = resolve(&sel, &[], None, None).unwrap_err();
            assert!(
                matches!(err, JobListError::DuplicateOutput { .. }),
                "{second}: {err}"
            );
            assert!(err.to_string().contains(":2"), "{err}");
        }
        // An output that is an input through a link.
        std::fs::write(d.join("psf.fits"), b"p").unwrap();
        let err = resolve(
            &Selection::default(),
            &[job("i", "psf.fits", "link/../psf.fits")],
            Some(d),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, JobListError::OutputIsInput { .. }), "{err}");
    }

    /// Single-frame mode refuses what list mode refuses (issue 12, item 2).
    #[test]
    fn single_frame_outputs_are_not_its_inputs_nor_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("psf.fits"), b"p").unwrap();
        std::fs::write(d.join("img.fits"), b"i").unwrap();
        std::os::unix::fs::symlink(d.join("img.fits"), d.join("sub/img-link.fits")).unwrap();
        let frame = |o: &Path| FrameJob {
            image: d.join("sub/img-link.fits"),
            psf: d.join("psf.fits"),
            output: o.to_path_buf(),
        };
        let cases: [(PathBuf, Option<PathBuf>, &str); 4] = [
            (d.join("sub/../psf.fits"), None, "--output"),
            (d.join("img.fits"), None, "--image"),
            (
                d.join("f.fits"),
                Some(d.join("sub//../f.fits")),
                "replace the frame",
            ),
            (d.join("f.fits"), Some(d.join("psf.fits")), "--model-image"),
        ];
        for (output, model, needle) in cases {
            let err = check_single_outputs(&frame(&output), model.as_deref()).unwrap_err();
            assert!(matches!(err, JobListError::SameFile { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        check_single_outputs(&frame(&d.join("f.fits")), Some(&d.join("m.fits"))).unwrap();
    }
}
