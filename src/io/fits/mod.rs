//! A small safe wrapper over the cfitsio calls the readers and writers need (`fitsio::sys`):
//! moving by EXTNAME, raw header cards, vector and string columns, HDU copies, row deletion,
//! tile compression and checksums, several of which the safe `fitsio` API lacks.
//!
//! All `unsafe` of the io module is here. Errors name the file and the current HDU. Files are
//! opened with cfitsio's "diskfile" calls, so a path is a plain path (no `[ext]` or `!` syntax);
//! gzipped files are inflated by [`gzip`] (checked as they inflate) and handed to cfitsio as
//! memory files, and tile-compressed HDUs are read transparently.

// Counts cross into C here (cfitsio's and MPI's `int`): converted with `try_from`, never `as`.
#![deny(clippy::cast_possible_truncation)]

mod cards;
mod data;
mod gzip;

use std::ffi::{c_char, c_int, c_void, CString};
use std::io::{Read, Seek, SeekFrom};
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
const END_OF_FILE: c_int = sys::END_OF_FILE as c_int;

/// Most header bytes read back raw to say why cfitsio refused a header.
const MAX_RAW_HEADER: usize = 100 * 2880;

/// An open FITS file; closed on drop (use [`Fits::close`] to see errors from the final flush).
pub(crate) struct Fits {
    ptr: *mut sys::fitsfile,
    path: PathBuf,
    hdu: String,
    /// The inflated bytes of a gzipped file, which cfitsio reads in place.
    mem: Option<Box<MemFile>>,
    /// HDUs from the first on whose raw headers passed [`cards::compression_problem`].
    prechecked: usize,
}

