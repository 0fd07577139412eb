//! Data-type layouts from DWARF debug info.
//!
//! A live patch replaces functions, not the objects they work on: structures
//! already allocated by the running kernel keep the layout of the original
//! build. Patched code that assumes a different size or different member
//! offsets reads and writes the wrong bytes, even when it only reaches the
//! type through pointers. This module reads every named struct, union and
//! class definition of both builds of a translation unit and reports those
//! whose layout differs.
//!
//! The debug sections of a relocatable object are not final: string and
//! cross-section offsets live in RELA relocations. They are applied to
//! copies of the sections before gimli reads them.

use super::object::ObjectFile;
use anyhow::{anyhow, bail, Context, Result};
use gimli::{
    constants as dw, AttributeValue, DebugStrOffsetsBase, DwarfFileType, EndianSlice, LittleEndian,
    Reader as _, SectionId, UnitHeader,
};
use object::elf;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// One struct/union whose layout differs between the two builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutChange {
    /// `struct foo`, `union bar`, `class baz`; an anonymous struct or union
    /// known only through a typedef is named by the typedef (`atomic_t`).
    pub type_name: String,
    /// The first differing member (a path such as `u.field` inside
    /// anonymous members), or None for a size-only change.
    pub member: Option<String>,
    /// What changed, e.g. `size 16 -> 24`, `member len: offset 8 -> 12`,
    /// `member added: flags`, `member removed: x`.
    pub detail: String,
}

impl fmt::Display for LayoutChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.detail)
    }
}

/// Every struct/union present in both builds whose layout differs, sorted
/// by type name. Types only in the patched build are new and not reported;
/// types only in the original are not a change. Objects without any
/// `.debug_info` give an empty result; when only one of the two has debug
/// info the comparison cannot be made and is an error.
pub fn layout_changes(orig: &ObjectFile, patched: &ObjectFile) -> Result<Vec<LayoutChange>> {
    let before = type_layouts(orig)?;
    let after = type_layouts(patched)?;
    let (before, after) = match (before, after) {
        (None, None) => return Ok(Vec::new()),
        (Some(b), Some(a)) => (b, a),
        (Some(_), None) => bail!(
            "{}: no DWARF debug info, but {} has it: cannot compare data-type layouts",
            patched.path.display(),
            orig.path.display()
        ),
        (None, Some(_)) => bail!(
            "{}: no DWARF debug info, but {} has it: cannot compare data-type layouts",
            orig.path.display(),
            patched.path.display()
        ),
    };
    let mut changes = Vec::new();
    for (name, old) in &before {
        let Some(new) = after.get(name) else {
            continue;
        };
        if old == new {
            continue;
        }
        let (member, detail) = describe_sets(old, new);
        changes.push(LayoutChange {
            type_name: name.clone(),
            member,
            detail,
        });
    }
    Ok(changes)
}

/// Byte size and member offsets of one struct or union definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    pub size: u64,
    /// Byte offset of each member that starts on a byte, by its path
    /// (`name`, or `outer.name` inside an anonymous part).
    pub members: BTreeMap<String, u64>,
}

/// The layout of `type_name` (`struct alt_instr`) in `obj`, when the object
/// defines it once with a known size.
pub fn struct_layout(obj: &ObjectFile, type_name: &str) -> Result<Option<StructLayout>> {
    let Some(layouts) = type_layouts(obj)? else {
        bail!("{}: no DWARF debug info", obj.path.display());
    };
    let Some(definitions) = layouts.get(type_name) else {
        return Ok(None);
    };
    let mut definitions = definitions.iter();
    let (Some(layout), None) = (definitions.next(), definitions.next()) else {
        bail!(
            "{}: {type_name} has more than one definition",
            obj.path.display()
        );
    };
    let Some(size) = layout.size else {
        return Ok(None);
    };
    Ok(Some(StructLayout {
        size,
        members: layout
            .members
            .iter()
            .filter_map(|m| {
                let bits = m.bit_pos?;
                (m.bit_size.is_none() && bits % 8 == 0).then(|| (m.path.clone(), bits / 8))
            })
            .collect(),
    }))
}

/// The layout of one definition: byte size and members in declaration
/// order, anonymous members flattened.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Layout {
    size: Option<u64>,
    members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Member {
    /// `name`, or `outer.name` inside a member of anonymous struct/union type.
    path: String,
    /// Position from the start of the outermost type, in bits.
    bit_pos: Option<u64>,
    /// Width of a bit field; None for ordinary members.
    bit_size: Option<u64>,
    /// Readable type name with typedefs and qualifiers resolved.
    type_name: String,
    /// Byte size of the member's type.
    size: Option<u64>,
}

/// Definitions by type name; a name may have several different ones
/// (local types of different scopes).
type Layouts = BTreeMap<String, BTreeSet<Layout>>;

