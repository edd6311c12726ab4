//! spextract: spectroperfectionism extraction of fiber-spectrograph CCD frames.
//!
//! Data flows `psf → io → patch → extract → pipeline → cli`; a module imports only from those to
//! its left.
//!
//! The project's own documentation lives beside the code, in the repository's `docs/` folder:
//!
//! - `docs/science.md`: the model (PSF, patches, normal equations, decorrelation, resolution,
//!   chi2pix, masks), the conventions, what "correct" means and the figures, the differences
//!   from gpu_specter and specter, and the references. The code cites it by section, as
//!   `docs/science.md §5.2`.
//! - `docs/formats.md`: every file read and written, HDU by HDU.
//! - `docs/operations.md`: `pipeline.toml`, roles and sizing, Slurm, signals and restarts,
//!   `doctor`, reports, the CUDA-aware build and troubleshooting.
//! - `docs/architecture.md`: the data flow through these modules, the [`extract::Backend`]
//!   seam, the GPU stages and kernels, and how to add a backend or a kernel.

pub mod cli;
pub mod config;
pub mod extract;
pub mod io;
pub mod patch;
pub mod pipeline;
pub mod psf;
pub mod simulate;

/// An error and its causes on one line, `: `-separated, leaving out a cause whose text the
/// line already ends with: several errors print their cause in their own message and also
/// return it as their source, which would otherwise show it twice.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

// Links the system OpenBLAS that ndarray's `blas` feature and lapack-sys call into.
use openblas_src as _;

#[cfg(test)]
mod tests {
    /// An error that prints its cause and also returns it as its source.
    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Wrapped {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn error_line_says_each_cause_once() {
        let e = Wrapped {
            path: "c.toml".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such thing"),
        };
        assert_eq!(super::error_line(&e), "c.toml: no such thing");
        let outer = anyhow::Error::new(e).context("reading the configuration");
        assert_eq!(
            super::error_line(outer.as_ref()),
            "reading the configuration: c.toml: no such thing"
        );
    }
}
