//! Outputs that appear whole or not at all, and never over a file that someone else put at
//! their path meanwhile (docs/science.md §6).
//!
//! An output is written under a temporary name beside it, `.{name}.tmp-{host}-{pid}-{n}`, and
//! renamed into place once complete. Without overwriting, that rename is
//! `renameat2(RENAME_NOREPLACE)` (or `link` then `unlink` where the file system lacks the
//! flag): the check that the path is free and the rename are one step, so of two writers
//! racing to one path exactly one wins and the other gets [`IoError::Exists`].
//!
//! The temporary's name says which host and process write it, so that a later run can tell a
//! temporary left by a killed writer (this host, process gone) from one being written now.
//!
//! The `unsafe` here is the two libc calls cfitsio and std do not cover: `renameat2` and the
//! reset of `errno` before a write, which lets a failed write name its system error.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::IoError;

/// A complete temporary beside its output, not yet in place; removed when dropped unplaced.
pub(crate) struct Staged {
    path: PathBuf,
    tmp: PathBuf,
    placed: bool,
}

/// An output that [`Staged::place`] put in place.
pub(crate) struct Placed {
    path: PathBuf,
    /// The file placed, to recognise it later: device, inode, size and modification time (an
    /// inode freed by someone removing ours can come back at once for their file).
    id: FileId,
    /// Whether a file was at the path before.
    replaced: bool,
}

type FileId = (u64, u64, u64, i64, i64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

/// Refuses an existing `path` (any directory entry, a dangling link too) unless `overwrite`.
pub(crate) fn refuse_existing(path: &Path, overwrite: bool) -> Result<(), IoError> {
    if !overwrite && std::fs::symlink_metadata(path).is_ok() {
        return Err(IoError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes `path`'s content through `write` into a temporary beside it, after refusing an
/// existing `path` unless `overwrite`. On error the temporary is removed and the error names
/// `path` (not the temporary), with the system's reason (no space left, quota exceeded, ...)
/// when the write failed on one.
pub(crate) fn stage<F>(path: &Path, overwrite: bool, write: F) -> Result<Staged, IoError>
where
    F: FnOnce(&Path) -> Result<(), IoError>,
{
    refuse_existing(path, overwrite)?;
    let staged = Staged {
        path: path.to_path_buf(),
        tmp: temp_path(path)?,
        placed: false,
    };
    // The same host, pid and counter can only come from a crashed process whose pid was
    // reused; cfitsio refuses to create over it, so clear it.
    let _ = std::fs::remove_file(&staged.tmp);
    clear_errno();
    if let Err(e) = write(&staged.tmp) {
        let os = write_failure_cause();
        return Err(not_written(e, &staged.path, &staged.tmp, os));
    }
    Ok(staged)
}

impl Staged {
    /// Renames the temporary to the output: without `overwrite` only if nothing is there,
    /// in the same step ([`IoError::Exists`] otherwise).
    pub fn place(mut self, overwrite: bool) -> Result<Placed, IoError> {
        let os_err = |source| IoError::Os {
            path: self.path.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&self.tmp).map_err(os_err)?;
        let replaced = if overwrite {
            // Only for `Placed::undo`: a file that appears between this look and the rename is
            // replaced all the same, as --overwrite asks.
            let there = std::fs::symlink_metadata(&self.path).is_ok();
            std::fs::rename(&self.tmp, &self.path).map_err(os_err)?;
            there
        } else {
            match rename_noreplace(&self.tmp, &self.path) {
                Ok(()) => false,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(IoError::Exists {
                        path: self.path.clone(),
                    })
                }
                Err(e) => return Err(os_err(e)),
            }
        };
        self.placed = true;
        Ok(Placed {
            path: self.path.clone(),
            id: file_id(&meta),
            replaced,
        })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Placed {
    /// Removes the output again if it replaced nothing and is still the file placed; returns
    /// whether the path is now as it was before.
    pub fn undo(self) -> bool {
        if self.replaced {
            return false;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if file_id(&m) == self.id => std::fs::remove_file(&self.path).is_ok(),
            _ => false,
        }
    }
}

/// Writes `path` through `write` (see [`stage`]) and puts it in place (see [`Staged::place`]):
/// a reader never sees a partial file, and without `overwrite` no existing file is replaced,
/// not even one created while `write` ran.
pub(crate) fn write_atomic<F>(path: &Path, overwrite: bool, write: F) -> Result<(), IoError>
where
    F: FnOnce(&Path) -> Result<(), IoError>,
{
    stage(path, overwrite, write)?.place(overwrite).map(drop)
}

/// The error of a failed write, about the output rather than its temporary.
fn not_written(err: IoError, path: &Path, tmp: &Path, os: Option<io::Error>) -> IoError {
    let detail = match &err {
        IoError::File { path: p, msg } if p == tmp => msg.clone(),
        IoError::Hdu { path: p, hdu, msg } if p == tmp => format!("HDU {hdu}: {msg}"),
        IoError::Os { path: p, source } if p == tmp => source.to_string(),
        // About another file (an input read while writing): that file is the news.
        _ => return err,
    };
    let why = match os {
        Some(os) if os.to_string() != detail => format!("{os} ({detail})"),
        _ => detail,
    };
    IoError::NotWritten {
        path: path.to_path_buf(),
        why,
    }
}

/// The system error that failed the write just now, if it is one that says why a write
/// fails; `errno` was cleared before the write, so an older one cannot show here.
fn write_failure_cause() -> Option<io::Error> {
    let e = io::Error::last_os_error();
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EIO | libc::EROFS)
    )
    .then_some(e)
}

#[cfg(target_os = "linux")]
fn clear_errno() {
    // SAFETY: __errno_location returns this thread's errno, valid as long as the thread runs;
    // zeroing it is how C code tells a new failure from an old one.
    unsafe { *libc::__errno_location() = 0 };
}

#[cfg(not(target_os = "linux"))]
fn clear_errno() {}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then), in one step.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (f, t) = (c_path(from)?, c_path(to)?);
        // SAFETY: both are NUL-terminated paths that outlive the call, which only reads them;
        // AT_FDCWD resolves relative paths as rename(2) does.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // EINVAL: the file system does not take the flag (older NFS, some FUSE); ENOSYS: the
        // kernel predates renameat2 (3.15). Anything else is the answer.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(err);
        }
    }
    link_then_unlink(from, to)
}

