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
        let obj = ObjectFile::read(path)
            .with_context(|| format!("cannot read the shipped module {}", path.display()))?;
        let mut file: Option<String> = None;
        let mut symbols = Vec::new();
        for s in &obj.symbols {
            if s.st_type == STT_FILE {
                file = Some(s.name.clone());
                continue;
            }
            let Some(section) = s.section() else { continue };
            let sec = &obj.sections[section];
            // What the module loader keeps in the module's kallsyms.
            if s.name.is_empty()
                || s.is_section()
                || !sec.is_alloc()
                || sec.name.starts_with(".init.")
            {
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
    /// global one. The error says why it cannot be told.
    pub fn sympos(
        &self,
        name: &str,
        source_file: Option<&str>,
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
        match hits.as_slice() {
            [one] => Ok(*one as u32 + 1),
            _ => Err(format!(
                "{} symbols of this name in the module and its source file does not tell them apart",
                same.len()
            )),
        }
    }
}

/// What the build knows about the target's modules.
#[derive(Debug, Default)]
pub struct ModuleContext {
    /// The distribution's unpacked `lib/modules/<release>` (Debian targets).
    pub modules_dir: Option<std::path::PathBuf>,
    /// Symbol → exporting object (`vmlinux` or a module), from Module.symvers.
    pub exporters: HashMap<String, String>,
}

impl ModuleContext {
    /// The shipped module `name`, if the target has one.
    pub fn shipped(&self, name: &str) -> Result<Option<ShippedModule>> {
        let Some(dir) = &self.modules_dir else {
            return Ok(None);
        };
        let Ok(files) = crate::target::module_files(dir) else {
            return Ok(None);
        };
        match files.get(&name.replace('-', "_")) {
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
            (true, Some(m)) => m.sympos(&e.name, e.file.as_deref()),
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
            global: file.is_none(),
        }
    }

    #[test]
    fn sympos_follows_the_source_file_of_a_static() {
        let m = module();
        assert_eq!(m.sympos("helper", Some("fs/x/a.c")), Ok(0));
        assert_eq!(m.sympos("enabled", Some("fs/x/a.c")), Ok(1));
        assert_eq!(m.sympos("enabled", Some("fs/x/b.c")), Ok(2));
        assert!(m.sympos("enabled", Some("fs/x/c.c")).is_err());
        assert!(m.sympos("absent", None).is_err());
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
            &exporters,
        )
        .unwrap_err();
        assert_eq!(refused[0].symbol, "ext4:nowhere");
    }
}
