//! Hostile patch text into the patch parser, and what parses applied to a
//! small file: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// The pristine content every file the patch names is given.
fn pristine() -> Vec<u8> {
    (1..=40).map(|n| format!("line {n}\n")).collect::<String>().into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Ok(patch) = dynamos::patch::parse_bytes(data, Path::new("fuzz.diff")) else {
        return;
    };
    let _ = dynamos::patch::apply_all(&[patch], |_| Ok(Some(pristine())));
});
