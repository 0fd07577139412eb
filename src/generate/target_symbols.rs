//! The target vmlinux's own symbol table, read at build time from the
//! kallsyms tables compiled into its image: Debian ships a stub System.map
//! and no symbols, but `/proc/kallsyms` on the target is made from these
//! tables, in this order. The build decides with it what apply would
//! otherwise find out on the production machine: which definition of a
//! weak function won at link time, and whether a static the new code uses
//! is one kernel symbol or several indistinguishable ones.

use crate::apply::{Ksym, ObjectSymbols};
use crate::diff::{ChangeKind, ObjectDiff, ObjectFile};
use crate::error::Refusal;
use crate::package::{ExternalSymbol, SymbolKind};
use anyhow::{bail, Context, Result};
use object::elf;
use std::path::Path;

/// What the target's image says about its running code.
pub struct VmlinuxTable {
    /// The kallsyms entries, in order.
    pub symbols: Vec<Ksym>,
    /// Addresses of the ENDBR instructions the kernel seals at boot
    /// (`.ibt_endbr_seal`, IBT kernels): functions whose address vmlinux
    /// never takes, which an indirect call would fault on.
    pub sealed: std::collections::HashSet<u64>,
}

/// The kallsyms entries and sealed ENDBRs of the vmlinux in the bzImage
/// `vmlinuz`.
pub fn read_vmlinuz(vmlinuz: &Path) -> Result<VmlinuxTable> {
    let vmlinux = crate::identity::vmlinuz_payload(vmlinuz)?;
    let elf = object::File::parse(&*vmlinux)
        .with_context(|| format!("{}: the decompressed kernel is not ELF", vmlinuz.display()))?;
    use object::{Object, ObjectSection};
    let rodata = elf
        .section_by_name(".rodata")
        .with_context(|| format!("{}: the kernel has no .rodata", vmlinuz.display()))?;
    let data = rodata.data().context("cannot read the kernel's .rodata")?;
    let symbols = kallsyms_tables(data)
        .with_context(|| format!("{}: no kallsyms tables found", vmlinuz.display()))?;
    let mut sealed = std::collections::HashSet::new();
    if let Some(seals) = elf.section_by_name(".ibt_endbr_seal") {
        let data = seals
            .data()
            .context("cannot read the kernel's .ibt_endbr_seal")?;
        // Each entry is `.long endbr - .`.
        for (i, entry) in data.chunks_exact(4).enumerate() {
            let offset = i32::from_le_bytes(entry.try_into().unwrap_or([0; 4]));
            let place = seals.address().wrapping_add(4 * i as u64);
            sealed.insert(place.wrapping_add_signed(i64::from(offset)));
        }
    }
    Ok(VmlinuxTable { symbols, sealed })
}

/// Refusals for kernel functions whose address the new code takes
/// (`address_taken`) although the target seals their ENDBR: the kernel
/// never took their address, so at boot it turned the instruction an
/// indirect call must land on into a NOP, and a call through the new
/// pointer would fault.
pub fn refuse_sealed_address_taken(
    address_taken: &[String],
    table: &VmlinuxTable,
    vmlinux: &ObjectSymbols,
) -> Vec<Refusal> {
    address_taken
        .iter()
        .filter(|name| {
            vmlinux.positions(name).iter().any(|&i| {
                let sym = &table.symbols[i];
                matches!(sym.kind, 't' | 'T') && table.sealed.contains(&sym.address)
            })
        })
        .map(|name| Refusal {
            symbol: name.clone(),
            reason: "the new code takes its address, but the target kernel seals its ENDBR at boot (IBT: vmlinux never takes its address), so an indirect call through that pointer would fault".into(),
        })
        .collect()
}

/// Decode the tables `scripts/kallsyms` writes (base-relative offsets with
/// absolute per-cpu symbols, 8-byte aligned labels). Linux 6.1 lays them
/// out as offsets, relative_base, num_syms, names, markers, seqs_of_names,
/// token_table, token_index; since 6.10 the offsets, the base and
/// seqs_of_names follow the token index instead.
fn kallsyms_tables(data: &[u8]) -> Result<Vec<Ksym>> {
    for index_at in (0..data.len().saturating_sub(512)).step_by(8) {
        let Some(tokens) = token_table_before(data, index_at) else {
            continue;
        };
        // The newer layout is ruled out quickly; the older one is searched.
        if let Some(symbols) = symbols_around(data, &tokens, index_at + 512) {
            return Ok(symbols);
        }
        if let Some(symbols) = symbols_before(data, &tokens) {
            return Ok(symbols);
        }
    }
    bail!("kallsyms token index not recognised")
}

