//! Kernel modules for the guest: the ones a user names and everything they
//! depend on, with a `modules.dep` so the guest's `modprobe` loads them and
//! a `modules.alias` so the kernel's own requests (`crypto-crc32c`,
//! `fs-ext4`, `char-major-10-237`) reach them.
//!
//! Debian's image package ships the modules without the files `depmod`
//! writes at install time, so dependencies are read from each module's own
//! `.modinfo`: `depends=`, and `softdep=pre:` modules, loaded first. A soft
//! dependency may name an alias (ext4's `crypto-crc32c`): it is looked up
//! in every module's aliases, and of several providers the `_generic` one
//! is taken, which runs on any CPU, else the first by name. A file system
//! module brings `loop` along, which mounting an image needs. Only these
//! modules are copied: the whole tree (~400 MB) would not fit an initramfs
//! worth booting.

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
    /// `alias PATTERN MODULE` lines of these modules, as `modules.alias`.
    pub modules_alias: String,
    /// Device nodes that load their module when opened (kmod's static
    /// nodes, from `devname:` aliases), to create in the guest's `/dev`.
    pub device_nodes: Vec<DeviceNode>,
}

/// `/dev/<name>`, a character (`'c'`) or block (`'b'`) device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub name: String,
    pub kind: char,
    pub major: u32,
    pub minor: u32,
}

/// Every module's file and `.modinfo`, read once per collection.
struct ModuleTree<'a> {
    dir: &'a Path,
    paths: HashMap<String, String>,
    infos: HashMap<String, Vec<u8>>,
    /// alias → providing modules, sorted; read only when a name needs it.
    aliases: Option<BTreeMap<String, Vec<String>>>,
}

impl ModuleTree<'_> {
    fn modinfo(&mut self, name: &str) -> Result<&[u8]> {
        if !self.infos.contains_key(name) {
            let info = modinfo(&self.dir.join(&self.paths[name]))?;
            self.infos.insert(name.to_string(), info);
        }
        Ok(&self.infos[name])
    }

    /// The module a soft dependency means: a module of that name (or its
    /// `_generic` variant), else a provider of that alias.
    fn resolve(&mut self, wanted: &str, needed_by: &str) -> Result<Option<String>> {
        let generic = format!("{wanted}_generic");
        if let Some(found) = [wanted, generic.as_str()]
            .into_iter()
            .find(|n| self.paths.contains_key(*n) && *n != needed_by)
        {
            return Ok(Some(found.to_string()));
        }
        if self.aliases.is_none() {
            let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut names: Vec<String> = self.paths.keys().cloned().collect();
            names.sort();
            for name in names {
                for alias in parse_aliases(self.modinfo(&name)?) {
                    index
                        .entry(normalize(&alias))
                        .or_default()
                        .push(name.clone());
                }
            }
            self.aliases = Some(index);
        }
        let providers = self
            .aliases
            .as_ref()
            .and_then(|index| index.get(&normalize(wanted)))
            .map(|p| p.iter().filter(|n| *n != needed_by).collect::<Vec<_>>())
            .unwrap_or_default();
        Ok(providers
            .iter()
            .find(|n| n.ends_with("_generic"))
            .or(providers.first())
            .map(|n| n.to_string()))
    }
}

