//! Where the symbols new module code refers to live, decided at build time.
//!
//! A reference from a module's new code into that module (its statics,
//! globals of its other files) or into another module must not become an
//! address fixed at apply time: the module may be loaded later, or unloaded
//! and loaded again at another address. Those become livepatch symbols the
//! livepatch core resolves each time the module loads (`klp`). Their
//! position among same-named symbols (`sympos`) comes from the module file
//! the distribution ships, whose symbol table is what the module's kallsyms
//! will list, grouped by source file.

use crate::diff::ObjectFile;
use crate::package::{ExternalSymbol, LoadTimeSymbol};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

const STT_FILE: u8 = 4;

/// The kallsyms-visible symbols of a built module, in order, each with the
/// source file (basename) whose local it is.
#[derive(Debug, Default)]
pub struct ShippedModule {
    symbols: Vec<ModuleSymbol>,
}

#[derive(Debug)]
struct ModuleSymbol {
    name: String,
    global: bool,
    file: Option<String>,
}

impl ShippedModule {
    pub fn read(path: &Path) -> Result<ShippedModule> {
        let obj = crate::target::module_bytes(path)
            .and_then(|bytes| ObjectFile::parse(path, bytes))
            .with_context(|| format!("cannot read the module {}", path.display()))?;
        let mut file: Option<String> = None;
        let mut symbols = Vec::new();
        for s in &obj.symbols {
            if s.st_type == STT_FILE {
                file = Some(s.name.clone());
                continue;
            }
            if !in_kallsyms(&obj, s) {
                continue;
            }
            symbols.push(ModuleSymbol {
                name: s.name.clone(),
                global: !s.is_local(),
                file: if s.is_local() { file.clone() } else { None },
            });
        }
        Ok(ShippedModule { symbols })
    }

    fn defines_global(&self, name: &str) -> bool {
        self.symbols.iter().any(|s| s.global && s.name == name)
    }

    /// The livepatch `sympos` of `name`: 0 when unique, else the 1-based
    /// position of the one defined in `source_file` (a static) or the
    /// global one. Without file symbols to go by (Debian's modules have
    /// none), a static is found by its neighbours: `unit_locals`, the
    /// translation unit's own kallsyms-visible locals in order, appear in
    /// the module in the same order, so the run around `name` is matched.
    /// The error says why it cannot be told.
    pub fn sympos(
        &self,
        name: &str,
        source_file: Option<&str>,
        unit_locals: &[String],
    ) -> std::result::Result<u32, String> {
        let same: Vec<&ModuleSymbol> = self.symbols.iter().filter(|s| s.name == name).collect();
        match same.len() {
            0 => return Err("not in the module's symbol table".into()),
            1 => return Ok(0),
            _ => {}
        }
        let base = source_file.map(|f| f.rsplit('/').next().unwrap_or(f));
        let hits: Vec<usize> = same
            .iter()
            .enumerate()
            .filter(|(_, s)| match base {
                Some(b) => s.file.as_deref() == Some(b),
                None => s.global,
            })
            .map(|(i, _)| i)
            .collect();
        if let [one] = hits.as_slice() {
            return Ok(*one as u32 + 1);
        }
        if source_file.is_some() {
            if let Some(index) = self.by_neighbours(name, unit_locals) {
                let position = self.symbols[..index]
                    .iter()
                    .filter(|s| s.name == name)
                    .count();
                return Ok(position as u32 + 1);
            }
        }
        Err(format!(
            "{} symbols of this name in the module, and neither file symbols nor the neighbouring statics tell which is this file's",
            same.len()
        ))
    }

    /// Index in `symbols` of the local `name` whose neighbours are the
    /// same as in `unit_locals`, when exactly one run of locals matches.
    fn by_neighbours(&self, name: &str, unit_locals: &[String]) -> Option<usize> {
        let at = unit_locals.iter().position(|n| n == name)?;
        let from = at.saturating_sub(NEIGHBOURS);
        let to = (at + NEIGHBOURS + 1).min(unit_locals.len());
        let run = &unit_locals[from..to];
        let locals: Vec<(usize, &str)> = self
            .symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.global)
            .map(|(i, s)| (i, s.name.as_str()))
            .collect();
        let mut found = None;
        for start in 0..(locals.len() + 1).saturating_sub(run.len()) {
            let matches = run
                .iter()
                .zip(&locals[start..start + run.len()])
                .all(|(a, (_, b))| a == b);
            if matches {
                if found.is_some() {
                    return None;
                }
                found = Some(locals[start + (at - from)].0);
            }
        }
        found
    }
}

