//! Fetching Debian packages into the cache: `apt-get download` followed by
//! `dpkg-deb -x`, never `apt-get install`, so the host system is untouched.
//!
//! Tools that run on this machine (QEMU, busybox) come from the machine's
//! own apt. Target kernels come from an index of the Debian archive that
//! dynamos keeps in its cache (`apt/`): every release it can target
//! (Debian 12 and 13) whatever release the host runs, without adding a
//! source to the host's apt.

use crate::cache;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where apt looks for a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// The machine's own apt configuration, for tools that run here.
    Host,
    /// The kernel index in the cache, for target kernels.
    Kernels,
}

/// Debian releases whose kernels can be targets: number, codename and the
/// compiler its kernels are built with.
const RELEASES: &[(u32, &str, &str)] = &[(12, "bookworm", "gcc-12"), (13, "trixie", "gcc-14")];

/// The codename of the Debian release a kernel ABI belongs to:
/// `6.12.117+deb13-amd64` is trixie's; ABIs without `+debNN` (`6.1.0-57`)
/// are from before Debian numbered them, bookworm's.
pub fn codename_of(release: &str) -> Result<&'static str> {
    let Some((_, tail)) = release.split_once("+deb") else {
        return Ok(RELEASES[0].1);
    };
    let number: u32 = tail
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    match RELEASES.iter().find(|(n, _, _)| *n == number) {
        Some((_, codename, _)) => Ok(codename),
        None => bail!("{release} is from Debian {number}, which dynamos does not target"),
    }
}

/// The Debian release whose kernels `compiler` (`x86_64-linux-gnu-gcc-14`,
/// as a config names it) builds, for a tree whose release says none.
pub fn codename_of_compiler(compiler: &str) -> Option<&'static str> {
    RELEASES
        .iter()
        .find(|(_, _, cc)| compiler == *cc || compiler.ends_with(&format!("-{cc}")))
        .map(|(_, codename, _)| *codename)
}

/// Each release's suites in the archive: (archive folder, suite).
fn kernel_suites() -> Vec<(&'static str, String)> {
    RELEASES
        .iter()
        .flat_map(|(_, codename, _)| {
            [
                ("debian", codename.to_string()),
                ("debian", format!("{codename}-updates")),
                ("debian-security", format!("{codename}-security")),
            ]
        })
        .collect()
}

/// The archive's address: `$DYNAMOS_DEBIAN_MIRROR`, else Debian's own.
pub fn mirror() -> String {
    std::env::var("DYNAMOS_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org".to_string())
        .trim_end_matches('/')
        .to_string()
}

fn kernel_index() -> PathBuf {
    cache::cache_root().join("apt")
}

/// Options that point apt at `archive`: for the kernel index, its own
/// sources, lists, download cache and (empty) installed-package status.
fn apt_options(archive: Archive) -> Vec<String> {
    match archive {
        Archive::Host => Vec::new(),
        Archive::Kernels => {
            let dir = kernel_index();
            let d = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
            [
                ("Dir::Etc::SourceList", d("sources.list")),
                ("Dir::Etc::SourceParts", d("sources.list.d")),
                ("Dir::Etc::Preferences", d("preferences")),
                ("Dir::Etc::PreferencesParts", d("preferences.d")),
                ("Dir::State::Lists", d("lists")),
                ("Dir::State::status", d("status")),
                ("Dir::Cache", d("cache")),
            ]
            .into_iter()
            .flat_map(|(key, value)| ["-o".to_string(), format!("{key}={value}")])
            .collect()
        }
    }
}

fn apt_command(program: &str, archive: Archive) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(apt_options(archive));
    cmd
}

/// How old the index's lists are; None when they were never read, or
/// read from another mirror than the one asked for now.
fn index_age() -> Option<std::time::Duration> {
    let stamp = kernel_index().join("updated");
    if std::fs::read_to_string(&stamp).ok()? != mirror() {
        return None;
    }
    std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
}

