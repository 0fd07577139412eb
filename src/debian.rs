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
