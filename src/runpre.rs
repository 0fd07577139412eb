//! Run-pre verification: a package only redirects functions whose running
//! code is the code it was built from.
//!
//! At build time, `expected_code` records a function's bytes from the
//! original object together with the ranges the kernel is entitled to
//! change: relocation targets (addresses differ per boot and per link),
//! and every site a boot-time or run-time patcher rewrites (ftrace call
//! sites, alternatives, paravirt sites, jump labels, static calls,
//! retpoline and return-thunk sites, lock prefixes). At apply time,
//! `compare` checks the running bytes against it; anything else that
//! differs means the kernel was built from other source (or its code was
//! modified) and the package must not land.

use crate::diff::{object::reloc_width, ObjectFile};
use crate::package::{ExpectedCode, ExpectedReloc, MaskedRange, RelocKind};
use crate::target::abi::KernelAbi;
use object::elf;
use std::fmt;

/// The first byte where running and expected code differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPreMismatch {
    pub offset: usize,
    /// Up to 8 bytes from `offset`, running and expected.
    pub running: Vec<u8>,
    pub expected: Vec<u8>,
}

impl fmt::Display for RunPreMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "running code differs from the code this package was built from at +{:#x} (running {}, expected {})",
            self.offset,
            hex_bytes(&self.running),
            hex_bytes(&self.expected)
        )
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compare `running` (read from the kernel at the function's address, as
/// many bytes as `expected` has) with what the package expects.
pub fn compare(expected: &ExpectedCode, running: &[u8]) -> Result<(), RunPreMismatch> {
    let mut masked = expected.masked.iter().peekable();
    for (offset, &want) in expected.bytes.iter().enumerate() {
        while masked
            .peek()
            .is_some_and(|m| (m.offset as usize + m.len as usize) <= offset)
        {
            masked.next();
        }
        if masked.peek().is_some_and(|m| m.offset as usize <= offset) {
            continue;
        }
        if running.get(offset) != Some(&want) {
            let end = (offset + 8).min(expected.bytes.len());
            return Err(RunPreMismatch {
                offset,
                running: running
                    .get(offset..end.min(running.len()))
                    .unwrap_or(&[])
                    .to_vec(),
                expected: expected.bytes[offset..end].to_vec(),
            });
        }
    }
    Ok(())
}

/// The expected code of the function `symbol` of `object` (an original,
/// unpatched object), or None when it is not a defined function with code.
pub fn expected_code(
    object: &ObjectFile,
    symbol: usize,
    file: &str,
    abi: &KernelAbi,
) -> Option<ExpectedCode> {
    let sym = object.symbols.get(symbol)?;
    let section = sym.section()?;
    if !sym.is_function() || sym.size == 0 {
        return None;
    }
    let start = sym.value as usize;
    let end = start.checked_add(sym.size as usize)?;
    let bytes = object.data(section).get(start..end)?.to_vec();

    let mut sites: Vec<(usize, usize)> = Vec::new();
    for (table_index, table) in object.sections.iter().enumerate() {
        let Some(kind) = abi.table(&table.name) else {
            continue;
        };
        let data = object.data(table_index);
        for r in &table.relocs {
            // An entry's first field names the code it describes.
            if r.offset % kind.entry_size != 0 {
                continue;
            }
            let Some(target) = object.symbols.get(r.symbol) else {
                continue;
            };
            if target.section() != Some(section) {
                continue;
            }
            let site = (target.value as i64).wrapping_add(r.addend) as usize;
            let entry = data
                .get(r.offset as usize..(r.offset + kind.entry_size) as usize)
                .unwrap_or(&[]);
            if let Some(len) = kind.rewritten_len(entry, object.data(section), site) {
                sites.push((site, site + len));
            }
        }
    }

    let mut ranges = sites.clone();
    let mut relocations = Vec::new();
    for r in &object.sections[section].relocs {
        let at = r.offset as usize;
        let width = reloc_width(r.r_type).unwrap_or(8);
        ranges.push((at, at + width));
        if at < start
            || at + width > end
            || sites.iter().any(|&(lo, hi)| at < hi && lo < at + width)
        {
            continue;
        }
        let Some(target) = object.symbols.get(r.symbol) else {
            continue;
        };
        let named =
            !target.is_section() && !target.name.is_empty() && !target.name.starts_with(".L");
        if let (true, Some(kind)) = (named, reloc_kind(r.r_type)) {
            relocations.push(ExpectedReloc {
                offset: (at - start) as u32,
                kind,
                symbol: target.name.clone(),
                addend: r.addend,
            });
        }
    }
    Some(ExpectedCode {
        name: sym.name.clone(),
        file: file.to_string(),
        masked: clip_and_merge(ranges, start, end),
        relocations,
        bytes,
    })
}

fn reloc_kind(r_type: u32) -> Option<RelocKind> {
    match r_type {
        elf::R_X86_64_64 => Some(RelocKind::Absolute64),
        elf::R_X86_64_32S => Some(RelocKind::Absolute32Signed),
        elf::R_X86_64_32 => Some(RelocKind::Absolute32),
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => Some(RelocKind::PcRelative32),
        _ => None,
    }
}

/// A relocated field of the running code that does not refer to the
/// symbol the package expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongReference {
    pub offset: u32,
    pub expected_symbol: String,
    /// The address the running code refers to (minus the addend).
    pub running_target: u64,
}

