//! The tool's own cache and configuration folders, and how they are filled
//! safely: every entry is produced in a temporary folder and renamed into
//! place under a lock, so an interrupted fetch never leaves a half entry.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Root of the cache: `$DYNAMOS_CACHE`, else `$XDG_CACHE_HOME/dynamos`, else `~/.cache/dynamos`.
pub fn cache_root() -> PathBuf {
    dir_from_env("DYNAMOS_CACHE", "XDG_CACHE_HOME", ".cache")
}

/// Root of the configuration (signing keys): `$DYNAMOS_CONFIG`, else
/// `$XDG_CONFIG_HOME/dynamos`, else `~/.config/dynamos`.
pub fn config_root() -> PathBuf {
    dir_from_env("DYNAMOS_CONFIG", "XDG_CONFIG_HOME", ".config")
}

fn dir_from_env(own: &str, xdg: &str, home_sub: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(own).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os(xdg).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("dynamos");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(home_sub).join("dynamos")
}

/// An exclusive advisory lock on `path` (created if missing), released on drop.
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(path: &Path) -> Result<Lock> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            bail!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Lock { _file: file })
    }

    /// The locked file's descriptor: a process that inherits it holds the
    /// lock as long as it lives.
    pub fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self._file.as_raw_fd()
    }
}

/// Make sure the folder `dir` exists with complete contents: if it does not,
/// `fill` populates a fresh temporary sibling which is then renamed to `dir`.
/// Concurrent callers wait for each other; a failed `fill` leaves nothing.
pub fn ensure_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("cache entry without a name")?;
    let parent = dir.parent().context("cache entry without a parent")?;
    let _lock = Lock::acquire(&parent.join(format!(".{name}.lock")))?;
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    match fill(&tmp) {
        Ok(()) => {
            fs::rename(&tmp, dir)
                .with_context(|| format!("cannot move {} into place", dir.display()))?;
            Ok(dir.to_path_buf())
        }
        Err(err) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(err)
        }
    }
}

/// Write `data` to `path` through a temporary file and a rename, so readers
/// never see a partial file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_renamed(path, data, false)
}

/// [`write_atomic`], and synced: after a crash `path` holds the old or the
/// new content, and the new one once this returns (its folder's entry, and
/// a folder it had to create, included).
pub fn write_durable(path: &Path, data: &[u8]) -> Result<()> {
    write_renamed(path, data, true)
}

fn write_renamed(path: &Path, data: &[u8], sync: bool) -> Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    if !parent.is_dir() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        if let (true, Some(grandparent)) = (sync, parent.parent()) {
            sync_dir(grandparent)?;
        }
    }
    let tmp = parent.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(data)
        .and_then(|_| if sync { file.sync_all() } else { Ok(()) })
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if sync {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Make a folder's entries (a rename, a removal) last across a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