struct Tokens {
    table_start: usize,
    tokens: Vec<Vec<u8>>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

/// The 256 tokens, when `index_at` holds kallsyms_token_index and the
/// token table ends just before it.
fn token_table_before(data: &[u8], index_at: usize) -> Option<Tokens> {
    if u16_at(data, index_at)? != 0 {
        return None;
    }
    let mut index = Vec::with_capacity(256);
    for i in 0..256 {
        let v = u16_at(data, index_at + 2 * i)? as usize;
        if i > 0 && v <= index[i - 1] {
            return None;
        }
        index.push(v);
    }
    let last = index[255];
    // The table ends with the last token and its NUL, padded to 8 bytes;
    // tokens are short.
    for extra in 0..80 {
        let Some(table_start) = index_at.checked_sub(last + 2 + extra) else {
            break;
        };
        let mut end = table_start + last;
        while data.get(end).is_some_and(|&b| b != 0) {
            end += 1;
        }
        if (end + 1).next_multiple_of(8) != index_at || !table_start.is_multiple_of(8) {
            continue;
        }
        let table = &data[table_start..=end];
        let tokens: Option<Vec<Vec<u8>>> = (0..256)
            .map(|i| {
                let from = index[i];
                let to = if i == 255 { table.len() } else { index[i + 1] };
                let token = &table[from..to];
                match token.split_last() {
                    Some((0, text)) if !text.is_empty() && !text.contains(&0) => {
                        Some(text.to_vec())
                    }
                    _ => None,
                }
            })
            .collect();
        if let Some(tokens) = tokens {
            return Some(Tokens {
                table_start,
                tokens,
            });
        }
    }
    None
}

/// Walk back from the token table over seqs_of_names (3 bytes a symbol),
/// markers, names and num_syms, and decode the symbols when every table
/// agrees with the others.
fn symbols_before(data: &[u8], tokens: &Tokens) -> Option<Vec<Ksym>> {
    let table_start = tokens.table_start;
    const MOST_SYMBOLS: usize = 4 << 20;
    let mut seqs_start = table_start;
    while seqs_start >= 8 && table_start - seqs_start <= 3 * MOST_SYMBOLS {
        seqs_start -= 8;
        let room = table_start - seqs_start;
        for count in (room.saturating_sub(7)).div_ceil(3)..=room / 3 {
            if count == 0 || (seqs_start + 3 * count).next_multiple_of(8) != table_start {
                continue;
            }
            if let Some(symbols) = symbols_with_count(data, tokens, seqs_start, count) {
                return Some(symbols);
            }
        }
    }
    None
}

/// The symbols, if `count` of them end at `seqs_start` as kallsyms lays
/// them out.
fn symbols_with_count(
    data: &[u8],
    tokens: &Tokens,
    seqs_start: usize,
    count: usize,
) -> Option<Vec<Ksym>> {
    let groups = count.div_ceil(256);
    for pad in [0usize, 4] {
        let markers_start = seqs_start.checked_sub(pad + 4 * groups)?;
        if (markers_start + 4 * groups).next_multiple_of(8) != seqs_start {
            continue;
        }
        let markers: Vec<u32> = (0..groups)
            .map(|i| u32_at(data, markers_start + 4 * i))
            .collect::<Option<_>>()?;
        if !plausible_markers(&markers) {
            continue;
        }
        let Some((names_start, names)) =
            names_before(data, tokens, &markers, markers_start, |n| n == count)
        else {
            continue;
        };
        // The relative base and the offsets come before num_syms.
        let base_at = names_start - 16;
        let Some(offsets_start) = base_at.checked_sub((4 * count).next_multiple_of(8)) else {
            continue;
        };
        return addresses(data, names, offsets_start, base_at);
    }
    None
}

/// The 6.10+ layout: markers end where the token table starts, and the
/// offsets start at `offsets_start`, right after the token index.
fn symbols_around(data: &[u8], tokens: &Tokens, offsets_start: usize) -> Option<Vec<Ksym>> {
    const MOST_GROUPS: usize = (4 << 20) / 256;
    for pad in [0usize, 4] {
        let Some(end) = tokens.table_start.checked_sub(pad) else {
            continue;
        };
        // Walk the markers back from their end: each group's starts at
        // least 512 bytes (two a name) before the next one's, down to the
        // first group's 0.
        let mut markers: Vec<u32> = Vec::new();
        let mut markers_start = end;
        while markers.len() < MOST_GROUPS && markers.last() != Some(&0) {
            let Some(at) = markers_start.checked_sub(4) else {
                break;
            };
            let Some(value) = u32_at(data, at) else {
                break;
            };
            if markers.last().is_some_and(|&next| !group_step(value, next)) {
                break;
            }
            markers.push(value);
            markers_start = at;
        }
        if markers.last() != Some(&0) {
            continue;
        }
        markers.reverse();
        let groups = markers.len();
        if (markers_start + 4 * groups).next_multiple_of(8) != tokens.table_start
            || !markers_start.is_multiple_of(8)
        {
            continue;
        }
        let Some((_, names)) = names_before(data, tokens, &markers, markers_start, |n| {
            n.div_ceil(256) == groups
        }) else {
            continue;
        };
        let base_at = offsets_start + (4 * names.len()).next_multiple_of(8);
        return addresses(data, names, offsets_start, base_at);
    }
    None
}

/// The names that end where the markers start, preceded by num_syms (a
/// count `fits` accepts): where they start, and the names.
fn names_before(
    data: &[u8],
    tokens: &Tokens,
    markers: &[u32],
    markers_start: usize,
    fits: impl Fn(usize) -> bool,
) -> Option<(usize, Vec<Vec<u8>>)> {
    let last_marker = *markers.last()? as usize;
    let lowest = markers_start.saturating_sub(last_marker + 256 * 600);
    let mut names_start = markers_start.checked_sub(last_marker)? / 8 * 8;
    while names_start >= lowest.max(16) {
        let count = u32_at(data, names_start - 8)? as usize;
        if fits(count) {
            if let Some(names) =
                decode_names(data, tokens, names_start, count, markers, markers_start)
            {
                return Some((names_start, names));
            }
        }
        names_start -= 8;
    }
    None
}

/// Consecutive markers: each group of 256 names takes at least two bytes
/// a name and at most 600.
fn group_step(marker: u32, next: u32) -> bool {
    next > marker && (512..=256 * 600).contains(&(next - marker))
}

fn plausible_markers(markers: &[u32]) -> bool {
    markers.first() == Some(&0) && markers.windows(2).all(|w| group_step(w[0], w[1]))
}

/// The `count` names from `names_start`, when they end where the markers
/// start and every marker points at its group's first name.
fn decode_names(
    data: &[u8],
    tokens: &Tokens,
    names_start: usize,
    count: usize,
    markers: &[u32],
    markers_start: usize,
) -> Option<Vec<Vec<u8>>> {
    let mut names = Vec::with_capacity(count);
    let mut at = names_start;
    for i in 0..count {
        if i % 256 == 0 && markers[i / 256] as usize != at - names_start {
            return None;
        }
        let mut len = *data.get(at)? as usize;
        at += 1;
        if len & 0x80 != 0 {
            len = (len & 0x7f) | ((*data.get(at)? as usize) << 7);
            at += 1;
        }
        if len == 0 || at + len > markers_start {
            return None;
        }
        let mut name = Vec::new();
        for &t in &data[at..at + len] {
            name.extend_from_slice(&tokens.tokens[t as usize]);
        }
        at += len;
        names.push(name);
    }
    if at.next_multiple_of(8) != markers_start {
        return None;
    }
    Some(names)
}

/// Symbols of `names` with their addresses from the offsets at
/// `offsets_start` and the relative base at `base_at`.
fn addresses(
    data: &[u8],
    names: Vec<Vec<u8>>,
    offsets_start: usize,
    base_at: usize,
) -> Option<Vec<Ksym>> {
    let relative_base = u64_at(data, base_at)?;
    let mut symbols = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let offset = u32_at(data, offsets_start + 4 * i)? as i32;
        // Per-cpu symbols are absolute; the rest count back from the base.
        let address = if offset >= 0 {
            offset as u64
        } else {
            relative_base
                .wrapping_sub(1)
                .wrapping_sub(offset as i64 as u64)
        };
        let (&kind, rest) = name.split_first()?;
        symbols.push(Ksym {
            address,
            kind: kind as char,
            name: String::from_utf8(rest.to_vec()).ok()?,
            module: None,
        });
    }
    Some(symbols)
}

