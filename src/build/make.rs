//! The one way every build runs make.

use super::child;
use anyhow::{anyhow, Context, Result};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// Environment a parent make or the user may have set that would change the build.
pub(super) const MAKE_ENV_REMOVE: &[&str] = &[
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "KBUILD_OUTPUT",
    "O",
    "ARCH",
    "CROSS_COMPILE",
    "KCFLAGS",
    "KCPPFLAGS",
    "KAFLAGS",
    "CC",
    "LLVM",
    "W",
    "C",
    "V",
];

/// Result of one `make` run.
pub(crate) struct MakeRun {
    pub success: bool,
    /// stdout and stderr, interleaved.
    pub output: String,
}

/// The one way every build runs make: the environment of a parent make or
/// of the user removed (it would change the build), messages in English
/// (the shadow stage reads them), output interleaved into `log`, the whole
/// process group tied to this process (and to the build lock, if given).
pub(crate) fn run_make_logged(
    mut cmd: Command,
    log: &Path,
    lock_fd: Option<std::os::unix::io::RawFd>,
) -> Result<MakeRun> {
    let file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    for var in MAKE_ENV_REMOVE {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let status = child::run(&mut cmd, lock_fd).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("make is not installed: install it with `apt-get install make`")
        } else {
            anyhow!("cannot run make: {e}")
        }
    })?;
    let output = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
    Ok(MakeRun {
        success: status.success(),
        output,
    })
}
