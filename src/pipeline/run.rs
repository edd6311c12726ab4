//! The many-frame pipeline: roles, queues and scheduling (being written, issue 3).

use anyhow::Result;

use crate::cli::ExtractArgs;

/// Runs every listed frame; false when any failed.
pub fn run(_args: &ExtractArgs) -> Result<bool> {
    anyhow::bail!("the many-frame pipeline is not written yet")
}
