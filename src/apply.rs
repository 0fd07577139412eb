//! Applying, reverting and listing live updates on the running kernel.
//!
//! A package's module is a livepatch module: loading it registers a
//! `klp_patch` named like the module. Its new code refers to kernel symbols
//! that are not exported through undefined symbols (`__dynamos_ext_N`);
//! before loading, each is resolved from /proc/kallsyms and turned into an
//! absolute symbol in the module image, so the kernel's own module loader
//! applies every relocation. The position (`sympos`) of each replaced
//! function among same-named kernel symbols is passed as a module parameter.

use crate::error::Error;
use crate::package::{self, keys, KeyId, Manifest, ObjectUpdate, SymbolKind};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel and dynamos keep what `apply`, `revert` and `list` read.
/// Only tests point these elsewhere.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub livepatch: PathBuf,
    pub sys_module: PathBuf,
    pub kallsyms: PathBuf,
    pub proc: PathBuf,
    /// One `<module_name>.json` record per applied package.
    pub state_dir: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        SystemPaths {
            livepatch: "/sys/kernel/livepatch".into(),
            sys_module: "/sys/module".into(),
            kallsyms: "/proc/kallsyms".into(),
            proc: "/proc".into(),
            state_dir: "/var/lib/dynamos/applied".into(),
        }
    }
}

pub const DEFAULT_TRUSTED_DIR: &str = "/etc/dynamos/trusted.d";
pub const DEFAULT_TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Folders of trusted `*.pub` keys.
    pub trusted_dirs: Vec<PathBuf>,
    /// Further trusted public key files (`--trust FILE`).
    pub extra_trust: Vec<PathBuf>,
    /// How long the livepatch transition may take before the update is
    /// reversed and unloaded.
    pub transition_timeout: Duration,
    pub paths: SystemPaths,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            trusted_dirs: vec![DEFAULT_TRUSTED_DIR.into()],
            extra_trust: Vec::new(),
            transition_timeout: DEFAULT_TRANSITION_TIMEOUT,
            paths: SystemPaths::default(),
        }
    }
}

/// A kernel symbol the module's code was linked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedSymbol {
    pub module_symbol: String,
    pub name: String,
    pub object: String,
    pub address: u64,
}

/// What `dynamos apply` did.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedPackage {
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// The `sympos` parameter given to the module, in manifest order.
    pub sympos: Vec<u32>,
    pub resolved: Vec<ResolvedSymbol>,
    /// How long the livepatch transition took.
    pub transition: Duration,
}

/// The record kept in the state folder for each applied package.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub manifest: Manifest,
    pub key_id: String,
    pub module_sha256: String,
    pub sympos: Vec<u32>,
    /// Nanoseconds since the Unix epoch; orders `revert` of everything.
    pub applied_at_ns: u64,
}

// ---------------------------------------------------------------------------
// /proc/kallsyms
// ---------------------------------------------------------------------------

/// One line of /proc/kallsyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ksym {
    pub address: u64,
    /// The type letter (`t`, `T`, `d`, `A`, ...).
    pub kind: char,
    pub name: String,
    /// The `[module]` tag; `None` for vmlinux.
    pub module: Option<String>,
}

/// Parse /proc/kallsyms text, keeping its order.
pub fn parse_kallsyms(text: &str) -> Result<Vec<Ksym>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("/proc/kallsyms line {}: malformed: {line:?}", n + 1);
        };
        let address = u64::from_str_radix(addr, 16)
            .map_err(|_| anyhow!("/proc/kallsyms line {}: bad address {addr:?}", n + 1))?;
        let mut kinds = kind.chars();
        let (Some(kind), None) = (kinds.next(), kinds.next()) else {
            bail!("/proc/kallsyms line {}: bad type {kind:?}", n + 1);
        };
        let module = match parts.next() {
            None => None,
            Some(tag) => Some(
                tag.strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .with_context(|| format!("/proc/kallsyms line {}: bad module tag", n + 1))?
                    .to_string(),
            ),
        };
        out.push(Ksym {
            address,
            kind,
            name: name.to_string(),
            module,
        });
    }
    Ok(out)
}

/// The entries of one object (`vmlinux` or a module name), in kallsyms order.
pub fn object_symbols<'a>(all: &'a [Ksym], object: &str) -> Vec<&'a Ksym> {
    all.iter()
        .filter(|s| match &s.module {
            None => object == "vmlinux",
            Some(m) => m == object,
        })
        .collect()
}

/// Whether a kallsyms type letter fits a symbol kind. Per-cpu variables are
/// listed as absolute (`A`) symbols whose value is their per-cpu offset.
pub fn kind_matches(kind: SymbolKind, letter: char) -> bool {
    match kind {
        SymbolKind::Function => matches!(letter, 't' | 'T' | 'w' | 'W'),
        SymbolKind::Data => matches!(
            letter,
            'd' | 'D' | 'b' | 'B' | 'r' | 'R' | 'v' | 'V' | 'w' | 'W' | 'a' | 'A'
        ),
        SymbolKind::Any => true,
    }
}

fn is_global(letter: char) -> bool {
    letter.is_ascii_uppercase()
}

/// The symbol picked for a name, and its livepatch `sympos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into the object's symbol list.
    pub index: usize,
    pub address: u64,
    /// 0 when the name is unique in the object, else the 1-based position
    /// of the chosen entry among every same-named entry, in kallsyms order
    /// (the order the kernel's livepatch lookup counts in).
    pub sympos: u32,
}

/// How far, in kallsyms entries, to look around a candidate for symbols of
/// its source file.
pub const NEIGHBOURHOOD: usize = 16;

