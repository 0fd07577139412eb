//! Diff stage: compare the original and patched builds of one translation
//! unit function by function and decide what a package must carry.
//!
//! Functions are compared as code bytes with relocated fields masked plus
//! the list of relocations, each reduced to what it points at (a symbol of
//! the original object, a string literal, an anonymous constant), so
//! layout shifts, renumbered static locals and moved strings do not count
//! as changes. Anything whose live effect the engine cannot vouch for is
//! refused with a reason.

pub mod adaptation;
mod correlate;
pub mod frame_locals;
pub mod lines;
pub mod object;
pub mod signature;
pub mod types;
pub mod values;

pub use correlate::{is_bookkeeping, is_message_limiter, Correlation};
pub use object::ObjectFile;
use object::Section;

use crate::error::Refusal;
use crate::target::abi::{self, SectionRole};
use ::object::elf;
use object::{reloc_is_pc_relative, reloc_width};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A function's code inside an object: a whole `.text.<name>` section with
/// -ffunction-sections, or a symbol's range in a shared section such as
/// `.sched.text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionUnit {
    pub symbol: usize,
    pub section: usize,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Exists in the running kernel and is redirected to the new version.
    Changed,
    /// Only in the patched build; shipped but not redirected.
    New,
}

/// One function the package carries, with the `.cold` parts that belong
/// to it (they are reached only from the function itself).
#[derive(Debug, Clone)]
pub struct FunctionChange {
    pub name: String,
    pub kind: ChangeKind,
    pub unit: FunctionUnit,
    pub parts: Vec<FunctionUnit>,
}

/// Result of comparing two builds of one translation unit.
#[derive(Debug, Clone)]
pub struct ObjectDiff {
    pub functions: Vec<FunctionChange>,
    pub refused: Vec<Refusal>,
    pub correlation: Correlation,
    /// Changed read-only objects only carried functions use: the package
    /// carries its own copy instead of using the kernel's.
    pub private_copies: BTreeSet<String>,
    /// Replaced functions whose version an adaptation handler chooses per call.
    pub adaptations: Vec<adaptation::AdaptationHandler>,
    /// Writable variables whose changed initial value the package writes
    /// into the running kernel as it is applied (see `values`).
    pub value_updates: Vec<values::ValueUpdate>,
}

impl ObjectDiff {
    pub fn changed(&self) -> Vec<String> {
        self.names(ChangeKind::Changed)
    }
    pub fn new_functions(&self) -> Vec<String> {
        self.names(ChangeKind::New)
    }
    fn names(&self, kind: ChangeKind) -> Vec<String> {
        self.functions
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| f.name.clone())
            .collect()
    }
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty() && self.refused.is_empty() && self.value_updates.is_empty()
    }
}

/// What a relocation points at, independent of where things sit in the
/// object. Names are in the original object's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RelocTarget {
    /// A named symbol plus the addend relative to its start.
    Symbol(String, i64),
    /// A string literal, by content.
    Str(Vec<u8>),
    /// An entry of a merged constant pool (`.rodata.cst16`), by content.
    Constant(Vec<u8>),
    /// A snippet of code with no symbol (`.altinstr_aux`), by its bytes
    /// and relocations.
    Code(Vec<u8>, Vec<(u64, u32, RelocTarget)>),
    /// Anonymous contents of a section, by section name and addend.
    Section(String, i64),
}

/// Compare two builds of the same translation unit.
pub fn diff_objects(orig: &ObjectFile, patched: &ObjectFile) -> anyhow::Result<ObjectDiff> {
    diff_objects_replacing(orig, patched, &BTreeSet::new())
}

