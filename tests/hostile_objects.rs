//! `dynamos diff` on hostile objects: the inputs under `fuzz/reproducers/`
//! once crashed the diff stage. Each is two objects (the first two bytes,
//! little-endian, give the length of the first); malformed ones must be
//! refused with one line naming the object and what is wrong (exit 1),
//! never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Split a reproducer into `orig.o` and `patched.o` in `dir`.
fn split(name: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/reproducers")
        .join(name);
    let data = std::fs::read(&file).unwrap();
    let rest = &data[2..];
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])).min(rest.len());
    let (first, second) = rest.split_at(split);
    let orig = dir.join("orig.o");
    let patched = dir.join("patched.o");
    std::fs::write(&orig, first).unwrap();
    std::fs::write(&patched, second).unwrap();
    (orig, patched)
}

fn diff(orig: &Path, patched: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamos"))
        .arg("diff")
        .arg(orig)
        .arg(patched)
        .output()
        .unwrap()
}

/// The reproducer is refused with exit 1 and one line of the form
/// `dynamos: OBJECT: ...` that names the bad object and contains `what`.
fn assert_refused(name: &str, bad_is_patched: bool, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (orig, patched) = split(name, dir.path());
    let out = diff(&orig, &patched);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(out.stdout.is_empty(), "{name}: printed a result");
    assert_eq!(stderr.lines().count(), 1, "{name}: not one line: {stderr}");
    let bad = if bad_is_patched { &patched } else { &orig };
    let prefix = format!("dynamos: {}: ", bad.display());
    assert!(stderr.starts_with(&prefix), "{name}: {stderr}");
    assert!(stderr.contains(what), "{name}: {stderr}");
}

#[test]
fn function_symbol_past_its_section() {
    assert_refused(
        "object_diff-range-start.bin",
        false,
        "symbol same (0x39010000, 0x9 bytes) lies outside section .ltxt.same (0x9 bytes)",
    );
}

#[test]
fn symbol_whose_end_wraps() {
    assert_refused(
        "object_diff-symbol-end-add-overflow.bin",
        true,
        "symbol counterd (0x0, 0x4 bytes) lies outside section",
    );
}

#[test]
fn section_symbol_larger_than_its_section() {
    assert_refused(
        "object_diff-reloc-offset-sub-overflow.bin",
        true,
        "symbol .text.added (0x0, 0xc800000000000000 bytes) lies outside section .text.added",
    );
}

#[test]
fn data_symbol_whose_end_wraps() {
    assert_refused(
        "object_diff-data-symbol-end-add-overflow.bin",
        false,
        "symbol counter (0xffffffffffffff00, 0xfff60000000010 bytes) lies outside section .bss.counter",
    );
}

/// An addend can be anything: one near i64::MAX is compared like any
/// other, the objects being otherwise well-formed.
#[test]
fn extreme_addend_is_compared() {
    let dir = tempfile::tempdir().unwrap();
    let (orig, patched) = split("object_diff-correlate-addend-add-overflow.bin", dir.path());
    let out = diff(&orig, &patched);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(stdout.lines().any(|l| l == "changed  changed"), "{stdout}");
}

/// A `loopne` with an address-size prefix leaves the function: its rel8
/// displacement is found where the decoder says, not guessed from the
/// instruction's name (that guess once took it for a rel32 and
/// underflowed).
#[test]
fn prefixed_short_branch_is_compared() {
    let dir = tempfile::tempdir().unwrap();
    let (orig, patched) = split("object_diff-prefixed-loop-branch-width.bin", dir.path());
    let out = diff(&orig, &patched);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(stdout.lines().any(|l| l == "changed  same"), "{stdout}");
}
