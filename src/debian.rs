//! Fetching Debian packages into the cache: `apt-get download` followed by
//! `dpkg-deb -x`, never `apt-get install`, so the host system is untouched.

use crate::cache;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

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
pub fn download(debs: &[DebRef], dir: &Path) -> Result<Vec<PathBuf>> {
    let specs: Vec<String> = debs.iter().map(DebRef::apt_spec).collect();
    let progress = crate::build::spinner(format!("downloading {}", specs.join(" ")));
    let output = Command::new("apt-get")
        .arg("download")
        .args(&specs)
        .current_dir(dir)
        .output()
        .context("cannot run apt-get (is this a Debian system?)")?;
    progress.finish_and_clear();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .find(|l| l.starts_with("E:"))
            .unwrap_or("apt-get download failed")
            .to_string();
        bail!(
            "cannot download {}: {} (run `apt-get update` as root if the package lists are missing)",
            specs.join(" "),
            reason.trim()
        );
    }
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
pub fn unpacked(dir: &Path, debs: &[DebRef]) -> Result<PathBuf> {
    cache::ensure_dir(dir, |tmp| {
        let download_dir = tmp.join(".debs");
        std::fs::create_dir_all(&download_dir)?;
        for deb in download(debs, &download_dir)? {
            extract(&deb, tmp)?;
        }
        std::fs::remove_dir_all(&download_dir)?;
        Ok(())
    })
}

/// The version apt would install for `name`, from the local package lists.
pub fn candidate_version(name: &str) -> Result<Option<String>> {
    let output = Command::new("apt-cache")
        .args(["policy", name])
        .output()
        .context("cannot run apt-cache")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)"))
}

/// Versions of `name` apt can download, newest first (`apt-cache madison`).
pub fn served_versions(name: &str) -> Result<Vec<String>> {
    let output = Command::new("apt-cache")
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

/// Names of the packages apt knows that match `pattern` (a POSIX regular
/// expression on the name), in natural order: `6.1.0-9` before `6.1.0-10`.
pub fn package_names(pattern: &str) -> Result<Vec<String>> {
    let output = Command::new("apt-cache")
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
    fn natural_order_of_kernel_releases() {
        let mut names = vec!["6.1.0-10-amd64", "6.12.117+deb13-amd64", "6.1.0-9-amd64"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.12.117+deb13-amd64"]
        );
    }
}
