//! The update package: manifest + kernel-side payload, signed with ed25519.

use serde::{Deserialize, Serialize};

/// Version of the package file format; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 9;

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
    /// Types whose added members live in shadow data, by index.
    pub shadows: Vec<ShadowType>,
}

/// A struct or union whose added members live in shadow data keyed by the
/// object's address (`crate::shadow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowType {
    /// Index in the package, as the rewritten code passes it.
    pub index: usize,
    /// `struct task_struct`, or a typedef name (`Node`).
    pub type_name: String,
    /// The file defining the type, relative to the tree.
    pub file: String,
    /// The declarations added, as written: `int newpid;`.
    pub members: Vec<String>,
    /// Functions found freeing objects of the type (`free_task`).
    pub release_points: Vec<String>,
}

impl ShadowType {
    /// One line for `dynamos-build` and `inspect`:
    /// `struct task_struct (include/linux/sched.h): int newpid; freed in free_task`.
    pub fn summary(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        format!(
            "{} ({}): {} freed in {}",
            self.type_name,
            self.file,
            members.join(" "),
            self.release_points.join(", ")
        )
    }
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Variables whose initial value the patch changes: the update writes
    /// the new value as it is applied and the old one back on revert.
    /// (Defaulted so records written before value updates still read.)
    #[serde(default)]
    pub value_updates: Vec<ValueUpdate>,
}

/// A running variable the update sets to its new initial value, provided
/// it still holds the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueUpdate {
    /// Name in /proc/kallsyms.
    pub name: String,
    /// Source file defining it.
    pub file: String,
    /// The undefined symbol of the module (listed in `externals`) that
    /// `apply` gives the variable's address.
    pub module_symbol: String,
    /// The old initial value: what the running variable must hold.
    pub old: Vec<u8>,
    /// The new initial value, of the same size.
    pub new: Vec<u8>,
}

impl ValueUpdate {
    /// `name (object, file): old -> new`, as the commands print it.
    pub fn summary(&self, object: &str) -> String {
        format!(
            "{} ({object}, {}): {} -> {}",
            self.name,
            self.file,
            crate::diff::values::describe_value(&self.old),
            crate::diff::values::describe_value(&self.new)
        )
    }
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
    /// Name of the new version inside the package's module: what the
    /// livepatch core redirects to (the dispatcher, for an adaptive one).
    pub new_symbol: String,
    /// Set when an adaptation handler chooses the version per call.
    #[serde(default)]
    pub adaptation: Option<Adaptation>,
    /// Set when the object starts kernel threads that run this function as
    /// their main function: it never returns while such a thread runs.
    #[serde(default)]
    pub kthread: Option<ThreadFunction>,
    /// Set when the function is updated through a transitional clone
    /// instead of the livepatch core (docs/synchronized-updates.md).
    #[serde(default)]
    pub synchronized: Option<Synchronization>,
    /// Set when the kernel threads running the function are restarted into
    /// the new version instead of being switched by the livepatch core.
    #[serde(default)]
    pub restart: Option<ThreadRestart>,
}

impl ReplacedFunction {
    /// Whether the livepatch core redirects it (its `klp_func` table entry
    /// and `sympos`); the module redirects the others itself.
    pub fn in_livepatch_tables(&self) -> bool {
        self.synchronized.is_none() && self.restart.is_none()
    }
}

/// How the module restarts the kernel threads of a thread function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRestart {
    /// Module symbol apply resolves to the running original.
    pub original: String,
    /// Variables of the file that hold the thread's task pointer (what its
    /// starter stores `kthread_run`'s result in), as module symbols apply
    /// resolves, and by name.
    pub task_pointers: Vec<(String, String)>,
    /// What a restarted thread carries into the new version, when the new
    /// version has a restore point.
    pub state: Option<ThreadState>,
}

/// The state a thread restarted into the new version carries: the
/// original's top-level locals, read where the old thread stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Module symbol of the function returning the new version's
    /// `struct dynamos_thread`.
    pub state_of: String,
    /// The original's locals, in the order the module saves them.
    pub locals: Vec<String>,
    /// Those the new version restores by name and type.
    pub restored: Vec<String>,
    /// The patch's state-transfer function, if any.
    pub transfer: Option<String>,
    /// Where each local is at each direct call of the original, by the
    /// call's return offset in the function: where a thread can stop.
    pub sites: Vec<ThreadStateSite>,
}

