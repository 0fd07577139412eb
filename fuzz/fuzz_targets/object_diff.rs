//! Hostile ELF objects into the diff stage as `dynamos diff` runs it. The
//! input is two objects: its first two bytes (little-endian) say where the
//! first ends within the rest.
#![no_main]

use dynamos::diff::{diff_objects, ObjectFile};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let rest = &data[2..];
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(rest.len());
    let (first, second) = rest.split_at(split);
    let Ok(orig) = ObjectFile::parse(Path::new("orig.o"), first.to_vec()) else {
        return;
    };
    let Ok(patched) = ObjectFile::parse(Path::new("patched.o"), second.to_vec()) else {
        return;
    };
    let _ = diff_objects(&orig, &patched);
});
