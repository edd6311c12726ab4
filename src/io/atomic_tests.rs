//! Tests of atomic, no-clobber outputs and of their leftovers.

use std::sync::{Arc, Barrier};

use super::*;

fn write_bytes(tmp: &Path, bytes: &[u8]) -> Result<(), IoError> {
    std::fs::write(tmp, bytes).map_err(|source| IoError::Os {
        path: tmp.to_path_buf(),
        source,
    })
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn atomic_write_refuses_existing_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.fits");
    std::fs::write(&out, b"old").unwrap();
    let err = write_atomic(&out, false, |_| panic!("must not be called")).unwrap_err();
    assert!(matches!(err, IoError::Exists { .. }), "{err}");
    let err = write_atomic(&out, true, |tmp| {
        std::fs::write(tmp, b"partial").unwrap();
        Err(IoError::file(tmp, "boom"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("boom"));
    assert_eq!(names(dir.path()), ["x.fits"], "temporary left behind");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    write_atomic(&out, true, |tmp| write_bytes(tmp, b"new")).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"new");
    // A dangling link is something at the path too.
    let link = dir.path().join("link.fits");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
    let err = write_atomic(&link, false, |_| panic!("must not be called")).unwrap_err();
    assert!(matches!(err, IoError::Exists { .. }), "{err}");
}

/// Two writers of one output, both past the first look before either renames (the race of
/// issue 12 item 3): exactly one file lands, the other writer is told it exists.
#[test]
fn racing_writers_one_wins_the_other_is_refused() {
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frame.fits");
        let both_written = Arc::new(Barrier::new(2));
        let writers: Vec<_> = (0..2u8)
            .map(|w| {
                let (out, both_written) = (out.clone(), Arc::clone(&both_written));
                std::thread::spawn(move || {
                    write_atomic(&out, false, |tmp| {
                        write_bytes(tmp, &[w; 16])?;
                        both_written.wait();
                        Ok(())
                    })
                })
            })
            .collect();
        let results: Vec<_> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<usize> = (0..2).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        let lost = &results[1 - won[0]];
        assert!(
            matches!(lost, Err(IoError::Exists { .. })),
            "round {round}: {lost:?}"
        );
        assert!(lost.as_ref().unwrap_err().to_string().contains("exists"));
        assert_eq!(std::fs::read(&out).unwrap(), [won[0] as u8; 16]);
        assert_eq!(names(dir.path()), ["frame.fits"], "round {round}");
    }
}

#[test]
fn link_fallback_refuses_an_existing_target() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, b"new").unwrap();
    std::fs::write(&b, b"theirs").unwrap();
    let err = link_then_unlink(&a, &b).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&b).unwrap(), b"theirs");
    std::fs::remove_file(&b).unwrap();
    link_then_unlink(&a, &b).unwrap();
    assert_eq!(std::fs::read(&b).unwrap(), b"new");
    assert!(!a.exists());
}

#[test]
fn a_placed_output_is_undone_only_if_it_replaced_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.fits");
    let placed = stage(&out, false, |tmp| write_bytes(tmp, b"1"))
        .unwrap()
        .place(false)
        .unwrap();
    assert!(placed.undo());
    assert!(!out.exists());
    std::fs::write(&out, b"old").unwrap();
    let placed = stage(&out, true, |tmp| write_bytes(tmp, b"2"))
        .unwrap()
        .place(true)
        .unwrap();
    assert!(!placed.undo(), "a replaced file cannot come back");
    assert_eq!(std::fs::read(&out).unwrap(), b"2");
    // Someone else's file put there after ours is not ours to remove, even on our old inode.
    std::fs::remove_file(&out).unwrap();
    let placed = stage(&out, false, |tmp| write_bytes(tmp, b"3"))
        .unwrap()
        .place(false)
        .unwrap();
    std::fs::remove_file(&out).unwrap();
    std::fs::write(&out, b"theirs").unwrap();
    assert!(!placed.undo());
    assert_eq!(std::fs::read(&out).unwrap(), b"theirs");
}

