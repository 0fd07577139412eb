//! Applying, reverting and listing live updates on the running kernel.
//!
//! A package's module is a livepatch module: loading it registers a
//! `klp_patch` named like the module. Its new code refers to kernel symbols
//! that are not exported through undefined symbols (`__dynamos_ext_N`);
//! before loading, each is resolved from /proc/kallsyms and turned into an
//! absolute symbol in the module image, so the kernel's own module loader
//! applies every relocation. The position (`sympos`) of each replaced
//! function among same-named kernel symbols is passed as a module parameter.

pub mod adaptive;
mod image;
pub mod installed;
pub mod kcore;
mod kernel;
pub mod kthreads;
mod list;
pub(crate) mod resolve;
pub mod shadows;
mod stack;
pub mod synchronized;
pub mod values;

pub use image::{is_signed, make_symbols_absolute, modinfo_name};
use kernel::*;
pub use list::{list, list_at, LiveFunction, LiveObject, LiveUpdate};
pub use resolve::{
    choose, file_symbols, kind_matches, object_symbols, parse_kallsyms, resolve, sympos_param,
    Choice, Ksym, ObjectSymbols, Resolution, ResolvedSymbol, NEIGHBOURHOOD,
};

use crate::error::Error;
use crate::package::{self, keys, KeyId, Manifest};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel and dynamos keep what `apply`, `revert` and `list` read.
/// Only tests point these elsewhere.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub livepatch: PathBuf,
    pub sys_module: PathBuf,
    pub kallsyms: PathBuf,
    /// The running kernel's memory, read to verify its code (run-pre).
    pub kcore: PathBuf,
    pub proc: PathBuf,
    /// One `<module_name>.json` record per applied package: state of this
    /// boot's kernel, so it lives in /run and no reboot inherits it.
    pub state_dir: PathBuf,
    /// Installed packages, one folder per kernel release (`installed.rs`).
    pub installed: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        SystemPaths {
            livepatch: "/sys/kernel/livepatch".into(),
            sys_module: "/sys/module".into(),
            kallsyms: "/proc/kallsyms".into(),
            kcore: "/proc/kcore".into(),
            proc: "/proc".into(),
            state_dir: "/run/dynamos/applied".into(),
            installed: "/var/lib/dynamos/installed".into(),
        }
    }
}

pub const DEFAULT_TRUSTED_DIR: &str = "/etc/dynamos/trusted.d";
pub const DEFAULT_TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Folders of trusted `*.pub` keys.
    pub trusted_dirs: Vec<PathBuf>,
    /// Further trusted public key files (`--trust FILE`).
    pub extra_trust: Vec<PathBuf>,
    /// How long the livepatch transition may take before the update is
    /// reversed and unloaded.
    pub transition_timeout: Duration,
    pub paths: SystemPaths,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            trusted_dirs: vec![DEFAULT_TRUSTED_DIR.into()],
            extra_trust: Vec::new(),
            transition_timeout: DEFAULT_TRANSITION_TIMEOUT,
            paths: SystemPaths::default(),
        }
    }
}

/// What `dynamos apply` did.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedPackage {
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// The `sympos` parameter given to the module, in manifest order.
    pub sympos: Vec<u32>,
    pub resolved: Vec<ResolvedSymbol>,
    /// Functions whose running code was verified before loading.
    pub verified_functions: usize,
    /// Module objects that were not loaded: patched as they load.
    pub not_loaded: Vec<String>,
    /// How long the livepatch transition took.
    pub transition: Duration,
    /// Modules of the updates a cumulative package superseded, unloaded.
    pub retired: Vec<String>,
    /// Superseded updates that could not be unloaded or forgotten (they are
    /// no longer live; only their modules or records remain).
    pub retire_problems: Vec<String>,
    /// The phases of the synchronized functions, when the package has any.
    pub synchronized: Option<synchronized::Report>,
    /// Kernel threads restarted into the new version.
    pub restarted: Vec<kthreads::RestartedThread>,
}

/// The record kept in the state folder for each applied package.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub manifest: Manifest,
    pub key_id: String,
    pub module_sha256: String,
    pub sympos: Vec<u32>,
    /// Nanoseconds since the Unix epoch; orders `revert` of everything.
    pub applied_at_ns: u64,
    /// Modules of earlier updates whose versions this one's dispatchers
    /// fall back to: they stay until this one is reverted.
    #[serde(default)]
    pub falls_back_to: Vec<String>,
    /// Kernel threads restarted into the new version.
    #[serde(default)]
    pub restarted: Vec<kthreads::RestartedThread>,
}

