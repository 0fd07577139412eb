//! Function signatures from DWARF: the return type and parameter types of
//! named functions of one object, as text with typedefs resolved, and
//! whether each parameter travels in one general-purpose register (what a
//! generic dispatcher can pass through untouched).

use super::object::ObjectFile;
use super::types::Sections;
use anyhow::{Context, Result};
use gimli::{constants as dw, AttributeValue, EndianSlice, LittleEndian, UnitOffset};
use std::collections::HashMap;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// One parameter's type, e.g. `struct seq_file *`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub type_name: String,
    /// An integer, enum or pointer of at most 8 bytes: passed in a register.
    pub in_register: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub returns: String,
    pub parameters: Vec<Parameter>,
    /// Declared with `...`.
    pub variadic: bool,
}

impl Signature {
    /// `bool (struct seq_file *, void *)`.
    pub fn describe(&self) -> String {
        let mut parameters: Vec<&str> = self
            .parameters
            .iter()
            .map(|p| p.type_name.as_str())
            .collect();
        if self.variadic {
            parameters.push("...");
        }
        if parameters.is_empty() {
            parameters.push("void");
        }
        format!("{} ({})", self.returns, parameters.join(", "))
    }
}

/// Deepest chain of type modifiers followed before giving up.
const MAX_TYPE_DEPTH: usize = 32;

/// The signatures of the functions called `names` that `obj`'s debug info
/// describes (definitions preferred over declarations). Names without a
/// description are absent from the map.
pub fn signatures(obj: &ObjectFile, names: &[&str]) -> Result<HashMap<String, Signature>> {
    let mut found: HashMap<String, (Signature, bool)> = HashMap::new();
    if obj.section_by_name(".debug_info").is_none() {
        return Ok(HashMap::new());
    }
    let sections = Sections::load(obj)?;
    let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>> {
        Ok(EndianSlice::new(sections.get(id), LittleEndian))
    })?;
    let mut headers = dwarf.units();
    while let Some(header) = headers
        .next()
        .with_context(|| format!("{}: malformed .debug_info", obj.path.display()))?
    {
        let abbreviations = header.abbreviations(&dwarf.debug_abbrev)?;
        let unit = UnitView {
            dwarf: &dwarf,
            header: &header,
            abbreviations: &abbreviations,
        };
        let mut cursor = header.entries(&abbreviations);
        while let Some(entry) = cursor.next_dfs()? {
            if entry.tag() != dw::DW_TAG_subprogram {
                continue;
            }
            let Some(name) = entry.attr_value(dw::DW_AT_name) else {
                continue;
            };
            let Some(name) = unit.string(name) else {
                continue;
            };
            if !names.contains(&name.as_str()) {
                continue;
            }
            let declaration = matches!(
                entry.attr_value(dw::DW_AT_declaration),
                Some(AttributeValue::Flag(true))
            );
            if found.get(&name).is_some_and(|(_, d)| !*d) {
                continue;
            }
            let signature = read_signature(&unit, entry.offset())?;
            found.insert(name, (signature, declaration));
        }
    }
    Ok(found.into_iter().map(|(n, (s, _))| (n, s)).collect())
}

/// One unit's DIEs, read without the line and range tables this module
/// has no use for.
struct UnitView<'u, 'd> {
    dwarf: &'u gimli::Dwarf<R<'d>>,
    header: &'u gimli::UnitHeader<R<'d>>,
    abbreviations: &'u gimli::Abbreviations,
}

impl<'d> UnitView<'_, 'd> {
    fn entry(&self, at: UnitOffset) -> Result<gimli::DebuggingInformationEntry<R<'d>>> {
        Ok(self.header.entry(self.abbreviations, at)?)
    }

    fn string(&self, value: AttributeValue<R<'d>>) -> Option<String> {
        let text = match value {
            AttributeValue::String(s) => s,
            AttributeValue::DebugStrRef(o) => self.dwarf.debug_str.get_str(o).ok()?,
            AttributeValue::DebugLineStrRef(o) => self.dwarf.debug_line_str.get_str(o).ok()?,
            _ => return None,
        };
        Some(text.to_string_lossy().into_owned())
    }
}