/// Collect `names` (as `modprobe` takes them) and their dependencies from
/// the unpacked modules folder of a kernel image.
pub fn collect(modules_dir: &Path, names: &[String]) -> Result<GuestModules> {
    if names.is_empty() {
        return Ok(GuestModules::default());
    }
    let mut tree = ModuleTree {
        dir: modules_dir,
        paths: crate::target::module_files(modules_dir)?,
        infos: HashMap::new(),
        aliases: None,
    };
    let mut wanted: Vec<String> = names.iter().map(|n| normalize(n)).collect();
    for name in wanted.clone() {
        if !tree.paths.contains_key(&name) {
            bail!(
                "no module {name} in {} (built in, or not built by this kernel's config?)",
                modules_dir.display()
            );
        }
        let file_system = parse_aliases(tree.modinfo(&name)?)
            .iter()
            .any(|a| a.starts_with("fs-"));
        if file_system && tree.paths.contains_key("loop") && !wanted.iter().any(|w| w == "loop") {
            wanted.push("loop".to_string());
        }
    }

    // Depth-first, dependencies before the modules needing them.
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut load_order: Vec<String> = Vec::new();
    let mut visiting: Vec<String> = Vec::new();
    for name in &wanted {
        visit(name, &mut tree, &mut deps, &mut load_order, &mut visiting)?;
    }

    let paths = &tree.paths;
    let mut modules_dep = String::new();
    let mut modules_alias = String::new();
    let mut device_nodes = Vec::new();
    for name in &load_order {
        // modprobe loads a line's dependencies from the last to the first.
        let mut all = Vec::new();
        transitive(name, &deps, &mut all);
        let listed: Vec<&str> = all.iter().rev().map(|d| paths[d].as_str()).collect();
        modules_dep.push_str(&format!("{}: {}\n", paths[name], listed.join(" ")));
        let aliases = parse_aliases(&tree.infos[name]);
        for alias in &aliases {
            modules_alias.push_str(&format!("alias {alias} {name}\n"));
        }
        device_nodes.extend(device_nodes_of(&aliases));
    }
    let files = load_order
        .iter()
        .map(|n| (paths[n].clone(), modules_dir.join(&paths[n])))
        .collect();
    Ok(GuestModules {
        files,
        modules_dep,
        modules_alias,
        device_nodes,
    })
}

fn visit(
    name: &str,
    tree: &mut ModuleTree,
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
    if !tree.paths.contains_key(name) {
        bail!(
            "no module {name} in {} (built in, or not built by this kernel's config?)",
            tree.dir.display()
        );
    }
    let info = tree.modinfo(name)?.to_vec();
    let mut depends = parse_depends(&info);
    for soft in parse_softdeps(&info) {
        if let Some(found) = tree.resolve(&soft, name)? {
            if !depends.contains(&found) {
                depends.push(found);
            }
        }
    }
    visiting.push(name.to_string());
    for d in &depends {
        visit(d, tree, deps, load_order, visiting)?;
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

/// A module's `.modinfo` section, read without reading the whole file
/// unless it is compressed.
fn modinfo(path: &Path) -> Result<Vec<u8>> {
    if !path.is_file() {
        let data = crate::target::module_bytes(path)?;
        return modinfo_of(&*data, path);
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    modinfo_of(&object::ReadCache::new(file), path)
}

fn modinfo_of<'data, R: object::ReadRef<'data>>(data: R, path: &Path) -> Result<Vec<u8>> {
    let file = object::File::parse(data)
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

/// `alias=` entries, as written (`crypto-crc32c`, `block-major-7-*`).
fn parse_aliases(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"alias="))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| !a.is_empty())
        .collect()
}

/// A `devname:NAME` alias with the `char-major-A-B` or `block-major-A-B`
/// alias of the same module gives the node `/dev/NAME` (as depmod's
/// `modules.devname`); opening it makes the kernel ask for the module.
fn device_nodes_of(aliases: &[String]) -> Vec<DeviceNode> {
    let numbers: Vec<(char, u32, u32)> = aliases
        .iter()
        .filter_map(|a| {
            let (kind, rest) = if let Some(rest) = a.strip_prefix("char-major-") {
                ('c', rest)
            } else {
                ('b', a.strip_prefix("block-major-")?)
            };
            let (major, minor) = rest.split_once('-')?;
            Some((kind, major.parse().ok()?, minor.parse().ok()?))
        })
        .collect();
    let names: Vec<&str> = aliases
        .iter()
        .filter_map(|a| a.strip_prefix("devname:"))
        .collect();
    if names.len() != 1 || numbers.len() != 1 {
        return Vec::new();
    }
    let (kind, major, minor) = numbers[0];
    vec![DeviceNode {
        name: names[0].to_string(),
        kind,
        major,
        minor,
    }]
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
    fn device_nodes_come_from_devname_aliases() {
        let loop_aliases: Vec<String> = [
            "devname:loop-control",
            "char-major-10-237",
            "block-major-7-*",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        assert_eq!(
            device_nodes_of(&loop_aliases),
            vec![DeviceNode {
                name: "loop-control".into(),
                kind: 'c',
                major: 10,
                minor: 237
            }]
        );
        let info = b"alias=fs-ext4\0depends=jbd2\0alias=ext3\0";
        assert_eq!(parse_aliases(info), vec!["fs-ext4", "ext3"]);
        assert!(device_nodes_of(&["fs-ext4".to_string()]).is_empty());
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
