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

use crate::package::LoadTimeSymbol;
use anyhow::{anyhow, bail, Result};
use object::build::elf::{Builder, SectionData};
use object::build::Id;
use object::elf;
use std::collections::{BTreeMap, HashMap};

const SHN_LIVEPATCH: u16 = 0xff20;
const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;

/// Tables the module loader reads while loading our module, before any
/// livepatch relocation is applied: an entry there cannot use a load-time
/// symbol (the kernel's livepatch has the same restriction).
const EARLY_TABLES: &[&str] = &[
    "__jump_table",
    ".static_call_sites",
    ".altinstructions",
    ".parainstructions",
    "__ex_table",
    "__bug_table",
];

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
    for sym in builder.symbols.iter_mut() {
        let Some(reference) = wanted.get(sym.name.as_slice()) else {
            continue;
        };
        let s = &reference.symbol;
        sym.name = format!(".klp.sym.{}.{},{}", s.object, s.name, s.sympos)
            .into_bytes()
            .into();
        sym.section = None;
        sym.st_shndx = SHN_LIVEPATCH;
        sym.st_info = (elf::STB_GLOBAL << 4) | elf::STT_NOTYPE;
        sym.st_other = elf::STV_DEFAULT;
        klp_objects.insert(sym.id().index(), reference.patched.clone());
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
        if EARLY_TABLES.contains(&target_name.as_str()) {
            let used = relocs
                .first()
                .and_then(|r| r.symbol)
                .map(|id| {
                    String::from_utf8_lossy(builder.symbols.get(id).name.as_slice()).into_owned()
                })
                .unwrap_or_default();
            bail!(
                "an entry of {target_name} in new code of {object} refers to {used}, which the livepatch core resolves only after the module loader has used that table"
            );
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

#[cfg(test)]
mod tests {
    use super::*;

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