/// A write that fails on a full disk names the output and the system's reason, not the
/// temporary and cfitsio's status alone (issue 12, item 14). /dev/full fails every write with
/// ENOSPC, as a full disk does.
#[test]
fn a_failed_write_names_the_output_and_the_system_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.fits");
    let err = write_atomic(&out, false, |tmp| {
        std::fs::write(tmp, b"part").unwrap();
        if std::fs::write("/dev/full", b"x").is_ok() {
            eprintln!("skipping the ENOSPC half: /dev/full took a write");
        }
        Err(IoError::hdu(
            tmp,
            "RESOLUTION",
            "writing pixels: cfitsio status 106 (error writing to FITS file)",
        ))
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IoError::NotWritten { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}: not written: ", out.display())),
        "{msg}"
    );
    assert!(!msg.contains(".tmp-"), "names the temporary: {msg}");
    assert!(msg.contains("HDU RESOLUTION"), "{msg}");
    if Path::new("/dev/full").exists() {
        assert!(msg.contains("No space left on device"), "{msg}");
    }
    assert_eq!(names(dir.path()), Vec::<String>::new());

    // An ENOSPC from before the write is not this write's reason.
    let _ = std::fs::write("/dev/full", b"x");
    let err = write_atomic(&out, false, |tmp| Err(IoError::file(tmp, "bad value")))
        .unwrap_err()
        .to_string();
    assert_eq!(err, format!("{}: not written: bad value", out.display()));
    // An error about another file (an input read while writing) stays about that file.
    let input = dir.path().join("preproc.fits");
    let err = write_atomic(&out, false, |_| Err(IoError::file(&input, "no FIBERMAP")))
        .unwrap_err()
        .to_string();
    assert_eq!(err, format!("{}: no FIBERMAP", input.display()));
}

#[test]
fn temporaries_say_who_writes_them() {
    let out = Path::new("/x/frame-r0.fits");
    let tmp = temp_path(out).unwrap();
    let name = tmp.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(".frame-r0.fits.tmp-"), "{name}");
    assert_eq!(
        temporary_writer(name),
        Some((Some(temporary_host()), std::process::id()))
    );
    for (name, want) in [
        (".f.fits.tmp-nid001-2-17", Some((Some("nid001"), 2))),
        (".f.fits.tmp-login-3.x-2-0", Some((Some("login-3.x"), 2))),
        (".m.fits.tmp-4242-0", Some((None, 4242))),
        (".m.fits.gz.tmp-4242-0", Some((None, 4242))),
        // Older names are taken for FITS outputs only.
        (".notes.tmp-4242-0", None),
        (".f.fits.tmp-4242", None),
        (".f.fits.tmp-4242-x", None),
        (".f.fits.tmp--0", None),
        (".f.fits.tmp--1-0", None),
        ("f.fits.tmp-4242-0", None),
        (".f.fits.probe-42", None),
        ("..tmp-4242-0", None),
    ] {
        assert_eq!(temporary_writer(name), want, "{name}");
    }
}

#[test]
fn leftovers_are_sorted_by_what_became_of_their_writer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A process that has ended, and one that runs.
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    ended.wait().unwrap();
    let dead = ended.id();
    let mut running = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let live = running.id();
    let me = std::process::id();
    let h = temporary_host();
    let files = [
        format!(".f.fits.tmp-{h}-{dead}-0"),
        format!(".m.fits.tmp-{dead}-3"),
        format!(".g.fits.tmp-{h}-{live}-0"),
        format!(".g.fits.tmp-{h}-{me}-1"),
        format!(".f.fits.tmp-{h}x-{dead}-0"),
        "f.fits".into(),
        ".notes.tmp-1-1".into(),
    ];
    for f in &files {
        std::fs::write(d.join(f), b"x").unwrap();
    }
    let found = leftover_temporaries(d);
    let _ = running.kill();
    let _ = running.wait();
    let paths = |idx: &[usize]| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = idx.iter().map(|&i| d.join(&files[i])).collect();
        v.sort();
        v
    };
    assert_eq!(found.stale, paths(&[0, 1]), "{found:?}");
    assert_eq!(found.busy, paths(&[2, 3]), "{found:?}");
    assert_eq!(found.elsewhere, paths(&[4]), "{found:?}");
    assert_eq!(
        leftover_temporaries(&d.join("missing")),
        Leftovers::default()
    );
}

#[test]
fn output_keys_see_through_links_dots_and_double_slashes() {
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::create_dir(d.join("out")).unwrap();
    std::os::unix::fs::symlink(d.join("out"), d.join("via")).unwrap();
    let want = d.join("out/a.fits");
    for spelling in [
        format!("{}/out/a.fits", d.display()),
        format!("{}/out//a.fits", d.display()),
        format!("{}/out/./x/../a.fits", d.display()),
        format!("{}/via/a.fits", d.display()),
        format!("{}/out/new/../../out/a.fits", d.display()),
    ] {
        assert_eq!(output_key(Path::new(&spelling)), want, "{spelling}");
    }
    // A folder still to be made keeps its place.
    assert_eq!(
        output_key(&d.join("via/new/sub/b.fits")),
        d.join("out/new/sub/b.fits")
    );
    // The file name is not followed (a link there is replaced, not written through) ...
    std::fs::write(d.join("psf.fits"), b"p").unwrap();
    std::os::unix::fs::symlink(d.join("psf.fits"), d.join("out/l.fits")).unwrap();
    assert_eq!(output_key(&d.join("via/l.fits")), d.join("out/l.fits"));
    // ... while an input's is.
    assert_eq!(input_key(&d.join("via/l.fits")), d.join("psf.fits"));
    assert_eq!(input_key(&d.join("via/none.fits")), d.join("out/none.fits"));
}