/// Pick the entry of `syms` (one object's kallsyms, in order) for `name`.
///
/// One candidate of the right kind is taken as is. Among several (static
/// symbols of the same name in different files), `file_symbols` (what the
/// defining file defines) decides: the candidate with the most of them
/// nearby wins, if it is the only one with that score. Without
/// `file_symbols` the symbol is global, and the only global candidate wins.
/// The error is a one-line reason about `name`.
pub fn choose(
    syms: &[&Ksym],
    name: &str,
    kind: SymbolKind,
    file_symbols: Option<&[String]>,
) -> std::result::Result<Choice, String> {
    let same_name: Vec<usize> = (0..syms.len()).filter(|&i| syms[i].name == name).collect();
    let candidates: Vec<usize> = same_name
        .iter()
        .copied()
        .filter(|&i| kind_matches(kind, syms[i].kind))
        .collect();
    let what = match kind {
        SymbolKind::Function => "function",
        SymbolKind::Data => "data symbol",
        SymbolKind::Any => "symbol",
    };
    let pick = match candidates.len() {
        0 if same_name.is_empty() => {
            return Err("not found in the running kernel".to_string());
        }
        0 => {
            return Err(format!(
                "present in the running kernel but not as a {what} (type {})",
                syms[same_name[0]].kind
            ))
        }
        1 => candidates[0],
        n => match file_symbols {
            Some(file_syms) => {
                let wanted: HashSet<&str> = file_syms
                    .iter()
                    .map(String::as_str)
                    .filter(|s| *s != name)
                    .collect();
                let scores: Vec<usize> = candidates
                    .iter()
                    .map(|&i| neighbour_score(syms, i, &wanted))
                    .collect();
                let best = scores.iter().copied().max().unwrap_or(0);
                let winners: Vec<usize> = candidates
                    .iter()
                    .zip(&scores)
                    .filter(|(_, &s)| s == best)
                    .map(|(&i, _)| i)
                    .collect();
                if best == 0 || winners.len() != 1 {
                    return Err(format!(
                        "ambiguous: {n} {what}s of this name in the running kernel and the symbols of its source file do not tell them apart"
                    ));
                }
                winners[0]
            }
            None => {
                let globals: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| is_global(syms[i].kind))
                    .collect();
                if globals.len() != 1 {
                    return Err(format!(
                        "ambiguous: {n} {what}s of this name in the running kernel and no source file to tell them apart"
                    ));
                }
                globals[0]
            }
        },
    };
    let sympos = if same_name.len() == 1 {
        0
    } else {
        same_name.iter().position(|&i| i == pick).unwrap_or(0) as u32 + 1
    };
    Ok(Choice {
        index: pick,
        address: syms[pick].address,
        sympos,
    })
}

fn neighbour_score(syms: &[&Ksym], at: usize, wanted: &HashSet<&str>) -> usize {
    let lo = at.saturating_sub(NEIGHBOURHOOD);
    let hi = (at + NEIGHBOURHOOD).min(syms.len() - 1);
    let mut seen = HashSet::new();
    for (i, s) in syms.iter().enumerate().take(hi + 1).skip(lo) {
        if i != at && wanted.contains(s.name.as_str()) {
            seen.insert(s.name.as_str());
        }
    }
    seen.len()
}

/// The symbols the source file `file` defines, per the manifest. Matches the
/// path exactly, else ignoring the extension (`x.c` / `x.o`).
fn file_symbols<'a>(obj: &'a ObjectUpdate, file: &str) -> Option<&'a [String]> {
    fn stem(p: &str) -> &str {
        match p.rfind('.') {
            Some(dot) if !p[dot..].contains('/') => &p[..dot],
            _ => p,
        }
    }
    obj.files
        .iter()
        .find(|f| f.file == file)
        .or_else(|| obj.files.iter().find(|f| stem(&f.file) == stem(file)))
        .map(|f| f.symbols.as_slice())
}

/// Resolution of a whole manifest against a running kernel's kallsyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub externals: Vec<ResolvedSymbol>,
    /// In manifest order: objects, then their replaced functions.
    pub sympos: Vec<u32>,
}

/// Resolve every external symbol and the `sympos` of every replaced
/// function. Every problem found is reported, as one refusal.
pub fn resolve(manifest: &Manifest, kallsyms: &[Ksym]) -> Result<Resolution> {
    if !kallsyms.is_empty() && kallsyms.iter().all(|s| s.address == 0) {
        bail!("/proc/kallsyms shows no addresses (kptr_restrict); dynamos apply must run as root");
    }
    let mut refusals = Vec::new();
    let mut externals = Vec::new();
    let mut sympos = Vec::new();
    for obj in &manifest.objects {
        let syms = object_symbols(kallsyms, &obj.object);
        if syms.is_empty() {
            refusals.push(crate::Refusal {
                symbol: obj.object.clone(),
                reason: if obj.object == "vmlinux" {
                    "no vmlinux symbols in /proc/kallsyms".into()
                } else {
                    "module is not loaded; load it before applying this update".into()
                },
            });
            continue;
        }
        for f in &obj.replaced {
            match choose(
                &syms,
                &f.name,
                SymbolKind::Function,
                file_symbols(obj, &f.file),
            ) {
                Ok(c) => sympos.push(c.sympos),
                Err(reason) => refusals.push(crate::Refusal {
                    symbol: qualified(&obj.object, &f.name),
                    reason,
                }),
            }
        }
        for e in &obj.externals {
            let fsyms = match &e.file {
                Some(file) => Some(file_symbols(obj, file).unwrap_or(&[])),
                None => None,
            };
            match choose(&syms, &e.name, e.kind, fsyms) {
                Ok(c) => externals.push(ResolvedSymbol {
                    module_symbol: e.module_symbol.clone(),
                    name: e.name.clone(),
                    object: obj.object.clone(),
                    address: c.address,
                }),
                Err(mut reason) => refusals.push(crate::Refusal {
                    symbol: qualified(&obj.object, &e.name),
                    reason: {
                        if e.kind == SymbolKind::Data
                            && obj.object == "vmlinux"
                            && !lists_data_symbols(&syms)
                        {
                            reason.push_str(
                                " (this kernel lists no data symbols in /proc/kallsyms: CONFIG_KALLSYMS_ALL is off)",
                            );
                        }
                        reason
                    },
                }),
            }
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(Resolution { externals, sympos })
}

/// Whether kallsyms lists data symbols at all (CONFIG_KALLSYMS_ALL): without
/// it only a handful of data symbols show up among the functions.
fn lists_data_symbols(syms: &[&Ksym]) -> bool {
    let data = syms
        .iter()
        .filter(|s| matches!(s.kind, 'd' | 'D' | 'b' | 'B'))
        .count();
    data * 100 >= syms.len()
}

fn qualified(object: &str, name: &str) -> String {
    if object == "vmlinux" {
        name.to_string()
    } else {
        format!("{object}:{name}")
    }
}

/// The module parameter string carrying the `sympos` values.
pub fn sympos_param(sympos: &[u32]) -> String {
    if sympos.is_empty() {
        return String::new();
    }
    let list: Vec<String> = sympos.iter().map(u32::to_string).collect();
    format!("sympos={}", list.join(","))
}

// ---------------------------------------------------------------------------
// ELF64 module image
// ---------------------------------------------------------------------------

const SHT_SYMTAB: u32 = 2;
const SHN_UNDEF: u16 = 0;
const SHN_ABS: u16 = 0xfff1;
const STB_GLOBAL: u8 = 1;
const SYM_SIZE: usize = 24;

struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

struct Elf {
    big_endian: bool,
    sections: Vec<Section>,
    shstrndx: usize,
}

fn bytes_at(data: &[u8], offset: u64, len: u64) -> Result<&[u8]> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= data.len() as u64)
        .ok_or_else(|| anyhow!("module image is damaged: data out of bounds"))?;
    Ok(&data[offset as usize..end as usize])
}