/// Make sure the kernel index has package lists; with `if_older_than`,
/// also fetch them again when they are older than that.
pub fn update_kernel_index(if_older_than: Option<std::time::Duration>) -> Result<()> {
    let dir = kernel_index();
    let _lock = cache::Lock::acquire(&dir.join("lock"))?;
    match (index_age(), if_older_than) {
        (Some(_), None) => return Ok(()),
        (Some(age), Some(limit)) if age < limit => return Ok(()),
        _ => {}
    }
    for sub in [
        "sources.list.d",
        "preferences.d",
        "lists/partial",
        "cache/archives/partial",
    ] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    let mirror = mirror();
    let sources: String = kernel_suites()
        .iter()
        .map(|(folder, suite)| format!("deb {mirror}/{folder} {suite} main\n"))
        .collect();
    // Replaced whole: other processes may be reading the index meanwhile.
    cache::write_atomic(&dir.join("sources.list"), sources.as_bytes())?;
    cache::write_atomic(&dir.join("status"), b"")?;
    let progress = crate::report::spinner(format!(
        "reading the Debian archive's kernel packages from {mirror}"
    ));
    let output = apt_command("apt-get", Archive::Kernels)
        .args(["-q", "update"])
        .output()
        .context("cannot run apt-get (is this a Debian system?)")?;
    progress.finish_and_clear();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Some(error) = stderr.lines().find(|l| l.starts_with("E:")) {
        bail!("cannot read the Debian archive at {mirror} (set DYNAMOS_DEBIAN_MIRROR for another): {error}");
    }
    if !output.status.success() {
        bail!("cannot read the Debian archive at {mirror}: apt-get update failed");
    }
    cache::write_atomic(&dir.join("updated"), mirror.as_bytes())?;
    Ok(())
}

/// One binary package, optionally pinned to a version.
#[derive(Debug, Clone)]
pub struct DebRef {
    pub name: String,
    pub version: Option<String>,
}

impl DebRef {
    pub fn new(name: &str, version: Option<&str>) -> DebRef {
        DebRef {
            name: name.to_string(),
            version: version.map(str::to_string),
        }
    }

    fn apt_spec(&self) -> String {
        match &self.version {
            Some(v) => format!("{}={}", self.name, v),
            None => self.name.clone(),
        }
    }
}

/// Download `debs` into `dir` (which must exist) and return the .deb paths in
/// the same order.
pub fn download(debs: &[DebRef], dir: &Path, archive: Archive) -> Result<Vec<PathBuf>> {
    if archive == Archive::Kernels {
        update_kernel_index(None)?;
    }
    let specs: Vec<String> = debs.iter().map(DebRef::apt_spec).collect();
    let mut failure = match fetch(&specs, dir, archive)? {
        None => return found_debs(debs, dir),
        Some(reason) => reason,
    };
    if archive == Archive::Kernels {
        // The archive drops superseded files: read it again, then retry.
        update_kernel_index(Some(std::time::Duration::ZERO))?;
        match fetch(&specs, dir, archive)? {
            None => return found_debs(debs, dir),
            Some(reason) => failure = reason,
        }
    }
    bail!(
        "cannot download {}: {}{}",
        specs.join(" "),
        failure,
        if archive == Archive::Host {
            " (run `apt-get update` as root if the package lists are missing)"
        } else {
            ""
        }
    )
}

/// `apt-get download` of `specs` into `dir`: None when it worked, else
/// apt's error line.
fn fetch(specs: &[String], dir: &Path, archive: Archive) -> Result<Option<String>> {
    let progress = crate::report::spinner(format!("downloading {}", specs.join(" ")));
    let output = apt_command("apt-get", archive)
        .arg("download")
        .args(specs)
        .current_dir(dir)
        .output()
        .context("cannot run apt-get (is this a Debian system?)")?;
    progress.finish_and_clear();
    if output.status.success() {
        return Ok(None);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Ok(Some(
        stderr
            .lines()
            .find(|l| l.starts_with("E:"))
            .unwrap_or("apt-get download failed")
            .trim()
            .to_string(),
    ))
}

fn found_debs(debs: &[DebRef], dir: &Path) -> Result<Vec<PathBuf>> {
    debs.iter()
        .map(|deb| find_deb(dir, &deb.name))
        .collect::<Result<Vec<_>>>()
}

fn find_deb(dir: &Path, name: &str) -> Result<PathBuf> {
    let prefix = format!("{name}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file.starts_with(&prefix) && file.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!("apt-get download did not produce a .deb for {name}")
}

/// Unpack the files of `deb` under `root`.
pub fn extract(deb: &Path, root: &Path) -> Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .status()
        .context("cannot run dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb could not unpack {}", deb.display());
    }
    Ok(())
}

/// A cache folder holding the unpacked files of `debs`, fetched on first use.
pub fn unpacked(dir: &Path, debs: &[DebRef], archive: Archive) -> Result<PathBuf> {
    cache::ensure_dir(dir, |tmp| {
        let download_dir = tmp.join(".debs");
        std::fs::create_dir_all(&download_dir)?;
        for deb in download(debs, &download_dir, archive)? {
            extract(&deb, tmp)?;
        }
        std::fs::remove_dir_all(&download_dir)?;
        Ok(())
    })
}

