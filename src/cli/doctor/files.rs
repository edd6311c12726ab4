//! Output folders (`--output-dir`): each exists, accepts a new file (created, written and
//! removed again) and has room. Imports the findings type and `pipeline::env` (the free space
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

/// Findings on one folder a run will write to.
pub(super) fn output_dir_findings(dir: &Path, probe_name: &str) -> Vec<Finding> {
    let shown = dir.display();
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

    #[test]
    fn missing_folder_or_a_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let f = output_dir_findings(&missing, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(
            f[0].found.ends_with("nope: does not exist"),
            "{}",
            f[0].found
        );
        assert!(f[0].hint.as_deref().unwrap().contains("mkdir -p"));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let f = output_dir_findings(&file, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.ends_with("is not a folder"), "{}", f[0].found);
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