// ---------------------------------------------------------------------
// Reading the debug sections

/// Debug sections gimli needs for type information. The others (line
/// tables, location and range lists) are never read.
const NEEDED: [SectionId; 6] = [
    SectionId::DebugInfo,
    SectionId::DebugAbbrev,
    SectionId::DebugTypes,
    SectionId::DebugStr,
    SectionId::DebugLineStr,
    SectionId::DebugStrOffsets,
];

/// (section index, start in the concatenated data) of each section that
/// contributes to one debug section.
type Parts = Vec<(usize, u64)>;

/// Contents of every section called `name`, concatenated (type units can
/// come in one COMDAT section each), with the relocations applied. Returns
/// the data and, for each contributing section, its index and start.
fn load_section(obj: &ObjectFile, name: &str) -> Result<(Vec<u8>, Parts)> {
    let parts: Vec<usize> = (0..obj.sections.len())
        .filter(|&i| obj.sections[i].name == name)
        .collect();
    let mut data = Vec::new();
    let mut starts = Vec::new();
    for &index in &parts {
        let section = &obj.sections[index];
        if section.flags & u64::from(elf::SHF_COMPRESSED) != 0 {
            bail!(
                "{}: {name} is compressed; compressed debug sections are not supported",
                obj.path.display()
            );
        }
        starts.push((index, data.len() as u64));
        data.extend_from_slice(obj.data(index));
    }
    Ok((data, starts))
}

/// All needed sections, loaded and relocated.
pub(super) struct Sections {
    data: HashMap<SectionId, Vec<u8>>,
}

impl Sections {
    pub(super) fn load(obj: &ObjectFile) -> Result<Sections> {
        Self::load_placed(obj, &NEEDED, &[])
    }

    /// Sections `ids`, relocated with each code section of `placed` at its
    /// address (every other non-debug section is at 0), so addresses of
    /// that section's code cannot be mistaken for another's.
    pub(super) fn load_placed(
        obj: &ObjectFile,
        ids: &[SectionId],
        placed: &[(usize, u64)],
    ) -> Result<Sections> {
        let mut loaded = HashMap::new();
        let mut starts: HashMap<usize, u64> = HashMap::new();
        starts.extend(placed.iter().copied());
        for &id in ids {
            let (data, parts) = load_section(obj, id.name())?;
            starts.extend(parts.iter().copied());
            loaded.insert(id, (data, parts));
        }
        let mut data = HashMap::new();
        for (id, (mut bytes, parts)) in loaded {
            for (index, start) in parts {
                relocate(obj, index, start, &starts, &mut bytes)
                    .with_context(|| format!("{}: {}", obj.path.display(), id.name()))?;
            }
            data.insert(id, bytes);
        }
        Ok(Sections { data })
    }

    pub(super) fn get(&self, id: SectionId) -> &[u8] {
        self.data.get(&id).map_or(&[], Vec::as_slice)
    }
}

/// Apply the relocations of section `index`, which starts at `start` in
/// `bytes`. A symbol in one of the loaded debug sections is worth its
/// section's start in the concatenated data; section symbols are worth 0
/// otherwise.
fn relocate(
    obj: &ObjectFile,
    index: usize,
    start: u64,
    starts: &HashMap<usize, u64>,
    bytes: &mut [u8],
) -> Result<()> {
    let section = &obj.sections[index];
    for r in &section.relocs {
        let sym = &obj.symbols[r.symbol];
        let base = match sym.section().and_then(|s| starts.get(&s)) {
            Some(&s) => i128::from(s),
            None => 0,
        };
        let own = if sym.is_section() {
            0
        } else {
            i128::from(sym.value)
        };
        let value = base + own + i128::from(r.addend);
        let (width, encoded) = match r.r_type {
            elf::R_X86_64_64 => (8, (value as u64).to_le_bytes().to_vec()),
            elf::R_X86_64_32 => {
                let v = u32::try_from(value).map_err(|_| {
                    anyhow!("R_X86_64_32 value {value:#x} at {:#x} overflows", r.offset)
                })?;
                (4, v.to_le_bytes().to_vec())
            }
            elf::R_X86_64_32S => {
                let v = i32::try_from(value).map_err(|_| {
                    anyhow!("R_X86_64_32S value {value:#x} at {:#x} overflows", r.offset)
                })?;
                (4, v.to_le_bytes().to_vec())
            }
            other => bail!(
                "relocation type {other} at {:#x} is not supported in debug info",
                r.offset
            ),
        };
        let at = usize::try_from(start + r.offset).unwrap_or(usize::MAX);
        let field = at
            .checked_add(width)
            .and_then(|end| bytes.get_mut(at..end))
            .ok_or_else(|| anyhow!("relocation at {:#x} runs past the section", r.offset))?;
        field.copy_from_slice(&encoded);
    }
    Ok(())
}

