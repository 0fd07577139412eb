//! Signing the livepatch module for kernels that only load modules signed
//! by a key they trust (`module.sig_enforce=1`, Secure Boot lockdown). The
//! target's own `scripts/sign-file` appends the signature in the format
//! its kernel checks, with the user's X.509 module-signing key (the kind
//! Debian's MOK instructions make). A signed module must load exactly as
//! built, so its kernel symbols are bound at build time (`bind_at_build`
//! in `super`), never edited in at apply.

use crate::apply::is_signed;
use crate::target::toolchain::Toolchain;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The user's module-signing key and certificate, as `sign-file` takes
/// them: a PEM private key (or PKCS#11 URI) and an X.509 certificate in
/// PEM or DER. The kernel's own `signing_key.pem` holds both.
#[derive(Debug, Clone)]
pub struct ModuleSigningKey {
    pub key: PathBuf,
    pub certificate: PathBuf,
}

impl ModuleSigningKey {
    /// Refuse unreadable files before anything is compiled.
    pub fn check(&self) -> Result<()> {
        for (what, path) in [("key", &self.key), ("certificate", &self.certificate)] {
            if is_uri(path) {
                continue;
            }
            std::fs::File::open(path).with_context(|| {
                format!("cannot read the module-signing {what} {}", path.display())
            })?;
        }
        Ok(())
    }
}

/// How the target kernel wants its modules signed.
#[derive(Debug, Clone)]
pub struct ModuleSigning {
    pub key: ModuleSigningKey,
    /// `CONFIG_MODULE_SIG_HASH` of the target (`sha256`).
    pub hash: String,
}

/// `ko` signed with `signing` by the target's `scripts/sign-file` under
/// `kbuild_dir`, run with the target's toolchain; `work` is a folder the
/// caller owns.
pub fn sign(
    ko: &[u8],
    signing: &ModuleSigning,
    kbuild_dir: &Path,
    toolchain: &Toolchain,
    work: &Path,
) -> Result<Vec<u8>> {
    let sign_file = kbuild_dir.join("scripts/sign-file");
    if !sign_file.exists() {
        bail!(
            "the target's kernel build has no scripts/sign-file ({}); build it with `make scripts` in that tree",
            sign_file.display()
        );
    }
    let unsigned = work.join("module-to-sign.ko");
    std::fs::write(&unsigned, ko)?;
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (key, certificate) = (
        absolute(&signing.key.key),
        absolute(&signing.key.certificate),
    );
    // The toolchain may run in a root: the key's folders must be visible.
    let mut toolchain = toolchain.clone();
    for path in [&key, &certificate] {
        if let Some(folder) = path.parent().filter(|_| !is_uri(path)) {
            toolchain = toolchain.with_bind(folder);
        }
    }
    let out = toolchain
        .command(&sign_file.to_string_lossy())
        .arg(&signing.hash)
        .arg(&key)
        .arg(&certificate)
        .arg(&unsigned)
        .output()
        .with_context(|| format!("cannot run {}", sign_file.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        bail!(
            "signing the module failed: {}: {reason}",
            sign_file.display()
        );
    }
    let signed = std::fs::read(&unsigned)?;
    if !is_signed(&signed) || !signed.starts_with(ko) {
        bail!("{} did not append a module signature", sign_file.display());
    }
    Ok(signed)
}

fn is_uri(path: &Path) -> bool {
    path.to_string_lossy().starts_with("pkcs11:")
}
