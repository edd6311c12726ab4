//! The end-of-run summary: what every run prints on rank 0 and, with `--report`, writes as
//! JSON so that runs (CPU nodes against GPU nodes, one build against another) can be compared
//! by `spextract report`.
//!
//! Imports nothing of the crate: the report is plain data.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Schema version of [`RunReport`]; bumped when a field changes meaning.
pub const REPORT_VERSION: u32 = 1;

/// One run of `spextract extract`, as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// spextract's version.
    pub spextract: String,
    /// A free label for tables and charts (`--label`, else `<backend> x<nodes>`).
    pub label: String,
    /// Backend of the compute ranks ("cpu" or "gpu").
    pub backend: String,
    /// Nodes (shared-memory groups) in the job.
    pub nodes: usize,
    /// MPI ranks in the job (1 when run without MPI).
    pub ranks: usize,
    /// Worker threads per compute rank.
    pub threads_per_rank: usize,
    /// Seconds from start to the last write.
    pub wall_s: f64,
    /// How the listed frames ended.
    pub frames: FrameCounts,
    /// Frames written per node-hour: `written / (wall_s · nodes / 3600)`.
    pub frames_per_node_hour: f64,
    /// Bytes moved between ranks (work units and results), per written frame.
    pub bytes_per_frame: f64,
    /// Whether a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) stopped the run before every
    /// frame was done.
    pub interrupted: bool,
    /// Per-rank time split.
    pub roles: Vec<RoleTimes>,
    /// Frames that failed, with why.
    pub failures: Vec<FrameFailure>,
}

/// Frames by final state; every listed frame is in exactly one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameCounts {
    /// Frames in the list.
    pub listed: usize,
    /// Extracted and written this run.
    pub written: usize,
    /// Already complete on disk, left alone.
    pub skipped: usize,
    /// Failed (bad input, or every patch failed).
    pub failed: usize,
    /// Not finished because the run was interrupted.
    pub abandoned: usize,
}

/// Where one rank spent its time, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleTimes {
    /// World rank (0 without MPI).
    pub rank: usize,
    /// Node (group) index.
    pub node: usize,
    /// "reader", "writer", "compute", or several joined by '+' when one rank plays them.
    pub role: String,
    /// Reading FITS files and cutting work units.
    pub read_s: f64,
    /// Sending and receiving work units and results.
    pub transfer_s: f64,
    /// Extracting patches.
    pub compute_s: f64,
    /// Assembling and writing frames.
    pub write_s: f64,
    /// Waiting with nothing to do.
    pub idle_s: f64,
    /// Work units this rank handled.
    pub units: usize,
    /// Bytes this rank sent to other ranks.
    pub bytes_sent: u64,
    /// Peak resident memory of the rank (MiB), which the prefetch depth bounds on readers.
    #[serde(default)]
    pub peak_rss_mib: f64,
    /// Units whose pixels came in GPU memory (the cuda-aware-mpi path).
    #[serde(default)]
    pub device_units: usize,
    /// Of those, units whose pixels had to be downloaded to the host for a CPU retry.
    #[serde(default)]
    pub pixel_downloads: usize,
    /// Seconds spent receiving each kind of MPI message (header and parts), and how many.
    #[serde(default)]
    pub received: Vec<(String, f64, usize)>,
}

/// A frame that did not make it, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameFailure {
    /// The preproc image.
    pub image: PathBuf,
    /// The intended output.
    pub output: PathBuf,
    /// The error, one line.
    pub error: String,
}

/// Why a report could not be read, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be read.
    #[error("{}: {why}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's complaint.
        why: String,
    },
    /// The file is not a report's JSON.
    #[error("{}: not a spextract report: {why}", .path.display())]
    NotAReport {
        /// The file.
        path: PathBuf,
        /// serde_json's complaint.
        why: String,
    },
    /// A report of another schema version.
    #[error(
        "{}: report version {version} (this spextract reads version {REPORT_VERSION})",
        .path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
}

impl RunReport {
    /// Writes the report as pretty JSON, atomically (temporary file, then rename).
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        std::fs::write(&tmp, text + "\n")?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Reads a report written by [`RunReport::write_json`].
    pub fn read_json(path: &Path) -> Result<RunReport, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|e| ReportError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let rep: RunReport = serde_json::from_str(&text).map_err(|e| ReportError::NotAReport {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if rep.version != REPORT_VERSION {
            return Err(ReportError::Version {
                path: path.to_path_buf(),
                version: rep.version,
            });
        }
        Ok(rep)
    }

    /// `written / node-hours`; 0 when nothing was timed.
    pub fn compute_rate(written: usize, wall_s: f64, nodes: usize) -> f64 {
        let node_hours = wall_s * nodes.max(1) as f64 / 3600.0;
        if node_hours > 0.0 {
            written as f64 / node_hours
        } else {
            0.0
        }
    }
}

/// Peak resident memory of this process so far, in MiB (Linux `ru_maxrss`).
pub fn peak_rss_mib() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer we pass; it is zero-initialised
    // storage of the right type and size that outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage returned 0, so it filled the struct.
    let usage = unsafe { usage.assume_init() };
    usage.ru_maxrss as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let rep = RunReport {
            version: REPORT_VERSION,
            label: "cpu x1".into(),
            nodes: 2,
            wall_s: 30.0,
            frames: FrameCounts {
                listed: 3,
                written: 2,
                failed: 1,
                ..Default::default()
            },
            frames_per_node_hour: RunReport::compute_rate(2, 30.0, 2),
            roles: vec![RoleTimes {
                role: "reader".into(),
                read_s: 1.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        rep.write_json(&path).unwrap();
        assert_eq!(RunReport::read_json(&path).unwrap(), rep);
        assert_eq!(rep.frames_per_node_hour, 120.0);
    }
}
