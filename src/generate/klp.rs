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

pub fn convert(ko: &[u8], symbols: &[KlpReference]) -> Result<Vec<u8>> {
    if symbols.is_empty() {
        return Ok(ko.to_vec());
    }
    let mut builder =
        Builder::read(ko).map_err(|e| anyhow!("cannot read the built module: {e}"))?;
    let wanted: HashMap<&[u8], &KlpReference> = symbols
        .iter()
        .map(|r| (r.module_symbol.as_bytes(), r))
        .collect();

    let mut klp_objects = HashMap::new();
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
    for section in builder.sections.iter_mut() {
        let Some(target) = section.sh_info_section else {
            continue;
        };
        let SectionData::Relocation(relocs) = &mut section.data else {
            continue;
        };
        let mut kept = Vec::with_capacity(relocs.len());
        for r in relocs.drain(..) {
            match r.symbol.and_then(|id| klp_objects.get(&id.index())) {
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
            bail!(
                "an entry of {target_name} in new code of {object} refers to a symbol the livepatch core resolves only after the module loader has used that table"
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
    Ok(out)
}