type R<'a> = EndianSlice<'a, LittleEndian>;

// ---------------------------------------------------------------------
// The type graph

/// A reference to a DIE: its position in .debug_info or .debug_types, or a
/// type unit signature.
#[derive(Debug, Clone, Copy)]
enum Ref {
    Die(u64),
    Sig(u64),
}

/// Position of a DIE, unique across .debug_info and .debug_types.
fn die_key(offset: usize, in_types: bool) -> u64 {
    ((offset as u64) << 1) | u64::from(in_types)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    Known(u64),
    Unspecified,
    Dynamic,
}

#[derive(Debug)]
struct Node {
    tag: dw::DwTag,
    name: Option<String>,
    ty: Option<Ref>,
    byte_size: Option<u64>,
    declaration: bool,
    /// DW_AT_signature of a declaration completed in a type unit.
    signature: Option<Ref>,
    member_location: Option<u64>,
    data_bit_offset: Option<u64>,
    /// DWARF 2-4 DW_AT_bit_offset (from the most significant bit).
    bit_offset: Option<i64>,
    bit_size: Option<u64>,
    lower_bound: Option<i64>,
    upper_bound: Option<Count>,
    count: Option<Count>,
    children: Vec<u32>,
}

impl Node {
    fn new(tag: dw::DwTag) -> Node {
        Node {
            tag,
            name: None,
            ty: None,
            byte_size: None,
            declaration: false,
            signature: None,
            member_location: None,
            data_bit_offset: None,
            bit_offset: None,
            bit_size: None,
            lower_bound: None,
            upper_bound: None,
            count: None,
            children: Vec::new(),
        }
    }

    fn is_aggregate(&self) -> bool {
        matches!(
            self.tag,
            dw::DW_TAG_structure_type | dw::DW_TAG_union_type | dw::DW_TAG_class_type
        )
    }
}

/// Tags recorded wherever they appear.
fn is_type_tag(tag: dw::DwTag) -> bool {
    matches!(
        tag,
        dw::DW_TAG_base_type
            | dw::DW_TAG_unspecified_type
            | dw::DW_TAG_structure_type
            | dw::DW_TAG_union_type
            | dw::DW_TAG_class_type
            | dw::DW_TAG_enumeration_type
            | dw::DW_TAG_typedef
            | dw::DW_TAG_pointer_type
            | dw::DW_TAG_reference_type
            | dw::DW_TAG_rvalue_reference_type
            | dw::DW_TAG_ptr_to_member_type
            | dw::DW_TAG_const_type
            | dw::DW_TAG_volatile_type
            | dw::DW_TAG_restrict_type
            | dw::DW_TAG_atomic_type
            | dw::DW_TAG_immutable_type
            | dw::DW_TAG_packed_type
            | dw::DW_TAG_shared_type
            | dw::DW_TAG_array_type
            | dw::DW_TAG_subrange_type
            | dw::DW_TAG_subroutine_type
    )
}

/// Tags recorded only as children of the given parent tag.
fn is_part_tag(parent: dw::DwTag, tag: dw::DwTag) -> bool {
    match tag {
        dw::DW_TAG_member => matches!(
            parent,
            dw::DW_TAG_structure_type | dw::DW_TAG_union_type | dw::DW_TAG_class_type
        ),
        dw::DW_TAG_formal_parameter | dw::DW_TAG_unspecified_parameters => {
            parent == dw::DW_TAG_subroutine_type
        }
        _ => false,
    }
}

/// Qualifiers and aliases that do not change a type's layout.
fn is_transparent(tag: dw::DwTag) -> bool {
    matches!(
        tag,
        dw::DW_TAG_typedef
            | dw::DW_TAG_const_type
            | dw::DW_TAG_volatile_type
            | dw::DW_TAG_restrict_type
            | dw::DW_TAG_atomic_type
            | dw::DW_TAG_immutable_type
            | dw::DW_TAG_packed_type
            | dw::DW_TAG_shared_type
    )
}

/// How deep name, size and flattening recursion may go; only malformed
/// (cyclic) debug info gets near it.
const MAX_DEPTH: usize = 48;
/// Longest type name kept; longer ones (deeply nested function pointer
/// types) are cut, identically in both builds.
const MAX_NAME: usize = 2048;
/// Members of one flattened layout; bounds pathological nesting.
const MAX_MEMBERS: usize = 100_000;

#[derive(Default)]
struct Graph {
    nodes: Vec<Node>,
    by_key: HashMap<u64, u32>,
    by_signature: HashMap<u64, u64>,
    names: Vec<Option<String>>,
    sizes: Vec<Option<Option<u64>>>,
}

