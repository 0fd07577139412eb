//! Rewrite a built livepatch module so the livepatch core, not the module
//! loader, resolves its load-time symbols: each becomes
//! `.klp.sym.<home>.<name>,<sympos>` in section SHN_LIVEPATCH (`home`: the
//! module defining it), and the relocations using it move to
//! `.klp.rela.<patched>.<section>` sections (SHF_RELA_LIVEPATCH, and
//! SHF_ALLOC so they stay in memory). The core applies such a section only
//! for the patch's object `<patched>`, whenever that module loads, so it
//! is named after the module whose new code uses the symbol, not the one
//! defining it: nfsd's new code calling sunrpc goes in `.klp.rela.nfsd.*`
//! (sunrpc is loaded whenever nfsd is). Format:
//! Documentation/livepatch/module-elf-format.rst.
//!
//! A static call in new code through a key of the patched module itself
//! becomes a plain call of the key's trampoline (`__SCT__<name>`, a
//! load-time symbol like the others): its `.static_call_sites` entry, which
//! the module loader would read before the key is resolved, is dropped.
//! The trampoline always jumps to the call's current function.

use crate::error::Error;
use crate::package::LoadTimeSymbol;
use anyhow::{anyhow, Result};
use object::build::elf::{Builder, SectionData};
use object::build::Id;
use object::elf;
use std::collections::{BTreeMap, HashMap};

const SHN_LIVEPATCH: u16 = 0xff20;
const VMLINUX: &str = "vmlinux";
const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;

/// The module loader reads `section` while loading our module, before any
/// livepatch relocation is applied: an entry there cannot use a load-time
/// symbol (the kernel's livepatch has the same restriction).
fn read_before_livepatch_relocations(section: &str) -> bool {
    crate::target::abi::SPECIAL_SECTIONS
        .iter()
        .any(|s| s.name == section && s.read_before_livepatch_relocations)
}

/// A load-time symbol as the built module refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlpReference {
    /// The module's own undefined symbol (`__dynamos_ext_N`); the names
    /// are unique across the package, so each belongs to one object.
    pub module_symbol: String,
    /// The patched module whose new code uses it.
    pub patched: String,
    pub symbol: LoadTimeSymbol,
}

/// Key of the template's never-enabled static key, for jump labels on
/// tracepoints of the patched module.
const DORMANT_KEY: &[u8] = b"__dynamos_dormant_key";

/// The template's static call key without a function, for static call
/// sites of the patched module's tracepoints: the kernel turns those
/// calls into NOPs (they sit behind the tracepoint's dormant jump label).
const DORMANT_CALL: &[u8] = b"__dynamos_dormant_call";

/// The converted module, and what stays silent in its new code.
pub struct Converted {
    pub ko: Vec<u8>,
    /// (patched module, what) whose jump labels were made dormant: a
    /// tracepoint, or a dynamic debug print.
    pub silent: Vec<(String, String)>,
}

/// What a jump label on the key of module symbol `name` guards, when it
/// is only diagnostics (a tracepoint, a dynamic debug print) whose absence
/// from new code changes nothing else.
fn diagnostic_key(name: &str) -> Option<String> {
    if let Some(tracepoint) = name
        .strip_prefix("__tracepoint_")
        .or_else(|| name.strip_prefix("__SCK__tp_func_"))
    {
        return Some(format!("tracepoint {tracepoint}"));
    }
    // pr_debug()'s descriptors are __UNIQUE_ID_ddebugN; macros that name
    // theirs (DEFINE_DYNAMIC_DEBUG_METADATA(descriptor, ...)) give
    // `descriptor.N` statics.
    let numbered_descriptor = name
        .strip_prefix("descriptor.")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (name.starts_with("__UNIQUE_ID_ddebug") || numbered_descriptor)
        .then(|| "its dynamic debug prints".to_string())
}

