//! Output folders (`--output-dir`): each exists, or can be made as extract makes the folders
//! it writes to, accepts a new file (created, written and removed again) and has room. Imports the findings type and `pipeline::env` (the free space
//! of a file system); the checks use std::fs only.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{gib, Finding};
use crate::pipeline::env;

/// What writing into a folder showed.
#[derive(Debug)]
pub(super) struct DirCheck {
    free: Option<u64>,
    /// The probe file could be created but not removed: its path and the error.
    leftover: Option<(PathBuf, String)>,
}

/// Checks that `dir` exists and accepts new files, by creating and removing `probe_name` in it.
pub(super) fn check_writable_dir(dir: &Path, probe_name: &str) -> Result<DirCheck, String> {
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => e.to_string(),
    })?;
    if !meta.is_dir() {
        return Err("is not a folder".to_string());
    }
    let probe = dir.join(probe_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| format!("cannot create files in it: {e}"))?;
    // A write, not just a create: a full disk or an exhausted quota fails only here.
    let written = file.write_all(b"spextract doctor write probe\n");
    drop(file);
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| format!("cannot write files in it: {e}"))?;
    Ok(DirCheck {
        free: env::free_bytes(dir),
        leftover: removed.err().map(|e| (probe, e.to_string())),
    })
}

/// Below this, a folder is reported as nearly full (a frame is tens of MB).
const LOW_FREE_BYTES: u64 = 1 << 30;

/// The nearest folder above `dir` that exists (`.` for a relative path none of whose folders
/// do).
pub(super) fn nearest_existing(dir: &Path) -> &Path {
    dir.ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| std::fs::metadata(a).is_ok())
        .unwrap_or(Path::new("."))
}

/// Findings on one folder a run will write to. One rule with `--frames`: a folder that does
/// not exist yet is fine when it can be made, since extract creates the folders it writes to.
pub(super) fn output_dir_findings(dir: &Path, probe_name: &str) -> Vec<Finding> {
    let shown = dir.display();
    if std::fs::symlink_metadata(dir).is_err() {
        let base = nearest_existing(dir);
        return vec![match check_writable_dir(base, probe_name) {
            Ok(_) => Finding::ok(
                "output",
                format!(
                    "{shown}: does not exist yet; extract creates it (in {}, which accepts new \
                     folders)",
                    base.display()
                ),
            ),
            Err(e) => Finding::fail(
                "output",
                format!(
                    "{shown}: does not exist and cannot be made: {} {e}",
                    base.display()
                ),
                format!("correct the path, or create it where you may write (mkdir -p {shown})"),
            ),
        }];
    }
    match check_writable_dir(dir, probe_name) {
        Err(e) => vec![Finding::fail(
            "output",
            format!("{shown}: {e}"),
            if e == "does not exist" {
                format!("create it (mkdir -p {shown}) or correct the path")
            } else {
                format!("choose a folder you may write to, or fix its permissions (ls -ld {shown})")
            },
        )],
        Ok(check) => {
            let mut out = Vec::new();
            let free = check
                .free
                .map_or(String::new(), |f| format!(", {} free", gib(f)));
            out.push(match check.free {
                Some(f) if f < LOW_FREE_BYTES => Finding::warn(
                    "output",
                    format!("{shown}: writable, but only {} free", gib(f)),
                    "free space or write elsewhere; check your quota too (quotas are not shown)",
                ),
                _ => Finding::ok("output", format!("{shown}: writable{free}")),
            });
            if let Some((probe, e)) = check.leftover {
                out.push(Finding::warn(
                    "output",
                    format!("{shown}: the probe file {} stays: {e}", probe.display()),
                    format!("remove it by hand (rm {})", probe.display()),
                ));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, Status, PROBE};

    #[test]
    fn writable_folder_is_ok_and_keeps_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        let f = output_dir_findings(dir.path(), PROBE);
        assert_eq!(f[0].topic, "output");
        assert_ne!(f[0].status, Status::Fail, "{f:?}");
        assert!(f[0].found.contains("writable"), "{}", f[0].found);
        assert!(!dir.path().join(PROBE).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// The rule of `--frames` too: a folder extract can make is fine, one it cannot is not.
    #[test]
    fn missing_folder_is_fine_when_it_can_be_made_and_a_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/deeper");
        let f = output_dir_findings(&missing, PROBE);
        assert_eq!(statuses(&f), [Status::Ok], "{f:?}");
        assert!(
            f[0].found
                .contains("deeper: does not exist yet; extract creates it"),
            "{}",
            f[0].found
        );
        assert!(!dir.path().join("nope").exists(), "doctor made the folder");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let f = output_dir_findings(&file, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.ends_with("is not a folder"), "{}", f[0].found);
        let f = output_dir_findings(&file.join("sub"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(
            f[0].found
                .contains("sub: does not exist and cannot be made")
                && f[0].found.ends_with("is not a folder"),
            "{}",
            f[0].found
        );
        assert!(f[0].hint.as_deref().unwrap().contains("mkdir -p"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn folder_refusing_new_files_fails() {
        // /proc takes no new files even from root, so this holds whoever runs the tests.
        let f = output_dir_findings(Path::new("/proc"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("cannot create files"), "{}", f[0].found);
    }
}
