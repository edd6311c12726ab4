//! Gzipped FITS files, inflated here rather than by cfitsio, which sizes its buffer from the
//! gzip trailer (a 10-byte file asks for gigabytes), inflates everything before anyone can look
//! at a header (a small bomb grows to gigabytes), and accepts a stream missing its CRC and
//! length.
//!
//! The stream is inflated in chunks while the FITS headers are walked as they arrive: each
//! HDU's declared data size is checked against [`MAX_INFLATED`] before its data is inflated,
//! and nothing is inflated past the declared end of the last HDU except what could be one more
//! header. Every gzip member's CRC and length must match (flate2 checks them), and the inflated
//! file must hold what its headers declare.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::path::Path;

use flate2::bufread::MultiGzDecoder;

/// Most bytes a gzipped input may inflate to: six times a DESI preproc image (170 MB), so a
/// bomb cannot take more; larger inputs must be given uncompressed, where nothing is read
/// before its shape is checked.
pub(crate) const MAX_INFLATED: u64 = 1 << 30;

/// FITS block size.
const BLOCK: usize = 2880;
/// Card size.
const CARD: usize = 80;
/// Most blocks one header may take (DESI headers take under 10); past this the walk gives up.
const MAX_HEADER_BLOCKS: usize = 1000;
/// Inflated in one read.
const CHUNK: usize = 1 << 20;

/// The two magic bytes every gzip member starts with.
pub(super) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Magic numbers of the other compressions cfitsio would inflate itself (Unix compress, pack,
/// LZH, pkzip): no FITS file starts with them.
pub(super) const OTHER_MAGIC: [([u8; 2], &str); 4] = [
    ([0x1f, 0x9d], "Unix compress (.Z)"),
    ([0x1f, 0x1e], "pack (.z)"),
    ([0x1f, 0xa0], "LZH"),
    ([b'P', b'K'], "pkzip"),
];

/// Where the walk over the inflated headers stands.
#[derive(Debug, Default)]
struct Layout {
    /// HDUs whose header has been read.
    hdus: usize,
    /// Byte offset where the next header starts (the padded end of the last HDU's data).
    next: usize,
    /// Unpadded end of the last HDU's data: the inflated file must reach at least this far.
    data_end: u64,
    /// The walk met something that is not a header at `next`; cfitsio will report it.
    stopped: bool,
}

/// Inflates the gzip file `path` (its first bytes are [`GZIP_MAGIC`]) into memory.
pub(super) fn inflate(path: &Path) -> Result<Vec<u8>, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let capacity = capacity_hint(&mut file).map_err(|e| e.to_string())?;
    let mut gz = MultiGzDecoder::new(BufReader::new(file));
    let mut out: Vec<u8> = Vec::with_capacity(capacity);
    let mut layout = Layout::default();
    loop {
        let limit = inflate_limit(&layout);
        let have = out.len() as u64;
        if have >= limit {
            return Err(if have > MAX_INFLATED {
                too_large(format!("it inflates to more than {MAX_INFLATED} bytes"), "")
            } else {
                format!(
                    "the inflated data goes on past byte {} where HDU {} should start, but no \
                     FITS header (SIMPLE or XTENSION, then END) is there",
                    layout.next, layout.hdus
                )
            });
        }
        let want = usize::try_from((limit - have).min(CHUNK as u64)).unwrap_or(CHUNK);
        let start = out.len();
        out.resize(start + want, 0);
        let got = gz.read(&mut out[start..]);
        out.truncate(start + *got.as_ref().unwrap_or(&0));
        match got {
            Ok(0) => break,
            Ok(_) => walk(&out, &mut layout)?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(format!(
                    "the gzip stream ends early (truncated file?): {start} bytes inflated, then \
                     the compressed data, its CRC or its length is missing"
                ))
            }
            Err(e) => return Err(format!("not a valid gzip file: {e}")),
        }
    }
    if (out.len() as u64) < layout.data_end {
        return Err(format!(
            "the inflated file has {} bytes but its headers declare {} (it was cut short before \
             it was compressed)",
            out.len(),
            layout.data_end
        ));
    }
    Ok(out)
}

/// The buffer to reserve: the trailer's ISIZE (the last member's length mod 2^32) when it is
/// plausible. It is only a hint: a truncated file's last bytes are not a length.
fn capacity_hint(file: &mut File) -> std::io::Result<usize> {
    /// deflate inflates at most about 1032 bytes per byte.
    const MAX_RATIO: u64 = 1100;
    let size = file.metadata()?.len();
    if size < 18 {
        return Ok(0);
    }
    let mut t = [0u8; 4];
    file.seek(SeekFrom::End(-4))?;
    file.read_exact(&mut t)?;
    file.rewind()?;
    let isize = u64::from(u32::from_le_bytes(t));
    let plausible = isize <= MAX_INFLATED && isize <= size.saturating_mul(MAX_RATIO);
    Ok(if plausible {
        usize::try_from(isize).unwrap_or(0)
    } else {
        0
    })
}