/// Check that every relocated field of `running` (the function's code at
/// `address`) refers to the address `lookup` gives for its symbol. Symbols
/// `lookup` cannot place unambiguously are not checked.
pub fn check_relocations(
    expected: &ExpectedCode,
    address: u64,
    running: &[u8],
    lookup: impl Fn(&str) -> Option<u64>,
) -> Result<(), WrongReference> {
    for r in &expected.relocations {
        let Some(symbol) = lookup(&r.symbol) else {
            continue;
        };
        let at = r.offset as usize;
        let place = address.wrapping_add(r.offset as u64);
        let field = |n: usize| running.get(at..at + n);
        // The value the field would hold, and the target it encodes.
        let (wanted, found) = match r.kind {
            RelocKind::Absolute64 => {
                let Some(b) = field(8) else { continue };
                let v = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                (symbol.wrapping_add_signed(r.addend), v)
            }
            RelocKind::Absolute32Signed | RelocKind::Absolute32 => {
                let Some(b) = field(4) else { continue };
                let raw = u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
                let v = if r.kind == RelocKind::Absolute32Signed {
                    raw as i32 as i64 as u64
                } else {
                    raw as u64
                };
                let want = symbol.wrapping_add_signed(r.addend);
                let want = if r.kind == RelocKind::Absolute32Signed {
                    want as u32 as i32 as i64 as u64
                } else {
                    want as u32 as u64
                };
                (want, v)
            }
            RelocKind::PcRelative32 => {
                let Some(b) = field(4) else { continue };
                let rel = i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as i64;
                let v = place.wrapping_add_signed(rel);
                let want = place.wrapping_add_signed(
                    (symbol.wrapping_add_signed(r.addend).wrapping_sub(place)) as i32 as i64,
                );
                (want, v)
            }
        };
        if wanted != found {
            return Err(WrongReference {
                offset: r.offset,
                expected_symbol: r.symbol.clone(),
                running_target: found.wrapping_add_signed(r.addend.wrapping_neg()),
            });
        }
    }
    Ok(())
}