/// Named struct/union layouts of one object, or None without .debug_info.
fn type_layouts(obj: &ObjectFile) -> Result<Option<Layouts>> {
    if obj.section_by_name(".debug_info").is_none() {
        return Ok(None);
    }
    let sections = Sections::load(obj)?;
    let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>> {
        Ok(EndianSlice::new(sections.get(id), LittleEndian))
    })?;
    let mut graph = Graph::default();
    let mut units = dwarf.units();
    loop {
        let header = units
            .next()
            .with_context(|| format!("{}: malformed .debug_info", obj.path.display()))?;
        let Some(header) = header else { break };
        let at = header.offset().0;
        graph.read_unit(&dwarf, &header, false).with_context(|| {
            format!(
                "{}: malformed DWARF in the .debug_info unit at {at:#x}",
                obj.path.display()
            )
        })?;
    }
    let mut type_units = dwarf.type_units();
    loop {
        let header = type_units
            .next()
            .with_context(|| format!("{}: malformed .debug_types", obj.path.display()))?;
        let Some(header) = header else { break };
        let at = header.offset().0;
        graph.read_unit(&dwarf, &header, true).with_context(|| {
            format!(
                "{}: malformed DWARF in the .debug_types unit at {at:#x}",
                obj.path.display()
            )
        })?;
    }
    graph.names = vec![None; graph.nodes.len()];
    graph.sizes = vec![None; graph.nodes.len()];
    graph
        .layouts()
        .map(Some)
        .with_context(|| format!("{}: malformed DWARF types", obj.path.display()))
}

impl Graph {
    fn read_unit(
        &mut self,
        dwarf: &gimli::Dwarf<R<'_>>,
        header: &UnitHeader<R<'_>>,
        in_types: bool,
    ) -> Result<()> {
        let unit_start = header.offset().0;
        if let gimli::UnitType::Type {
            type_signature,
            type_offset,
        } = header.type_()
        {
            self.by_signature.insert(
                type_signature.0,
                die_key(unit_start + type_offset.0, in_types),
            );
        }
        let abbreviations = header.abbreviations(&dwarf.debug_abbrev)?;
        let mut entries = header.entries_raw(&abbreviations, None)?;
        let mut str_offsets_base = DebugStrOffsetsBase::default_for_encoding_and_file(
            header.encoding(),
            DwarfFileType::Main,
        );
        // The recorded node at each depth of the current path, if any.
        let mut path: Vec<Option<u32>> = Vec::new();
        while !entries.is_empty() {
            let depth = entries.next_depth();
            let offset = entries.next_offset().0;
            let Some(abbrev) = entries.read_abbreviation()? else {
                continue;
            };
            let depth =
                usize::try_from(depth).map_err(|_| anyhow!("DIE tree nesting underflows"))?;
            let tag = abbrev.tag();
            let parent = depth
                .checked_sub(1)
                .and_then(|d| path.get(d).copied().flatten());
            let parent_tag = parent.map(|p| self.nodes[p as usize].tag);
            let wanted = is_type_tag(tag) || parent_tag.is_some_and(|p| is_part_tag(p, tag));
            if depth == 0 {
                for spec in abbrev.attributes() {
                    let attr = entries.read_attribute(*spec)?;
                    if let AttributeValue::DebugStrOffsetsBase(base) = attr.value() {
                        str_offsets_base = base;
                    }
                }
            } else if !wanted {
                entries.skip_attributes(abbrev.attributes())?;
            }
            path.truncate(depth);
            if depth == 0 || !wanted {
                path.push(None);
                continue;
            }
            let mut node = Node::new(tag);
            for spec in abbrev.attributes() {
                let attr = entries.read_attribute(*spec)?;
                let value = attr.value();
                match attr.name() {
                    dw::DW_AT_name => {
                        node.name = Some(self.string(dwarf, header, str_offsets_base, value)?);
                    }
                    dw::DW_AT_type => node.ty = reference(header, in_types, value),
                    dw::DW_AT_signature => node.signature = reference(header, in_types, value),
                    dw::DW_AT_byte_size => node.byte_size = attr.udata_value(),
                    dw::DW_AT_declaration => node.declaration = value == AttributeValue::Flag(true),
                    dw::DW_AT_data_member_location => {
                        node.member_location = member_location(value)?;
                    }
                    dw::DW_AT_data_bit_offset => node.data_bit_offset = attr.udata_value(),
                    dw::DW_AT_bit_offset => node.bit_offset = signed(&attr),
                    dw::DW_AT_bit_size => node.bit_size = attr.udata_value(),
                    dw::DW_AT_lower_bound => node.lower_bound = signed(&attr),
                    dw::DW_AT_upper_bound => node.upper_bound = Some(bound(&attr)),
                    dw::DW_AT_count => node.count = Some(bound(&attr)),
                    _ => {}
                }
            }
            let index = u32::try_from(self.nodes.len()).map_err(|_| anyhow!("too many DIEs"))?;
            self.nodes.push(node);
            self.by_key
                .insert(die_key(unit_start + offset, in_types), index);
            if let Some(p) = parent {
                let parent_tag = self.nodes[p as usize].tag;
                let attach = match tag {
                    dw::DW_TAG_member
                    | dw::DW_TAG_formal_parameter
                    | dw::DW_TAG_unspecified_parameters => true,
                    dw::DW_TAG_subrange_type => parent_tag == dw::DW_TAG_array_type,
                    _ => false,
                };
                if attach {
                    self.nodes[p as usize].children.push(index);
                }
            }
            path.push(Some(index));
        }
        Ok(())
    }

