//! `spextract doctor`: being written (issue 3).

use clap::Args;

/// `spextract doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {}

/// Runs the checks; false when one failed.
pub fn run(_args: &DoctorArgs) -> anyhow::Result<bool> {
    anyhow::bail!("doctor is not written yet")
}