/// Statics on each side of a symbol compared to find it in a module.
const NEIGHBOURS: usize = 12;

/// Whether the module loader keeps `s` in the module's kallsyms.
fn in_kallsyms(obj: &ObjectFile, s: &crate::diff::object::Symbol) -> bool {
    let Some(section) = s.section() else {
        return false;
    };
    let sec = &obj.sections[section];
    !s.name.is_empty() && !s.is_section() && sec.is_alloc() && !sec.name.starts_with(".init.")
}

/// The kallsyms-visible local symbols of a translation unit, in order.
pub fn kallsyms_locals(obj: &ObjectFile) -> Vec<String> {
    obj.symbols
        .iter()
        .filter(|s| s.st_type != STT_FILE && s.is_local() && in_kallsyms(obj, s))
        .map(|s| s.name.clone())
        .collect()
}

/// What the build knows about the target's modules.
#[derive(Debug, Default)]
pub struct ModuleContext {
    /// The distribution's unpacked `lib/modules/<release>` (Debian targets).
    pub modules_dir: Option<std::path::PathBuf>,
    /// Modules the target does not ship, linked by the build from their
    /// pristine source (external modules): name → `.ko`
    /// ([`crate::build::BuildOutput::original_modules`]). Such a module is
    /// looked up here before the target's own.
    pub original_modules: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// Symbol → exporting object (`vmlinux` or a module), from Module.symvers.
    pub exporters: HashMap<String, String>,
    /// The target's kernel image (Debian targets), whose kallsyms tables
    /// tell the build what the running kernel's symbol table will be.
    pub vmlinuz: Option<std::path::PathBuf>,
}

impl ModuleContext {
    /// The module `name` as it runs: the one built from its pristine
    /// source for an external module, else the one the target ships, if any.
    pub fn shipped(&self, name: &str) -> Result<Option<ShippedModule>> {
        let name = name.replace('-', "_");
        if let Some(ko) = self.original_modules.get(&name) {
            return ShippedModule::read(ko).map(Some);
        }
        let Some(dir) = &self.modules_dir else {
            return Ok(None);
        };
        let Ok(files) = crate::target::module_files(dir) else {
            return Ok(None);
        };
        match files.get(&name) {
            Some(rel) => ShippedModule::read(&dir.join(rel)).map(Some),
            None => Ok(None),
        }
    }
}

/// Which module exports each symbol, from a Module.symvers.
pub fn exporters(symvers: &str) -> HashMap<String, String> {
    symvers
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_crc, name, module) = (f.next()?, f.next()?, f.next()?);
            let module = module.rsplit('/').next().unwrap_or(module);
            Some((name.to_string(), module.replace('-', "_")))
        })
        .collect()
}

/// Externals `apply` resolves, and load-time symbols by module symbol name.
pub type SplitExternals = (Vec<ExternalSymbol>, Vec<(String, LoadTimeSymbol)>);