/// How far the stream may be inflated given what the headers declare so far: one header's
/// worth past the declared end of the last HDU, and never past the cap.
fn inflate_limit(layout: &Layout) -> u64 {
    let header_room = (MAX_HEADER_BLOCKS * BLOCK) as u64;
    (layout.next as u64)
        .saturating_add(header_room)
        .min(MAX_INFLATED + 1)
}

fn too_large(what: String, hdu: &str) -> String {
    format!(
        "{hdu}{what}; a gzipped input may inflate to at most {MAX_INFLATED} bytes (give a larger \
         file uncompressed)"
    )
}

/// Reads every complete header that has arrived in `buf` since the last call.
fn walk(buf: &[u8], layout: &mut Layout) -> Result<(), String> {
    while !layout.stopped {
        let Some(header) = buf.get(layout.next..) else {
            return Ok(());
        };
        let Some(end_block) = find_end(header, layout.hdus == 0) else {
            // Incomplete (wait for more) or not a header at all (stop walking).
            let blocks = header.len() / BLOCK;
            if !starts_like_header(header, layout.hdus == 0) || blocks >= MAX_HEADER_BLOCKS {
                layout.stopped = header.len() >= CARD;
            }
            return Ok(());
        };
        let cards = &header[..end_block * BLOCK];
        let Some(data) = declared_data_bytes(cards, layout.hdus == 0) else {
            layout.stopped = true;
            return Ok(());
        };
        let data_start = layout.next as u64 + (end_block * BLOCK) as u64;
        let data_end = data_start.saturating_add(data);
        let padded = data_end.div_ceil(BLOCK as u64) * BLOCK as u64;
        if padded > MAX_INFLATED {
            return Err(too_large(
                format!("declares {data} bytes of data, ending at byte {data_end}"),
                &format!("HDU {}: ", layout.hdus),
            ));
        }
        layout.hdus += 1;
        layout.data_end = data_end;
        // Below MAX_INFLATED, so it fits.
        layout.next = usize::try_from(padded).unwrap_or(usize::MAX);
    }
    Ok(())
}

/// Whether `bytes` could be the start of a header: `SIMPLE  =` first, `XTENSION=` after.
fn starts_like_header(bytes: &[u8], primary: bool) -> bool {
    let key: &[u8] = if primary { b"SIMPLE  =" } else { b"XTENSION=" };
    let n = bytes.len().min(key.len());
    bytes[..n] == key[..n]
}

/// The number of blocks up to and including the one holding the END card, if it has arrived
/// within [`MAX_HEADER_BLOCKS`].
fn find_end(header: &[u8], primary: bool) -> Option<usize> {
    if !starts_like_header(header, primary) || header.len() < CARD {
        return None;
    }
    let cards = header.len().min(MAX_HEADER_BLOCKS * BLOCK) / CARD;
    (0..cards)
        .find(|&i| {
            let c = &header[i * CARD..(i + 1) * CARD];
            &c[..3] == b"END" && c[3..].iter().all(|&b| b == b' ')
        })
        .map(|i| i * CARD / BLOCK + 1)
        .filter(|&blocks| blocks * BLOCK <= header.len())
}

/// The value field of a card (after `= `, before any comment).
fn value_text(card: &[u8]) -> &[u8] {
    let v = card.get(10..).unwrap_or(&[]);
    v.split(|&b| b == b'/').next().unwrap_or(v)
}

/// The integer value of card `key` among `cards`, if present and a whole number.
fn int_value(cards: &[u8], key: &str) -> Option<Option<i64>> {
    let pat = format!("{key:<8}=");
    let Some(card) = cards
        .chunks_exact(CARD)
        .find(|c| c.starts_with(pat.as_bytes()))
    else {
        return Some(None);
    };
    let value = std::str::from_utf8(value_text(card)).ok()?.trim();
    if let Ok(v) = value.parse::<i64>() {
        return Some(Some(v));
    }
    let v: f64 = value.replace(['D', 'd'], "E").parse().ok()?;
    // Whole and well inside i64: exact.
    #[allow(clippy::cast_possible_truncation)]
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(Some(v as i64))
}

