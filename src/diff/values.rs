//! Changed initial values of writable variables.
//!
//! A variable already in the kernel keeps the value it was given at boot,
//! so a patch that changes its initializer changes nothing by itself. When
//! the variable is plain data (no pointers, same size, an ordinary writable
//! section of vmlinux), the package instead writes the new initial value
//! into the running variable as it is applied, provided the running value
//! is still the old initial value, and writes the old one back on revert.
//! Everything else stays refused, with the reason.

use super::object::ObjectFile;
use super::Correlation;
use crate::error::Refusal;
use crate::target::abi;

/// A writable variable whose initial contents the patch changes: what the
/// running value must be (`old`) and what the update makes it (`new`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ValueUpdate {
    /// The variable's name in the original object (and in kallsyms).
    pub name: String,
    /// The original object file defining it.
    pub object: String,
    /// The section holding it in the original object.
    pub section: String,
    /// Size in bytes, the same in both builds.
    pub size: u64,
    /// Initial contents in the original build (zeros for `.bss`).
    pub old: Vec<u8>,
    /// Initial contents in the patched build.
    pub new: Vec<u8>,
}

/// The largest variable a value update writes: the module carries both
/// values, and a table that size is no sysctl.
const MAX_VALUE_SIZE: u64 = 64 << 10;

/// Sections whose variables are no plain kernel data once the kernel runs,
/// by prefix (`.data..percpu..read_mostly` and the other per-CPU ones too).
/// Checked on both builds' section names.
const UNWRITABLE_SECTIONS: &[(&str, &str)] = &[
    (
        ".data..percpu",
        "a per-CPU variable: every CPU has its own copy, set up at boot",
    ),
    (
        ".data..ro_after_init",
        "__ro_after_init: the kernel makes it read-only after boot",
    ),
];

/// For each changed writable variable (`changed`: patched symbol indices),
/// a value update or a refusal naming why the change cannot be made live.
pub fn value_updates(
    orig: &ObjectFile,
    patched: &ObjectFile,
    correlation: &Correlation,
    changed: &[usize],
    refused: &mut Vec<Refusal>,
) -> Vec<ValueUpdate> {
    let mut updates = Vec::new();
    for &index in changed {
        let name = &patched.symbols[index].name;
        match value_update(orig, patched, correlation, index) {
            Ok(update) => updates.push(update),
            Err(reason) => refused.push(Refusal {
                symbol: name.clone(),
                reason,
            }),
        }
    }
    updates.sort_by(|a, b| a.name.cmp(&b.name));
    updates
}

fn value_update(
    orig: &ObjectFile,
    patched: &ObjectFile,
    correlation: &Correlation,
    index: usize,
) -> Result<ValueUpdate, String> {
    let new_sym = &patched.symbols[index];
    let orig_name = correlation
        .orig_name(&new_sym.name)
        .ok_or("changed initialised data without a counterpart in the original build")?;
    if correlation.ambiguous().iter().any(|a| a == orig_name) {
        return Err("changed initial value of a static that cannot be matched to one variable of the running kernel".into());
    }
    let orig_index = orig
        .symbols
        .iter()
        .position(|s| s.name == orig_name && s.is_object() && s.section().is_some())
        .ok_or("changed initialised data without a counterpart in the original build")?;
    let old_sym = &orig.symbols[orig_index];
    let old_section = old_sym.section().expect("found among defined symbols");
    let new_section = new_sym.section().expect("changed data symbols are defined");
    for section in [
        &orig.sections[old_section].name,
        &patched.sections[new_section].name,
    ] {
        if let Some((_, why)) = UNWRITABLE_SECTIONS
            .iter()
            .find(|(prefix, _)| section.starts_with(prefix))
        {
            return Err(format!("changed initial value of {why}"));
        }
    }
    if !orig.sections[old_section].is_write() {
        return Err(format!(
            "changed initialised data in {}: was read-only in the original build",
            orig.sections[old_section].name
        ));
    }
    if old_sym.size != new_sym.size {
        return Err(format!(
            "changed size of initialised data ({} to {} bytes): the running variable keeps its old size",
            old_sym.size, new_sym.size
        ));
    }
    if old_sym.size == 0 {
        return Err("changed initialised data of unknown size".into());
    }
    if old_sym.size > MAX_VALUE_SIZE {
        return Err(format!(
            "changed initialised data of {} bytes: value updates cover variables of up to {MAX_VALUE_SIZE} bytes",
            old_sym.size
        ));
    }
    for (obj, section, sym) in [
        (orig, old_section, old_sym),
        (patched, new_section, new_sym),
    ] {
        if let Some(r) = obj.sections[section]
            .relocs
            .iter()
            .find(|r| r.offset >= sym.value && r.offset < sym.value + sym.size)
        {
            return Err(format!(
                "changed initialised data holding addresses (a relocation at +{:#x}): pointers into the patched build mean nothing in the running kernel",
                r.offset - sym.value
            ));
        }
    }
    Ok(ValueUpdate {
        name: orig_name.to_string(),
        object: orig.path.display().to_string(),
        section: orig.sections[old_section].name.clone(),
        size: old_sym.size,
        old: initial_contents(orig, old_section, old_sym.value, old_sym.size)?,
        new: initial_contents(patched, new_section, new_sym.value, new_sym.size)?,
    })
}