/// Compare two builds of the same translation unit, counting the functions
/// named in `replace_unchanged` as changed even when their code is the
/// same: an identity update, to measure what the redirect itself costs.
/// They are then checked like any other changed function (ftrace entry,
/// init code).
pub fn diff_objects_replacing(
    orig: &ObjectFile,
    patched: &ObjectFile,
    replace_unchanged: &BTreeSet<String>,
) -> anyhow::Result<ObjectDiff> {
    let correlation = Correlation::new(orig, patched);
    let mut orig_view = View::new(orig, None);
    let mut patched_view = View::new(patched, Some(&correlation));
    let mut refused = Vec::new();

    check_relocation_types(orig, &mut refused);
    check_relocation_types(patched, &mut refused);
    if !refused.is_empty() {
        return Ok(ObjectDiff {
            functions: Vec::new(),
            refused,
            correlation,
            private_copies: BTreeSet::new(),
            adaptations: Vec::new(),
            value_updates: Vec::new(),
        });
    }

    let orig_units = function_units(orig);
    let patched_units = function_units(patched);
    let orig_by_name: HashMap<&str, &FunctionUnit> = orig_units
        .iter()
        .map(|u| (orig.symbols[u.symbol].name.as_str(), u))
        .collect();

    // Compare every function; a `.cold` part's change counts for its parent.
    let mut differs: BTreeMap<String, ChangeKind> = BTreeMap::new();
    for unit in &patched_units {
        let name = &patched.symbols[unit.symbol].name;
        let Some(orig_name) = correlation.orig_name(name) else {
            differs.insert(name.clone(), ChangeKind::New);
            continue;
        };
        let Some(orig_unit) = orig_by_name.get(orig_name) else {
            differs.insert(name.clone(), ChangeKind::New);
            continue;
        };
        let before = orig_view.signature(orig_unit);
        let after = patched_view.signature(unit);
        // Functions below an edit differ only in the __LINE__ values they
        // pass to might_sleep() and friends: not a change.
        let only_lines = || {
            lines::same_but_line_numbers(
                &lines::Code {
                    bytes: unit_bytes(orig, orig_unit),
                    relocs: &before.line_relocs(),
                },
                &lines::Code {
                    bytes: unit_bytes(patched, unit),
                    relocs: &after.line_relocs(),
                },
            )
        };
        if before != after && !only_lines() {
            differs.insert(name.clone(), ChangeKind::Changed);
        }
    }

    for name in replace_unchanged {
        let in_both = patched_units
            .iter()
            .any(|u| &patched.symbols[u.symbol].name == name)
            && correlation
                .orig_name(name)
                .is_some_and(|orig_name| orig_by_name.contains_key(orig_name));
        if in_both {
            differs.entry(name.clone()).or_insert(ChangeKind::Changed);
        }
    }

    // Code that reads a changed constant table behaves differently even
    // when its instructions are the same.
    let changed_data = changed_data_objects(&mut orig_view, &mut patched_view);
    for &index in changed_data.iter().filter(|&&i| {
        let section = patched.symbols[i]
            .section()
            .expect("data symbols are defined");
        !patched.sections[section].is_write()
    }) {
        for user in referrers(patched, index) {
            if patched_units
                .iter()
                .any(|u| patched.symbols[u.symbol].name == user)
            {
                differs.entry(user).or_insert(ChangeKind::Changed);
            }
        }
    }

    let parents = cold_parents(patched, &patched_units);
    let mut functions: BTreeMap<String, FunctionChange> = BTreeMap::new();
    for (name, kind) in &differs {
        let owner = parents.get(name.as_str()).map_or(name.as_str(), |p| p);
        let owner_kind = if owner == name {
            *kind
        } else if correlation.orig_name(owner).is_some() {
            ChangeKind::Changed
        } else {
            ChangeKind::New
        };
        if functions.contains_key(owner) {
            continue;
        }
        let Some(unit) = patched_units
            .iter()
            .find(|u| patched.symbols[u.symbol].name == owner)
        else {
            continue;
        };
        let parts = patched_units
            .iter()
            .filter(|u| parents.get(patched.symbols[u.symbol].name.as_str()) == Some(&owner))
            .copied()
            .collect();
        functions.insert(
            owner.to_string(),
            FunctionChange {
                name: owner.to_string(),
                kind: owner_kind,
                unit: *unit,
                parts,
            },
        );
    }

    let mut functions: Vec<FunctionChange> = functions.into_values().collect();

    refuse_unsafe_functions(
        orig,
        patched,
        &functions,
        &orig_by_name,
        &correlation,
        &mut refused,
    );
    let (adaptations, mut bad_handlers) = adaptation::declared_handlers(orig, patched, &functions);
    refused.append(&mut bad_handlers);
    // Changed writable variables become value updates or refusals.
    let (written, read_only): (Vec<usize>, Vec<usize>) = changed_data.iter().partition(|&&i| {
        let section = patched.symbols[i]
            .section()
            .expect("data symbols are defined");
        patched.sections[section].is_write()
    });
    let value_updates = values::value_updates(orig, patched, &correlation, &written, &mut refused);
    values::refuse_changed_init_data(orig, patched, &correlation, &mut refused);
    let private_copies = compare_data(patched, &read_only, &functions, &mut refused);
    for change in types::layout_changes(orig, patched)? {
        refused.push(Refusal {
            symbol: match &change.member {
                Some(member) => format!("{}.{member}", change.type_name),
                None => change.type_name.clone(),
            },
            reason: format!(
                "data type layout changed ({}): objects of this type already in the kernel keep the old layout",
                change.detail
            ),
        });
    }
    compare_registrations(&mut orig_view, &mut patched_view, &mut refused);
    refuse_unsafe_references(&mut patched_view, &functions, &mut refused);

    // Init code that changed is refused above; it is never carried.
    functions.retain(|f| !abi::is_init(&patched.sections[f.unit.section].name));
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    refused.sort_by(|a, b| (&a.symbol, &a.reason).cmp(&(&b.symbol, &b.reason)));
    refused.dedup();
    Ok(ObjectDiff {
        functions,
        refused,
        correlation,
        private_copies,
        adaptations,
        value_updates,
    })
}

impl ObjectDiff {
    /// What carrying the original versions of `names` from `orig` takes:
    /// each as a function of its own (with its `.cold` parts), every other
    /// symbol the kernel's. The old clones beside an adaptation handler's
    /// new versions are extracted with it.
    pub fn original_versions(orig: &ObjectFile, names: &[&str]) -> ObjectDiff {
        let units = function_units(orig);
        let parents = cold_parents(orig, &units);
        let functions = names
            .iter()
            .filter_map(|&name| {
                let unit = units.iter().find(|u| orig.symbols[u.symbol].name == name)?;
                let parts = units
                    .iter()
                    .filter(|u| parents.get(orig.symbols[u.symbol].name.as_str()) == Some(&name))
                    .copied()
                    .collect();
                Some(FunctionChange {
                    name: name.to_string(),
                    kind: ChangeKind::New,
                    unit: *unit,
                    parts,
                })
            })
            .collect();
        ObjectDiff {
            functions,
            refused: Vec::new(),
            correlation: Correlation::new(orig, orig),
            private_copies: BTreeSet::new(),
            adaptations: Vec::new(),
            value_updates: Vec::new(),
        }
    }
}