impl Elf {
    fn parse(data: &[u8]) -> Result<Elf> {
        if data.len() < 64 || data[..4] != *b"\x7fELF" {
            bail!("package module is not an ELF file");
        }
        if data[4] != 2 {
            bail!("package module is not a 64-bit ELF file");
        }
        let big_endian = match data[5] {
            1 => false,
            2 => true,
            _ => bail!("package module has an unknown ELF byte order"),
        };
        let mut elf = Elf {
            big_endian,
            sections: Vec::new(),
            shstrndx: 0,
        };
        let shoff = elf.u64(data, 0x28)?;
        let shentsize = elf.u16(data, 0x3a)? as u64;
        let mut shnum = elf.u16(data, 0x3c)? as u64;
        let mut shstrndx = elf.u16(data, 0x3e)? as u64;
        if shoff == 0 {
            bail!("package module has no section headers");
        }
        if shentsize < 64 {
            bail!("package module has malformed section headers");
        }
        if shnum == 0 || shstrndx == 0xffff {
            // Extended numbering: the real values live in section 0.
            let first = bytes_at(data, shoff, 64)?;
            if shnum == 0 {
                shnum = elf.u64(first, 0x20)?;
            }
            if shstrndx == 0xffff {
                shstrndx = elf.u32(first, 0x28)? as u64;
            }
        }
        // Bounds-check the whole table before reserving anything for it.
        bytes_at(
            data,
            shoff,
            shnum
                .checked_mul(shentsize)
                .ok_or_else(|| anyhow!("module image is damaged: too many sections"))?,
        )?;
        for i in 0..shnum {
            let h = bytes_at(data, shoff + i * shentsize, 64)?;
            elf.sections.push(Section {
                name: elf.u32(h, 0)?,
                kind: elf.u32(h, 4)?,
                offset: elf.u64(h, 0x18)?,
                size: elf.u64(h, 0x20)?,
                link: elf.u32(h, 0x28)?,
                entsize: elf.u64(h, 0x38)?,
            });
        }
        elf.shstrndx = shstrndx as usize;
        Ok(elf)
    }

    fn u16(&self, d: &[u8], off: u64) -> Result<u16> {
        let b: [u8; 2] = bytes_at(d, off, 2)?.try_into().unwrap();
        Ok(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }
    fn u32(&self, d: &[u8], off: u64) -> Result<u32> {
        let b: [u8; 4] = bytes_at(d, off, 4)?.try_into().unwrap();
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    fn u64(&self, d: &[u8], off: u64) -> Result<u64> {
        let b: [u8; 8] = bytes_at(d, off, 8)?.try_into().unwrap();
        Ok(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }

    fn section_data<'a>(&self, data: &'a [u8], index: usize) -> Result<&'a [u8]> {
        let s = self
            .sections
            .get(index)
            .ok_or_else(|| anyhow!("module image is damaged: bad section index {index}"))?;
        bytes_at(data, s.offset, s.size)
    }

    fn section_name<'a>(&self, data: &'a [u8], index: usize) -> Result<&'a [u8]> {
        let strtab = self.section_data(data, self.shstrndx)?;
        c_str_at(strtab, self.sections[index].name as usize)
    }
}

fn c_str_at(table: &[u8], offset: usize) -> Result<&[u8]> {
    let tail = table
        .get(offset..)
        .ok_or_else(|| anyhow!("module image is damaged: name out of bounds"))?;
    let len = tail
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| anyhow!("module image is damaged: unterminated name"))?;
    Ok(&tail[..len])
}

/// Turn each named undefined global symbol of the module image into an
/// absolute symbol with the given value, editing the symbol table in place.
/// Every name must be present exactly once as an undefined global symbol.
pub fn make_symbols_absolute(image: &mut [u8], values: &[(String, u64)]) -> Result<()> {
    let elf = Elf::parse(image)?;
    let mut found = vec![0usize; values.len()];
    let mut edits: Vec<(usize, u64)> = Vec::new(); // (symbol entry offset, value)
    for (index, sec) in elf.sections.iter().enumerate() {
        if sec.kind != SHT_SYMTAB {
            continue;
        }
        if sec.entsize as usize != SYM_SIZE {
            bail!(
                "module image is damaged: symbol table entry size {}",
                sec.entsize
            );
        }
        let symtab = elf.section_data(image, index)?;
        let strtab = elf.section_data(image, sec.link as usize)?;
        for n in 0..symtab.len() / SYM_SIZE {
            let entry = &symtab[n * SYM_SIZE..(n + 1) * SYM_SIZE];
            let name = c_str_at(strtab, elf.u32(entry, 0)? as usize)?;
            let Some(want) = values.iter().position(|(v, _)| v.as_bytes() == name) else {
                continue;
            };
            let shndx = elf.u16(entry, 6)?;
            let bind = entry[4] >> 4;
            if shndx != SHN_UNDEF || bind != STB_GLOBAL {
                bail!(
                    "module symbol {} is not an undefined global symbol",
                    values[want].0
                );
            }
            found[want] += 1;
            edits.push((sec.offset as usize + n * SYM_SIZE, values[want].1));
        }
    }
    for (i, count) in found.iter().enumerate() {
        match count {
            1 => {}
            0 => bail!("module has no symbol {} to resolve", values[i].0),
            _ => bail!("module has symbol {} more than once", values[i].0),
        }
    }
    for (at, value) in edits {
        let (shndx, val) = if elf.big_endian {
            (SHN_ABS.to_be_bytes(), value.to_be_bytes())
        } else {
            (SHN_ABS.to_le_bytes(), value.to_le_bytes())
        };
        image[at + 6..at + 8].copy_from_slice(&shndx);
        image[at + 8..at + 16].copy_from_slice(&val);
    }
    Ok(())
}

