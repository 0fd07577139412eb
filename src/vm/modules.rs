//! Kernel modules for the guest: the ones a user names and everything they
//! depend on, with a `modules.dep` so the guest's `modprobe` loads them.
//!
//! Debian's image package ships the modules without the files `depmod`
//! writes at install time, so dependencies are read from each module's own
//! `.modinfo` (`depends=`, and `softdep=pre:` modules loaded first, as
//! libcrc32c needs a crc32c implementation: a soft dependency naming an
//! algorithm is taken as its `_generic` module). Only named modules are
//! copied: the whole tree (~400 MB) would not fit an initramfs worth
//! booting.

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Modules to place under `/lib/modules/<release>/` in the guest.
#[derive(Debug, Default)]
pub struct GuestModules {
    /// Paths relative to the modules folder, in load order (dependencies
    /// first), with the host file each comes from.
    pub files: Vec<(String, PathBuf)>,
    /// The `modules.dep` describing them.
    pub modules_dep: String,
}

/// Collect `names` (as `modprobe` takes them) and their dependencies from
/// the unpacked modules folder of a kernel image.
pub fn collect(modules_dir: &Path, names: &[String]) -> Result<GuestModules> {
    if names.is_empty() {
        return Ok(GuestModules::default());
    }
    let paths = crate::target::module_files(modules_dir)?;

    // Depth-first, dependencies before the modules needing them.
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut load_order: Vec<String> = Vec::new();
    let mut visiting: Vec<String> = Vec::new();
    for name in names {
        visit(
            &normalize(name),
            modules_dir,
            &paths,
            &mut deps,
            &mut load_order,
            &mut visiting,
        )?;
    }

    let mut modules_dep = String::new();
    for name in &load_order {
        // modprobe loads a line's dependencies from the last to the first.
        let mut all = Vec::new();
        transitive(name, &deps, &mut all);
        let listed: Vec<&str> = all.iter().rev().map(|d| paths[d].as_str()).collect();
        modules_dep.push_str(&format!("{}: {}\n", paths[name], listed.join(" ")));
    }
    let files = load_order
        .iter()
        .map(|n| (paths[n].clone(), modules_dir.join(&paths[n])))
        .collect();
    Ok(GuestModules { files, modules_dep })
}

fn visit(
    name: &str,
    modules_dir: &Path,
    paths: &HashMap<String, String>,
    deps: &mut BTreeMap<String, Vec<String>>,
    load_order: &mut Vec<String>,
    visiting: &mut Vec<String>,
) -> Result<()> {
    if deps.contains_key(name) {
        return Ok(());
    }
    if visiting.iter().any(|v| v == name) {
        bail!("module dependency cycle through {name}");
    }
    let Some(rel) = paths.get(name) else {
        bail!(
            "no module {name} in {} (built in, or not built by this kernel's config?)",
            modules_dir.display()
        );
    };
    let info = modinfo(&modules_dir.join(rel))?;
    let mut depends = parse_depends(&info);
    for soft in parse_softdeps(&info) {
        let generic = format!("{soft}_generic");
        let found = [soft.as_str(), generic.as_str()]
            .into_iter()
            .find(|n| paths.contains_key(*n) && *n != name);
        if let Some(found) = found {
            if !depends.iter().any(|d| d == found) {
                depends.push(found.to_string());
            }
        }
    }
    visiting.push(name.to_string());
    for d in &depends {
        visit(d, modules_dir, paths, deps, load_order, visiting)?;
    }
    visiting.pop();
    deps.insert(name.to_string(), depends);
    load_order.push(name.to_string());
    Ok(())
}

/// Every module `name` needs, each once, dependencies before dependents.
fn transitive(name: &str, deps: &BTreeMap<String, Vec<String>>, out: &mut Vec<String>) {
    for d in deps.get(name).into_iter().flatten() {
        if !out.contains(d) {
            transitive(d, deps, out);
            out.push(d.clone());
        }
    }
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// A module's `.modinfo` section.
fn modinfo(path: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF module", path.display()))?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let info = section
        .data()
        .with_context(|| format!("{}: unreadable .modinfo", path.display()))?;
    Ok(info.to_vec())
}

/// `softdep=pre: a b post: c` → `[a, b]`.
fn parse_softdeps(modinfo: &[u8]) -> Vec<String> {
    let mut pre = Vec::new();
    for entry in modinfo.split(|&b| b == 0) {
        let Some(list) = entry.strip_prefix(b"softdep=") else {
            continue;
        };
        let mut in_pre = false;
        for word in String::from_utf8_lossy(list).split_whitespace() {
            match word {
                "pre:" => in_pre = true,
                "post:" => in_pre = false,
                name if in_pre => pre.push(normalize(name)),
                _ => {}
            }
        }
    }
    pre
}

fn parse_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| normalize(&String::from_utf8_lossy(d)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_come_from_modinfo() {
        let info = b"license=GPL\0depends=mbcache,jbd2,crc16\0intree=Y\0";
        assert_eq!(parse_depends(info), vec!["mbcache", "jbd2", "crc16"]);
        assert!(parse_depends(b"depends=\0").is_empty());
        assert_eq!(
            crate::target::module_name("kernel/drivers/net/dummy.ko"),
            "dummy"
        );
        assert_eq!(
            crate::target::module_name("kernel/fs/nls/nls-utf8.ko"),
            "nls_utf8"
        );
    }

    #[test]
    fn soft_dependencies_loaded_first_come_from_modinfo() {
        let info = b"softdep=pre: crc32c\0depends=\0softdep=pre: a-b c post: d\0";
        assert_eq!(parse_softdeps(info), vec!["crc32c", "a_b", "c"]);
        assert!(parse_softdeps(b"softdep=post: x\0").is_empty());
    }

    #[test]
    fn transitive_dependencies_load_first() {
        let mut deps = BTreeMap::new();
        deps.insert(
            "ext4".to_string(),
            vec!["jbd2".to_string(), "crc16".to_string()],
        );
        deps.insert("jbd2".to_string(), vec!["crc32c".to_string()]);
        deps.insert("crc16".to_string(), vec![]);
        deps.insert("crc32c".to_string(), vec![]);
        let mut all = Vec::new();
        transitive("ext4", &deps, &mut all);
        assert_eq!(all, vec!["crc32c", "jbd2", "crc16"]);
    }
}
