//! Image and table data of the [`Fits`] wrapper: reading and writing pixels and columns,
//! creating HDUs, copying HDUs between files, deleting rows, compression and checksums.

use std::ffi::{c_char, c_int, c_long, c_void};
use std::ptr;

use fitsio::sys;

use super::{from_c, status_text, Elem, Fits, MAX_ELEMENTS};
use crate::io::IoError;

const COL_NOT_FOUND: c_int = sys::COL_NOT_FOUND as c_int;

impl Fits {
    /// The shape of the current image, slowest axis first (numpy order).
    pub fn image_shape(&mut self) -> Result<Vec<usize>, IoError> {
        let (mut bitpix, mut naxis, mut status) = (0, 0, 0);
        let mut naxes = [0 as sys::LONGLONG; 9];
        // SAFETY: naxes holds maxaxis = 9 entries.
        unsafe {
            sys::ffgiprll(
                self.ptr,
                9,
                &mut bitpix,
                &mut naxis,
                naxes.as_mut_ptr(),
                &mut status,
            )
        };
        self.check("reading the image dimensions", status)?;
        if !(0..=9).contains(&naxis) {
            return Err(self.err(format!("NAXIS = {naxis} is not supported")));
        }
        let mut shape = Vec::with_capacity(naxis as usize);
        for &n in naxes[..naxis as usize].iter().rev() {
            let n = usize::try_from(n).map_err(|_| self.err(format!("negative axis {n}")))?;
            shape.push(n);
        }
        Ok(shape)
    }

    /// The image's equivalent BITPIX (BZERO/BSCALE taken into account: 20 for u16, 40 for u32).
    pub fn image_type(&mut self) -> Result<i32, IoError> {
        let (mut t, mut status) = (0, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffgiet(self.ptr, &mut t, &mut status) };
        self.check("reading the image type", status)?;
        Ok(t)
    }

    /// Reads the first `n` pixels of the current image, converted to `T`.
    pub fn read_pixels<T: Elem>(&mut self, n: usize) -> Result<Vec<T>, IoError> {
        if n > MAX_ELEMENTS {
            return Err(self.err(format!("{n} pixels is more than this reader accepts")));
        }
        let mut v = vec![T::default(); n];
        if n == 0 {
            return Ok(v);
        }
        let (mut anynul, mut status) = (0, 0);
        // SAFETY: v holds n elements of the type named by T::CODE; a null nulval means no
        // null-value substitution.
        unsafe {
            sys::ffgpv(
                self.ptr,
                T::CODE,
                1,
                n as sys::LONGLONG,
                ptr::null_mut(),
                v.as_mut_ptr().cast::<c_void>(),
                &mut anynul,
                &mut status,
            )
        };
        self.check("reading pixels", status)?;
        Ok(v)
    }

    /// Creates an image HDU named `extname` of `bitpix` and `shape` (numpy order) and moves to it.
    pub fn create_image(
        &mut self,
        extname: &str,
        bitpix: i32,
        shape: &[usize],
    ) -> Result<(), IoError> {
        let mut naxes: Vec<sys::LONGLONG> = shape.iter().rev().map(|&n| n as _).collect();
        let mut status = 0;
        let naxis = self.c_int(naxes.len(), "image axes")?;
        // SAFETY: naxes holds naxis entries.
        unsafe { sys::ffcrimll(self.ptr, bitpix, naxis, naxes.as_mut_ptr(), &mut status) };
        self.hdu = extname.to_string();
        self.check("creating the image", status)?;
        self.put_str("EXTNAME", extname, "")
    }

