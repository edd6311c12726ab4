//! Whether a FITS file holds all the bytes its headers announce: a copy cut short (a transfer
//! that stopped, a full disk) opens and reads its first bytes fine, and fails only when a run
//! reaches the missing data. Only the headers are read, so a check costs a few blocks per HDU
//! whatever the size of the data. Plain std; imports nothing of the crate.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// FITS files are made of blocks of this many bytes.
const BLOCK: u64 = 2880;
/// HDUs walked before giving up (a DESI preproc image has five).
const MAX_HDUS: usize = 1000;

/// Why the file at `path` is not a whole FITS file, if it is not; `Ok(None)` when it is, or
/// when it is gzipped (the announced sizes are inside the compressed stream).
pub(super) fn incomplete_fits(path: &Path) -> std::io::Result<Option<String>> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(Some("empty file".to_string()));
    }
    let mut magic = Vec::new();
    file.by_ref().take(9).read_to_end(&mut magic)?;
    if magic.starts_with(&[0x1f, 0x8b]) {
        return Ok(None);
    }
    if magic != b"SIMPLE  =" {
        return Ok(Some("not a FITS file (no SIMPLE card first)".to_string()));
    }
    let mut start = 0u64;
    for hdu in 0..MAX_HDUS {
        file.seek(SeekFrom::Start(start))?;
        let header = match read_header(&mut file)? {
            Header::Cards(cards) => cards,
            Header::Cut => {
                return Ok(Some(format!(
                    "cut short: {size} bytes, ending inside the header of HDU {}",
                    hdu + 1
                )))
            }
        };
        if hdu > 0 && header.first().map(|c| key(c)) != Some("XTENSION") {
            // Bytes after the last HDU that are not one: not data any reader looks at.
            return Ok(None);
        }
        let header_bytes = header.len() as u64 * 80;
        let header_bytes = header_bytes.div_ceil(BLOCK) * BLOCK;
        let data = data_bytes(&header)
            .ok_or_else(|| std::io::Error::other(format!("HDU {}: unreadable sizes", hdu + 1)))?;
        let end = start + header_bytes + data.div_ceil(BLOCK) * BLOCK;
        // The last block's padding may be missing in files written by lax tools; the data
        // itself may not.
        if start + header_bytes + data > size {
            return Ok(Some(format!(
                "cut short: {size} bytes, but HDU {} announces data up to byte {}",
                hdu + 1,
                start + header_bytes + data
            )));
        }
        if end >= size {
            return Ok(None);
        }
        start = end;
    }
    Ok(None)
}

enum Header {
    /// The cards up to and including END.
    Cards(Vec<String>),
    /// The file ended first.
    Cut,
}

fn read_header(file: &mut std::fs::File) -> std::io::Result<Header> {
    let mut cards = Vec::new();
    let mut block = vec![0u8; BLOCK as usize];
    loop {
        let mut got = 0;
        while got < block.len() {
            match file.read(&mut block[got..])? {
                0 => return Ok(Header::Cut),
                n => got += n,
            }
        }
        for card in block.chunks(80) {
            let card = String::from_utf8_lossy(card).into_owned();
            let end = key(&card) == "END";
            cards.push(card);
            if end {
                return Ok(Header::Cards(cards));
            }
        }
    }
}

fn key(card: &str) -> &str {
    card.get(..8).unwrap_or(card).trim_end()
}

/// The integer value of `name` among `cards`.
fn int_value(cards: &[String], name: &str) -> Option<i64> {
    cards.iter().find(|c| key(c) == name).and_then(|c| {
        let value = c.get(10..)?.split('/').next()?.trim();
        value.parse().ok()
    })
}

/// The bytes of data an HDU's header announces (FITS 4.0 §4.4.1):
/// `|BITPIX| / 8 · GCOUNT · (PCOUNT + NAXIS1 · … · NAXISn)`.
fn data_bytes(cards: &[String]) -> Option<u64> {
    let bitpix = int_value(cards, "BITPIX")?;
    let naxis = int_value(cards, "NAXIS")?;
    if naxis == 0 {
        return Some(0);
    }
    let mut elements: u64 = 1;
    for i in 1..=naxis {
        let n = u64::try_from(int_value(cards, &format!("NAXIS{i}"))?).ok()?;
        elements = elements.checked_mul(n)?;
    }
    let pcount = u64::try_from(int_value(cards, "PCOUNT").unwrap_or(0)).ok()?;
    let gcount = u64::try_from(int_value(cards, "GCOUNT").unwrap_or(1)).ok()?;
    bitpix
        .unsigned_abs()
        .checked_div(8)?
        .checked_mul(gcount)?
        .checked_mul(elements.checked_add(pcount)?)
}

/// A FITS header of `cards` (80 columns each, `END` added), padded to whole blocks.
#[cfg(test)]
pub(super) fn header(cards: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in cards.iter().chain(&["END"]) {
        out.extend(format!("{c:<80}").bytes());
    }
    out.resize(out.len().div_ceil(BLOCK as usize) * BLOCK as usize, b' ');
    out
}

/// A whole FITS file: an empty primary HDU and a 10 x 300 image of 32-bit floats.
#[cfg(test)]
pub(super) fn small_fits() -> Vec<u8> {
    let mut f = header(&[
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    0",
    ]);
    f.extend(header(&[
        "XTENSION= 'IMAGE   '",
        "BITPIX  =                  -32",
        "NAXIS   =                    2",
        "NAXIS1  =                   10 / columns",
        "NAXIS2  =                  300",
        "PCOUNT  =                    0",
        "GCOUNT  =                    1",
    ]));
    let data: usize = 10 * 300 * 4;
    f.resize(f.len() + data.div_ceil(BLOCK as usize) * BLOCK as usize, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_files_pass_and_cut_ones_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.fits");
        let whole = small_fits();
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(incomplete_fits(&path).unwrap(), None);
        // Cut inside the image's data: 2880 x 2 headers + 12000 bytes announced.
        std::fs::write(&path, &whole[..whole.len() - 5000]).unwrap();
        let why = incomplete_fits(&path).unwrap().expect("cut short");
        assert!(
            why.contains("HDU 2 announces data up to byte 17760"),
            "{why}"
        );
        // Cut inside the second header.
        std::fs::write(&path, &whole[..2880 + 100]).unwrap();
        let why = incomplete_fits(&path).unwrap().expect("cut short");
        assert!(why.contains("inside the header of HDU 2"), "{why}");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            incomplete_fits(&path).unwrap().as_deref(),
            Some("empty file")
        );
        std::fs::write(&path, "x".repeat(3000)).unwrap();
        assert!(incomplete_fits(&path)
            .unwrap()
            .unwrap()
            .contains("not a FITS file"));
        // Gzipped files are not judged.
        std::fs::write(&path, [0x1f, 0x8b, 8, 0]).unwrap();
        assert_eq!(incomplete_fits(&path).unwrap(), None);
    }
}
