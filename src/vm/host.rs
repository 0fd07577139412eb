//! The host-side tools a throwaway machine needs, fetched from Debian into
//! the cache on first use: a QEMU system emulator that runs without being
//! installed (its missing shared libraries unpacked beside it), and a static
//! busybox for the guest's userland.

use crate::cache;
use crate::debian::{self, DebRef};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages holding the emulator and the firmware it loads for a `-kernel` boot.
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];
const QEMU_BINARY: &str = "usr/bin/qemu-system-x86_64";
/// Debian builds QEMU's accelerators as loadable modules; TCG is the one used.
const QEMU_MODULE_DIR: &str = "usr/lib/x86_64-linux-gnu/qemu";
const TCG_MODULE: &str = "accel-tcg-x86_64.so";
/// Rounds of "fetch the missing library dependencies" before giving up.
const MAX_DEPENDENCY_ROUNDS: usize = 10;

/// An unpacked QEMU and how to run it.
pub struct Qemu {
    pub binary: PathBuf,
    /// Value for `QEMU_MODULE_DIR`.
    pub module_dir: PathBuf,
    /// Value for `LD_LIBRARY_PATH`.
    pub library_path: String,
    /// Firmware folders, each passed as `-L`.
    pub firmware_dirs: Vec<PathBuf>,
}

impl Qemu {
    /// The cached QEMU, fetched and checked on first use.
    pub fn get() -> Result<Qemu> {
        let root = cache::ensure_dir(&cache::cache_root().join("qemu"), fill_qemu)?;
        let qemu = Qemu::at(&root)?;
        if !qemu.binary.is_file() || !qemu.module_dir.join(TCG_MODULE).is_file() {
            bail!(
                "the cached QEMU at {} is incomplete; remove that folder to fetch it again",
                root.display()
            );
        }
        Ok(qemu)
    }

    fn at(root: &Path) -> Result<Qemu> {
        Ok(Qemu {
            binary: root.join(QEMU_BINARY),
            module_dir: root.join(QEMU_MODULE_DIR),
            library_path: library_dirs(root)?
                .iter()
                .map(|d| d.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(":"),
            firmware_dirs: ["usr/share/seabios", "usr/share/qemu"]
                .iter()
                .map(|d| root.join(d))
                .collect(),
        })
    }
}

/// Unpack QEMU into `root`, then add the library packages its binary still
/// lacks on this host, following Debian dependencies until `ldd` is happy.
/// The walk starts from the emulator's own package, whose libraries are the
/// ones the binary links, and widens to the other packages only if needed.
fn fill_qemu(root: &Path) -> Result<()> {
    let base: Vec<String> = QEMU_PACKAGES.iter().map(|p| p.to_string()).collect();
    fetch_into(root, &base)?;
    let mut fetched: BTreeSet<String> = base.iter().cloned().collect();
    let mut expanded: BTreeSet<String> = BTreeSet::new();
    let mut frontier = vec![base[0].clone()];
    for _ in 0..MAX_DEPENDENCY_ROUNDS {
        let missing = missing_libraries(&Qemu::at(root)?)?;
        if missing.is_empty() {
            return Ok(());
        }
        if frontier.is_empty() {
            frontier = fetched.difference(&expanded).cloned().collect();
        }
        if frontier.is_empty() {
            bail!(
                "QEMU needs {} which no Debian dependency of it provides",
                missing.join(", ")
            );
        }
        let next: Vec<String> = uninstalled(&library_dependencies(&frontier)?)?
            .into_iter()
            .filter(|p| !fetched.contains(p))
            .collect();
        expanded.extend(frontier.drain(..));
        if !next.is_empty() {
            fetch_into(root, &next)?;
            fetched.extend(next.iter().cloned());
            frontier = next;
        }
    }
    let missing = missing_libraries(&Qemu::at(root)?)?;
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "QEMU still lacks {} after fetching its dependencies",
            missing.join(", ")
        )
    }
}

