//! Checks of raw header cards that cfitsio does not make: what astropy (and so desispec)
//! needs of a binary table's column keys before it can read the table at all, and a diagnosis of
//! a header cfitsio refuses to parse, for the message.
//!
//! Measured with astropy 5.2: a TTYPEn that is not a string, is blank or repeats another, a
//! column without TTYPEn or TFORMn, a TFIELDS that is not an integer, a control byte in a card,
//! or a value astropy cannot parse (text after a closing quote, `NaN`, `1 2`) in XTENSION or a
//! column key makes `astropy.io.fits` fail on the table, and in any other card makes reading
//! that card fail; a malformed TDIM, TNULL, TSCAL or TDISP only warns.

/// A card's value field.
#[derive(Debug, PartialEq)]
pub(crate) enum Value {
    /// No `= ` value indicator, or nothing after it.
    Absent,
    /// A quoted string, quotes removed, `''` undone and trailing blanks dropped.
    Str(String),
    /// A string whose closing quote is missing.
    Unterminated,
    /// A number or logical, trimmed, comment removed.
    Bare(String),
    /// Text that is none of these (astropy: "Unparsable card"), as it stands in the card.
    Malformed(String),
}

/// The keyword of a card (columns 1–8, trailing blanks dropped).
pub(crate) fn key(card: &str) -> &str {
    card.get(..8).unwrap_or(card).trim_end()
}

/// The value of a card, parsed as strictly as astropy does: after a string only blanks and a
/// comment may follow; anything else must be an integer, a real (exponent `E` or `D`), a
/// complex `(re, im)`, `T` or `F`.
pub(crate) fn value(card: &str) -> Value {
    let Some(rest) = card.get(8..).and_then(|r| r.strip_prefix("= ")) else {
        return Value::Absent;
    };
    let rest = rest.trim_start();
    if let Some(s) = rest.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((_, c)) = chars.next() {
            if c != '\'' {
                out.push(c);
            } else if chars.peek().is_some_and(|&(_, c)| c == '\'') {
                chars.next();
                out.push('\'');
            } else {
                let after = chars.peek().map_or("", |&(i, _)| &s[i..]).trim_start();
                return if after.is_empty() || after.starts_with('/') {
                    Value::Str(out.trim_end().to_string())
                } else {
                    Value::Malformed(rest.trim_end().to_string())
                };
            }
        }
        return Value::Unterminated;
    }
    let bare = rest.split('/').next().unwrap_or("").trim();
    if bare.is_empty() {
        Value::Absent
    } else if is_number(bare) || bare == "T" || bare == "F" || is_complex(bare) {
        Value::Bare(bare.to_string())
    } else {
        Value::Malformed(bare.to_string())
    }
}

/// An integer or real as FITS writes them: sign, digits with at most one point, and an
/// exponent `E` or `D` with digits.
fn is_number(t: &str) -> bool {
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match t.find(['E', 'D', 'e', 'd']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let digits = mantissa.chars().filter(char::is_ascii_digit).count();
    let points = mantissa.chars().filter(|&c| c == '.').count();
    let mantissa_ok = digits > 0 && points <= 1 && digits + points == mantissa.len();
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

/// A complex value `(re, im)`.
fn is_complex(t: &str) -> bool {
    t.strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .and_then(|t| t.split_once(','))
        .is_some_and(|(re, im)| is_number(re.trim()) && is_number(im.trim()))
}

/// The first card `k` among `cards`, with its index.
fn find<'a>(cards: &'a [String], k: &str) -> Option<(usize, &'a String)> {
    cards.iter().enumerate().find(|(_, c)| key(c) == k)
}

/// The first card with a byte outside printable ASCII (FITS standard 4.1.1), if any.
fn unprintable(cards: &[String]) -> Option<String> {
    let (i, c) = cards
        .iter()
        .enumerate()
        .find(|(_, c)| !c.chars().all(|ch| (' '..='~').contains(&ch)))?;
    Some(format!(
        "header card {} ({:?}) holds a byte that is not printable ASCII",
        i + 1,
        key(c)
    ))
}

/// The width in bytes of a binary-table column of format `form`: an optional repeat count,
/// then one of `LXBIJKAEDCM`, then anything (cfitsio's `rAw` substring width, for instance).
/// Variable-length columns (`P`, `Q`) are refused: their heap cannot be checked here.
fn tform_width(form: &str) -> Result<u64, &'static str> {
    let f = form.trim().to_ascii_uppercase();
    let code = f.trim_start_matches(|c: char| c.is_ascii_digit());
    let repeat = &f[..f.len() - code.len()];
    let repeat: u64 = if repeat.is_empty() {
        1
    } else {
        repeat
            .parse()
            .map_err(|_| "has an impossible repeat count")?
    };
    let bytes = match code.chars().next() {
        Some('X') => return Ok(repeat.div_ceil(8)),
        Some('L' | 'B' | 'A') => 1,
        Some('I') => 2,
        Some('J' | 'E') => 4,
        Some('K' | 'D' | 'C') => 8,
        Some('M') => 16,
        Some('P' | 'Q') => return Err("is a variable-length column, which is not supported here"),
        _ => return Err("is not a binary-table column format"),
    };
    Ok(repeat.saturating_mul(bytes))
}

