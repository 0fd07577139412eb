//! Generate stage: turn the diffs of the touched translation units into one
//! kernel livepatch module, built with kbuild against the target's headers.
//!
//! The module is the registration code rendered from `templates/` plus one
//! extracted object per translation unit (see `extract`). References to
//! kernel symbols stay undefined under `__dynamos_ext_N` names; the manifest
//! says what each one is, and `dynamos apply` resolves them on the running
//! kernel before loading (docs/architecture.md explains why); a module to
//! be signed has them bound here instead (`bind_at_build`).

pub mod extract;
pub mod klp;
pub mod kthreads;
pub mod module_signature;
pub mod module_symbols;
pub mod target_symbols;
pub mod values;

use crate::diff::{ObjectDiff, ObjectFile};
use crate::error::Error;
use crate::package::{
    Adaptation, ExpectedCode, ExternalSymbol, ObjectUpdate, ReplacedFunction, SourceObject,
    SymbolKind, Synchronization,
};
use crate::synchronize::threads::RestorePoint;
use crate::synchronize::{Synchronized, SynchronizedFunction};
use anyhow::{bail, Context, Result};
use extract::{Extracted, PackageNames};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LIVEPATCH_TEMPLATE: &str = include_str!("../../templates/livepatch.c");
const KBUILD_TEMPLATE: &str = include_str!("../../templates/Kbuild");
const DISPATCH_TEMPLATE: &str = include_str!("../../templates/dispatch.S");

/// One translation unit's contribution to the package.
pub struct TranslationUnit<'a> {
    /// Source file relative to the tree root, e.g. `fs/proc/version.c`.
    pub source_file: String,
    /// `vmlinux` or the module the file is part of.
    pub kernel_object: String,
    pub original: &'a ObjectFile,
    pub patched: &'a ObjectFile,
    pub diff: &'a ObjectDiff,
}

/// The built module and what it does, per kernel object.
#[derive(Debug)]
pub struct GeneratedModule {
    pub ko: Vec<u8>,
    pub objects: Vec<ObjectUpdate>,
    /// Things the user should know about the update (one line each).
    pub notes: Vec<String>,
}

/// What the source stages wrote into the patched files, which the module
/// must serve.
pub struct Rewritten<'a> {
    /// Transitional clones and kernel-thread restore points.
    pub synchronized: &'a Synchronized,
    /// Types whose added members live in shadow data.
    pub shadows: &'a [crate::package::ShadowType],
}

/// The kernel the module is generated for.
pub struct TargetKernel {
    /// The target's headers, or a prepared tree: what modules build against.
    pub kbuild_dir: std::path::PathBuf,
    pub modules: module_symbols::ModuleContext,
    pub abi: crate::target::abi::KernelAbi,
    pub toolchain: crate::target::toolchain::Toolchain,
}