    fn string(
        &self,
        dwarf: &gimli::Dwarf<R<'_>>,
        header: &UnitHeader<R<'_>>,
        str_offsets_base: DebugStrOffsetsBase,
        value: AttributeValue<R<'_>>,
    ) -> Result<String> {
        let raw = match value {
            AttributeValue::String(s) => s,
            AttributeValue::DebugStrRef(offset) => dwarf.debug_str.get_str(offset)?,
            AttributeValue::DebugLineStrRef(offset) => dwarf.debug_line_str.get_str(offset)?,
            AttributeValue::DebugStrOffsetsIndex(index) => {
                let offset = dwarf.debug_str_offsets.get_str_offset(
                    header.format(),
                    str_offsets_base,
                    index,
                )?;
                dwarf.debug_str.get_str(offset)?
            }
            other => bail!("unsupported name form {other:?}"),
        };
        Ok(raw.to_string_lossy().into_owned())
    }

    fn resolve(&self, r: Ref) -> Option<u32> {
        let key = match r {
            Ref::Die(key) => key,
            Ref::Sig(sig) => *self.by_signature.get(&sig)?,
        };
        self.by_key.get(&key).copied()
    }

    fn target(&self, index: u32) -> Option<u32> {
        self.nodes[index as usize].ty.and_then(|r| self.resolve(r))
    }

    /// Follow typedefs and qualifiers, and declarations completed in a
    /// type unit, to the type that has the layout.
    fn strip(&self, mut index: u32) -> u32 {
        for _ in 0..MAX_DEPTH {
            let node = &self.nodes[index as usize];
            let next = if is_transparent(node.tag) {
                self.target(index)
            } else if node.declaration {
                node.signature.and_then(|r| self.resolve(r))
            } else {
                None
            };
            match next {
                Some(n) => index = n,
                None => break,
            }
        }
        index
    }

    /// The anonymous struct/union a member of type `index` opens, and
    /// whether it is reached through an array.
    fn anonymous_aggregate(&self, index: u32) -> Option<(u32, bool)> {
        let mut t = self.strip(index);
        let mut array = false;
        if self.nodes[t as usize].tag == dw::DW_TAG_array_type {
            t = self.strip(self.target(t)?);
            array = true;
        }
        let node = &self.nodes[t as usize];
        (node.is_aggregate() && node.name.is_none() && !node.declaration).then_some((t, array))
    }

    fn name_of(&mut self, index: Option<u32>, depth: usize) -> String {
        match index {
            Some(i) => self.name(i, depth),
            None => "void".to_string(),
        }
    }

    /// Readable C-like name of a type, typedefs and qualifiers resolved.
    fn name(&mut self, index: u32, depth: usize) -> String {
        if let Some(name) = &self.names[index as usize] {
            return name.clone();
        }
        if depth > MAX_DEPTH {
            return "<nested too deep>".to_string();
        }
        let next = depth + 1;
        let tag = self.nodes[index as usize].tag;
        let own = self.nodes[index as usize].name.clone();
        let mut name = match tag {
            dw::DW_TAG_structure_type => format!("struct {}", own.as_deref().unwrap_or("<anon>")),
            dw::DW_TAG_union_type => format!("union {}", own.as_deref().unwrap_or("<anon>")),
            dw::DW_TAG_class_type => format!("class {}", own.as_deref().unwrap_or("<anon>")),
            dw::DW_TAG_enumeration_type => format!("enum {}", own.as_deref().unwrap_or("<anon>")),
            t if is_transparent(t) => {
                let target = self.target(index);
                self.name_of(target, next)
            }
            dw::DW_TAG_pointer_type
            | dw::DW_TAG_reference_type
            | dw::DW_TAG_rvalue_reference_type
            | dw::DW_TAG_ptr_to_member_type => {
                let sigil = match tag {
                    dw::DW_TAG_pointer_type => "*",
                    dw::DW_TAG_reference_type => "&",
                    dw::DW_TAG_rvalue_reference_type => "&&",
                    _ => "::*",
                };
                let target = self.target(index).map(|t| self.strip(t));
                match target {
                    Some(t) if self.nodes[t as usize].tag == dw::DW_TAG_subroutine_type => {
                        self.function(t, &format!("({sigil})"), next)
                    }
                    _ => format!("{} {sigil}", self.name_of(target, next)),
                }
            }
            dw::DW_TAG_array_type => {
                let target = self.target(index);
                let mut name = self.name_of(target, next);
                let dims: Vec<u32> = self.nodes[index as usize].children.clone();
                if dims.is_empty() {
                    name.push_str("[]");
                }
                for d in dims {
                    match self.dimension(d) {
                        Count::Known(n) => name.push_str(&format!("[{n}]")),
                        Count::Unspecified => name.push_str("[]"),
                        Count::Dynamic => name.push_str("[*]"),
                    }
                }
                name
            }
            dw::DW_TAG_subroutine_type => self.function(index, "", next),
            _ => own.unwrap_or_else(|| "<unnamed>".to_string()),
        };
        if name.len() > MAX_NAME {
            let mut cut = MAX_NAME;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
            name.push_str("...");
        }
        self.names[index as usize] = Some(name.clone());
        name
    }

