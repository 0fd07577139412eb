//! Symbol correlation: which symbol of the patched build is which symbol
//! of the original. Names match exactly, except the numbers GCC appends to
//! static locals and unique IDs (`count.12`, `__UNIQUE_ID_ddebug345`),
//! which shift when the source changes; those match by their base name
//! when exactly one candidate is left on each side.

use super::object::ObjectFile;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Default)]
pub struct Correlation {
    patched_to_orig: HashMap<String, String>,
}

impl Correlation {
    pub fn new(orig: &ObjectFile, patched: &ObjectFile) -> Correlation {
        let orig_names = defined_names(orig);
        let patched_names = defined_names(patched);
        let mut patched_to_orig = HashMap::new();
        let mut orig_left: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let mut patched_left: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for name in &patched_names {
            if orig_names.contains(name) {
                patched_to_orig.insert(name.clone(), name.clone());
            } else if let Some(key) = numbering_key(name) {
                patched_left.entry(key).or_default().push(name);
            }
        }
        for name in &orig_names {
            if !patched_names.contains(name) {
                if let Some(key) = numbering_key(name) {
                    orig_left.entry(key).or_default().push(name);
                }
            }
        }
        for (key, patched_side) in patched_left {
            if let (Some(orig_side), [only]) = (orig_left.get(&key), patched_side.as_slice()) {
                if let [orig_only] = orig_side.as_slice() {
                    patched_to_orig.insert(only.to_string(), orig_only.to_string());
                }
            }
        }
        Correlation { patched_to_orig }
    }

    /// The original name of a symbol the patched object defines, if it
    /// existed before the patch.
    pub fn orig_name(&self, patched_name: &str) -> Option<&str> {
        self.patched_to_orig.get(patched_name).map(String::as_str)
    }
}

/// Names of functions and data objects an object defines.
fn defined_names(obj: &ObjectFile) -> std::collections::BTreeSet<String> {
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
