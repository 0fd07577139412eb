//! Resolving a package against the running kernel: which kallsyms entry
//! each replaced function and each external symbol is, and whether the
//! running code of the functions involved is what the package was built
//! from (run-pre verification, see `crate::runpre`).

use super::kcore::KernelMemory;
use crate::error::Error;
use crate::package::{ExpectedCode, Manifest, ObjectUpdate, SourceObject, SymbolKind};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// A kernel symbol the module's code was linked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedSymbol {
    pub module_symbol: String,
    pub name: String,
    pub object: String,
    pub address: u64,
    /// The module's relocations name it already; the kernel binds them.
    #[serde(default)]
    pub bound_at_build: bool,
}

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
pub fn object_symbols<'a>(all: &'a [Ksym], object: &str) -> ObjectSymbols<'a> {
    ObjectSymbols::new(
        all.iter()
            .filter(|s| match &s.module {
                None => object == "vmlinux",
                Some(m) => m == object,
            })
            .collect(),
    )
}

/// One object's kallsyms entries in order, indexed by name: a kernel has
/// some 200,000 of them, too many to scan once per symbol looked up.
#[derive(Debug, Clone)]
pub struct ObjectSymbols<'a> {
    list: Vec<&'a Ksym>,
    by_name: HashMap<&'a str, Vec<usize>>,
}

impl<'a> ObjectSymbols<'a> {
    pub fn new(list: Vec<&'a Ksym>) -> ObjectSymbols<'a> {
        let mut by_name: HashMap<&'a str, Vec<usize>> = HashMap::new();
        for (i, s) in list.iter().enumerate() {
            by_name.entry(s.name.as_str()).or_default().push(i);
        }
        ObjectSymbols { list, by_name }
    }

    /// Positions in the list of the entries called `name`, in order.
    pub fn positions(&self, name: &str) -> &[usize] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }
}

impl<'a> std::ops::Deref for ObjectSymbols<'a> {
    type Target = [&'a Ksym];
    fn deref(&self) -> &[&'a Ksym] {
        &self.list
    }
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
/// symbols of the same name in different files), those whose running code
/// is the expected one (`runs_expected_code`, when the package has that
/// function's code) are kept; then `file_symbols` (what the
/// defining file defines) decides: the candidate with the most of them
/// nearby wins, if it is the only one with that score. Without
/// `file_symbols` the symbol is global, and the only global candidate wins.
/// The error is a one-line reason about `name`.
pub fn choose(
    syms: &ObjectSymbols,
    name: &str,
    kind: SymbolKind,
    file_symbols: Option<&[String]>,
    runs_expected_code: Option<&dyn Fn(u64) -> bool>,
) -> std::result::Result<Choice, String> {
    let same_name: Vec<usize> = syms.positions(name).to_vec();
    let candidates: Vec<usize> = same_name
        .iter()
        .copied()
        .filter(|&i| kind_matches(kind, syms[i].kind))
        .collect();
    // Same-named statics: the one running the code the package was built
    // against is the one meant (Ksplice's run-pre matching).
    let candidates = match runs_expected_code {
        Some(matches) if candidates.len() > 1 => {
            let running: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&i| matches(syms[i].address))
                .collect();
            if running.is_empty() {
                candidates
            } else {
                running
            }
        }
        _ => candidates,
    };
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
                // Bookkeeping names (`__key.0`, `_rs.3`) recur in most files:
                // a neighbour of that name tells nothing about the file.
                let wanted: HashSet<&str> = file_syms
                    .iter()
                    .map(String::as_str)
                    .filter(|s| *s != name && !crate::diff::is_bookkeeping(s))
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
pub fn file_symbols<'a>(files: &'a [SourceObject], file: &str) -> Option<&'a [String]> {
    fn stem(p: &str) -> &str {
        match p.rfind('.') {
            Some(dot) if !p[dot..].contains('/') => &p[..dot],
            _ => p,
        }
    }
    files
        .iter()
        .find(|f| f.file == file)
        .or_else(|| files.iter().find(|f| stem(&f.file) == stem(file)))
        .map(|f| f.symbols.as_slice())
}

/// Resolution of a whole manifest against a running kernel's kallsyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub externals: Vec<ResolvedSymbol>,
    /// In manifest order: objects, then their replaced functions.
    pub sympos: Vec<u32>,
    /// How many functions' running code was checked against the package.
    pub verified_functions: usize,
    /// Module objects not loaded now: patched when they load.
    pub not_loaded: Vec<String>,
}