/// Where the original's locals are at one call it makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadStateSite {
    /// The symbol the call is in: the function, or its `.cold` part.
    pub part: String,
    /// Offset after the call from the start of `part`.
    pub return_offset: u64,
    /// The function called there.
    pub callee: String,
    /// One per local of [`ThreadState::locals`]; None: not readable there.
    pub locations: Vec<Option<LocalLocation>>,
}

/// A place the update module reads a local from, in the old thread's
/// context at the call (DWARF register numbers; the stack pointer is the
/// caller's, before the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalLocation {
    Register { register: u16, size: u8 },
    Memory { base: u16, offset: i64, size: u8 },
    Constant { value: u64, size: u8 },
}

impl LocalLocation {
    /// `index,kind,register,offset,size`: how the module's `restart`
    /// parameter takes it.
    pub fn parameter(&self, index: usize) -> String {
        match *self {
            LocalLocation::Register { register, size } => format!("{index},r,{register},0,{size}"),
            LocalLocation::Memory { base, offset, size } => {
                format!("{index},m,{base},{offset},{size}")
            }
            LocalLocation::Constant { value, size } => {
                format!("{index},c,0,{},{size}", value as i64)
            }
        }
    }
}

/// A function whose sleepers move between its versions at their sleep
/// points: the module redirects its calls to the clone with ftrace itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synchronization {
    /// The clone's entry point in the module.
    pub entry: String,
    /// Module function returning the clone's `struct dynamos_sync`.
    pub control: String,
    /// Module symbol apply resolves to the running original.
    pub original: String,
    /// The clone's sleep points, one line each, for the user.
    pub sleep_points: Vec<String>,
    /// The adaptation handler choosing per call and per sleeper, if any.
    #[serde(default)]
    pub handler: Option<String>,
}

/// How the original object starts the kernel threads whose main function
/// a replaced function is, found from its relocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadFunction {
    /// The functions that pass it to a thread-creating call.
    pub started_by: Vec<String>,
    /// Started per CPU (kthread_create_on_cpu, smpboot): the CPU hotplug
    /// code parks and stops these threads itself.
    pub per_cpu: bool,
    /// The object stops threads with kthread_stop(), which needs the very
    /// task it started.
    pub stopped_by_kthread_stop: bool,
    /// ... and only through the task pointers its starters store, which a
    /// restart points at the new thread.
    #[serde(default)]
    pub stopped_through_task_pointers: bool,
    /// Its starters keep the created task somewhere a restart cannot
    /// switch (a structure, another function, their caller).
    #[serde(default)]
    pub task_escapes: bool,
    /// Why its threads cannot be stopped where they sleep, if they cannot
    /// (a lock held there, a wait-queue entry of their stack).
    #[serde(default)]
    pub stop_hazard: Option<String>,
}

/// Both versions of an adaptively replaced function, inside the package's
/// module, and the handler that chooses between them on each call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adaptation {
    /// The handler, as the patch names it.
    pub handler: String,
    /// The handler inside the package's module.
    pub handler_symbol: String,
    /// Compiled from the patched source.
    pub new_version: String,
    /// Argument registers the dispatcher keeps for the chosen version.
    pub arguments: u8,
    /// Compiled from the original source: what a false choice runs unless
    /// an earlier package's version of the function ran before this one.
    pub old_version: String,
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
    /// Bound at build time (a signed module): the module refers to it as
    /// `.klp.sym.vmlinux.NAME,POS` with this position, which the kernel
    /// resolves as the module loads; apply checks the running kernel
    /// agrees instead of editing the module.
    pub bound_at_build: Option<u32>,
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
    check_header(bytes, bytes.len() as u64)?;
    let (signed, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let (key, signature) = signer(trailer)?;
    key.verify_strict(signed, &signature)
        .map_err(|_| bad_signature(&key))?;
    Ok((signed, key))
}

