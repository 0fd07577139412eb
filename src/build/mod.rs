//! Build the original and the patched version of only the translation units
//! a patch touches, with the target's own kbuild and config.
//!
//! Two out-of-tree (`O=`) folders live in the target's work cache:
//! `orig`, built from the pristine source, and `patched`, built from `src`,
//! a farm of hard links (or symlinks across file systems) mirroring the
//! pristine tree. Patched files are written into the farm by renaming a
//! temporary file over the link, so the pristine file behind it is never
//! written; they are put back after the build, and a journal makes sure an
//! interrupted build is undone by the next one.
//!
//! Staleness: make decides by mtime, and a restored link carries the
//! pristine (old) mtime, which can be older than an object built from the
//! patched version. So the touched objects (and their `.cmd` records) in
//! `patched` are always deleted before a build. A patched header is
//! restored as a fresh copy instead, whose new mtime makes everything
//! built from it out of date; every translation unit including it is
//! rebuilt in both trees ([`includers`]).
//! The `orig` tree is built from sources that never change, so its
//! objects stay valid once built.
//!
//! kbuild compiles any C file named on its command line, so whether the
//! config builds a file, and into vmlinux or a module, is read from
//! kbuild's own makefiles for every folder on the way to it.

mod child;
mod classify;
mod diagnostics;
pub mod external;
mod farm;
mod includers;
mod make;

pub(crate) use classify::{sort_changes, SortedChanges};
use diagnostics::*;
use farm::*;
use make::MAKE_ENV_REMOVE;
pub use make::{cores, share_cores_among};
pub(crate) use make::{jobs_arg, run_make_logged, MakeRun};

use crate::cache::{self, Lock};
use crate::target::Target;
use crate::{Error, Refusal};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

/// Flags every object is compiled with, so that each function and data
/// object gets its own section for the diff stage to compare.
const KCFLAGS: &str = "-ffunction-sections -fdata-sections";

/// Compiler flags for a tree: [`KCFLAGS`], plus path maps so the source
/// and output folders do not end up in the objects (debug info). kbuild
/// already maps `__FILE__`; with this, the same source compiles to the
/// same bytes in both trees and only real changes show up.
fn kcflags(source: &Path, out: &Path) -> String {
    format!(
        "{KCFLAGS} -ffile-prefix-map={}/= -ffile-prefix-map={}=.",
        source.display(),
        out.display()
    )
}

/// The header patch authors include for adaptation handlers.
/// `templates/dynamos.h`: the patch author's macros, also included by the
/// generated module for what it shares with transitional clones.
pub const AUTHOR_HEADER: &str = include_str!("../../templates/dynamos.h");
const AUTHOR_HEADER_NAME: &str = "dynamos.h";

/// Lines of make's output shown when a build fails.
const LOG_TAIL: usize = 30;

/// One touched translation unit, compiled before and after the patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPair {
    /// Source file compiled, relative to the tree root, e.g. `fs/proc/version.c`.
    pub source: PathBuf,
    /// The patched files that go into this object: `source` itself and/or
    /// files it `#include`s (e.g. `kernel/sched/rt.c` for
    /// `kernel/sched/build_policy.c`).
    pub touched: Vec<PathBuf>,
    /// Object relative to the tree root, e.g. `fs/proc/version.o`.
    pub object: PathBuf,
    /// `vmlinux` for built-in code, else the module name as the kernel
    /// knows it (`KBUILD_MODNAME`, with underscores).
    pub kernel_object: String,
    /// Absolute path of the object built from the pristine source.
    pub original: PathBuf,
    /// Absolute path of the object built with the patch applied.
    pub patched: PathBuf,
}

/// The patched version did not compile: what the user is shown, and make's
/// whole output, in which the shadow stage finds the accesses to members
/// the patch adds.
#[derive(Debug, thiserror::Error)]
#[error("{summary}")]
pub struct PatchedCompileFailed {
    pub summary: String,
    pub log: String,
}

/// What [`build`] produced.
///
/// The object files are copies in `dir`, a fresh folder owned by this
/// value: later builds never touch it, and it is deleted when the value is
/// dropped (call [`BuildOutput::keep`] to keep it).
#[derive(Debug)]
pub struct BuildOutput {
    pub pairs: Vec<ObjectPair>,
    /// Touched files that do not go into the kernel (documentation, tools…).
    pub ignored: Vec<PathBuf>,
    /// Modules the target does not ship, linked here from their pristine
    /// source (external modules): name as the kernel knows it → `.ko`.
    /// They stand in for the shipped module wherever the build needs the
    /// running module's symbol table.
    pub original_modules: BTreeMap<String, PathBuf>,
    /// Folder holding `orig/…` and `patched/…` copies of the objects.
    pub dir: PathBuf,
    /// The target runs objtool on linked objects, not on each one; the
    /// copies were run through it as kbuild would at link.
    pub objtool_at_link: bool,
    keep: bool,
}

impl BuildOutput {
    /// Leave `dir` in place when this value is dropped; the caller then owns it.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.dir.clone()
    }
}