/// A value as it would be written in the card, for messages.
fn shown(v: &Value) -> String {
    match v {
        Value::Absent => "(no value)".into(),
        Value::Str(s) => format!("'{s}'"),
        Value::Unterminated => "(a string without its closing quote)".into(),
        Value::Bare(b) | Value::Malformed(b) => b.clone(),
    }
}

/// What makes a binary table header unreadable by astropy, if anything: see the module doc.
pub(crate) fn table_problem(cards: &[String]) -> Option<String> {
    if let Some(p) = unprintable(cards) {
        return Some(p);
    }
    for (i, c) in cards.iter().enumerate() {
        if let v @ (Value::Malformed(_) | Value::Unterminated) = value(c) {
            return Some(format!(
                "header card {} ({}) has a value astropy cannot parse: {}",
                i + 1,
                key(c),
                shown(&v)
            ));
        }
    }
    if !find(cards, "XTENSION").is_some_and(|(_, c)| value(c) == Value::Str("BINTABLE".into())) {
        return Some("XTENSION is not 'BINTABLE'".into());
    }
    // What a binary table's structural keys must be (FITS standard 7.3.1).
    type Rule = (&'static str, fn(i64) -> bool, &'static str);
    let structural: [Rule; 6] = [
        ("BITPIX", |v| v == 8, "8"),
        ("NAXIS", |v| v == 2, "2"),
        ("NAXIS1", |v| v >= 0, "a byte count"),
        ("NAXIS2", |v| v >= 0, "a row count"),
        ("PCOUNT", |v| v >= 0, "a heap size"),
        ("GCOUNT", |v| v == 1, "1"),
    ];
    for (k, ok, want) in structural {
        if !int_key(cards, k).is_some_and(ok) {
            let v = find(cards, k).map_or("(missing)".into(), |(_, c)| shown(&value(c)));
            return Some(format!("{k} = {v} is not {want}"));
        }
    }
    let Some((_, tfields)) = find(cards, "TFIELDS") else {
        return Some("has no TFIELDS".into());
    };
    let n = match value(tfields) {
        Value::Bare(v) => v.parse::<usize>().ok().filter(|&n| n <= 999),
        _ => None,
    };
    let Some(n) = n else {
        return Some(format!(
            "TFIELDS = {} is not a column count",
            shown(&value(tfields))
        ));
    };
    let mut names: Vec<String> = Vec::with_capacity(n);
    let mut row_width = 0u64;
    for col in 1..=n {
        let form_key = format!("TFORM{col}");
        match find(cards, &form_key).map(|(_, c)| value(c)) {
            None => return Some(format!("column {col} has no {form_key}")),
            Some(Value::Str(form)) => match tform_width(&form) {
                Ok(w) => row_width = row_width.saturating_add(w),
                Err(why) => return Some(format!("{form_key} = '{form}' {why}")),
            },
            Some(v) => return Some(format!("{form_key} = {} is not a string", shown(&v))),
        }
        let type_key = format!("TTYPE{col}");
        let Some((i, card)) = find(cards, &type_key) else {
            return Some(format!("column {col} has no {type_key} (no column name)"));
        };
        let name = match value(card) {
            Value::Str(s) if !s.trim().is_empty() => s,
            v => {
                return Some(format!(
                    "{type_key} = {} is not a column name (a non-blank string)",
                    shown(&v)
                ))
            }
        };
        let continued = cards.get(i + 1).is_some_and(|c| key(c) == "CONTINUE");
        if name.ends_with('&') && continued {
            return Some(format!("{type_key} is continued over several cards"));
        }
        if names.contains(&name) {
            return Some(format!(
                "{type_key} = '{name}' repeats another column's name"
            ));
        }
        names.push(name);
    }
    let naxis1 = int_key(cards, "NAXIS1");
    if naxis1.is_some_and(|w| u64::try_from(w).ok() != Some(row_width)) {
        return Some(format!(
            "the columns' TFORMs add up to {row_width} bytes a row, but NAXIS1 = {}",
            naxis1.unwrap_or(0)
        ));
    }
    None
}

