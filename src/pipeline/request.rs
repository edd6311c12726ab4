//! What a frame was extracted for, recorded in its FLUX header, so that a rerun can tell a
//! frame it may keep (the same request, from the same input files) from a stale one.
//!
//! The request is what the run asks for, before the PSF or the image is read: the fibers
//! (`-s`, `-n`, 0 meaning every fiber of the PSF from `-s` on), the grid (`-w`, or the
//! camera's default), the options that change the numbers, and each input's canonical path,
//! size and modification time. The same request on the same inputs gives the same frame, so
//! comparing requests needs neither input to be read.
//!
//! Imports `config` and `io`.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// FLUX header keys that record the request, in the order [`FrameRequest::compare`] reads
/// them. FIBERMIN is the frame's own first fiber, which is the one asked for.
pub const KEYS: [&str; 11] = [
    "FIBERMIN",
    "REQNSPEC",
    "REQWAVE",
    "REQOPTS",
    "IMGPATH",
    "IMGSIZE",
    "IMGMTIME",
    "PSFPATH",
    "PSFSIZE",
    "PSFMTIME",
    CCD_EDGE_KEY,
];

/// The FLUX header key of frames written since patches leaving the CCD are extracted, with
/// the pixels off it masked (docs/science.md §2). Frames written before dropped those patches
/// and flagged their bins NODATA; the same request now gives those bins, so such a frame is not
/// what a rerun would write (see [`FrameRequest::compare`]).
pub const CCD_EDGE_KEY: &str = "CCDEDGE";

/// An input file as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputId {
    /// Absolute, with links and `..` resolved.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Last modification, seconds since 1970 with nanoseconds (`s.nnnnnnnnn`).
    pub mtime: String,
}

impl InputId {
    /// Looks at `path` on disk.
    pub fn of(path: &Path) -> Result<InputId, RequestError> {
        let err = |error| RequestError {
            path: path.to_path_buf(),
            error,
        };
        let canonical = std::fs::canonicalize(path).map_err(err)?;
        let m = std::fs::metadata(&canonical).map_err(err)?;
        Ok(InputId {
            path: canonical,
            size: m.len(),
            mtime: format!("{}.{:09}", m.mtime(), m.mtime_nsec()),
        })
    }
}

/// An input could not be looked at.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", .path.display())]
pub struct RequestError {
    /// The input.
    pub path: PathBuf,
    /// Why (not a `source`: the message already says it, and chains would say it twice).
    pub error: std::io::Error,
}

/// What one frame is extracted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRequest {
    /// First fiber (`-s`).
    pub specmin: usize,
    /// Fibers (`-n`); 0 for every fiber of the PSF from `specmin` on.
    pub nspec: usize,
    /// The grid `wmin,wmax,dw` as asked (`-w`), or `camera` for the camera's default.
    pub wave: String,
    /// Options that change the numbers, `name=value` separated by spaces.
    pub options: String,
    /// The preproc image.
    pub image: InputId,
    /// The PSF.
    pub psf: InputId,
}

/// How a recorded request compares with this run's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// The same request on the same inputs.
    Same,
    /// What differs, one phrase each.
    Differs(Vec<String>),
    /// The frame records no request (written before spextract recorded them, or by another
    /// program).
    Unrecorded,
}

impl FrameRequest {
    /// The request of a frame of `image` and `psf` under `cfg`.
    pub fn new(cfg: &Config, image: &Path, psf: &Path) -> Result<FrameRequest, RequestError> {
        Ok(FrameRequest::of_inputs(
            cfg,
            InputId::of(image)?,
            InputId::of(psf)?,
        ))
    }

    /// The request of a frame of inputs already looked at.
    pub fn of_inputs(cfg: &Config, image: InputId, psf: InputId) -> FrameRequest {
        let (e, p) = (&cfg.extract, &cfg.patch);
        let wave = if e.wavelength.is_empty() {
            "camera".to_string()
        } else {
            join(&e.wavelength, ",")
        };
        let options = format!(
            "regularize={} psferr={} mask_bits={} bundlesize={} nsubbundles={} nwavestep={} \
             wavepad={} wavepad_frac={} pixpad_frac={}",
            e.regularize,
            e.psferr,
            e.mask_bits,
            p.bundlesize,
            p.nsubbundles,
            p.nwavestep,
            p.wavepad,
            p.wavepad_frac,
            p.pixpad_frac
        );
        // Only when set, so that the frames of earlier runs keep their request.
        let options = if e.ivar_from_model {
            options + " ivar_from_model=true"
        } else {
            options
        };
        FrameRequest {
            specmin: e.specmin,
            nspec: e.nspec,
            wave,
            options,
            image,
            psf,
        }
    }