    fn function(&mut self, index: u32, declarator: &str, depth: usize) -> String {
        let ret = self.target(index);
        let ret = self.name_of(ret, depth);
        let mut params = Vec::new();
        for p in self.nodes[index as usize].children.clone() {
            if self.nodes[p as usize].tag == dw::DW_TAG_unspecified_parameters {
                params.push("...".to_string());
            } else {
                let t = self.target(p);
                params.push(self.name_of(t, depth));
            }
        }
        let space = if declarator.is_empty() { "" } else { " " };
        format!("{ret}{space}{declarator}({})", params.join(", "))
    }

    fn dimension(&self, subrange: u32) -> Count {
        let node = &self.nodes[subrange as usize];
        if let Some(count) = node.count {
            return count;
        }
        match node.upper_bound {
            Some(Count::Known(upper)) => {
                let lower = node.lower_bound.unwrap_or(0);
                let n = i128::from(upper as i64) - i128::from(lower) + 1;
                u64::try_from(n).map_or(Count::Dynamic, Count::Known)
            }
            Some(other) => other,
            None => Count::Unspecified,
        }
    }

    /// Byte size of a type.
    fn size(&mut self, index: u32, depth: usize) -> Option<u64> {
        if let Some(size) = self.sizes[index as usize] {
            return size;
        }
        if depth > MAX_DEPTH {
            return None;
        }
        let node = &self.nodes[index as usize];
        let size = if let Some(size) = node.byte_size {
            Some(size)
        } else if is_transparent(node.tag) || node.declaration {
            let stripped = self.strip(index);
            if stripped == index {
                None
            } else {
                self.size(stripped, depth + 1)
            }
        } else {
            match node.tag {
                dw::DW_TAG_pointer_type
                | dw::DW_TAG_reference_type
                | dw::DW_TAG_rvalue_reference_type => Some(8),
                dw::DW_TAG_array_type => {
                    let dims = node.children.clone();
                    let elem = self.target(index);
                    let mut total = elem.and_then(|e| self.size(e, depth + 1));
                    for d in dims {
                        total = match self.dimension(d) {
                            Count::Known(n) => total.and_then(|t| t.checked_mul(n)),
                            _ => None,
                        };
                    }
                    total
                }
                _ => None,
            }
        };
        self.sizes[index as usize] = Some(size);
        size
    }

    /// Every named definition: structs, unions and classes by tag and name,
    /// and anonymous ones by the typedef that names them.
    fn layouts(&mut self) -> Result<Layouts> {
        let mut layouts = Layouts::new();
        for index in 0..self.nodes.len() as u32 {
            let node = &self.nodes[index as usize];
            let key = if node.is_aggregate() && !node.declaration {
                let Some(name) = &node.name else { continue };
                let kind = match node.tag {
                    dw::DW_TAG_structure_type => "struct",
                    dw::DW_TAG_union_type => "union",
                    _ => "class",
                };
                format!("{kind} {name}")
            } else if node.tag == dw::DW_TAG_typedef {
                let Some(name) = node.name.clone() else {
                    continue;
                };
                // Only a direct typedef of the anonymous type (through
                // qualifiers), so a chain of typedefs reports it once.
                let mut t = self.target(index);
                while let Some(i) = t {
                    let n = &self.nodes[i as usize];
                    if is_transparent(n.tag) && n.tag != dw::DW_TAG_typedef {
                        t = self.target(i);
                    } else {
                        break;
                    }
                }
                let Some(t) = t else { continue };
                let n = &self.nodes[t as usize];
                if !(n.is_aggregate() && n.name.is_none() && !n.declaration) {
                    continue;
                }
                let layout = self.layout(t)?;
                layouts.entry(name).or_default().insert(layout);
                continue;
            } else {
                continue;
            };
            let layout = self.layout(index)?;
            layouts.entry(key).or_default().insert(layout);
        }
        Ok(layouts)
    }

