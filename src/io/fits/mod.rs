//! A small safe wrapper over the cfitsio calls the readers and writers need (`fitsio::sys`):
//! moving by EXTNAME, raw header cards, vector and string columns, HDU copies, row deletion,
//! tile compression and checksums, several of which the safe `fitsio` API lacks.
//!
//! All `unsafe` of the io module is here. Errors name the file and the current HDU. Files are
//! opened with cfitsio's "diskfile" calls, so a path is a plain path (no `[ext]` or `!` syntax),
//! while `.gz` files and tile-compressed HDUs are still read transparently.

// Counts cross into C here (cfitsio's and MPI's `int`): converted with `try_from`, never `as`.
#![deny(clippy::cast_possible_truncation)]

mod data;

use std::ffi::{c_char, c_int, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;

use fitsio::sys;

use super::IoError;

/// Element types cfitsio converts pixels and column values to and from.
///
/// # Safety
///
/// `CODE` must name a cfitsio datatype whose C type has the size and layout of `Self`: the
/// readers hand cfitsio a `Vec<Self>` as a buffer of that type.
pub(crate) unsafe trait Elem: Copy + Default {
    /// The cfitsio datatype code (`TDOUBLE`, …).
    const CODE: c_int;
}

macro_rules! elem {
    ($t:ty, $code:expr) => {
        // SAFETY: each use below pairs a Rust type with the cfitsio code of the same C type
        // (double, float, short, int, unsigned int, long long).
        unsafe impl Elem for $t {
            const CODE: c_int = $code as c_int;
        }
    };
}
elem!(f64, sys::TDOUBLE);
elem!(f32, sys::TFLOAT);
elem!(i16, sys::TSHORT);
elem!(i32, sys::TINT);
elem!(u32, sys::TUINT);
elem!(i64, sys::TLONGLONG);

/// Most elements read in one call: 16 times a DESI CCD, far below what a corrupt header can ask.
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

const KEY_NO_EXIST: c_int = sys::KEY_NO_EXIST as c_int;
const BAD_HDU_NUM: c_int = sys::BAD_HDU_NUM as c_int;

/// An open FITS file; closed on drop (use [`Fits::close`] to see errors from the final flush).
pub(crate) struct Fits {
    ptr: *mut sys::fitsfile,
    path: PathBuf,
    hdu: String,
}

/// cfitsio's short text for a status code.
fn status_text(status: c_int) -> String {
    let mut buf = [0 as c_char; 32];
    // SAFETY: ffgerr writes at most 31 characters plus NUL (FLEN_STATUS) into buf.
    unsafe { sys::ffgerr(status, buf.as_mut_ptr()) };
    format!("cfitsio status {status} ({})", from_c(&buf))
}

/// The NUL-terminated prefix of a C buffer, lossily as UTF-8.
fn from_c(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Fits {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Fits, IoError> {
        super::check_input_file(path)?;
        let c = path_c(path)?;
        let mut ptr = ptr::null_mut();
        let mut status = 0;
        // SAFETY: c is NUL-terminated and outlives the call; ptr and status are valid out-params.
        unsafe { sys::ffdkopn(&mut ptr, c.as_ptr(), sys::READONLY as c_int, &mut status) };
        if status != 0 || ptr.is_null() {
            return Err(IoError::file(
                path,
                format!("cannot open as FITS: {}", status_text(status)),
            ));
        }
        let mut f = Fits {
            ptr,
            path: path.to_path_buf(),
            hdu: "0".into(),
        };
        f.name_current(0)?;
        Ok(f)
    }

    /// Creates `path`, which must not exist.
    pub fn create(path: &Path) -> Result<Fits, IoError> {
        let c = path_c(path)?;
        let mut ptr = ptr::null_mut();
        let mut status = 0;
        // SAFETY: as in open.
        unsafe { sys::ffdkinit(&mut ptr, c.as_ptr(), &mut status) };
        if status != 0 || ptr.is_null() {
            return Err(IoError::file(
                path,
                format!("cannot create: {}", status_text(status)),
            ));
        }
        Ok(Fits {
            ptr,
            path: path.to_path_buf(),
            hdu: "0".into(),
        })
    }

    /// Closes the file, reporting errors of the final flush.
    pub fn close(mut self) -> Result<(), IoError> {
        let mut status = 0;
        // SAFETY: ptr is the open file; it is nulled so Drop does not close it again.
        unsafe { sys::ffclos(self.ptr, &mut status) };
        self.ptr = ptr::null_mut();
        if status != 0 {
            return Err(IoError::file(
                &self.path,
                format!("closing failed: {}", status_text(status)),
            ));
        }
        Ok(())
    }

    /// An error about the current HDU.
    pub fn err(&self, msg: impl Into<String>) -> IoError {
        IoError::hdu(&self.path, &self.hdu, msg)
    }

    fn check(&self, what: &str, status: c_int) -> Result<(), IoError> {
        if status == 0 {
            Ok(())
        } else {
            Err(self.err(format!("{what}: {}", status_text(status))))
        }
    }

    /// `v` as cfitsio's `int`, or an error naming what it counts.
    fn c_int(&self, v: usize, what: &str) -> Result<c_int, IoError> {
        c_int::try_from(v).map_err(|_| self.err(format!("{what} {v} is beyond cfitsio's int")))
    }

    fn c(&self, s: &str) -> Result<CString, IoError> {
        CString::new(s).map_err(|_| self.err(format!("string {s:?} contains a NUL byte")))
    }

    /// Names the current HDU (number `n`) by its EXTNAME, or by its number if it has none.
    fn name_current(&mut self, n: usize) -> Result<(), IoError> {
        self.hdu = n.to_string();
        if let Some(name) = self.key_str("EXTNAME")? {
            self.hdu = name;
        }
        Ok(())
    }

    /// Moves to the HDU whose EXTNAME is `extname`; `Ok(false)` if there is none.
    pub fn try_move_to(&mut self, extname: &str) -> Result<bool, IoError> {
        let c = self.c(extname)?;
        let mut status = 0;
        // SAFETY: ffmnhd only reads the name (the C prototype lacks const).
        unsafe {
            sys::ffmnhd(
                self.ptr,
                sys::ANY_HDU,
                c.as_ptr().cast_mut(),
                0,
                &mut status,
            )
        };
        match status {
            0 => {
                self.hdu = extname.to_string();
                Ok(true)
            }
            BAD_HDU_NUM => Ok(false),
            s => Err(IoError::hdu(
                &self.path,
                extname,
                format!("cannot move to it: {}", status_text(s)),
            )),
        }
    }

    /// Moves to the HDU whose EXTNAME is `extname`.
    pub fn move_to(&mut self, extname: &str) -> Result<(), IoError> {
        if self.try_move_to(extname)? {
            Ok(())
        } else {
            Err(IoError::hdu(
                &self.path,
                extname,
                "not found (no HDU has this EXTNAME, or the file is truncated)",
            ))
        }
    }

    /// Number of HDUs in the file.
    pub fn num_hdus(&mut self) -> Result<usize, IoError> {
        let (mut n, mut status) = (0, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffthdu(self.ptr, &mut n, &mut status) };
        self.check("counting HDUs", status)?;
        Ok(n.max(0) as usize)
    }

    /// Whether the current HDU is a binary table (a tile-compressed image counts as an image).
    pub fn is_table(&mut self) -> Result<bool, IoError> {
        let (mut t, mut status) = (0, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffghdt(self.ptr, &mut t, &mut status) };
        self.check("reading the HDU type", status)?;
        Ok(t == sys::BINARY_TBL as c_int)
    }

    /// The value of `key` as a number, `None` if absent.
    pub fn key_f64(&mut self, key: &str) -> Result<Option<f64>, IoError> {
        let c = self.c(key)?;
        let (mut v, mut status) = (0.0f64, 0);
        // SAFETY: TDOUBLE makes cfitsio write one f64 into v; comment pointer may be null.
        unsafe {
            sys::ffgky(
                self.ptr,
                sys::TDOUBLE as c_int,
                c.as_ptr(),
                (&mut v as *mut f64).cast(),
                ptr::null_mut(),
                &mut status,
            )
        };
        match status {
            0 => Ok(Some(v)),
            KEY_NO_EXIST => Ok(None),
            s => Err(self.err(format!("header key {key}: {}", status_text(s)))),
        }
    }

    /// The value of `key` as an integer, `None` if absent; a fractional value is an error.
    pub fn key_i64(&mut self, key: &str) -> Result<Option<i64>, IoError> {
        match self.key_f64(key)? {
            None => Ok(None),
            // Whole and below 2^53: exactly an i64.
            #[allow(clippy::cast_possible_truncation)]
            Some(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(Some(v as i64)),
            Some(v) => Err(self.err(format!("header {key} = {v} is not an integer"))),
        }
    }

    /// The value of `key` as text (long strings with CONTINUE joined), `None` if absent.
    pub fn key_str(&mut self, key: &str) -> Result<Option<String>, IoError> {
        let c = self.c(key)?;
        let mut value: *mut c_char = ptr::null_mut();
        let mut status = 0;
        // SAFETY: ffgkls allocates *value (freed below with fffree); comment may be null.
        unsafe {
            sys::ffgkls(
                self.ptr,
                c.as_ptr(),
                &mut value,
                ptr::null_mut(),
                &mut status,
            )
        };
        let text = if value.is_null() {
            String::new()
        } else {
            // SAFETY: cfitsio returned a NUL-terminated string that we free right after copying.
            let s = unsafe { std::ffi::CStr::from_ptr(value) }
                .to_string_lossy()
                .into_owned();
            let mut st = 0;
            // SAFETY: value came from cfitsio's allocator.
            unsafe { sys::fffree(value.cast(), &mut st) };
            s
        };
        match status {
            0 => Ok(Some(text.trim_end().to_string())),
            KEY_NO_EXIST => Ok(None),
            s => Err(self.err(format!("header key {key}: {}", status_text(s)))),
        }
    }

    /// All header cards of the current HDU, 80 characters each, without END.
    pub fn cards(&mut self) -> Result<Vec<String>, IoError> {
        let (mut nexist, mut nmore, mut status) = (0, 0, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffghsp(self.ptr, &mut nexist, &mut nmore, &mut status) };
        self.check("reading the header size", status)?;
        let mut cards = Vec::with_capacity(nexist.max(0) as usize);
        for i in 1..=nexist {
            let mut buf = [0 as c_char; 96];
            // SAFETY: ffgrec writes at most FLEN_CARD (81) bytes.
            unsafe { sys::ffgrec(self.ptr, i, buf.as_mut_ptr(), &mut status) };
            self.check("reading a header card", status)?;
            cards.push(from_c(&buf));
        }
        Ok(cards)
    }

    /// Appends a raw header card.
    pub fn put_card(&mut self, card: &str) -> Result<(), IoError> {
        let c = self.c(card)?;
        let mut status = 0;
        // SAFETY: c is a NUL-terminated card; cfitsio copies at most 80 characters.
        unsafe { sys::ffprec(self.ptr, c.as_ptr(), &mut status) };
        self.check(&format!("writing card {card:?}"), status)
    }

    /// Sets `key` (replacing it if present) to a value given as FITS value text.
    pub fn put_value(&mut self, key: &str, value: &str, comment: &str) -> Result<(), IoError> {
        if let Some(s) = value.strip_prefix('\'') {
            // A string value: let cfitsio quote it and continue it over cards if long.
            let inner = s.strip_suffix('\'').unwrap_or(s).replace("''", "'");
            return self.put_str(key, inner.trim_end(), comment);
        }
        let card = make_card(key, value, comment).map_err(|m| self.err(m))?;
        let (ck, cc) = (self.c(key)?, self.c(&card)?);
        let mut status = 0;
        // SAFETY: both strings are NUL-terminated and only read.
        unsafe { sys::ffucrd(self.ptr, ck.as_ptr(), cc.as_ptr(), &mut status) };
        self.check(&format!("writing key {key}"), status)
    }

    /// Sets `key` to a string value (CONTINUE cards if it is long).
    pub fn put_str(&mut self, key: &str, value: &str, comment: &str) -> Result<(), IoError> {
        check_key(key).map_err(|m| self.err(m))?;
        let (ck, cv, cc) = (self.c(key)?, self.c(value)?, self.c(comment)?);
        let mut status = 0;
        // SAFETY: NUL-terminated inputs, only read.
        unsafe { sys::ffukls(self.ptr, ck.as_ptr(), cv.as_ptr(), cc.as_ptr(), &mut status) };
        self.check(&format!("writing key {key}"), status)
    }

    /// Sets `key` to a real value, written so that it reads back exactly.
    pub fn put_f64(&mut self, key: &str, value: f64, comment: &str) -> Result<(), IoError> {
        if !value.is_finite() {
            return Err(self.err(format!("header {key} = {value} is not finite")));
        }
        let text = format!("{value:?}").replace('e', "E");
        self.put_value(key, &text, comment)
    }

    /// Sets `key` to an integer value.
    pub fn put_i64(&mut self, key: &str, value: i64, comment: &str) -> Result<(), IoError> {
        self.put_value(key, &value.to_string(), comment)
    }
}

impl Drop for Fits {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            let mut status = 0;
            // SAFETY: ptr is an open file, closed once (close() nulls it).
            unsafe { sys::ffclos(self.ptr, &mut status) };
        }
    }
}

/// The path as a C string, byte for byte (non-UTF-8 paths work).
fn path_c(path: &Path) -> Result<CString, IoError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| IoError::file(path, "path contains a NUL byte"))
}

