//! Installed packages: kept per kernel release, applied at boot by
//! `dynamos boot`, and held back after a boot-time apply the machine did
//! not survive. The layout and the crash guard are in docs/fleet.md.
//!
//! Invariant: a package's boot record says `started` on disk before its
//! module is loaded and `applied` only after the transition finished, so a
//! machine that dies in between, or before `boot --confirm` runs, leaves a
//! record of an earlier boot that is not `confirmed`.

use super::*;
use crate::cache::{sync_dir, write_durable};
use crate::package::Manifest;

/// How far the last boot-time apply of a package got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootStage {
    /// The module was about to be loaded.
    Started,
    /// The update went live; the boot was not yet confirmed as surviving it.
    Applied,
    /// `dynamos boot --confirm` ran in the same boot after the apply.
    Confirmed,
    /// The apply failed cleanly (nothing loaded); it is tried again at the
    /// next boot.
    Failed,
}

/// The last boot-time apply of one installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootAttempt {
    /// `/proc/sys/kernel/random/boot_id` of that boot.
    pub boot_id: String,
    pub stage: BootStage,
    /// Seconds since the Unix epoch when the stage was recorded.
    pub at: u64,
    /// Why the apply failed, for `Failed`.
    #[serde(default)]
    pub message: Option<String>,
}

/// What is recorded beside each installed package.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    pub last: Option<BootAttempt>,
    /// Why the package is not applied at boot until `dynamos unhold`.
    pub held: Option<String>,
}

/// One installed package.
#[derive(Debug, Clone, Serialize)]
pub struct InstalledPackage {
    /// Install order within its kernel release, from 1.
    pub order: u32,
    pub name: String,
    pub release: String,
    pub path: PathBuf,
    #[serde(skip)]
    pub manifest: Manifest,
    pub record: BootRecord,
}

impl InstalledPackage {
    fn record_path(&self) -> PathBuf {
        self.path.with_extension("json")
    }
}

/// What `dynamos install` did; serialized, it is `install --json`'s output.
#[derive(Debug, Clone, Serialize)]
pub struct Installation {
    #[serde(rename = "package")]
    pub name: String,
    pub release: String,
    pub order: u32,
    pub path: PathBuf,
    #[serde(rename = "status")]
    pub change: InstallChange,
}

/// What an install changed in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallChange {
    Installed,
    /// Another package of the same name was installed; this one took its
    /// place in the order, and its hold if it had one.
    Replaced,
    /// The same package was installed already: nothing changed.
    Unchanged,
}

/// What `dynamos boot` did with one installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum BootOutcome {
    Applied,
    AlreadyLive,
    /// Another installed package replaces it.
    Superseded {
        by: String,
    },
    /// Not applied until an administrator runs `dynamos unhold`.
    Held {
        reason: String,
    },
    Failed {
        message: String,
    },
}

