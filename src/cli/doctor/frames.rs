//! A frame list (`--frames`), read as `extract` reads it: every input file readable, every
//! output folder writable or makeable, and how many outputs are already there. Imports the
//! findings type, the folder check of `files` and `cli::select` and `pipeline::joblist` (the list's reader).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use super::files::{check_writable_dir, output_dir_findings};
use super::{count, Finding, Status};
use crate::cli::select::{self, FrameSelection};
use crate::pipeline::joblist::JobListError;

/// How many problems of one kind are listed before the rest are counted.
const MAX_LISTED: usize = 10;

/// Why `path` cannot be read as an input file, if it cannot.
fn check_readable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a folder, not a file".to_string());
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    file.read(&mut byte).map_err(|e| e.to_string())?;
    // Opening is not reading: a copy cut short opens fine and fails mid-run.
    match super::fits_size::incomplete_fits(path) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

/// Problems of one kind, listed up to [`MAX_LISTED`] and counted after.
fn capped(mut found: Vec<Finding>, what: &str, hint: &str) -> Vec<Finding> {
    if found.len() > MAX_LISTED {
        let more = found.len() - MAX_LISTED;
        found.truncate(MAX_LISTED);
        found.push(Finding::fail(
            "frames",
            format!("... and {more} more {what}"),
            hint,
        ));
    }
    found
}

/// Checks an output folder of a frame list; true when it does not exist yet. The pipeline
/// creates missing output folders, so then the nearest folder that exists must accept new ones.
fn frame_folder_findings(folder: &Path, probe_name: &str) -> (Vec<Finding>, bool) {
    if std::fs::metadata(folder).is_ok() {
        return (output_dir_findings(folder, probe_name), false);
    }
    let base = super::files::nearest_existing(folder);
    let found = match check_writable_dir(base, probe_name) {
        Ok(_) => Vec::new(),
        Err(e) => vec![Finding::fail(
            "frames",
            format!(
                "output folder {} does not exist and cannot be made: {} {e}",
                folder.display(),
                base.display()
            ),
            "correct the outputs in the list, or create the folder where you may write",
        )],
    };
    (found, true)
}