/// Keep the parts of section-relative `ranges` inside `[start, end)`, make
/// them function-relative, sorted and non-overlapping.
fn clip_and_merge(mut ranges: Vec<(usize, usize)>, start: usize, end: usize) -> Vec<MaskedRange> {
    ranges.sort_unstable();
    let mut out: Vec<MaskedRange> = Vec::new();
    for (lo, hi) in ranges {
        let (lo, hi) = (lo.max(start), hi.min(end));
        if lo >= hi {
            continue;
        }
        let (lo, hi) = ((lo - start) as u32, (hi - start) as u32);
        match out.last_mut() {
            Some(last) if lo <= last.offset + last.len => {
                last.len = last.len.max(hi - last.offset);
            }
            _ => out.push(MaskedRange {
                offset: lo,
                len: hi - lo,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(bytes: &[u8], masked: &[(u32, u32)]) -> ExpectedCode {
        ExpectedCode {
            name: "f".into(),
            file: "f.c".into(),
            bytes: bytes.to_vec(),
            masked: masked
                .iter()
                .map(|&(offset, len)| MaskedRange { offset, len })
                .collect(),
            relocations: vec![],
        }
    }

    #[test]
    fn relocated_fields_must_refer_to_the_expected_symbols() {
        // call rel32 at 0 (PLT32 to `callee`, addend -4); mov $sym, %rsi at
        // 5 (32S to `banner`, addend 0).
        let mut e = expected(
            &[0xe8, 0, 0, 0, 0, 0x48, 0xc7, 0xc6, 0, 0, 0, 0],
            &[(1, 4), (8, 4)],
        );
        e.relocations = vec![
            ExpectedReloc {
                offset: 1,
                kind: RelocKind::PcRelative32,
                symbol: "callee".into(),
                addend: -4,
            },
            ExpectedReloc {
                offset: 8,
                kind: RelocKind::Absolute32Signed,
                symbol: "banner".into(),
                addend: 0,
            },
        ];
        let base: u64 = 0xffff_ffff_8100_0000;
        let callee: u64 = 0xffff_ffff_8100_1000;
        let banner: u64 = 0xffff_ffff_8200_0040;
        let mut running = e.bytes.clone();
        let rel = (callee as i64 - (base as i64 + 5)) as i32;
        running[1..5].copy_from_slice(&rel.to_le_bytes());
        running[8..12].copy_from_slice(&(banner as u32).to_le_bytes());
        let lookup = |name: &str| match name {
            "callee" => Some(callee),
            "banner" => Some(banner),
            _ => None,
        };
        assert_eq!(compare(&e, &running), Ok(()));
        assert_eq!(check_relocations(&e, base, &running, lookup), Ok(()));

        // The running code refers to another string.
        let mut other = running.clone();
        other[8..12].copy_from_slice(&((banner + 0x100) as u32).to_le_bytes());
        assert_eq!(compare(&e, &other), Ok(()));
        let wrong = check_relocations(&e, base, &other, lookup).unwrap_err();
        assert_eq!(wrong.offset, 8);
        assert_eq!(wrong.expected_symbol, "banner");
        assert_eq!(wrong.running_target, banner + 0x100);

        // Symbols the kernel cannot place are not checked.
        assert_eq!(check_relocations(&e, base, &other, |_| None), Ok(()));
    }

    #[test]
    fn masked_bytes_may_differ_and_others_may_not() {
        let e = expected(&[1, 2, 3, 4, 5, 6], &[(1, 2), (4, 1)]);
        assert_eq!(compare(&e, &[1, 9, 9, 4, 9, 6]), Ok(()));
        let err = compare(&e, &[1, 9, 9, 7, 9, 6]).unwrap_err();
        assert_eq!(err.offset, 3);
        assert_eq!(err.running, vec![7, 9, 6]);
        assert_eq!(err.expected, vec![4, 5, 6]);
        assert!(err.to_string().contains("+0x3"), "{err}");
    }

    #[test]
    fn short_running_code_is_a_mismatch() {
        let e = expected(&[1, 2, 3], &[]);
        assert_eq!(compare(&e, &[1, 2]).unwrap_err().offset, 2);
    }

    #[test]
    fn ranges_are_clipped_to_the_function_and_merged() {
        let got = clip_and_merge(vec![(8, 12), (0, 4), (10, 15), (30, 40), (18, 25)], 2, 20);
        let got: Vec<(u32, u32)> = got.iter().map(|m| (m.offset, m.len)).collect();
        assert_eq!(got, vec![(0, 2), (6, 7), (16, 2)]);
    }
}