/// Checks a keyword: 1 to 8 of `A-Z 0-9 _ -` (no HIERARCH).
fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= 8
        && key
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{key:?} is not a valid FITS keyword"))
    }
}

/// A fixed-format card `KEY     =                value / comment`, comment cut to fit 80.
fn make_card(key: &str, value: &str, comment: &str) -> Result<String, String> {
    check_key(key)?;
    if !value.is_ascii() || value.contains('/') {
        return Err(format!(
            "value {value:?} of {key} is not plain FITS value text"
        ));
    }
    let mut card = format!("{key:<8}= {value:>20}");
    if card.len() > 80 {
        return Err(format!("value {value:?} of {key} does not fit in a card"));
    }
    if !comment.is_empty() {
        card.push_str(" / ");
        card.push_str(comment);
        card = card.chars().take(80).collect();
    }
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_are_fixed_format_and_checked() {
        let c = make_card("NSPEC", "25", "number of spectra").unwrap();
        assert_eq!(&c[..31], "NSPEC   =                   25 ");
        assert!(make_card("lower", "1", "").is_err());
        assert!(make_card("TOOLONGKEY", "1", "").is_err());
        assert!(make_card("K", &"9".repeat(80), "").is_err());
        assert!(make_card("K", "1", &"c".repeat(200)).unwrap().len() == 80);
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Fits::open(Path::new("/nonexistent/x.fits")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/x.fits"), "{err}");
    }
}