fn read_signature(unit: &UnitView<'_, '_>, at: UnitOffset) -> Result<Signature> {
    let mut tree = unit.header.entries_tree(unit.abbreviations, Some(at))?;
    let root = tree.root()?;
    let returns = match type_of(root.entry())? {
        Some(t) => describe(unit, t, 0)?.0,
        None => "void".to_string(),
    };
    let mut parameters = Vec::new();
    let mut variadic = false;
    let mut children = root.children();
    while let Some(child) = children.next()? {
        let entry = child.entry();
        match entry.tag() {
            dw::DW_TAG_formal_parameter => {
                let (type_name, in_register) = match type_of(entry)? {
                    Some(t) => describe(unit, t, 0)?,
                    None => ("?".to_string(), false),
                };
                parameters.push(Parameter {
                    type_name,
                    in_register,
                });
            }
            dw::DW_TAG_unspecified_parameters => variadic = true,
            _ => {}
        }
    }
    Ok(Signature {
        returns,
        parameters,
        variadic,
    })
}

fn type_of(entry: &gimli::DebuggingInformationEntry<R<'_>>) -> Result<Option<UnitOffset>> {
    Ok(match entry.attr_value(dw::DW_AT_type) {
        Some(AttributeValue::UnitRef(offset)) => Some(offset),
        _ => None,
    })
}

/// The C spelling of the type at `at` with typedefs resolved, and whether
/// a value of it travels in one general-purpose register.
fn describe(unit: &UnitView<'_, '_>, at: UnitOffset, depth: usize) -> Result<(String, bool)> {
    if depth > MAX_TYPE_DEPTH {
        return Ok(("?".to_string(), false));
    }
    let entry = unit.entry(at)?;
    let name = || -> Result<String> {
        Ok(entry
            .attr_value(dw::DW_AT_name)
            .and_then(|n| unit.string(n))
            .unwrap_or_else(|| "<anonymous>".to_string()))
    };
    let size = match entry.attr_value(dw::DW_AT_byte_size) {
        Some(v) => v.udata_value(),
        None => None,
    };
    let inner = |entry: &gimli::DebuggingInformationEntry<R<'_>>| -> Result<(String, bool)> {
        match type_of(entry)? {
            Some(t) => describe(unit, t, depth + 1),
            None => Ok(("void".to_string(), false)),
        }
    };
    Ok(match entry.tag() {
        dw::DW_TAG_base_type => {
            let float = matches!(
                entry.attr_value(dw::DW_AT_encoding),
                Some(AttributeValue::Encoding(e)) if e == dw::DW_ATE_float || e == dw::DW_ATE_complex_float
            );
            (name()?, !float && size.is_some_and(|s| s <= 8))
        }
        dw::DW_TAG_pointer_type => (format!("{} *", inner(&entry)?.0), true),
        dw::DW_TAG_const_type => qualified("const", inner(&entry)?),
        dw::DW_TAG_volatile_type => qualified("volatile", inner(&entry)?),
        dw::DW_TAG_restrict_type | dw::DW_TAG_atomic_type | dw::DW_TAG_typedef => inner(&entry)?,
        dw::DW_TAG_structure_type => (format!("struct {}", name()?), false),
        dw::DW_TAG_union_type => (format!("union {}", name()?), false),
        dw::DW_TAG_enumeration_type => (format!("enum {}", name()?), true),
        dw::DW_TAG_subroutine_type => ("function".to_string(), false),
        dw::DW_TAG_array_type => (format!("{} []", inner(&entry)?.0), false),
        _ => ("?".to_string(), false),
    })
}

/// `const int`, but `char * const` for a qualified pointer.
fn qualified(qualifier: &str, (t, in_register): (String, bool)) -> (String, bool) {
    if t.ends_with('*') {
        (format!("{t} {qualifier}"), in_register)
    } else {
        (format!("{qualifier} {t}"), in_register)
    }
}