/// `link(2)` refuses an existing `to` with EEXIST instead of replacing it; the temporary name
/// is dropped after. A failed unlink leaves a second name of the output, which a later run
/// removes with the other leftovers.
fn link_then_unlink(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::hard_link(from, to)?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

#[cfg(target_os = "linux")]
fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// This host's name as it goes into temporaries' names (characters other than letters,
/// digits, `.`, `_` and `-` as `_`).
pub fn temporary_host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            "localhost".into()
        } else {
            name
        }
    })
}

/// `.{name}.tmp-{host}-{pid}-{n}` beside `path`; the counter keeps concurrent writers in one
/// process apart.
fn temp_path(path: &Path) -> Result<PathBuf, IoError> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| IoError::file(path, "output path has no file name"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(
        ".{}.tmp-{}-{}-{n}",
        name.to_string_lossy(),
        temporary_host(),
        std::process::id()
    );
    Ok(path.with_file_name(tmp_name))
}

/// Who wrote a temporary named `name`: `(host, pid)`, the host `None` for the names of
/// spextract before hosts were recorded (`.{output}.fits.tmp-{pid}-{n}`); `None` if `name` is
/// not a temporary of an output.
fn temporary_writer(name: &str) -> Option<(Option<&str>, u32)> {
    let rest = name.strip_prefix('.')?;
    let at = rest.rfind(".tmp-")?;
    let (output, tail) = (&rest[..at], &rest[at + 5..]);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = tail.rsplitn(3, '-');
    let (n, pid) = (parts.next()?, parts.next()?);
    if output.is_empty() || !digits(n) || !digits(pid) {
        return None;
    }
    let pid = pid.parse().ok()?;
    match parts.next() {
        Some(host) if !host.is_empty() => Some((Some(host), pid)),
        Some(_) => None,
        None if output.ends_with(".fits") || output.ends_with(".fits.gz") => Some((None, pid)),
        None => None,
    }
}

/// Whether process `pid` of this host runs; `None` where that cannot be told (no /proc).
fn pid_alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self").exists() {
        return None;
    }
    Some(Path::new("/proc").join(pid.to_string()).exists())
}

/// Temporaries of outputs found in a folder, by what became of their writer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Written by a process of this host that has ended: nothing will finish them.
    pub stale: Vec<PathBuf>,
    /// Written by a process of this host that still runs (this one included): left alone.
    pub busy: Vec<PathBuf>,
    /// Written on another host, whose processes cannot be looked at from here: left alone.
    pub elsewhere: Vec<PathBuf>,
}

/// The temporaries (of frames, model images, any output written atomically) in `dir`, sorted
/// by what became of their writer; none if `dir` cannot be listed. A temporary of the older
/// naming, without a host, counts as this host's.
pub fn leftover_temporaries(dir: &Path) -> Leftovers {
    let mut found = Leftovers::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    let own = std::process::id();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some((writer_host, pid)) = name.to_str().and_then(temporary_writer) else {
            continue;
        };
        let path = dir.join(&name);
        match writer_host {
            Some(h) if h != temporary_host() => found.elsewhere.push(path),
            _ if pid == own => found.busy.push(path),
            _ if pid_alive(pid) == Some(false) => found.stale.push(path),
            _ => found.busy.push(path),
        }
    }
    found.stale.sort();
    found.busy.sort();
    found.elsewhere.sort();
    found
}

/// The path an output will have, made absolute with symbolic links and `..` resolved, so that
/// two spellings of one file compare equal: the deepest folder of it that exists is
/// canonicalised and the rest (which cannot hold links) appended, `..` taking one off. The file
/// name itself is not followed: writing replaces a link there, not what it points to.
pub fn output_key(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(_) => path.to_path_buf(),
        }
    };
    let parts: Vec<Component> = abs.components().collect();
    let last_is_name = matches!(parts.last(), Some(Component::Normal(_)));
    let deepest = if last_is_name {
        parts.len() - 1
    } else {
        parts.len()
    };
    for k in (1..=deepest).rev() {
        let prefix: PathBuf = parts[..k].iter().collect();
        let Ok(mut key) = std::fs::canonicalize(&prefix) else {
            continue;
        };
        for c in &parts[k..] {
            match c {
                Component::ParentDir => {
                    key.pop();
                }
                Component::Normal(s) => key.push(s),
                _ => {}
            }
        }
        return key;
    }
    abs
}

/// The identity of an input for comparison with outputs: its canonical path, every link
/// followed (writing through a link to an input would replace it), or [`output_key`] if it
/// cannot be resolved.
pub fn input_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| output_key(path))
}

#[cfg(test)]
#[path = "atomic_tests.rs"]
mod tests;