fn fetch_into(root: &Path, packages: &[String]) -> Result<()> {
    let download_dir = root.join(".debs");
    fs::create_dir_all(&download_dir)?;
    let refs: Vec<DebRef> = packages.iter().map(|p| DebRef::new(p, None)).collect();
    for deb in debian::download(&refs, &download_dir, debian::Archive::Host)? {
        debian::extract(&deb, root)?;
    }
    fs::remove_dir_all(&download_dir)?;
    Ok(())
}

/// Sonames `ldd` reports as "not found" for the QEMU binary and its TCG module.
fn missing_libraries(qemu: &Qemu) -> Result<Vec<String>> {
    let mut missing = BTreeSet::new();
    for object in [qemu.binary.clone(), qemu.module_dir.join(TCG_MODULE)] {
        if !object.is_file() {
            bail!("the QEMU packages did not provide {}", object.display());
        }
        let output = Command::new("ldd")
            .arg(&object)
            .env("LD_LIBRARY_PATH", &qemu.library_path)
            .output()
            .context("cannot run ldd")?;
        if !output.status.success() {
            bail!(
                "ldd cannot inspect {}: {}",
                object.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        missing.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| l.contains("not found"))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string),
        );
    }
    Ok(missing.into_iter().collect())
}

/// Library packages (`lib*`) the given packages depend on directly.
fn library_dependencies(packages: &[String]) -> Result<BTreeSet<String>> {
    let output = Command::new("apt-cache")
        .args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
        ])
        .args(["--no-breaks", "--no-replaces", "--no-enhances"])
        .args(packages)
        .output()
        .context("cannot run apt-cache")?;
    if !output.status.success() {
        bail!(
            "apt-cache depends {} failed: {}",
            packages.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches('|');
            l.strip_prefix("Depends:")
                .or_else(|| l.strip_prefix("PreDepends:"))
        })
        .map(str::trim)
        // `<name>` is a virtual package; a real alternative is listed too.
        .filter(|name| !name.starts_with('<') && name.starts_with("lib"))
        .map(|name| name.split(':').next().unwrap_or(name).to_string())
        .collect())
}

/// The packages among `names` that are not installed on this host.
fn uninstalled(names: &BTreeSet<String>) -> Result<Vec<String>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    // Unknown names make dpkg-query exit non-zero; its stdout still lists the known ones.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(names)
        .output()
        .context("cannot run dpkg-query")?;
    let installed: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "installed")
        .map(|(name, _)| name.to_string())
        .collect();
    Ok(names
        .iter()
        .filter(|n| !installed.contains(*n))
        .cloned()
        .collect())
}

/// Folders under `root` holding shared libraries (QEMU's own modules aside).
fn library_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for base in ["lib", "usr/lib"] {
        collect_library_dirs(&root.join(base), &mut dirs)?;
    }
    let modules = root.join(QEMU_MODULE_DIR);
    dirs.retain(|d| !d.starts_with(&modules));
    Ok(dirs)
}

fn collect_library_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mut has_library = false;
    let mut subdirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_type = entry.file_type()?;
        let name = entry.file_name();
        if file_type.is_dir() {
            subdirs.push(entry.path());
        } else if name.to_string_lossy().contains(".so") {
            has_library = true;
        }
    }
    if has_library {
        out.push(dir.to_path_buf());
    }
    subdirs.sort();
    for sub in subdirs {
        collect_library_dirs(&sub, out)?;
    }
    Ok(())
}

/// A static busybox for the guest, from Debian's busybox-static.
pub fn busybox() -> Result<PathBuf> {
    let root = debian::unpacked(
        &cache::cache_root().join("busybox"),
        &[DebRef::new("busybox-static", None)],
        debian::Archive::Host,
    )?;
    let binary = root.join("bin/busybox");
    if !binary.is_file() {
        bail!(
            "busybox-static did not provide bin/busybox (cache at {})",
            root.display()
        );
    }
    Ok(binary)
}

/// Shared objects `binary` loads, as absolute host paths (the dynamic loader
/// included); empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if text.contains("not a dynamic executable") || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd cannot inspect {}: {}", binary.display(), stderr.trim());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!(
                "{} needs a library this host lacks: {line}",
                binary.display()
            );
        }
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}