/// Whether the kallsyms letter is that of a weak symbol.
pub fn is_weak_letter(letter: char) -> bool {
    matches!(letter, 'w' | 'W' | 'v' | 'V')
}

/// Whether `original` defines `name` as a weak function that lost at link
/// time: the target's kallsyms lists the name, never as weak.
pub fn overridden_weak(original: &ObjectFile, name: &str, vmlinux: &ObjectSymbols) -> bool {
    let weak_here = original.symbols.iter().any(|s| {
        s.name == name && s.is_function() && s.section().is_some() && s.bind == elf::STB_WEAK
    });
    let listed = vmlinux.positions(name);
    weak_here && !listed.is_empty() && listed.iter().all(|&i| !is_weak_letter(vmlinux[i].kind))
}

/// Refusals for changed functions whose definition here is a weak one the
/// running kernel does not use: the change would never run, and
/// redirecting the name would replace the definition that does.
pub fn refuse_overridden_weak_changes(
    original: &ObjectFile,
    diff: &ObjectDiff,
    vmlinux: &ObjectSymbols,
) -> Vec<Refusal> {
    diff.functions
        .iter()
        .filter(|f| f.kind == ChangeKind::Changed)
        .map(|f| diff.correlation.orig_name(&f.name).unwrap_or(&f.name))
        .filter(|name| overridden_weak(original, name, vmlinux))
        .map(|name| Refusal {
            symbol: name.to_string(),
            reason: "a weak definition overridden at link time: the running kernel runs another file's definition, which this change does not touch".into(),
        })
        .collect()
}