    /// Writes all pixels of the current image from `data` (converted by cfitsio).
    pub fn write_pixels<T: Elem>(&mut self, data: &[T]) -> Result<(), IoError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut status = 0;
        // SAFETY: data holds len elements of T::CODE; cfitsio's write routines convert into
        // their own buffers and only read the array (the C prototype lacks const).
        unsafe {
            sys::ffppr(
                self.ptr,
                T::CODE,
                1,
                data.len() as sys::LONGLONG,
                data.as_ptr().cast::<c_void>().cast_mut(),
                &mut status,
            )
        };
        self.check("writing pixels", status)
    }

    /// Makes the next images created RICE tile-compressed (row tiles), or not.
    pub fn set_compression(&mut self, rice: bool) -> Result<(), IoError> {
        let ctype = if rice { sys::RICE_1 as c_int } else { 0 };
        let mut status = 0;
        // SAFETY: valid file.
        unsafe { sys::fits_set_compression_type(self.ptr, ctype, &mut status) };
        self.check("setting compression", status)
    }

    /// Creates a binary table `extname` of `nrows` rows with `(TTYPE, TFORM)` columns.
    pub fn create_table(
        &mut self,
        extname: &str,
        nrows: usize,
        cols: &[(&str, &str)],
    ) -> Result<(), IoError> {
        let names = cols
            .iter()
            .map(|c| self.c(c.0))
            .collect::<Result<Vec<_>, _>>()?;
        let forms = cols
            .iter()
            .map(|c| self.c(c.1))
            .collect::<Result<Vec<_>, _>>()?;
        let mut np: Vec<*mut c_char> = names.iter().map(|c| c.as_ptr().cast_mut()).collect();
        let mut fp: Vec<*mut c_char> = forms.iter().map(|c| c.as_ptr().cast_mut()).collect();
        let ext = self.c(extname)?;
        let mut status = 0;
        let tfields = self.c_int(cols.len(), "table columns")?;
        // SAFETY: np/fp hold tfields NUL-terminated strings that cfitsio only reads; a null
        // tunit means no units.
        unsafe {
            sys::ffcrtb(
                self.ptr,
                sys::BINARY_TBL as c_int,
                nrows as sys::LONGLONG,
                tfields,
                np.as_mut_ptr(),
                fp.as_mut_ptr(),
                ptr::null_mut(),
                ext.as_ptr(),
                &mut status,
            )
        };
        self.hdu = extname.to_string();
        self.check("creating the table", status)
    }

    /// Sets TDIMn of column `col` (1-based) to `dims`, fastest first (FITS order).
    pub fn set_tdim(&mut self, col: usize, dims: &[usize]) -> Result<(), IoError> {
        let mut d: Vec<c_long> = dims.iter().map(|&n| n as c_long).collect();
        let mut status = 0;
        let (ccol, naxis) = (
            self.c_int(col, "column")?,
            self.c_int(d.len(), "TDIM axes")?,
        );
        // SAFETY: d holds naxis entries.
        unsafe { sys::ffptdm(self.ptr, ccol, naxis, d.as_mut_ptr(), &mut status) };
        self.check("writing TDIM", status)
    }

    /// Writes `data` into column `col` (1-based) from its first element on, across rows.
    pub fn write_col<T: Elem>(&mut self, col: usize, data: &[T]) -> Result<(), IoError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut status = 0;
        let ccol = self.c_int(col, "column")?;
        // SAFETY: as in write_pixels.
        unsafe {
            sys::ffpcl(
                self.ptr,
                T::CODE,
                ccol,
                1,
                1,
                data.len() as sys::LONGLONG,
                data.as_ptr().cast::<c_void>().cast_mut(),
                &mut status,
            )
        };
        self.check(&format!("writing column {col}"), status)
    }

    /// Writes one string per row into column `col` (1-based).
    pub fn write_col_str(&mut self, col: usize, data: &[String]) -> Result<(), IoError> {
        if data.is_empty() {
            return Ok(());
        }
        let cs = data
            .iter()
            .map(|s| self.c(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut p: Vec<*mut c_char> = cs.iter().map(|c| c.as_ptr().cast_mut()).collect();
        let mut status = 0;
        let ccol = self.c_int(col, "column")?;
        // SAFETY: p holds data.len() NUL-terminated strings that cfitsio only reads.
        unsafe {
            sys::ffpcls(
                self.ptr,
                ccol,
                1,
                1,
                p.len() as sys::LONGLONG,
                p.as_mut_ptr(),
                &mut status,
            )
        };
        self.check(&format!("writing column {col}"), status)
    }

    /// Number of rows of the current table.
    pub fn nrows(&mut self) -> Result<usize, IoError> {
        let (mut n, mut status) = (0 as sys::LONGLONG, 0);
        // SAFETY: valid file and out-params.
        unsafe { sys::ffgnrwll(self.ptr, &mut n, &mut status) };
        self.check("reading the row count", status)?;
        usize::try_from(n).map_err(|_| self.err(format!("NAXIS2 = {n}")))
    }

    /// The 1-based number of column `name` (case-insensitive), `None` if absent.
    pub fn col_num(&mut self, name: &str) -> Result<Option<usize>, IoError> {
        let c = self.c(name)?;
        let (mut n, mut status) = (0, 0);
        // SAFETY: ffgcno only reads the template (the prototype lacks const).
        unsafe { sys::ffgcno(self.ptr, 0, c.as_ptr().cast_mut(), &mut n, &mut status) };
        match status {
            0 => Ok(Some(n as usize)),
            COL_NOT_FOUND => Ok(None),
            s => Err(self.err(format!("looking up column {name}: {}", status_text(s)))),
        }
    }

    /// The 1-based number of column `name`, which must exist.
    pub fn need_col(&mut self, name: &str) -> Result<usize, IoError> {
        self.col_num(name)?
            .ok_or_else(|| self.err(format!("has no column {name}")))
    }

    /// `(equivalent type code, repeat, width)` of column `col`.
    pub fn col_info(&mut self, col: usize) -> Result<(i32, usize, usize), IoError> {
        let (mut t, mut repeat, mut width, mut status) = (0, 0, 0, 0);
        let ccol = self.c_int(col, "column")?;
        // SAFETY: valid file and out-params.
        unsafe { sys::ffeqtyll(self.ptr, ccol, &mut t, &mut repeat, &mut width, &mut status) };
        self.check(&format!("reading column {col} type"), status)?;
        let count = |v: i64| usize::try_from(v.max(0)).unwrap_or(usize::MAX);
        Ok((t, count(repeat), count(width)))
    }

    /// Reads `n` elements of column `col` (1-based) from its first element on, across rows.
    pub fn read_col<T: Elem>(&mut self, col: usize, n: usize) -> Result<Vec<T>, IoError> {
        if n > MAX_ELEMENTS {
            return Err(self.err(format!(
                "{n} column elements is more than this reader accepts"
            )));
        }
        let mut v = vec![T::default(); n];
        if n == 0 {
            return Ok(v);
        }
        let (mut anynul, mut status) = (0, 0);
        let ccol = self.c_int(col, "column")?;
        // SAFETY: v holds n elements of T::CODE; a null nulval disables substitution.
        unsafe {
            sys::ffgcv(
                self.ptr,
                T::CODE,
                ccol,
                1,
                1,
                n as sys::LONGLONG,
                ptr::null_mut(),
                v.as_mut_ptr().cast::<c_void>(),
                &mut anynul,
                &mut status,
            )
        };
        self.check(&format!("reading column {col}"), status)?;
        Ok(v)
    }

    /// Reads the strings of column `col` for every row, trailing blanks and NULs removed.
    pub fn read_col_str(&mut self, col: usize) -> Result<Vec<String>, IoError> {
        let nrows = self.nrows()?;
        let (_, repeat, width) = self.col_info(col)?;
        let len = repeat.max(width).max(1);
        if nrows.saturating_mul(len + 1) > MAX_ELEMENTS {
            return Err(self.err(format!("string column {col} is too large")));
        }
        let mut bufs: Vec<Vec<c_char>> = vec![vec![0; len + 1]; nrows];
        let mut p: Vec<*mut c_char> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        let mut nul = [0 as c_char; 1];
        let (mut anynul, mut status) = (0, 0);
        if nrows > 0 {
            let ccol = self.c_int(col, "column")?;
            // SAFETY: each of the nrows buffers holds repeat (≥ width) characters plus NUL.
            unsafe {
                sys::ffgcvs(
                    self.ptr,
                    ccol,
                    1,
                    1,
                    nrows as sys::LONGLONG,
                    nul.as_mut_ptr(),
                    p.as_mut_ptr(),
                    &mut anynul,
                    &mut status,
                )
            };
        }
        self.check(&format!("reading column {col}"), status)?;
        Ok(bufs
            .iter()
            .map(|b| from_c(b).trim_end().to_string())
            .collect())
    }

    /// Appends a copy of the current HDU of `src` (header and data) and moves to it.
    pub fn copy_hdu_from(&mut self, src: &mut Fits) -> Result<(), IoError> {
        let mut status = 0;
        // SAFETY: both files are open; src is only read.
        unsafe { sys::ffcopy(src.ptr, self.ptr, 0, &mut status) };
        self.hdu = src.hdu.clone();
        self.check(&format!("copying from {}", src.path.display()), status)
    }

    /// Deletes `n` rows of the current table starting at 0-based row `first`.
    pub fn delete_rows(&mut self, first: usize, n: usize) -> Result<(), IoError> {
        if n == 0 {
            return Ok(());
        }
        let mut status = 0;
        // SAFETY: valid file.
        unsafe {
            sys::ffdrow(
                self.ptr,
                first as sys::LONGLONG + 1,
                n as sys::LONGLONG,
                &mut status,
            )
        };
        self.check("deleting rows", status)
    }

    /// Writes CHECKSUM and DATASUM into every HDU; call after the last change to the file.
    pub fn write_checksums(&mut self) -> Result<(), IoError> {
        for i in 1..=self.num_hdus()? {
            let mut status = 0;
            let hdu = self.c_int(i, "HDU")?;
            // SAFETY: hdu is a valid HDU number; the type out-param may be null.
            unsafe { sys::ffmahd(self.ptr, hdu, ptr::null_mut(), &mut status) };
            self.check(&format!("moving to HDU {}", i - 1), status)?;
            self.name_current(i - 1)?;
            // SAFETY: valid file positioned at HDU i.
            unsafe { sys::ffpcks(self.ptr, &mut status) };
            self.check("writing the checksum", status)?;
        }
        Ok(())
    }

    /// Writes raw `bytes` into row `row` (0-based) from byte `first` (0-based) of the row;
    /// used for NUL-padded strings, which cfitsio's string writer would pad with blanks.
    pub fn write_row_bytes(
        &mut self,
        row: usize,
        first: usize,
        bytes: &[u8],
    ) -> Result<(), IoError> {
        let mut status = 0;
        // SAFETY: bytes holds nchars bytes that cfitsio only reads (the prototype lacks const).
        unsafe {
            sys::ffptbb(
                self.ptr,
                row as sys::LONGLONG + 1,
                first as sys::LONGLONG + 1,
                bytes.len() as sys::LONGLONG,
                bytes.as_ptr().cast_mut(),
                &mut status,
            )
        };
        self.check("writing table bytes", status)
    }

    /// Checks that the current table's data is all in the file, by reading its last byte: a
    /// truncated `.gz` decompresses without complaint to a short file.
    pub fn check_table_complete(&mut self) -> Result<(), IoError> {
        let nrows = self.nrows()?;
        let width = self
            .key_i64("NAXIS1")?
            .and_then(|w| usize::try_from(w).ok())
            .unwrap_or(0);
        if nrows == 0 || width == 0 {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        let mut status = 0;
        // SAFETY: byte holds the one character requested.
        unsafe {
            sys::ffgtbb(
                self.ptr,
                nrows as sys::LONGLONG,
                width as sys::LONGLONG,
                1,
                byte.as_mut_ptr(),
                &mut status,
            )
        };
        self.check("table data is incomplete (truncated file?)", status)
    }
}