    /// Header cards (key, FITS value text, comment) recording the request; FIBERMIN is
    /// written with the frame.
    pub fn cards(&self) -> Vec<(String, String, String)> {
        let text = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut cards = vec![
            (
                "REQNSPEC",
                self.nspec.to_string(),
                "fibers asked for; 0: all from FIBERMIN",
            ),
            (
                "REQWAVE",
                text(&self.wave),
                "grid asked for: wmin,wmax,dw or camera",
            ),
            (
                "REQOPTS",
                text(&self.options),
                "extraction options asked for",
            ),
            (
                CCD_EDGE_KEY,
                text("masked"),
                "patches leaving the CCD: pixels off it masked",
            ),
        ];
        for (input, keys, what) in [
            (
                &self.image,
                ["IMGPATH", "IMGSIZE", "IMGMTIME"],
                "input image, links resolved",
            ),
            (
                &self.psf,
                ["PSFPATH", "PSFSIZE", "PSFMTIME"],
                "input PSF, links resolved",
            ),
        ] {
            cards.push((keys[0], text(&input.path.to_string_lossy()), what));
            cards.push((keys[1], input.size.to_string(), "its size [bytes]"));
            cards.push((keys[2], text(&input.mtime), "its mtime [s since 1970]"));
        }
        cards
            .into_iter()
            .map(|(k, v, c)| (k.to_string(), v, c.to_string()))
            .collect()
    }

    /// Compares this run's request with the one a frame recorded: `recorded` holds the values
    /// of [`KEYS`], in order, `None` where the header lacks one. `nodata` counts the frame's
    /// NODATA bins: a frame written before [`CCD_EDGE_KEY`] that has any may hold bins of
    /// patches at the CCD's edge that it dropped and this run extracts (without NODATA bins it
    /// dropped none, and is what this run writes).
    pub fn compare(&self, recorded: &[Option<String>], nodata: usize) -> Comparison {
        let get = |key: &str| -> &str {
            KEYS.iter()
                .position(|k| *k == key)
                .and_then(|i| recorded.get(i))
                .and_then(|v| v.as_deref())
                .unwrap_or("")
        };
        if get("REQOPTS").is_empty() {
            return Comparison::Unrecorded;
        }
        let mut diffs = Vec::new();
        let (specmin, nspec) = (self.specmin.to_string(), self.nspec.to_string());
        if get("FIBERMIN") != specmin || get("REQNSPEC") != nspec {
            diffs.push(format!(
                "fibers: the frame has {}, this run asks for {}",
                Fibers(get("FIBERMIN"), get("REQNSPEC")),
                Fibers(&specmin, &nspec)
            ));
        }
        if get("REQWAVE") != self.wave {
            diffs.push(format!(
                "wavelength grid: the frame's is {}, this run asks for {}",
                Grid(get("REQWAVE")),
                Grid(&self.wave)
            ));
        }
        diffs.extend(option_differences(get("REQOPTS"), &self.options));
        if get(CCD_EDGE_KEY).is_empty() && nodata > 0 {
            diffs.push(format!(
                "written before spextract extracted the patches at the CCD's edge, and {nodata} \
                 of its bins are NODATA, which may be bins of such patches that it dropped and \
                 this run extracts"
            ));
        }
        for (what, input, keys) in [
            ("image", &self.image, ["IMGPATH", "IMGSIZE", "IMGMTIME"]),
            ("PSF", &self.psf, ["PSFPATH", "PSFSIZE", "PSFMTIME"]),
        ] {
            let (path, size, mtime) = (get(keys[0]), get(keys[1]), get(keys[2]));
            if path != input.path.to_string_lossy() {
                diffs.push(format!(
                    "{what}: the frame was extracted from {path}, this run reads {}",
                    input.path.display()
                ));
            } else if size != input.size.to_string() || mtime != input.mtime {
                diffs.push(format!(
                    "{what} {path} has changed since the frame was extracted from it (then \
                     {size} bytes, modified at {mtime} s; now {} bytes, modified at {} s)",
                    input.size, input.mtime
                ));
            }
        }
        if diffs.is_empty() {
            Comparison::Same
        } else {
            Comparison::Differs(diffs)
        }
    }
}

/// `-s S -n N` as a phrase.
struct Fibers<'a>(&'a str, &'a str);

impl fmt::Display for Fibers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Fibers(s, n) = *self;
        match (s.parse::<usize>(), n.parse::<usize>()) {
            (Ok(s), Ok(0)) => write!(f, "-s {s} -n 0 (every fiber from {s} on)"),
            (Ok(s), Ok(n)) => write!(f, "-s {s} -n {n} (fibers {s}..{})", s + n),
            _ => write!(f, "-s {s:?} -n {n:?}"),
        }
    }
}

/// A recorded grid as a phrase.
struct Grid<'a>(&'a str);

impl fmt::Display for Grid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            "camera" => write!(f, "the camera's default"),
            "" => write!(f, "not recorded"),
            w => write!(f, "-w {w}"),
        }
    }
}