pub fn convert(ko: &[u8], symbols: &[KlpReference]) -> Result<Converted> {
    let mut silent = Vec::new();
    if symbols.is_empty() {
        return Ok(Converted {
            ko: ko.to_vec(),
            silent,
        });
    }
    let mut builder =
        Builder::read(ko).map_err(|e| anyhow!("cannot read the built module: {e}"))?;
    let wanted: HashMap<&[u8], &KlpReference> = symbols
        .iter()
        .map(|r| (r.module_symbol.as_bytes(), r))
        .collect();

    let symbol_named = |name: &[u8]| {
        builder
            .symbols
            .iter()
            .find(|s| s.name.as_slice() == name)
            .map(|s| s.id())
    };
    let (dormant_key, dormant_call) = (symbol_named(DORMANT_KEY), symbol_named(DORMANT_CALL));
    let mut klp_objects = HashMap::new();
    let mut diagnostics = HashMap::new();
    let mut load_time = HashMap::new();
    let mut module_load_time = HashMap::new();
    for sym in builder.symbols.iter_mut() {
        let Some(reference) = wanted.get(sym.name.as_slice()) else {
            continue;
        };
        load_time.insert(sym.id().index(), &reference.symbol);
        let s = &reference.symbol;
        sym.name = format!(".klp.sym.{}.{},{}", s.object, s.name, s.sympos)
            .into_bytes()
            .into();
        sym.section = None;
        sym.st_shndx = SHN_LIVEPATCH;
        sym.st_info = (elf::STB_GLOBAL << 4) | elf::STT_NOTYPE;
        sym.st_other = elf::STV_DEFAULT;
        klp_objects.insert(sym.id().index(), reference.patched.clone());
        if s.object == VMLINUX {
            continue;
        }
        module_load_time.insert(sym.id().index(), s);
        if let Some(what) = diagnostic_key(&s.name) {
            diagnostics.insert(sym.id().index(), what);
        }
    }

    let symtab = builder
        .sections
        .iter()
        .find(|s| matches!(s.data, SectionData::Symbol))
        .map(|s| s.id())
        .ok_or_else(|| anyhow!("the built module has no symbol table"))?;

    // (patched object, target section) → the relocations that move.
    let mut moved: BTreeMap<(String, usize), Vec<object::build::elf::Relocation>> = BTreeMap::new();
    let mut targets = HashMap::new();
    let section_named = |name: &[u8]| {
        builder
            .sections
            .iter()
            .find(|s| s.name.as_slice() == name)
            .map(|s| s.id())
    };
    let jump_table = section_named(b"__jump_table");
    let static_call_sites = section_named(b".static_call_sites");
    let silenced_calls = silenced_call_sites(&builder, static_call_sites, &diagnostics);
    if let Some(sites) = static_call_sites {
        let direct = direct_call_sites(&builder, sites, &module_load_time, &diagnostics);
        drop_entries(&mut builder, sites, &direct, STATIC_CALL_SITE_SIZE);
    }
    for section in builder.sections.iter_mut() {
        let Some(target) = section.sh_info_section else {
            continue;
        };
        let SectionData::Relocation(relocs) = &mut section.data else {
            continue;
        };
        let mut kept = Vec::with_capacity(relocs.len());
        for mut r in relocs.drain(..) {
            // The kernel turns a silenced call site into a NOP as the
            // module loads; its target is never written.
            if silenced_calls.contains(&(target.index(), r.r_offset)) {
                continue;
            }
            let symbol = r.symbol.map(|id| id.index());
            let diagnostic = symbol.and_then(|i| diagnostics.get(&i));
            let dormant = if Some(target) == jump_table {
                dormant_key
            } else if Some(target) == static_call_sites {
                // Only a tracepoint's call; any other call must be made.
                dormant_call
                    .filter(|_| diagnostic.is_some_and(|what| what.starts_with("tracepoint ")))
            } else {
                None
            };
            if let (Some(what), Some(dormant)) = (diagnostic, dormant) {
                // The entry's key field is the key's address (8-aligned)
                // plus flags in the two low bits (branch direction; tail
                // call and init for a static call site): keep the flags.
                let object = &klp_objects[&symbol.expect("diagnostic symbol")];
                silent.push((object.clone(), what.clone()));
                r.symbol = Some(dormant);
                r.r_addend &= 3;
                kept.push(r);
                continue;
            }
            match symbol.and_then(|i| klp_objects.get(&i)) {
                Some(object) => {
                    targets.insert(target.index(), target);
                    moved
                        .entry((object.clone(), target.index()))
                        .or_default()
                        .push(r);
                }
                None => kept.push(r),
            }
        }
        *relocs = kept;
    }

    for ((object, target_index), relocs) in moved {
        let target = targets[&target_index];
        let target_name =
            String::from_utf8_lossy(builder.sections.get(target).name.as_slice()).into_owned();
        // vmlinux's livepatch relocations are applied first, as the module
        // loads; a module's only when that module loads.
        if object != VMLINUX && read_before_livepatch_relocations(&target_name) {
            let used = relocs
                .first()
                .and_then(|r| r.symbol)
                .and_then(|id| load_time.get(&id.index()))
                .map(|s| format!("{}:{}", s.object, s.name))
                .unwrap_or_default();
            return Err(Error::refused(
                used,
                format!(
                    "an entry of {target_name} in new code of {object} refers to it, which the livepatch core resolves only after the module loader has used that table"
                ),
            )
            .into());
        }
        let section = builder.sections.add();
        section.name = format!(".klp.rela.{object}.{target_name}")
            .into_bytes()
            .into();
        section.sh_type = elf::SHT_RELA;
        section.sh_flags = SHF_RELA_LIVEPATCH | u64::from(elf::SHF_ALLOC | elf::SHF_INFO_LINK);
        section.sh_link_section = Some(symtab);
        section.sh_info_section = Some(target);
        section.sh_addralign = 8;
        section.sh_entsize = 24;
        section.data = SectionData::Relocation(relocs);
    }

    let mut out = Vec::new();
    builder
        .write(&mut out)
        .map_err(|e| anyhow!("cannot write the livepatch module: {e}"))?;
    silent.sort();
    silent.dedup();
    Ok(Converted { ko: out, silent })
}

