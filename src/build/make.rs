//! The one way every build runs make.

use super::child;
use anyhow::{anyhow, Context, Result};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Target builds this process runs beside others (`dynamos-build --jobs`).
static CONCURRENT_BUILDS: AtomicUsize = AtomicUsize::new(1);

/// Say that `builds` target builds run at once, each in its own process:
/// each make then takes its share of the cores, so that they do not
/// oversubscribe the machine together.
pub fn share_cores_among(builds: usize) {
    CONCURRENT_BUILDS.store(builds.max(1), Ordering::Relaxed);
}

/// Processors this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `-jN` of every make: this build's share of the cores, at least one.
pub(crate) fn jobs_arg() -> String {
    let share = cores() / CONCURRENT_BUILDS.load(Ordering::Relaxed).max(1);
    format!("-j{}", share.max(1))
}

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
