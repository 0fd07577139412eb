//! Build an out-of-tree (external) module's touched objects, original and
//! patched, against the target's kbuild folder.
//!
//! The user's module folder is only read: it is copied twice into a fresh
//! result folder (`orig/` as it is, `patched/` with the patched files
//! written over the copies), and each copy is built whole with
//! `make -C <kbuild> M=<copy> modules`, as the vendor builds it, with the
//! diff stage's section flags. The original copy's `.ko` files stand in
//! for the modules the target does not ship: their symbol tables are what
//! the running module's kallsyms will list.

use super::{changed_symbol_versions_in, child, kernel_object, new_result_dir, tail, BuildOutput};
use super::{ObjectPair, AUTHOR_HEADER, AUTHOR_HEADER_NAME, KCFLAGS, LOG_TAIL};
use crate::target::Target;
use crate::{Error, Refusal};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Files and folders a module folder may hold that are not its source:
/// what an earlier build left (a stale object would be taken as up to date
/// in the copy) and version control.
fn is_build_product(name: &str) -> bool {
    const NAMES: &[&str] = &[
        ".git",
        ".hg",
        ".svn",
        ".tmp_versions",
        "Module.symvers",
        "modules.order",
        "Module.markers",
    ];
    const ENDINGS: &[&str] = &[
        ".o", ".ko", ".mod", ".mod.c", ".cmd", ".a", ".dwo", ".o.d", ".symvers", ".order",
    ];
    NAMES.contains(&name) || ENDINGS.iter().any(|e| name.ends_with(e))
}

/// Source files a module folder may hold: more is not a module's source.
const MAX_FILES: usize = 20_000;

/// The source folder of an external module built with kbuild, used
/// read-only.
#[derive(Debug, Clone)]
pub struct ModuleSource {
    root: PathBuf,
}

impl ModuleSource {
    /// `dir` must be a folder with a `Kbuild` or `Makefile` that declares
    /// modules (`obj-m`, or `obj-$(CONFIG_...)`); anything else is an error.
    pub fn open(dir: &Path) -> Result<ModuleSource> {
        let input = |message: String| Error::Input {
            path: dir.to_path_buf(),
            message,
        };
        let root = dir.canonicalize().map_err(|e| {
            input(format!(
                "module source folder cannot be read: {}",
                e.to_string().to_lowercase()
            ))
        })?;
        if !root.is_dir() {
            return Err(input(
                "is not a folder; --module-src names a module's source folder".into(),
            )
            .into());
        }
        let declares_modules = ["Kbuild", "Makefile"].iter().any(|name| {
            fs::read_to_string(root.join(name)).is_ok_and(|text| {
                text.lines().any(|l| {
                    let l = l.trim_start();
                    l.starts_with("obj-m") || l.starts_with("obj-$(")
                })
            })
        });
        if !declares_modules {
            return Err(input(
                "is not an external module's source: no Kbuild or Makefile with obj-m".into(),
            )
            .into());
        }
        Ok(ModuleSource { root })
    }

    /// The folder, canonical: patches' paths are relative to it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Copy the source (not what an earlier build left) to `to`.
    fn copy_to(&self, to: &Path) -> Result<()> {
        let mut count = 0;
        copy_tree(&self.root, to, &mut count)
    }
}

