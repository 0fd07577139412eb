//! What the VM benchmarks share: release builds of the tools, a signing
//! key of their own, static guest probes and their settings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Stdout and stderr of a command, for error messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A number from the environment, or `default` when it is unset.
pub fn env_number(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Whether the guest clock is QEMU's instruction counter (`icount`, the
/// default) or the emulated wall clock (`host`), from `variable`.
pub fn instruction_clock(variable: &str) -> Result<bool, String> {
    match std::env::var(variable).as_deref() {
        Ok("icount") | Err(_) => Ok(true),
        Ok("host") => Ok(false),
        Ok(other) => Err(format!(
            "{variable}={other:?}: use icount (the default) or host"
        )),
    }
}

/// Release builds of the tools (`dynamos apply` runs inside the emulated
/// guest), and a folder with a fresh signing key: (work folder, key folder).
pub fn prepare(root: &Path) -> Result<(tempfile::TempDir, PathBuf), String> {
    let status = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bins"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    let work = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).map_err(|e| e.to_string())?;
    let keygen = Command::new(root.join("target/release/dynamos"))
        .arg("keygen")
        .env("DYNAMOS_CONFIG", &keys)
        .output()
        .map_err(|e| format!("cannot run dynamos: {e}"))?;
    if !keygen.status.success() {
        return Err(format!("keygen: {}", text(&keygen)));
    }
    Ok((work, keys))
}

/// `tests/guest/<source>` compiled into a static program at `out`.
pub fn compile_probe(root: &Path, source: &str, out: &Path) -> Result<(), String> {
    let cc = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(out)
        .arg(root.join("tests/guest").join(source))
        .status()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !cc.success() {
        return Err(format!("cannot compile tests/guest/{source}"));
    }
    Ok(())
}
