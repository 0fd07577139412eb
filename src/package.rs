//! The update package: manifest + kernel-side payload, signed with ed25519.

use serde::{Deserialize, Serialize};

/// Version of the package file format; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 4;

/// What a package replaces and what it was built for. Stored in the package
/// and printed by `dynamos inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Package name, derived from the first patch file (`fix.diff` → `fix`).
    pub name: String,
    /// Name of the kernel module and of the livepatch in /sys/kernel/livepatch.
    pub module_name: String,
    /// Version of dynamos that built the package.
    pub tool_version: String,
    pub target: TargetIdentity,
    /// The patches the package was built from, in order.
    pub patches: Vec<PatchDigest>,
    /// One entry per kernel object touched: `vmlinux` first, then modules.
    pub objects: Vec<ObjectUpdate>,
    /// Earlier packages (by name) this one supersedes: a cumulative update
    /// that holds all of their changes it still wants. Applying it replaces
    /// every applied update in one atomic transition (livepatch `replace`);
    /// changes of the replaced packages it does not carry are undone.
    pub replaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// `uname -r` of the kernel the package is for.
    pub release: String,
    /// Debian package version of that kernel, when it is a Debian build.
    pub debian_version: Option<String>,
    /// GNU build-id of its vmlinux (hex), as /sys/kernel/notes shows it.
    pub build_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchDigest {
    pub file: String,
    pub sha256: String,
}

/// The changes to one kernel object (`vmlinux` or a module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectUpdate {
    /// `vmlinux` or the module name as in /proc/modules.
    pub object: String,
    /// Functions redirected to new versions, in the order of the kernel
    /// module's `klp_func` table (and of its `sympos` parameter).
    pub replaced: Vec<ReplacedFunction>,
    /// Functions new in the patch: shipped in the module, not redirected.
    pub added: Vec<String>,
    /// Symbols of the running kernel the new code uses that the kernel does
    /// not export; `dynamos apply` resolves them from /proc/kallsyms.
    pub externals: Vec<ExternalSymbol>,
    /// The symbols each original object file defines, used to tell apart
    /// same-named static symbols of different files.
    pub files: Vec<SourceObject>,
    /// Symbols of loadable modules the new code uses, resolved by the
    /// livepatch core each time their module loads (never by `apply`), so
    /// a module that is unloaded and loaded again stays correctly patched.
    pub load_time: Vec<LoadTimeSymbol>,
    /// The original code of every replaced function and of every function
    /// of the changed files the new code calls: `dynamos apply` checks the
    /// running kernel has exactly this code before it redirects anything.
    pub expected_code: Vec<ExpectedCode>,
}

/// A function's code as the package expects to find it in the running
/// kernel (run-pre verification).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedCode {
    /// Name in /proc/kallsyms.
    pub name: String,
    /// Source file defining it.
    pub file: String,
    /// The function's bytes in the original object file.
    pub bytes: Vec<u8>,
    /// Ranges the kernel legitimately changes (relocations, ftrace and
    /// boot-time patch sites), sorted by offset; never compared byte by byte.
    pub masked: Vec<MaskedRange>,
    /// Relocations to named symbols outside patch sites: the running value
    /// must point where the symbol is in the running kernel.
    pub relocations: Vec<ExpectedReloc>,
}