fn check_relocation_types(obj: &ObjectFile, refused: &mut Vec<Refusal>) {
    for section in &obj.sections {
        if abi::classify(&section.name, section.is_alloc(), section.is_exec())
            == SectionRole::Ignored
        {
            continue;
        }
        if let Some(r) = section
            .relocs
            .iter()
            .find(|r| reloc_width(r.r_type).is_none())
        {
            refused.push(Refusal {
                symbol: section.name.clone(),
                reason: format!(
                    "relocation type {} at {:#x} is not supported",
                    r.r_type, r.offset
                ),
            });
        }
    }
}

/// Symbols objtool gives the padding before a function (`--prefix`, call
/// padding kernels): part of the function that follows, not functions.
fn is_padding_symbol(name: &str) -> bool {
    name.starts_with("__pfx_") || name.starts_with("__cfi_")
}

/// Every function symbol defined in code (text or init) sections. A
/// function alone in its section with its padding covers the section.
pub fn function_units(obj: &ObjectFile) -> Vec<FunctionUnit> {
    let mut per_section: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (index, sym) in obj.symbols.iter().enumerate() {
        if is_padding_symbol(&sym.name) {
            continue;
        }
        if let (true, Some(section)) = (sym.is_function(), sym.section()) {
            if obj.sections[section].is_exec() {
                per_section.entry(section).or_default().push(index);
            }
        }
    }
    let mut units = Vec::new();
    for (section, symbols) in per_section {
        let whole = symbols.len() == 1 && obj.sections[section].name.starts_with(".text.");
        for symbol in symbols {
            let sym = &obj.symbols[symbol];
            let (start, end) = if whole {
                (0, obj.sections[section].size)
            } else {
                (sym.value, sym.value + sym.size)
            };
            units.push(FunctionUnit {
                symbol,
                section,
                start,
                end,
            });
        }
    }
    units
}

/// `foo.cold` (and `foo.cold.3`) are parts of `foo`.
fn cold_parents<'a>(obj: &'a ObjectFile, units: &[FunctionUnit]) -> HashMap<&'a str, &'a str> {
    let names: BTreeSet<&str> = units
        .iter()
        .map(|u| obj.symbols[u.symbol].name.as_str())
        .collect();
    let mut parents = HashMap::new();
    for &name in &names {
        if let Some(pos) = name.find(".cold") {
            let rest = &name[pos + 5..];
            if rest.is_empty() || rest.strip_prefix('.').is_some_and(is_number) {
                if let Some(parent) = names.get(&name[..pos]) {
                    parents.insert(name, *parent);
                }
            }
        }
    }
    parents
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Comparison signature of a code or data range: the bytes with relocated
/// fields zeroed, and each relocation as (offset, type, target).
#[derive(Debug, PartialEq, Eq)]
struct Signature {
    bytes: Vec<u8>,
    relocs: Vec<(u64, u32, RelocTarget)>,
}

impl Signature {
    /// Relocations as `lines::Code` wants them: a call's callee bare, other
    /// symbols with their addend, strings as `str:"..."`.
    fn line_relocs(&self) -> Vec<(u64, usize, String)> {
        self.relocs
            .iter()
            .filter(|(_, r_type, _)| reloc_width(*r_type) != Some(0))
            .map(|(offset, r_type, target)| {
                let text = match target {
                    RelocTarget::Symbol(name, -4) => name.clone(),
                    RelocTarget::Symbol(name, addend) => format!("{name}{addend:+}"),
                    RelocTarget::Str(text) => format!("str:{:?}", String::from_utf8_lossy(text)),
                    RelocTarget::Constant(bytes) => format!("const:{}", hex::encode(bytes)),
                    RelocTarget::Code(bytes, _) => format!("code:{}", hex::encode(bytes)),
                    RelocTarget::Section(name, addend) => format!("section {name}{addend:+}"),
                };
                (*offset, reloc_width(*r_type).unwrap_or(4), text)
            })
            .collect()
    }
}

/// The code bytes of a function, unmasked.
fn unit_bytes<'a>(obj: &'a ObjectFile, unit: &FunctionUnit) -> &'a [u8] {
    obj.data(unit.section)
        .get(unit.start as usize..unit.end as usize)
        .unwrap_or(&[])
}

/// One object seen through a namespace: the patched object's names are
/// translated into the original's so signatures compare directly.
struct View<'a> {
    obj: &'a ObjectFile,
    correlation: Option<&'a Correlation>,
    instructions: InstructionIndex,
    /// Names the object defines, to tell its new symbols from external ones.
    defined: std::collections::HashSet<&'a str>,
    /// Unnamed snippets whose signature is being taken: one that refers to
    /// itself (directly or through others) is named by place instead.
    snippets: Vec<(usize, u64)>,
}

impl<'a> View<'a> {
    fn new(obj: &'a ObjectFile, correlation: Option<&'a Correlation>) -> Self {
        View {
            obj,
            correlation,
            instructions: InstructionIndex::default(),
            snippets: Vec::new(),
            defined: obj
                .symbols
                .iter()
                .filter(|s| s.is_named_definition())
                .map(|s| s.name.as_str())
                .collect(),
        }
    }

    fn name(&self, name: &str) -> String {
        match self.correlation {
            None => name.to_string(),
            Some(c) => match c.orig_name(name) {
                Some(orig) => orig.to_string(),
                None if self.defined.contains(name) => {
                    format!("{name} (new)")
                }
                None => name.to_string(),
            },
        }
    }