/// Bytes of data a header declares (FITS standard 4.4.1: |BITPIX|/8 × GCOUNT × (PCOUNT +
/// NAXIS1 × … × NAXISn), NAXIS1 left out for random groups), unpadded; `None` when the
/// structural keys cannot be read (cfitsio will say what is wrong).
fn declared_data_bytes(cards: &[u8], primary: bool) -> Option<u64> {
    let bitpix = int_value(cards, "BITPIX")??;
    if ![8, 16, 32, 64, -32, -64].contains(&bitpix) {
        return None;
    }
    let naxis = int_value(cards, "NAXIS")??;
    if !(0..=999).contains(&naxis) {
        return None;
    }
    if naxis == 0 {
        return Some(0);
    }
    let groups = primary
        && cards
            .chunks_exact(CARD)
            .any(|c| c.starts_with(b"GROUPS  =") && value_text(c).trim_ascii() == b"T");
    let mut elements: u64 = 1;
    for i in 1..=naxis {
        let n = u64::try_from(int_value(cards, &format!("NAXIS{i}"))??).ok()?;
        if !(i == 1 && groups && n == 0) {
            elements = elements.saturating_mul(n);
        }
    }
    let pcount = u64::try_from(int_value(cards, "PCOUNT")?.unwrap_or(0)).ok()?;
    let gcount = u64::try_from(int_value(cards, "GCOUNT")?.unwrap_or(1)).ok()?;
    let bytes = bitpix.unsigned_abs() / 8;
    Some(
        bytes
            .saturating_mul(gcount)
            .saturating_mul(pcount.saturating_add(elements)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn card(s: &str) -> String {
        format!("{s:<80}")
    }

    /// A FITS file of one 2-D image of `ny × nx` bytes (BITPIX 8) holding `data` bytes.
    fn fits(ny: u64, nx: u64, data: usize) -> Vec<u8> {
        let mut h = String::new();
        for c in [
            "SIMPLE  =                    T".to_string(),
            "BITPIX  =                    8".to_string(),
            "NAXIS   =                    2".to_string(),
            format!("NAXIS1  = {nx:>20}"),
            format!("NAXIS2  = {ny:>20}"),
            "END".to_string(),
        ] {
            h.push_str(&card(&c));
        }
        let mut b = h.into_bytes();
        b.resize(BLOCK, b' ');
        b.extend(std::iter::repeat_n(7u8, data));
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn inflate_bytes(gz: &[u8]) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.fits.gz");
        std::fs::write(&p, gz).unwrap();
        inflate(&p)
    }

    #[test]
    fn a_complete_file_inflates_whole() {
        let f = fits(10, 30, 300);
        assert_eq!(inflate_bytes(&gzip(&f)).unwrap(), f);
        // Two members, as `cat a.gz b.gz` makes.
        let mut two = gzip(&f[..BLOCK]);
        two.extend(gzip(&f[BLOCK..]));
        assert_eq!(inflate_bytes(&two).unwrap(), f);
    }

    #[test]
    fn a_missing_trailer_or_tail_is_an_error() {
        let gz = gzip(&fits(10, 30, 300));
        for cut in [1, 4, 8, 9, 20, gz.len() - 10] {
            let err = inflate_bytes(&gz[..gz.len() - cut]).unwrap_err();
            assert!(err.contains("ends early"), "cut {cut}: {err}");
        }
        let err = inflate_bytes(&gz[..10]).unwrap_err();
        assert!(err.contains("ends early"), "{err}");
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 6] ^= 1; // the CRC
        let err = inflate_bytes(&bad).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        let mut junk = gz.clone();
        junk.extend_from_slice(b"junk after the stream");
        assert!(inflate_bytes(&junk).is_err());
    }

    #[test]
    fn declared_sizes_are_checked_before_inflating() {
        // Declares 40000 × 40000 bytes (1.6 GB) but is a few kB when compressed: refused after
        // the first block is inflated, whatever the data.
        let bomb = gzip(&fits(40_000, 40_000, 100_000));
        let err = inflate_bytes(&bomb).unwrap_err();
        assert!(err.contains("HDU 0: declares 1600000000 bytes"), "{err}");
        // Zeros past the declared end: not inflated beyond one header's worth.
        let mut f = fits(10, 30, 300);
        f.resize(f.len() + 10 * MAX_HEADER_BLOCKS * BLOCK, 0);
        let err = inflate_bytes(&gzip(&f)).unwrap_err();
        assert!(err.contains("no FITS header"), "{err}");
        // A file cut short before it was compressed.
        let f = fits(10, 3000, 30_000);
        let err = inflate_bytes(&gzip(&f[..4 * BLOCK])).unwrap_err();
        assert!(err.contains("declare 32880"), "{err}");
    }

    #[test]
    fn a_trailer_of_garbage_is_only_a_hint() {
        let gz = gzip(&fits(1, 1, 1));
        let mut cut = gz[..gz.len() - 8].to_vec();
        cut.extend_from_slice(&[0xff; 4]);
        let err = inflate_bytes(&cut).unwrap_err();
        assert!(err.contains("ends early"), "{err}");
    }
}