/// Refuse changed variables of init sections (`__initdata`,
/// `__initconst`): the kernel used them at boot and freed them, so nothing
/// the update writes would reach what they set up.
pub fn refuse_changed_init_data(
    orig: &ObjectFile,
    patched: &ObjectFile,
    correlation: &Correlation,
    refused: &mut Vec<Refusal>,
) {
    for (index, sym) in patched.symbols.iter().enumerate() {
        let Some(section) = sym.section().filter(|_| sym.is_object()) else {
            continue;
        };
        let s = &patched.sections[section];
        if s.is_exec() || !abi::is_init(&s.name) {
            continue;
        }
        let Some(orig_index) = correlation.orig_name(&sym.name).and_then(|name| {
            orig.symbols
                .iter()
                .position(|o| o.name == name && o.is_object() && o.section().is_some())
        }) else {
            continue;
        };
        let before = init_contents(orig, orig_index, None);
        let after = init_contents(patched, index, Some(correlation));
        if before != after {
            refused.push(Refusal {
                symbol: orig.symbols[orig_index].name.clone(),
                reason: format!(
                    "changed init data in {}: the kernel used it at boot and freed it",
                    s.name
                ),
            });
        }
    }
}

/// A variable's size, bytes (relocated fields zeroed) and relocations by
/// target name, in the original object's names.
type Contents = (u64, Vec<u8>, Vec<(u64, u32, String, i64)>);

fn init_contents(obj: &ObjectFile, symbol: usize, correlation: Option<&Correlation>) -> Contents {
    let sym = &obj.symbols[symbol];
    let section = sym.section().expect("defined symbols have a section");
    let mut bytes = initial_contents(obj, section, sym.value, sym.size).unwrap_or_default();
    let mut relocs = Vec::new();
    for r in obj.sections[section]
        .relocs
        .iter()
        .filter(|r| r.offset >= sym.value && r.offset < sym.value + sym.size)
    {
        let at = (r.offset - sym.value) as usize;
        let width = super::object::reloc_width(r.r_type).unwrap_or(4);
        if let Some(field) = bytes.get_mut(at..at + width) {
            field.fill(0);
        }
        let target = &obj.symbols[r.symbol];
        let (name, addend) = match target.section() {
            // A string literal by its text: where it lands in a merged
            // section is no change.
            Some(t) if obj.sections[t].is_strings() => {
                let text = super::c_string_at(obj.data(t), target.value as i64 + r.addend);
                (format!("str:{}", String::from_utf8_lossy(&text)), 0)
            }
            Some(t) if target.is_section() => {
                match super::covering_symbol(obj, t, r.addend.max(0)) {
                    Some(i) => (
                        obj.symbols[i].name.clone(),
                        r.addend - obj.symbols[i].value as i64,
                    ),
                    None => (obj.sections[t].name.clone(), r.addend),
                }
            }
            _ => (target.name.clone(), r.addend),
        };
        let name = correlation
            .and_then(|c| c.orig_name(&name))
            .map_or(name.clone(), str::to_string);
        relocs.push((r.offset - sym.value, r.r_type, name, addend));
    }
    (sym.size, bytes, relocs)
}

/// A variable's initial bytes: its section's contents, or zeros in `.bss`.
fn initial_contents(
    obj: &ObjectFile,
    section: usize,
    start: u64,
    size: u64,
) -> Result<Vec<u8>, String> {
    if obj.sections[section].is_nobits() {
        return Ok(vec![0; size as usize]);
    }
    usize::try_from(start)
        .ok()
        .zip(usize::try_from(start + size).ok())
        .and_then(|(s, e)| obj.data(section).get(s..e))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "initialised data lies outside its section".to_string())
}

/// How a value shows in messages: a signed integer when it has the size of
/// one (x86 is little-endian), else its bytes in hex.
pub fn describe_value(bytes: &[u8]) -> String {
    let value = match bytes.len() {
        1 => i64::from(bytes[0] as i8),
        2 => i64::from(i16::from_le_bytes([bytes[0], bytes[1]])),
        4 => i64::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        8 => i64::from_le_bytes(std::array::from_fn(|i| bytes[i])),
        _ => return format!("bytes 0x{}", hex::encode(bytes)),
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_as_integers_when_they_can() {
        assert_eq!(describe_value(&45i32.to_le_bytes()), "45");
        assert_eq!(describe_value(&(-1i64).to_le_bytes()), "-1");
        assert_eq!(describe_value(&[7]), "7");
        assert_eq!(describe_value(&[1, 2, 3]), "bytes 0x010203");
    }
}