    fn signature(&mut self, unit: &FunctionUnit) -> Signature {
        self.range_signature(unit.section, unit.start, unit.end)
    }

    fn range_signature(&mut self, section: usize, start: u64, end: u64) -> Signature {
        let data = self.obj.data(section);
        // `start` may come from an addend (an unnamed snippet) and lie
        // anywhere; symbol extents were checked when the object was read.
        let mut bytes = data
            .get(start as usize..(end as usize).min(data.len()))
            .unwrap_or(&[])
            .to_vec();
        let mut relocs = Vec::new();
        let section_relocs = self.obj.sections[section].relocs.clone();
        for r in section_relocs
            .iter()
            .filter(|r| r.offset >= start && r.offset < end)
        {
            let at = (r.offset - start) as usize;
            let width = reloc_width(r.r_type).unwrap_or(4);
            if at + width <= bytes.len() {
                bytes[at..at + width].fill(0);
            }
            let target = self.target(section, r);
            relocs.push((r.offset - start, r.r_type, target));
        }
        if self.obj.sections[section].is_exec() {
            for b in implicit_branches(self.obj, section, start, end) {
                let at = (b.field - start) as usize;
                if at + b.width <= bytes.len() {
                    bytes[at..at + b.width].fill(0);
                }
                let target = match covering_symbol(self.obj, section, b.target as i64) {
                    Some(s) => {
                        let s = &self.obj.symbols[s];
                        RelocTarget::Symbol(self.name(&s.name), b.target as i64 - s.value as i64)
                    }
                    None => RelocTarget::Section(
                        self.obj.sections[section].name.clone(),
                        b.target as i64,
                    ),
                };
                relocs.push((b.field - start, u32::MAX, target));
            }
            relocs.sort_by_key(|r| r.0);
        }
        if !self.obj.sections[section].is_nobits() && bytes.is_empty() && end > start {
            bytes = vec![0; (end - start) as usize];
        }
        if self.obj.sections[section].is_nobits() {
            bytes = end.saturating_sub(start).to_le_bytes().to_vec();
        }
        Signature { bytes, relocs }
    }

    /// What relocation `r` of `section` points at.
    fn target(&mut self, section: usize, r: &object::Reloc) -> RelocTarget {
        let sym = &self.obj.symbols[r.symbol];
        if let Some(ts) = sym
            .section()
            .filter(|&ts| self.obj.sections[ts].is_strings())
        {
            // A string literal, whether named by its section or by a label
            // such as `.LC2` (inline asm keeps those): compare the text.
            let position = (sym.value as i64)
                .saturating_add(r.addend)
                .saturating_add(self.instructions.pc_bias(self.obj, section, r));
            return RelocTarget::Str(c_string_at(self.obj.data(ts), position));
        }
        if let Some(ts) = sym.section().filter(|_| sym.name.starts_with(".L")) {
            // Other compiler labels (`.LC5` in a constant pool): by contents.
            let position = (sym.value as i64)
                .saturating_add(r.addend)
                .saturating_add(self.instructions.pc_bias(self.obj, section, r));
            return self.anonymous_target(ts, position, r.addend.saturating_add(sym.value as i64));
        }
        if !sym.is_section() {
            return RelocTarget::Symbol(self.name(&sym.name), r.addend);
        }
        let Some(target_section) = sym.section() else {
            return RelocTarget::Section(sym.name.clone(), r.addend);
        };
        let position = r
            .addend
            .saturating_add(self.instructions.pc_bias(self.obj, section, r));
        let target = &self.obj.sections[target_section];
        if target.is_strings() {
            return RelocTarget::Str(c_string_at(self.obj.data(target_section), position));
        }
        match covering_symbol(self.obj, target_section, position) {
            Some(s) => {
                let s = &self.obj.symbols[s];
                RelocTarget::Symbol(self.name(&s.name), r.addend.saturating_sub(s.value as i64))
            }
            None => self.anonymous_target(target_section, position, r.addend),
        }
    }

    /// Anonymous data: merged constants by their bytes, anything else by
    /// section and addend.
    fn anonymous_target(&mut self, section: usize, position: i64, addend: i64) -> RelocTarget {
        let s = &self.obj.sections[section];
        if s.is_exec() {
            // Out-of-line code without a symbol: by its own signature.
            if let Ok(start) = u64::try_from(position) {
                if !self.snippets.contains(&(section, start)) {
                    self.snippets.push((section, start));
                    let (start, end) = snippet_range(self.obj, section, start);
                    let snippet = self.range_signature(section, start, end);
                    self.snippets.pop();
                    return RelocTarget::Code(snippet.bytes, snippet.relocs);
                }
            }
        }
        let merged = s.flags & u64::from(elf::SHF_MERGE) != 0;
        if s.is_strings() {
            return RelocTarget::Str(c_string_at(self.obj.data(section), position));
        }
        if merged && s.entsize > 0 {
            let data = self.obj.data(section);
            let bytes = usize::try_from(position)
                .ok()
                .and_then(|p| data.get(p..p.checked_add(usize::try_from(s.entsize).ok()?)?))
                .unwrap_or(&[]);
            return RelocTarget::Constant(bytes.to_vec());
        }
        RelocTarget::Section(anonymous_section_key(&s.name), addend)
    }
}