fn copy_tree(from: &Path, to: &Path, count: &mut usize) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let entries = fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
        let name = entry.file_name();
        if is_build_product(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        // Links are followed: the copy holds what the build would read.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        *count += 1;
        if *count > MAX_FILES {
            bail!(
                "{} holds more than {MAX_FILES} files: not a module's source folder",
                from.display()
            );
        }
        if meta.is_dir() {
            copy_tree(&path, &to.join(&name), count)?;
        } else if meta.is_file() {
            fs::copy(&path, to.join(&name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}

/// Compile both copies of `module` and pair the objects of the touched
/// files. `kbuild_dir` is the target's headers (or prepared tree);
/// `changes` the patched files, relative to the module folder.
pub fn build(
    target: &Target,
    module: &ModuleSource,
    kbuild_dir: &Path,
    changes: &BTreeMap<PathBuf, Option<Vec<u8>>>,
) -> Result<BuildOutput> {
    let super::SortedChanges {
        sources, headers, ..
    } = super::sort_changes(changes, "module code")?;
    // objtool runs on such a kernel's linked modules, and the tables it
    // wrote for a one-object module would stop it from annotating the
    // package module's own code.
    let config = fs::read_to_string(&target.config)
        .with_context(|| format!("cannot read {}", target.config.display()))?;
    if config.lines().any(|l| l == "CONFIG_X86_KERNEL_IBT=y") {
        bail!(
            "out-of-tree modules of IBT kernels ({}) are not supported yet",
            target.release
        );
    }

    fs::create_dir_all(&target.work)
        .with_context(|| format!("cannot create {}", target.work.display()))?;
    child::stop_cleanly_on_interrupt();
    let dir = new_result_dir(&target.work)?;
    let mut output = BuildOutput {
        pairs: Vec::new(),
        ignored: Vec::new(),
        original_modules: BTreeMap::new(),
        dir: dir.clone(),
        // Not run on the copies: an IBT kernel's external modules would
        // need its objtool from the headers.
        objtool_at_link: false,
        keep: false,
    };
    let (orig, patched) = (dir.join("orig"), dir.join("patched"));
    module.copy_to(&orig)?;
    module.copy_to(&patched)?;
    for (path, content) in changes {
        if let Some(content) = content {
            let to = patched.join(path);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&to, content).with_context(|| format!("cannot write {}", to.display()))?;
        }
    }

    // `#include <dynamos.h>` (adaptation handlers, synchronized functions)
    // finds the author's header in the patched build only, as in a tree build.
    let author_include = dir.join("include");
    fs::create_dir_all(&author_include)?;
    fs::write(author_include.join(AUTHOR_HEADER_NAME), AUTHOR_HEADER)?;

    let progress = crate::report::spinner(format!(
        "compiling module source {}, original and patched",
        module.root.display()
    ));
    let (orig_run, patched_run) = std::thread::scope(|scope| {
        let toolchain = &target.toolchain;
        let first = scope.spawn(|| make_modules(toolchain, kbuild_dir, &orig, None));
        let second = make_modules(toolchain, kbuild_dir, &patched, Some(&author_include));
        (
            first
                .join()
                .unwrap_or_else(|_| Err(anyhow!("build thread panicked"))),
            second,
        )
    });
    progress.finish_and_clear();
    child::exit_if_interrupted();
    for (run, copy, which) in [
        (orig_run?, &orig, "original"),
        (patched_run?, &patched, "patched"),
    ] {
        if !run.0 {
            let summary = format!(
                "building the module source {} failed ({which} version)\n{}",
                module.root.display(),
                tail(&run.1, LOG_TAIL, &[copy, kbuild_dir])
            );
            if which == "patched" {
                return Err(super::PatchedCompileFailed {
                    summary,
                    log: run.1.clone(),
                }
                .into());
            }
            bail!(summary);
        }
    }

    let orig_modules = modules_of(&orig)?;
    let patched_modules = modules_of(&patched)?;
    if orig_modules.is_empty() {
        bail!(
            "{}: kbuild builds no module from it (empty modules.order)",
            module.root.display()
        );
    }
    // Every object of a module, relative to the copy, with its module.
    let members = |modules: &BTreeMap<String, Vec<PathBuf>>| -> BTreeMap<PathBuf, String> {
        modules
            .iter()
            .flat_map(|(name, objects)| objects.iter().map(move |o| (o.clone(), name.clone())))
            .collect()
    };
    let (orig_members, patched_members) = (members(&orig_modules), members(&patched_modules));

    let mut refusals = Vec::new();
    let mut wanted: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for source in &sources {
        let object = source.with_extension("o");
        if !orig_members.contains_key(&object) || !patched_members.contains_key(&object) {
            refusals.push(Refusal {
                symbol: source.display().to_string(),
                reason: format!(
                    "not built into any module of {} (no module's object list names {})",
                    module.root.display(),
                    object.display()
                ),
            });
            continue;
        }
        wanted.entry(object).or_default().push(source.clone());
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    // A changed header may change any object: each is compared, and those
    // that come out the same are dropped after the diff.
    if !headers.is_empty() {
        for object in orig_members.keys() {
            let touched = wanted.entry(object.clone()).or_default();
            touched.extend(headers.iter().cloned());
        }
    }

    // Other modules were built against the exports' old versions.
    for object in wanted.keys() {
        refusals.extend(changed_symbol_versions_in(&orig, &patched, object)?);
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    for (object, touched) in wanted {
        let built_into = kernel_object(&orig, &object)?;
        let patched_into = kernel_object(&patched, &object)?;
        let listed = &orig_members[&object];
        if built_into != *listed || patched_into != built_into {
            return Err(Error::refused(
                object.with_extension("c").display().to_string(),
                format!(
                    "compiled for {built_into} (patched: {patched_into}) but linked into {listed}"
                ),
            )
            .into());
        }
        output.pairs.push(ObjectPair {
            source: object.with_extension("c"),
            touched,
            kernel_object: built_into,
            original: orig.join(&object),
            patched: patched.join(&object),
            object,
        });
    }
    for name in orig_modules.keys() {
        let ko = module_file(&orig, name)?;
        output.original_modules.insert(name.clone(), ko);
    }
    Ok(output)
}

/// `make -C kbuild M=copy modules`, with `include` searched for `<...>`
/// includes too; success and the interleaved output.
fn make_modules(
    toolchain: &crate::target::toolchain::Toolchain,
    kbuild_dir: &Path,
    copy: &Path,
    include: Option<&Path>,
) -> Result<(bool, String)> {
    let mut cmd = toolchain.command("make");
    cmd.arg("-C")
        .arg(kbuild_dir)
        .arg(toolchain.make_cc())
        .arg(format!("M={}", copy.display()))
        .arg(super::jobs_arg())
        // The copy's folder (named after this process) is mapped out of
        // the debug info: both copies compile to the same bytes.
        .arg(format!(
            "KCFLAGS={KCFLAGS} -ffile-prefix-map={}/={}",
            copy.display(),
            include
                .map(|dir| format!(" -idirafter {}", dir.display()))
                .unwrap_or_default()
        ))
        .arg("modules");
    if include.is_some() {
        // The patched objects may call the package's own runtime (shadow
        // members), which no kernel exports: modpost must not fail on it.
        // Only the objects of this build are used, never its .ko.
        cmd.env("KBUILD_MODPOST_WARN", "1");
    }
    let run = super::run_make_logged(cmd, &copy.join(".dynamos-make.log"), None)?;
    Ok((run.success, run.output))
}

/// The modules kbuild linked in `copy` (`modules.order`), each with its
/// objects (from its `.mod` file), paths relative to `copy`.
fn modules_of(copy: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let order = copy.join("modules.order");
    let text = fs::read_to_string(&order)
        .with_context(|| format!("kbuild wrote no {}", order.display()))?;
    let relative = |line: &str| -> PathBuf {
        let path = Path::new(line.trim());
        path.strip_prefix(copy).unwrap_or(path).to_path_buf()
    };
    let mut modules = BTreeMap::new();
    for line in text.lines().filter(|l| l.trim().ends_with(".ko")) {
        let ko = relative(line);
        let listing = copy.join(ko.with_extension("mod"));
        let objects = fs::read_to_string(&listing)
            .with_context(|| format!("kbuild wrote no {}", listing.display()))?;
        let objects: Vec<PathBuf> = objects
            .split_whitespace()
            .filter(|w| w.ends_with(".o"))
            .map(relative)
            .collect();
        modules.insert(crate::target::module_name(&ko.to_string_lossy()), objects);
    }
    Ok(modules)
}

/// The `.ko` kbuild linked for module `name` in `copy`.
fn module_file(copy: &Path, name: &str) -> Result<PathBuf> {
    let text = fs::read_to_string(copy.join("modules.order"))?;
    text.lines()
        .map(|l| PathBuf::from(l.trim()))
        .map(|p| if p.is_absolute() { p } else { copy.join(p) })
        .find(|p| crate::target::module_name(&p.to_string_lossy()) == name && p.is_file())
        .with_context(|| format!("kbuild linked no {name}.ko in {}", copy.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_build_products_are_not_copied() {
        for name in [
            "counter.o",
            "counter.ko",
            "counter.mod",
            "counter.mod.c",
            ".counter.o.cmd",
            "modules.order",
            "Module.symvers",
            ".git",
        ] {
            assert!(is_build_product(name), "{name}");
        }
        for name in ["counter.c", "counter.h", "Kbuild", "Makefile", "README"] {
            assert!(!is_build_product(name), "{name}");
        }
    }

    #[test]
    fn a_folder_without_a_module_makefile_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.c"), "int x;\n").unwrap();
        let err = ModuleSource::open(dir.path()).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), crate::error::exit::ERROR);
        assert!(
            err.to_string().contains("no Kbuild or Makefile with obj-m"),
            "{err}"
        );
        fs::write(dir.path().join("Makefile"), "all:\n\techo hi\n").unwrap();
        assert!(ModuleSource::open(dir.path()).is_err());
        fs::write(dir.path().join("Kbuild"), "obj-m := x.o\n").unwrap();
        let source = ModuleSource::open(dir.path()).unwrap();
        assert_eq!(source.root(), dir.path().canonicalize().unwrap());
        assert!(ModuleSource::open(&dir.path().join("missing")).is_err());
        assert!(ModuleSource::open(&dir.path().join("x.c")).is_err());
    }

    #[test]
    fn modules_and_their_objects_come_from_kbuild_records() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path();
        fs::create_dir_all(copy.join("sub")).unwrap();
        fs::write(
            copy.join("modules.order"),
            format!(
                "{}/my-mod.ko\n{}/sub/other.ko\n",
                copy.display(),
                copy.display()
            ),
        )
        .unwrap();
        fs::write(
            copy.join("my-mod.mod"),
            format!("{0}/a.o {0}/b.o\n", copy.display()),
        )
        .unwrap();
        fs::write(
            copy.join("sub/other.mod"),
            format!("{}/sub/c.o\n", copy.display()),
        )
        .unwrap();
        let modules = modules_of(copy).unwrap();
        assert_eq!(
            modules["my_mod"],
            [PathBuf::from("a.o"), PathBuf::from("b.o")]
        );
        assert_eq!(modules["other"], [PathBuf::from("sub/c.o")]);
    }
}
