//! The whole `dynamos-build` pipeline: patch → build → diff → generate →
//! package. Each stage lives in its own module; this one only wires them
//! together and times them.

use crate::diff::{diff_objects_replacing, ObjectFile};
use crate::error::{Error, Refusal};
use crate::generate::{self, TranslationUnit};
use crate::package::{self, Manifest, Package, PatchDigest, TargetIdentity};
use crate::target::{Target, TargetSpec};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct BuildRequest {
    pub patches: Vec<PathBuf>,
    pub output: Option<PathBuf>,
    pub target: TargetSpec,
    /// Secret key to sign with; default: the one `dynamos keygen` made.
    pub signing_key: Option<PathBuf>,
    /// Package name; default: from the first patch file.
    pub name: Option<String>,
    /// Packages this one supersedes (a cumulative update).
    pub replaces: Vec<String>,
    /// Context lines a hunk may ignore at each end to land (`patch --fuzz`).
    pub fuzz: usize,
    /// Functions replaced even when their code does not change (an
    /// identity update, for measuring the redirect).
    pub replace_unchanged: Vec<String>,
    /// Source folder of an external (out-of-tree) module the patches fix,
    /// used read-only; the patches' paths are relative to it.
    pub module_source: Option<PathBuf>,
    /// X.509 key to sign the kernel module with, for kernels that enforce
    /// module signatures.
    pub module_signing_key: Option<generate::module_signature::ModuleSigningKey>,
}

pub struct BuildReport {
    pub package_path: PathBuf,
    pub manifest: Manifest,
    /// Wall time of each stage, in pipeline order.
    pub timings: Vec<(&'static str, Duration)>,
    /// Caveats of the update, one line each, as every stage recorded them
    /// (`crate::report`).
    pub notes: Vec<String>,
    /// The kernel module carries a module signature (`--module-key`).
    pub module_signed: bool,
}

/// Package name from the first patch file: `fixes/CVE-1.diff` → `CVE-1`.
pub fn package_name(patch: &Path) -> String {
    let stem = patch
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("update");
    let stem = [".diff", ".patch"]
        .iter()
        .find_map(|ext| stem.strip_suffix(ext))
        .unwrap_or(stem);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "update".into()
    } else {
        clean
    }
}

/// The package's name: `name` as given (checked), else from the first
/// patch file.
pub fn resolve_package_name(name: Option<&str>, first_patch: &Path) -> Result<String> {
    match name {
        Some(name) => checked_package_name(name),
        None => Ok(package_name(first_patch)),
    }
}

/// A package name given by the user: the characters `package_name` keeps.
fn checked_package_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 47
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(Error::Other(format!(
            "{name:?} is not a package name (letters, digits, - and _, at most 47)"
        ))
        .into());
    }
    Ok(name.to_string())
}

/// Kernel module name for a package: `dynamos_` + the name, within the
/// kernel's 55-character limit.
pub fn module_name(package: &str) -> String {
    let mut name: String = format!("dynamos_{package}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    name.truncate(55);
    name
}

/// The package file's folder must exist and the file must not be a folder:
/// found out before anything is built, and nothing is created for it.
fn check_output(output: &Path) -> Result<()> {
    let folder = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Error::Input {
            path: output.to_path_buf(),
            message: format!("output folder {} does not exist", folder.display()),
        }
        .into());
    }
    if output.is_dir() {
        return Err(Error::Input {
            path: output.to_path_buf(),
            message: "is a folder; name the package file to write".into(),
        }
        .into());
    }
    Ok(())
}

/// The kbuild folder modules are built against: the target's headers, or
/// its prepared original tree.
fn kbuild_dir(target: &Target) -> Result<PathBuf> {
    match &target.headers {
        Some(headers) => Ok(headers.clone()),
        None => crate::build::module_build_dir(target),
    }
}

