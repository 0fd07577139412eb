//! Symbol correlation: which symbol of the patched build is which symbol
//! of the original. Names match exactly, except the numbers GCC appends to
//! static locals and unique IDs (`count.12`, `__UNIQUE_ID_ddebug345`),
//! which shift when the source changes; those match by their base name
//! when exactly one candidate is left on each side.

use super::object::ObjectFile;
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone, Default)]
pub struct Correlation {
    patched_to_orig: HashMap<String, String>,
    ambiguous: Vec<String>,
}

impl Correlation {
    pub fn new(orig: &ObjectFile, patched: &ObjectFile) -> Correlation {
        let orig_names = defined_names(orig);
        let patched_names = defined_names(patched);
        let mut patched_to_orig = HashMap::new();
        // Numbered names match by base name and by the functions that use
        // them, never by their number: GCC numbers static locals in reverse
        // order of appearance, so one added above shifts every other.
        let orig_numbered = numbered_by_key(orig, &orig_names);
        let patched_numbered = numbered_by_key(patched, &patched_names);
        let mut ambiguous = Vec::new();
        for name in &patched_names {
            if numbering_key(name).is_none() && orig_names.contains(name) {
                patched_to_orig.insert(name.clone(), name.clone());
            }
        }
        for (key, patched_side) in &patched_numbered {
            // Several statics with one name in one function (WARN_ONCE's
            // flags, say) pair up in the order the code first uses them.
            match orig_numbered.get(key) {
                Some(orig_side) if orig_side.len() == patched_side.len() => {
                    for (p, o) in patched_side.iter().zip(orig_side) {
                        patched_to_orig.insert(p.1.clone(), o.1.clone());
                    }
                }
                // Ratelimit states and once-flags may start afresh: the
                // worst outcome is a message printed once more.
                Some(_) if is_bookkeeping(key) => {}
                Some(_) => ambiguous.extend(patched_side.iter().map(|p| p.1.clone())),
                None => {}
            }
        }
        Correlation {
            patched_to_orig,
            ambiguous,
        }
    }

    /// The original name of a symbol the patched object defines, if it
    /// existed before the patch.
    pub fn orig_name(&self, patched_name: &str) -> Option<&str> {
        self.patched_to_orig.get(patched_name).map(String::as_str)
    }

    /// Numbered symbols of the patched object that have several possible
    /// originals: treating them as new could silently reset kernel state.
    pub fn ambiguous(&self) -> &[String] {
        &self.ambiguous
    }
}

/// A numbered name's place in its group: first user, and where in that
/// user's code the first reference is.
type FirstUse = (String, u64);

/// Message limiters (`printk_ratelimited`'s `_rs.N`, the once-flags of
/// `WARN_ONCE` and `pr_*_once`): new code may keep its own copy, at worst
/// printing a message once more. Many files have one of the same name, so
/// referring to the kernel's copy can be impossible to resolve.
pub fn is_message_limiter(name: &str) -> bool {
    const NAMES: &[&str] = &["_rs.", "__already_done.", "__warned.", "__print_once."];
    NAMES.iter().any(|n| name.starts_with(n))
}

/// Statics the kernel's macros create only to limit messages
/// (`printk_ratelimited`, `WARN_ONCE`, `pr_*_once`) or to name lock
/// classes (lockdep's `__key`): a new copy changes how often something is
/// printed or which class lockdep files a lock under, nothing else.
/// `name` is a symbol name or a grouping key from `numbered_by_key`.
pub fn is_bookkeeping(name: &str) -> bool {
    // A grouping key reads `base. used by f`; clang names a static local
    // after its function (`setup.__key.1`), gcc numbers it (`__key.1`).
    let name = name.split(" used by ").next().unwrap_or(name);
    let unnumbered = name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('.');
    let local = unnumbered.rsplit('.').next().unwrap_or(unnumbered);
    local == "__key" || is_message_limiter(&format!("{local}."))
}