/// Check the magic and version in `start` (the file's first bytes, up to
/// [`HEADER_LEN`]) and that `total_len` can hold a package.
fn check_header(start: &[u8], total_len: u64) -> Result<()> {
    if start.len() < MAGIC.len() {
        if MAGIC.starts_with(start) {
            bail!("truncated package: {total_len} bytes");
        }
        bail!("not a dynamos package (wrong magic)");
    }
    if start[..MAGIC.len()] != MAGIC {
        bail!("not a dynamos package (wrong magic)");
    }
    if total_len < (HEADER_LEN + TRAILER_LEN) as u64 {
        bail!(
            "truncated package: {total_len} bytes, a package has at least {}",
            HEADER_LEN + TRAILER_LEN
        );
    }
    let version = u32::from_le_bytes(start[MAGIC.len()..HEADER_LEN].try_into().unwrap());
    if version > FORMAT_VERSION {
        bail!(
            "package format version {version} is newer than this dynamos supports ({FORMAT_VERSION}); upgrade dynamos"
        );
    }
    if version != FORMAT_VERSION {
        bail!("unsupported package format version {version} (this dynamos reads {FORMAT_VERSION})");
    }
    Ok(())
}

/// The signer's key and signature from the trailer.
fn signer(trailer: &[u8]) -> Result<(VerifyingKey, Signature)> {
    let key_bytes: [u8; KEY_LEN] = trailer[..KEY_LEN].try_into().unwrap();
    let sig_bytes: [u8; SIG_LEN] = trailer[KEY_LEN..TRAILER_LEN].try_into().unwrap();
    let key = VerifyingKey::from_bytes(&key_bytes)
        .map_err(|_| anyhow::anyhow!("corrupt package: the signer's public key is not valid"))?;
    Ok((key, Signature::from_bytes(&sig_bytes)))
}