/// The applied records a cumulative update would retire (by module name).
pub(crate) fn retired_records<'a>(
    applied: &'a [AppliedRecord],
    retiring: &'a [String],
) -> impl Iterator<Item = &'a AppliedRecord> {
    applied
        .iter()
        .filter(move |r| retiring.contains(&r.manifest.module_name))
}

#[cfg(test)]
impl AppliedRecord {
    /// The record of `manifest` applied, named `name` (`dynamos_<name>`).
    pub(crate) fn for_test(mut manifest: Manifest, name: &str) -> AppliedRecord {
        manifest.name = name.into();
        manifest.module_name = format!("dynamos_{name}");
        AppliedRecord {
            manifest,
            key_id: "00".into(),
            module_sha256: "00".into(),
            sympos: vec![],
            applied_at_ns: 1,
            falls_back_to: Vec::new(),
            restarted: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// apply
// ---------------------------------------------------------------------------

/// Collect the trusted keys: every `*.pub` of the trusted folders and the
/// extra files.
pub fn trusted_keys(opts: &ApplyOptions) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    let mut keys_out = Vec::new();
    for dir in &opts.trusted_dirs {
        keys_out.extend(keys::load_trusted_dir(dir)?);
    }
    for file in &opts.extra_trust {
        keys_out.push(keys::load_public_key(file)?);
    }
    Ok(keys_out)
}

/// Apply the package at `pkg_path` to the running kernel.
pub fn apply(pkg_path: &Path, opts: &ApplyOptions) -> Result<AppliedPackage> {
    // Nothing is looked at before the package proves who made it.
    let bytes = package::read_file(pkg_path)?;
    let trusted = trusted_keys(opts)?;
    let pkg = package::read_verified(&bytes, &trusted)
        .with_context(|| format!("{}", pkg_path.display()))?;
    let signer = package::read_unverified(&bytes)?.1;
    let manifest = &pkg.manifest;
    let name = &manifest.module_name;
    check_name(name)?;

    let running = kernel_release()?;
    if running != manifest.target.release {
        return Err(Error::refused(
            &manifest.name,
            format!(
                "built for kernel {} but the running kernel is {running}",
                manifest.target.release
            ),
        )
        .into());
    }
    // The same release string can name different builds: the build-id
    // tells them apart.
    if let (Some(wanted), Some(running_id)) = (
        manifest.target.build_id.as_deref(),
        crate::identity::running_build_id()?,
    ) {
        if wanted != running_id {
            return Err(Error::refused(
                &manifest.name,
                format!(
                    "built for kernel {running} with build-id {wanted} but the running kernel's build-id is {running_id}"
                ),
            )
            .into());
        }
    }
    let paths = &opts.paths;
    if !paths.livepatch.is_dir() {
        bail!(
            "{} does not exist: this kernel has no livepatch support",
            paths.livepatch.display()
        );
    }
    if let Some(inner) = modinfo_name(&pkg.module)? {
        if &inner != name {
            bail!("package module is named {inner} but the manifest says {name}");
        }
    }
    require_root("apply")?;
    let _lock = lock(paths)?;
    if paths.livepatch.join(name).exists() || paths.sys_module.join(name).exists() {
        return Err(Error::refused(
            name,
            "a module or livepatch of this name is already loaded (see dynamos list)",
        )
        .into());
    }
    kthreads::refuse_replaced_thread_functions(manifest, &paths.proc)?;
    // A cumulative update retires every live patch: each must be one it
    // says it supersedes, or applying it would silently undo another fix.
    let retiring = if manifest.replaces.is_empty() {
        Vec::new()
    } else {
        retired_by(paths, manifest)?
    };
    let records = read_records(paths)?;
    values::refuse_retiring_value_updates(manifest, &records, &retiring)?;
    shadows::refuse_retiring_shadows(manifest, &records, &retiring)?;
    kthreads::refuse_stacked_restarts(manifest, &records)?;

    let text = fs::read_to_string(&paths.kallsyms)
        .with_context(|| format!("cannot read {}", paths.kallsyms.display()))?;
    let kallsyms = parse_kallsyms(&text)?;
    let memory = kcore::Kcore::open(&paths.kcore)?;
    let resolution = resolve(manifest, &kallsyms, &memory)?;
    values::check_running_values(manifest, &resolution.externals, &memory, &records)?;
    let mut image = pkg.module.clone();
    let values: Vec<(String, u64)> = resolution
        .externals
        .iter()
        .filter(|r| !r.bound_at_build)
        .map(|r| (r.module_symbol.clone(), r.address))
        .collect();
    // A signed module loads as built: any edit would void its signature.
    if is_signed(&image) && !values.is_empty() {
        bail!("package module is signed but leaves kernel symbols to bind at apply; rebuild it with this dynamos");
    }
    make_symbols_absolute(&mut image, &values)?;

    let fallbacks = adaptive::fallbacks(
        manifest,
        &read_records(paths)?,
        &live_patch_names(paths)?,
        &kallsyms,
    )?;
    let mut params = sympos_param(&resolution.sympos);
    if !manifest.replaces.is_empty() {
        params = format!("{params} replace=1").trim_start().to_string();
    }
    let previous = adaptive::previous_param(&fallbacks);
    if !previous.is_empty() {
        params = format!("{params} {previous}").trim_start().to_string();
    }
    let mut falls_back_to: Vec<String> = fallbacks
        .iter()
        .filter_map(|f| f.package_module.clone())
        .collect();
    falls_back_to.sort();
    falls_back_to.dedup();
    if let Err(e) = init_module(&image, &params) {
        values::refuse_changed_before_write(manifest, &e)?;
        let hint = match e.raw_os_error() {
            Some(errno @ (libc::EKEYREJECTED | libc::ENOKEY | libc::EPERM)) => {
                signature_refusal_hint(paths, &image, errno)
            }
            Some(libc::EEXIST) => " (a module of this name is already loaded)".into(),
            _ => " (see dmesg)".into(),
        };
        bail!("the kernel refused to load module {name}: {e}{hint}");
    }

    // From here on, any failure must leave no module behind.
    let timeout = opts.transition_timeout;
    let started = Instant::now();
    #[allow(clippy::type_complexity)]
    let result = (|| -> Result<(
        Duration,
        Option<synchronized::Report>,
        Vec<kthreads::RestartedThread>,
    )> {
        if !paths.livepatch.join(name).is_dir() {
            bail!("module {name} loaded but registered no livepatch {name}");
        }
        if !wait_transition(paths, name, timeout) {
            let blockers = blocking_tasks(paths, name);
            bail!(
                "the livepatch transition did not finish within {}s{}",
                timeout.as_secs(),
                describe_blockers(&blockers)
            );
        }
        if read_trimmed(&paths.livepatch.join(name).join("enabled")).as_deref() != Some("1") {
            bail!("livepatch {name} is not enabled after loading");
        }
        let took = started.elapsed();
        let phases = synchronized::forward(paths, manifest, name, timeout)?;
        let restarted = kthreads::restart(paths, manifest, name, "new")?;
        let record = AppliedRecord {
            manifest: manifest.clone(),
            key_id: signer.to_string(),
            module_sha256: hex::encode(Sha256::digest(&pkg.module)),
            sympos: resolution.sympos.clone(),
            applied_at_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            falls_back_to: falls_back_to.clone(),
            restarted: restarted.clone(),
        };
        let json = serde_json::to_vec_pretty(&record)?;
        crate::cache::write_atomic(&record_path(paths, name), &json)?;
        Ok((took, phases, restarted))
    })();
    match result {
        Ok((transition, synchronized, restarted)) => {
            let (retired, retire_problems) = unload_retired(paths, &retiring, timeout);
            Ok(AppliedPackage {
                manifest: manifest.clone(),
                key_id: signer,
                sympos: resolution.sympos,
                resolved: resolution.externals,
                verified_functions: resolution.verified_functions,
                not_loaded: resolution.not_loaded.clone(),
                transition,
                retired,
                retire_problems,
                synchronized,
                restarted,
            })
        }
        Err(err) => {
            // Threads restarted before the failure run the module's code.
            let back = kthreads::restart(paths, manifest, name, "original");
            let cleanup =
                disable_and_unload(paths, name, timeout, false).and_then(|()| back.map(|_| ()));
            match cleanup {
                Ok(()) => Err(anyhow!(
                    "{err:#}; update {} was reverted and unloaded",
                    manifest.name
                )),
                Err(c) => Err(anyhow!("{err:#}; reverting it failed too: {c:#}")),
            }
        }
    }
}

/// Why the kernel may have refused a module with `errno` (EKEYREJECTED,
/// ENOKEY or EPERM), and what to do about it.
fn signature_refusal_hint(paths: &SystemPaths, image: &[u8], errno: i32) -> String {
    let enforced = fs::read_to_string(paths.sys_module.join("module/parameters/sig_enforce"))
        .is_ok_and(|v| v.trim() == "Y");
    let modules_disabled = fs::read_to_string(paths.proc.join("sys/kernel/modules_disabled"))
        .is_ok_and(|v| v.trim() == "1");
    if errno == libc::EPERM && modules_disabled {
        return " (module loading is switched off: kernel.modules_disabled is 1 until the next boot)"
            .into();
    }
    let signed = is_signed(image);
    // Without enforcement only a signature that fails its check is fatal.
    if signed && !enforced && errno == libc::EKEYREJECTED {
        return " (the module's signature does not verify against the key that made it: the package's module was changed after it was signed, or signed with a certificate that is not its key's; build it again)".into();
    }
    let rule = if enforced {
        "this kernel only loads modules signed by a key it trusts (module.sig_enforce)"
    } else {
        "module signature enforcement or kernel lockdown forbids loading it"
    };
    if signed {
        format!(" ({rule}, and it does not trust the key that signed this package's module: enroll that key's certificate, e.g. `mokutil --import CERT.der` and a reboot, or build with a key it trusts)")
    } else {
        format!(" ({rule}, and this package's module is unsigned: build it with `dynamos-build --module-key KEY --module-cert CERT`, a key the kernel trusts)")
    }
}

/// The module names of the live patches a cumulative `manifest` would
/// retire; refused when one of them is not among those it supersedes.
fn retired_by(paths: &SystemPaths, manifest: &Manifest) -> Result<Vec<String>> {
    let records = read_records(paths)?;
    let mut retiring = Vec::new();
    let mut refusals = Vec::new();
    for live in live_patch_names(paths)? {
        let package = records
            .iter()
            .find(|r| r.manifest.module_name == live)
            .map(|r| r.manifest.name.clone());
        let covered = manifest
            .replaces
            .iter()
            .any(|r| *r == live || Some(r) == package.as_ref());
        let own_redirects = records
            .iter()
            .find(|r| r.manifest.module_name == live)
            .map(|r| {
                let mut functions = synchronized::functions(&r.manifest);
                functions.extend(kthreads::restarted_functions(&r.manifest));
                functions
            })
            .unwrap_or_default();
        if covered && !own_redirects.is_empty() {
            // The livepatch core retires livepatches, not the module's own redirects.
            refusals.push(crate::Refusal {
                symbol: manifest.name.clone(),
                reason: format!(
                    "cumulative update would retire {} whose synchronized or restarted thread functions ({}) only `dynamos revert` moves back; revert it first",
                    package.as_deref().unwrap_or(&live),
                    own_redirects.join(", ")
                ),
            });
        } else if covered {
            retiring.push(live);
        } else {
            let other = package.as_deref().unwrap_or(&live);
            refusals.push(crate::Refusal {
                symbol: manifest.name.clone(),
                reason: format!(
                    "cumulative update would also retire live update {other} that it does not supersede; revert that first or rebuild with --replaces {other}"
                ),
            });
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(retiring)
}

fn live_patch_names(paths: &SystemPaths) -> Result<Vec<String>> {
    let mut names: Vec<String> = match fs::read_dir(&paths.livepatch) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.livepatch.display()))
        }
    };
    names.sort();
    Ok(names)
}

