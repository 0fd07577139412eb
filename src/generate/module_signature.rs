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
        if is_uri(&self.certificate) {
            bail!(
                "a PKCS#11 module-signing key needs its certificate as a file: give --module-cert"
            );
        }
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
            toolchain = toolchain
                .with_user_folder(folder)
                .with_context(|| format!("cannot sign with {}", path.display()))?;
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
        bail!(
            "signing the module failed: {}",
            sign_file_reason(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let signed = std::fs::read(&unsigned)?;
    if !is_signed(&signed) || !signed.starts_with(ko) {
        bail!("{} did not append a module signature", sign_file.display());
    }
    Ok(signed)
}

/// One line from sign-file's complaint: it prints where in its source it
/// failed, OpenSSL's errors (`- SSL error:CODE:LIBRARY::REASON: FILE:LINE`)
/// and last what it was reading (`sign-file: PATH`).
fn sign_file_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let what = lines
        .last()
        .copied()
        .unwrap_or("sign-file failed without a message");
    let ssl = lines.iter().rev().find_map(|l| {
        let error = l.strip_prefix("- SSL error:")?;
        // Drop the hex code before the first ':' and the source place after
        // the last ": ".
        let error = error.split_once(':').map_or(error, |(_, rest)| rest);
        Some(error.rsplit_once(": ").map_or(error, |(reason, _)| reason))
    });
    let mut reason = match ssl {
        Some(ssl) if !what.contains(ssl) => format!("{what}: {ssl}"),
        _ => what.to_string(),
    };
    if reason.contains("bad password") || reason.contains("bad decrypt") {
        reason.push_str(" (an encrypted key takes its pass phrase from KBUILD_SIGN_PIN)");
    }
    reason
}

fn is_uri(path: &Path) -> bool {
    path.to_string_lossy().starts_with("pkcs11:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_file_complaints_become_one_line() {
        let wrong_key = "At main.c:174:\n- SSL error:1E08010C:DECODER routines::unsupported: ../crypto/encode_decode/decoder_lib.c:102\nsign-file: c.der\n";
        assert_eq!(
            sign_file_reason(wrong_key),
            "sign-file: c.der: DECODER routines::unsupported"
        );
        let encrypted = "At main.c:174:\n- SSL error:1C800064:Provider routines::bad decrypt: ../providers/implementations/ciphers/ciphercommon_block.c:124\n- SSL error:04800065:PEM routines::bad password read: ../crypto/pem/pem_lib.c:467\nsign-file: ke.pem\n";
        assert_eq!(
            sign_file_reason(encrypted),
            "sign-file: ke.pem: PEM routines::bad password read (an encrypted key takes its pass phrase from KBUILD_SIGN_PIN)"
        );
        assert_eq!(sign_file_reason(""), "sign-file failed without a message");
        assert_eq!(
            sign_file_reason("sign-file: x.ko: No such file or directory\n"),
            "sign-file: x.ko: No such file or directory"
        );
    }

    #[test]
    fn a_pkcs11_key_needs_a_certificate_file() {
        let key = ModuleSigningKey {
            key: "pkcs11:token=mok".into(),
            certificate: "pkcs11:token=mok".into(),
        };
        let err = key.check().unwrap_err().to_string();
        assert!(err.contains("give --module-cert"), "{err}");
    }
}