/// (section, offset of the call's target field) of every static call site
/// whose key is a patched module's tracepoint: `.static_call_sites`
/// entries are (site, key) pairs of 32-bit PC-relative fields.
fn silenced_call_sites(
    builder: &Builder,
    static_call_sites: Option<object::build::elf::SectionId>,
    diagnostics: &HashMap<usize, String>,
) -> std::collections::HashSet<(usize, u64)> {
    let mut silenced = std::collections::HashSet::new();
    let Some(sites) = static_call_sites else {
        return silenced;
    };
    for section in builder.sections.iter() {
        if section.sh_info_section != Some(sites) {
            continue;
        }
        let SectionData::Relocation(relocs) = &section.data else {
            continue;
        };
        let by_offset: HashMap<u64, &object::build::elf::Relocation> =
            relocs.iter().map(|r| (r.r_offset, r)).collect();
        for key in relocs {
            let is_tracepoint = key
                .symbol
                .and_then(|id| diagnostics.get(&id.index()))
                .is_some_and(|what| what.starts_with("tracepoint "));
            let site = key.r_offset.checked_sub(4).and_then(|o| by_offset.get(&o));
            let (true, Some(site)) = (is_tracepoint, site) else {
                continue;
            };
            let Some(site_symbol) = site.symbol.map(|id| builder.symbols.get(id)) else {
                continue;
            };
            let Some(text) = site_symbol.section else {
                continue;
            };
            // site field = text + addend - P; the call's target field is one
            // byte into the instruction.
            let place = site.r_addend + site_symbol.st_value as i64;
            if let Ok(call) = u64::try_from(place + 1) {
                silenced.insert((text.index(), call));
            }
        }
    }
    silenced
}

/// `struct static_call_site`: the call's and the key's addresses, each a
/// 32-bit PC-relative field.
const STATIC_CALL_SITE_SIZE: u64 = 8;

/// Offsets in `.static_call_sites` of the entries whose key is a load-time
/// symbol (not a tracepoint's, which is silenced) and whose call goes to
/// that key's trampoline: those calls can stay plain calls of the
/// trampoline.
fn direct_call_sites(
    builder: &Builder,
    sites: object::build::elf::SectionId,
    load_time: &HashMap<usize, &LoadTimeSymbol>,
    diagnostics: &HashMap<usize, String>,
) -> Vec<u64> {
    let load_time_name = |r: &object::build::elf::Relocation| {
        r.symbol
            .map(|id| id.index())
            .filter(|i| !diagnostics.contains_key(i))
            .and_then(|i| load_time.get(&i))
    };
    // (text section, offset) → symbol of the relocation written there.
    let mut text_relocs = HashMap::new();
    let mut site_relocs: Vec<&object::build::elf::Relocation> = Vec::new();
    for section in builder.sections.iter() {
        let (Some(target), SectionData::Relocation(relocs)) =
            (section.sh_info_section, &section.data)
        else {
            continue;
        };
        if target == sites {
            site_relocs.extend(relocs.iter());
        } else {
            for r in relocs {
                text_relocs.insert((target.index(), r.r_offset), r);
            }
        }
    }
    let by_offset: HashMap<u64, &object::build::elf::Relocation> =
        site_relocs.iter().map(|r| (r.r_offset, *r)).collect();
    let mut direct = Vec::new();
    for key in &site_relocs {
        if key.r_offset % STATIC_CALL_SITE_SIZE != 4 {
            continue;
        }
        let Some(key_symbol) = load_time_name(key) else {
            continue;
        };
        let Some(name) = key_symbol.name.strip_prefix("__SCK__") else {
            continue;
        };
        let entry = key.r_offset - 4;
        let Some(site) = by_offset.get(&entry) else {
            continue;
        };
        let Some(site_symbol) = site.symbol.map(|id| builder.symbols.get(id)) else {
            continue;
        };
        let Some(text) = site_symbol.section else {
            continue;
        };
        // The call's (or tail call's) target field is one byte into it.
        let Ok(field) = u64::try_from(site.r_addend + site_symbol.st_value as i64 + 1) else {
            continue;
        };
        let calls_trampoline = text_relocs
            .get(&(text.index(), field))
            .and_then(|r| load_time_name(r))
            .is_some_and(|t| {
                t.object == key_symbol.object && t.name.strip_prefix("__SCT__") == Some(name)
            });
        if calls_trampoline {
            direct.push(entry);
        }
    }
    direct.sort_unstable();
    direct
}