impl Drop for BuildOutput {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Compile the original and patched versions of every touched C file.
///
/// `changes` maps paths relative to the tree root to their new content
/// (`None` = deleted), as [`crate::patch::apply_all`] returns them.
/// Refuses ([`Error::Refused`]) headers, build-system and assembly changes
/// and files this kernel config does not compile; returns
/// [`Error::NoChange`] when nothing touched is kernel code.
pub fn build(target: &Target, changes: &BTreeMap<PathBuf, Option<Vec<u8>>>) -> Result<BuildOutput> {
    let SortedChanges {
        sources,
        headers,
        ignored,
    } = sort_changes(changes, "kernel code")?;

    fs::create_dir_all(&target.work)
        .with_context(|| format!("cannot create {}", target.work.display()))?;
    // One build at a time per target: the farm and the O= folders are shared.
    let lock = Lock::acquire(&target.work.join(".build.lock"))?;
    child::stop_cleanly_on_interrupt();
    let trees = Trees::new(target, &lock);
    trees.prepare()?;
    trees.sync_farm()?;
    trees.recover()?;

    // kbuild compiles any C file asked for by name, whether or not the
    // config selects it: ask kbuild's own makefiles what this config builds.
    // A file not built on its own may be #included by one that is (as
    // kernel/sched/build_policy.c includes rt.c): that one is compiled.
    let mut units: Vec<Unit> = Vec::new();
    let mut refusals = Vec::new();
    for source in &sources {
        let mut unit_source = source.clone();
        let mut membership = trees.built_by_config(&source.with_extension("o"))?;
        if membership.is_none() {
            if let Some(includer) = trees.including_file(source) {
                membership = trees.built_by_config(&includer.with_extension("o"))?;
                unit_source = includer;
            }
        }
        let Some(Built {
            in_module,
            in_library,
            kbuild_object,
        }) = membership
        else {
            let reason = if unit_source == *source {
                "not built by this kernel config".to_string()
            } else {
                format!(
                    "not built by this kernel config (nor is {}, which #includes it)",
                    unit_source.display()
                )
            };
            refusals.push(Refusal {
                symbol: source.display().to_string(),
                reason,
            });
            continue;
        };
        match units.iter_mut().find(|u| u.source == unit_source) {
            Some(unit) => {
                if !unit.touched.contains(source) {
                    unit.touched.push(source.clone());
                }
            }
            None => units.push(Unit {
                object: kbuild_object,
                source: unit_source,
                in_module,
                in_library,
                touched: vec![source.clone()],
            }),
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    if !headers.is_empty() {
        add_header_includers(&trees, &headers, &mut units)?;
    }
    if units.is_empty() {
        for header in &headers {
            crate::report::note(format!(
                "{}: no file this kernel config compiles includes it",
                header.display()
            ));
        }
        return Err(Error::NoChange.into());
    }
    let objects: Vec<PathBuf> = units.iter().map(|u| u.object.clone()).collect();
    let written: Vec<PathBuf> = sources.iter().chain(&headers).cloned().collect();
    trees.provide_author_header()?;

    // In the patched tree a restored file keeps its old pristine mtime,
    // which may be older than an object built from a patched version:
    // those objects must go. The original tree's sources never change and
    // kbuild rebuilds when the command line does, so its objects are left
    // to make's judgement (or reused outright for an immutable source).
    for object in &objects {
        remove_object(&trees.patched, object)?;
    }
    let orig_needed: Vec<PathBuf> = objects
        .iter()
        .filter(|o| !(trees.immutable_source && trees.orig_is_built(o)))
        .cloned()
        .collect();

    let progress = crate::report::spinner(format!(
        "compiling {} file(s), original and patched",
        objects.len()
    ));
    let started = Instant::now();
    let results = {
        let worktree = Worktree::apply(&trees, &written, changes)?;
        let results = std::thread::scope(|scope| {
            let orig = scope.spawn(|| trees.make(&trees.source, &trees.orig, &orig_needed));
            let patched = trees.make(&trees.src, &trees.patched, &objects);
            let orig = orig
                .join()
                .unwrap_or_else(|_| Err(anyhow!("build thread panicked")));
            (orig, patched)
        });
        worktree.restore()?;
        child::exit_if_interrupted();
        results
    };
    progress.finish_and_clear();
    let (orig, patched) = (results.0?, results.1?);

    // A file kbuild has no rule for (e.g. one the patch creates without a
    // makefile change) is not compiled by this config either.
    let mut refusals = Vec::new();
    for unit in &units {
        if no_rule_for(&orig.output, &unit.object) || no_rule_for(&patched.output, &unit.object) {
            refusals.push(Refusal {
                symbol: unit.source.display().to_string(),
                reason: "not built by this kernel config (kbuild has no rule for it)".into(),
            });
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    for (run, which) in [(&orig, "original"), (&patched, "patched")] {
        if !run.success {
            let failed = failed_source(&run.output, &written)
                .map(|s| format!("{} failed to compile", s.display()))
                .or_else(|| {
                    // A file that includes a patched header.
                    first_error_file(&run.output, &[&trees.src, &trees.source])
                        .map(|f| format!("{f} failed to compile with {}", join(&written)))
                })
                .unwrap_or_else(|| format!("building {} failed", join(&written)));
            let hint = missing_tool_hint(&run.output)
                .map(|h| format!("\n{h}"))
                .unwrap_or_default();
            let summary = format!(
                "{failed} ({which} version){hint}\n{}",
                tail(&run.output, LOG_TAIL, &[&trees.src, &trees.source])
            );
            if which == "patched" {
                return Err(PatchedCompileFailed {
                    summary,
                    log: run.output.clone(),
                }
                .into());
            }
            bail!(summary);
        }
    }

    let dir = new_result_dir(&target.work)?;
    let objtool_at_link = trees.kbuild_dir(".", trees.srcarch()?)?.objtool_at_link;
    let mut output = BuildOutput {
        pairs: Vec::new(),
        ignored,
        original_modules: BTreeMap::new(),
        dir: dir.clone(),
        objtool_at_link: !objtool_at_link.is_empty(),
        keep: false,
    };
    let mut refusals = Vec::new();
    for unit in &units {
        refusals.extend(changed_symbol_versions(&trees, &unit.object)?);
        if unit.in_library {
            refusals.extend(unlinked_library_member(target, &trees, unit)?);
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    for unit in units {
        let (source, object, in_module) = (&unit.source, &unit.object, unit.in_module);
        let built_into = kernel_object(&trees.orig, object)?;
        let patched_into = kernel_object(&trees.patched, object)?;
        if built_into != patched_into {
            // The running kernel keeps the object the code was linked into.
            return Err(Error::refused(
                source.display().to_string(),
                format!("the patch moves this code from {built_into} to {patched_into}"),
            )
            .into());
        }
        if in_module != (built_into != "vmlinux") {
            bail!(
                "{}: cannot tell whether it is module or built-in code (compiled for {built_into}, listed as {} by kbuild)",
                source.display(),
                if in_module { "module code" } else { "built-in code" }
            );
        }
        // A composite module's part may be named through another folder
        // (`amdgpu/../display/...`); the copies and the report use the plain path.
        let plain = includers::normalize(object).unwrap_or_else(|| object.clone());
        let copy = |tree: &Path, side: &str| -> Result<PathBuf> {
            let from = tree.join(object);
            let to = dir.join(side).join(&plain);
            fs::create_dir_all(to.parent().expect("object has a folder"))?;
            fs::copy(&from, &to)
                .with_context(|| format!("make produced no {} ({side} version)", from.display()))?;
            Ok(to)
        };
        let original = copy(&trees.orig, "orig")?;
        let patched = copy(&trees.patched, "patched")?;
        if !objtool_at_link.is_empty() {
            for object in [&original, &patched] {
                trees.annotate(object, &objtool_at_link, in_module)?;
            }
        }
        output.pairs.push(ObjectPair {
            source: source.clone(),
            object: plain,
            touched: unit.touched,
            kernel_object: built_into,
            original,
            patched,
        });
    }
    verbose(format_args!(
        "compiled {} file(s) twice in {:.1?}",
        output.pairs.len(),
        started.elapsed()
    ));
    Ok(output)
}

/// Source files a header change may rebuild; more is refused, naming the
/// header (a change to `include/linux/fs.h` reaches most of the kernel).
const MAX_HEADER_INCLUDERS: usize = 200;

/// Add every translation unit this config compiles that includes one of
/// `headers` to `units`. Includers the config does not build are left out
/// without a word: their code is not in this kernel.
fn add_header_includers(trees: &Trees, headers: &[PathBuf], units: &mut Vec<Unit>) -> Result<()> {
    let srcarch = trees.srcarch()?;
    let progress =
        crate::report::spinner(format!("finding the files that include {}", join(headers)));
    let generated = format!("arch/{srcarch}/include/generated");
    let index = includers::IncludeIndex::scan(
        &trees.source,
        srcarch,
        &[(trees.orig.join(&generated), PathBuf::from(&generated))],
    );
    progress.finish_and_clear();
    let index = index?;
    let mut refusals = Vec::new();
    for header in headers {
        let c_files = match index
            .c_files_including(std::slice::from_ref(header), MAX_HEADER_INCLUDERS)
        {
            Ok(files) => files,
            Err(too_many) => {
                refusals.push(Refusal {
                    symbol: header.display().to_string(),
                    reason: format!(
                        "more than {} source files include it; a live update rebuilds at most that many (change the .c files that need it instead)",
                        too_many.limit
                    ),
                });
                continue;
            }
        };
        for c_file in c_files {
            if let Some(unit) = units.iter_mut().find(|u| u.source == c_file) {
                if !unit.touched.contains(header) {
                    unit.touched.push(header.clone());
                }
                continue;
            }
            let object = c_file.with_extension("o");
            let Some(Built {
                in_module,
                in_library,
                kbuild_object,
            }) = trees.built_by_config(&object)?
            else {
                continue;
            };
            units.push(Unit {
                object: kbuild_object,
                source: c_file,
                in_module,
                in_library,
                touched: vec![header.clone()],
            });
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    verbose(format_args!(
        "{} translation unit(s) include {} ({} files indexed)",
        units.len(),
        join(headers),
        index.indexed_files()
    ));
    Ok(())
}

/// One translation unit to compile and the touched files that go into it.
struct Unit {
    source: PathBuf,
    object: PathBuf,
    in_module: bool,
    in_library: bool,
    touched: Vec<PathBuf>,
}

/// Marks a configured O= folder; written last, so a folder without it is redone.
const STAMP: &str = ".dynamos-configured";

/// Timings for whoever tunes the build (`DYNAMOS_VERBOSE=1`).
/// A kbuild folder to build external modules against, for a target that
/// has no headers package (a user's own tree): the configured original
/// tree after `make modules_prepare`, done once.
pub fn module_build_dir(target: &Target) -> Result<PathBuf> {
    fs::create_dir_all(&target.work)
        .with_context(|| format!("cannot create {}", target.work.display()))?;
    let lock = Lock::acquire(&target.work.join(".build.lock"))?;
    let trees = Trees::new(target, &lock);
    trees.prepare()?;
    // modpost takes the exported symbols' versions from the tree's
    // Module.symvers; refreshed each time so a new --symvers counts.
    if let Some(symvers) = &target.symvers {
        fs::copy(symvers, trees.orig.join("Module.symvers"))
            .with_context(|| format!("cannot copy {}", symvers.display()))?;
    }
    let stamp = trees.orig.join(".dynamos-modules-prepared");
    if !stamp.exists() {
        let progress =
            crate::report::spinner("preparing the original tree for module builds".into());
        let jobs = jobs_arg();
        let run = trees.run_make(&trees.source, &trees.orig, &[&jobs, "modules_prepare"]);
        progress.finish_and_clear();
        let run = run?;
        if !run.success {
            bail!(
                "`make modules_prepare` failed in {}:\n{}",
                trees.orig.display(),
                tail(&run.output, 30, &[&trees.source, &trees.orig])
            );
        }
        fs::write(&stamp, b"")?;
    }
    Ok(trees.orig)
}

fn verbose(message: std::fmt::Arguments) {
    if std::env::var_os("DYNAMOS_VERBOSE").is_some() {
        eprintln!("{message}");
    }
}

fn join(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh folder for one build's objects. Folders left by processes that
/// died before dropping their [`BuildOutput`] are cleared on the way.
fn new_result_dir(work: &Path) -> Result<PathBuf> {
    let results = work.join("results");
    if let Ok(entries) = fs::read_dir(&results) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = work
        .join("results")
        .join(format!("{}-{stamp}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// Delete an object and kbuild's record of how it was built.
fn remove_object(tree: &Path, object: &Path) -> Result<()> {
    let o = tree.join(object);
    for path in [o.clone(), cmd_file(&o)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    Ok(())
}

/// `dir/file.o` → `dir/.file.o.cmd`.
fn cmd_file(object: &Path) -> PathBuf {
    let name = object
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    object.with_file_name(format!(".{name}.cmd"))
}

/// `vmlinux` or the module an object was compiled for, from the command
/// line kbuild recorded: module code is compiled with `-DMODULE` and
/// `-DKBUILD_MODNAME='"name"'`.
fn kernel_object(tree: &Path, object: &Path) -> Result<String> {
    let cmd = cmd_file(&tree.join(object));
    let text =
        fs::read_to_string(&cmd).with_context(|| format!("cannot read {}", cmd.display()))?;
    let line = text
        .lines()
        // `savedcmd_` since Linux 6.2.
        .find(|l| l.starts_with("cmd_") || l.starts_with("savedcmd_"))
        .with_context(|| format!("{} has no command line", cmd.display()))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    if !words.contains(&"-DMODULE") {
        return Ok("vmlinux".into());
    }
    words
        .iter()
        .find_map(|w| w.strip_prefix("-DKBUILD_MODNAME="))
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{}: module object without KBUILD_MODNAME", cmd.display()))
}

/// Exported symbols of `object` whose version (the MODVERSIONS CRC of
/// their C interface, recorded by kbuild as `#SYMVER name crc` lines in the
/// `.cmd` file) differs between the trees. Modules built for the running
/// kernel were checked against the old CRC and call the old interface, so
/// such a change cannot go live; it is refused naming the symbol.
fn changed_symbol_versions(trees: &Trees, object: &Path) -> Result<Vec<Refusal>> {
    changed_symbol_versions_in(&trees.orig, &trees.patched, object)
}

/// [`changed_symbol_versions`] of `object` built in the folders `orig`
/// and `patched`.
fn changed_symbol_versions_in(orig: &Path, patched: &Path, object: &Path) -> Result<Vec<Refusal>> {
    let versions = |tree: &Path| -> Result<BTreeMap<String, String>> {
        let cmd = cmd_file(&tree.join(object));
        let text =
            fs::read_to_string(&cmd).with_context(|| format!("cannot read {}", cmd.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("#SYMVER "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, crc)| (name.to_string(), crc.trim().to_string()))
            .collect())
    };
    let (old, new) = (versions(orig)?, versions(patched)?);
    Ok(old
        .iter()
        .filter_map(|(name, crc)| {
            let changed = new.get(name).filter(|c| *c != crc)?;
            Some(Refusal {
                symbol: name.clone(),
                reason: format!(
                    "exported symbol version changes ({crc} -> {changed}): modules of the running kernel use the old interface ({})",
                    includers::normalize(object).unwrap_or_else(|| object.to_path_buf()).with_extension("c").display()
                ),
            })
        })
        .collect())
}

/// A `lib.a` member (`lib-y`) this vmlinux did not link. With
/// `CONFIG_MODULES` kbuild links every member whole, for modules to use;
/// without it the linker takes only members something references, which
/// the target's `System.map` tells (the image's, or the one beside
/// `--symvers` in a build folder). Without a map this cannot be checked.
fn unlinked_library_member(target: &Target, trees: &Trees, unit: &Unit) -> Result<Option<Refusal>> {
    let config = fs::read_to_string(&trees.config)
        .with_context(|| format!("cannot read {}", trees.config.display()))?;
    if config.lines().any(|l| l == "CONFIG_MODULES=y") {
        return Ok(None);
    }
    let map = target.system_map()?;
    let Some(map) = map.and_then(|m| fs::read_to_string(m).ok()) else {
        crate::report::note(format!(
            "{} is a member of lib.a, which this config links only where referenced; without the kernel's System.map it is not checked that this vmlinux has it",
            unit.source.display()
        ));
        return Ok(None);
    };
    let object_path = trees.orig.join(&unit.object);
    let data =
        fs::read(&object_path).with_context(|| format!("cannot read {}", object_path.display()))?;
    let functions = global_functions(&data)
        .with_context(|| format!("cannot read the symbols of {}", object_path.display()))?;
    let linked: std::collections::HashSet<&str> = map
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    if functions.is_empty() || functions.iter().any(|f| linked.contains(f.as_str())) {
        return Ok(None);
    }
    Ok(Some(Refusal {
        symbol: unit.source.display().to_string(),
        reason: "a member of lib.a that this vmlinux did not link (nothing in it references its functions), so there is no running code to replace".into(),
    }))
}

/// Names of the global functions an object defines.
fn global_functions(data: &[u8]) -> Result<Vec<String>> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let file = object::File::parse(data)?;
    Ok(file
        .symbols()
        .filter(|s| s.is_global() && s.is_definition() && s.kind() == SymbolKind::Text)
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect())
}

/// Makefile run in a configured O= folder that reads one folder's kbuild
/// makefile the way `scripts/Makefile.build` does and prints what it
/// builds for this config: subfolders descended into, built-in objects,
/// members of the folder's `lib.a` (`lib-y`) and module objects, composite
/// objects expanded.
const LIST_MK: &str = r#"# Written by dynamos: lists what kbuild builds in $(obj).
src := $(obj)
obj-y :=
obj-m :=
lib-y :=
lib-m :=
always-y :=
always-m :=
targets :=
subdir-y :=
subdir-m :=
-include include/config/auto.conf
ifeq ($(SRCARCH),x86)
BITS := $(if $(CONFIG_X86_32),32,64)
endif
include $(srctree)/scripts/Kbuild.include
include $(srctree)/scripts/Makefile.compiler
# The top-level Makefile hands its libs-y (lib/) to Kbuild as ARCH_LIB.
ARCH_LIB := lib/
kbuild-dir := $(if $(filter /%,$(src)),$(src),$(srctree)/$(src))
include $(or $(wildcard $(kbuild-dir)/Kbuild),$(kbuild-dir)/Makefile)
include $(srctree)/scripts/Makefile.lib
dynamos-list:
	@echo 'dirs: $(subdir-ym)'
	@echo 'y: $(real-obj-y)'
	@echo 'lib: $(lib-y)'
	@echo 'm: $(real-obj-m)'
	@echo 'objtool-at-link: $(if $(delay-objtool),$(objtool-args-y))'
"#;

/// One folder's objects for this config, paths relative to the tree root.
#[derive(Debug, Default, Clone)]
struct KbuildDir {
    dirs: Vec<PathBuf>,
    builtin: Vec<PathBuf>,
    /// `lib-y`: archived into the folder's `lib.a`, built-in code too.
    library: Vec<PathBuf>,
    module: Vec<PathBuf>,
    /// objtool's options, when this config runs it on the linked vmlinux.o
    /// and modules instead of on each object (IBT kernels, 6.2 and later).
    objtool_at_link: Vec<String>,
}

impl KbuildDir {
    /// Whether and how `object` is built here, `dir/../other` parts of
    /// composite objects included.
    fn membership(&self, object: &Path) -> Option<Built> {
        let same = |listed: &&PathBuf| {
            *listed == object || includers::normalize(listed).as_deref() == Some(object)
        };
        let found = |listed: &PathBuf, in_module, in_library| Built {
            in_module,
            in_library,
            kbuild_object: listed.clone(),
        };
        if let Some(listed) = self.builtin.iter().find(same) {
            Some(found(listed, false, false))
        } else if let Some(listed) = self.library.iter().find(same) {
            Some(found(listed, false, true))
        } else {
            self.module
                .iter()
                .find(same)
                .map(|listed| found(listed, true, false))
        }
    }
}

/// Folders, and levels below the deepest folder kbuild enters, searched
/// for a composite object's part.
const COMPOSITE_SEARCH_FOLDERS: usize = 400;
const COMPOSITE_SEARCH_DEPTH: usize = 3;

/// How this config builds an object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Built {
    in_module: bool,
    /// A member of a `lib.a` (`lib-y`): linked into vmlinux whole with
    /// `CONFIG_MODULES`, else only when something references it.
    in_library: bool,
    /// The object as kbuild names it, which for a composite module's part
    /// may go through the folder whose flags compile it
    /// (`drivers/gpu/drm/amd/amdgpu/../display/dc/core/dc.o`).
    kbuild_object: PathBuf,
}

/// The work cache's folders for one target.
struct Trees {
    /// Pristine source, never written.
    source: PathBuf,
    config: PathBuf,
    release: String,
    /// Link farm the patched files are written into.
    src: PathBuf,
    orig: PathBuf,
    patched: PathBuf,
    journal: PathBuf,
    /// The build lock's file, handed down to every make run.
    lock_fd: std::os::unix::io::RawFd,
    toolchain: crate::target::toolchain::Toolchain,
    /// The source is a released package that never changes, so an
    /// original object, once built, stays valid.
    immutable_source: bool,
    /// Folders' listings already read by kbuild in this build.
    listings: std::sync::Mutex<std::collections::HashMap<String, KbuildDir>>,
}

impl Trees {
    fn new(target: &Target, lock: &Lock) -> Trees {
        Trees {
            source: target.source.clone(),
            config: target.config.clone(),
            release: target.release.clone(),
            src: target.work.join("src"),
            orig: target.work.join("orig"),
            patched: target.work.join("patched"),
            journal: target.work.join("src.journal"),
            lock_fd: lock.raw_fd(),
            toolchain: target.toolchain.clone(),
            immutable_source: target.source_is_immutable(),
            listings: Default::default(),
        }
    }

    /// kbuild writes the `.cmd` file only after the object is complete.
    fn orig_is_built(&self, object: &Path) -> bool {
        let o = self.orig.join(object);
        o.is_file() && cmd_file(&o).is_file()
    }

    /// Kernel source architecture of the config (`SRCARCH`).
    fn srcarch(&self) -> Result<&'static str> {
        let config = fs::read_to_string(&self.config)
            .with_context(|| format!("cannot read {}", self.config.display()))?;
        let has = |opt: &str| config.lines().any(|l| l == format!("{opt}=y"));
        if has("CONFIG_X86") {
            Ok("x86")
        } else if has("CONFIG_ARM64") {
            Ok("arm64")
        } else {
            bail!(
                "{}: unsupported architecture (x86 and arm64 are known)",
                self.config.display()
            )
        }
    }

    /// What kbuild builds in `dir` (relative, `.` for the root) under this
    /// config, from the directory's own makefile evaluated by kbuild's rules.
    fn kbuild_dir(&self, dir: &str, srcarch: &str) -> Result<KbuildDir> {
        let cached = |dir: &str| self.listings.lock().ok()?.get(dir).cloned();
        if let Some(listing) = cached(dir) {
            return Ok(listing);
        }
        let listing = self.read_kbuild_dir(dir, srcarch)?;
        if let Ok(mut listings) = self.listings.lock() {
            listings.insert(dir.to_string(), listing.clone());
        }
        Ok(listing)
    }

    fn read_kbuild_dir(&self, dir: &str, srcarch: &str) -> Result<KbuildDir> {
        let mk = self.orig.join(".dynamos-list.mk");
        if fs::read_to_string(&mk).ok().as_deref() != Some(LIST_MK) {
            cache::write_atomic(&mk, LIST_MK.as_bytes())?;
        }
        let mut cmd = self.toolchain.command("make");
        cmd.arg("-s")
            .arg("-C")
            .arg(&self.orig)
            .arg("-f")
            .arg(&mk)
            // As kbuild does for O= builds: `include $(src)/sub/Makefile`
            // (i915's gvt) is found relative to the source tree.
            .arg(format!("--include-dir={}", self.source.display()))
            .arg(format!("obj={dir}"))
            .arg(format!("srctree={}", self.source.display()))
            .arg("objtree=.")
            .arg(format!("SRCARCH={srcarch}"))
            .arg(format!("ARCH={srcarch}"))
            .arg(self.toolchain.make_cc())
            .arg("dynamos-list");
        for var in MAKE_ENV_REMOVE {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C").stdin(Stdio::null());
        let out = child::output(&mut cmd).context("cannot run make")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "cannot read what kbuild builds in {dir}:\n{}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut listing = KbuildDir::default();
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let words = rest
                .split_whitespace()
                .map(|w| PathBuf::from(w.strip_prefix("./").unwrap_or(w)));
            match key {
                "dirs" => listing.dirs.extend(words),
                "y" => listing.builtin.extend(words),
                "lib" => listing.library.extend(words),
                "m" => listing.module.extend(words),
                "objtool-at-link" => listing
                    .objtool_at_link
                    .extend(rest.split_whitespace().map(str::to_string)),
                _ => {}
            }
        }
        Ok(listing)
    }

    /// Whether this config compiles `object`, into vmlinux (`Some(false)`)
    /// or a module (`Some(true)`); `None` when it does not. Every folder on
    /// the way must be descended into, as the top-level `Kbuild` and each
    /// folder's makefile decide; folders of `arch/<arch>/` are reached from
    /// the arch makefile and are taken as built.
    fn built_by_config(&self, object: &Path) -> Result<Option<Built>> {
        let srcarch = self.srcarch()?;
        let dirs: Vec<String> = object
            .parent()
            .map(|p| p.iter().map(|c| c.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let start = if dirs.first().map(String::as_str) == Some("arch") {
            if dirs.get(1).map(String::as_str) != Some(srcarch) {
                return Ok(None);
            }
            dirs.len().min(3)
        } else {
            0
        };
        let as_dir = |n: usize| {
            if n == 0 {
                ".".to_string()
            } else {
                dirs[..n].join("/")
            }
        };
        // The deepest folder on the way that kbuild descends into.
        let mut reached = dirs.len();
        for i in start..dirs.len() {
            let child = PathBuf::from(dirs[..=i].join("/"));
            if !self.kbuild_dir(&as_dir(i), srcarch)?.dirs.contains(&child) {
                reached = i;
                break;
            }
        }
        let listing = self.kbuild_dir(&as_dir(reached), srcarch)?;
        if let Some(membership) = listing.membership(object) {
            return Ok(Some(membership));
        }
        // Composite objects list parts from folders kbuild never enters
        // itself: mlx5's `core/en/*.o` from `core/`, amdgpu's
        // `../display/**` from `amd/amdgpu/`. Look for the object among the
        // parts listed in the folders below the deepest one reached.
        if reached == 0 {
            return Ok(None);
        }
        let mut queue: std::collections::VecDeque<(PathBuf, usize)> =
            listing.dirs.iter().map(|d| (d.clone(), 1)).collect();
        let mut visited = 0;
        while let Some((dir, depth)) = queue.pop_front() {
            visited += 1;
            if visited > COMPOSITE_SEARCH_FOLDERS {
                break;
            }
            // A folder kbuild cannot list here is one this search cannot use.
            let Ok(listing) = self.kbuild_dir(&dir.to_string_lossy(), srcarch) else {
                continue;
            };
            if let Some(membership) = listing.membership(object) {
                return Ok(Some(membership));
            }
            if depth < COMPOSITE_SEARCH_DEPTH {
                queue.extend(listing.dirs.iter().map(|d| (d.clone(), depth + 1)));
            }
        }
        Ok(None)
    }

    /// A C file in the same folder that `#include`s `source` (like
    /// `kernel/sched/build_policy.c` does with `rt.c`).
    fn including_file(&self, source: &Path) -> Option<PathBuf> {
        let name = source.file_name()?.to_string_lossy().into_owned();
        let dir = source.parent()?;
        let quoted = format!("\"{name}\"");
        // `#include "x.c"`, also written `# include "x.c"` inside #ifdefs.
        let includes = |line: &str| {
            line.trim_start()
                .strip_prefix('#')
                .map(str::trim_start)
                .and_then(|l| l.strip_prefix("include"))
                .is_some_and(|l| l.trim() == quoted)
        };
        fs::read_dir(self.source.join(dir))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "c"))
            .find(|p| fs::read_to_string(p).is_ok_and(|t| t.lines().any(includes)))
            .and_then(|p| p.file_name().map(|n| dir.join(n)))
    }

    /// Link farm and both configured O= folders, made once and reused.
    fn prepare(&self) -> Result<()> {
        if self.src.is_dir()
            && self.is_configured(&self.source, &self.orig)?
            && self.is_configured(&self.src, &self.patched)?
        {
            return Ok(());
        }
        let progress = crate::report::spinner(
            "preparing the kernel trees (first build only: configuring the original and patched trees)"
                .into(),
        );
        let started = Instant::now();
        let (orig, patched) = std::thread::scope(|scope| {
            let orig = scope.spawn(|| self.configure(&self.source, &self.orig));
            let patched = (|| {
                self.farm()?;
                self.configure(&self.src, &self.patched)
            })();
            (
                orig.join()
                    .unwrap_or_else(|_| Err(anyhow!("configure thread panicked"))),
                patched,
            )
        });
        progress.finish_and_clear();
        verbose(format_args!(
            "prepared the kernel trees in {:.1?}",
            started.elapsed()
        ));
        orig.and(patched)
    }

    fn is_configured(&self, source: &Path, out: &Path) -> Result<bool> {
        let want = self.stamp_text(source, out)?;
        Ok(fs::read_to_string(out.join(STAMP)).ok().as_deref() == Some(want.as_str()))
    }

    fn farm(&self) -> Result<()> {
        if self.src.is_dir() {
            return Ok(());
        }
        let started = Instant::now();
        let source = self.source.clone();
        cache::ensure_dir(&self.src, |tmp| link_tree(&source, tmp, false))?;
        verbose(format_args!(
            "linked the work tree {} in {:.1?}",
            self.src.display(),
            started.elapsed()
        ));
        Ok(())
    }

    /// Put `dynamos.h` (the adaptation-handler macros) where the patched
    /// build finds `#include <dynamos.h>`: the farm's `include/`. The
    /// original build reads the pristine tree, which never has it.
    fn provide_author_header(&self) -> Result<()> {
        let path = self.src.join("include").join(AUTHOR_HEADER_NAME);
        if fs::read(&path).is_ok_and(|current| current == AUTHOR_HEADER.as_bytes()) {
            return Ok(());
        }
        cache::write_atomic(&path, AUTHOR_HEADER.as_bytes())
    }

    /// A user's tree may have changed since the farm was made (a checkout
    /// replaces files, so old links would keep old content): bring the
    /// farm up to date. A released package never changes and skips this.
    fn sync_farm(&self) -> Result<()> {
        if self.immutable_source {
            return Ok(());
        }
        let started = Instant::now();
        link_tree(&self.source, &self.src, true)?;
        verbose(format_args!(
            "synced the work tree {} in {:.1?}",
            self.src.display(),
            started.elapsed()
        ));
        Ok(())
    }

    /// What a configured O= folder depends on: a change redoes it.
    fn stamp_text(&self, source: &Path, out: &Path) -> Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(
            fs::read(&self.config)
                .with_context(|| format!("cannot read kernel config {}", self.config.display()))?,
        );
        Ok(format!(
            "source {}\nconfig {}\ncc {}\nrelease {}\nkcflags {}\n",
            source.display(),
            hex::encode(hasher.finalize()),
            self.toolchain.describe(),
            self.release,
            kcflags(source, out)
        ))
    }

    /// Configure `out` for `source` (olddefconfig + prepare) unless a stamp
    /// says it is done. A half-configured folder has no stamp and is redone
    /// from scratch.
    fn configure(&self, source: &Path, out: &Path) -> Result<()> {
        let stamp = out.join(STAMP);
        let want = self.stamp_text(source, out)?;
        if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        if out.exists() {
            fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
        }
        fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        fs::copy(&self.config, out.join(".config")).with_context(|| {
            format!(
                "cannot copy {} into {}",
                self.config.display(),
                out.display()
            )
        })?;
        let jobs = jobs_arg();
        for step in [&["olddefconfig"][..], &[&jobs, "prepare"][..]] {
            let run = self.run_make(source, out, step)?;
            if !run.success {
                let hint = missing_tool_hint(&run.output)
                    .map(|h| format!("\n{h}"))
                    .unwrap_or_default();
                bail!(
                    "configuring the kernel in {} failed (make {}){hint}\n{}",
                    out.display(),
                    step.join(" "),
                    tail(&run.output, LOG_TAIL, &[source])
                );
            }
        }
        cache::write_atomic(&stamp, want.as_bytes())?;
        Ok(())
    }

    /// Compile `objects` in one make run (`-k`, so every unknown object is reported).
    fn make(&self, source: &Path, out: &Path, objects: &[PathBuf]) -> Result<MakeRun> {
        if objects.is_empty() {
            return Ok(MakeRun {
                success: true,
                output: String::new(),
            });
        }
        let mut args: Vec<String> = vec![jobs_arg(), "-k".into()];
        args.extend(objects.iter().map(|o| o.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_make(source, out, &args)
    }

    fn run_make(&self, source: &Path, out: &Path, args: &[&str]) -> Result<MakeRun> {
        let mut cmd = self.toolchain.command("make");
        cmd.arg("-C")
            .arg(source)
            .arg(format!("O={}", out.display()))
            .arg(format!("KERNELRELEASE={}", self.release))
            .arg(format!("KCFLAGS={}", kcflags(source, out)))
            .arg(self.toolchain.make_cc());
        cmd.args(args);
        run_make_logged(cmd, &out.join(".dynamos-make.log"), Some(self.lock_fd))
    }

    /// Run objtool on a copy of an object as kbuild runs it on the linked
    /// vmlinux.o or module, so that the copy carries the tables objtool
    /// writes (return-thunk, retpoline and call sites, ENDBR seals, ORC)
    /// for the code in it: the kernel rewrites those sites and run-pre
    /// must know them.
    fn annotate(&self, object: &Path, options: &[String], in_module: bool) -> Result<()> {
        let mut cmd = self
            .toolchain
            .command(&self.orig.join("tools/objtool/objtool").to_string_lossy());
        // `--link` as for vmlinux.o and modules: the ENDBR seals need it.
        cmd.args(options).arg("--link");
        if in_module {
            cmd.arg("--module");
        }
        cmd.arg(object).env("LC_ALL", "C").stdin(Stdio::null());
        let out = child::output(&mut cmd).context("cannot run objtool")?;
        if !out.status.success() {
            bail!(
                "objtool failed on {}:\n{}",
                object.display(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(())
    }

    /// Undo the patched files of a build that did not finish.
    fn recover(&self) -> Result<()> {
        let Ok(text) = fs::read_to_string(&self.journal) else {
            return Ok(());
        };
        let paths: Vec<PathBuf> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect();
        Worktree::left_behind(self, paths).restore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_object_from_cmd_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("fs/ext4")).unwrap();
        fs::write(
            dir.path().join("fs/ext4/.inode.o.cmd"),
            "cmd_fs/ext4/inode.o := gcc-12 -Wp,-MMD -nostdinc -DMODULE -DKBUILD_BASENAME='\"inode\"' -DKBUILD_MODNAME='\"ext4\"' -D__KBUILD_MODNAME=kmod_ext4 -c -o fs/ext4/inode.o fs/ext4/inode.c\n\nsource_fs/ext4/inode.o := fs/ext4/inode.c\n",
        )
        .unwrap();
        assert_eq!(
            kernel_object(dir.path(), Path::new("fs/ext4/inode.o")).unwrap(),
            "ext4"
        );
        fs::create_dir_all(dir.path().join("fs/proc")).unwrap();
        fs::write(
            dir.path().join("fs/proc/.version.o.cmd"),
            "cmd_fs/proc/version.o := gcc-12 -nostdinc -DKBUILD_MODNAME='\"version\"' -c -o fs/proc/version.o fs/proc/version.c\n",
        )
        .unwrap();
        assert_eq!(
            kernel_object(dir.path(), Path::new("fs/proc/version.o")).unwrap(),
            "vmlinux"
        );
    }

    #[test]
    fn hints_missing_tools() {
        let out = "/bin/sh: 1: flex: not found\nmake[2]: *** [scripts/Makefile.host:9: scripts/kconfig/lexer.lex.c] Error 127";
        assert!(missing_tool_hint(out)
            .unwrap()
            .contains("apt-get install flex"));
        let out =
            "scripts/sign-file.c:25:10: fatal error: openssl/opensslv.h: No such file or directory";
        assert!(missing_tool_hint(out).unwrap().contains("libssl-dev"));
        assert!(missing_tool_hint("fs/proc/version.c:12:1: error: expected ';'").is_none());
    }
}