/// After a cumulative update's transition the livepatch core has disabled
/// and released the patches it replaced; unload their modules and forget
/// their records.
fn unload_retired(
    paths: &SystemPaths,
    retiring: &[String],
    timeout: Duration,
) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut problems = Vec::new();
    for module in retiring {
        let started = Instant::now();
        while paths.livepatch.join(module).exists() && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(100));
        }
        match unload_module(paths, module, timeout) {
            Ok(()) => {
                let record = record_path(paths, module);
                match fs::remove_file(&record) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => problems.push(format!(
                        "{module}: unloaded, but cannot remove {}: {e}",
                        record.display()
                    )),
                    _ => {}
                }
                done.push(module.clone());
            }
            Err(e) => problems.push(format!("{module}: {e:#}")),
        }
    }
    (done, problems)
}

// ---------------------------------------------------------------------------
// revert and list
// ---------------------------------------------------------------------------

fn read_records(paths: &SystemPaths) -> Result<Vec<AppliedRecord>> {
    let entries = match fs::read_dir(&paths.state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.state_dir.display()))
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') || !file.ends_with(".json") {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let record: AppliedRecord = serde_json::from_str(&text)
            .with_context(|| format!("{}: damaged state record", path.display()))?;
        out.push(record);
    }
    out.sort_by_key(|r| r.applied_at_ns);
    Ok(out)
}