/// What is wrong with a header that cfitsio refused, as far as these checks can tell: the
/// structural integers, then (for a binary table) its column keys.
pub(crate) fn header_problem(cards: &[String]) -> Option<String> {
    if let Some(p) = unprintable(cards) {
        return Some(p);
    }
    let naxis = int_key(cards, "NAXIS");
    let mut keys = vec!["BITPIX".to_string(), "NAXIS".to_string()];
    keys.extend((1..=naxis.unwrap_or(0).clamp(0, 999)).map(|i| format!("NAXIS{i}")));
    for k in &keys {
        match find(cards, k) {
            None => return Some(format!("has no {k}")),
            Some((_, c)) => {
                if int_key(cards, k).is_none_or(|v| v < 0 && k != "BITPIX") {
                    return Some(format!("{k} = {} is not a count", shown(&value(c))));
                }
            }
        }
    }
    let bitpix = int_key(cards, "BITPIX").unwrap_or(0);
    if ![8, 16, 32, 64, -32, -64].contains(&bitpix) {
        return Some(format!("BITPIX = {bitpix} is not a FITS data type"));
    }
    let is_table =
        find(cards, "XTENSION").is_some_and(|(_, c)| value(c) == Value::Str("BINTABLE".into()));
    let is_compressed =
        find(cards, "ZIMAGE").is_some_and(|(_, c)| value(c) == Value::Bare("T".into()));
    match (is_table, is_compressed) {
        (true, true) => compression_problem(cards),
        (true, false) => table_problem(cards),
        _ => None,
    }
}

/// Most axes of a tile-compressed image (cfitsio's MAX_COMPRESS_DIM).
const MAX_COMPRESS_DIM: i64 = 6;

/// What in a tile-compressed image's header cfitsio would divide by zero on (a ZTILEn or
/// BLOCKSIZE of 0 raises SIGFPE inside `ffmahd`) or size its tile buffers from, checked before
/// cfitsio parses it: known ZCMPTYPE and ZBITPIX, 1 to 6 axes, each ZNAXISn at least 1, each
/// ZTILEn within 1..=ZNAXISn, BLOCKSIZE and BYTEPIX sane. `None` for other headers.
pub(crate) fn compression_problem(cards: &[String]) -> Option<String> {
    let is_compressed =
        find(cards, "ZIMAGE").is_some_and(|(_, c)| value(c) == Value::Bare("T".into()));
    let is_table =
        find(cards, "XTENSION").is_some_and(|(_, c)| value(c) == Value::Str("BINTABLE".into()));
    if !(is_compressed && is_table) {
        return None;
    }
    let cmp = find(cards, "ZCMPTYPE").map(|(_, c)| value(c));
    const KNOWN: [&str; 7] = [
        "RICE_1",
        "RICE_ONE",
        "GZIP_1",
        "GZIP_2",
        "PLIO_1",
        "HCOMPRESS_1",
        "NOCOMPRESS",
    ];
    match &cmp {
        Some(Value::Str(s)) if KNOWN.contains(&s.as_str()) => {}
        other => {
            return Some(format!(
                "ZCMPTYPE = {} is not a tile compression cfitsio knows",
                other.as_ref().map_or("(missing)".into(), shown)
            ))
        }
    }
    let zbitpix = int_key(cards, "ZBITPIX");
    if !zbitpix.is_some_and(|b| [8, 16, 32, 64, -32, -64].contains(&b)) {
        return Some("ZBITPIX is missing or not a FITS data type".into());
    }
    let Some(zndim) = int_key(cards, "ZNAXIS").filter(|n| (1..=MAX_COMPRESS_DIM).contains(n))
    else {
        return Some(format!(
            "ZNAXIS is missing or not within 1..={MAX_COMPRESS_DIM}"
        ));
    };
    for i in 1..=zndim {
        let Some(n) = int_key(cards, &format!("ZNAXIS{i}")).filter(|&n| n >= 1) else {
            return Some(format!("ZNAXIS{i} is missing or not a positive length"));
        };
        let tile_key = format!("ZTILE{i}");
        if find(cards, &tile_key).is_some()
            && !int_key(cards, &tile_key).is_some_and(|t| (1..=n).contains(&t))
        {
            return Some(format!("{tile_key} is not a tile length within 1..={n}"));
        }
    }
    for (i, name) in cards
        .iter()
        .filter(|c| key(c).starts_with("ZNAME"))
        .map(|c| (&key(c)[5..], value(c)))
    {
        let val = int_key(cards, &format!("ZVAL{i}"));
        let bad = match name {
            Value::Str(ref n) if n == "BLOCKSIZE" => {
                !val.is_some_and(|v| (1..=1 << 16).contains(&v))
            }
            Value::Str(ref n) if n == "BYTEPIX" => !val.is_some_and(|v| [1, 2, 4, 8].contains(&v)),
            _ => false,
        };
        if bad {
            return Some(format!(
                "ZNAME{i} = {} has ZVAL{i} outside what cfitsio can use",
                shown(&name)
            ));
        }
    }
    None
}

