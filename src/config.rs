//! `pipeline.toml`: the documented defaults, merged with the command line
//! (precedence: command line > file > built-in default).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::patch::PatchOptions;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// The file is larger than a configuration can be (a device such as /dev/zero, or the
    /// wrong file).
    #[error(
        "{}: larger than the {} MiB a configuration file may be; is it the right file?",
        .path.display(),
        MAX_CONFIG_BYTES >> 20
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Most bytes a configuration file may have: the documented file is 5 kB, and 8 MiB still
/// holds some 40 000 `[[frames]]` entries.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// What to extract and how.
    pub extract: ExtractConfig,
    /// How frames are cut into patches.
    pub patch: PatchOptions,
    /// How the run uses the machine.
    pub run: RunConfig,
    /// Frames to extract (`[[frames]]` with image, psf and output); relative paths are relative
    /// to the configuration file's folder (see `pipeline::joblist::resolve`).
    pub frames: Vec<crate::pipeline::joblist::FrameJob>,
}

/// The `[extract]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Output grid `[wmin, wmax, dw]` in Ångström; empty means the camera default from the
    /// image's CAMERA header (b 3600–5800, r 5760–7620, z 7520–9824, dw 0.8).
    pub wavelength: Vec<f64>,
    /// First fiber to extract.
    pub specmin: usize,
    /// Fibers to extract; 0 means all from `specmin` to the PSF's last.
    pub nspec: usize,
    /// Tikhonov regularisation of well-constrained unknowns.
    pub regularize: f64,
    /// PSF model error for chi2pix; negative means the PSF header's PSFERR, else 0.01.
    pub psferr: f64,
    /// Mask bits of the preproc MASK that zero ivar (desispec: 0x2FF).
    pub mask_bits: i32,
    /// Extract an image whose CAMERA differs from its PSF's (refused otherwise).
    pub allow_camera_mismatch: bool,
    /// Which flux the model image (`-m`) projects: "deconvolved" (reproduces the pixels) or
    /// "decorrelated" (gpu_specter's image).
    pub model_flux: crate::extract::ModelFlux,
    /// Extract twice, the second time with each pixel's variance from the first pass's model
    /// instead of the pixel (single frames and lists).
    pub ivar_from_model: bool,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            wavelength: Vec::new(),
            specmin: 0,
            nspec: 0,
            regularize: 0.0,
            psferr: -1.0,
            mask_bits: 0x2FF,
            allow_camera_mismatch: false,
            model_flux: crate::extract::ModelFlux::Deconvolved,
            ivar_from_model: false,
        }
    }
}

/// The `[run]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Worker threads per compute rank; 0 means SLURM_CPUS_PER_TASK, else the cores available.
    pub threads: usize,
    /// Show a progress bar on a terminal.
    pub progress: Option<bool>,
    /// Backend of the compute ranks: "auto", "cpu" or "gpu".
    pub backend: crate::extract::engine::BackendKind,
    /// Reader ranks per node in an MPI job.
    pub readers_per_node: usize,
    /// Writer ranks per node in an MPI job.
    pub writers_per_node: usize,
    /// Frames each reader holds read and cut ahead of the compute ranks; 0 = strictly
    /// sequential (read, extract, write, then the next frame; one process only).
    pub prefetch: usize,
    /// Bundles per work unit.
    pub unit_bundles: usize,
    /// Compute ranks sharing one GPU (several only under NVIDIA MPS).
    pub ranks_per_gpu: usize,
    /// Seconds without progress before a rank reports what it waits on (0: never); after
    /// three such periods it ends the job.
    pub watchdog: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            threads: 0,
            progress: None,
            backend: crate::extract::engine::BackendKind::Auto,
            readers_per_node: 1,
            writers_per_node: 1,
            prefetch: 2,
            unit_bundles: 2,
            ranks_per_gpu: 1,
            watchdog: 600.0,
        }
    }
}

impl Config {
    /// Reads `path`, or returns the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = crate::io::read_text_at_most(path, MAX_CONFIG_BYTES)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .ok_or_else(|| ConfigError::TooLarge {
                path: path.to_path_buf(),
            })?;
        Config::parse(&text).map_err(|msg| ConfigError::Parse {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every value before any file is opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.patch.validate().map_err(ConfigError::Invalid)?;
        let w = &self.extract.wavelength;
        if !w.is_empty() && (w.len() != 3 || !(w[2] > 0.0) || !(w[1] >= w[0])) {
            return Err(ConfigError::Invalid(format!(
                "wavelength must be [wmin, wmax, dw] with wmax >= wmin and dw > 0, got {w:?}"
            )));
        }
        if !self.extract.regularize.is_finite() || self.extract.regularize < 0.0 {
            return Err(ConfigError::Invalid("regularize must be >= 0".into()));
        }
        let r = &self.run;
        if r.readers_per_node == 0
            || r.writers_per_node == 0
            || r.unit_bundles == 0
            || r.ranks_per_gpu == 0
        {
            return Err(ConfigError::Invalid(
                "readers_per_node, writers_per_node, unit_bundles and ranks_per_gpu must be at \
                 least 1"
                    .into(),
            ));
        }
        if !r.watchdog.is_finite() || r.watchdog < 0.0 {
            return Err(ConfigError::Invalid("watchdog must be >= 0 seconds".into()));
        }
        if !self.extract.psferr.is_finite() {
            return Err(ConfigError::Invalid("psferr must be finite".into()));
        }
        Ok(())
    }
}

/// The default output grid of a DESI camera (`b`, `r` or `z`, from CAMERA such as "r0").
pub fn camera_wavelength(camera: &str) -> Option<[f64; 3]> {
    match camera.trim().chars().next()?.to_ascii_lowercase() {
        'b' => Some([3600.0, 5800.0, 0.8]),
        'r' => Some([5760.0, 7620.0, 0.8]),
        'z' => Some([7520.0, 9824.0, 0.8]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_pipeline_toml_is_the_default() {
        let text = include_str!("../pipeline.toml");
        let cfg = Config::parse(text).expect("pipeline.toml parses");
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::parse("[extract]\nregularise = 1.0\n").is_err());
    }

    /// A device without end, or a file far larger than any configuration, is refused after
    /// reading at most the limit, naming the file.
    #[test]
    fn oversized_or_endless_config_is_refused() {
        let err = Config::load(Some(Path::new("/dev/zero"))).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/dev/zero: larger than the 8 MiB"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CONFIG_BYTES + 1)
            .unwrap();
        assert!(matches!(
            Config::load(Some(&big)),
            Err(ConfigError::TooLarge { .. })
        ));
        let at_limit = dir.path().join("ok.toml");
        std::fs::write(&at_limit, "[run]\nthreads = 3\n").unwrap();
        assert_eq!(Config::load(Some(&at_limit)).unwrap().run.threads, 3);
        std::fs::write(&at_limit, b"[run]\xff").unwrap();
        let err = Config::load(Some(&at_limit)).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn bad_wavelength_is_invalid() {
        let cfg = Config::parse("[extract]\nwavelength = [7000.0, 6000.0, 0.8]\n").unwrap();
        assert!(cfg.validate().is_err());
    }
}