/// Checks a `--frames` list as `extract` reads it (through [`select::resolve`], so relative
/// paths start from the list's folder): every input readable, every output folder writable.
pub(super) fn frames_findings(list: &Path, probe_name: &str) -> Vec<Finding> {
    let shown = list.display();
    let selection = FrameSelection {
        frames: Some(list.to_path_buf()),
        ..FrameSelection::default()
    };
    let jobs = match select::resolve(&selection, &[], None, None) {
        Ok(jobs) => jobs,
        Err(JobListError::NoFrames(_)) => {
            return vec![Finding::warn(
                "frames",
                format!("{shown} lists no frame"),
                "add one `image psf output` line per frame",
            )]
        }
        Err(e) => {
            let hint = match e {
                JobListError::ReadList { .. } => "check the path of the list",
                JobListError::ListTooLarge { .. } => {
                    "check the path of the list; split a list that long into several runs"
                }
                JobListError::ListLine { .. } => {
                    "write one frame per line: image, PSF and output paths separated by spaces"
                }
                JobListError::DuplicateOutput { .. } | JobListError::OutputIsInput { .. } => {
                    "give every frame its own output, apart from every input"
                }
                _ => "correct the list as the message says",
            };
            return vec![Finding::fail("frames", e.to_string(), hint)];
        }
    };
    let mut out = Vec::new();
    // Each input once (a PSF serves many frames), with the first frame naming it.
    let mut inputs: BTreeMap<&Path, usize> = BTreeMap::new();
    let mut folders: BTreeSet<&Path> = BTreeSet::new();
    let mut existing = 0;
    for (i, job) in jobs.iter().enumerate() {
        inputs.entry(&job.image).or_insert(i + 1);
        inputs.entry(&job.psf).or_insert(i + 1);
        folders.insert(match job.output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        });
        if job.output.exists() {
            existing += 1;
        }
    }
    let unreadable: Vec<Finding> = inputs
        .iter()
        .filter_map(|(path, frame)| {
            check_readable(path).err().map(|e| {
                Finding::fail(
                    "frames",
                    format!("{} (frame {frame} of {shown}): {e}", path.display()),
                    "correct the path in the list, or the file's permissions",
                )
            })
        })
        .collect();
    let unreadable_count = unreadable.len();
    out.extend(capped(
        unreadable,
        "unreadable inputs",
        "correct the paths in the list, or the files' permissions",
    ));
    let (mut writable, mut to_create) = (0, 0);
    for folder in &folders {
        let (found, creating) = frame_folder_findings(folder, probe_name);
        if found.iter().all(|f| f.status != Status::Fail) {
            writable += 1;
            to_create += usize::from(creating);
        }
        // A writable folder is counted in the summary; only its problems are listed.
        out.extend(found.into_iter().filter(|f| f.status != Status::Ok));
    }
    let exist = if existing > 0 {
        format!(
            "; outputs already there: {existing} (extract skips frames of the same request and \
             refuses to start over any other file there, unless --overwrite)"
        )
    } else {
        String::new()
    };
    let summary = format!(
        "{shown}: {}; {} of {} readable; {writable} of {} writable{}{exist}",
        count(jobs.len(), "frame"),
        inputs.len() - unreadable_count,
        count(inputs.len(), "input file"),
        count(folders.len(), "output folder"),
        if to_create > 0 {
            format!(" ({to_create} to be created by extract)")
        } else {
            String::new()
        },
    );
    out.insert(0, Finding::ok("frames", summary));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, with_status, PROBE};

    #[test]
    fn frame_list_inputs_and_output_folders_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fits = super::super::fits_size::small_fits();
        std::fs::write(d.join("image.fits"), &fits).unwrap();
        std::fs::write(d.join("psf.fits"), &fits).unwrap();
        // A copy cut short opens and reads fine, but is not a whole input.
        std::fs::write(d.join("cut.fits"), &fits[..fits.len() - 5000]).unwrap();
        std::fs::create_dir(d.join("out")).unwrap();
        std::fs::write(d.join("out/done.fits"), "x").unwrap();
        std::fs::create_dir(d.join("afolder")).unwrap();
        // Relative paths start from the list's folder, as extract reads them.
        let list = d.join("frames.txt");
        std::fs::write(
            &list,
            "# image psf output\n\
             image.fits psf.fits out/a.fits\n\
             image.fits psf.fits out/done.fits  # already done\n\
             missing.fits psf.fits out/c.fits\n\
             afolder psf.fits new/d.fits\n\
             image.fits psf.fits psf.fits/sub/e.fits\n\
             cut.fits psf.fits out/f.fits\n",
        )
        .unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(f[0].status, Status::Ok, "{f:?}");
        assert!(
            f[0].found.contains(
                "6 frames; 2 of 5 input files readable; 2 of 3 output folders writable (1 to \
                 be created by extract); outputs already there: 1"
            ),
            "{}",
            f[0].found
        );
        let fails: Vec<&str> = with_status(&f, Status::Fail)
            .iter()
            .map(|x| x.found.as_str())
            .collect();
        assert_eq!(fails.len(), 4, "{fails:?}");
        assert!(
            fails[0].contains("afolder (frame 4 of")
                && fails[0].ends_with("is a folder, not a file")
        );
        assert!(
            fails[1].contains("cut.fits (frame 6 of")
                && fails[1].contains("cut short: 15160 bytes, but HDU 2 announces data up to"),
            "{}",
            fails[1]
        );
        assert!(
            fails[2].contains("missing.fits (frame 3 of"),
            "{}",
            fails[2]
        );
        assert!(
            fails[3].contains("psf.fits/sub does not exist and cannot be made")
                && fails[3].ends_with("psf.fits is not a folder"),
            "{}",
            fails[3]
        );
        // The probe left nothing behind, and the folder to create was not created.
        assert!(!d.join("new").exists());
        assert!(!d.join(PROBE).exists() && !d.join("out").join(PROBE).exists());
    }

    #[test]
    fn malformed_missing_or_empty_frame_lists_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, "a.fits b.fits\n").unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("frames.txt:1"), "{}", f[0].found);
        let f = frames_findings(&dir.path().join("absent.txt"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("absent.txt"), "{}", f[0].found);
        // A list without end is refused once past the limit, not read into memory forever.
        let f = frames_findings(Path::new("/dev/zero"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(
            f[0].found.starts_with("/dev/zero: larger than"),
            "{}",
            f[0].found
        );
        std::fs::write(&list, "# nothing yet\n\n").unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(statuses(&f), [Status::Warn]);
        assert!(f[0].found.ends_with("lists no frame"), "{}", f[0].found);
    }

    #[test]
    fn many_unreadable_inputs_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let lines: String = (0..15)
            .map(|i| format!("img{i}.fits psf.fits out/f{i}.fits\n"))
            .collect();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, lines).unwrap();
        let f = frames_findings(&list, PROBE);
        let fails = with_status(&f, Status::Fail);
        assert_eq!(fails.len(), MAX_LISTED + 1);
        assert_eq!(fails[MAX_LISTED].found, "... and 6 more unreadable inputs");
    }
}