/// The options that differ between two `name=value` lists, each as a phrase.
fn option_differences(recorded: &str, asked: &str) -> Vec<String> {
    let pairs = |s: &str| -> Vec<(String, String)> {
        s.split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect()
    };
    let (rec, ask) = (pairs(recorded), pairs(asked));
    let value = |list: &[(String, String)], key: &str| {
        list.iter()
            .find(|(k, _)| k == key)
            .map_or("(none)".to_string(), |(_, v)| v.clone())
    };
    let mut keys: Vec<&String> = ask.iter().map(|(k, _)| k).collect();
    keys.extend(
        rec.iter()
            .map(|(k, _)| k)
            .filter(|k| !ask.iter().any(|(a, _)| a == *k)),
    );
    keys.into_iter()
        .filter_map(|k| {
            let (r, a) = (value(&rec, k), value(&ask, k));
            (r != a).then(|| format!("{k}: the frame's is {r}, this run's {a}"))
        })
        .collect()
}

fn join(values: &[f64], sep: &str) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dir: &Path, cfg: &Config) -> FrameRequest {
        FrameRequest::new(cfg, &dir.join("img.fits"), &dir.join("psf.fits")).unwrap()
    }

    /// The header values `req` would record, as `read_frame_keys` gives them back.
    fn recorded(req: &FrameRequest) -> Vec<Option<String>> {
        let cards = req.cards();
        KEYS.iter()
            .map(|k| {
                if *k == "FIBERMIN" {
                    return Some(req.specmin.to_string());
                }
                cards.iter().find(|c| c.0 == *k).map(|c| {
                    let v = &c.1;
                    v.strip_prefix('\'')
                        .and_then(|v| v.strip_suffix('\''))
                        .map_or(v.clone(), |v| v.replace("''", "'"))
                })
            })
            .collect()
    }

    #[test]
    fn a_request_matches_itself_and_names_each_difference() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("img.fits"), b"image").unwrap();
        std::fs::write(d.join("psf.fits"), b"psf").unwrap();
        let mut cfg = Config::default();
        cfg.extract.nspec = 10;
        let first = request(d, &cfg);
        assert_eq!(first.compare(&recorded(&first), 0), Comparison::Same);
        assert_eq!(first.wave, "camera");
        assert_eq!(
            first.image.path,
            std::fs::canonicalize(d.join("img.fits")).unwrap()
        );

        // The rerun of issue 12: -s 5 -n 20 -w 5900,6300,0.8 over a frame of -n 10.
        cfg.extract.specmin = 5;
        cfg.extract.nspec = 20;
        cfg.extract.wavelength = vec![5900.0, 6300.0, 0.8];
        cfg.extract.regularize = 0.1;
        let rerun = request(d, &cfg);
        let Comparison::Differs(diffs) = rerun.compare(&recorded(&first), 0) else {
            panic!("a different request passed as the same");
        };
        assert_eq!(
            diffs,
            [
                "fibers: the frame has -s 0 -n 10 (fibers 0..10), this run asks for -s 5 -n 20 \
                 (fibers 5..25)",
                "wavelength grid: the frame's is the camera's default, this run asks for -w \
                 5900,6300,0.8",
                "regularize: the frame's is 0, this run's 0.1",
            ]
        );

        // An input rewritten since, or another input.
        std::fs::write(d.join("img.fits"), b"image, redone").unwrap();
        let Comparison::Differs(diffs) = request(d, &cfg).compare(&recorded(&rerun), 0) else {
            panic!("a changed image passed");
        };
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].starts_with("image ") && diffs[0].contains("has changed"));
        assert!(diffs[0].contains("then 5 bytes") && diffs[0].contains("now 13 bytes"));
        std::fs::write(d.join("psf2.fits"), b"psf").unwrap();
        let other = FrameRequest::new(&cfg, &d.join("img.fits"), &d.join("psf2.fits")).unwrap();
        let Comparison::Differs(diffs) = other.compare(&recorded(&rerun), 0) else {
            panic!("another PSF passed");
        };
        assert!(diffs
            .iter()
            .any(|x| x.starts_with("PSF: the frame was extracted from")));

        // A frame that records nothing cannot be vouched for.
        let mut none = recorded(&first);
        none[3] = None;
        assert_eq!(first.compare(&none, 0), Comparison::Unrecorded);
        assert!(FrameRequest::new(&cfg, &d.join("missing.fits"), &d.join("psf.fits")).is_err());
    }

    /// A frame of the same request written before the patches at the CCD's edge were
    /// extracted is what this run writes only if it has no NODATA bin (it dropped no patch).
    #[test]
    fn a_frame_from_before_edge_extraction_passes_only_without_nodata_bins() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("img.fits"), b"image").unwrap();
        std::fs::write(d.join("psf.fits"), b"psf").unwrap();
        let req = request(d, &Config::default());
        let now = recorded(&req);
        assert_eq!(req.compare(&now, 120), Comparison::Same);
        let mut before = now.clone();
        before[KEYS.iter().position(|k| *k == CCD_EDGE_KEY).unwrap()] = None;
        assert_eq!(req.compare(&before, 0), Comparison::Same);
        let Comparison::Differs(diffs) = req.compare(&before, 120) else {
            panic!("a frame that may have dropped edge patches passed");
        };
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(
            diffs[0].contains("before spextract extracted the patches at the CCD's edge")
                && diffs[0].contains("120 of its bins are NODATA"),
            "{diffs:?}"
        );
    }
}