/// The `name=` entry of the module's .modinfo section, if any.
pub fn modinfo_name(image: &[u8]) -> Result<Option<String>> {
    let elf = Elf::parse(image)?;
    for index in 0..elf.sections.len() {
        if elf.section_name(image, index)? != b".modinfo" {
            continue;
        }
        let info = elf.section_data(image, index)?;
        for entry in info.split(|&b| b == 0) {
            if let Some(name) = entry.strip_prefix(b"name=") {
                return Ok(Some(String::from_utf8_lossy(name).into_owned()));
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Kernel interfaces
// ---------------------------------------------------------------------------

fn kernel_release() -> Result<String> {
    // SAFETY: utsname is plain data; uname fills it and NUL-terminates fields.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        bail!("uname failed: {}", std::io::Error::last_os_error());
    }
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

fn init_module(image: &[u8], params: &str) -> std::io::Result<()> {
    let params = CString::new(params).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: image and params outlive the call; the kernel copies both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len() as libc::c_ulong,
            params.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn delete_module(name: &str) -> std::io::Result<()> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: name is a valid C string for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Module and livepatch names are used in paths: keep them plain.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 55
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("{name:?} is not a valid kernel module name");
    }
    Ok(())
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Wait until the livepatch `name` is not in transition (its folder gone
/// counts as settled). Halfway through, idle tasks are sent the livepatch's
/// fake signal, which lets sleeping tasks switch without a real signal.
fn wait_transition(paths: &SystemPaths, name: &str, timeout: Duration) -> bool {
    let dir = paths.livepatch.join(name);
    let start = Instant::now();
    let mut signalled = false;
    loop {
        match read_trimmed(&dir.join("transition")) {
            None => return true,
            Some(v) if v == "0" => return true,
            _ => {}
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return false;
        }
        if !signalled && elapsed >= timeout / 2 {
            let _ = fs::write(dir.join("signal"), "1");
            signalled = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Tasks whose livepatch state differs from the transition's target, as
/// `pid/tid (comm)`, with the top of their kernel stack when readable.
fn blocking_tasks(paths: &SystemPaths, name: &str) -> Vec<String> {
    let target = match read_trimmed(&paths.livepatch.join(name).join("enabled")).as_deref() {
        Some("1") => "1",
        Some("0") => "0",
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir(&paths.proc) else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let state = read_trimmed(&t.path().join("patch_state"));
            match state.as_deref() {
                Some(s) if s != target && s != "-1" => {}
                _ => continue,
            }
            let comm = read_trimmed(&t.path().join("comm")).unwrap_or_default();
            let top = fs::read_to_string(t.path().join("stack"))
                .ok()
                .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
                .map(|l| format!(" in {l}"))
                .unwrap_or_default();
            out.push(format!(
                "{pid}/{} ({comm}){top}",
                t.file_name().to_string_lossy()
            ));
            if out.len() >= 10 {
                return out;
            }
        }
    }
    out
}

/// Disable the livepatch `name` if it is enabled, wait for it to settle,
/// then unload its module. If disabling does not settle in time, `restore`
/// turns the patch back on (as it was before: fully applied); without it
/// the kernel is left to finish switching back on its own.
fn disable_and_unload(
    paths: &SystemPaths,
    name: &str,
    timeout: Duration,
    restore: bool,
) -> Result<()> {
    let dir = paths.livepatch.join(name);
    if read_trimmed(&dir.join("enabled")).as_deref() == Some("1") {
        fs::write(dir.join("enabled"), "0")
            .with_context(|| format!("cannot disable livepatch {name}"))?;
    }
    if !wait_transition(paths, name, timeout) {
        let blockers = blocking_tasks(paths, name);
        let outcome = if restore
            && fs::write(dir.join("enabled"), "1").is_ok()
            && wait_transition(paths, name, timeout)
        {
            "it was switched back on and is still applied".to_string()
        } else {
            format!("it is still switching back; run `dynamos revert {name}` once it settles")
        };
        bail!(
            "livepatch {name} did not finish disabling within {}s{}; {outcome}",
            timeout.as_secs(),
            describe_blockers(&blockers),
        );
    }
    unload_module(paths, name, timeout)
}

/// Unload module `name`, retrying while the livepatch core still holds it
/// (it lets go shortly after the patch is disabled).
fn unload_module(paths: &SystemPaths, name: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match delete_module(name) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                    && start.elapsed() < timeout =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let still = if paths.livepatch.join(name).exists() {
                    " (its livepatch is still registered)"
                } else {
                    ""
                };
                bail!("cannot unload module {name}: {e}{still}");
            }
        }
    }
}

fn describe_blockers(blockers: &[String]) -> String {
    if blockers.is_empty() {
        String::new()
    } else {
        format!("; tasks not yet switched: {}", blockers.join(", "))
    }
}

fn lock(paths: &SystemPaths) -> Result<crate::cache::Lock> {
    crate::cache::Lock::acquire(&paths.state_dir.join(".lock"))
}

fn record_path(paths: &SystemPaths, module: &str) -> PathBuf {
    paths.state_dir.join(format!("{module}.json"))
}

// ---------------------------------------------------------------------------
// apply
// ---------------------------------------------------------------------------

/// Collect the trusted keys: every `*.pub` of the trusted folders and the
/// extra files.
pub fn trusted_keys(opts: &ApplyOptions) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    let mut keys_out = Vec::new();
    for dir in &opts.trusted_dirs {
        keys_out.extend(keys::load_trusted_dir(dir)?);
    }
    for file in &opts.extra_trust {
        keys_out.push(keys::load_public_key(file)?);
    }
    Ok(keys_out)
}

/// Apply the package at `pkg_path` to the running kernel.
pub fn apply(pkg_path: &Path, opts: &ApplyOptions) -> Result<AppliedPackage> {
    // Nothing is looked at before the package proves who made it.
    let bytes = package::read_file(pkg_path)?;
    let trusted = trusted_keys(opts)?;
    let pkg = package::read_verified(&bytes, &trusted)
        .with_context(|| format!("{}", pkg_path.display()))?;
    let signer = package::read_unverified(&bytes)?.1;
    let manifest = &pkg.manifest;
    let name = &manifest.module_name;
    check_name(name)?;

    let running = kernel_release()?;
    if running != manifest.target.release {
        return Err(Error::refused(
            &manifest.name,
            format!(
                "built for kernel {} but the running kernel is {running}",
                manifest.target.release
            ),
        )
        .into());
    }
    // The same release string can name different builds: the build-id
    // tells them apart.
    if let (Some(wanted), Some(running_id)) = (
        manifest.target.build_id.as_deref(),
        crate::identity::running_build_id()?,
    ) {
        if wanted != running_id {
            return Err(Error::refused(
                &manifest.name,
                format!(
                    "built for kernel {running} with build-id {wanted} but the running kernel's build-id is {running_id}"
                ),
            )
            .into());
        }
    }
    let paths = &opts.paths;
    if !paths.livepatch.is_dir() {
        bail!(
            "{} does not exist: this kernel has no livepatch support",
            paths.livepatch.display()
        );
    }
    if let Some(inner) = modinfo_name(&pkg.module)? {
        if &inner != name {
            bail!("package module is named {inner} but the manifest says {name}");
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("dynamos apply must run as root");
    }
    let _lock = lock(paths)?;
    if paths.livepatch.join(name).exists() || paths.sys_module.join(name).exists() {
        return Err(Error::refused(
            name,
            "a module or livepatch of this name is already loaded (see dynamos list)",
        )
        .into());
    }

    let text = fs::read_to_string(&paths.kallsyms)
        .with_context(|| format!("cannot read {}", paths.kallsyms.display()))?;
    let kallsyms = parse_kallsyms(&text)?;
    let resolution = resolve(manifest, &kallsyms)?;
    let mut image = pkg.module.clone();
    let values: Vec<(String, u64)> = resolution
        .externals
        .iter()
        .map(|r| (r.module_symbol.clone(), r.address))
        .collect();
    make_symbols_absolute(&mut image, &values)?;

    let params = sympos_param(&resolution.sympos);
    if let Err(e) = init_module(&image, &params) {
        let hint = match e.raw_os_error() {
            Some(libc::EKEYREJECTED) | Some(libc::ENOKEY) | Some(libc::EPERM) => {
                " (module signature enforcement or kernel lockdown forbids loading it)"
            }
            Some(libc::EEXIST) => " (a module of this name is already loaded)",
            _ => " (see dmesg)",
        };
        bail!("the kernel refused to load module {name}: {e}{hint}");
    }

    // From here on, any failure must leave no module behind.
    let timeout = opts.transition_timeout;
    let started = Instant::now();
    let result = (|| -> Result<Duration> {
        if !paths.livepatch.join(name).is_dir() {
            bail!("module {name} loaded but registered no livepatch {name}");
        }
        if !wait_transition(paths, name, timeout) {
            let blockers = blocking_tasks(paths, name);
            bail!(
                "the livepatch transition did not finish within {}s{}",
                timeout.as_secs(),
                describe_blockers(&blockers)
            );
        }
        if read_trimmed(&paths.livepatch.join(name).join("enabled")).as_deref() != Some("1") {
            bail!("livepatch {name} is not enabled after loading");
        }
        let took = started.elapsed();
        let record = AppliedRecord {
            manifest: manifest.clone(),
            key_id: signer.to_string(),
            module_sha256: hex::encode(Sha256::digest(&pkg.module)),
            sympos: resolution.sympos.clone(),
            applied_at_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        let json = serde_json::to_vec_pretty(&record)?;
        crate::cache::write_atomic(&record_path(paths, name), &json)?;
        Ok(took)
    })();
    match result {
        Ok(transition) => Ok(AppliedPackage {
            manifest: manifest.clone(),
            key_id: signer,
            sympos: resolution.sympos,
            resolved: resolution.externals,
            transition,
        }),
        Err(err) => {
            let cleanup = disable_and_unload(paths, name, timeout, false);
            match cleanup {
                Ok(()) => Err(anyhow!(
                    "{err:#}; update {} was reverted and unloaded",
                    manifest.name
                )),
                Err(c) => Err(anyhow!("{err:#}; reverting it failed too: {c:#}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// revert and list
// ---------------------------------------------------------------------------

fn read_records(paths: &SystemPaths) -> Result<Vec<AppliedRecord>> {
    let entries = match fs::read_dir(&paths.state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.state_dir.display()))
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') || !file.ends_with(".json") {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let record: AppliedRecord = serde_json::from_str(&text)
            .with_context(|| format!("{}: damaged state record", path.display()))?;
        out.push(record);
    }
    out.sort_by_key(|r| r.applied_at_ns);
    Ok(out)
}

/// Map a package or module name to the module name of an applied update.
fn module_for(paths: &SystemPaths, records: &[AppliedRecord], name: &str) -> Result<String> {
    if let Some(r) = records.iter().find(|r| r.manifest.module_name == name) {
        return Ok(r.manifest.module_name.clone());
    }
    let by_package: Vec<&AppliedRecord> =
        records.iter().filter(|r| r.manifest.name == name).collect();
    match by_package.len() {
        1 => return Ok(by_package[0].manifest.module_name.clone()),
        0 => {}
        _ => bail!(
            "several applied updates are named {name}; give the module name ({})",
            by_package
                .iter()
                .map(|r| r.manifest.module_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    check_name(name)?;
    if paths.livepatch.join(name).is_dir() {
        return Ok(name.to_string());
    }
    bail!("no applied live update named {name}")
}

/// Revert one update (by package or module name), or every update applied
/// by dynamos, newest first. Returns the module names reverted.
pub fn revert(name: Option<&str>, timeout: Duration) -> Result<Vec<String>> {
    revert_at(&SystemPaths::default(), name, timeout)
}

pub fn revert_at(
    paths: &SystemPaths,
    name: Option<&str>,
    timeout: Duration,
) -> Result<Vec<String>> {
    let _lock = lock(paths)?;
    let records = read_records(paths)?;
    let modules: Vec<String> = match name {
        Some(n) => vec![module_for(paths, &records, n)?],
        None => records
            .iter()
            .rev()
            .map(|r| r.manifest.module_name.clone())
            .collect(),
    };
    let mut done = Vec::new();
    for module in modules {
        check_name(&module)?;
        disable_and_unload(paths, &module, timeout, true).with_context(|| {
            if done.is_empty() {
                format!("reverting {module}")
            } else {
                format!("reverting {module} (already reverted: {})", done.join(", "))
            }
        })?;
        let record = record_path(paths, &module);
        if record.exists() {
            fs::remove_file(&record)
                .with_context(|| format!("cannot remove {}", record.display()))?;
        }
        done.push(module);
    }
    Ok(done)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveFunction {
    pub name: String,
    pub sympos: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveObject {
    /// `vmlinux` or a module name.
    pub object: String,
    /// Whether the object's functions are redirected now (a module object
    /// is patched only while that module is loaded); unknown on old kernels.
    pub patched: Option<bool>,
    pub functions: Vec<LiveFunction>,
}

/// One live update known to the kernel or to dynamos.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveUpdate {
    /// Livepatch (and module) name.
    pub name: String,
    /// Package name, for updates applied by dynamos.
    pub package: Option<String>,
    /// Registered in /sys/kernel/livepatch; false for a dynamos record whose
    /// livepatch is gone (for instance replaced by a cumulative one).
    pub in_kernel: bool,
    pub enabled: bool,
    pub transition: bool,
    pub objects: Vec<LiveObject>,
}

/// Every livepatch of the running kernel, and every dynamos update recorded.
pub fn list() -> Result<Vec<LiveUpdate>> {
    list_at(&SystemPaths::default())
}

pub fn list_at(paths: &SystemPaths) -> Result<Vec<LiveUpdate>> {
    let records = read_records(paths)?;
    let mut out = Vec::new();
    let mut names: Vec<String> = match fs::read_dir(&paths.livepatch) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.livepatch.display()))
        }
    };
    names.sort();
    for name in &names {
        let dir = paths.livepatch.join(name);
        let record = records.iter().find(|r| &r.manifest.module_name == name);
        let mut objects = sysfs_objects(&dir);
        if objects.is_empty() {
            if let Some(r) = record {
                objects = record_objects(r);
            }
        }
        out.push(LiveUpdate {
            name: name.clone(),
            package: record.map(|r| r.manifest.name.clone()),
            in_kernel: true,
            enabled: read_trimmed(&dir.join("enabled")).as_deref() == Some("1"),
            transition: read_trimmed(&dir.join("transition")).as_deref() == Some("1"),
            objects,
        });
    }
    for r in &records {
        if !names.contains(&r.manifest.module_name) {
            out.push(LiveUpdate {
                name: r.manifest.module_name.clone(),
                package: Some(r.manifest.name.clone()),
                in_kernel: false,
                enabled: false,
                transition: false,
                objects: record_objects(r),
            });
        }
    }
    Ok(out)
}

fn sysfs_objects(patch_dir: &Path) -> Vec<LiveObject> {
    let mut objects = Vec::new();
    let Ok(entries) = fs::read_dir(patch_dir) else {
        return objects;
    };
    for obj in entries.flatten().filter(|e| e.path().is_dir()) {
        let mut functions: Vec<LiveFunction> = fs::read_dir(obj.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let dir = e.file_name().to_string_lossy().into_owned();
                match dir.rsplit_once(',') {
                    Some((n, pos)) => LiveFunction {
                        name: n.to_string(),
                        sympos: pos.parse().ok(),
                    },
                    None => LiveFunction {
                        name: dir,
                        sympos: None,
                    },
                }
            })
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        objects.push(LiveObject {
            object: obj.file_name().to_string_lossy().into_owned(),
            patched: read_trimmed(&obj.path().join("patched")).map(|v| v == "1"),
            functions,
        });
    }
    objects.sort_by(|a, b| a.object.cmp(&b.object));
    objects
}

fn record_objects(r: &AppliedRecord) -> Vec<LiveObject> {
    let mut pos = r.sympos.iter();
    r.manifest
        .objects
        .iter()
        .map(|o| LiveObject {
            object: o.object.clone(),
            patched: None,
            functions: o
                .replaced
                .iter()
                .map(|f| LiveFunction {
                    name: f.name.clone(),
                    sympos: pos.next().copied(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{ExternalSymbol, ReplacedFunction, SourceObject, TargetIdentity};

    /// Groups of symbols from different files, far enough apart in
    /// kallsyms order that their neighbourhoods do not overlap.
    const GROUPS: [&str; 6] = [
        "ffffffff81000000 T _stext\n",
        "ffffffff81001000 t a_helper\nffffffff81001100 t show\n\
         ffffffff81001200 t a_other\nffffffff81001300 d a_table\n",
        "ffffffff81002000 t b_helper\nffffffff81002100 t show\nffffffff81002200 t b_other\n",
        "ffffffff81003000 T global_fn\nffffffff81003100 t global_fn\n\
         ffffffff81003200 D jiffies_like\n0000000000012340 A runqueues\n",
        "ffffffff81004000 t twin\nffffffff81004100 t twin\n",
        "ffffffffc0001000 t show\t[some_mod]\nffffffffc0001100 T mod_fn\t[some_mod]\n",
    ];

    fn kallsyms_text() -> String {
        let mut text = String::new();
        for (g, group) in GROUPS.iter().enumerate() {
            text.push_str(group);
            if g + 1 < GROUPS.len() {
                for i in 0..NEIGHBOURHOOD {
                    text.push_str(&format!("ffffffff8{g}{i:06x} t filler_{g}_{i}\n"));
                }
            }
        }
        text
    }

    fn ks() -> Vec<Ksym> {
        parse_kallsyms(&kallsyms_text()).unwrap()
    }

    #[test]
    fn parses_kallsyms() {
        let k = ks();
        assert_eq!(k.len(), 16 + 5 * NEIGHBOURHOOD);
        assert_eq!(
            k[k.len() - 2],
            Ksym {
                address: 0xffffffffc0001000,
                kind: 't',
                name: "show".into(),
                module: Some("some_mod".into())
            }
        );
        assert_eq!(object_symbols(&k, "vmlinux").len(), 14 + 5 * NEIGHBOURHOOD);
        assert_eq!(object_symbols(&k, "some_mod").len(), 2);
        assert!(parse_kallsyms("zz T x\n").is_err());
        assert!(parse_kallsyms("ffff TT x\n").is_err());
        assert!(parse_kallsyms("ffff T x mod\n").is_err());
    }

    /// The parser and the choice hold up on the kallsyms of the machine
    /// running the tests, when it shows addresses.
    #[test]
    fn handles_this_machines_kallsyms() {
        let Ok(text) = fs::read_to_string("/proc/kallsyms") else {
            return;
        };
        let all = parse_kallsyms(&text).unwrap();
        if all.iter().all(|s| s.address == 0) {
            return;
        }
        let v = object_symbols(&all, "vmlinux");
        let mut counts = std::collections::HashMap::new();
        for s in &v {
            *counts.entry(s.name.as_str()).or_insert(0u32) += 1;
        }
        let mut names: Vec<(&str, u32)> = counts.into_iter().collect();
        names.sort_by_key(|&(name, n)| (std::cmp::Reverse(n), name));
        let sample = names.iter().take(100).chain(names.iter().rev().take(100));
        for (name, n) in sample {
            match choose(&v, name, SymbolKind::Function, None) {
                Ok(c) => {
                    assert_eq!(v[c.index].name, *name);
                    assert_eq!(c.sympos == 0, *n == 1, "{name}");
                }
                Err(e) => assert!(*n > 1 || e.contains("not as a function"), "{name}: {e}"),
            }
        }
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chooses_candidates() {
        let k = ks();
        let v = object_symbols(&k, "vmlinux");
        let f = SymbolKind::Function;
        // Unique name.
        let c = choose(&v, "a_helper", f, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81001000, 0));
        // Statics told apart by their file's neighbours.
        let b = strs(&["b_helper", "b_other", "show"]);
        let c = choose(&v, "show", f, Some(&b)).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81002100, 2));
        let a = strs(&["a_helper", "a_other", "a_table", "show"]);
        let c = choose(&v, "show", f, Some(&a)).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81001100, 1));
        // Nothing tells them apart.
        let err = choose(&v, "show", f, Some(&strs(&["unrelated"]))).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(choose(&v, "show", f, None)
            .unwrap_err()
            .contains("ambiguous"));
        let err = choose(&v, "twin", f, Some(&strs(&["twin", "global_fn"]))).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        // A global among same-named statics, no file: the global.
        let c = choose(&v, "global_fn", f, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81003000, 1));
        // Kinds.
        assert_eq!(
            choose(&v, "runqueues", SymbolKind::Data, None)
                .unwrap()
                .address,
            0x12340
        );
        assert!(choose(&v, "a_table", f, None)
            .unwrap_err()
            .contains("not as a function"));
        assert!(choose(&v, "nope", f, None)
            .unwrap_err()
            .contains("not found in the running kernel"));
        // Module objects only see their own symbols.
        let m = object_symbols(&k, "some_mod");
        let c = choose(&m, "show", f, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffffc0001000, 0));
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "fix".into(),
            module_name: "dynamos_fix".into(),
            tool_version: "0".into(),
            target: TargetIdentity {
                release: "x".into(),
                debian_version: None,
                build_id: None,
            },
            patches: vec![],
            objects: vec![ObjectUpdate {
                object: "vmlinux".into(),
                replaced: vec![
                    ReplacedFunction {
                        name: "a_helper".into(),
                        file: "a.c".into(),
                        new_symbol: "n1".into(),
                    },
                    ReplacedFunction {
                        name: "show".into(),
                        file: "b.c".into(),
                        new_symbol: "n2".into(),
                    },
                ],
                added: vec![],
                externals: vec![
                    ExternalSymbol {
                        module_symbol: "__dynamos_ext_0".into(),
                        name: "show".into(),
                        kind: SymbolKind::Function,
                        file: Some("a.c".into()),
                        global: false,
                    },
                    ExternalSymbol {
                        module_symbol: "__dynamos_ext_1".into(),
                        name: "runqueues".into(),
                        kind: SymbolKind::Data,
                        file: None,
                        global: true,
                    },
                ],
                files: vec![
                    SourceObject {
                        file: "a.o".into(),
                        symbols: strs(&["a_helper", "show", "a_other"]),
                    },
                    SourceObject {
                        file: "b.c".into(),
                        symbols: strs(&["b_helper", "show", "b_other"]),
                    },
                ],
            }],
        }
    }

    #[test]
    fn resolves_manifest() {
        let r = resolve(&manifest(), &ks()).unwrap();
        assert_eq!(r.sympos, vec![0, 2]);
        assert_eq!(sympos_param(&r.sympos), "sympos=0,2");
        assert_eq!(r.externals.len(), 2);
        assert_eq!(r.externals[0].address, 0xffffffff81001100);
        assert_eq!(r.externals[1].address, 0x12340);

        let mut m = manifest();
        m.objects[0].externals[0].file = Some("c.c".into());
        m.objects[0].replaced[0].name = "gone".into();
        let err = resolve(&m, &ks()).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = err.to_string();
        assert!(
            text.contains("gone: not found in the running kernel"),
            "{text}"
        );
        assert!(text.contains("show: ambiguous"), "{text}");

        let mut m = manifest();
        m.objects[0].replaced.clear();
        m.objects[0].externals.remove(0);
        let functions_only =
            parse_kallsyms("ffffffff81000000 T a\nffffffff81000010 t b\n").unwrap();
        let err = resolve(&m, &functions_only).unwrap_err().to_string();
        assert!(err.contains("CONFIG_KALLSYMS_ALL"), "{err}");

        let mut m = manifest();
        m.objects[0].object = "other_mod".into();
        let err = resolve(&m, &ks()).unwrap_err().to_string();
        assert!(err.contains("other_mod: module is not loaded"), "{err}");

        let hidden = "0000000000000000 T a\n0000000000000000 t b\n";
        let err = resolve(&manifest(), &parse_kallsyms(hidden).unwrap()).unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
        assert_eq!(sympos_param(&[]), "");
    }

    fn compile(dir: &Path, src: &str) -> Vec<u8> {
        let c = dir.join("t.c");
        let o = dir.join("t.o");
        fs::write(&c, src).unwrap();
        let st = std::process::Command::new("cc")
            .args(["-c", "-O2", "-fno-pic", "-o"])
            .arg(&o)
            .arg(&c)
            .status()
            .expect("cc must be installed to run this test");
        assert!(st.success());
        fs::read(&o).unwrap()
    }

    #[test]
    fn rewrites_undefined_symbols_to_absolute() {
        use object::{Object, ObjectSymbol, SymbolSection};
        let dir = tempfile::tempdir().unwrap();
        let src = "extern int __dynamos_ext_0(int);\nextern int __dynamos_ext_1;\n\
                   static int local_fn(int x) { return x + 1; }\n\
                   int f(int x) { return __dynamos_ext_0(x) + __dynamos_ext_1 + local_fn(x); }\n";
        let original = compile(dir.path(), src);
        let mut image = original.clone();
        let values = vec![
            ("__dynamos_ext_0".to_string(), 0xffffffff81234560u64),
            ("__dynamos_ext_1".to_string(), 0x12340u64),
        ];
        make_symbols_absolute(&mut image, &values).unwrap();
        assert_eq!(image.len(), original.len());
        let file = object::File::parse(&*image).unwrap();
        for (name, value) in &values {
            let sym = file.symbol_by_name(name).unwrap();
            assert_eq!(sym.section(), SymbolSection::Absolute, "{name}");
            assert_eq!(sym.address(), *value);
            assert!(sym.is_global());
        }
        // Only those two symbol entries changed.
        let changed = image.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed <= 2 * 10, "{changed} bytes changed");

        // Defined, local, missing or repeated requests are refused.
        let mut again = image.clone();
        let err = make_symbols_absolute(&mut again, &values[..1]).unwrap_err();
        assert!(err.to_string().contains("not an undefined global"), "{err}");
        let mut img = original.clone();
        assert!(make_symbols_absolute(&mut img, &[("f".into(), 1)]).is_err());
        let err = make_symbols_absolute(&mut img, &[("absent".into(), 1)]).unwrap_err();
        assert!(err.to_string().contains("no symbol absent"), "{err}");
        assert_eq!(img, original);
        assert_eq!(modinfo_name(&original).unwrap(), None);
    }

    #[test]
    fn damaged_images_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let original = compile(
            dir.path(),
            "extern int g(void); int f(void) { return g(); }\n",
        );
        let values = [("g".to_string(), 5u64)];
        assert!(make_symbols_absolute(&mut original.clone(), &values).is_ok());
        // Every truncation and a sweep of byte changes: errors, never panics.
        for len in (0..original.len()).step_by(7) {
            let _ = make_symbols_absolute(&mut original[..len].to_vec(), &values);
            let _ = modinfo_name(&original[..len]);
        }
        for at in 0..original.len().min(4096) {
            for v in [0x00u8, 0xff, 0x80] {
                let mut img = original.clone();
                img[at] = v;
                let _ = make_symbols_absolute(&mut img, &values);
                let _ = modinfo_name(&img);
            }
        }
        assert!(make_symbols_absolute(&mut b"nope".to_vec(), &values).is_err());
    }

    #[test]
    fn finds_modinfo_name() {
        let dir = tempfile::tempdir().unwrap();
        let image = compile(
            dir.path(),
            "__attribute__((section(\".modinfo\"), used)) static const char a[] = \"license=GPL\";\n\
             __attribute__((section(\".modinfo\"), used)) static const char b[] = \"name=dynamos_fix\";\n",
        );
        assert_eq!(
            modinfo_name(&image).unwrap().as_deref(),
            Some("dynamos_fix")
        );
    }

    #[test]
    fn apply_checks_trust_and_kernel_first() {
        use crate::package::{write_signed, Package};
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_system(dir.path());
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let trust = dir.path().join("trusted.d");
        fs::create_dir(&trust).unwrap();
        let write = |release: &str| {
            let mut m = manifest();
            m.target.release = release.into();
            let bytes = write_signed(
                &Package {
                    manifest: m,
                    module: vec![],
                },
                &key,
            );
            let path = dir.path().join("fix.dynamos");
            fs::write(&path, bytes).unwrap();
            path
        };
        let opts = ApplyOptions {
            trusted_dirs: vec![trust.clone()],
            extra_trust: vec![],
            transition_timeout: Duration::from_secs(1),
            paths: paths.clone(),
        };
        // Untrusted: refused naming the key, whatever else is wrong.
        let pkg = write("no-such-kernel");
        let err = apply(&pkg, &opts).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let id = KeyId::of(&key.verifying_key()).to_string();
        assert!(format!("{err:#}").contains(&id), "{err:#}");

        // Trusted, built for another kernel: refused naming both.
        fs::write(trust.join("k.pub"), keys::public_line(&key.verifying_key())).unwrap();
        let err = apply(&pkg, &opts).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let running = kernel_release().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("no-such-kernel") && text.contains(&running),
            "{text}"
        );

        // Right kernel, no livepatch support (the fake sysfs is empty).
        let pkg = write(&running);
        let err = apply(&pkg, &opts).unwrap_err();
        assert!(
            format!("{err:#}").contains("no livepatch support"),
            "{err:#}"
        );

        // A corrupted file never gets that far.
        let mut bytes = fs::read(&pkg).unwrap();
        bytes[20] ^= 4;
        fs::write(&pkg, bytes).unwrap();
        let err = apply(&pkg, &opts).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
    }

    fn fake_system(root: &Path) -> SystemPaths {
        SystemPaths {
            livepatch: root.join("livepatch"),
            sys_module: root.join("module"),
            kallsyms: root.join("kallsyms"),
            proc: root.join("proc"),
            state_dir: root.join("state"),
        }
    }

    #[test]
    fn lists_livepatches_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_system(dir.path());
        let lp = paths.livepatch.join("dynamos_fix");
        fs::create_dir_all(lp.join("vmlinux/show,2")).unwrap();
        fs::create_dir_all(lp.join("vmlinux/a_helper,0")).unwrap();
        fs::write(lp.join("vmlinux/patched"), "1\n").unwrap();
        fs::write(lp.join("enabled"), "1\n").unwrap();
        fs::write(lp.join("transition"), "0\n").unwrap();
        let other = paths.livepatch.join("kpatch_x");
        fs::create_dir_all(other.join("vmlinux")).unwrap();
        fs::write(other.join("enabled"), "0\n").unwrap();
        fs::write(other.join("transition"), "1\n").unwrap();
        let record = |module: &str, at: u64| {
            let mut m = manifest();
            m.module_name = module.into();
            let r = AppliedRecord {
                manifest: m,
                key_id: "00".into(),
                module_sha256: "00".into(),
                sympos: vec![0, 2],
                applied_at_ns: at,
            };
            crate::cache::write_atomic(
                &record_path(&paths, module),
                &serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        };
        record("dynamos_fix", 1);
        record("dynamos_gone", 2);

        let l = list_at(&paths).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].name, "dynamos_fix");
        assert_eq!(l[0].package.as_deref(), Some("fix"));
        assert!(l[0].enabled && !l[0].transition && l[0].in_kernel);
        assert_eq!(l[0].objects[0].patched, Some(true));
        assert_eq!(
            l[0].objects[0].functions,
            vec![
                LiveFunction {
                    name: "a_helper".into(),
                    sympos: Some(0)
                },
                LiveFunction {
                    name: "show".into(),
                    sympos: Some(2)
                }
            ]
        );
        assert_eq!(l[1].name, "kpatch_x");
        assert!(l[1].package.is_none() && !l[1].enabled && l[1].transition);
        assert_eq!(l[2].name, "dynamos_gone");
        assert!(!l[2].in_kernel);
        assert_eq!(l[2].objects[0].functions[1].sympos, Some(2));

        let records = read_records(&paths).unwrap();
        assert_eq!(
            module_for(&paths, &records, "dynamos_gone").unwrap(),
            "dynamos_gone"
        );
        assert!(module_for(&paths, &records, "fix")
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert_eq!(
            module_for(&paths, &records, "kpatch_x").unwrap(),
            "kpatch_x"
        );
        assert!(module_for(&paths, &records, "../etc").is_err());
        assert!(module_for(&paths, &records, "absent").is_err());
    }
}