/// A file in memory as cfitsio's memory driver holds it: the driver keeps the addresses of
/// `ptr` and `size` until the file is closed, so they live in a box that does not move.
struct MemFile {
    ptr: *mut c_void,
    size: usize,
    data: Vec<u8>,
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
    /// Opens `path` read-only; a gzipped file is inflated into memory first (see [`gzip`]).
    pub fn open(path: &Path) -> Result<Fits, IoError> {
        super::check_input_file(path)?;
        let mut magic = [0u8; 2];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|source| IoError::Os {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 2 && magic == gzip::GZIP_MAGIC {
            let data = gzip::inflate(path).map_err(|m| IoError::file(path, m))?;
            return Self::open_memory(path, data);
        }
        if let Some((_, what)) = gzip::OTHER_MAGIC
            .iter()
            .find(|(m, _)| n == 2 && *m == magic)
        {
            return Err(IoError::file(
                path,
                format!("is compressed with {what}; only gzip is read"),
            ));
        }
        let c = path_c(path)?;
        let mut ptr = ptr::null_mut();
        let mut status = 0;
        // SAFETY: c is NUL-terminated and outlives the call; ptr and status are valid out-params.
        unsafe { sys::ffdkopn(&mut ptr, c.as_ptr(), sys::READONLY as c_int, &mut status) };
        Self::opened(path, ptr, status, None)
    }

    /// Opens the inflated bytes of `path` as a read-only memory file.
    fn open_memory(path: &Path, data: Vec<u8>) -> Result<Fits, IoError> {
        let mut mem = Box::new(MemFile {
            ptr: ptr::null_mut(),
            size: data.len(),
            data,
        });
        mem.ptr = mem.data.as_mut_ptr().cast();
        let mut ptr = ptr::null_mut();
        let mut status = 0;
        // SAFETY: the name is NUL-terminated; mem.ptr and mem.size stay at their boxed addresses
        // and mem.data stays allocated until the Fits holding the box closes the file. Read-only
        // with no realloc function, cfitsio neither writes, grows nor frees the buffer.
        unsafe {
            sys::ffomem(
                &mut ptr,
                c"inflated.fits".as_ptr(),
                sys::READONLY as c_int,
                &mut mem.ptr,
                &mut mem.size,
                0,
                None,
                &mut status,
            )
        };
        Self::opened(path, ptr, status, Some(mem))
    }

    fn opened(
        path: &Path,
        ptr: *mut sys::fitsfile,
        status: c_int,
        mem: Option<Box<MemFile>>,
    ) -> Result<Fits, IoError> {
        if status != 0 || ptr.is_null() {
            if !ptr.is_null() {
                let mut st = 0;
                // SAFETY: cfitsio returned an open file along with the error; closed once here.
                unsafe { sys::ffclos(ptr, &mut st) };
            }
            let raw = raw_header(path, mem.as_deref().map(|m| &m.data[..]), 0);
            let why = diagnose(&raw, status);
            return Err(IoError::file(
                path,
                format!("cannot open as FITS: primary header: {why}"),
            ));
        }
        let mut f = Fits {
            ptr,
            path: path.to_path_buf(),
            hdu: "0".into(),
            mem,
            prechecked: 1,
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
            mem: None,
            prechecked: 1,
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

    /// Moves to the HDU whose EXTNAME is `extname` (ignoring case); `Ok(false)` if the file
    /// ends cleanly without one.
    ///
    /// The HDUs are walked here rather than by cfitsio's `ffmnhd`, which reports an HDU it
    /// cannot parse, and a file cut short, as "no such HDU": both are errors here, naming the
    /// HDU and what is wrong with it.
    pub fn try_move_to(&mut self, extname: &str) -> Result<bool, IoError> {
        // Byte offset where HDU n starts: the end of HDU n - 1.
        let mut start = 0u64;
        let mut n = 0usize;
        loop {
            if n >= self.prechecked {
                let raw = self.raw_header(start);
                if let Some(p) = cards::compression_problem(&cards::split(&raw).0) {
                    return Err(self.unreadable_hdu(extname, n, &raw, p));
                }
                self.prechecked = n + 1;
            }
            let num = self.c_int(n + 1, "HDU number")?;
            let mut status = 0;
            // SAFETY: valid file; the type out-param may be null.
            unsafe { sys::ffmahd(self.ptr, num, ptr::null_mut(), &mut status) };
            match status {
                0 => {}
                END_OF_FILE => return self.past_last_hdu(extname, n, start).map(|()| false),
                s => {
                    let raw = self.raw_header(start);
                    let why = diagnose(&raw, s);
                    return Err(self.unreadable_hdu(extname, n, &raw, why));
                }
            }
            self.name_current(n)?;
            let (data, end) = self.data_place()?;
            if self.hdu.eq_ignore_ascii_case(extname) {
                self.hdu = extname.to_string();
                self.check_data_in_file(data)?;
                return Ok(true);
            }
            start = end;
            n += 1;
        }
    }

    /// Byte offsets where the current HDU's data starts and where the next HDU starts.
    fn data_place(&mut self) -> Result<(u64, u64), IoError> {
        let (mut head, mut data, mut end, mut status) = (0, 0, 0, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffghadll(self.ptr, &mut head, &mut data, &mut end, &mut status) };
        self.check("reading the HDU's place in the file", status)?;
        let offset = |v: sys::LONGLONG| u64::try_from(v).unwrap_or(u64::MAX);
        Ok((offset(data), offset(end)))
    }

    /// Checks that the current HDU's data as its header declares it (FITS standard 4.4.1:
    /// |BITPIX|/8 × GCOUNT × (PCOUNT + NAXIS1 × … × NAXISn)), starting at byte `data`, lies
    /// within the file: cfitsio trusts these keys when it copies a table (a PCOUNT of 2^63 - 1
    /// aborts it with a buffer overflow), and a file cut short is best named before any work.
    fn check_data_in_file(&mut self, data: u64) -> Result<(), IoError> {
        let count = |f: &mut Fits, k: &str, default: i64| -> Result<Option<u64>, IoError> {
            Ok(u64::try_from(f.key_i64(k)?.unwrap_or(default)).ok())
        };
        let bitpix = self.key_i64("BITPIX")?.unwrap_or(0).unsigned_abs() / 8;
        let naxis = count(self, "NAXIS", 0)?.unwrap_or(0).min(999);
        let mut elements = Some(u64::from(naxis > 0));
        for i in 1..=naxis {
            let n = count(self, &format!("NAXIS{i}"), 0)?;
            elements = elements.zip(n).and_then(|(e, n)| e.checked_mul(n));
        }
        let (pcount, gcount) = (count(self, "PCOUNT", 0)?, count(self, "GCOUNT", 1)?);
        let end = elements
            .zip(pcount)
            .and_then(|(e, p)| e.checked_add(p))
            .zip(gcount)
            .and_then(|(e, g)| e.checked_mul(g))
            .and_then(|e| e.checked_mul(bitpix))
            .and_then(|bytes| bytes.checked_add(data));
        let size = self.file_size()?;
        match end {
            Some(end) if end <= size => Ok(()),
            Some(end) => Err(self.err(format!(
                "its data runs to byte {end} but the file ends at byte {size} (truncated file, \
                 or a corrupt NAXISn or PCOUNT?)"
            ))),
            None => Err(self.err(
                "its header declares a data size beyond any file (a negative or huge NAXISn, \
                 PCOUNT or GCOUNT)",
            )),
        }
    }

    /// After the last HDU (number `n - 1`, ending at byte `end`): a clean end, or an error
    /// saying how the file ends otherwise.
    fn past_last_hdu(&mut self, extname: &str, n: usize, end: u64) -> Result<(), IoError> {
        let size = self.file_size()?;
        let not_found = "not found (no HDU has this EXTNAME)";
        let msg = match size.cmp(&end) {
            std::cmp::Ordering::Equal => return Ok(()),
            std::cmp::Ordering::Less => format!(
                "{not_found}; but the file ends at byte {size}, before the end of HDU {}'s data \
                 at byte {end} (truncated file?)",
                n.saturating_sub(1)
            ),
            std::cmp::Ordering::Greater => format!(
                "{not_found}; but the {} bytes after HDU {} are not a complete HDU header \
                 (truncated file?)",
                size - end,
                n.saturating_sub(1)
            ),
        };
        Err(IoError::hdu(&self.path, extname, msg))
    }

    /// The error for HDU number `n`, whose raw header is `raw`, that cannot be read because of
    /// `why`; it stops the search for `extname` whether it is that HDU or one before it.
    fn unreadable_hdu(&self, extname: &str, n: usize, raw: &[u8], why: String) -> IoError {
        let name = cards::extname(&cards::split(raw).0);
        let label = match &name {
            Some(name) => format!("{n} ({name})"),
            None => n.to_string(),
        };
        let msg = if name
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case(extname))
        {
            format!("its header (HDU number {n}) cannot be read: {why}")
        } else {
            format!(
                "not found: the header of HDU number {label} cannot be read, so no HDU after it \
                 can: {why}"
            )
        };
        IoError::hdu(&self.path, extname, msg)
    }

    /// The raw header from byte `start` (see [`raw_header`]).
    fn raw_header(&self, start: u64) -> Vec<u8> {
        raw_header(&self.path, self.mem.as_deref().map(|m| &m.data[..]), start)
    }

    /// Size in bytes of the file as cfitsio reads it (inflated, for a gzipped file).
    fn file_size(&self) -> Result<u64, IoError> {
        match &self.mem {
            Some(m) => Ok(m.data.len() as u64),
            None => std::fs::metadata(&self.path)
                .map(|m| m.len())
                .map_err(|source| IoError::Os {
                    path: self.path.clone(),
                    source,
                }),
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
                "not found (no HDU has this EXTNAME)",
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
            Some(v) => {
                // The card's own text: v may be a rounded 2^63.
                let shown = self.key_str(key).ok().flatten().unwrap_or(v.to_string());
                Err(self.err(format!(
                    "header {key} = {shown} is not an integer (of at most 15 digits)"
                )))
            }
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

    /// What makes the current binary table unreadable by astropy, as an error (see
    /// [`cards::table_problem`]).
    pub fn check_table_header(&mut self) -> Result<(), IoError> {
        let cards = self.cards()?;
        match cards::table_problem(&cards) {
            Some(p) => Err(self.err(p)),
            None => Ok(()),
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

/// What is wrong with the raw header `raw` that cfitsio refused with `status`, as far as
/// [`cards`] can tell, with cfitsio's status.
fn diagnose(raw: &[u8], status: c_int) -> String {
    let (header, complete) = cards::split(raw);
    let problem = if !complete && raw.len() < MAX_RAW_HEADER {
        Some(format!(
            "the file ends {} bytes into this header, before its END card (truncated file?)",
            raw.len()
        ))
    } else {
        cards::header_problem(&header)
    };
    match problem {
        Some(p) => format!("{p} ({})", status_text(status)),
        None => status_text(status),
    }
}

/// The header from byte `start` of the file (of `mem` when it was inflated into memory): whole
/// blocks up to the one holding END, at most [`MAX_RAW_HEADER`] bytes, fewer where the file
/// ends; empty if it cannot be read (it only checks or explains).
fn raw_header(path: &Path, mem: Option<&[u8]>, start: u64) -> Vec<u8> {
    const BLOCK: usize = 2880;
    let has_end = |block: &[u8]| block.chunks(80).any(|c| c.trim_ascii_end() == b"END");
    let mut out = Vec::new();
    if let Some(data) = mem {
        let from = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
        for block in data[from..].chunks(BLOCK).take(MAX_RAW_HEADER / BLOCK) {
            out.extend_from_slice(block);
            if has_end(block) {
                break;
            }
        }
        return out;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return out;
    };
    if f.seek(SeekFrom::Start(start)).is_err() {
        return out;
    }
    let mut block = Vec::with_capacity(BLOCK);
    while out.len() < MAX_RAW_HEADER {
        block.clear();
        let Ok(n) = f.by_ref().take(BLOCK as u64).read_to_end(&mut block) else {
            break;
        };
        out.extend_from_slice(&block);
        if n < BLOCK || has_end(&block) {
            break;
        }
    }
    out
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