/// The symbol defined in `section` whose extent contains `position`.
pub fn covering_symbol(obj: &ObjectFile, section: usize, position: i64) -> Option<usize> {
    let candidates = obj.symbols_in(section);
    if candidates.len() == 1 && obj.symbols[candidates[0]].value == 0 {
        return Some(candidates[0]);
    }
    candidates.into_iter().find(|&i| {
        let s = &obj.symbols[i];
        let start = s.value as i64;
        let end = start + (s.size.max(1) as i64);
        position >= start && position < end
    })
}

/// `.rodata.cst16` and friends keep their names; numbered anonymous
/// sections lose the number.
fn anonymous_section_key(name: &str) -> String {
    correlate::numbering_key(name).unwrap_or_else(|| name.to_string())
}

fn c_string_at(data: &[u8], position: i64) -> Vec<u8> {
    let Ok(start) = usize::try_from(position) else {
        return Vec::new();
    };
    let Some(rest) = data.get(start..) else {
        return Vec::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    rest[..end].to_vec()
}

/// Instruction boundaries of an object's code sections, decoded on demand.
#[derive(Debug, Default)]
pub struct InstructionIndex {
    ends: HashMap<usize, Vec<u64>>,
}

impl InstructionIndex {
    /// For a PC-relative reference from code, the distance from the
    /// relocated field to the end of its instruction (what the addend
    /// subtracts besides the target offset); 0 for data.
    pub fn pc_bias(&mut self, obj: &ObjectFile, section: usize, r: &object::Reloc) -> i64 {
        if !reloc_is_pc_relative(r.r_type) || !obj.sections[section].is_exec() {
            return 0;
        }
        let ends = self
            .ends
            .entry(section)
            .or_insert_with(|| instruction_ends(obj.data(section)));
        match ends.binary_search(&(r.offset + 1)) {
            Ok(i) | Err(i) if i < ends.len() => ends[i] as i64 - r.offset as i64,
            _ => 4,
        }
    }

    /// Whether the PC-relative field `r` is the displacement of a direct
    /// call or jump (gas relocates calls to static functions with
    /// R_X86_64_PC32, like a `lea`, so the type alone does not tell).
    pub fn is_direct_branch(
        &mut self,
        obj: &ObjectFile,
        section: usize,
        r: &object::Reloc,
    ) -> bool {
        use iced_x86::{Decoder, DecoderOptions, OpKind};
        if !reloc_is_pc_relative(r.r_type) || !obj.sections[section].is_exec() {
            return false;
        }
        let ends = self
            .ends
            .entry(section)
            .or_insert_with(|| instruction_ends(obj.data(section)));
        let (Ok(i) | Err(i)) = ends.binary_search(&(r.offset + 1));
        let (Some(&end), start) = (ends.get(i), i.checked_sub(1).map_or(0, |p| ends[p])) else {
            return false;
        };
        let Some(code) = obj.data(section).get(start as usize..end as usize) else {
            return false;
        };
        let instr = Decoder::with_ip(64, code, start, DecoderOptions::NONE).decode();
        instr.op_count() == 1 && instr.op0_kind() == OpKind::NearBranch64
    }
}

/// A relative branch the assembler resolved itself (no relocation) whose
/// target lies outside `[start, end)` of the same section: calls between
/// static functions that share a section (`.sched.text`, or objects built
/// without -ffunction-sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImplicitBranch {
    /// Section offset of the displacement field.
    pub field: u64,
    /// 4 for rel32, 2 for rel16, 1 for rel8.
    pub width: usize,
    /// Section offset of the branch target.
    pub target: u64,
    /// Distance from the field to the end of its instruction.
    pub bias: u64,
}

pub fn implicit_branches(
    obj: &ObjectFile,
    section: usize,
    start: u64,
    end: u64,
) -> Vec<ImplicitBranch> {
    use iced_x86::{Decoder, DecoderOptions, OpKind};
    let data = obj.data(section);
    let Some(code) = data.get(start as usize..(end as usize).min(data.len())) else {
        return Vec::new();
    };
    let relocs = &obj.sections[section].relocs;
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let mut found = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() || instr.op_count() != 1 || instr.op0_kind() != OpKind::NearBranch64 {
            continue;
        }
        let target = instr.near_branch64();
        if target >= start && target < end {
            continue;
        }
        // The decoder reports a branch's displacement as its immediate:
        // rel8, rel16 (`xbegin`) or rel32, wherever prefixes put it.
        let offsets = decoder.get_constant_offsets(&instr);
        let width = offsets.immediate_size();
        if width == 0 {
            continue;
        }
        let field = instr.ip() + offsets.immediate_offset() as u64;
        if relocs.iter().any(|r| r.offset == field) {
            continue;
        }
        found.push(ImplicitBranch {
            field,
            width,
            target,
            bias: instr.next_ip() - field,
        });
    }
    found
}

/// The extent of a code snippet that has no symbol (the `.altinstr_aux`
/// fallbacks of `static_cpu_has()`): from `start` through its first
/// unconditional jump or return.
pub fn snippet_range(obj: &ObjectFile, section: usize, start: u64) -> (u64, u64) {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let data = obj.data(section);
    let Some(code) = data.get(start as usize..) else {
        return (start, start);
    };
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() {
            break;
        }
        if matches!(
            instr.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::Return | FlowControl::IndirectBranch
        ) {
            return (start, instr.next_ip());
        }
    }
    (start, data.len() as u64)
}

/// End offsets of the instructions of an x86-64 code section, in order.
pub fn instruction_ends(code: &[u8]) -> Vec<u64> {
    use iced_x86::{Decoder, DecoderOptions};
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut ends = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        ends.push(instr.next_ip());
    }
    ends
}