/// Versions of the kernel package `name` the archive serves, newest first
/// (`apt-cache madison`).
pub fn served_versions(name: &str) -> Result<Vec<String>> {
    update_kernel_index(None)?;
    let output = apt_command("apt-cache", Archive::Kernels)
        .args(["madison", name])
        .output()
        .context("cannot run apt-cache (is this a Debian system?)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut versions: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split('|').map(str::trim);
        if fields.next() != Some(name) {
            continue;
        }
        if let Some(version) = fields.next().filter(|v| !v.is_empty()) {
            if !versions.iter().any(|v| v == version) {
                versions.push(version.to_string());
            }
        }
    }
    Ok(versions)
}

/// Names of the kernel packages the archive serves that match `pattern` (a
/// POSIX regular expression on the name), in natural order: `6.1.0-9`
/// before `6.1.0-10`.
pub fn package_names(pattern: &str) -> Result<Vec<String>> {
    update_kernel_index(None)?;
    let output = apt_command("apt-cache", Archive::Kernels)
        .args(["search", "--names-only", pattern])
        .output()
        .context("cannot run apt-cache (is this a Debian system?)")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    names.sort_by_key(|n| natural_key(n));
    names.dedup();
    Ok(names)
}

/// The packages `name` at `version` depends on whose names start with
/// `prefix` (`linux-headers-X` → its `-common` headers and kbuild tools),
/// each pinned where the dependency gives an exact version.
pub fn dependencies(name: &str, version: &str, prefix: &str) -> Result<Vec<DebRef>> {
    update_kernel_index(None)?;
    let output = apt_command("apt-cache", Archive::Kernels)
        .args(["show", &format!("{name}={version}")])
        .output()
        .context("cannot run apt-cache (is this a Debian system?)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(depends) = text.lines().find_map(|l| l.strip_prefix("Depends:")) else {
        bail!("apt knows no dependencies of {name} {version}");
    };
    Ok(parse_dependencies(depends, prefix))
}

fn parse_dependencies(depends: &str, prefix: &str) -> Vec<DebRef> {
    depends
        .split(',')
        // Of alternatives (`a | b`) the first, which Debian lists as preferred.
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| {
            let d = d.trim();
            let (name, constraint) = match d.split_once('(') {
                Some((n, c)) => (n.trim(), Some(c.trim_end_matches(')').trim())),
                None => (d, None),
            };
            if !name.starts_with(prefix) {
                return None;
            }
            let version = constraint.and_then(|c| c.strip_prefix('=')).map(str::trim);
            Some(DebRef::new(name, version))
        })
        .collect()
}

/// Runs of digits compare as numbers.
fn natural_key(text: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            key.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let other = rest.len() - rest.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
            key.push((0, rest[..other].to_string()));
            rest = &rest[other..];
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dependencies_of_both_debian_releases() {
        let bookworm = parse_dependencies(
            "linux-headers-6.1.0-57-common (= 6.1.192-3), linux-kbuild-6.1 (>= 6.1.192-3), linux-compiler-gcc-12-x86",
            "linux-",
        );
        let specs: Vec<String> = bookworm.iter().map(DebRef::apt_spec).collect();
        assert_eq!(
            specs,
            [
                "linux-headers-6.1.0-57-common=6.1.192-3",
                "linux-kbuild-6.1",
                "linux-compiler-gcc-12-x86"
            ]
        );
        let trixie = parse_dependencies(
            "linux-base (>= 4.12~), linux-headers-6.12.117+deb13-common (= 6.12.117-1), linux-image-6.12.117+deb13-amd64 (= 6.12.117-1) | linux-image-6.12.117+deb13-amd64-unsigned (= 6.12.117-1), linux-kbuild-6.12.117+deb13, gcc-14",
            "linux-headers-",
        );
        let specs: Vec<String> = trixie.iter().map(DebRef::apt_spec).collect();
        assert_eq!(specs, ["linux-headers-6.12.117+deb13-common=6.12.117-1"]);
    }

    #[test]
    fn kernels_belong_to_their_debian_release() {
        assert_eq!(codename_of("6.1.0-57-amd64").unwrap(), "bookworm");
        assert_eq!(codename_of("6.12.117+deb13-amd64").unwrap(), "trixie");
        assert_eq!(codename_of("6.12.117+deb12-amd64").unwrap(), "bookworm");
        assert!(codename_of("6.16.3+deb14-amd64").is_err());
        assert_eq!(
            codename_of_compiler("x86_64-linux-gnu-gcc-14"),
            Some("trixie")
        );
        assert_eq!(codename_of_compiler("gcc-12"), Some("bookworm"));
        assert_eq!(codename_of_compiler("clang"), None);
    }

    #[test]
    fn natural_order_of_kernel_releases() {
        let mut names = vec!["6.1.0-10-amd64", "6.12.117+deb13-amd64", "6.1.0-9-amd64"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.12.117+deb13-amd64"]
        );
    }
}
