//! `spextract report`: being written (issue 3).

use clap::Args;

/// `spextract report`.
#[derive(Debug, Args)]
pub struct ReportArgs {}

/// Prints the comparison.
pub fn run(_args: &ReportArgs) -> anyhow::Result<()> {
    anyhow::bail!("report is not written yet")
}