fn refuse_unsafe_functions(
    orig: &ObjectFile,
    patched: &ObjectFile,
    functions: &[FunctionChange],
    orig_by_name: &HashMap<&str, &FunctionUnit>,
    correlation: &Correlation,
    refused: &mut Vec<Refusal>,
) {
    let traced = ftrace_sites(orig);
    for f in functions {
        let section = &patched.sections[f.unit.section].name;
        if abi::is_init(section) {
            refused.push(Refusal {
                symbol: f.name.clone(),
                reason: format!(
                    "changed {} function: it ran at boot (or module init) and its memory is freed, so the change cannot take effect in a running kernel",
                    if section.starts_with(".exit") { "__exit" } else { "__init" }
                ),
            });
            continue;
        }
        if f.kind == ChangeKind::Changed {
            let orig_name = correlation.orig_name(&f.name).unwrap_or(&f.name);
            if let Some(unit) = orig_by_name.get(orig_name) {
                // Objects whose mcount table objtool adds later (clang
                // builds) have none yet: then the call itself is the proof.
                let entry = orig.symbols[unit.symbol].value;
                let has_entry = match &traced {
                    Some(sites) => sites.contains(&(unit.section, entry)),
                    None => starts_with_fentry_call(orig, unit),
                } || fentry_nopped_for_function_sections(orig, unit);
                if !has_entry {
                    refused.push(Refusal {
                        symbol: f.name.clone(),
                        reason: "cannot be redirected: it has no ftrace entry (notrace, or code the kernel does not trace)".into(),
                    });
                }
            }
        }
    }
}

/// Whether the function begins (after an optional endbr64) with a call to
/// `__fentry__`.
fn starts_with_fentry_call(obj: &ObjectFile, unit: &FunctionUnit) -> bool {
    fentry_site(obj, unit).is_some_and(|(opcode, r_type)| {
        opcode == 0xe8 && matches!(r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32)
    })
}

/// Whether recordmcount turned the function's `__fentry__` call into a NOP
/// only because `-ffunction-sections` put it in `.text.<name>`, a section
/// it did not trace (Linux 4.x): the kernel's own build has the function
/// in `.text`, traced.
fn fentry_nopped_for_function_sections(obj: &ObjectFile, unit: &FunctionUnit) -> bool {
    let section = &obj.sections[unit.section].name;
    let name = &obj.symbols[unit.symbol].name;
    section.strip_prefix(".text.") == Some(name.as_str())
        && fentry_site(obj, unit) == Some((0x0f, elf::R_X86_64_NONE))
}

/// The first opcode byte and relocation type of the `__fentry__` reference
/// at the function's entry (after an optional endbr64).
fn fentry_site(obj: &ObjectFile, unit: &FunctionUnit) -> Option<(u8, u32)> {
    let entry = obj.symbols[unit.symbol].value;
    let code = obj.data(unit.section).get(entry as usize..)?;
    let site = if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        4
    } else {
        0
    };
    let r = obj.sections[unit.section]
        .relocs
        .iter()
        .find(|r| r.offset == entry + site as u64 + 1)?;
    (obj.symbols[r.symbol].name == "__fentry__").then_some((*code.get(site)?, r.r_type))
}

/// (section, offset) of every `__fentry__` call site recorded in
/// __mcount_loc; None when the object has no such table.
fn ftrace_sites(obj: &ObjectFile) -> Option<BTreeSet<(usize, u64)>> {
    let mut sites = BTreeSet::new();
    let mcount = obj.section_by_name("__mcount_loc")?;
    for r in &obj.sections[mcount].relocs {
        let sym = &obj.symbols[r.symbol];
        if let Some(section) = sym.section() {
            let offset = (sym.value as i64).saturating_add(r.addend);
            // The call follows at most a 4-byte endbr at the function start.
            for start in [offset, offset.saturating_sub(4)] {
                if start >= 0 {
                    sites.insert((section, start as u64));
                }
            }
        }
    }
    Some(sites)
}

/// Changed read-only data objects: refused, except those only carried
/// functions use, of which new code gets its own copy (returned by name).
fn compare_data(
    patched: &ObjectFile,
    changed_data: &[usize],
    functions: &[FunctionChange],
    refused: &mut Vec<Refusal>,
) -> BTreeSet<String> {
    let mut private_copies = BTreeSet::new();
    let carried: BTreeSet<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    for &index in changed_data {
        let sym = &patched.symbols[index];
        let section = &patched.sections[sym.section().expect("data symbols are defined")];
        if copied_readonly(patched, index) {
            continue;
        }
        debug_assert!(!section.is_write());
        let users = referrers(patched, index);
        match users.iter().find(|u| !carried.contains(u.as_str())) {
            None => {
                private_copies.insert(sym.name.clone());
            }
            Some(user) => refused.push(Refusal {
                symbol: sym.name.clone(),
                reason: format!(
                    "changed read-only data also used by {user}, which the update does not replace"
                ),
            }),
        }
    }
    private_copies
}

