//! Write side of the diff: a new relocatable object holding only what the
//! package carries from one patched translation unit — the changed and new
//! functions, the data only they use, and the special-section entries that
//! describe their instructions. Every reference to anything else becomes an
//! undefined symbol that `dynamos apply` resolves against the running kernel.

use crate::diff::object::{reloc_is_module_loadable, Reloc};
use crate::diff::{
    covering_symbol, implicit_branches, snippet_range, ChangeKind, InstructionIndex, ObjectDiff,
    ObjectFile,
};
use crate::error::Refusal;
use crate::package::{ExternalSymbol, SymbolKind};
use crate::target::abi::{self, KernelAbi, SectionRole};
use object::write::{self, Object, Relocation, SectionId, SymbolId};
use object::{
    elf, Architecture, BinaryFormat, Endianness, RelocationFlags, SectionFlags, SectionKind,
    SymbolFlags, SymbolScope,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A replaced function and the global name its new version has in the
/// extracted object (what the generated livepatch table points at).
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub name: String,
    pub alias: String,
}

#[derive(Debug)]
pub struct Extracted {
    pub object: Vec<u8>,
    pub replaced: Vec<NewVersion>,
    pub added: Vec<String>,
    pub externals: Vec<ExternalSymbol>,
    /// Kernel symbols (functions, or symbols of unknown kind) whose address
    /// the carried code or data takes rather than calls.
    pub address_taken: Vec<String>,
}

/// Names shared by every extracted object of one package, so aliases and
/// external symbols stay unique across translation units.
#[derive(Debug, Default)]
pub struct PackageNames {
    next_alias: usize,
    next_external: usize,
    /// New global functions and variables of the package, by name.
    shared: HashMap<String, SharedDefinition>,
}

/// A new global function or variable one translation unit of the package
/// defines: the package's other units refer to the package's copy, since
/// the running kernel has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDefinition {
    /// `vmlinux` or the module whose new code defines it.
    pub object: String,
    pub file: String,
}

impl PackageNames {
    /// Record the new global definitions of one translation unit, before
    /// any unit is extracted. Two units defining the same name are refused.
    pub fn share_new_globals(
        &mut self,
        kernel_object: &str,
        source_file: &str,
        patched: &ObjectFile,
        diff: &ObjectDiff,
    ) -> Result<(), Refusal> {
        for s in &patched.symbols {
            if !is_new_global(s, diff) {
                continue;
            }
            let definition = SharedDefinition {
                object: kernel_object.to_string(),
                file: source_file.to_string(),
            };
            if let Some(other) = self.shared.get(&s.name) {
                return Err(Refusal {
                    symbol: s.name.clone(),
                    reason: format!(
                        "a new global defined by both {} and {source_file}",
                        other.file
                    ),
                });
            }
            self.shared.insert(s.name.clone(), definition);
        }
        Ok(())
    }
}

impl PackageNames {
    /// Whether the unit of `source_file` defines a new global of the package.
    pub fn defines_shared(&self, source_file: &str) -> bool {
        self.shared.values().any(|d| d.file == source_file)
    }
}

/// Whether `s` is a global function or variable the patch adds.
fn is_new_global(s: &crate::diff::object::Symbol, diff: &ObjectDiff) -> bool {
    s.is_named_definition()
        && !s.is_local()
        && (s.is_function() || s.is_object())
        && diff.correlation.orig_name(&s.name).is_none()
}

/// The linkage name under which a unit's new global is visible to the
/// package's other units.
fn shared_symbol_name(name: &str) -> String {
    format!("__dynamos_shared_{name}")
}

/// Whether new code of `user` may call into new code of `home`: only when
/// `home` is always there while `user`'s new code runs.
fn may_use(user: &str, home: &str) -> bool {
    user == home || home == "vmlinux"
}