impl BootOutcome {
    /// Whether the package's changes are live (or carried by a later one).
    pub fn is_fine(&self) -> bool {
        matches!(
            self,
            BootOutcome::Applied | BootOutcome::AlreadyLive | BootOutcome::Superseded { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BootResult {
    pub name: String,
    #[serde(flatten)]
    pub outcome: BootOutcome,
}

/// The file extension of an installed package; its record ends in `.json`.
const PACKAGE_EXTENSION: &str = "dynamos";

/// Verify `package` and store it for the kernel release it targets. Applying
/// it now is `apply`; `boot` applies it at every boot of that kernel.
pub fn install(package: &Path, opts: &ApplyOptions) -> Result<Installation> {
    let paths = &opts.paths;
    let bytes = package::read_file(package)?;
    let pkg = package::read_verified(&bytes, &trusted_keys(opts)?)
        .with_context(|| format!("{}", package.display()))?;
    let manifest = &pkg.manifest;
    check_file_name(&manifest.name, "package name")?;
    check_file_name(&manifest.target.release, "kernel release")?;
    require_root("install")?;
    let _lock = store_lock(paths)?;
    let installed = installed_at(paths)?;
    let release = &manifest.target.release;
    if let Some(same) = installed
        .iter()
        .find(|p| &p.release == release && p.name == manifest.name)
    {
        let stored =
            fs::read(&same.path).with_context(|| format!("cannot read {}", same.path.display()))?;
        let change = if stored == bytes {
            InstallChange::Unchanged
        } else {
            InstallChange::Replaced
        };
        if change == InstallChange::Replaced {
            // A rebuilt fix of the same name (a .deb upgrade) takes the
            // old one's place in the order, and any hold stays.
            let record = BootRecord {
                last: None,
                held: same.record.held.clone(),
            };
            write_durable(&same.record_path(), &serde_json::to_vec_pretty(&record)?)?;
            write_durable(&same.path, &bytes)?;
        }
        return Ok(Installation {
            name: same.name.clone(),
            release: release.clone(),
            order: same.order,
            path: same.path.clone(),
            change,
        });
    }
    let order = installed
        .iter()
        .filter(|p| &p.release == release)
        .map(|p| p.order)
        .max()
        .unwrap_or(0)
        + 1;
    let path = paths
        .installed
        .join(release)
        .join(format!("{order:04}-{}.{PACKAGE_EXTENSION}", manifest.name));
    // The record first: a package file without one is never listed.
    write_durable(
        &path.with_extension("json"),
        &serde_json::to_vec_pretty(&BootRecord::default())?,
    )?;
    write_durable(&path, &bytes)?;
    Ok(Installation {
        name: manifest.name.clone(),
        release: release.clone(),
        order,
        path,
        change: InstallChange::Installed,
    })
}

/// What `dynamos uninstall` did; serialized, it is `uninstall --json`'s
/// output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename = "uninstalled")]
pub struct Uninstallation {
    #[serde(rename = "package")]
    pub name: String,
    /// The kernel releases it was installed for.
    pub releases: Vec<String>,
    /// Its update is live in the running kernel, and stays so until
    /// `dynamos revert`.
    pub still_applied: bool,
}

/// What `dynamos unhold` did; serialized, it is `unhold --json`'s output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename = "unheld")]
pub struct Unhold {
    #[serde(rename = "package")]
    pub name: String,
    /// The kernel releases it was held for.
    pub releases: Vec<String>,
}

/// Remove the installed package `name` (for `release`, or for every
/// release). An applied update stays applied until `revert`.
pub fn uninstall(paths: &SystemPaths, name: &str, release: Option<&str>) -> Result<Uninstallation> {
    require_root("uninstall")?;
    remove_installed(paths, name, release)
}

/// `uninstall` past its root check.
fn remove_installed(
    paths: &SystemPaths,
    name: &str,
    release: Option<&str>,
) -> Result<Uninstallation> {
    let _lock = store_lock(paths)?;
    let matching: Vec<InstalledPackage> = installed_at(paths)?
        .into_iter()
        .filter(|p| p.name == name && release.is_none_or(|r| r == p.release))
        .collect();
    if matching.is_empty() {
        bail!(
            "no package named {name} is installed{} (see dynamos list)",
            release.map(|r| format!(" for {r}")).unwrap_or_default()
        );
    }
    // Read before removing anything, so that a failure leaves the store
    // as it was.
    let live = live_patch_names(paths)?;
    let still_applied = matching
        .iter()
        .any(|p| live.contains(&p.manifest.module_name));
    let mut releases = Vec::new();
    for p in matching {
        fs::remove_file(&p.path).with_context(|| format!("cannot remove {}", p.path.display()))?;
        // The record goes last: without a package it is ignored.
        let _ = fs::remove_file(p.record_path());
        if let Some(dir) = p.path.parent() {
            sync_dir(dir)?;
        }
        releases.push(p.release);
    }
    Ok(Uninstallation {
        name: name.to_string(),
        releases,
        still_applied,
    })
}

/// Let a held package be applied at boot again.
pub fn unhold(paths: &SystemPaths, name: &str) -> Result<Unhold> {
    require_root("unhold")?;
    clear_hold(paths, name)
}

/// `unhold` past its root check.
fn clear_hold(paths: &SystemPaths, name: &str) -> Result<Unhold> {
    let _lock = store_lock(paths)?;
    let mut releases = Vec::new();
    for mut p in installed_at(paths)? {
        if p.name == name && p.record.held.is_some() {
            p.record.held = None;
            write_record(&p)?;
            releases.push(p.release);
        }
    }
    if releases.is_empty() {
        bail!("no installed package named {name} is held (see dynamos list)");
    }
    Ok(Unhold {
        name: name.to_string(),
        releases,
    })
}

/// Every installed package, by release and then install order. Files that
/// are not `NNNN-NAME.dynamos` with a record beside them are ignored.
pub fn installed_at(paths: &SystemPaths) -> Result<Vec<InstalledPackage>> {
    let mut out = Vec::new();
    let releases = match fs::read_dir(&paths.installed) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.installed.display()))
        }
    };
    for release_dir in releases.flatten() {
        let release = release_dir.file_name().to_string_lossy().into_owned();
        if release.starts_with('.') || !release_dir.path().is_dir() {
            continue;
        }
        let entries = fs::read_dir(release_dir.path())
            .with_context(|| format!("cannot read {}", release_dir.path().display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(&format!(".{PACKAGE_EXTENSION}")) else {
                continue;
            };
            let Some((order, name)) = stem.split_once('-') else {
                continue;
            };
            let Ok(order) = order.parse::<u32>() else {
                continue;
            };
            let record_path = path.with_extension("json");
            if !record_path.exists() {
                continue;
            }
            // One damaged entry must not keep the others from booting.
            let read = || -> Result<(BootRecord, Manifest)> {
                let text = fs::read(&record_path)
                    .with_context(|| format!("cannot read {}", record_path.display()))?;
                let record = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is damaged", record_path.display()))?;
                let bytes = package::read_file(&path)?;
                let manifest = package::read_unverified(&bytes)
                    .with_context(|| format!("{}", path.display()))?
                    .0
                    .manifest;
                Ok((record, manifest))
            };
            let (record, manifest) = match read() {
                Ok(read) => read,
                Err(err) => {
                    crate::report::note(format!("skipped an installed package: {err:#}"));
                    continue;
                }
            };
            out.push(InstalledPackage {
                order,
                name: name.to_string(),
                release: release.clone(),
                path,
                manifest,
                record,
            });
        }
    }
    out.sort_by(|a, b| (&a.release, a.order).cmp(&(&b.release, b.order)));
    Ok(out)
}

/// Apply, in install order, every installed package for the running kernel
/// that is not held, superseded or already live. The crash guard runs
/// first: a package whose last boot-time apply belongs to an earlier boot
/// and was never confirmed is held.
pub fn boot(opts: &ApplyOptions) -> Result<Vec<BootResult>> {
    let paths = &opts.paths;
    require_root("boot")?;
    let release = kernel_release()?;
    let boot_id = boot_id(paths)?;
    // The whole run holds the store: a second `boot`, an install or an
    // unhold waits instead of writing records from an older reading.
    let _lock = store_lock(paths)?;
    let mut packages: Vec<InstalledPackage> = installed_at(paths)?
        .into_iter()
        .filter(|p| p.release == release)
        .collect();
    for p in &mut packages {
        if let Some(reason) = crash_reason(&p.record, &boot_id) {
            // The attempt is judged: its story is in the reason now,
            // and `unhold` must not see it again.
            p.record.held = Some(reason);
            p.record.last = None;
            write_record(p)?;
        }
    }
    let live = live_patch_names(paths)?;
    let decided = decide(&packages, &live);
    let mut outcomes = Vec::with_capacity(packages.len());
    for (p, decision) in packages.iter_mut().zip(decided) {
        outcomes.push(match decision {
            Some(outcome) => outcome,
            None => apply_at_boot(paths, p, &boot_id, opts)?,
        });
    }
    // A cumulative package that failed leaves the fixes it replaces to
    // their own packages, rather than none live.
    for i in 0..packages.len() {
        let BootOutcome::Superseded { by } = &outcomes[i] else {
            continue;
        };
        let failed = packages
            .iter()
            .zip(&outcomes)
            .any(|(p, o)| &p.name == by && matches!(o, BootOutcome::Failed { .. }));
        if failed {
            outcomes[i] = apply_at_boot(paths, &mut packages[i], &boot_id, opts)?;
        }
    }
    Ok(packages
        .iter()
        .zip(outcomes)
        .map(|(p, outcome)| BootResult {
            name: p.name.clone(),
            outcome,
        })
        .collect())
}

/// Apply one installed package, its record saying `started` on disk
/// before the module loads and `applied` or `failed` after.
fn apply_at_boot(
    paths: &SystemPaths,
    p: &mut InstalledPackage,
    boot_id: &str,
    opts: &ApplyOptions,
) -> Result<BootOutcome> {
    record_stage(p, boot_id, BootStage::Started, None)?;
    match super::apply(&p.path, opts) {
        Ok(_) => {
            record_stage(p, boot_id, BootStage::Applied, None)?;
            Ok(BootOutcome::Applied)
        }
        Err(err) => {
            let message = format!("{err:#}");
            // A failure that left the module loaded (its rollback failed
            // too) is not clean: the record stays `started`, so the guard
            // holds it if the machine does not survive.
            if !paths.sys_module.join(&p.manifest.module_name).exists() {
                record_stage(p, boot_id, BootStage::Failed, Some(message.clone()))?;
            }
            Ok(BootOutcome::Failed { message })
        }
    }
}

/// What becomes of each installed package without applying it; `None`
/// means apply it. A package is superseded by any other installed one that
/// replaces it (whatever their install order: apt may configure them in
/// either), unless that one is held.
fn decide(packages: &[InstalledPackage], live: &[String]) -> Vec<Option<BootOutcome>> {
    packages
        .iter()
        .map(|p| {
            let superseded_by = packages.iter().find(|other| {
                other.name != p.name
                    && other.record.held.is_none()
                    && other.manifest.replaces.contains(&p.name)
            });
            if let Some(later) = superseded_by {
                Some(BootOutcome::Superseded {
                    by: later.name.clone(),
                })
            } else if let Some(reason) = &p.record.held {
                Some(BootOutcome::Held {
                    reason: reason.clone(),
                })
            } else if live.contains(&p.manifest.module_name) {
                Some(BootOutcome::AlreadyLive)
            } else {
                None
            }
        })
        .collect()
}

/// Mark this boot's applies that are at least `grace` old as survived;
/// returns the packages confirmed. dynamos-confirm.timer runs it every
/// minute, so each apply gets its grace whenever it happened.
pub fn confirm(paths: &SystemPaths, grace: Duration) -> Result<Vec<String>> {
    require_root("boot --confirm")?;
    let boot_id = boot_id(paths)?;
    let _lock = store_lock(paths)?;
    let now = now_unix();
    let mut confirmed = Vec::new();
    for mut p in installed_at(paths)? {
        let survived = p.record.last.as_ref().is_some_and(|a| {
            a.boot_id == boot_id
                && a.stage == BootStage::Applied
                && now.saturating_sub(a.at) >= grace.as_secs()
        });
        if survived {
            record_stage(&mut p, &boot_id, BootStage::Confirmed, None)?;
            confirmed.push(p.name);
        }
    }
    Ok(confirmed)
}

/// Whether the kernel command line says `dynamos.enable=0`.
pub fn boot_disabled(paths: &SystemPaths) -> Result<bool> {
    let path = paths.proc.join("cmdline");
    let cmdline =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(cmdline
        .split_whitespace()
        .any(|word| word == "dynamos.enable=0"))
}

/// Why a package must be held: its last boot-time apply was in an earlier
/// boot and never confirmed.
fn crash_reason(record: &BootRecord, boot_id: &str) -> Option<String> {
    let last = record.last.as_ref()?;
    if last.boot_id == boot_id || record.held.is_some() {
        return None;
    }
    let what = match last.stage {
        BootStage::Started => "the machine stopped while it was being applied",
        BootStage::Applied => "the machine stopped before that boot was confirmed",
        BootStage::Confirmed | BootStage::Failed => return None,
    };
    Some(format!(
        "{what} (boot {}, {})",
        last.boot_id,
        describe_time(last.at)
    ))
}

fn record_stage(
    p: &mut InstalledPackage,
    boot_id: &str,
    stage: BootStage,
    message: Option<String>,
) -> Result<()> {
    p.record.last = Some(BootAttempt {
        boot_id: boot_id.to_string(),
        stage,
        at: now_unix(),
        message,
    });
    write_record(p)
}

fn write_record(p: &InstalledPackage) -> Result<()> {
    write_durable(&p.record_path(), &serde_json::to_vec_pretty(&p.record)?)
}

/// Serializes everything that writes the store or its records.
fn store_lock(paths: &SystemPaths) -> Result<crate::cache::Lock> {
    crate::cache::Lock::acquire(&paths.installed.join(".lock"))
}

fn boot_id(paths: &SystemPaths) -> Result<String> {
    let path = paths.proc.join("sys/kernel/random/boot_id");
    let id =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(id.trim().to_string())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-12-02 21:05:11 UTC` for seconds since the epoch.
pub fn describe_time(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Names become file names under /var/lib/dynamos.
fn check_file_name(name: &str, what: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if !fine {
        bail!("the package's {what} {name:?} is not usable as a file name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(boot_id: &str, stage: BootStage) -> BootRecord {
        BootRecord {
            last: Some(BootAttempt {
                boot_id: boot_id.into(),
                stage,
                at: 1_764_709_511,
                message: None,
            }),
            held: None,
        }
    }

    #[test]
    fn only_an_unconfirmed_apply_of_an_earlier_boot_is_held() {
        let started = crash_reason(&attempt("a", BootStage::Started), "b").unwrap();
        assert!(started.contains("while it was being applied"), "{started}");
        assert!(started.contains("2025-12-02 21:05:11 UTC"), "{started}");
        let applied = crash_reason(&attempt("a", BootStage::Applied), "b").unwrap();
        assert!(
            applied.contains("before that boot was confirmed"),
            "{applied}"
        );
        assert_eq!(crash_reason(&attempt("a", BootStage::Confirmed), "b"), None);
        assert_eq!(crash_reason(&attempt("a", BootStage::Failed), "b"), None);
        // The same boot running `dynamos boot` again is no crash.
        assert_eq!(crash_reason(&attempt("b", BootStage::Applied), "b"), None);
        assert_eq!(crash_reason(&BootRecord::default(), "b"), None);
    }

    fn installed(order: u32, name: &str, replaces: &[&str], held: bool) -> InstalledPackage {
        let mut manifest = crate::apply::resolve::tests::manifest();
        manifest.name = name.into();
        manifest.module_name = format!("dynamos_{name}");
        manifest.replaces = replaces.iter().map(|r| r.to_string()).collect();
        InstalledPackage {
            order,
            name: name.into(),
            release: "x".into(),
            path: PathBuf::new(),
            manifest,
            record: BootRecord {
                last: None,
                held: held.then(|| "crashed".to_string()),
            },
        }
    }

    #[test]
    fn a_cumulative_package_supersedes_earlier_ones_unless_it_is_held() {
        let packages = [
            installed(1, "first", &[], false),
            installed(2, "second", &[], false),
            installed(3, "both", &["first", "second"], false),
            installed(4, "other", &[], false),
        ];
        let decided = decide(&packages, &["dynamos_other".to_string()]);
        let superseded = Some(BootOutcome::Superseded { by: "both".into() });
        assert_eq!(
            decided,
            [
                superseded.clone(),
                superseded,
                None,
                Some(BootOutcome::AlreadyLive)
            ]
        );
        // A held cumulative package leaves the ones it replaces to apply.
        let packages = [
            installed(1, "first", &[], false),
            installed(2, "both", &["first"], true),
        ];
        let decided = decide(&packages, &[]);
        assert_eq!(decided[0], None);
        assert!(matches!(decided[1], Some(BootOutcome::Held { .. })));
        // Install order does not matter (apt configures in either), and a
        // held package a good one replaces is superseded, not held.
        let packages = [
            installed(1, "both", &["first"], false),
            installed(2, "first", &[], true),
        ];
        let decided = decide(&packages, &[]);
        assert_eq!(decided[0], None);
        assert_eq!(
            decided[1],
            Some(BootOutcome::Superseded { by: "both".into() })
        );
    }

    #[test]
    fn install_json_is_the_documented_object() {
        let done = Installation {
            name: "fix".into(),
            release: "6.1.0-57-amd64".into(),
            order: 2,
            path: "/var/lib/dynamos/installed/6.1.0-57-amd64/0002-fix.dynamos".into(),
            change: InstallChange::Unchanged,
        };
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            serde_json::json!({
                "status": "unchanged",
                "package": "fix",
                "release": "6.1.0-57-amd64",
                "order": 2,
                "path": "/var/lib/dynamos/installed/6.1.0-57-amd64/0002-fix.dynamos",
            })
        );
    }

    /// A store and a livepatch folder under `root`, the rest as on a machine.
    fn store_at(root: &Path) -> SystemPaths {
        SystemPaths {
            installed: root.join("installed"),
            livepatch: root.join("livepatch"),
            ..SystemPaths::default()
        }
    }

    /// Put a package into the store as `install` leaves it.
    fn put_installed(paths: &SystemPaths, release: &str, order: u32, name: &str, held: bool) {
        let mut manifest = crate::apply::resolve::tests::manifest();
        manifest.name = name.into();
        manifest.module_name = format!("dynamos_{name}");
        manifest.target.release = release.into();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let package = package::Package {
            manifest,
            module: Vec::new(),
        };
        let path = paths
            .installed
            .join(release)
            .join(format!("{order:04}-{name}.{PACKAGE_EXTENSION}"));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let record = BootRecord {
            last: None,
            held: held.then(|| "crashed".to_string()),
        };
        fs::write(
            path.with_extension("json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        fs::write(&path, package::write_signed(&package, &key)).unwrap();
    }

    fn names_installed(paths: &SystemPaths) -> Vec<(String, String)> {
        installed_at(paths)
            .unwrap()
            .into_iter()
            .map(|p| (p.release, p.name))
            .collect()
    }

    #[test]
    fn uninstall_removes_every_release_and_says_whether_the_update_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let paths = store_at(dir.path());
        put_installed(&paths, "r1", 1, "fix", false);
        put_installed(&paths, "r1", 2, "other", false);
        put_installed(&paths, "r2", 1, "fix", true);
        fs::create_dir_all(paths.livepatch.join("dynamos_fix")).unwrap();

        let done = remove_installed(&paths, "fix", None).unwrap();
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            serde_json::json!({
                "status": "uninstalled",
                "package": "fix",
                "releases": ["r1", "r2"],
                "still_applied": true,
            })
        );
        assert_eq!(names_installed(&paths), [("r1".into(), "other".into())]);
        // Neither the packages nor their records are left behind.
        assert!(!paths.installed.join("r2/0001-fix.json").exists());

        // Not installed (for that release): exit 1, as the text form.
        let err = remove_installed(&paths, "fix", None).unwrap_err();
        assert!(
            format!("{err:#}").contains("no package named fix is installed"),
            "{err:#}"
        );
        assert_eq!(crate::error::exit_code_of(&err), crate::error::exit::ERROR);
        let err = remove_installed(&paths, "other", Some("r2")).unwrap_err();
        assert!(format!("{err:#}").contains("installed for r2"), "{err:#}");
        assert_eq!(names_installed(&paths).len(), 1);

        let done = remove_installed(&paths, "other", Some("r1")).unwrap();
        assert_eq!(done.releases, ["r1"]);
        assert!(!done.still_applied);
        assert!(names_installed(&paths).is_empty());
    }

    #[test]
    fn unhold_clears_every_hold_of_the_name_and_refuses_one_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let paths = store_at(dir.path());
        put_installed(&paths, "r1", 1, "fix", true);
        put_installed(&paths, "r1", 2, "other", false);
        put_installed(&paths, "r2", 1, "fix", true);

        // Installed but not held, or not installed: exit 1, as the text form.
        for name in ["other", "missing"] {
            let err = clear_hold(&paths, name).unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("no installed package named {name} is held")),
                "{err:#}"
            );
            assert_eq!(crate::error::exit_code_of(&err), crate::error::exit::ERROR);
        }

        let done = clear_hold(&paths, "fix").unwrap();
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            serde_json::json!({
                "status": "unheld",
                "package": "fix",
                "releases": ["r1", "r2"],
            })
        );
        assert!(installed_at(&paths)
            .unwrap()
            .iter()
            .all(|p| p.record.held.is_none()));
        assert!(clear_hold(&paths, "fix").is_err());
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(describe_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(describe_time(951_825_600), "2000-02-29 12:00:00 UTC");
        assert_eq!(describe_time(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    #[test]
    fn names_that_are_not_plain_file_names_are_refused() {
        for bad in ["", ".hidden", "-rf", "a/b", "a b", "..", "x\n"] {
            assert!(check_file_name(bad, "package name").is_err(), "{bad:?}");
        }
        for good in [
            "fix",
            "proc-version-banner",
            "6.1.0-57-amd64",
            "6.12.117+deb13-amd64",
        ] {
            check_file_name(good, "kernel release").unwrap();
        }
    }
}