/// Everything in `obj` that refers to `symbol`: function names, or
/// `section NAME` for data. Per-instruction tables follow their functions
/// and are not listed.
fn referrers(obj: &ObjectFile, symbol: usize) -> BTreeSet<String> {
    let target = &obj.symbols[symbol];
    let Some(target_section) = target.section() else {
        return BTreeSet::new();
    };
    let units = function_units(obj);
    let mut found = BTreeSet::new();
    for (index, section) in code_and_data_sections(obj) {
        for r in &section.relocs {
            let sym = &obj.symbols[r.symbol];
            let hits = if sym.is_section() {
                sym.section() == Some(target_section)
                    && covering_symbol(obj, target_section, r.addend.max(0)) == Some(symbol)
            } else {
                sym.name == target.name && sym.place == target.place
            };
            if !hits {
                continue;
            }
            let user = units
                .iter()
                .find(|u| u.section == index && r.offset >= u.start && r.offset < u.end)
                .map(|u| obj.symbols[u.symbol].name.clone())
                .unwrap_or_else(|| format!("section {}", section.name));
            found.insert(user);
        }
    }
    found
}

/// Data objects existing in both builds (patched symbol indices) whose
/// contents differ.
fn changed_data_objects(orig: &mut View, patched: &mut View) -> Vec<usize> {
    let orig_obj = orig.obj;
    let patched_obj = patched.obj;
    let correlation = patched.correlation.expect("patched view has a correlation");
    let orig_objects: HashMap<&str, usize> = data_symbols(orig_obj)
        .into_iter()
        .map(|i| (orig_obj.symbols[i].name.as_str(), i))
        .collect();
    let listed = listed_records(patched_obj);
    let mut changed = Vec::new();
    for index in data_symbols(patched_obj) {
        if listed.contains(&index) {
            continue;
        }
        let sym = &patched_obj.symbols[index];
        let section = sym.section().expect("data symbols are defined");
        let Some(&orig_index) = correlation
            .orig_name(&sym.name)
            .and_then(|n| orig_objects.get(n))
        else {
            continue;
        };
        let orig_sym = &orig_obj.symbols[orig_index];
        let orig_section = orig_sym.section().expect("data symbols are defined");
        let before =
            orig.range_signature(orig_section, orig_sym.value, orig_sym.value + orig_sym.size);
        let after = patched.range_signature(section, sym.value, sym.value + sym.size);
        if before != after {
            changed.push(index);
        }
    }
    changed
}

/// Data objects only a descriptor table points at (the printk index's
/// records of format, file and line): listed by the kernel, not used.
fn listed_records(obj: &ObjectFile) -> BTreeSet<usize> {
    let mut listed = BTreeSet::new();
    for section in &obj.sections {
        if abi::classify(&section.name, section.is_alloc(), section.is_exec())
            != SectionRole::Descriptors
        {
            continue;
        }
        for r in &section.relocs {
            let sym = &obj.symbols[r.symbol];
            let named = match sym.section() {
                Some(target) if sym.is_section() => covering_symbol(obj, target, r.addend.max(0)),
                Some(_) => Some(r.symbol),
                None => None,
            };
            listed.extend(named.filter(|&i| obj.symbols[i].is_object()));
        }
    }
    if listed.is_empty() {
        return listed;
    }
    // Drop those anything else refers to (`__func__`, shared with code).
    let listed_sections: BTreeSet<usize> = listed
        .iter()
        .filter_map(|&i| obj.symbols[i].section())
        .collect();
    for (_, section) in code_and_data_sections(obj) {
        for r in &section.relocs {
            let sym = &obj.symbols[r.symbol];
            let used = match sym.section() {
                Some(target) if sym.is_section() && listed_sections.contains(&target) => {
                    covering_symbol(obj, target, r.addend.max(0))
                }
                Some(_) if !sym.is_section() => Some(r.symbol),
                _ => None,
            };
            if let Some(i) = used {
                listed.remove(&i);
            }
        }
    }
    listed
}

/// Sections of code and data (with their indices), whose relocations are
/// real uses; per-instruction and registration tables are not.
fn code_and_data_sections(obj: &ObjectFile) -> impl Iterator<Item = (usize, &Section)> {
    obj.sections.iter().enumerate().filter(|(_, section)| {
        matches!(
            abi::classify(&section.name, section.is_alloc(), section.is_exec()),
            SectionRole::Text | SectionRole::Data | SectionRole::Init
        )
    })
}

/// Named data objects outside the special tables.
fn data_symbols(obj: &ObjectFile) -> Vec<usize> {
    obj.symbols
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_object() && s.section().is_some())
        .filter(|(_, s)| {
            let sec = &obj.sections[s.section().unwrap()];
            abi::classify(&sec.name, sec.is_alloc(), sec.is_exec()) == SectionRole::Data
        })
        .map(|(i, _)| i)
        .collect()
}

/// Read-only objects the compiler makes up (`__func__`, switch tables):
/// new code carries its own copy, so their change is not a data change.
pub fn copied_readonly(obj: &ObjectFile, symbol: usize) -> bool {
    let sym = &obj.symbols[symbol];
    let Some(section) = sym.section() else {
        return false;
    };
    let sec = &obj.sections[section];
    if sec.is_write() || !sym.is_local() {
        return false;
    }
    let base = sym.name.split('.').next().unwrap_or("");
    // `__msg`: NL_SET_ERR_MSG's message text; `_acpi_module_name`: ACPICA's
    // per-file name for its debug output. Both are only ever printed.
    matches!(
        base,
        "__func__"
            | "__FUNCTION__"
            | "__PRETTY_FUNCTION__"
            | "CSWTCH"
            | "__msg"
            | "_acpi_module_name"
    )
}