/// Resolve every external symbol and the `sympos` of every replaced
/// function, and check the running code of every function the package
/// has expected code for. Every problem found is reported, as one refusal.
pub fn resolve(
    manifest: &Manifest,
    kallsyms: &[Ksym],
    memory: &dyn KernelMemory,
) -> Result<Resolution> {
    if !kallsyms.is_empty() && kallsyms.iter().all(|s| s.address == 0) {
        bail!("/proc/kallsyms shows no addresses (kptr_restrict); dynamos apply must run as root");
    }
    let mut refusals = Vec::new();
    let mut externals = Vec::new();
    let mut sympos = Vec::new();
    let mut verified_functions = 0;
    let mut not_loaded = Vec::new();
    let vmlinux = object_symbols(kallsyms, "vmlinux");
    let all = ObjectSymbols::new(kallsyms.iter().collect());
    if vmlinux.is_empty() {
        bail!("no vmlinux symbols in /proc/kallsyms");
    }
    for obj in &manifest.objects {
        let syms = object_symbols(kallsyms, &obj.object);
        // What a module's new code uses outside it is in vmlinux; what it
        // uses inside a module is resolved by the livepatch core at load.
        let external_syms = if obj.object == "vmlinux" {
            &syms
        } else {
            &vmlinux
        };
        if syms.is_empty() {
            // A module loaded later is patched by the livepatch core as it
            // loads, before its code runs; its code cannot be checked now.
            sympos.extend(
                obj.replaced
                    .iter()
                    .filter(|f| f.in_livepatch_tables())
                    .map(|f| f.sympos.unwrap_or(0)),
            );
            resolve_externals(
                obj,
                external_syms,
                memory,
                &mut externals,
                &mut Vec::new(),
                &mut refusals,
            );
            not_loaded.push(obj.object.clone());
            continue;
        }
        // Address chosen for each function with expected code.
        let mut chosen: Vec<(&ExpectedCode, u64)> = Vec::new();
        for f in &obj.replaced {
            let expected = expected_code(obj, &f.name, Some(&f.file));
            let matches = expected.map(|e| move |address| runs(memory, e, address));
            match choose(
                &syms,
                &f.name,
                SymbolKind::Function,
                file_symbols(&obj.files, &f.file),
                matches.as_ref().map(|m| m as &dyn Fn(u64) -> bool),
            ) {
                Ok(c) => {
                    // A synchronized function is redirected by address, not
                    // by the livepatch tables `sympos` indexes.
                    if f.in_livepatch_tables() {
                        sympos.push(c.sympos);
                    }
                    chosen.extend(expected.map(|e| (e, c.address)));
                }
                Err(reason) => refusals.push(crate::Refusal {
                    symbol: qualified(&obj.object, &f.name),
                    reason,
                }),
            }
        }
        resolve_externals(
            obj,
            external_syms,
            memory,
            &mut externals,
            &mut chosen,
            &mut refusals,
        );
        for (expected, address) in chosen {
            let running = memory.read(address, expected.bytes.len());
            let lookup = |name: &str| unique_address(&all, &syms, &obj.object, name);
            let verdict = match &running {
                Ok(bytes) => crate::runpre::compare(expected, bytes)
                    .map_err(|m| m.to_string())
                    .and_then(|()| {
                        crate::runpre::check_relocations(expected, address, bytes, lookup).map_err(
                            |w| {
                                format!(
                                    "running code at +{:#x} refers to {} where the package expects {}",
                                    w.offset,
                                    describe_address(kallsyms, w.running_target),
                                    w.expected_symbol
                                )
                            },
                        )
                    }),
                Err(e) => Err(format!("cannot read its running code: {e:#}")),
            };
            match verdict {
                Ok(()) => verified_functions += 1,
                Err(reason) => refusals.push(crate::Refusal {
                    symbol: qualified(&obj.object, &expected.name),
                    reason: format!("run-pre check failed: {reason}"),
                }),
            }
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(Resolution {
        externals,
        sympos,
        verified_functions,
        not_loaded,
    })
}

/// Resolve the externals of `obj` among `syms`; functions with expected
/// code join `chosen` for the run-pre check.
fn resolve_externals<'m>(
    obj: &'m ObjectUpdate,
    syms: &ObjectSymbols,
    memory: &dyn KernelMemory,
    externals: &mut Vec<ResolvedSymbol>,
    chosen: &mut Vec<(&'m ExpectedCode, u64)>,
    refusals: &mut Vec<crate::Refusal>,
) {
    for e in &obj.externals {
        let fsyms = match &e.file {
            Some(file) => Some(file_symbols(&obj.files, file).unwrap_or(&[])),
            None => None,
        };
        let expected = (e.kind == SymbolKind::Function)
            .then(|| expected_code(obj, &e.name, e.file.as_deref()))
            .flatten();
        let matches = expected.map(|x| move |address| runs(memory, x, address));
        match choose(
            syms,
            &e.name,
            e.kind,
            fsyms,
            matches.as_ref().map(|m| m as &dyn Fn(u64) -> bool),
        ) {
            Ok(c) if e.bound_at_build.is_some_and(|built| built != c.sympos) => {
                refusals.push(crate::Refusal {
                    symbol: qualified(&obj.object, &e.name),
                    reason: format!(
                        "the signed module names entry {} of this name in the kernel's symbol table, but entry {} is the one meant here (by its neighbours or its running code): the module would bind the wrong symbol",
                        e.bound_at_build.unwrap_or_default(),
                        c.sympos
                    ),
                });
            }
            Ok(c) => {
                externals.push(ResolvedSymbol {
                    module_symbol: e.module_symbol.clone(),
                    name: e.name.clone(),
                    object: obj.object.clone(),
                    address: c.address,
                    bound_at_build: e.bound_at_build.is_some(),
                });
                if !chosen.iter().any(|(x, _)| expected == Some(*x)) {
                    chosen.extend(expected.map(|x| (x, c.address)));
                }
            }
            Err(mut reason) => refusals.push(crate::Refusal {
                symbol: qualified(&obj.object, &e.name),
                reason: {
                    if e.kind == SymbolKind::Data
                        && obj.object == "vmlinux"
                        && !lists_data_symbols(syms)
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

/// The expected code the package has for function `name` of `obj`; `file`
/// narrows it to one source file when known.
fn expected_code<'a>(
    obj: &'a ObjectUpdate,
    name: &str,
    file: Option<&str>,
) -> Option<&'a ExpectedCode> {
    let mut found = obj
        .expected_code
        .iter()
        .filter(|c| c.name == name && file.is_none_or(|f| c.file == f));
    let first = found.next()?;
    // Same-named functions of two changed files and no file to choose by.
    found.next().is_none().then_some(first)
}

/// Where the symbol `name` referenced by code of `object` is, when that is
/// unambiguous: the object's own symbol, else (for a module) the one global
/// symbol of that name.
fn unique_address(
    all: &ObjectSymbols,
    own: &ObjectSymbols,
    object: &str,
    name: &str,
) -> Option<u64> {
    match own.positions(name) {
        [one] => return Some(own[*one].address),
        [] => {}
        _ => return None,
    }
    if object == "vmlinux" {
        return None;
    }
    let mut global = all
        .positions(name)
        .iter()
        .filter(|&&i| is_global(all[i].kind));
    let first = global.next()?;
    global.next().is_none().then_some(all[*first].address)
}

/// `name` or `name+0xoff` for a kernel address, from kallsyms.
fn describe_address(all: &[Ksym], address: u64) -> String {
    let below = all
        .iter()
        .filter(|s| s.address <= address && s.address != 0)
        .max_by_key(|s| s.address);
    match below {
        Some(s) if s.address == address => s.name.clone(),
        Some(s) if address - s.address < 1 << 20 => {
            format!("{}+{:#x}", s.name, address - s.address)
        }
        _ => format!("{address:#x}"),
    }
}

/// Whether the code at `address` is the expected code.
fn runs(memory: &dyn KernelMemory, expected: &ExpectedCode, address: u64) -> bool {
    memory
        .read(address, expected.bytes.len())
        .is_ok_and(|bytes| crate::runpre::compare(expected, &bytes).is_ok())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::package::{ExternalSymbol, ReplacedFunction, SourceObject, TargetIdentity};
    use std::collections::HashMap;
    use std::fs;

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
    /// running the tests (as root, which shows the addresses).
    #[test]
    fn handles_this_machines_kallsyms() {
        let text = fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms is readable");
        let all = parse_kallsyms(&text).unwrap();
        assert!(
            all.iter().any(|s| s.address != 0),
            "/proc/kallsyms shows no addresses: run the tests as root"
        );
        let v = object_symbols(&all, "vmlinux");
        let mut counts = std::collections::HashMap::new();
        for s in v.iter() {
            *counts.entry(s.name.as_str()).or_insert(0u32) += 1;
        }
        let mut names: Vec<(&str, u32)> = counts.into_iter().collect();
        names.sort_by_key(|&(name, n)| (std::cmp::Reverse(n), name));
        let sample = names.iter().take(100).chain(names.iter().rev().take(100));
        for (name, n) in sample {
            match choose(&v, name, SymbolKind::Function, None, None) {
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
        let c = choose(&v, "a_helper", f, None, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81001000, 0));
        // Statics told apart by their file's neighbours.
        let b = strs(&["b_helper", "b_other", "show"]);
        let c = choose(&v, "show", f, Some(&b), None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81002100, 2));
        let a = strs(&["a_helper", "a_other", "a_table", "show"]);
        let c = choose(&v, "show", f, Some(&a), None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81001100, 1));
        // Nothing tells them apart.
        let err = choose(&v, "show", f, Some(&strs(&["unrelated"])), None).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(choose(&v, "show", f, None, None)
            .unwrap_err()
            .contains("ambiguous"));
        let err = choose(&v, "twin", f, Some(&strs(&["twin", "global_fn"])), None).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        // A global among same-named statics, no file: the global.
        let c = choose(&v, "global_fn", f, None, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffff81003000, 1));
        // Kinds.
        assert_eq!(
            choose(&v, "runqueues", SymbolKind::Data, None, None)
                .unwrap()
                .address,
            0x12340
        );
        assert!(choose(&v, "a_table", f, None, None)
            .unwrap_err()
            .contains("not as a function"));
        assert!(choose(&v, "nope", f, None, None)
            .unwrap_err()
            .contains("not found in the running kernel"));
        // Module objects only see their own symbols.
        let m = object_symbols(&k, "some_mod");
        let c = choose(&m, "show", f, None, None).unwrap();
        assert_eq!((c.address, c.sympos), (0xffffffffc0001000, 0));
    }

    /// Kernel memory that has nothing to read.
    struct NoMemory;
    impl KernelMemory for NoMemory {
        fn read(&self, address: u64, _: usize) -> Result<Vec<u8>> {
            bail!("nothing at {address:#x}")
        }
    }

    /// Kernel memory holding code at a few addresses.
    struct Code(HashMap<u64, Vec<u8>>);
    impl KernelMemory for Code {
        fn read(&self, address: u64, len: usize) -> Result<Vec<u8>> {
            match self.0.get(&address) {
                Some(bytes) if bytes.len() >= len => Ok(bytes[..len].to_vec()),
                _ => bail!("nothing at {address:#x}"),
            }
        }
    }

    fn code(name: &str, file: &str, bytes: &[u8]) -> ExpectedCode {
        ExpectedCode {
            name: name.into(),
            file: file.into(),
            bytes: bytes.to_vec(),
            masked: vec![crate::package::MaskedRange { offset: 1, len: 4 }],
            relocations: vec![],
        }
    }

    /// Run-pre checks every function with expected code, names the one
    /// that differs with its offset, and picks among same-named statics.
    #[test]
    fn running_code_is_verified_and_tells_statics_apart() {
        // a.c's show at 0x..1100, b.c's show at 0x..2100 (see GROUPS).
        let mut m = manifest();
        m.objects[0].replaced.remove(0);
        m.objects[0].externals.remove(0);
        m.objects[0].files[1].symbols = strs(&["unrelated"]);
        m.objects[0].expected_code = vec![code("show", "b.c", &[0xe8, 0, 0, 0, 0, 0xc3])];
        let memory = Code(HashMap::from([
            (0xffffffff81001100, vec![0xe8, 1, 2, 3, 4, 0x90]),
            (0xffffffff81002100, vec![0xe8, 9, 9, 9, 9, 0xc3]),
        ]));
        // Neighbours no longer tell the two apart; the code does.
        let r = resolve(&m, &ks(), &memory).unwrap();
        assert_eq!(r.sympos, vec![2]);
        assert_eq!(r.verified_functions, 1);

        let memory = Code(HashMap::from([
            (0xffffffff81001100, vec![0xe8, 1, 2, 3, 4, 0x90]),
            (0xffffffff81002100, vec![0xe8, 9, 9, 9, 9, 0xc4]),
        ]));
        m.objects[0].files[1].symbols = strs(&["b_helper"]);
        let err = resolve(&m, &ks(), &memory).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = err.to_string();
        assert!(text.contains("show: run-pre check failed"), "{text}");
        assert!(text.contains("+0x5 (running c4, expected c3)"), "{text}");

        let err = resolve(&m, &ks(), &NoMemory).unwrap_err().to_string();
        assert!(err.contains("cannot read its running code"), "{err}");
    }

    pub(crate) fn manifest() -> Manifest {
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
                load_time: vec![],
                replaced: vec![
                    ReplacedFunction {
                        name: "a_helper".into(),
                        sympos: None,
                        file: "a.c".into(),
                        new_symbol: "n1".into(),
                        adaptation: None,
                        kthread: None,
                        synchronized: None,
                        restart: None,
                    },
                    ReplacedFunction {
                        name: "show".into(),
                        sympos: None,
                        file: "b.c".into(),
                        new_symbol: "n2".into(),
                        adaptation: None,
                        kthread: None,
                        synchronized: None,
                        restart: None,
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
                        bound_at_build: None,
                    },
                    ExternalSymbol {
                        module_symbol: "__dynamos_ext_1".into(),
                        name: "runqueues".into(),
                        kind: SymbolKind::Data,
                        file: None,
                        global: true,
                        bound_at_build: None,
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
                expected_code: vec![],
                value_updates: vec![],
            }],
            replaces: vec![],
            shadows: vec![],
        }
    }

    /// A signed module's symbols were bound at build time: apply checks
    /// the running kernel has each at the position the module names.
    #[test]
    fn symbols_bound_at_build_must_be_where_the_module_says() {
        let mut m = manifest();
        m.objects[0].externals[0].bound_at_build = Some(1);
        m.objects[0].externals[1].bound_at_build = Some(0);
        let r = resolve(&m, &ks(), &NoMemory).unwrap();
        assert!(r.externals.iter().all(|e| e.bound_at_build));
        assert_eq!(r.externals[0].address, 0xffffffff81001100);

        m.objects[0].externals[0].bound_at_build = Some(2);
        let err = resolve(&m, &ks(), &NoMemory).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = err.to_string();
        assert!(
            text.contains("show: the signed module names entry 2 of this name in the kernel's symbol table, but entry 1 is the one meant here"),
            "{text}"
        );
    }

    #[test]
    fn resolves_manifest() {
        let r = resolve(&manifest(), &ks(), &NoMemory).unwrap();
        assert_eq!(r.sympos, vec![0, 2]);
        assert_eq!(sympos_param(&r.sympos), "sympos=0,2");
        assert_eq!(r.externals.len(), 2);
        assert_eq!(r.externals[0].address, 0xffffffff81001100);
        assert_eq!(r.externals[1].address, 0x12340);

        let mut m = manifest();
        m.objects[0].externals[0].file = Some("c.c".into());
        m.objects[0].replaced[0].name = "gone".into();
        let err = resolve(&m, &ks(), &NoMemory).unwrap_err();
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
        let err = resolve(&m, &functions_only, &NoMemory)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONFIG_KALLSYMS_ALL"), "{err}");

        // A module that is not loaded: its functions wait for it to load,
        // at the position found at build time; its externals are vmlinux's.
        let mut m = manifest();
        m.objects[0].object = "other_mod".into();
        m.objects[0].replaced[1].sympos = Some(2);
        let r = resolve(&m, &ks(), &NoMemory).unwrap();
        assert_eq!(r.not_loaded, vec!["other_mod".to_string()]);
        assert_eq!(r.sympos, vec![0, 2]);
        assert_eq!(r.externals[1].address, 0x12340);

        let hidden = "0000000000000000 T a\n0000000000000000 t b\n";
        let err = resolve(&manifest(), &parse_kallsyms(hidden).unwrap(), &NoMemory).unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
        assert_eq!(sympos_param(&[]), "");
    }
}
