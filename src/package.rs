//! The update package: manifest + kernel-side payload, signed with ed25519.

use serde::{Deserialize, Serialize};

/// Version of the package file format; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// `uname -r` of the kernel the package is for.
    pub release: String,
    /// Debian package version of that kernel, when it is a Debian build.
    pub debian_version: Option<String>,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedFunction {
    /// Name of the function in the running kernel (as in /proc/kallsyms).
    pub name: String,
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
