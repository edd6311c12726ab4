//! The frames a run must do: from a list file, from `[[frames]]` in the configuration, or from
//! a night/exposure/camera pattern over desispec's directory layout.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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

/// The command-line ways of naming many frames (flattened into `spextract extract`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FrameSelection {
    /// A list of frames: one `image psf output` triple per line.
    #[arg(long)]
    pub frames: Option<PathBuf>,
}

impl FrameSelection {
    /// Whether any many-frame option was given.
    pub fn any(&self) -> bool {
        self.frames.is_some()
    }
}