/// A relocated field of the original code and what it must refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedReloc {
    /// Offset in the function.
    pub offset: u32,
    pub kind: RelocKind,
    pub symbol: String,
    pub addend: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelocKind {
    /// 64-bit absolute: S + A.
    Absolute64,
    /// 32-bit absolute, sign-extended: S + A.
    Absolute32Signed,
    /// 32-bit absolute, zero-extended: S + A.
    Absolute32,
    /// 32-bit PC-relative (PC32, PLT32): S + A - P.
    PcRelative32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedRange {
    pub offset: u32,
    pub len: u32,
}

/// A livepatch symbol (`.klp.sym.<object>.<name>,<sympos>` in the module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadTimeSymbol {
    /// The module defining it.
    pub object: String,
    pub name: String,
    /// Position among same-named symbols of that module (0: unique).
    pub sympos: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedFunction {
    /// Name of the function in the running kernel (as in /proc/kallsyms).
    pub name: String,
    /// Position among same-named symbols of its object, found at build time
    /// from the distribution's module file; used when the module is not
    /// loaded at apply time (a loaded one is checked by `apply` itself).
    pub sympos: Option<u32>,
    /// Source file that defines it, relative to the tree root.
    pub file: String,
    /// Name of the new version inside the package's module.
    pub new_symbol: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SymbolKind {
    Function,
    Data,
    /// Defined in another file; the kernel's symbol table says which.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalSymbol {
    /// Undefined symbol in the module to be given the resolved address.
    pub module_symbol: String,
    /// Name in /proc/kallsyms.
    pub name: String,
    pub kind: SymbolKind,
    /// Source file defining it when it is a file-local (static) symbol.
    pub file: Option<String>,
    /// A global symbol: unique among the kernel's global symbols.
    pub global: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceObject {
    pub file: String,
    pub symbols: Vec<String>,
}

/// A package as built: manifest and the kernel module that carries the code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub manifest: Manifest,
    /// The livepatch module (.ko) with the new functions.
    pub module: Vec<u8>,
}

// ---------------------------------------------------------------------------
// The signed package file
//
//   magic      8 bytes   "DYNAMOS\0"
//   version    4 bytes   FORMAT_VERSION, little endian
//   payload    n bytes   postcard-serialized `Package`
//   public key 32 bytes  ed25519 key of the signer
//   signature  64 bytes  ed25519 signature of magic + version + payload
//
// The payload has no length field of its own: it is whatever lies between
// the header and the trailer, and it must deserialize to exactly one
// `Package` with nothing left over. The signature is checked (strictly,
// rejecting malleable encodings) before the payload is parsed, so a changed
// bit anywhere in the file is refused.
// ---------------------------------------------------------------------------

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// First bytes of every package file.
pub const MAGIC: [u8; 8] = *b"DYNAMOS\0";

const HEADER_LEN: usize = MAGIC.len() + 4;
const KEY_LEN: usize = ed25519_dalek::PUBLIC_KEY_LENGTH;
const SIG_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;
const TRAILER_LEN: usize = KEY_LEN + SIG_LEN;

/// Largest package file `dynamos` will read (kernel modules are far smaller).
pub const MAX_PACKAGE_SIZE: u64 = 512 << 20;

/// Short identity of a public key: the first 8 bytes of its SHA-256,
/// printed as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Serialize and sign `pkg` into the bytes of a package file.
pub fn write_signed(pkg: &Package, key: &SigningKey) -> Vec<u8> {
    let payload = postcard::to_allocvec(pkg).expect("serializing a package to memory cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&payload);
    let signature = key.sign(&out);
    out.extend_from_slice(key.verifying_key().as_bytes());
    out.extend_from_slice(&signature.to_bytes());
    out
}

/// Read a package whose signature verifies and whose signer is one of
/// `trusted`. An untrusted signer is a refusal naming the signer's key id.
pub fn read_verified(bytes: &[u8], trusted: &[VerifyingKey]) -> Result<Package> {
    let (signed, key) = check_signature(bytes)?;
    if !trusted.iter().any(|t| t.as_bytes() == key.as_bytes()) {
        let id = KeyId::of(&key);
        return Err(crate::Error::refused(
            format!("key {id}"),
            if trusted.is_empty() {
                "the package is signed by this key and no key is trusted".to_string()
            } else {
                "the package is signed by this key, which is not trusted".to_string()
            },
        )
        .into());
    }
    parse_payload(signed)
}

/// Read a package checking that it is intact (its signature verifies with
/// the key it carries) but not who signed it; returns the signer's key id.
/// For showing a package, never for applying it.
pub fn read_unverified(bytes: &[u8]) -> Result<(Package, KeyId)> {
    let (signed, key) = check_signature(bytes)?;
    Ok((parse_payload(signed)?, KeyId::of(&key)))
}

/// Check framing and signature; returns the signed part and the signer key.
fn check_signature(bytes: &[u8]) -> Result<(&[u8], VerifyingKey)> {
    if bytes.len() < MAGIC.len() {
        if MAGIC.starts_with(bytes) {
            bail!("truncated package: {} bytes", bytes.len());
        }
        bail!("not a dynamos package (wrong magic)");
    }
    if bytes[..MAGIC.len()] != MAGIC {
        bail!("not a dynamos package (wrong magic)");
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        bail!(
            "truncated package: {} bytes, a package has at least {}",
            bytes.len(),
            HEADER_LEN + TRAILER_LEN
        );
    }
    let version = u32::from_le_bytes(bytes[MAGIC.len()..HEADER_LEN].try_into().unwrap());
    if version > FORMAT_VERSION {
        bail!(
            "package format version {version} is newer than this dynamos supports ({FORMAT_VERSION}); upgrade dynamos"
        );
    }
    if version != FORMAT_VERSION {
        bail!("unsupported package format version {version} (this dynamos reads {FORMAT_VERSION})");
    }
    let (signed, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let key_bytes: [u8; KEY_LEN] = trailer[..KEY_LEN].try_into().unwrap();
    let sig_bytes: [u8; SIG_LEN] = trailer[KEY_LEN..].try_into().unwrap();
    let key = VerifyingKey::from_bytes(&key_bytes)
        .map_err(|_| anyhow::anyhow!("corrupt package: the signer's public key is not valid"))?;
    let signature = Signature::from_bytes(&sig_bytes);
    key.verify_strict(signed, &signature).map_err(|_| {
        anyhow::anyhow!(
            "bad signature: the package was modified or damaged after signing (signer key {})",
            KeyId::of(&key)
        )
    })?;
    Ok((signed, key))
}

fn parse_payload(signed: &[u8]) -> Result<Package> {
    let payload = &signed[HEADER_LEN..];
    let (pkg, rest): (Package, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|e| anyhow::anyhow!("corrupt package contents: {e}"))?;
    if !rest.is_empty() {
        bail!(
            "corrupt package contents: {} unexpected bytes after the package",
            rest.len()
        );
    }
    Ok(pkg)
}

/// Read a package file from disk (size-capped) without trusting it yet.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PACKAGE_SIZE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_PACKAGE_SIZE {
        bail!(
            "{}: larger than {} MiB, not a dynamos package",
            path.display(),
            MAX_PACKAGE_SIZE >> 20
        );
    }
    Ok(bytes)
}

/// Everything `dynamos inspect` shows about a package.
pub fn inspect_json(pkg: &Package, key_id: &KeyId) -> serde_json::Value {
    let m = &pkg.manifest;
    let replaced: Vec<String> = m
        .objects
        .iter()
        .flat_map(|o| {
            o.replaced
                .iter()
                .map(move |f| format!("{}:{}", o.object, f.name))
        })
        .collect();
    serde_json::json!({
        "format_version": FORMAT_VERSION,
        "name": m.name,
        "module_name": m.module_name,
        "target": m.target,
        "tool_version": m.tool_version,
        "key_id": key_id.to_string(),
        "functions_replaced": replaced,
        "module": {
            "size": pkg.module.len(),
            "sha256": hex::encode(Sha256::digest(&pkg.module)),
        },
        "manifest": m,
    })
}

// ---------------------------------------------------------------------------
// Keys
//
// Key files are one line of text so they can be checked by eye:
//   dynamos-ed25519-secret <64 hex digits: the 32-byte seed>
//   dynamos-ed25519-public <64 hex digits: the 32-byte public key>
// ---------------------------------------------------------------------------

pub mod keys {
    use super::KeyId;
    use anyhow::{bail, Context, Result};
    use ed25519_dalek::{SigningKey, VerifyingKey};
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    pub const SECRET_FILE: &str = "signing.key";
    pub const PUBLIC_FILE: &str = "signing.pub";
    const SECRET_TAG: &str = "dynamos-ed25519-secret";
    const PUBLIC_TAG: &str = "dynamos-ed25519-public";

    /// Where `keygen` writes and `dynamos-build` looks for the signing key
    /// unless told otherwise.
    pub fn default_dir() -> PathBuf {
        crate::cache::config_root()
    }

    /// Generate a key pair into `dir` (default: the configuration root):
    /// `signing.key` (mode 0600) and `signing.pub`. Existing keys are only
    /// replaced with `force`. Returns (secret path, public path).
    pub fn keygen(dir: Option<&Path>, force: bool) -> Result<(PathBuf, PathBuf)> {
        let dir = dir.map_or_else(default_dir, Path::to_path_buf);
        let secret_path = dir.join(SECRET_FILE);
        let public_path = dir.join(PUBLIC_FILE);
        if !force {
            for p in [&secret_path, &public_path] {
                if p.symlink_metadata().is_ok() {
                    bail!(
                        "{} already exists; refusing to overwrite a key (use --force)",
                        p.display()
                    );
                }
            }
        }
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)
            .map_err(|e| anyhow::anyhow!("cannot get random bytes for a key: {e}"))?;
        let key = SigningKey::from_bytes(&seed);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_file(&secret_path, &secret_line(&key), 0o600)?;
        write_file(&public_path, &public_line(&key.verifying_key()), 0o644)?;
        Ok((secret_path, public_path))
    }

    pub fn secret_line(key: &SigningKey) -> String {
        format!("{SECRET_TAG} {}\n", hex::encode(key.to_bytes()))
    }

    pub fn public_line(key: &VerifyingKey) -> String {
        format!("{PUBLIC_TAG} {}\n", hex::encode(key.as_bytes()))
    }

    /// Write through a temporary file created with `mode`, then rename, so
    /// the secret is never readable by others, not even briefly.
    fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
        let tmp = path.with_file_name(format!(
            ".{}.tmp{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    fn parse_line(path: &Path, text: &str, tag: &str) -> Result<[u8; 32]> {
        let line = text.trim();
        let hex_part = line
            .strip_prefix(tag)
            .and_then(|rest| rest.strip_prefix(' '))
            .with_context(|| format!("{}: not a `{tag}` key file", path.display()))?;
        let bytes = hex::decode(hex_part.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .with_context(|| format!("{}: the key must be 64 hex digits", path.display()))?;
        Ok(bytes)
    }

    fn read_small(path: &Path) -> Result<String> {
        let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.len() > 4096 {
            bail!("{}: too large to be a key file", path.display());
        }
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }

    /// Load a secret key; refuses a file that others can read.
    pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
        let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "{}: secret key is accessible by other users (mode {:o}); run chmod 600",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let seed = parse_line(path, &read_small(path)?, SECRET_TAG)?;
        Ok(SigningKey::from_bytes(&seed))
    }

    pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
        let bytes = parse_line(path, &read_small(path)?, PUBLIC_TAG)?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| anyhow::anyhow!("{}: not a valid ed25519 public key", path.display()))
    }

    /// All `*.pub` keys in `dir` (e.g. /etc/dynamos/trusted.d), in name
    /// order. A missing folder trusts nothing; an unreadable key is an error
    /// rather than silently ignored.
    pub fn load_trusted_dir(dir: &Path) -> Result<Vec<VerifyingKey>> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot read {}", dir.display()))?
                .path();
            if path.extension().is_some_and(|e| e == "pub") {
                paths.push(path);
            }
        }
        paths.sort();
        paths.iter().map(|p| load_public_key(p)).collect()
    }

    /// Key id of a public key, as printed everywhere.
    pub fn key_id(key: &VerifyingKey) -> KeyId {
        KeyId::of(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Package {
        Package {
            manifest: Manifest {
                name: "fix".into(),
                module_name: "dynamos_fix".into(),
                tool_version: "0.1.0".into(),
                target: TargetIdentity {
                    release: "6.1.0-18-amd64".into(),
                    debian_version: Some("6.1.76-1".into()),
                    build_id: Some("ab".repeat(20)),
                },
                patches: vec![PatchDigest {
                    file: "fix.diff".into(),
                    sha256: "00".into(),
                }],
                objects: vec![ObjectUpdate {
                    object: "vmlinux".into(),
                    load_time: vec![],
                    replaced: vec![ReplacedFunction {
                        name: "cmdline_proc_show".into(),
                        sympos: None,
                        file: "fs/proc/cmdline.c".into(),
                        new_symbol: "livepatch_cmdline_proc_show".into(),
                    }],
                    added: vec![],
                    externals: vec![ExternalSymbol {
                        module_symbol: "__dynamos_ext_0".into(),
                        name: "saved_command_line".into(),
                        kind: SymbolKind::Data,
                        file: None,
                        global: true,
                    }],
                    files: vec![],
                    expected_code: vec![ExpectedCode {
                        name: "cmdline_proc_show".into(),
                        file: "fs/proc/cmdline.c".into(),
                        bytes: vec![0xe8, 0, 0, 0, 0, 0xc3],
                        masked: vec![MaskedRange { offset: 1, len: 4 }],
                        relocations: vec![ExpectedReloc {
                            offset: 1,
                            kind: RelocKind::PcRelative32,
                            symbol: "seq_printf".into(),
                            addend: -4,
                        }],
                    }],
                }],
                replaces: vec![],
            },
            module: b"\x7fELF not really a module".to_vec(),
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let bytes = write_signed(&sample(), &k);
        let pkg = read_verified(&bytes, &[k.verifying_key()]).unwrap();
        assert_eq!(pkg, sample());
        let (pkg, id) = read_unverified(&bytes).unwrap();
        assert_eq!(pkg, sample());
        assert_eq!(id, KeyId::of(&k.verifying_key()));
        assert_eq!(id.to_string().len(), 16);
        let json = inspect_json(&pkg, &id);
        assert_eq!(json["key_id"], id.to_string());
        assert_eq!(json["module"]["size"], sample().module.len());
        assert_eq!(json["functions_replaced"][0], "vmlinux:cmdline_proc_show");
    }

    #[test]
    fn every_bit_flip_is_refused() {
        // A small package keeps this cheap: one verification per bit.
        let mut small = sample();
        small.manifest.objects.clear();
        small.manifest.patches.clear();
        small.module = vec![1, 2, 3];
        let k = key(2);
        let trusted = [k.verifying_key()];
        let bytes = write_signed(&small, &k);
        assert!(read_verified(&bytes, &trusted).is_ok());
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(read_verified(&b, &trusted).is_err(), "bit {bit} accepted");
            if bit % 7 == 0 {
                assert!(
                    read_unverified(&b).is_err(),
                    "bit {bit} accepted unverified"
                );
            }
        }
    }

    #[test]
    fn untrusted_key_names_its_id() {
        let bytes = write_signed(&sample(), &key(3));
        let err = read_verified(&bytes, &[key(4).verifying_key()]).unwrap_err();
        let id = KeyId::of(&key(3).verifying_key()).to_string();
        assert!(err.to_string().contains(&id), "{err}");
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let err = read_verified(&bytes, &[]).unwrap_err();
        assert!(err.to_string().contains(&id), "{err}");
    }

    #[test]
    fn truncation_trailing_magic_version() {
        let k = key(5);
        let trusted = [k.verifying_key()];
        let bytes = write_signed(&sample(), &k);
        for len in 0..bytes.len() {
            assert!(read_verified(&bytes[..len], &trusted).is_err());
        }
        let err = read_verified(&bytes[..20], &trusted).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read_verified(&longer, &trusted).is_err());

        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        let err = read_verified(&wrong, &trusted).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");

        // A correctly signed file from a future format is refused as such.
        let mut future = MAGIC.to_vec();
        future.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        future.extend_from_slice(&[0u8; 10]);
        let sig = k.sign(&future);
        future.extend_from_slice(k.verifying_key().as_bytes());
        future.extend_from_slice(&sig.to_bytes());
        let err = read_verified(&future, &trusted).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn signed_garbage_and_trailing_payload_are_refused() {
        let k = key(6);
        let trusted = [k.verifying_key()];
        let sign = |payload: &[u8]| {
            let mut f = MAGIC.to_vec();
            f.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            f.extend_from_slice(payload);
            let sig = k.sign(&f);
            f.extend_from_slice(k.verifying_key().as_bytes());
            f.extend_from_slice(&sig.to_bytes());
            f
        };
        // A huge announced length must not allocate or panic.
        let err = read_verified(&sign(&[0xff, 0xff, 0xff, 0xff, 0x0f]), &trusted).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        let mut payload = postcard::to_allocvec(&sample()).unwrap();
        payload.push(7);
        let err = read_verified(&sign(&payload), &trusted).unwrap_err();
        assert!(err.to_string().contains("unexpected bytes"), "{err}");
    }

    #[test]
    fn keygen_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, publ) = keys::keygen(Some(dir.path()), false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sec).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&publ).unwrap();
        assert!(text.starts_with("dynamos-ed25519-public "));
        assert!(keys::keygen(Some(dir.path()), false).is_err());
        let sk = keys::load_signing_key(&sec).unwrap();
        let pk = keys::load_public_key(&publ).unwrap();
        assert_eq!(sk.verifying_key(), pk);
        let (sec2, _) = keys::keygen(Some(dir.path()), true).unwrap();
        assert_ne!(
            keys::load_signing_key(&sec2).unwrap().to_bytes(),
            sk.to_bytes()
        );

        let trusted = dir.path().join("trusted.d");
        assert!(keys::load_trusted_dir(&trusted).unwrap().is_empty());
        std::fs::create_dir(&trusted).unwrap();
        std::fs::write(trusted.join("a.pub"), keys::public_line(&pk)).unwrap();
        std::fs::write(trusted.join("README"), "ignored").unwrap();
        assert_eq!(keys::load_trusted_dir(&trusted).unwrap(), vec![pk]);
        std::fs::write(trusted.join("b.pub"), "garbage").unwrap();
        assert!(keys::load_trusted_dir(&trusted).is_err());

        std::fs::set_permissions(&sec2, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(keys::load_signing_key(&sec2).is_err());
    }
}