/// A piece of an input section copied to the output.
#[derive(Debug, Clone, Copy)]
struct Carried {
    start: u64,
    end: u64,
    out: SectionId,
    out_offset: u64,
}

struct Extractor<'a> {
    patched: &'a ObjectFile,
    diff: &'a ObjectDiff,
    source_file: &'a str,
    out: Object<'static>,
    carried: HashMap<usize, Vec<Carried>>,
    /// Output sections by name, for sections assembled from several pieces.
    merged: HashMap<String, SectionId>,
    /// Relocations still to translate: (input section, input range, output place).
    pending: Vec<(usize, Carried)>,
    externals: BTreeMap<(String, bool), (SymbolId, ExternalSymbol)>,
    /// References to new globals of the package's other units.
    shared_references: HashMap<String, SymbolId>,
    /// `vmlinux` or the module this unit belongs to.
    kernel_object: &'a str,
    /// Bookkeeping statics that start afresh in the package.
    fresh: &'a BTreeSet<String>,
    /// Global names the generated registration code uses for carried functions.
    aliases: &'a BTreeMap<String, String>,
    names: &'a mut PackageNames,
    abi: &'a KernelAbi,
    /// Kernel symbols whose address the carried code or data takes.
    address_taken: BTreeSet<String>,
    refused: Vec<Refusal>,
    instructions: InstructionIndex,
}

#[allow(clippy::too_many_arguments)]
pub fn extract(
    patched: &ObjectFile,
    diff: &ObjectDiff,
    source_file: &str,
    kernel_object: &str,
    fresh: &BTreeSet<String>,
    aliases: &BTreeMap<String, String>,
    names: &mut PackageNames,
    abi: &KernelAbi,
) -> Result<Extracted, Vec<Refusal>> {
    let mut x = Extractor {
        patched,
        diff,
        source_file,
        kernel_object,
        fresh,
        aliases,
        shared_references: HashMap::new(),
        out: Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        carried: HashMap::new(),
        merged: HashMap::new(),
        pending: Vec::new(),
        externals: BTreeMap::new(),
        names,
        abi,
        address_taken: BTreeSet::new(),
        refused: Vec::new(),
        instructions: InstructionIndex::default(),
    };
    let (replaced, added) = x.carry_functions();
    x.share_new_globals();
    x.translate_pending();
    x.carry_entry_tables();
    x.translate_pending();
    if !x.refused.is_empty() {
        return Err(x.refused);
    }
    let object = x.out.write().map_err(|e| {
        vec![Refusal {
            symbol: source_file.to_string(),
            reason: format!("cannot write the extracted object: {e}"),
        }]
    })?;
    Ok(Extracted {
        object,
        replaced,
        added,
        externals: x.externals.into_values().map(|(_, e)| e).collect(),
        address_taken: x.address_taken.into_iter().collect(),
    })
}