/// Remove the `size`-byte entries at `offsets` from `table`, with their
/// relocations; later entries, their relocations and symbols move down.
fn drop_entries(
    builder: &mut Builder,
    table: object::build::elf::SectionId,
    offsets: &[u64],
    size: u64,
) {
    if offsets.is_empty() {
        return;
    }
    let removed = |entry: u64| offsets.iter().any(|&o| entry >= o && entry < o + size);
    let shift = |offset: u64| size * offsets.iter().filter(|&&o| o < offset).count() as u64;
    for section in builder.sections.iter_mut() {
        if section.sh_info_section != Some(table) {
            continue;
        }
        if let SectionData::Relocation(relocs) = &mut section.data {
            relocs.retain(|r| !removed(r.r_offset));
            for r in relocs.iter_mut() {
                r.r_offset -= shift(r.r_offset);
            }
        }
    }
    for sym in builder.symbols.iter_mut() {
        if sym.section == Some(table) {
            sym.st_value -= shift(sym.st_value);
        }
    }
    if let SectionData::Data(data) = &mut builder.sections.get_mut(table).data {
        let bytes = data.to_mut();
        for &o in offsets.iter().rev() {
            let (start, end) = (o as usize, (o + size) as usize);
            if end <= bytes.len() {
                bytes.drain(start..end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::{Object as _, ObjectSection as _};
    use object::write::{Object, Relocation, Symbol, SymbolSection};
    use object::{
        Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags,
        SymbolKind, SymbolScope,
    };

    /// A module whose text calls `first_call` at 0 and `__dynamos_ext_other`
    /// at 5, with two static call sites: (0, kvm's key `name`) and (5, a
    /// vmlinux key).
    fn module_with_static_calls(first_call: &str) -> Vec<u8> {
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = obj.add_section(vec![], b".text.f".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &[0xe8, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0xc3], 16);
        let sites = obj.add_section(vec![], b".static_call_sites".to_vec(), SectionKind::Data);
        obj.append_section_data(sites, &[0; 16], 8);
        let mut undefined = |name: &str| {
            obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: 0,
                size: 0,
                kind: SymbolKind::Unknown,
                scope: SymbolScope::Dynamic,
                weak: false,
                section: SymbolSection::Undefined,
                flags: SymbolFlags::None,
            })
        };
        let (call, other) = (undefined(first_call), undefined("__dynamos_ext_other"));
        let (key, vmlinux_key) = (undefined("__dynamos_ext_key"), undefined("__SCK__vm"));
        let text_symbol = obj.section_symbol(text);
        let mut reloc = |section, offset, symbol, addend, r_type| {
            obj.add_relocation(
                section,
                Relocation {
                    offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type },
                },
            )
            .unwrap()
        };
        reloc(text, 1, call, -4, elf::R_X86_64_PLT32);
        reloc(text, 6, other, -4, elf::R_X86_64_PLT32);
        reloc(sites, 0, text_symbol, 0, elf::R_X86_64_PC32);
        reloc(sites, 4, key, 0, elf::R_X86_64_PC32);
        reloc(sites, 8, text_symbol, 5, elf::R_X86_64_PC32);
        reloc(sites, 12, vmlinux_key, 0, elf::R_X86_64_PC32);
        obj.write().unwrap()
    }

    fn kvm_symbol(module_symbol: &str, name: &str) -> KlpReference {
        KlpReference {
            module_symbol: module_symbol.into(),
            patched: "kvm".into(),
            symbol: LoadTimeSymbol {
                object: "kvm".into(),
                name: name.into(),
                sympos: 0,
            },
        }
    }

    fn references() -> Vec<KlpReference> {
        vec![
            kvm_symbol("__dynamos_ext_tramp", "__SCT__kvm_x86_get_exit_info"),
            kvm_symbol("__dynamos_ext_key", "__SCK__kvm_x86_get_exit_info"),
            kvm_symbol("__dynamos_ext_other", "kvm_other"),
        ]
    }

    #[test]
    fn a_static_call_through_a_module_key_calls_its_trampoline() {
        let ko = module_with_static_calls("__dynamos_ext_tramp");
        let converted = convert(&ko, &references()).unwrap();
        let file = object::File::parse(converted.ko.as_slice()).unwrap();
        let sites = file.section_by_name(".static_call_sites").unwrap();
        // Only the vmlinux key's entry is left, moved to the front.
        assert_eq!(sites.size(), 8);
        let left: Vec<(u64, String)> = sites
            .relocations()
            .map(|(offset, r)| {
                let name = match r.target() {
                    object::RelocationTarget::Symbol(i) => {
                        object::read::ObjectSymbol::name(&file.symbol_by_index(i).unwrap())
                            .unwrap()
                            .to_string()
                    }
                    _ => String::new(),
                };
                (offset, name)
            })
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].0, 0);
        assert_eq!(left[1], (4, "__SCK__vm".to_string()));
        // Both calls are livepatch relocations of kvm's object.
        let klp = file.section_by_name(".klp.rela.kvm..text.f").unwrap();
        assert_eq!(klp.size(), 2 * 24);
    }

    /// vmlinux's livepatch relocations are applied as the module loads,
    /// before its static call sites are read: a vmlinux key bound at build
    /// (a signed module) keeps its site.
    #[test]
    fn a_vmlinux_key_bound_at_build_keeps_its_static_call_site() {
        let ko = module_with_static_calls("__dynamos_ext_tramp");
        let vmlinux = |module_symbol: &str, name: &str| KlpReference {
            module_symbol: module_symbol.into(),
            patched: "vmlinux".into(),
            symbol: LoadTimeSymbol {
                object: "vmlinux".into(),
                name: name.into(),
                sympos: 0,
            },
        };
        // The vmlinux site's call goes to its key's trampoline: only a
        // module's site is made a plain call, never vmlinux's.
        let mut symbols = references();
        symbols.retain(|r| r.module_symbol != "__dynamos_ext_other");
        symbols.push(vmlinux("__dynamos_ext_other", "__SCT__vm"));
        symbols.push(vmlinux("__SCK__vm", "__SCK__vm"));
        let converted = convert(&ko, &symbols).unwrap();
        let file = object::File::parse(converted.ko.as_slice()).unwrap();
        assert_eq!(
            file.section_by_name(".static_call_sites").unwrap().size(),
            8
        );
        let moved = file
            .section_by_name(".klp.rela.vmlinux..static_call_sites")
            .unwrap();
        assert_eq!(moved.size(), 24);
        assert!(file
            .symbols()
            .any(|s| object::read::ObjectSymbol::name(&s) == Ok(".klp.sym.vmlinux.__SCK__vm,0")));
    }

    #[test]
    fn a_module_key_whose_call_is_not_its_trampoline_is_refused() {
        let ko = module_with_static_calls("__dynamos_ext_other");
        let Err(err) = convert(&ko, &references()) else {
            panic!("converted");
        };
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = format!("{err:#}");
        assert!(
            text.contains("kvm:__SCK__kvm_x86_get_exit_info")
                && text.contains(".static_call_sites"),
            "{text}"
        );
    }

    #[test]
    fn only_tracepoint_and_dynamic_debug_keys_are_diagnostics() {
        assert_eq!(
            diagnostic_key("__tracepoint_ext4_mballoc_alloc").as_deref(),
            Some("tracepoint ext4_mballoc_alloc")
        );
        assert!(diagnostic_key("__UNIQUE_ID_ddebug271.2").is_some());
        assert!(diagnostic_key("descriptor.176").is_some());
        assert_eq!(
            diagnostic_key("__SCK__tp_func_9p_fid_ref").as_deref(),
            Some("tracepoint 9p_fid_ref")
        );
        assert!(diagnostic_key("__SCK__might_resched").is_none());
        assert!(diagnostic_key("descriptor").is_none());
        assert!(diagnostic_key("descriptor.x1").is_none());
        // A module's own static key guards behaviour, not diagnostics.
        assert!(diagnostic_key("mlx5_fs_enabled").is_none());
        assert!(diagnostic_key("tracepoint_key").is_none());
    }
}