/// Extract, render and build; `work` is an empty folder the caller owns.
pub fn generate(
    package: &str,
    module_name: &str,
    units: &[TranslationUnit],
    rewritten: &Rewritten,
    kernel: &TargetKernel,
    signing: Option<&module_signature::ModuleSigning>,
    work: &Path,
) -> Result<GeneratedModule> {
    let (modules, abi) = (&kernel.modules, &kernel.abi);
    let (transformed, shadows) = (rewritten.synchronized, rewritten.shadows);
    let synchronized: &[SynchronizedFunction] = &transformed.functions;
    let restore_points: &[RestorePoint] = &transformed.restore_points.points;
    let mut names = PackageNames::default();
    let mut by_object: BTreeMap<String, ObjectUpdate> = BTreeMap::new();
    let mut tables: BTreeMap<String, Vec<(ReplacedFunction, String)>> = BTreeMap::new();
    let mut object_files = Vec::new();
    let mut refusals = Vec::new();
    let mut load_time = Vec::new();
    let mut notes = Vec::new();
    let mut shipped: BTreeMap<String, Option<module_symbols::ShippedModule>> = BTreeMap::new();
    let mut next_adaptive = 0;
    let mut next_synchronized = 0;
    let mut next_thread = 0;
    let mut next_thread_state = 0;

    // New globals one unit defines and another uses link inside the package.
    for unit in units {
        if let Err(r) = names.share_new_globals(
            &unit.kernel_object,
            &unit.source_file,
            unit.patched,
            unit.diff,
        ) {
            refusals.push(r);
        }
    }
    // What the running kernel's symbol table will be, where the target's
    // image tells: the build decides what apply would only find out later.
    // A signed module names every kernel symbol's position at build time.
    let vmlinux_table = match &modules.vmlinuz {
        Some(image)
            if signing.is_some()
                || units
                    .iter()
                    .any(|u| u.kernel_object == "vmlinux" && !u.diff.is_empty()) =>
        {
            Some(target_symbols::read_vmlinuz(image)?)
        }
        _ => None,
    };
    let vmlinux_symbols = vmlinux_table
        .as_ref()
        .map(|t| crate::apply::ObjectSymbols::new(t.symbols.iter().collect()));
    for unit in units {
        if unit.kernel_object != "vmlinux" || unit.diff.functions.is_empty() {
            continue;
        }
        if let Some(symbols) = &vmlinux_symbols {
            refusals.extend(target_symbols::refuse_overridden_weak_changes(
                unit.original,
                unit.diff,
                symbols,
            ));
        }
    }
    for unit in units.iter() {
        let object = &unit.kernel_object;
        let carries = !unit.diff.functions.is_empty() || names.defines_shared(&unit.source_file);
        if carries && object != "vmlinux" && !shipped.contains_key(object) {
            shipped.insert(object.clone(), modules.shipped(object)?);
        }
    }
    for (index, unit) in units.iter().enumerate() {
        if unit.diff.functions.is_empty() && !names.defines_shared(&unit.source_file) {
            continue;
        }
        let module = if unit.kernel_object == "vmlinux" {
            None
        } else {
            Some(shipped[&unit.kernel_object].as_ref())
        };
        let unit_locals = match module {
            Some(_) => module_symbols::kallsyms_locals(unit.original),
            None => Vec::new(),
        };
        let file_symbols = defined_symbols(unit.original);
        // Bookkeeping statics the running kernel cannot show as one symbol
        // start afresh in the package.
        let fresh = unbound_bookkeeping(unit, |name| match module {
            None => vmlinux_symbols.as_ref().is_some_and(|symbols| {
                crate::apply::choose(symbols, name, SymbolKind::Data, Some(&file_symbols), None)
                    .is_ok()
            }),
            Some(m) => m.is_some_and(|m| {
                m.sympos(name, Some(&unit.source_file), &unit_locals)
                    .is_ok()
            }),
        });
        notes.extend(fresh.iter().filter(|n| !crate::diff::is_message_limiter(n)).map(|name| {
            format!(
                "{name} of {}: starts afresh in the new code (the target's symbol table does not tie it to one kernel symbol)",
                unit.source_file
            )
        }));
        let clones = SynchronizedNames::new(unit, synchronized, &mut next_synchronized);
        let adaptive = AdaptiveNames::new(unit, &clones.by_function, &mut next_adaptive);
        if let Some(r) = clones.refusal(unit) {
            refusals.push(r);
            continue;
        }
        let mut aliases = adaptive.handler_aliases.clone();
        aliases.extend(clones.aliases.clone());
        // The restore state of each changed thread function, for the module.
        let mut state_aliases: BTreeMap<String, String> = BTreeMap::new();
        for point in restore_points
            .iter()
            .filter(|p| p.file == unit.source_file && unit.diff.changed().contains(&p.name))
        {
            let alias = format!("__dynamos_thread_state_{}", next_thread_state);
            next_thread_state += 1;
            aliases.insert(point.state_of.clone(), alias.clone());
            state_aliases.insert(point.name.clone(), alias);
        }
        let extracted: Extracted = match extract::extract(
            unit.patched,
            unit.diff,
            &unit.source_file,
            &unit.kernel_object,
            &fresh,
            &aliases,
            &mut names,
            abi,
        ) {
            Ok(e) => e,
            Err(mut r) => {
                refusals.append(&mut r);
                continue;
            }
        };
        if let (true, Some(table), Some(symbols)) = (
            unit.kernel_object == "vmlinux",
            &vmlinux_table,
            &vmlinux_symbols,
        ) {
            refusals.extend(target_symbols::refuse_sealed_address_taken(
                &extracted.address_taken,
                table,
                symbols,
            ));
        }
        write_extracted(work, &format!("extracted_{index}.o"), &extracted, unit)?;
        object_files.push(format!("extracted_{index}.o"));
        // An adaptive function's version from before the update travels as
        // a clone of its own: the original would re-enter the redirect.
        let old_clones = if adaptive.old_aliases.is_empty() {
            None
        } else {
            let wanted: Vec<&str> = adaptive.old_aliases.keys().map(String::as_str).collect();
            let originals = crate::diff::ObjectDiff::original_versions(unit.original, &wanted);
            let old_fresh: BTreeSet<String> = fresh
                .iter()
                .filter_map(|n| unit.diff.correlation.orig_name(n))
                .map(str::to_string)
                .collect();
            match extract::extract(
                unit.original,
                &originals,
                &unit.source_file,
                &unit.kernel_object,
                &old_fresh,
                &adaptive.old_aliases,
                &mut names,
                abi,
            ) {
                Ok(e) => {
                    let file_name = format!("extracted_{index}_original.o");
                    write_extracted(work, &file_name, &e, unit)?;
                    object_files.push(file_name);
                    Some(e)
                }
                Err(mut r) => {
                    refusals.append(&mut r);
                    continue;
                }
            }
        };

        let update = by_object
            .entry(unit.kernel_object.clone())
            .or_insert_with(|| ObjectUpdate {
                object: unit.kernel_object.clone(),
                replaced: Vec::new(),
                added: Vec::new(),
                externals: Vec::new(),
                files: Vec::new(),
                load_time: Vec::new(),
                expected_code: Vec::new(),
                value_updates: Vec::new(),
            });
        let mut thread_externals: Vec<ExternalSymbol> = Vec::new();
        for version in &extracted.replaced {
            let adaptation = adaptive.dispatched.get(&version.name);
            let replaced = ReplacedFunction {
                name: version.name.clone(),
                sympos: module.flatten().and_then(|m| {
                    m.sympos(&version.name, Some(&unit.source_file), &unit_locals)
                        .ok()
                }),
                file: unit.source_file.clone(),
                new_symbol: adaptation
                    .map_or_else(|| version.alias.clone(), |a| a.dispatcher.clone()),
                adaptation: adaptation.map(|a| Adaptation {
                    handler: a.handler.clone(),
                    handler_symbol: a.handler_symbol.clone(),
                    arguments: a.arguments as u8,
                    new_version: version.alias.clone(),
                    old_version: a.old_version.clone(),
                }),
                kthread: kthreads::thread_function(unit.original, &version.name).map(|mut t| {
                    t.stop_hazard = transformed
                        .restore_points
                        .hazards
                        .iter()
                        .find(|h| h.file == unit.source_file && h.name == version.name)
                        .map(|h| h.reason.clone());
                    t
                }),
                synchronized: clones.by_function.get(&version.name).cloned(),
                restart: None,
            };
            let mut replaced = replaced;
            if let Some(thread) = replaced.kthread.clone() {
                let pointers = kthreads::task_pointers(unit.original, &thread.started_by);
                if kthreads::restartable(&thread) && replaced.synchronized.is_none() {
                    let n = next_thread;
                    next_thread += 1;
                    let original = format!("__dynamos_thread_original_{n}");
                    thread_externals.push(running_original(unit, &version.name, &original));
                    let mut task_pointers = Vec::new();
                    for (k, (name, global)) in pointers.iter().enumerate() {
                        let module_symbol = format!("__dynamos_thread_task_{n}_{k}");
                        thread_externals.push(ExternalSymbol {
                            module_symbol: module_symbol.clone(),
                            name: name.clone(),
                            kind: SymbolKind::Data,
                            file: Some(unit.source_file.clone()),
                            bound_at_build: None,
                            global: *global,
                        });
                        task_pointers.push((module_symbol, name.clone()));
                    }
                    let point = restore_points
                        .iter()
                        .find(|p| p.file == unit.source_file && p.name == version.name);
                    let state = match (point, state_aliases.get(&version.name)) {
                        (Some(point), Some(state_of)) => {
                            let (state, note) =
                                kthreads::thread_state(unit.original, point, state_of);
                            notes.push(note);
                            Some(state)
                        }
                        _ => None,
                    };
                    replaced.restart = Some(crate::package::ThreadRestart {
                        original,
                        task_pointers,
                        state,
                    });
                }
                let names: Vec<String> = pointers.into_iter().map(|(n, _)| n).collect();
                notes.push(kthreads::note(&version.name, &thread, &names));
            }
            if let Some(sync) = &replaced.synchronized {
                update
                    .externals
                    .push(running_original(unit, &version.name, &sync.original));
                notes.push(format!(
                    "{} of {}: synchronized update; sleepers move between versions at {}{}",
                    version.name,
                    unit.source_file,
                    sync.sleep_points.join("; "),
                    sync.handler
                        .as_ref()
                        .map(|h| format!(
                            "; {h} chooses the calls and sleepers that run the new code"
                        ))
                        .unwrap_or_default()
                ));
            }
            update.replaced.push(replaced.clone());
            tables
                .entry(unit.kernel_object.clone())
                .or_default()
                .push((replaced, version.alias.clone()));
        }
        update.added.extend(extracted.added.iter().cloned());
        // A module's thread function and task pointers are bound whenever
        // the module loads, as its new code's references to it are.
        match module {
            None => update.externals.append(&mut thread_externals),
            Some(m) => refusals.extend(bind_module_externals(
                unit,
                m,
                std::mem::take(&mut thread_externals),
                &unit_locals,
                &modules.exporters,
                update,
                &mut load_time,
            )),
        }
        for extracted in std::iter::once(&extracted).chain(&old_clones) {
            match module {
                None => {
                    if let Some(symbols) = &vmlinux_symbols {
                        refusals.extend(target_symbols::unbound_references(
                            &extracted.externals,
                            symbols,
                            &file_symbols,
                        ));
                    }
                    update.externals.extend(extracted.externals.iter().cloned())
                }
                Some(m) => refusals.extend(bind_module_externals(
                    unit,
                    m,
                    extracted.externals.clone(),
                    &unit_locals,
                    &modules.exporters,
                    update,
                    &mut load_time,
                )),
            }
            // Run-pre covers what is replaced and the old functions of this file
            // the new code calls: both must be the code it was compiled against.
            let called = extracted
                .externals
                .iter()
                .filter(|e| e.kind == SymbolKind::Function)
                .map(|e| e.name.as_str());
            // A weak definition another file's overrides never runs: the new
            // code's call reaches the running one, which has no expected code.
            let overridden = |name: &str| {
                unit.kernel_object == "vmlinux"
                    && vmlinux_symbols
                        .as_ref()
                        .is_some_and(|s| target_symbols::overridden_weak(unit.original, name, s))
            };
            for name in extracted
                .replaced
                .iter()
                .map(|v| v.name.as_str())
                .chain(called)
                .filter(|name| !overridden(name))
            {
                let known = update
                    .expected_code
                    .iter()
                    .any(|c| c.name == name && c.file == unit.source_file);
                if !known {
                    if let Some(code) =
                        expected_code_of(unit.original, name, &unit.source_file, abi)
                    {
                        update.expected_code.push(code);
                    }
                }
            }
        }
        update.files.push(SourceObject {
            file: unit.source_file.clone(),
            symbols: file_symbols,
        });
    }
    // Changed initial values: written by the module as it is enabled.
    for unit in units.iter().filter(|u| !u.diff.value_updates.is_empty()) {
        let update = by_object
            .entry(unit.kernel_object.clone())
            .or_insert_with(|| ObjectUpdate {
                object: unit.kernel_object.clone(),
                ..ObjectUpdate::default()
            });
        refusals.extend(values::add_value_updates(
            update,
            unit,
            &defined_symbols(unit.original),
            vmlinux_symbols.as_ref(),
        ));
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    let sets_values = by_object.values().any(|o| !o.value_updates.is_empty());
    if tables.is_empty() && !sets_values {
        return Err(Error::NoChange.into());
    }

    // vmlinux first: its table entries come first in `sympos`.
    let mut objects: Vec<ObjectUpdate> = by_object.into_values().collect();
    objects.sort_by_key(|o| (o.object != "vmlinux", o.object.clone()));
    let clear_module_relocs = !load_time.is_empty();
    if clear_module_relocs {
        // The template's relocation cleanup needs two kernel internals.
        if let Some(first) = objects.iter_mut().find(|o| !o.load_time.is_empty()) {
            for (module_symbol, name, kind) in [
                (TEXT_POKE, "text_poke", SymbolKind::Function),
                (TEXT_MUTEX, "text_mutex", SymbolKind::Data),
            ] {
                first.externals.push(ExternalSymbol {
                    module_symbol: module_symbol.into(),
                    name: name.into(),
                    kind,
                    file: None,
                    bound_at_build: None,
                    global: true,
                });
            }
        }
    }
    if objects
        .iter()
        .any(|o| o.replaced.iter().any(|f| f.adaptation.is_some()))
    {
        // The template checks what a dispatcher falls back to with it.
        objects[0].externals.push(ExternalSymbol {
            module_symbol: MODULE_TEXT_ADDRESS.into(),
            name: "__module_text_address".into(),
            kind: SymbolKind::Function,
            file: None,
            bound_at_build: None,
            global: true,
        });
    }
    if signing.is_some() {
        let Some(symbols) = vmlinux_symbols.as_ref() else {
            bail!("signing the module needs the target's kernel image, whose symbol table fixes each kernel symbol the module uses at build time");
        };
        let unbound = bind_at_build(&mut objects, symbols, &mut load_time);
        if !unbound.is_empty() {
            return Err(Error::Refused(unbound).into());
        }
    }
    let source = values::render(
        &render_livepatch(package, module_name, &objects, shadows, clear_module_relocs),
        &objects,
    );
    std::fs::write(work.join("livepatch.c"), source)?;
    // The synchronized functions' control block, shared with the clones.
    std::fs::write(work.join("dynamos.h"), crate::build::AUTHOR_HEADER)?;
    if let Some(dispatchers) = render_dispatchers(package, &objects) {
        std::fs::write(work.join("dispatch.S"), dispatchers)?;
        object_files.push("dispatch.o".to_string());
    }
    std::fs::write(
        work.join("Kbuild"),
        KBUILD_TEMPLATE
            .replace("{{module}}", module_name)
            .replace("{{extracted_objects}}", &object_files.join(" ")),
    )?;
    let ko = build_module(kernel, work, module_name, &objects, &load_time)?;
    let converted = klp::convert(&ko, &load_time)?;
    notes.extend(converted.silent.iter().map(|(module, what)| {
        format!("{what} of {module}: silent in the new code (a livepatch jump label cannot use the module's key)")
    }));
    let ko = match signing {
        Some(signing) => module_signature::sign(
            &converted.ko,
            signing,
            &kernel.kbuild_dir,
            &kernel.toolchain,
            work,
        )?,
        None => converted.ko,
    };
    Ok(GeneratedModule { ko, objects, notes })
}

/// Bind every kernel symbol the module uses from vmlinux at build time:
/// each becomes a livepatch symbol at its position in the target's symbol
/// table, which the kernel resolves as it loads the module (vmlinux's
/// livepatch relocations are applied before the module loader reads its
/// jump labels, alternatives and static calls). Symbols the table cannot
/// tell apart are refused: apply could pick by running code, a signed
/// module cannot.
fn bind_at_build(
    objects: &mut [ObjectUpdate],
    vmlinux: &crate::apply::ObjectSymbols,
    load_time: &mut Vec<klp::KlpReference>,
) -> Vec<crate::error::Refusal> {
    let mut refusals = Vec::new();
    for object in objects.iter_mut() {
        let ObjectUpdate {
            object: name,
            externals,
            files,
            ..
        } = object;
        for external in externals.iter_mut() {
            let file_symbols = external
                .file
                .as_ref()
                .map(|file| crate::apply::file_symbols(files, file).unwrap_or(&[]));
            match crate::apply::choose(vmlinux, &external.name, external.kind, file_symbols, None)
            {
                Ok(choice) => {
                    external.bound_at_build = Some(choice.sympos);
                    load_time.push(klp::KlpReference {
                        module_symbol: external.module_symbol.clone(),
                        patched: "vmlinux".into(),
                        symbol: crate::package::LoadTimeSymbol {
                            object: "vmlinux".into(),
                            name: external.name.clone(),
                            sympos: choice.sympos,
                        },
                    });
                }
                Err(reason) => refusals.push(crate::error::Refusal {
                    symbol: format!("{name}:{}", external.name),
                    reason: format!(
                        "{} (the target's symbol table, read at build time: a signed module names each kernel symbol it uses before it is signed)",
                        reason.replace("the running kernel", "the target kernel")
                    ),
                }),
            }
        }
    }
    refusals
}

/// Add externals of a module unit's new code to `update`: vmlinux symbols
/// apply resolves, and livepatch symbols bound whenever their module
/// loads (also listed in `load_time` for the klp conversion); what cannot
/// be bound is refused.
#[allow(clippy::too_many_arguments)]
fn bind_module_externals(
    unit: &TranslationUnit,
    shipped: Option<&module_symbols::ShippedModule>,
    externals: Vec<ExternalSymbol>,
    unit_locals: &[String],
    exporters: &std::collections::HashMap<String, String>,
    update: &mut ObjectUpdate,
    load_time: &mut Vec<klp::KlpReference>,
) -> Vec<crate::error::Refusal> {
    match module_symbols::split_externals(
        &unit.kernel_object,
        externals,
        shipped,
        unit_locals,
        exporters,
    ) {
        Ok((kept, later)) => {
            update.externals.extend(kept);
            update
                .load_time
                .extend(later.iter().map(|(_, s)| s.clone()));
            load_time.extend(
                later
                    .into_iter()
                    .map(|(module_symbol, symbol)| klp::KlpReference {
                        module_symbol,
                        patched: unit.kernel_object.clone(),
                        symbol,
                    }),
            );
            Vec::new()
        }
        Err(r) => r,
    }
}

/// The external through which the module learns where the running
/// original of `function` is (it redirects or restarts it itself).
fn running_original(unit: &TranslationUnit, function: &str, module_symbol: &str) -> ExternalSymbol {
    ExternalSymbol {
        module_symbol: module_symbol.to_string(),
        name: function.to_string(),
        kind: SymbolKind::Function,
        file: Some(unit.source_file.clone()),
        bound_at_build: None,
        global: unit
            .original
            .symbols
            .iter()
            .any(|s| s.name == function && s.is_function() && !s.is_local()),
    }
}

/// Package-wide names of one unit's transitionally cloned functions.
struct SynchronizedNames {
    /// Clone entry and control functions → the global names the module uses.
    aliases: BTreeMap<String, String>,
    /// Original function name → how it is updated.
    by_function: BTreeMap<String, Synchronization>,
}

impl SynchronizedNames {
    fn new(
        unit: &TranslationUnit,
        synchronized: &[SynchronizedFunction],
        next: &mut usize,
    ) -> SynchronizedNames {
        let mut names = SynchronizedNames {
            aliases: BTreeMap::new(),
            by_function: BTreeMap::new(),
        };
        for f in synchronized.iter().filter(|f| f.file == unit.source_file) {
            let n = *next;
            *next += 1;
            let entry = format!("__dynamos_sync_entry_{n}");
            let control = format!("__dynamos_sync_control_{n}");
            names.aliases.insert(f.entry.clone(), entry.clone());
            names.aliases.insert(f.control.clone(), control.clone());
            names.by_function.insert(
                f.name.clone(),
                Synchronization {
                    entry,
                    control,
                    original: format!("__dynamos_sync_original_{n}"),
                    sleep_points: f.sleep_points.iter().map(|p| p.describe()).collect(),
                    handler: f.handler.clone(),
                },
            );
        }
        names
    }

    /// A cloned function must be one the diff replaces, out of line, and
    /// cannot also have an adaptation handler.
    fn refusal(&self, unit: &TranslationUnit) -> Option<crate::error::Refusal> {
        let changed = unit.diff.changed();
        for name in self.by_function.keys() {
            let reason = if !changed.contains(name) {
                "DYNAMOS_SYNCHRONIZED names a function whose compiled code the patch does not change"
            } else if unit.kernel_object != "vmlinux" {
                "is module code: transitional clones redirect vmlinux functions only"
            } else {
                continue;
            };
            return Some(crate::error::Refusal {
                symbol: name.clone(),
                reason: format!("{reason} ({})", unit.source_file),
            });
        }
        None
    }
}

/// Package-wide names of one unit's adaptively replaced functions.
struct AdaptiveNames {
    /// Patched handler name → the global name the dispatcher calls.
    handler_aliases: BTreeMap<String, String>,
    /// Original function name → the global name of its old clone.
    old_aliases: BTreeMap<String, String>,
    /// Original function name → its dispatcher.
    dispatched: BTreeMap<String, Dispatched>,
}

struct Dispatched {
    dispatcher: String,
    arguments: usize,
    handler: String,
    handler_symbol: String,
    old_version: String,
}

impl AdaptiveNames {
    /// `synchronized`: functions whose transitional clone calls the
    /// handler itself, and so get no dispatcher.
    fn new(
        unit: &TranslationUnit,
        synchronized: &BTreeMap<String, Synchronization>,
        next: &mut usize,
    ) -> AdaptiveNames {
        let mut names = AdaptiveNames {
            handler_aliases: BTreeMap::new(),
            old_aliases: BTreeMap::new(),
            dispatched: BTreeMap::new(),
        };
        for a in &unit.diff.adaptations {
            let function = unit
                .diff
                .correlation
                .orig_name(&a.function)
                .unwrap_or(&a.function)
                .to_string();
            if synchronized.contains_key(&function) {
                continue;
            }
            let n = *next;
            *next += 1;
            let handler_symbol = names
                .handler_aliases
                .entry(a.handler.clone())
                .or_insert_with(|| format!("__dynamos_handler_{n}"))
                .clone();
            let old_version = format!("__dynamos_v1_{n}");
            names
                .old_aliases
                .insert(function.clone(), old_version.clone());
            names.dispatched.insert(
                function,
                Dispatched {
                    dispatcher: format!("__dynamos_dispatch_{n}"),
                    arguments: a.arguments,
                    handler: a.handler.clone(),
                    handler_symbol,
                    old_version,
                },
            );
        }
        names
    }
}

/// Write one extracted object and the command record kbuild reads for
/// every object it links (`cmd_` before Linux 6.2, `savedcmd_` since).
fn write_extracted(
    work: &Path,
    file_name: &str,
    extracted: &Extracted,
    unit: &TranslationUnit,
) -> Result<()> {
    std::fs::write(work.join(file_name), &extracted.object)?;
    std::fs::write(
        work.join(format!(".{file_name}.cmd")),
        format!(
            "cmd_{0} := dynamos extract {1}\nsavedcmd_{0} := dynamos extract {1}\nsource_{0} := \ndeps_{0} := \n",
            work.join(file_name).display(),
            unit.source_file
        ),
    )?;
    Ok(())
}

/// Patched names of the bookkeeping statics (message limiters, lockdep
/// keys) whose original `binds` cannot tie to one kernel symbol: the new
/// code gets copies of its own instead of a reference apply cannot resolve.
fn unbound_bookkeeping(
    unit: &TranslationUnit,
    binds: impl Fn(&str) -> bool,
) -> std::collections::BTreeSet<String> {
    unit.patched
        .symbols
        .iter()
        .filter(|s| s.is_local() && s.is_named_definition() && !s.is_function())
        .filter(|s| crate::diff::is_bookkeeping(&s.name))
        .filter(|s| {
            s.section()
                .is_some_and(|i| !unit.patched.sections[i].is_exec())
        })
        .filter(|s| {
            unit.diff
                .correlation
                .orig_name(&s.name)
                .is_some_and(|orig| !binds(orig))
        })
        .map(|s| s.name.clone())
        .collect()
}

/// The run-pre expectation for the function `name` defined in `original`.
fn expected_code_of(
    original: &ObjectFile,
    name: &str,
    file: &str,
    abi: &crate::target::abi::KernelAbi,
) -> Option<ExpectedCode> {
    let symbol = original
        .symbols
        .iter()
        .position(|s| s.name == name && s.is_function() && s.section().is_some())?;
    crate::runpre::expected_code(original, symbol, file, abi)
}

/// Names the original object defines, so the resolver can tell same-named
/// statics of different files apart by their neighbours.
fn defined_symbols(obj: &ObjectFile) -> Vec<String> {
    let mut names: Vec<String> = obj
        .symbols
        .iter()
        .filter(|s| s.is_named_definition() && !s.name.starts_with(".L"))
        .map(|s| s.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn c_identifier(object: &str) -> String {
    object
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Names the template uses for the kernel internals it needs.
const TEXT_POKE: &str = "__dynamos_text_poke";
const TEXT_MUTEX: &str = "__dynamos_text_mutex";
const MODULE_TEXT_ADDRESS: &str = "__dynamos_module_text_address";

/// The dispatchers of adaptively replaced functions (`templates/dispatch.S`),
/// or `None` when the package has none.
fn render_dispatchers(package: &str, objects: &[ObjectUpdate]) -> Option<String> {
    let lines: Vec<String> = objects
        .iter()
        .flat_map(|o| &o.replaced)
        .filter_map(|f| Some((f, f.adaptation.as_ref()?)))
        .map(|(f, a)| {
            format!(
                "DISPATCHER {}, {}\t/* {} in {} */",
                f.new_symbol, a.arguments, f.name, f.file
            )
        })
        .collect();
    (!lines.is_empty()).then(|| {
        DISPATCH_TEMPLATE
            .replace("{{package}}", package)
            .replace("{{tool_version}}", crate::TOOL_VERSION)
            .replace("{{dispatchers}}", &lines.join("\n"))
    })
}

/// The adaptive functions' part of `templates/livepatch.c`: declarations,
/// table entries and choosers, in table order.
fn render_adaptive(objects: &[ObjectUpdate]) -> (usize, String, String, String) {
    let mut declarations = String::new();
    let mut entries = String::new();
    let mut choosers = String::new();
    let mut count = 0;
    for f in objects.iter().flat_map(|o| &o.replaced) {
        let Some(a) = &f.adaptation else { continue };
        declarations.push_str(&format!(
            "extern char {}[], {}[]; /* {} in {}: new, original */\n",
            a.new_version, a.old_version, f.name, f.file
        ));
        entries.push_str(&format!(
            "\t{{ .name = \"{}\", .handler = \"{}\", .new_version = {}, .previous = {} }},\n",
            f.name, a.handler, a.new_version, a.old_version
        ));
        choosers.push_str(&format!(
            "DEFINE_CHOOSER({}, {count}, {}) /* {} chosen by {} */\n",
            f.new_symbol, a.handler_symbol, f.name, a.handler
        ));
        count += 1;
    }
    (count, declarations, entries, choosers)
}

/// The synchronized functions' part of `templates/livepatch.c`.
fn render_synchronized(objects: &[ObjectUpdate]) -> (usize, String, String) {
    let mut declarations = String::new();
    let mut entries = String::new();
    let mut count = 0;
    for f in objects.iter().flat_map(|o| &o.replaced) {
        let Some(s) = &f.synchronized else { continue };
        declarations.push_str(&format!(
            "extern char {}[], {}[]; /* {} in {}: clone entry, running original */\n\
             extern struct dynamos_sync *{}(void);\n",
            s.entry, s.original, f.name, f.file, s.control
        ));
        entries.push_str(&format!(
            "\t{{ .name = \"{}\", .original = {}, .entry = {}, .control = {} }},\n",
            f.name, s.original, s.entry, s.control
        ));
        count += 1;
    }
    (count, declarations, entries)
}

/// The restartable thread functions' part of `templates/livepatch.c`, in
/// the order `dynamos apply` indexes them.
fn render_threads(objects: &[ObjectUpdate]) -> (usize, String, String) {
    let mut declarations = String::new();
    let mut entries = String::new();
    let mut count = 0;
    for (object, f) in objects
        .iter()
        .flat_map(|o| o.replaced.iter().map(move |f| (o.object.as_str(), f)))
    {
        let Some(r) = &f.restart else { continue };
        declarations.push_str(&format!(
            "extern char {}[], {}[]; /* {} in {}: running original, new version */\n",
            r.original, f.new_symbol, f.name, f.file
        ));
        let mut pointers = String::new();
        for (symbol, name) in &r.task_pointers {
            declarations.push_str(&format!(
                "extern struct task_struct *{symbol}; /* {name} in {} */\n",
                f.file
            ));
            pointers.push_str(&format!("&{symbol}, "));
        }
        let state_of = match &r.state {
            Some(state) => {
                declarations.push_str(&format!(
                    "extern struct dynamos_thread *{}(void); /* {}'s restore state */\n",
                    state.state_of, f.name
                ));
                format!(", .state_of = {}", state.state_of)
            }
            None => String::new(),
        };
        let module = if object == "vmlinux" {
            String::new()
        } else {
            format!(", .object = \"{object}\"")
        };
        entries.push_str(&format!(
            "\t{{ .name = \"{}\", .original = {}, .new_version = {}, .task_pointers = {{ {}}}{}{} }},\n",
            f.name, r.original, f.new_symbol, pointers, module, state_of
        ));
        count += 1;
    }
    (count, declarations, entries)
}

/// The shadow types' table entries; ids are a hash of module and type, so
/// no other package's shadows share them.
fn render_shadows(module_name: &str, shadows: &[crate::package::ShadowType]) -> String {
    use sha2::{Digest, Sha256};
    shadows
        .iter()
        .map(|t| {
            let digest = Sha256::digest(format!(
                "dynamos:{module_name}:{}:{}:{}",
                t.index, t.file, t.type_name
            ));
            let id = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
            format!(
                "\t{{ .name = \"{}\", .id = {id:#x}UL }}, /* {} */\n",
                t.type_name,
                t.members.join(" ").replace("*/", "* /")
            )
        })
        .collect()
}

fn render_livepatch(
    package: &str,
    module_name: &str,
    objects: &[ObjectUpdate],
    shadows: &[crate::package::ShadowType],
    clear_module_relocs: bool,
) -> String {
    let mut declarations = String::new();
    let mut tables = String::new();
    let mut entries = String::new();
    let mut count = 0;
    for object in objects {
        let table = format!("funcs_{}", c_identifier(&object.object));
        tables.push_str(&format!("static struct klp_func {table}[] = {{\n"));
        for f in object.replaced.iter().filter(|f| f.in_livepatch_tables()) {
            declarations.push_str(&format!(
                "extern char {}[]; /* {} in {}{} */\n",
                f.new_symbol,
                f.name,
                f.file,
                if f.adaptation.is_some() {
                    ", its dispatcher"
                } else {
                    ""
                }
            ));
            tables.push_str(&format!(
                "\t{{ .old_name = \"{}\", .new_func = {} }},\n",
                f.name, f.new_symbol
            ));
            count += 1;
        }
        tables.push_str("\t{ }\n};\n\n");
        let name = if object.object == "vmlinux" {
            "NULL".to_string()
        } else {
            format!("\"{}\"", object.object)
        };
        entries.push_str(&format!("\t{{ .name = {name}, .funcs = {table} }},\n"));
    }
    let (adaptive_count, adaptive_declarations, adaptive_entries, choosers) =
        render_adaptive(objects);
    let (sync_count, sync_declarations, sync_entries) = render_synchronized(objects);
    let (thread_count, thread_declarations, thread_entries) = render_threads(objects);
    LIVEPATCH_TEMPLATE
        .replace("{{shadow_count}}", &shadows.len().to_string())
        .replace(
            "{{shadow_max}}",
            &crate::shadow::MAX_SHADOW_SIZE.to_string(),
        )
        .replace(
            "{{shadow_types}}",
            render_shadows(module_name, shadows).trim_end(),
        )
        .replace("{{thread_count}}", &thread_count.to_string())
        .replace("{{thread_declarations}}", thread_declarations.trim_end())
        .replace("{{thread_entries}}", thread_entries.trim_end())
        .replace("{{sync_count}}", &sync_count.to_string())
        .replace("{{sync_declarations}}", sync_declarations.trim_end())
        .replace("{{sync_entries}}", sync_entries.trim_end())
        .replace("{{adaptive_count}}", &adaptive_count.to_string())
        .replace(
            "{{adaptive_declarations}}",
            adaptive_declarations.trim_end(),
        )
        .replace("{{adaptive_entries}}", adaptive_entries.trim_end())
        .replace("{{choosers}}", choosers.trim_end())
        .replace("{{package}}", package)
        .replace("{{tool_version}}", crate::TOOL_VERSION)
        .replace("{{declarations}}", declarations.trim_end())
        .replace("{{function_count}}", &count.max(1).to_string())
        .replace("{{function_tables}}", tables.trim_end())
        .replace("{{object_entries}}", entries.trim_end())
        .replace(
            "{{clear_module_relocs}}",
            if clear_module_relocs { "1" } else { "0" },
        )
}

/// Debug info names the work folder (its name holds a process id) and the
/// cache's headers: mapped away, a rebuild gives the same module bytes.
/// Debian's headers folder becomes `/usr/src/...`, where Debian installs it.
fn reproducible_kcflags(kbuild_dir: &Path, work: &Path) -> String {
    let headers_root = kbuild_dir.parent().unwrap_or(kbuild_dir);
    let installed_as = if headers_root.ends_with("usr/src") {
        "/usr/src"
    } else {
        "."
    };
    format!(
        "KCFLAGS=-ffile-prefix-map={}=. -ffile-prefix-map={}={installed_as}",
        work.display(),
        headers_root.display()
    )
}

fn build_module(
    kernel: &TargetKernel,
    work: &Path,
    module_name: &str,
    objects: &[ObjectUpdate],
    load_time: &[klp::KlpReference],
) -> Result<Vec<u8>> {
    let kbuild_dir = &kernel.kbuild_dir;
    let progress = crate::report::spinner(format!("building module {module_name}"));
    let mut make = kernel.toolchain.command("make");
    make.arg("-C")
        .arg(kbuild_dir)
        .arg(format!("M={}", work.display()))
        .arg(kernel.toolchain.make_cc())
        // Our resolver symbols are undefined on purpose; they are checked below.
        .arg("KBUILD_MODPOST_WARN=1")
        .arg(reproducible_kcflags(kbuild_dir, work))
        .arg("modules");
    let run = crate::build::run_make_logged(make, &work.join(".dynamos-make.log"), None);
    progress.finish_and_clear();
    let run = run?;
    let log = run.output;
    if !run.success {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("building the livepatch module failed:\n{}", tail.join("\n"));
    }
    let expected: std::collections::HashSet<&str> = objects
        .iter()
        .flat_map(|o| o.externals.iter().map(|e| e.module_symbol.as_str()))
        .chain(load_time.iter().map(|r| r.module_symbol.as_str()))
        .collect();
    // Without the kernel's Module.symvers (a user's tree that was never
    // built) modpost knows no exports at all; the kernel's loader still
    // resolves exported symbols at load time.
    let exports_known = kbuild_dir.join("Module.symvers").is_file();
    for line in log
        .lines()
        .filter(|l| exports_known && l.contains("undefined!"))
    {
        let symbol = line.split('"').nth(1).unwrap_or("");
        if !expected.contains(symbol) {
            bail!("the livepatch module uses `{symbol}`, which the target kernel does not export: {line}");
        }
    }
    let ko = work.join(format!("{module_name}.ko"));
    std::fs::read(&ko).with_context(|| format!("kbuild produced no {}", ko.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Ksym, ObjectSymbols};

    fn ksym(address: u64, kind: char, name: &str) -> Ksym {
        Ksym {
            address,
            kind,
            name: name.into(),
            module: None,
        }
    }

    fn external(n: usize, name: &str, file: Option<&str>) -> ExternalSymbol {
        ExternalSymbol {
            module_symbol: format!("__dynamos_ext_{n}"),
            name: name.into(),
            kind: SymbolKind::Any,
            file: file.map(String::from),
            global: file.is_none(),
            bound_at_build: None,
        }
    }

    /// Every external of every object, a module's too, is bound against
    /// vmlinux at its position; what the table cannot pin down is refused
    /// for the object using it.
    #[test]
    fn externals_bound_at_build_are_vmlinux_livepatch_symbols() {
        // Two files' statics, further apart than the neighbourhood looked at.
        let mut table = vec![ksym(0x1000, 't', "a_first"), ksym(0x1010, 't', "show")];
        for i in 0..crate::apply::NEIGHBOURHOOD as u64 {
            table.push(ksym(0x1100 + 16 * i, 't', &format!("filler_{i}")));
        }
        table.extend([
            ksym(0x2000, 't', "b_first"),
            ksym(0x2010, 't', "show"),
            ksym(0x3000, 'T', "printk"),
            ksym(0x4000, 'd', "__key.0"),
            ksym(0x4010, 'd', "__key.0"),
        ]);
        let vmlinux = ObjectSymbols::new(table.iter().collect());
        let mut objects = vec![
            ObjectUpdate {
                object: "vmlinux".into(),
                externals: vec![
                    external(0, "show", Some("b.c")),
                    external(1, "printk", None),
                ],
                files: vec![SourceObject {
                    file: "b.c".into(),
                    symbols: vec!["b_first".into(), "show".into()],
                }],
                ..ObjectUpdate::default()
            },
            ObjectUpdate {
                object: "tun".into(),
                externals: vec![external(2, "printk", None)],
                ..ObjectUpdate::default()
            },
        ];
        let mut load_time = Vec::new();
        assert!(bind_at_build(&mut objects, &vmlinux, &mut load_time).is_empty());
        let bound: Vec<Option<u32>> = objects
            .iter()
            .flat_map(|o| o.externals.iter().map(|e| e.bound_at_build))
            .collect();
        assert_eq!(bound, [Some(2), Some(0), Some(0)]);
        assert_eq!(load_time.len(), 3);
        assert!(load_time
            .iter()
            .all(|r| r.patched == "vmlinux" && r.symbol.object == "vmlinux"));
        assert_eq!(load_time[0].symbol.name, "show");
        assert_eq!(load_time[2].module_symbol, "__dynamos_ext_2");

        let mut objects = vec![ObjectUpdate {
            object: "tun".into(),
            externals: vec![external(3, "__key.0", Some("drivers/net/tun.c"))],
            ..ObjectUpdate::default()
        }];
        let refusals = bind_at_build(&mut objects, &vmlinux, &mut Vec::new());
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0].symbol, "tun:__key.0");
        assert!(
            refusals[0].reason.starts_with("ambiguous"),
            "{}",
            refusals[0].reason
        );
        assert!(refusals[0].reason.contains("a signed module names"));
    }
}