/// Refusals for the references of vmlinux new code that the target's
/// symbol table does not tie to one kernel symbol. Same-named static
/// functions are left to apply, where their running code tells them apart.
pub fn unbound_references(
    externals: &[ExternalSymbol],
    vmlinux: &ObjectSymbols,
    file_symbols: &[String],
) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    for e in externals {
        let file = e.file.is_some().then_some(file_symbols);
        match crate::apply::choose(vmlinux, &e.name, e.kind, file, None) {
            Ok(_) => {}
            Err(reason) if e.kind == SymbolKind::Function && reason.starts_with("ambiguous") => {}
            Err(reason) => refusals.push(Refusal {
                symbol: e.name.clone(),
                reason: format!("{reason} (the target's symbol table, read at build time)"),
            }),
        }
    }
    refusals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn align(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }

    /// The tables as `scripts/kallsyms` lays them out, after some data.
    fn tables(symbols: &[(u64, char, String)], relative_base: u64) -> Vec<u8> {
        // Token i stands for byte i where that is a name character.
        let token = |i: u8| -> Vec<u8> {
            if i.is_ascii_alphanumeric() || i == b'_' || i == b'.' {
                vec![i]
            } else {
                format!("<{i}>").into_bytes()
            }
        };
        let mut out = b"unrelated data before the tables".to_vec();
        align(&mut out);
        for (address, _, _) in symbols {
            let offset = if *address < relative_base {
                *address as i32
            } else {
                -((address - relative_base) as i64) as i32 - 1
            };
            out.extend_from_slice(&offset.to_le_bytes());
        }
        align(&mut out);
        out.extend_from_slice(&relative_base.to_le_bytes());
        out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        align(&mut out);
        let names_start = out.len();
        let mut markers = Vec::new();
        for (i, (_, kind, name)) in symbols.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((out.len() - names_start) as u32);
            }
            let encoded: Vec<u8> = std::iter::once(*kind as u8).chain(name.bytes()).collect();
            out.push(encoded.len() as u8);
            out.extend_from_slice(&encoded);
        }
        align(&mut out);
        for m in markers {
            out.extend_from_slice(&m.to_le_bytes());
        }
        align(&mut out);
        for i in 0..symbols.len() as u32 {
            out.extend_from_slice(&i.to_be_bytes()[1..]);
        }
        align(&mut out);
        let mut index = Vec::new();
        let table_start = out.len();
        for i in 0..=255u8 {
            index.push((out.len() - table_start) as u16);
            out.extend_from_slice(&token(i));
            out.push(0);
        }
        align(&mut out);
        for i in index {
            out.extend_from_slice(&i.to_le_bytes());
        }
        out.extend_from_slice(&[0xff; 600]);
        out
    }

    #[test]
    fn decodes_the_tables_scripts_kallsyms_writes() {
        let base = 0xffffffff81000000u64;
        let mut symbols = vec![(0x1234u64, 'A', "per_cpu_thing".to_string())];
        for i in 0..700u64 {
            let kind = if i % 3 == 0 { 'T' } else { 't' };
            symbols.push((base + 16 * i, kind, format!("fn_{i}")));
        }
        symbols.push((base + 0x100000, 'W', "weak_one".to_string()));
        let decoded = kallsyms_tables(&tables(&symbols, base)).unwrap();
        let got: Vec<(u64, char, String)> = decoded
            .into_iter()
            .map(|s| (s.address, s.kind, s.name))
            .collect();
        assert_eq!(got, symbols);
        assert!(kallsyms_tables(&[0u8; 4096]).is_err());
    }
}