impl Extractor<'_> {
    fn carry_functions(&mut self) -> (Vec<NewVersion>, Vec<String>) {
        let mut replaced = Vec::new();
        let mut added = Vec::new();
        for f in &self.diff.functions {
            let units = std::iter::once(&f.unit).chain(&f.parts);
            let mut main_place = None;
            for unit in units {
                let sym = &self.patched.symbols[unit.symbol];
                let place = self.carry_range(unit.section, unit.start, unit.end, true);
                let value = place.out_offset + sym.value - unit.start;
                self.out.add_symbol(write::Symbol {
                    name: sym.name.as_bytes().to_vec(),
                    value,
                    size: sym.size,
                    kind: object::SymbolKind::Text,
                    scope: SymbolScope::Compilation,
                    weak: false,
                    section: write::SymbolSection::Section(place.out),
                    flags: SymbolFlags::None,
                });
                if unit.symbol == f.unit.symbol {
                    main_place = Some((place.out, value, sym.size));
                }
            }
            let (section, value, size) = main_place.expect("main unit carried");
            if let Some(alias) = self.aliases.get(&f.name) {
                self.add_global_alias(alias, section, value, size);
            }
            match f.kind {
                ChangeKind::Changed => {
                    let alias = format!("__dynamos_v2_{}", self.names.next_alias);
                    self.names.next_alias += 1;
                    self.add_global_alias(&alias, section, value, size);
                    replaced.push(NewVersion {
                        name: self
                            .diff
                            .correlation
                            .orig_name(&f.name)
                            .unwrap_or(&f.name)
                            .to_string(),
                        alias,
                    });
                }
                ChangeKind::New => added.push(f.name.clone()),
            }
        }
        (replaced, added)
    }

    fn add_global_alias(&mut self, alias: &str, section: SectionId, value: u64, size: u64) {
        self.out.add_symbol(write::Symbol {
            name: alias.as_bytes().to_vec(),
            value,
            size,
            kind: object::SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: write::SymbolSection::Section(section),
            flags: SymbolFlags::None,
        });
    }

    /// Copy `[start, end)` of an input section (once) and queue its
    /// relocations. `own_section`: give the range its own output section
    /// named after the input one; otherwise append to a merged section.
    fn carry_range(&mut self, section: usize, start: u64, end: u64, own_section: bool) -> Carried {
        if let Some(c) = self.find_carried(section, start as i64) {
            if c.start <= start && end <= c.end {
                return c;
            }
        }
        let input = &self.patched.sections[section];
        let name = input.name.clone();
        let out =
            if own_section && !self.merged.contains_key(&name) && (start == 0 && end == input.size)
            {
                self.new_section(section, &name)
            } else if own_section {
                let sym = covering_symbol(self.patched, section, start as i64)
                    .map(|s| self.patched.symbols[s].name.clone())
                    .unwrap_or_else(|| format!("{start:x}"));
                self.new_section(section, &format!(".text.{sym}"))
            } else {
                match self.merged.get(&name) {
                    Some(&id) => id,
                    None => {
                        let id = self.new_section(section, &name);
                        self.merged.insert(name.clone(), id);
                        id
                    }
                }
            };
        let align = input.align.max(1);
        let out_offset = if input.is_nobits() {
            self.out.append_section_bss(out, end - start, align)
        } else {
            let data = self.patched.data(section)[start as usize..end as usize].to_vec();
            self.out.append_section_data(out, &data, align)
        };
        let carried = Carried {
            start,
            end,
            out,
            out_offset,
        };
        self.carried.entry(section).or_default().push(carried);
        self.pending.push((section, carried));
        carried
    }

    fn new_section(&mut self, input: usize, name: &str) -> SectionId {
        let s = &self.patched.sections[input];
        let kind = if s.is_exec() {
            SectionKind::Text
        } else if s.is_nobits() {
            SectionKind::UninitializedData
        } else if s.is_write() {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        // Copied data gets a name of its own: the linker would otherwise
        // merge it with the registration code's same-named mergeable string
        // sections and move the strings our relocations point at.
        let role = abi::classify(&s.name, s.is_alloc(), s.is_exec());
        let name = if role == SectionRole::Data {
            format!("{name}.dynamos")
        } else {
            name.to_string()
        };
        let id = self.out.add_section(Vec::new(), name.into_bytes(), kind);
        let section = self.out.section_mut(id);
        // Copies are plain data: merging strings across files buys nothing here.
        let merge = u64::from(elf::SHF_MERGE | elf::SHF_STRINGS);
        section.flags = SectionFlags::Elf {
            sh_flags: s.flags & !merge,
        };
        id
    }

    fn find_carried(&self, section: usize, position: i64) -> Option<Carried> {
        self.carried
            .get(&section)?
            .iter()
            .copied()
            .find(|c| position >= c.start as i64 && position < c.end.max(c.start + 1) as i64)
    }

    fn translate_pending(&mut self) {
        while let Some((section, carried)) = self.pending.pop() {
            let mut relocs: Vec<Reloc> = self.patched.sections[section]
                .relocs
                .iter()
                .filter(|r| r.offset >= carried.start && r.offset < carried.end)
                .copied()
                .collect();
            if self.patched.sections[section].is_exec() {
                relocs.extend(self.implicit_relocations(section, &carried));
            }
            for r in relocs {
                if !reloc_is_module_loadable(r.r_type) {
                    self.refused.push(Refusal {
                        symbol: self.patched.sections[section].name.clone(),
                        reason: format!(
                            "relocation type {} at {:#x} cannot be applied by the kernel's module loader",
                            r.r_type, r.offset
                        ),
                    });
                    continue;
                }
                if let Some((symbol, addend)) = self.translate_target(section, &r) {
                    let relocation = Relocation {
                        offset: carried.out_offset + (r.offset - carried.start),
                        symbol,
                        addend,
                        flags: RelocationFlags::Elf { r_type: r.r_type },
                    };
                    if let Err(e) = self.out.add_relocation(carried.out, relocation) {
                        self.refused.push(Refusal {
                            symbol: self.patched.sections[section].name.clone(),
                            reason: format!("cannot add relocation: {e}"),
                        });
                    }
                }
            }
        }
    }

    /// Branches the assembler resolved within a shared section stop being
    /// right once the code moves: give each a relocation of its own.
    fn implicit_relocations(&mut self, section: usize, carried: &Carried) -> Vec<Reloc> {
        let branches = implicit_branches(self.patched, section, carried.start, carried.end);
        if branches.is_empty() {
            return Vec::new();
        }
        let name = &self.patched.sections[section].name;
        let section_symbol = self
            .patched
            .symbols
            .iter()
            .position(|s| s.is_section() && s.section() == Some(section));
        let mut relocs = Vec::new();
        for b in branches {
            match (b.width, section_symbol) {
                (4, Some(symbol)) => relocs.push(Reloc {
                    offset: b.field,
                    r_type: elf::R_X86_64_PC32,
                    symbol,
                    addend: b.target as i64 - b.bias as i64,
                }),
                _ => self.refused.push(Refusal {
                    symbol: name.clone(),
                    reason: format!(
                        "a short branch at {:#x} leaves the function for {:#x} without a relocation; it cannot be moved",
                        b.field, b.target
                    ),
                }),
            }
        }
        relocs
    }

    /// The output symbol and addend a relocation must use. A reference to
    /// a kernel symbol other than a call or jump (a function pointer taken
    /// in code or stored in data) is remembered: on IBT kernels the
    /// function must still start with an ENDBR.
    fn translate_target(&mut self, from_section: usize, r: &Reloc) -> Option<(SymbolId, i64)> {
        let translated = self.translate_target_to(from_section, r)?;
        if self
            .instructions
            .is_direct_branch(self.patched, from_section, r)
        {
            return Some(translated);
        }
        let in_table = matches!(
            {
                let s = &self.patched.sections[from_section];
                abi::classify(&s.name, s.is_alloc(), s.is_exec())
            },
            SectionRole::Entries(_) | SectionRole::PairedEntries
        );
        if !in_table {
            if let Some((_, external)) = self.externals.values().find(|(id, _)| *id == translated.0)
            {
                if external.kind != SymbolKind::Data {
                    self.address_taken.insert(external.name.clone());
                }
            }
        }
        Some(translated)
    }

    fn translate_target_to(&mut self, from_section: usize, r: &Reloc) -> Option<(SymbolId, i64)> {
        let sym = self.patched.symbols[r.symbol].clone();
        let Some(target_section) = sym.section() else {
            if crate::shadow::is_runtime_symbol(&sym.name)
                || (self.abi.objtool_at_link() && abi::named_by_objtool(&sym.name))
            {
                return Some((self.runtime_reference(&sym.name), r.addend));
            }
            if let Some(shared) = self.shared_reference(&sym.name) {
                return shared.map(|id| (id, r.addend));
            }
            return Some((self.external(&sym.name, None, true), r.addend));
        };
        let role = {
            let t = &self.patched.sections[target_section];
            abi::classify(&t.name, t.is_alloc(), t.is_exec())
        };
        if sym.is_section() {
            let position = r.addend + self.instructions.pc_bias(self.patched, from_section, r);
            if let Some(c) = self.find_carried(target_section, position) {
                let out_sym = self.out.section_symbol(c.out);
                return Some((out_sym, r.addend - c.start as i64 + c.out_offset as i64));
            }
            if let Some(c) = self.carry_anonymous(target_section, position, role) {
                let out_sym = self.out.section_symbol(c.out);
                return Some((out_sym, r.addend - c.start as i64 + c.out_offset as i64));
            }
            let anonymous_code = self.patched.sections[target_section].is_exec()
                && covering_symbol(self.patched, target_section, position).is_none();
            if let (true, Ok(start)) = (anonymous_code, u64::try_from(position)) {
                // A static_cpu_has() fallback in .altinstr_aux: carry the
                // snippet; its jumps back land in the carried function.
                let (start, end) = snippet_range(self.patched, target_section, start);
                let c = self.carry_range(target_section, start, end, false);
                let out_sym = self.out.section_symbol(c.out);
                return Some((out_sym, r.addend - c.start as i64 + c.out_offset as i64));
            }
            let Some(named) = covering_symbol(self.patched, target_section, position) else {
                self.refused.push(Refusal {
                    symbol: self.patched.sections[target_section].name.clone(),
                    reason:
                        "referenced by new code but has no symbol the running kernel could provide"
                            .into(),
                });
                return None;
            };
            let addend = r.addend - self.patched.symbols[named].value as i64;
            return self.named_target(named, target_section, addend);
        }
        self.named_target(r.symbol, target_section, r.addend)
    }

    fn named_target(
        &mut self,
        symbol: usize,
        section: usize,
        addend: i64,
    ) -> Option<(SymbolId, i64)> {
        let sym = &self.patched.symbols[symbol];
        // String literals (also when named by a local label such as `.LC2`)
        // are copied whole, like anonymous ones.
        let s = &self.patched.sections[section];
        if s.is_strings() || (sym.name.starts_with(".L") && !s.is_write() && !s.is_exec()) {
            let c = self.carry_range(section, 0, s.size, true);
            let out_sym = self.out.section_symbol(c.out);
            return Some((
                out_sym,
                sym.value as i64 - c.start as i64 + c.out_offset as i64 + addend,
            ));
        }
        // Part of what the package carries: point at our copy.
        if let Some(c) = self.find_carried(section, sym.value as i64) {
            let out_sym = self.out.section_symbol(c.out);
            return Some((
                out_sym,
                sym.value as i64 - c.start as i64 + c.out_offset as i64 + addend,
            ));
        }
        let is_new = self.diff.correlation.orig_name(&sym.name).is_none();
        // A message limiter of its own spares apply an often ambiguous lookup.
        let limiter = sym.is_local()
            && !self.patched.sections[section].is_exec()
            && crate::diff::is_message_limiter(&sym.name);
        let copied = crate::diff::copied_readonly(self.patched, symbol)
            || self.diff.private_copies.contains(&sym.name)
            || self.fresh.contains(&sym.name)
            || limiter;
        if is_new || copied {
            // New data (or a compiler-made constant): the package allocates it.
            let s = &self.patched.sections[section];
            let (start, end) = if self.patched.symbols_in(section).len() == 1 {
                (0, s.size)
            } else {
                (sym.value, sym.value + sym.size.max(1))
            };
            let c = self.carry_range(section, start, end, false);
            let out_sym = self.out.section_symbol(c.out);
            return Some((
                out_sym,
                sym.value as i64 - c.start as i64 + c.out_offset as i64 + addend,
            ));
        }
        let kernel_name = self
            .diff
            .correlation
            .orig_name(&sym.name)
            .unwrap_or(&sym.name)
            .to_string();
        let is_code = self.patched.sections[section].is_exec();
        let is_local = sym.is_local();
        Some((
            self.external(&kernel_name, Some(is_code), !is_local),
            addend,
        ))
    }

    /// Carry this unit's new globals whether or not its own code uses them,
    /// under a linkage name the package's other units link against.
    fn share_new_globals(&mut self) {
        let own: Vec<usize> = (0..self.patched.symbols.len())
            .filter(|&i| {
                let s = &self.patched.symbols[i];
                is_new_global(s, self.diff)
                    && self.names.shared.get(&s.name).is_some_and(|d| {
                        d.file == self.source_file && d.object == self.kernel_object
                    })
            })
            .collect();
        for symbol in own {
            let sym = self.patched.symbols[symbol].clone();
            let Some(section) = sym.section() else {
                continue;
            };
            let Some((out_sym, addend)) = self.named_target(symbol, section, 0) else {
                continue;
            };
            // The carried copy's place: a section symbol plus an offset.
            let (out, value) = match self.out.symbol(out_sym).section {
                write::SymbolSection::Section(out) => (out, addend as u64),
                _ => continue,
            };
            self.out.add_symbol(write::Symbol {
                name: shared_symbol_name(&sym.name).into_bytes(),
                value,
                size: sym.size,
                kind: if sym.is_function() {
                    object::SymbolKind::Text
                } else {
                    object::SymbolKind::Data
                },
                scope: SymbolScope::Linkage,
                weak: false,
                section: write::SymbolSection::Section(out),
                flags: SymbolFlags::None,
            });
        }
    }

    /// A reference to a new global another unit of the package defines:
    /// None when no unit does, Some(None) when it is refused.
    fn shared_reference(&mut self, name: &str) -> Option<Option<SymbolId>> {
        let home = self.names.shared.get(name)?.clone();
        if !may_use(self.kernel_object, &home.object) {
            self.refused.push(Refusal {
                symbol: name.to_string(),
                reason: format!(
                    "new in {} ({}) and used by new code of {} ({}), which can run while {} is not loaded",
                    home.file, home.object, self.source_file, self.kernel_object, home.object
                ),
            });
            return Some(None);
        }
        if let Some(&id) = self.shared_references.get(name) {
            return Some(Some(id));
        }
        let id = self.add_undefined(shared_symbol_name(name).into_bytes());
        self.shared_references.insert(name.to_string(), id);
        Some(Some(id))
    }

    /// A function the livepatch module itself defines (the shadow runtime):
    /// bound by name when the module is linked.
    fn runtime_reference(&mut self, name: &str) -> SymbolId {
        if let Some(&id) = self.shared_references.get(name) {
            return id;
        }
        let id = self.add_undefined(name.as_bytes().to_vec());
        self.shared_references.insert(name.to_string(), id);
        id
    }

    /// String literals and anonymous constants are copied whole: new code
    /// gets its own read-only copy.
    fn carry_anonymous(
        &mut self,
        section: usize,
        position: i64,
        role: SectionRole,
    ) -> Option<Carried> {
        let s = &self.patched.sections[section];
        if role != SectionRole::Data || s.is_write() {
            return None;
        }
        let anonymous = s.is_strings()
            || s.name.starts_with(".rodata.cst")
            || covering_symbol(self.patched, section, position)
                .is_none_or(|i| crate::diff::copied_readonly(self.patched, i));
        if !anonymous {
            return None;
        }
        Some(self.carry_range(section, 0, s.size, true))
    }

    /// A global undefined symbol of the extracted object, bound at link or
    /// load time.
    fn add_undefined(&mut self, name: Vec<u8>) -> SymbolId {
        self.out.add_symbol(write::Symbol {
            name,
            value: 0,
            size: 0,
            kind: object::SymbolKind::Unknown,
            scope: SymbolScope::Linkage,
            weak: false,
            section: write::SymbolSection::Undefined,
            flags: SymbolFlags::None,
        })
    }

    /// An undefined symbol for something the running kernel provides.
    /// `is_code`: None when unknown (an undefined reference).
    fn external(&mut self, kernel_name: &str, is_code: Option<bool>, global: bool) -> SymbolId {
        let defined_here = is_code.is_some();
        let key = (kernel_name.to_string(), defined_here);
        if let Some((id, _)) = self.externals.get(&key) {
            return *id;
        }
        let module_symbol = format!("__dynamos_ext_{}", self.names.next_external);
        self.names.next_external += 1;
        let id = self.add_undefined(module_symbol.as_bytes().to_vec());
        let kind = match is_code {
            Some(true) => SymbolKind::Function,
            Some(false) => SymbolKind::Data,
            None => SymbolKind::Any,
        };
        let external = ExternalSymbol {
            module_symbol,
            name: kernel_name.to_string(),
            kind,
            file: (defined_here && !global).then(|| self.source_file.to_string()),
            global,
            bound_at_build: None,
        };
        self.externals.insert(key, (id, external));
        id
    }

    /// Keep the entries of per-instruction tables that describe carried
    /// code, and drop the rest.
    fn carry_entry_tables(&mut self) {
        let tables: Vec<(usize, abi::EntryTable)> = self
            .patched
            .sections
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.abi.table(&s.name).map(|t| (i, *t)))
            .filter(|(_, t)| !(self.abi.objtool_at_link() && t.section.written_by_objtool))
            .collect();
        for (section, table) in tables {
            let size = self.patched.sections[section].size;
            let relocs = self.patched.sections[section].relocs.clone();
            let paired = table
                .paired
                .and_then(|(name, entry)| self.patched.section_by_name(name).map(|i| (i, entry)));
            let mut entry = 0;
            while entry + table.entry_size <= size {
                let owner = relocs.iter().find(|r| r.offset == entry);
                if let Some(owner) = owner {
                    if self.describes_carried(owner) {
                        self.keep_entry(section, entry, &table, &relocs);
                        if let Some((paired_section, paired_size)) = paired {
                            let index = entry / table.entry_size;
                            let start = index * paired_size;
                            self.carry_range(paired_section, start, start + paired_size, false);
                        }
                    }
                }
                entry += table.entry_size;
            }
        }
    }

    fn describes_carried(&self, owner: &Reloc) -> bool {
        let sym = &self.patched.symbols[owner.symbol];
        let Some(section) = sym.section() else {
            return false;
        };
        let position = if sym.is_section() {
            owner.addend
        } else {
            sym.value as i64 + owner.addend
        };
        self.patched.sections[section].is_exec()
            && self.find_carried(section, position).is_some()
            && !abi::is_init(&self.patched.sections[section].name)
    }

    fn keep_entry(
        &mut self,
        section: usize,
        entry: u64,
        table: &abi::EntryTable,
        relocs: &[Reloc],
    ) {
        // Alternatives: carry the replacement instructions the entry uses.
        if let Some((repl_at, len_at)) = table.replacement {
            if let (Some(repl), Some(&len)) = (
                relocs.iter().find(|r| r.offset == entry + repl_at),
                self.patched.data(section).get((entry + len_at) as usize),
            ) {
                let sym = &self.patched.symbols[repl.symbol];
                if let Some(repl_section) = sym.section() {
                    let start = (sym.value as i64 + repl.addend).max(0) as u64;
                    self.carry_range(repl_section, start, start + u64::from(len), false);
                }
            }
        }
        self.carry_range(section, entry, entry + table.entry_size, false);
    }
}