fn bad_signature(key: &VerifyingKey) -> anyhow::Error {
    anyhow::anyhow!(
        "bad signature: the package was modified or damaged after signing (signer key {})",
        KeyId::of(key)
    )
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

/// Read a package file from disk without trusting it yet. The header and
/// length are checked before the body is read, and the signature (with
/// the key the file carries) while the body streams past in small pieces,
/// so junk is refused without ever being held in memory; only a file that
/// verifies is read whole (and verified again from memory by the readers
/// above, as the file may change in between).
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let context = || format!("cannot read {}", path.display());
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().with_context(context)?;
    // Only a regular file has a length to check before reading.
    if !meta.is_file() {
        bail!(
            "{}: not a regular file; a package is read from a file",
            path.display()
        );
    }
    let len = meta.len();
    if len > MAX_PACKAGE_SIZE {
        bail!(
            "{}: larger than {} MiB, not a dynamos package",
            path.display(),
            MAX_PACKAGE_SIZE >> 20
        );
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .with_context(context)?;
    check_header(&header, len).with_context(|| path.display().to_string())?;

    let signed_len = len - TRAILER_LEN as u64;
    let mut trailer = [0u8; TRAILER_LEN];
    file.seek(SeekFrom::Start(signed_len))
        .and_then(|_| file.read_exact(&mut trailer))
        .with_context(context)?;
    let (key, signature) = signer(&trailer).with_context(|| path.display().to_string())?;
    // The streaming check is not strict: a small-order key verifies some
    // messages with any signature, so it is refused here as the strict
    // in-memory check would.
    if key.is_weak() {
        return Err(bad_signature(&key)).with_context(|| path.display().to_string());
    }
    let mut verifier = key
        .verify_stream(&signature)
        .map_err(|_| bad_signature(&key))
        .with_context(|| path.display().to_string())?;
    file.seek(SeekFrom::Start(0)).with_context(context)?;
    let mut signed = (&mut file).take(signed_len);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = signed.read(&mut chunk).with_context(context)?;
        if n == 0 {
            break;
        }
        verifier.update(&chunk[..n]);
    }
    if signed.limit() != 0 {
        bail!("{}: the file shrank while being read", path.display());
    }
    verifier
        .finalize_and_verify()
        .map_err(|_| bad_signature(&key))
        .with_context(|| path.display().to_string())?;

    file.seek(SeekFrom::Start(0)).with_context(context)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len + 1)
        .read_to_end(&mut bytes)
        .with_context(context)?;
    if bytes.len() as u64 != len {
        bail!("{}: the file changed while being read", path.display());
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
    let values: Vec<String> = m
        .objects
        .iter()
        .flat_map(|o| o.value_updates.iter().map(move |v| v.summary(&o.object)))
        .collect();
    serde_json::json!({
        "format_version": FORMAT_VERSION,
        "name": m.name,
        "module_name": m.module_name,
        "target": m.target,
        "tool_version": m.tool_version,
        "key_id": key_id.to_string(),
        "functions_replaced": replaced,
        "values_updated": values,
        "module": {
            "size": pkg.module.len(),
            "sha256": hex::encode(Sha256::digest(&pkg.module)),
            "signed": crate::apply::is_signed(&pkg.module),
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
    /// Key files are one short line; anything longer is not one.
    const MAX_KEY_FILE: u64 = 4096;

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
        parse_key_text(text, tag)
            .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))
    }

    fn parse_key_text(text: &str, tag: &str) -> std::result::Result<[u8; 32], String> {
        let hex_part = text
            .trim()
            .strip_prefix(tag)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| format!("not a `{tag}` key file"))?;
        hex::decode(hex_part.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| "the key must be 64 hex digits".to_string())
    }

    fn read_small(path: &Path) -> Result<String> {
        let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.len() > MAX_KEY_FILE {
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

    /// Load a public key to trust (`--trust FILE`): the file and every
    /// folder above it must be safe from other users (see
    /// [`scan_trusted_dir`]); a file that is not a public key is an error.
    pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
        let real =
            fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
        if let (Some(folder), Some(given)) = (real.parent(), path.parent()) {
            check_folders(given, folder)?;
        }
        let text = read_key_file(&real)?.map_err(|problem| crate::Error::Input {
            path: path.to_path_buf(),
            message: problem,
        })?;
        parse_public(&text).map_err(|problem| {
            crate::Error::Input {
                path: path.to_path_buf(),
                message: problem,
            }
            .into()
        })
    }

    fn parse_public(text: &str) -> std::result::Result<VerifyingKey, String> {
        let bytes = parse_key_text(text, PUBLIC_TAG)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid ed25519 public key".to_string())
    }

    /// The keys of a trusted folder, and a warning for each key file that
    /// was skipped because it does not hold a key.
    #[derive(Debug, Default)]
    pub struct TrustedDir {
        pub keys: Vec<VerifyingKey>,
        pub skipped: Vec<String>,
    }

    /// All `*.pub` keys in `dir` (e.g. /etc/dynamos/trusted.d), in name
    /// order, warning on stderr about each key file skipped as malformed.
    pub fn load_trusted_dir(dir: &Path) -> Result<Vec<VerifyingKey>> {
        let found = scan_trusted_dir(dir)?;
        for warning in &found.skipped {
            eprintln!("dynamos: warning: {warning}");
        }
        Ok(found.keys)
    }

    /// Read the trusted keys of `dir`, as sshd's StrictModes reads
    /// `authorized_keys`: whoever can write a key file, the folder or a
    /// folder above it can make the kernel run their code, so the folder,
    /// every folder up to `/` and each key file must be owned by root (or
    /// the user running dynamos) and not writable by group or others; a
    /// folder above may be world-writable with the sticky bit (`/tmp`),
    /// which keeps others from replacing what root owns there. A key file
    /// that is a symbolic link must stay inside the folder. Any of these is
    /// a refusal naming the path. A missing folder trusts nothing; a key
    /// file that holds no valid key is skipped with a warning, so one bad
    /// file does not stop every update.
    pub fn scan_trusted_dir(dir: &Path) -> Result<TrustedDir> {
        let folder = match fs::canonicalize(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TrustedDir::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        check_folders(dir, &folder)?;
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&folder).with_context(|| format!("cannot read {}", folder.display()))?
        {
            let name = entry
                .with_context(|| format!("cannot read {}", folder.display()))?
                .file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "pub") {
                names.push(name);
            }
        }
        names.sort();
        let mut found = TrustedDir::default();
        for name in names {
            let path = folder.join(&name);
            let real = match fs::canonicalize(&path) {
                Ok(real) => real,
                Err(e) => {
                    found
                        .skipped
                        .push(format!("{}: skipped: {e}", path.display()));
                    continue;
                }
            };
            if real.parent() != Some(folder.as_path()) {
                return Err(crate::Error::refused(
                    path.display().to_string(),
                    format!(
                        "symbolic link leading out of {} (to {}): a trusted key must be a file of the folder",
                        folder.display(),
                        real.display()
                    ),
                )
                .into());
            }
            match read_key_file(&real)?.and_then(|text| parse_public(&text)) {
                Ok(key) => found.keys.push(key),
                Err(problem) => found
                    .skipped
                    .push(format!("{}: skipped: {problem}", path.display())),
            }
        }
        Ok(found)
    }

    /// What makes a trust-store path unsafe (an owner other than root or
    /// the user running dynamos, or write permission for group or others)
    /// and the command that fixes it.
    fn unsafe_owner_or_mode(
        meta: &fs::Metadata,
        sticky_allowed: bool,
    ) -> Option<(String, &'static str)> {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != 0 && meta.uid() != euid {
            return Some((
                format!("owned by uid {}, not by root", meta.uid()),
                "chown root",
            ));
        }
        let mode = meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !(sticky_allowed && sticky) {
            let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "group",
                _ => "others",
            };
            return Some((format!("writable by {who} (mode {mode:o})"), "chmod go-w"));
        }
        None
    }

    /// Refuse the folder `given` (canonical: `folder`) when it or a folder
    /// above it could be changed by another user. The folders of the path
    /// as given are checked too: a symbolic link on it is only as safe as
    /// the folder holding the link.
    fn check_folders(given: &Path, folder: &Path) -> Result<()> {
        // `key.pub` has the empty path as its folder.
        let given = if given.as_os_str().is_empty() {
            Path::new(".")
        } else {
            given
        };
        let given = std::path::absolute(given)
            .with_context(|| format!("cannot read {}", given.display()))?;
        for ancestors in [folder.ancestors(), given.ancestors()] {
            for (depth, dir) in ancestors.enumerate() {
                let meta =
                    fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
                if let Some((problem, fix)) = unsafe_owner_or_mode(&meta, depth > 0) {
                    return Err(crate::Error::refused(
                        dir.display().to_string(),
                        format!(
                            "{problem}: other users could change the trusted keys below it ({fix} {})",
                            dir.display()
                        ),
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Open a key file (a canonical path) and check it as opened, so what
    /// is checked is what is read. Unsafe owner or mode is a refusal (the
    /// outer error); a file that cannot hold a key is the inner error.
    fn read_key_file(path: &Path) -> Result<std::result::Result<String, String>> {
        use std::io::Read;
        // O_NONBLOCK: a FIFO named like a key must not hang the open.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?;
        if let Some((problem, fix)) = unsafe_owner_or_mode(&meta, false) {
            return Err(crate::Error::refused(
                path.display().to_string(),
                format!(
                    "{problem}: other users could replace this trusted key ({fix} {})",
                    path.display()
                ),
            )
            .into());
        }
        if !meta.is_file() {
            return Ok(Err("not a regular file".to_string()));
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Ok(Err("too large to be a key file".to_string()));
        }
        Ok(String::from_utf8(bytes).map_err(|_| "not a text file".to_string()))
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
                        adaptation: None,
                        kthread: None,
                        synchronized: None,
                        restart: None,
                    }],
                    added: vec![],
                    externals: vec![ExternalSymbol {
                        module_symbol: "__dynamos_ext_0".into(),
                        name: "saved_command_line".into(),
                        kind: SymbolKind::Data,
                        file: None,
                        bound_at_build: None,
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
                    value_updates: vec![ValueUpdate {
                        name: "lease_break_time".into(),
                        file: "fs/locks.c".into(),
                        module_symbol: "__dynamos_value_0".into(),
                        old: 45i32.to_le_bytes().to_vec(),
                        new: 30i32.to_le_bytes().to_vec(),
                    }],
                }],
                replaces: vec![],
                shadows: vec![],
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
        assert_eq!(keys::load_trusted_dir(&trusted).unwrap(), vec![pk]);

        std::fs::set_permissions(&sec2, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(keys::load_signing_key(&sec2).is_err());
    }

    /// A trusted folder `trusted.d` with one good key, in a fresh folder.
    fn trust_store() -> (tempfile::TempDir, std::path::PathBuf, VerifyingKey) {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let folder = base.path().join("trusted.d");
        std::fs::create_dir(&folder).unwrap();
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = key(10).verifying_key();
        let file = folder.join("good.pub");
        std::fs::write(&file, keys::public_line(&key)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        (base, folder, key)
    }

    /// `scan_trusted_dir` fails as a refusal whose message names `path`
    /// and holds `what`.
    fn assert_refused(folder: &std::path::Path, path: &std::path::Path, what: &str) {
        let err = keys::scan_trusted_dir(folder).unwrap_err();
        let text = format!("{err:#}");
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED,
            "{text}"
        );
        assert!(
            text.contains(&format!("refused: {}: ", path.display())) && text.contains(what),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn trust_store_modes_are_checked_up_to_the_root() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let (base, folder, key) = trust_store();
        let found = keys::scan_trusted_dir(&folder).unwrap();
        assert_eq!(found.keys, vec![key]);
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        let file = folder.join("good.pub");

        mode(&folder, 0o775);
        assert_refused(&folder, &folder, "writable by group (mode 775)");
        mode(&folder, 0o757);
        assert_refused(&folder, &folder, "writable by others (mode 757)");
        // Sticky is no excuse for the key folder itself.
        mode(&folder, 0o1777);
        assert_refused(&folder, &folder, "writable by group and others (mode 1777)");
        mode(&folder, 0o755);

        // A folder above: refused when anyone may rename things in it,
        // accepted with the sticky bit as on /tmp.
        mode(base.path(), 0o777);
        assert_refused(&folder, base.path(), "writable by group and others");
        mode(base.path(), 0o1777);
        assert_eq!(keys::scan_trusted_dir(&folder).unwrap().keys, vec![key]);
        mode(base.path(), 0o700);

        mode(&file, 0o664);
        assert_refused(&folder, &file, "writable by group (mode 664)");
        mode(&file, 0o646);
        assert_refused(&folder, &file, "writable by others");
        mode(&file, 0o444);
        assert_eq!(keys::scan_trusted_dir(&folder).unwrap().keys, vec![key]);

        // The folder given through a symbolic link is checked where it is.
        let link = base.path().join("link.d");
        std::os::unix::fs::symlink(&folder, &link).unwrap();
        assert_eq!(keys::scan_trusted_dir(&link).unwrap().keys, vec![key]);
        mode(&folder, 0o777);
        assert_refused(&link, &folder, "writable by group and others");
        mode(&folder, 0o755);
        // ... and the link is only as safe as the folder holding it.
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        let link = open.join("link.d");
        std::os::unix::fs::symlink(&folder, &link).unwrap();
        assert_eq!(keys::scan_trusted_dir(&link).unwrap().keys, vec![key]);
        mode(&open, 0o777);
        assert_refused(&link, &open, "writable by group and others");
    }

    #[test]
    fn trust_store_owners_must_be_root() {
        use std::os::unix::fs::chown;
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test changes owners: run it as root"
        );
        let (base, folder, key) = trust_store();
        let file = folder.join("good.pub");
        chown(&file, Some(1000), None).unwrap();
        assert_refused(&folder, &file, "owned by uid 1000, not by root");
        let err = keys::load_public_key(&file).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        chown(&file, Some(0), None).unwrap();
        chown(&folder, Some(1000), None).unwrap();
        assert_refused(&folder, &folder, "owned by uid 1000");
        chown(&folder, Some(0), None).unwrap();
        chown(base.path(), Some(1000), None).unwrap();
        assert_refused(&folder, base.path(), "owned by uid 1000");
        chown(base.path(), Some(0), None).unwrap();
        // Another group owning a file it cannot write is harmless.
        chown(&file, None, Some(1000)).unwrap();
        assert_eq!(keys::scan_trusted_dir(&folder).unwrap().keys, vec![key]);
    }

    #[test]
    fn trust_store_symlinks_stay_in_the_folder() {
        let (base, folder, key) = trust_store();
        let outside = base.path().join("outside.pub");
        let other = SigningKey::from_bytes(&[11; 32]).verifying_key();
        std::fs::write(&outside, keys::public_line(&other)).unwrap();
        let evil = folder.join("evil.pub");
        std::os::unix::fs::symlink(&outside, &evil).unwrap();
        assert_refused(&folder, &evil, "symbolic link leading out of");
        std::fs::remove_file(&evil).unwrap();
        std::os::unix::fs::symlink("../outside.pub", &evil).unwrap();
        assert_refused(&folder, &evil, "symbolic link leading out of");
        std::fs::remove_file(&evil).unwrap();

        // A link to another key file of the folder reads that file.
        std::os::unix::fs::symlink("good.pub", folder.join("alias.pub")).unwrap();
        assert_eq!(
            keys::scan_trusted_dir(&folder).unwrap().keys,
            vec![key, key]
        );
        // One that leads nowhere is skipped like a malformed key.
        std::os::unix::fs::symlink("gone.pub", folder.join("dangling.pub")).unwrap();
        let found = keys::scan_trusted_dir(&folder).unwrap();
        assert_eq!(found.keys, vec![key, key]);
        assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
        assert!(
            found.skipped[0].contains("dangling.pub"),
            "{:?}",
            found.skipped
        );
    }

    #[test]
    fn malformed_trusted_keys_are_skipped_with_a_warning() {
        let (_base, folder, key) = trust_store();
        std::fs::write(folder.join("a-garbage.pub"), "garbage\n").unwrap();
        let secret = keys::secret_line(&SigningKey::from_bytes(&[12; 32]));
        std::fs::write(folder.join("b-secret.pub"), secret).unwrap();
        std::fs::write(folder.join("c-long.pub"), vec![b'a'; 5000]).unwrap();
        std::fs::create_dir(folder.join("d-folder.pub")).unwrap();
        // 64 hex digits that are not a point of the curve.
        let off_curve = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .unwrap();
        let off_curve = format!("dynamos-ed25519-public {}\n", hex::encode(off_curve));
        std::fs::write(folder.join("e-off-curve.pub"), off_curve).unwrap();
        let found = keys::scan_trusted_dir(&folder).unwrap();
        assert_eq!(found.keys, vec![key]);
        let names = ["a-garbage", "b-secret", "c-long", "d-folder", "e-off-curve"];
        assert_eq!(found.skipped.len(), names.len(), "{:?}", found.skipped);
        for (warning, name) in found.skipped.iter().zip(names) {
            assert!(
                warning.contains(&format!("{name}.pub: skipped: ")),
                "{warning}"
            );
        }
        assert_eq!(keys::load_trusted_dir(&folder).unwrap(), vec![key]);

        // A key named on the command line must be one.
        let err = keys::load_public_key(&folder.join("a-garbage.pub")).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), crate::error::exit::ERROR);
        assert!(
            format!("{err:#}").contains("a-garbage.pub: not a"),
            "{err:#}"
        );
        assert_eq!(
            keys::load_public_key(&folder.join("good.pub")).unwrap(),
            key
        );
        // A FIFO named like a key neither hangs nor counts.
        let fifo = folder.join("f-fifo.pub");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let found = keys::scan_trusted_dir(&folder).unwrap();
        assert_eq!(found.keys, vec![key]);
        assert!(found.skipped.last().unwrap().contains("f-fifo.pub"));
    }

    #[test]
    fn reading_junk_files_is_quick_and_small() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        // Not a file: refused before anything is read.
        let started = Instant::now();
        let err = read_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        // Junk behind a correct header, 300 MiB of it (sparse on disk):
        // refused by the signature check read in small pieces.
        let junk = dir.path().join("junk.dynpkg");
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        std::fs::write(&junk, &head).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&junk).unwrap();
        file.set_len(300 << 20).unwrap();
        let err = read_file(&junk).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
        // Wrong magic: only the header is read.
        std::fs::write(&junk, b"\x7fELF and more").unwrap();
        file.set_len(300 << 20).unwrap();
        let err = read_file(&junk).unwrap_err();
        assert!(format!("{err:#}").contains("wrong magic"), "{err:#}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        // Over the size limit: refused from its length alone.
        file.set_len(MAX_PACKAGE_SIZE + 1).unwrap();
        let err = read_file(&junk).unwrap_err();
        assert!(format!("{err:#}").contains("larger than"), "{err:#}");

        // A good package still reads, byte for byte.
        let k = key(13);
        let good = dir.path().join("good.dynpkg");
        let bytes = write_signed(&sample(), &k);
        std::fs::write(&good, &bytes).unwrap();
        assert_eq!(read_file(&good).unwrap(), bytes);
        // One flipped bit is caught before the file is held.
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        std::fs::write(&good, &flipped).unwrap();
        let err = read_file(&good).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
    }
}