/// Numbered names grouped by (base name, functions referring to them),
/// each group in order of first use.
fn numbered_by_key(
    obj: &ObjectFile,
    names: &BTreeSet<String>,
) -> BTreeMap<String, Vec<(FirstUse, String)>> {
    let users = referencing_functions(obj);
    let mut groups: BTreeMap<String, Vec<(FirstUse, String)>> = BTreeMap::new();
    for name in names {
        if let Some(base) = numbering_key(name) {
            let uses = users.get(name.as_str());
            let mut by: Vec<&str> = uses
                .map(|s| s.keys().map(|n| strip_number(n)).collect())
                .unwrap_or_default();
            by.sort_unstable();
            by.dedup();
            let first = uses
                .and_then(|s| s.iter().next())
                .map(|(f, off)| (strip_number(f).to_string(), *off))
                .unwrap_or_default();
            groups
                .entry(format!("{base} used by {}", by.join(",")))
                .or_default()
                .push((first, name.clone()));
        }
    }
    for group in groups.values_mut() {
        group.sort();
    }
    groups
}

fn strip_number(name: &str) -> &str {
    match numbering_key(name) {
        Some(_) => name.rsplit_once('.').map_or(name, |(b, _)| b),
        None => name,
    }
}

/// For each defined symbol, the functions whose code refers to it, with
/// the offset of the first reference in each.
fn referencing_functions(obj: &ObjectFile) -> HashMap<&str, BTreeMap<&str, u64>> {
    let mut users: HashMap<&str, BTreeMap<&str, u64>> = HashMap::new();
    let mut instructions = super::InstructionIndex::default();
    for unit in super::function_units(obj) {
        let function = obj.symbols[unit.symbol].name.as_str();
        for r in obj.sections[unit.section]
            .relocs
            .iter()
            .filter(|r| r.offset >= unit.start && r.offset < unit.end)
        {
            let sym = &obj.symbols[r.symbol];
            let target = if sym.is_section() {
                // `cmpb $0, flag(%rip)`: the addend also skips the
                // immediate after the field; without it, the flag at +1
                // of a shared section (.data.once) reads as the one at +0.
                let position = r
                    .addend
                    .saturating_add(instructions.pc_bias(obj, unit.section, r));
                sym.section()
                    .and_then(|s| super::covering_symbol(obj, s, position.max(0)))
                    .map(|i| obj.symbols[i].name.as_str())
            } else {
                Some(sym.name.as_str())
            };
            if let Some(target) = target {
                let at = r.offset - unit.start;
                let first = users
                    .entry(target)
                    .or_default()
                    .entry(function)
                    .or_insert(at);
                *first = (*first).min(at);
            }
        }
    }
    users
}

/// Names of functions and data objects an object defines.
fn defined_names(obj: &ObjectFile) -> BTreeSet<String> {
    obj.symbols
        .iter()
        .filter(|s| s.is_named_definition())
        .map(|s| s.name.clone())
        .collect()
}

/// The name without the number the compiler appended to it, or None when
/// the name carries no such number.
pub fn numbering_key(name: &str) -> Option<String> {
    if let Some((base, number)) = name.rsplit_once('.') {
        if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty() {
            return Some(format!("{base}."));
        }
    }
    if name.starts_with("__UNIQUE_ID_") {
        let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
        if trimmed.len() < name.len() {
            return Some(trimmed.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::numbering_key;

    #[test]
    fn numbers_are_stripped_only_where_the_compiler_puts_them() {
        assert_eq!(numbering_key("count.12").as_deref(), Some("count."));
        assert_eq!(numbering_key("foo.isra.0").as_deref(), Some("foo.isra."));
        assert_eq!(
            numbering_key("__UNIQUE_ID_ddebug345").as_deref(),
            Some("__UNIQUE_ID_ddebug")
        );
        assert_eq!(numbering_key("version_proc_show"), None);
        assert_eq!(numbering_key("foo.cold"), None);
        assert_eq!(numbering_key("ipv6"), None);
    }
}