/// Registration tables must be identical: a new initcall, export or module
/// parameter would need the kernel to register it again.
fn compare_registrations(orig: &mut View, patched: &mut View, refused: &mut Vec<Refusal>) {
    let names: BTreeSet<String> = orig
        .obj
        .sections
        .iter()
        .chain(patched.obj.sections.iter())
        .filter(|s| abi::classify(&s.name, s.is_alloc(), s.is_exec()) == SectionRole::Registration)
        .map(|s| s.name.clone())
        .collect();
    for name in names {
        let before = orig
            .obj
            .section_by_name(&name)
            .map(|i| orig.range_signature(i, 0, orig.obj.sections[i].size));
        let after = patched
            .obj
            .section_by_name(&name)
            .map(|i| patched.range_signature(i, 0, patched.obj.sections[i].size));
        if before != after {
            refused.push(Refusal {
                symbol: name,
                reason: "changed registration table (initcalls, exports, parameters, tracepoints): the kernel registered the old one at boot".into(),
            });
        }
    }
}

/// New code must not reach into init memory, which is freed after boot.
fn refuse_unsafe_references(
    patched: &mut View,
    functions: &[FunctionChange],
    refused: &mut Vec<Refusal>,
) {
    let obj = patched.obj;
    let ambiguous: BTreeSet<&str> = patched
        .correlation
        .map(|c| c.ambiguous().iter().map(String::as_str).collect())
        .unwrap_or_default();
    for f in functions {
        for unit in std::iter::once(&f.unit).chain(&f.parts) {
            for r in obj.sections[unit.section]
                .relocs
                .iter()
                .filter(|r| r.offset >= unit.start && r.offset < unit.end)
            {
                if !object::reloc_is_module_loadable(r.r_type) {
                    refused.push(Refusal {
                        symbol: f.name.clone(),
                        reason: format!(
                            "uses relocation type {} at {:#x}, which the kernel's module loader cannot apply",
                            r.r_type,
                            r.offset - unit.start
                        ),
                    });
                }
                let sym = &obj.symbols[r.symbol];
                let Some(section) = sym.section() else {
                    continue;
                };
                let named = if sym.is_section() {
                    covering_symbol(obj, section, r.addend.max(0))
                } else {
                    Some(r.symbol)
                };
                // A constant new code gets its own copy of needs no match.
                if let Some(index) = named.filter(|&i| !copied_readonly(obj, i)) {
                    let named = &obj.symbols[index];
                    if ambiguous.contains(named.name.as_str()) {
                        refused.push(Refusal {
                            symbol: named.name.clone(),
                            reason: format!("used by {} but cannot be matched to one static variable of the running kernel (several have this name and users)", f.name),
                        });
                    }
                }
                let target = &obj.sections[section];
                if abi::is_init(&target.name) {
                    refused.push(Refusal {
                        symbol: f.name.clone(),
                        reason: format!(
                            "references {} in {}, which is freed after boot",
                            sym.name, target.name
                        ),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_strings_are_bounded() {
        assert_eq!(c_string_at(b"ab\0cd\0", 3), b"cd");
        assert_eq!(c_string_at(b"ab", 7), b"");
        assert_eq!(c_string_at(b"ab", -1), b"");
    }

    #[test]
    fn cold_suffixes() {
        assert!(is_number("12"));
        assert!(!is_number(""));
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use ::object::write::{Object, Relocation, Symbol, SymbolSection};
    use ::object::{
        Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags,
        SymbolKind, SymbolScope,
    };
    use std::path::Path;

    /// `f` calls an unnamed snippet in `.altinstr_aux` that calls itself.
    fn self_referring_snippet() -> Vec<u8> {
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let call_ret = [0xe8, 0, 0, 0, 0, 0xc3];
        let text = obj.add_section(Vec::new(), b".text.f".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &call_ret, 16);
        obj.add_symbol(Symbol {
            name: b"f".to_vec(),
            value: 0,
            size: call_ret.len() as u64,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
        let aux = obj.add_section(Vec::new(), b".altinstr_aux".to_vec(), SectionKind::Text);
        obj.append_section_data(aux, &call_ret, 1);
        let aux_symbol = obj.section_symbol(aux);
        for section in [text, aux] {
            obj.add_relocation(
                section,
                Relocation {
                    offset: 1,
                    symbol: aux_symbol,
                    addend: -4,
                    flags: RelocationFlags::Elf {
                        r_type: elf::R_X86_64_PC32,
                    },
                },
            )
            .unwrap();
        }
        obj.write().unwrap()
    }

    #[test]
    fn relocation_past_its_section_is_refused() {
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = obj.add_section(Vec::new(), b".text.f".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &[0xe8, 0, 0, 0, 0, 0xc3], 16);
        let symbol = obj.section_symbol(text);
        // A 4-byte field at 3 ends at 7, past the 6 bytes of code.
        obj.add_relocation(
            text,
            Relocation {
                offset: 3,
                symbol,
                addend: -4,
                flags: RelocationFlags::Elf {
                    r_type: elf::R_X86_64_PC32,
                },
            },
        )
        .unwrap();
        let err = ObjectFile::parse(Path::new("bad.o"), obj.write().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad.o: relocation at 0x3 lies outside .text.f (0x6 bytes)"
        );
    }

    #[test]
    fn snippet_calling_itself_is_compared() {
        let bytes = self_referring_snippet();
        let orig = ObjectFile::parse(Path::new("orig.o"), bytes.clone()).unwrap();
        let patched = ObjectFile::parse(Path::new("patched.o"), bytes).unwrap();
        let diff = diff_objects(&orig, &patched).unwrap();
        assert!(diff.functions.is_empty(), "{:?}", diff.functions);
    }
}