/// Split the externals of module `object`'s new code into those `apply`
/// resolves (vmlinux symbols, fixed for the kernel's lifetime) and the
/// livepatch symbols resolved whenever their module loads.
pub fn split_externals(
    object: &str,
    externals: Vec<ExternalSymbol>,
    shipped: Option<&ShippedModule>,
    unit_locals: &[String],
    exporters: &HashMap<String, String>,
) -> std::result::Result<SplitExternals, Vec<crate::Refusal>> {
    let mut kept = Vec::new();
    let mut load_time = Vec::new();
    let mut refusals = Vec::new();
    for e in externals {
        let exporter = exporters.get(&e.name).map(String::as_str);
        let home = if e.file.is_some() || shipped.is_some_and(|m| m.defines_global(&e.name)) {
            Some(object)
        } else {
            match exporter {
                Some("vmlinux") => None,
                Some(module) => Some(module),
                // Exported by nobody: a module can only reach it inside itself.
                None if !exporters.is_empty() => Some(object),
                None => None,
            }
        };
        let Some(home) = home else {
            kept.push(e);
            continue;
        };
        let sympos = match (home == object, shipped) {
            (true, Some(m)) => m.sympos(&e.name, e.file.as_deref(), unit_locals),
            _ => Ok(0),
        };
        match sympos {
            Ok(sympos) => load_time.push((
                e.module_symbol.clone(),
                LoadTimeSymbol {
                    object: home.to_string(),
                    name: e.name.clone(),
                    sympos,
                },
            )),
            Err(reason) => refusals.push(crate::Refusal {
                symbol: format!("{object}:{}", e.name),
                reason,
            }),
        }
    }
    if refusals.is_empty() {
        Ok((kept, load_time))
    } else {
        Err(refusals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::SymbolKind;

    fn module() -> ShippedModule {
        let sym = |name: &str, global: bool, file: Option<&str>| ModuleSymbol {
            name: name.into(),
            global,
            file: file.map(String::from),
        };
        ShippedModule {
            symbols: vec![
                sym("enabled", false, Some("a.c")),
                sym("helper", false, Some("a.c")),
                sym("enabled", false, Some("b.c")),
                sym("mod_global", true, None),
            ],
        }
    }

    fn external(name: &str, file: Option<&str>) -> ExternalSymbol {
        ExternalSymbol {
            module_symbol: format!("__dynamos_ext_{name}"),
            name: name.into(),
            kind: SymbolKind::Any,
            file: file.map(String::from),
            bound_at_build: None,
            global: file.is_none(),
        }
    }

    #[test]
    fn sympos_follows_the_source_file_of_a_static() {
        let m = module();
        assert_eq!(m.sympos("helper", Some("fs/x/a.c"), &[]), Ok(0));
        assert_eq!(m.sympos("enabled", Some("fs/x/a.c"), &[]), Ok(1));
        assert_eq!(m.sympos("enabled", Some("fs/x/b.c"), &[]), Ok(2));
        assert!(m.sympos("enabled", Some("fs/x/c.c"), &[]).is_err());
        assert!(m.sympos("absent", None, &[]).is_err());
    }

    #[test]
    fn without_file_symbols_a_static_is_found_by_its_neighbours() {
        let sym = |name: &str, global: bool| ModuleSymbol {
            name: name.into(),
            global,
            file: None,
        };
        // Two files, each with `_rs.4` and `count`, in link order.
        let m = ShippedModule {
            symbols: vec![
                sym("a_show", false),
                sym("_rs.4", false),
                sym("count", false),
                sym("a_export", true),
                sym("b_store", false),
                sym("_rs.4", false),
                sym("count", false),
            ],
        };
        let b: Vec<String> = ["b_store", "_rs.4", "count"].map(String::from).to_vec();
        let a: Vec<String> = ["a_show", "_rs.4", "count"].map(String::from).to_vec();
        assert_eq!(m.sympos("_rs.4", Some("x/b.c"), &b), Ok(2));
        assert_eq!(m.sympos("count", Some("x/a.c"), &a), Ok(1));
        // Neighbours found in both places tell nothing.
        let vague: Vec<String> = ["_rs.4", "count"].map(String::from).to_vec();
        assert!(m.sympos("count", Some("x/b.c"), &vague).is_err());
    }

    #[test]
    fn module_references_become_load_time_symbols() {
        let exporters = exporters(
            "0x1\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n0x2\tjbd2_start\tfs/jbd2/jbd2\tEXPORT_SYMBOL\t\n",
        );
        let (kept, load_time) = split_externals(
            "ext4",
            vec![
                external("printk", None),
                external("enabled", Some("fs/x/b.c")),
                external("mod_global", None),
                external("jbd2_start", None),
            ],
            Some(&module()),
            &[],
            &exporters,
        )
        .unwrap();
        assert_eq!(
            kept.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["printk"]
        );
        let got: Vec<(&str, &str, u32)> = load_time
            .iter()
            .map(|(_, s)| (s.object.as_str(), s.name.as_str(), s.sympos))
            .collect();
        assert_eq!(
            got,
            [
                ("ext4", "enabled", 2),
                ("ext4", "mod_global", 0),
                ("jbd2", "jbd2_start", 0),
            ]
        );
        // Exported by nobody and absent from the module: cannot be placed.
        let refused = split_externals(
            "ext4",
            vec![external("nowhere", None)],
            Some(&module()),
            &[],
            &exporters,
        )
        .unwrap_err();
        assert_eq!(refused[0].symbol, "ext4:nowhere");
    }
}