/// An integer-valued key, `None` if absent or not an integer.
fn int_key(cards: &[String], k: &str) -> Option<i64> {
    match find(cards, k).map(|(_, c)| value(c)) {
        Some(Value::Bare(v)) => v.parse().ok(),
        _ => None,
    }
}

/// The EXTNAME of a header, if it has a string one.
pub(crate) fn extname(cards: &[String]) -> Option<String> {
    match find(cards, "EXTNAME").map(|(_, c)| value(c)) {
        Some(Value::Str(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// The cards of a raw header, up to (not including) END, and whether END was there; bytes
/// that are not UTF-8 become U+FFFD, which [`unprintable`] reports.
pub(crate) fn split(raw: &[u8]) -> (Vec<String>, bool) {
    let mut cards = Vec::new();
    for c in raw.chunks(80) {
        let c = String::from_utf8_lossy(c).into_owned();
        if c.trim_end() == "END" {
            return (cards, true);
        }
        cards.push(c);
    }
    (cards, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(k: &str, v: &str) -> String {
        format!("{:<80}", format!("{k:<8}= {v}"))
    }

    fn table(cols: &[(&str, &str)]) -> Vec<String> {
        let mut c = vec![
            card("XTENSION", "'BINTABLE'"),
            card("BITPIX", "8"),
            card("NAXIS", "2"),
            card("NAXIS1", "7"),
            card("NAXIS2", "3"),
            card("TFIELDS", &cols.len().to_string()),
        ];
        for (i, (name, form)) in cols.iter().enumerate() {
            c.push(card(&format!("TTYPE{}", i + 1), name));
            c.push(card(&format!("TFORM{}", i + 1), form));
        }
        c.extend([card("PCOUNT", "0"), card("GCOUNT", "1")]);
        c
    }

    #[test]
    fn tile_compression_keys_cfitsio_would_divide_by_are_checked() {
        let mut t = table(&[("'COMPRESSED_DATA'", "'1PB(10)'")]);
        t.extend([
            card("ZIMAGE", "T"),
            card("ZCMPTYPE", "'RICE_1'"),
            card("ZBITPIX", "16"),
            card("ZNAXIS", "2"),
            card("ZNAXIS1", "240"),
            card("ZNAXIS2", "1000"),
            card("ZTILE1", "240"),
            card("ZTILE2", "1"),
            card("ZNAME1", "'BLOCKSIZE'"),
            card("ZVAL1", "32"),
        ]);
        assert_eq!(compression_problem(&t), None);
        assert_eq!(compression_problem(&table(&[("'A'", "'J'")])), None);
        for (k, v, want) in [
            ("ZTILE2", "0", "ZTILE2 is not a tile length within 1..=1000"),
            ("ZVAL1", "0", "ZNAME1 = 'BLOCKSIZE' has ZVAL1 outside"),
            ("ZNAXIS", "7", "ZNAXIS is missing or not within 1..=6"),
            (
                "ZNAXIS2",
                "0",
                "ZNAXIS2 is missing or not a positive length",
            ),
            ("ZCMPTYPE", "'ABC'", "ZCMPTYPE = 'ABC' is not"),
        ] {
            let mut c = t.clone();
            let i = c.iter().position(|c| key(c) == k).unwrap();
            c[i] = card(k, v);
            let got = compression_problem(&c).unwrap_or_default();
            assert!(got.contains(want), "{got:?} lacks {want:?}");
        }
    }

    #[test]
    fn values_are_parsed_as_fits_writes_them() {
        assert_eq!(value(&card("A", "'x''y  ' / c")), Value::Str("x'y".into()));
        assert_eq!(value(&card("A", "   12 / c")), Value::Bare("12".into()));
        assert_eq!(value(&card("A", "'abc")), Value::Unterminated);
        assert_eq!(value("COMMENT hello"), Value::Absent);
        for ok in ["1.5E3", "-1.5D-3", ".5", "5.", "+5", "T", "(1, 2.5)"] {
            assert_eq!(value(&card("A", ok)), Value::Bare(ok.into()), "{ok}");
        }
        for bad in ["'x' S", "abc", "NaN", "1 2", "t", "1E", "1.2.3"] {
            assert!(
                matches!(value(&card("A", bad)), Value::Malformed(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_good_table_passes() {
        let t = table(&[("'FIBER'", "'J'"), ("'OBJTYPE'", "'3a'")]);
        assert_eq!(table_problem(&t), None);
        assert_eq!(header_problem(&t), None);
    }

    #[test]
    fn what_astropy_cannot_read_is_named() {
        let cases = [
            (table(&[("5", "'J'")]), "TTYPE1 = 5 is not a column name"),
            (
                table(&[("'  '", "'J'")]),
                "TTYPE1 = '' is not a column name",
            ),
            (
                table(&[("'A'", "'J'"), ("'A'", "'3A'")]),
                "TTYPE2 = 'A' repeats",
            ),
            (
                table(&[("'A'", "'Z'")]),
                "TFORM1 = 'Z' is not a binary-table column format",
            ),
            (table(&[("'A'", "'abc'")]), "add up to 1 bytes a row"),
            (table(&[("'A'", "'1PJ(5)'")]), "variable-length"),
            (table(&[("'A'", "3")]), "TFORM1 = 3 is not a string"),
            (
                table(&[("'A'", "'3J'")]),
                "add up to 12 bytes a row, but NAXIS1 = 7",
            ),
        ];
        for (t, want) in cases {
            let got = table_problem(&t).unwrap_or_default();
            assert!(got.contains(want), "{got:?} lacks {want:?}");
        }
        let mut t = table(&[("'A'", "'J'")]);
        t[5] = card("TFIELDS", "2");
        assert!(table_problem(&t)
            .unwrap()
            .contains("column 2 has no TFORM2"));
        t[5] = card("TFIELDS", "1.5");
        assert!(table_problem(&t).unwrap().contains("not a column count"));
        let mut u = table(&[("'A'", "'7A'")]);
        let i = u.iter().position(|c| key(c) == "PCOUNT").unwrap();
        u[i] = card("PCOUNT", "");
        assert!(table_problem(&u)
            .unwrap()
            .contains("PCOUNT = (no value) is not a heap size"));
        let mut t = table(&[("'A'", "'J'")]);
        t[1] = card("BITPIX", "7");
        assert!(header_problem(&t).unwrap().contains("BITPIX = 7"));
        t[1] = card("BITPIX", "8");
        t[3] = card("NAXIS1", "'x'");
        assert!(header_problem(&t)
            .unwrap()
            .contains("NAXIS1 = 'x' is not a count"));
        let mut u = table(&[("'A'", "'7A'")]);
        u[0] = card("XTENSION", "'BINTABLE'     S");
        assert!(table_problem(&u)
            .unwrap()
            .contains("header card 1 (XTENSION) has a value"));
        u[0] = card("XTENSION", "'IMAGE'");
        assert!(table_problem(&u)
            .unwrap()
            .contains("XTENSION is not 'BINTABLE'"));
        t[3] = format!("{:<80}", "NAXIS1  = 7\u{1}");
        assert!(header_problem(&t).unwrap().contains("not printable"));
    }
}