/// Map a package or module name to the module name of an applied update.
fn module_for(paths: &SystemPaths, records: &[AppliedRecord], name: &str) -> Result<String> {
    if let Some(r) = records.iter().find(|r| r.manifest.module_name == name) {
        return Ok(r.manifest.module_name.clone());
    }
    let by_package: Vec<&AppliedRecord> =
        records.iter().filter(|r| r.manifest.name == name).collect();
    match by_package.len() {
        1 => return Ok(by_package[0].manifest.module_name.clone()),
        0 => {}
        _ => bail!(
            "several applied updates are named {name}; give the module name ({})",
            by_package
                .iter()
                .map(|r| r.manifest.module_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    check_name(name)?;
    if paths.livepatch.join(name).is_dir() {
        return Ok(name.to_string());
    }
    bail!("no applied live update named {name}")
}

/// Revert one update (by package or module name), or every update applied
/// by dynamos, newest first. Returns the module names reverted.
pub fn revert(name: Option<&str>, timeout: Duration) -> Result<Vec<String>> {
    revert_at(&SystemPaths::default(), name, timeout)
}

pub fn revert_at(
    paths: &SystemPaths,
    name: Option<&str>,
    timeout: Duration,
) -> Result<Vec<String>> {
    let _lock = lock(paths)?;
    let records = read_records(paths)?;
    let modules: Vec<String> = match name {
        Some(n) => vec![module_for(paths, &records, n)?],
        None => records
            .iter()
            .rev()
            .map(|r| r.manifest.module_name.clone())
            .collect(),
    };
    let mut done = Vec::new();
    for module in modules {
        check_name(&module)?;
        let remaining: Vec<AppliedRecord> = records
            .iter()
            .filter(|r| !done.contains(&r.manifest.module_name))
            .cloned()
            .collect();
        let dependents = adaptive::dependents(&remaining, &module);
        if !dependents.is_empty() {
            return Err(Error::refused(
                &module,
                format!(
                    "revert {} first: its adaptation handlers fall back to this update's versions",
                    dependents.join(", ")
                ),
            )
            .into());
        }
        let manifest = records
            .iter()
            .find(|r| r.manifest.module_name == module)
            .map(|r| &r.manifest);
        if let Some(manifest) = manifest {
            kthreads::restart(paths, manifest, &module, "original")
                .with_context(|| format!("reverting {module}"))?;
            synchronized::backward(paths, manifest, &module, timeout)
                .with_context(|| format!("reverting {module}"))?;
        }
        let unloaded = disable_and_unload(paths, &module, timeout, true);
        if unloaded.is_err() {
            // Switched back on: its synchronized functions follow.
            if let Some(manifest) = manifest {
                let _ = synchronized::forward(paths, manifest, &module, timeout);
            }
        }
        unloaded.with_context(|| {
            if done.is_empty() {
                format!("reverting {module}")
            } else {
                format!("reverting {module} (already reverted: {})", done.join(", "))
            }
        })?;
        let record = record_path(paths, &module);
        if record.exists() {
            fs::remove_file(&record)
                .with_context(|| format!("cannot remove {}", record.display()))?;
        }
        done.push(module);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::resolve::tests::manifest;
    use super::*;

    #[test]
    fn apply_checks_trust_and_kernel_first() {
        use crate::package::{write_signed, Package};
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_system(dir.path());
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let trust = dir.path().join("trusted.d");
        fs::create_dir(&trust).unwrap();
        let write = |release: &str| {
            let mut m = manifest();
            m.target.release = release.into();
            let bytes = write_signed(
                &Package {
                    manifest: m,
                    module: vec![],
                },
                &key,
            );
            let path = dir.path().join("fix.dynamos");
            fs::write(&path, bytes).unwrap();
            path
        };
        let opts = ApplyOptions {
            trusted_dirs: vec![trust.clone()],
            extra_trust: vec![],
            transition_timeout: Duration::from_secs(1),
            paths: paths.clone(),
        };
        // Untrusted: refused naming the key, whatever else is wrong.
        let pkg = write("no-such-kernel");
        let err = apply(&pkg, &opts).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let id = KeyId::of(&key.verifying_key()).to_string();
        assert!(format!("{err:#}").contains(&id), "{err:#}");

        // Trusted, built for another kernel: refused naming both.
        fs::write(trust.join("k.pub"), keys::public_line(&key.verifying_key())).unwrap();
        let err = apply(&pkg, &opts).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let running = kernel_release().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("no-such-kernel") && text.contains(&running),
            "{text}"
        );

        // Right kernel, no livepatch support (the fake sysfs is empty).
        let pkg = write(&running);
        let err = apply(&pkg, &opts).unwrap_err();
        assert!(
            format!("{err:#}").contains("no livepatch support"),
            "{err:#}"
        );

        // A corrupted file never gets that far.
        let mut bytes = fs::read(&pkg).unwrap();
        bytes[20] ^= 4;
        fs::write(&pkg, bytes).unwrap();
        let err = apply(&pkg, &opts).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
    }

    #[test]
    fn the_blocking_frame_is_the_patched_function_on_the_stack() {
        let stack = "[<0>] __schedule+0x2f0/0x8a0\n[<0>] schedule+0x5a/0xd0\n\
                     [<0>] kernel_clone+0x1d4/0x3d0\n[<0>] __do_sys_vfork+0x65/0x90\n";
        let patched = vec!["kernel_clone".to_string()];
        assert_eq!(
            blocking_frame(stack, &patched).as_deref(),
            Some("kernel_clone+0x1d4/0x3d0")
        );
        assert_eq!(
            blocking_frame(stack, &[]).as_deref(),
            Some("__schedule+0x2f0/0x8a0")
        );
        assert_eq!(blocking_frame("", &patched), None);
    }

    fn fake_system(root: &Path) -> SystemPaths {
        SystemPaths {
            livepatch: root.join("livepatch"),
            sys_module: root.join("module"),
            kallsyms: root.join("kallsyms"),
            kcore: root.join("kcore"),
            proc: root.join("proc"),
            state_dir: root.join("state"),
            installed: root.join("installed"),
        }
    }

    #[test]
    fn lists_livepatches_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_system(dir.path());
        let lp = paths.livepatch.join("dynamos_fix");
        fs::create_dir_all(lp.join("vmlinux/show,2")).unwrap();
        fs::create_dir_all(lp.join("vmlinux/a_helper,0")).unwrap();
        fs::write(lp.join("vmlinux/patched"), "1\n").unwrap();
        fs::write(lp.join("enabled"), "1\n").unwrap();
        fs::write(lp.join("transition"), "0\n").unwrap();
        let other = paths.livepatch.join("kpatch_x");
        fs::create_dir_all(other.join("vmlinux")).unwrap();
        fs::write(other.join("enabled"), "0\n").unwrap();
        fs::write(other.join("transition"), "1\n").unwrap();
        let record = |module: &str, at: u64| {
            let mut m = manifest();
            m.module_name = module.into();
            let r = AppliedRecord {
                manifest: m,
                key_id: "00".into(),
                module_sha256: "00".into(),
                sympos: vec![0, 2],
                applied_at_ns: at,
                falls_back_to: Vec::new(),
                restarted: Vec::new(),
            };
            crate::cache::write_atomic(
                &record_path(&paths, module),
                &serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        };
        record("dynamos_fix", 1);
        record("dynamos_gone", 2);

        let l = list_at(&paths).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].name, "dynamos_fix");
        assert_eq!(l[0].package.as_deref(), Some("fix"));
        assert!(l[0].enabled && !l[0].transition && l[0].in_kernel);
        assert_eq!(l[0].objects[0].patched, Some(true));
        assert_eq!(
            l[0].objects[0].functions,
            vec![
                LiveFunction {
                    name: "a_helper".into(),
                    sympos: Some(0)
                },
                LiveFunction {
                    name: "show".into(),
                    sympos: Some(2)
                }
            ]
        );
        assert_eq!(l[1].name, "kpatch_x");
        assert!(l[1].package.is_none() && !l[1].enabled && l[1].transition);
        assert_eq!(l[2].name, "dynamos_gone");
        assert!(!l[2].in_kernel);
        assert_eq!(l[2].objects[0].functions[1].sympos, Some(2));

        let records = read_records(&paths).unwrap();
        assert_eq!(
            module_for(&paths, &records, "dynamos_gone").unwrap(),
            "dynamos_gone"
        );
        assert!(module_for(&paths, &records, "fix")
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert_eq!(
            module_for(&paths, &records, "kpatch_x").unwrap(),
            "kpatch_x"
        );
        assert!(module_for(&paths, &records, "../etc").is_err());
        assert!(module_for(&paths, &records, "absent").is_err());
    }
}