pub fn build_package(request: &BuildRequest) -> Result<BuildReport> {
    let mut timings = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |stage: &'static str, timings: &mut Vec<(&'static str, Duration)>| {
        timings.push((stage, clock.elapsed()));
        clock = Instant::now();
    };

    let first = request.patches.first().context("no patch given")?;
    // Notes of an earlier build in this process are not this one's.
    crate::report::take_notes();
    let name = resolve_package_name(request.name.as_deref(), first)?;
    for replaced in &request.replaces {
        checked_package_name(replaced)?;
        if replaced == &name {
            return Err(Error::Other(format!("package {name} cannot replace itself")).into());
        }
    }
    let output = request
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.dynpkg")));
    check_output(&output)?;
    let module = module_name(&name);
    let key_path = request
        .signing_key
        .clone()
        .unwrap_or_else(|| package::keys::default_dir().join(package::keys::SECRET_FILE));
    if !key_path.exists() {
        anyhow::bail!(
            "no signing key at {}: create one with `dynamos keygen` (or pass --key)",
            key_path.display()
        );
    }
    let signing_key = package::keys::load_signing_key(&key_path)?;
    if let Some(key) = &request.module_signing_key {
        key.check()?;
    }
    let module_source = request
        .module_source
        .as_deref()
        .map(crate::build::external::ModuleSource::open)
        .transpose()?;

    let mut patches = Vec::new();
    let mut digests = Vec::new();
    for path in &request.patches {
        let text = std::fs::read(path).map_err(|e| Error::Input {
            path: path.clone(),
            message: format!("cannot read patch: {e}"),
        })?;
        digests.push(PatchDigest {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: hex::encode(Sha256::digest(&text)),
        });
        let text = String::from_utf8_lossy(&text);
        patches.push(crate::patch::parse(&text, path)?);
    }
    lap("parse patches", &mut timings);

    let target = Target::resolve(&request.target)?;
    let module_signing = match &request.module_signing_key {
        // Its symbols are bound from the image's own symbol table.
        Some(_) if target.shipped_image()?.is_none() => anyhow::bail!(
            "--module-key needs the target's kernel image, whose symbol table fixes each kernel symbol the module uses: it works for Debian targets, not yet for a --src tree"
        ),
        Some(key) => Some(generate::module_signature::ModuleSigning {
            key: key.clone(),
            hash: target.module_signature_hash()?,
        }),
        None => None,
    };
    lap("prepare target", &mut timings);

    // The tree the patches' paths are relative to.
    let patch_root = match &module_source {
        Some(m) => m.root().to_path_buf(),
        None => target.source.clone(),
    };
    let applied = crate::patch::apply_with_fuzz(
        &patches,
        crate::patch::tree_reader(&patch_root),
        request.fuzz,
    )?;
    // A misplaced hunk explains a failed or empty build too.
    for note in &applied.notes {
        crate::report::note(note.clone());
    }
    lap("apply patches", &mut timings);

    let synchronized = crate::synchronize::add_transitional_clones(applied.changes, |path| {
        std::fs::read(patch_root.join(path)).ok()
    })?;
    lap("transitional clones and restore points", &mut timings);

    let mut changes = synchronized.changes.clone();
    let mut shadows = crate::shadow::plan(&mut changes, |path| {
        std::fs::read(patch_root.join(path)).ok()
    })?;
    if !shadows.is_empty() {
        crate::shadow::refuse_unsupported_kernel(&shadows, &target.config)?;
    }
    lap("shadow members", &mut timings);

    // With shadow members, each failed compile names the accesses to
    // rewrite; make stops at the first failing file, so one round each.
    let mut rounds = 0;
    let built = loop {
        let result = match &module_source {
            Some(module) => {
                crate::build::external::build(&target, module, &kbuild_dir(&target)?, &changes)
            }
            None => crate::build::build(&target, &changes),
        };
        match result {
            Err(e) if !shadows.is_empty() && rounds <= changes.len() => {
                let Some(failed) = e.downcast_ref::<crate::build::PatchedCompileFailed>() else {
                    return Err(e);
                };
                if !crate::shadow::rewrite_accesses(&mut changes, &shadows, &failed.log)? {
                    return Err(e);
                }
                rounds += 1;
            }
            result => break result?,
        }
    };
    lap("compile", &mut timings);

    let kbuild_dir = kbuild_dir(&target)?;
    let abi = crate::target::probe::kernel_abi(
        &kbuild_dir,
        &target.work,
        &target.toolchain,
        built.objtool_at_link,
    )?;
    let replace_unchanged: BTreeSet<String> = request.replace_unchanged.iter().cloned().collect();
    let mut objects = Vec::new();
    for pair in &built.pairs {
        let original = ObjectFile::read(&pair.original)?;
        let patched = ObjectFile::read(&pair.patched)?;
        abi.check(&original)?;
        abi.check(&patched)?;
        let diff = diff_objects_replacing(&original, &patched, &replace_unchanged)?;
        objects.push((pair, original, patched, diff));
    }
    let refusals: Vec<Refusal> = objects
        .iter()
        .flat_map(|(pair, _, _, d)| {
            d.refused.iter().map(move |r| Refusal {
                symbol: r.symbol.clone(),
                reason: format!("{} ({})", r.reason, pair.source.display()),
            })
        })
        .collect();
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    let missing: Vec<Refusal> = replace_unchanged
        .iter()
        .filter(|name| {
            !objects
                .iter()
                .any(|(_, _, _, d)| d.changed().contains(name))
        })
        .map(|name| Refusal {
            symbol: name.clone(),
            reason: "--replace-unchanged names no function of the files the patches touch".into(),
        })
        .collect();
    if !missing.is_empty() {
        return Err(Error::Refused(missing).into());
    }
    if !shadows.is_empty() {
        crate::shadow::check_release_points(&mut shadows, objects.iter().map(|(_, _, p, _)| p))?;
    }
    // Files a header change rebuilt can come out the same: nothing to carry.
    objects.retain(|(_, _, _, d)| !d.functions.is_empty() || !d.value_updates.is_empty());
    if objects.is_empty() {
        return Err(Error::NoChange.into());
    }
    lap("diff", &mut timings);

    let work = target
        .work
        .join("modules")
        .join(format!("{module}.{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let units: Vec<TranslationUnit> = objects
        .iter()
        .map(|(pair, original, patched, diff)| TranslationUnit {
            source_file: pair.source.to_string_lossy().into_owned(),
            kernel_object: pair.kernel_object.clone(),
            original,
            patched,
            diff,
        })
        .collect();
    let modules = generate::module_symbols::ModuleContext {
        modules_dir: target.shipped_modules()?,
        original_modules: built.original_modules.clone(),
        exporters: std::fs::read_to_string(kbuild_dir.join("Module.symvers"))
            .map(|s| generate::module_symbols::exporters(&s))
            .unwrap_or_default(),
        vmlinuz: target.shipped_image()?,
    };
    let kernel = generate::TargetKernel {
        kbuild_dir,
        modules,
        abi,
        toolchain: target.toolchain.clone(),
    };
    let generated = generate::generate(
        &name,
        &module,
        &units,
        &generate::Rewritten {
            synchronized: &synchronized,
            shadows: &shadows.types,
        },
        &kernel,
        module_signing.as_ref(),
        &work,
    );
    let _ = std::fs::remove_dir_all(&work);
    let mut generated = generated?;
    generated.notes.extend(shadows.notes());
    // A restarted thread of a function without a restore point starts afresh.
    for without in &synchronized.restore_points.without {
        let restarted = generated
            .objects
            .iter()
            .flat_map(|o| &o.replaced)
            .any(|f| f.restart.is_some() && f.name == without.name && f.file == without.file);
        let locals = std::fs::read(patch_root.join(&without.file))
            .ok()
            .and_then(|text| crate::synchronize::locals_of(&text, &without.name))
            .unwrap_or_default();
        if restarted && !locals.is_empty() {
            generated.notes.push(format!(
                "{} of {}: a restarted thread runs the new version from its start; its locals are not carried ({}): {}",
                without.name,
                without.file,
                without.reason,
                locals.join(", ")
            ));
        }
    }
    lap("generate module", &mut timings);

    let manifest = Manifest {
        name: name.clone(),
        module_name: module,
        tool_version: crate::TOOL_VERSION.to_string(),
        target: TargetIdentity {
            release: target.release.clone(),
            debian_version: target.distribution_version(),
            build_id: target.build_id.clone(),
        },
        patches: digests,
        objects: generated.objects.clone(),
        replaces: request.replaces.clone(),
        shadows: shadows.types.clone(),
    };
    let module_signed = crate::apply::is_signed(&generated.ko);
    let package = Package {
        manifest: manifest.clone(),
        module: generated.ko,
    };
    let bytes = package::write_signed(&package, &signing_key);
    crate::cache::write_atomic(&output, &bytes)?;
    lap("sign and write", &mut timings);

    for note in generated.notes {
        crate::report::note(note);
    }
    Ok(BuildReport {
        package_path: output,
        manifest,
        timings,
        notes: crate::report::take_notes(),
        module_signed,
    })
}