    fn layout(&mut self, index: u32) -> Result<Layout> {
        let size = self.nodes[index as usize].byte_size;
        let mut members = Vec::new();
        self.flatten(index, Some(0), "", &mut members, 0)?;
        Ok(Layout { size, members })
    }

    fn flatten(
        &mut self,
        index: u32,
        base: Option<u64>,
        prefix: &str,
        out: &mut Vec<Member>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            bail!("anonymous members nested too deep");
        }
        for child in self.nodes[index as usize].children.clone() {
            if out.len() >= MAX_MEMBERS {
                bail!("too many members");
            }
            let ty = self.target(child);
            let type_name = self.name_of(ty, 0);
            let size = ty.and_then(|t| self.size(t, 0));
            let (bit_pos, bit_size) = self.position(child, ty);
            let bit_pos = base.zip(bit_pos).and_then(|(b, p)| b.checked_add(p));
            let anonymous = ty.and_then(|t| self.anonymous_aggregate(t));
            let path = match &self.nodes[child as usize].name {
                Some(name) => format!("{prefix}{name}"),
                None if anonymous.is_some() => String::new(),
                None => format!("{prefix}<unnamed>"),
            };
            if !path.is_empty() {
                out.push(Member {
                    path: path.clone(),
                    bit_pos,
                    bit_size,
                    type_name,
                    size,
                });
            }
            if let Some((inner, array)) = anonymous {
                let inner_prefix = match (path.is_empty(), array) {
                    (true, _) => prefix.to_string(),
                    (false, false) => format!("{path}."),
                    (false, true) => format!("{path}[]."),
                };
                self.flatten(inner, bit_pos, &inner_prefix, out, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Position of a member relative to its parent in bits, and its width
    /// if it is a bit field.
    fn position(&mut self, member: u32, ty: Option<u32>) -> (Option<u64>, Option<u64>) {
        let node = &self.nodes[member as usize];
        let (location, data_bit_offset, bit_offset, bit_size, storage) = (
            node.member_location,
            node.data_bit_offset,
            node.bit_offset,
            node.bit_size,
            node.byte_size,
        );
        let byte_bits = location.unwrap_or(0).checked_mul(8);
        if let Some(bits) = data_bit_offset {
            return (byte_bits.and_then(|b| b.checked_add(bits)), bit_size);
        }
        let (Some(bit_offset), Some(width)) = (bit_offset, bit_size) else {
            return (byte_bits, bit_size);
        };
        // DWARF 2-4: bit_offset counts from the most significant bit of
        // the storage unit; on little-endian x86 the position from the
        // least significant one is storage - bit_offset - width.
        let storage = storage.or_else(|| ty.and_then(|t| self.size(t, 0)));
        let pos = storage.and_then(|s| {
            let from_lsb = i128::from(s) * 8 - i128::from(bit_offset) - i128::from(width);
            let total = i128::from(byte_bits?) + from_lsb;
            u64::try_from(total).ok()
        });
        (pos, bit_size)
    }
}

fn reference(
    header: &UnitHeader<R<'_>>,
    in_types: bool,
    value: AttributeValue<R<'_>>,
) -> Option<Ref> {
    match value {
        AttributeValue::UnitRef(offset) => {
            Some(Ref::Die(die_key(header.offset().0 + offset.0, in_types)))
        }
        AttributeValue::DebugInfoRef(offset) => Some(Ref::Die(die_key(offset.0, false))),
        AttributeValue::DebugTypesRef(signature) => Some(Ref::Sig(signature.0)),
        _ => None,
    }
}

/// A constant member offset, or the `DW_OP_plus_uconst n` / `DW_OP_constu
/// n` expression older producers use; other expressions (virtual bases)
/// have no fixed offset.
fn member_location(value: AttributeValue<R<'_>>) -> Result<Option<u64>> {
    if let Some(v) = value.udata_value() {
        return Ok(Some(v));
    }
    if let AttributeValue::Exprloc(expr) = value {
        let mut r = expr.0;
        if r.is_empty() {
            return Ok(None);
        }
        let op = dw::DwOp(r.read_u8()?);
        if op == dw::DW_OP_plus_uconst || op == dw::DW_OP_constu {
            let v = r.read_uleb128()?;
            if r.is_empty() {
                return Ok(Some(v));
            }
        }
    }
    Ok(None)
}

/// A signed constant; fixed-size data forms are sign-extended from their
/// width.
fn signed(attr: &gimli::Attribute<R<'_>>) -> Option<i64> {
    match attr.raw_value() {
        AttributeValue::Data1(v) => Some(i64::from(v as i8)),
        AttributeValue::Data2(v) => Some(i64::from(v as i16)),
        AttributeValue::Data4(v) => Some(i64::from(v as i32)),
        AttributeValue::Data8(v) => Some(v as i64),
        AttributeValue::Sdata(v) => Some(v),
        AttributeValue::Udata(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// An array bound: a constant, or a reference/expression (variable length).
fn bound(attr: &gimli::Attribute<R<'_>>) -> Count {
    match signed(attr) {
        Some(v) => Count::Known(v as u64),
        None => Count::Dynamic,
    }
}

// ---------------------------------------------------------------------
// Comparison

fn describe_sets(old: &BTreeSet<Layout>, new: &BTreeSet<Layout>) -> (Option<String>, String) {
    let removed: Vec<&Layout> = old.difference(new).collect();
    let added: Vec<&Layout> = new.difference(old).collect();
    match (removed.first(), added.is_empty()) {
        (Some(a), false) => {
            // Compare with the most similar new definition.
            let b = added
                .iter()
                .max_by_key(|b| similarity(a, b))
                .expect("added is not empty");
            describe(a, b)
        }
        (Some(_), true) => (
            None,
            format!(
                "one of its {} definitions is gone ({} -> {})",
                old.len(),
                old.len(),
                new.len()
            ),
        ),
        (None, _) => (
            None,
            format!(
                "another definition under this name ({} -> {})",
                old.len(),
                new.len()
            ),
        ),
    }
}

fn similarity(a: &Layout, b: &Layout) -> (usize, bool) {
    let same = a
        .members
        .iter()
        .zip(&b.members)
        .take_while(|(x, y)| x == y)
        .count();
    (same, a.size == b.size)
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

/// The first difference between two definitions of one type.
fn describe(a: &Layout, b: &Layout) -> (Option<String>, String) {
    let (member, what) = first_difference(a, b);
    let mut detail = what;
    if member.is_some() && a.size != b.size {
        detail.push_str(&format!("; size {} -> {}", show(a.size), show(b.size)));
    }
    (member, detail)
}

fn first_difference(a: &Layout, b: &Layout) -> (Option<String>, String) {
    let index = |l: &Layout| {
        let mut map: HashMap<String, usize> = HashMap::new();
        for (i, m) in l.members.iter().enumerate() {
            map.entry(m.path.clone()).or_insert(i);
        }
        map
    };
    let in_a = index(a);
    let in_b = index(b);
    // An existing member that moved or changed comes first: that is what
    // breaks code working on existing objects.
    for m in &a.members {
        if let Some(&j) = in_b.get(&m.path) {
            if let Some(d) = member_difference(m, &b.members[j]) {
                return (Some(m.path.clone()), format!("member {}: {d}", m.path));
            }
        }
    }
    if let Some(m) = a.members.iter().find(|m| !in_b.contains_key(&m.path)) {
        return (Some(m.path.clone()), format!("member removed: {}", m.path));
    }
    if let Some(m) = b.members.iter().find(|m| !in_a.contains_key(&m.path)) {
        return (Some(m.path.clone()), format!("member added: {}", m.path));
    }
    let order_a: Vec<&str> = a.members.iter().map(|m| m.path.as_str()).collect();
    let order_b: Vec<&str> = b.members.iter().map(|m| m.path.as_str()).collect();
    if let Some((x, _)) = order_a.iter().zip(&order_b).find(|(x, y)| x != y) {
        return (Some(x.to_string()), format!("member order changed at {x}"));
    }
    if a.size != b.size {
        return (None, format!("size {} -> {}", show(a.size), show(b.size)));
    }
    (None, "layout differs".to_string())
}

fn member_difference(a: &Member, b: &Member) -> Option<String> {
    let bit_field = a.bit_size.is_some() || b.bit_size.is_some();
    if bit_field {
        if a.bit_pos != b.bit_pos {
            return Some(format!(
                "bit offset {} -> {}",
                show(a.bit_pos),
                show(b.bit_pos)
            ));
        }
        if a.bit_size != b.bit_size {
            return Some(format!(
                "bit size {} -> {}",
                show(a.bit_size),
                show(b.bit_size)
            ));
        }
    } else if a.bit_pos != b.bit_pos {
        let bytes = |p: Option<u64>| show(p.map(|p| p / 8));
        return Some(format!(
            "offset {} -> {}",
            bytes(a.bit_pos),
            bytes(b.bit_pos)
        ));
    }
    if a.type_name != b.type_name {
        return Some(format!("type {} -> {}", a.type_name, b.type_name));
    }
    if a.size != b.size {
        return Some(format!("size {} -> {}", show(a.size), show(b.size)));
    }
    None
}
