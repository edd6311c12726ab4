//! FITS input and output: the PSF, preproc images, frames, model images and simulation truth
//! (docs/formats.md); and the size-limited read of the text files that name them
//! (frame lists, configurations).
//!
//! This is the only module that names `fitsio`; everything cfitsio-specific sits in the private
//! `fits` wrapper, and every failure comes back as an [`IoError`] naming the file (and the HDU,
//! where there is one). Imports only `psf` from the crate.

mod atomic;
mod fits;
pub mod frame;
pub mod image;
pub mod psf;
pub mod truth;

use std::path::{Path, PathBuf};

use crate::psf::PsfError;

pub(crate) use atomic::write_atomic;
pub use atomic::{input_key, leftover_temporaries, output_key, temporary_host, Leftovers};
pub use frame::{
    read_frame, read_frame_keys, read_model_image, write_frame, write_frame_set, write_model_image,
    Frame, FrameMeta, ModelImage, ModelImageFile,
};
pub use image::{read_fibermap, read_preproc, write_preproc, Fibermap, Preproc, EXTRACT_MASK_BITS};
pub use psf::{read_psf, write_psf};
pub use truth::{read_truth, write_truth, Truth};

/// A failure reading or writing a FITS file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file as a whole: cannot be opened, created, closed, or is not usable.
    #[error("{}: {msg}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// One HDU of the file: missing, wrong type or shape, bad header value, unreadable data.
    #[error("{}: HDU {hdu}: {msg}", .path.display())]
    Hdu {
        /// The file.
        path: PathBuf,
        /// The HDU's EXTNAME (or its number when it has none).
        hdu: String,
        /// What went wrong.
        msg: String,
    },
    /// The output exists and overwriting was not asked for.
    #[error("{}: already exists; refusing to overwrite it", .path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file was read but the PSF it describes is not usable.
    #[error("{}: {source}", .path.display())]
    Psf {
        /// The file.
        path: PathBuf,
        /// The model's complaint.
        source: PsfError,
    },
    /// Writing an output failed: nothing was put at its path, and its temporary is removed.
    #[error("{}: not written: {why}", .path.display())]
    NotWritten {
        /// The output.
        path: PathBuf,
        /// Why: the system's error where there is one, and what was being written.
        why: String,
    },
    /// One output of a set written together (a frame and its model image) failed; says what
    /// became of the other.
    #[error("{cause}; {other}")]
    Set {
        /// The failure, naming its output.
        cause: Box<IoError>,
        /// What became of the other output, naming it.
        other: String,
    },
    /// An operating-system failure outside cfitsio (rename, remove).
    #[error("{}: {source}", .path.display())]
    Os {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
}

impl IoError {
    /// Wraps an error of the `fitsio` crate's safe API with the file and, if known, the HDU.
    pub fn from_fitsio(path: &Path, hdu: Option<&str>, err: fitsio::errors::Error) -> Self {
        let msg = match err {
            fitsio::errors::Error::Fits(e) => format!("cfitsio status {}: {}", e.status, e.message),
            other => other.to_string(),
        };
        match hdu {
            Some(hdu) => IoError::Hdu {
                path: path.to_path_buf(),
                hdu: hdu.to_string(),
                msg,
            },
            None => IoError::File {
                path: path.to_path_buf(),
                msg,
            },
        }
    }

    /// An error about the file as a whole.
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        IoError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An error about one HDU of the file.
    pub fn hdu(path: &Path, hdu: &str, msg: impl Into<String>) -> Self {
        IoError::Hdu {
            path: path.to_path_buf(),
            hdu: hdu.to_string(),
            msg: msg.into(),
        }
    }
}

/// A CAMERA header value as a camera name (`r0`): lower case, without blanks or the extra
/// quotes some writers leave inside the string (specex writes `'''r0      '''`); `None` when
/// nothing is left.
pub fn camera_name(raw: &str) -> Option<String> {
    let name = raw
        .trim_matches(|c: char| c == '\'' || c.is_whitespace())
        .to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Refuses, naming what is there, an input path that is not a regular file: missing, a
/// folder, or a device, pipe or socket (cfitsio would read a device such as /dev/zero without
/// end).
pub(crate) fn check_input_file(path: &Path) -> Result<(), IoError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => Err(IoError::file(path, "is a folder, not a FITS file")),
        Ok(_) => Err(IoError::file(
            path,
            "is not a regular file (a device, pipe or socket), so not a FITS file",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(IoError::file(path, "no such file"))
        }
        Err(source) => Err(IoError::Os {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The text of `path` when it holds at most `max_bytes` bytes, else `None`. Reads at most one
/// byte past the limit, so that a device or pipe without end (/dev/zero) cannot fill memory.
pub fn read_text_at_most(path: &Path, max_bytes: u64) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    // A regular file's size is known before reading it.
    if file.metadata()?.len() > max_bytes {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Ok(None);
    }
    String::from_utf8(bytes).map(Some).map_err(|e| {
        let why = format!("not UTF-8 text ({})", e.utf8_error());
        std::io::Error::new(std::io::ErrorKind::InvalidData, why)
    })
}

/// The name of this program and version, as written into output headers.
pub fn program_version() -> String {
    format!("spextract {}", env!("CARGO_PKG_VERSION"))
}

/// A file of the shared test data (`../shared/data`, or `$SPEXTRACT_TEST_DATA`), or `None`
/// (with a message) when it is absent.
#[cfg(test)]
pub(crate) fn shared_data(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SPEXTRACT_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).to_path_buf()
        });
    let p = dir.join(file);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is missing", p.display());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder or a device given as an input is named as such, not as a missing file.
    #[test]
    fn inputs_that_are_not_regular_files_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_psf(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a folder, not a FITS file"), "{err}");
        let err = read_preproc(Path::new("/dev/null"), EXTRACT_MASK_BITS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/null: is not a regular file"), "{err}");
        let err = read_psf(&dir.path().join("none.fits"))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("none.fits: no such file"), "{err}");
    }

    #[test]
    fn camera_names_lose_case_blanks_and_inner_quotes() {
        assert_eq!(camera_name("'r0      '").as_deref(), Some("r0"));
        assert_eq!(camera_name(" B1 ").as_deref(), Some("b1"));
        assert_eq!(camera_name("z9").as_deref(), Some("z9"));
        assert_eq!(camera_name("''"), None);
        assert_eq!(camera_name("   "), None);
    }
}
