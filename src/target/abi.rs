//! What the patched kernel is, as the engine needs to know it: how each
//! section of its objects is treated, and the special sections (tables of
//! fixed-size entries that describe code: exception fixups, WARN sites,
//! alternatives, ...) with the layout of their entries.
//!
//! Which tables exist and what the kernel does with them is listed once,
//! here, in `SPECIAL_SECTIONS`. How big an entry is and where a length
//! field sits differs between kernel series (`struct alt_instr` is 12 bytes
//! in 6.1 and 14 in 6.12), so those are not assumed: `KernelAbi` reads them
//! from the DWARF of a probe compiled against the target's own headers
//! (`probe.rs`). Each entry's first relocation names the code it describes,
//! which is how entries follow the functions a package carries.

use crate::diff::types::StructLayout;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// How an entry's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    /// A structure of the target's headers, measured by the probe.
    Struct(&'static str),
    /// A plain offset or address list (`s32` or `unsigned long` per entry).
    Fixed(u64),
}

/// Which bytes at the code an entry names the kernel may rewrite at boot,
/// at module load or at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// None: the table only describes the code (fixups, WARN sites, ORC).
    Nothing,
    /// A fixed number of bytes (a lock prefix, an ENDBR, an ftrace call).
    Bytes(usize),
    /// The instruction the compiler put there (a jump label's jmp or nop,
    /// a static call, a retpoline or return-thunk site).
    Instruction,
    /// As many bytes as the entry's byte-sized member of this name says.
    LengthIn(&'static str),
}

/// One special section, as the kernel's loaders and patchers treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialSection {
    pub name: &'static str,
    pub entry: EntryType,
    pub rewrite: Rewrite,
    /// The module loader reads it while loading a module, before any
    /// livepatch relocation is applied: an entry there cannot use a
    /// load-time symbol.
    pub read_before_livepatch_relocations: bool,
    /// A relocation-free table whose entries pair by index with this one's
    /// (`.orc_unwind` beside `.orc_unwind_ip`).
    pub paired: Option<(&'static str, EntryType)>,
    /// Members naming the replacement code an entry uses and its length
    /// (alternatives).
    pub replacement: Option<(&'static str, &'static str)>,
    /// objtool writes it (from the code, not from the compiler's output):
    /// where objtool runs on the linked module, it writes it for the whole
    /// package module and skips a module that already has one.
    pub written_by_objtool: bool,
}

const fn offsets(name: &'static str, size: u64, rewrite: Rewrite) -> SpecialSection {
    SpecialSection {
        name,
        entry: EntryType::Fixed(size),
        rewrite,
        read_before_livepatch_relocations: false,
        paired: None,
        replacement: None,
        written_by_objtool: false,
    }
}

const fn objtools(name: &'static str, rewrite: Rewrite) -> SpecialSection {
    SpecialSection {
        written_by_objtool: true,
        ..offsets(name, 4, rewrite)
    }
}

const fn structs(name: &'static str, entry: &'static str, rewrite: Rewrite) -> SpecialSection {
    SpecialSection {
        name,
        entry: EntryType::Struct(entry),
        rewrite,
        read_before_livepatch_relocations: true,
        paired: None,
        replacement: None,
        written_by_objtool: false,
    }
}

/// Every special section the engine knows, of any kernel series.
pub const SPECIAL_SECTIONS: &[SpecialSection] = &[
    offsets("__mcount_loc", 8, Rewrite::Bytes(5)),
    objtools(".return_sites", Rewrite::Instruction),
    objtools(".retpoline_sites", Rewrite::Instruction),
    objtools(".call_sites", Rewrite::Instruction),
    objtools(".ibt_endbr_seal", Rewrite::Bytes(4)),
    offsets(".smp_locks", 4, Rewrite::Bytes(1)),
    structs(
        "__ex_table",
        "struct exception_table_entry",
        Rewrite::Nothing,
    ),
    structs("__bug_table", "struct bug_entry", Rewrite::Nothing),
    structs("__jump_table", "struct jump_entry", Rewrite::Instruction),
    SpecialSection {
        replacement: Some(("repl_offset", "replacementlen")),
        ..structs(
            ".altinstructions",
            "struct alt_instr",
            Rewrite::LengthIn("instrlen"),
        )
    },
    // Gone in 6.8, when paravirt patching became alternatives.
    structs(
        ".parainstructions",
        "struct paravirt_patch_site",
        Rewrite::LengthIn("len"),
    ),
    SpecialSection {
        written_by_objtool: true,
        ..structs(
            ".static_call_sites",
            "struct static_call_site",
            Rewrite::Instruction,
        )
    },
    SpecialSection {
        paired: Some((".orc_unwind", EntryType::Struct("struct orc_entry"))),
        ..objtools(".orc_unwind_ip", Rewrite::Nothing)
    },
];

/// The structures the probe must measure: every `EntryType::Struct`.
pub fn probed_types() -> impl Iterator<Item = &'static str> {
    SPECIAL_SECTIONS
        .iter()
        .flat_map(|s| [Some(s.entry), s.paired.map(|(_, e)| e)])
        .flatten()
        .filter_map(|e| match e {
            EntryType::Struct(name) => Some(name),
            EntryType::Fixed(_) => None,
        })
}

/// A special section with its entry layout in the target kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryTable {
    pub section: &'static SpecialSection,
    pub entry_size: u64,
    /// The paired table and its entry size.
    pub paired: Option<(&'static str, u64)>,
    /// Offset of the byte that holds the rewritten length (`Rewrite::LengthIn`).
    pub length_at: Option<u64>,
    /// Offsets of the replacement's relative address and of its length byte.
    pub replacement: Option<(u64, u64)>,
}

impl EntryTable {
    pub fn name(&self) -> &'static str {
        self.section.name
    }

    /// How many bytes at `site` (in `code`) the kernel may rewrite for
    /// `entry`; None for tables that only describe code.
    pub fn rewritten_len(&self, entry: &[u8], code: &[u8], site: usize) -> Option<usize> {
        match self.section.rewrite {
            Rewrite::Nothing => None,
            Rewrite::Bytes(n) => Some(n),
            Rewrite::Instruction => Some(instruction_len(code, site).unwrap_or(5)),
            Rewrite::LengthIn(_) => entry.get(self.length_at? as usize).map(|&l| l as usize),
        }
    }
}

fn instruction_len(code: &[u8], at: usize) -> Option<usize> {
    use iced_x86::{Decoder, DecoderOptions};
    let bytes = code.get(at..)?;
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    (!insn.is_invalid()).then_some(insn.len())
}

/// The special sections of one target kernel with their entry layouts.
/// Tables whose entry type its headers do not define (`.parainstructions`
/// after 6.8) are absent; an object that has one is refused by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelAbi {
    tables: Vec<EntryTable>,
    /// objtool runs on the linked vmlinux.o and modules, not on each
    /// object (IBT kernels since 6.2): the package module gets the tables
    /// objtool writes from kbuild, and must not bring its own.
    objtool_at_link: bool,
}

impl KernelAbi {
    /// The tables whose layouts `layouts` (type name → measured layout)
    /// determine, for a kernel that runs objtool at link or not.
    pub fn from_layouts(
        layouts: &BTreeMap<String, StructLayout>,
        objtool_at_link: bool,
    ) -> Result<KernelAbi> {
        let size = |entry: EntryType| -> Option<u64> {
            match entry {
                EntryType::Fixed(n) => Some(n),
                EntryType::Struct(name) => layouts.get(name).map(|l| l.size),
            }
        };
        let member = |section: &SpecialSection, member: &str| -> Result<u64> {
            let EntryType::Struct(name) = section.entry else {
                bail!("{}: a member of a plain offset list", section.name);
            };
            match layouts.get(name).and_then(|l| l.members.get(member)) {
                Some(&at) => Ok(at),
                None => bail!(
                    "the target's {name} has no byte-sized member {member}, which {} entries are read by",
                    section.name
                ),
            }
        };
        let mut tables = Vec::new();
        for section in SPECIAL_SECTIONS {
            let Some(entry_size) = size(section.entry).filter(|&n| n > 0) else {
                continue;
            };
            let paired = match section.paired {
                Some((name, entry)) => match size(entry) {
                    Some(n) => Some((name, n)),
                    None => {
                        bail!("the target's headers define no {entry:?}, the entries of {name}")
                    }
                },
                None => None,
            };
            let length_at = match section.rewrite {
                Rewrite::LengthIn(field) => Some(member(section, field)?),
                _ => None,
            };
            let replacement = match section.replacement {
                Some((at, len)) => Some((member(section, at)?, member(section, len)?)),
                None => None,
            };
            tables.push(EntryTable {
                section,
                entry_size,
                paired,
                length_at,
                replacement,
            });
        }
        Ok(KernelAbi {
            tables,
            objtool_at_link,
        })
    }

    pub fn objtool_at_link(&self) -> bool {
        self.objtool_at_link
    }

    /// The table called `name` in this kernel.
    pub fn table(&self, name: &str) -> Option<&EntryTable> {
        self.tables.iter().find(|t| t.section.name == name)
    }

    /// Refuse an object with a special section this kernel has no layout
    /// for: its entries could be neither followed nor checked.
    pub fn check(&self, object: &crate::diff::ObjectFile) -> Result<()> {
        for section in &object.sections {
            let Some(known) = SPECIAL_SECTIONS.iter().find(|s| s.name == section.name) else {
                continue;
            };
            if self.table(known.name).is_none() {
                let entry = match known.entry {
                    EntryType::Struct(name) => name.to_string(),
                    EntryType::Fixed(n) => format!("{n}-byte entries"),
                };
                bail!(
                    "{} has a {} section, but the target's headers define no {entry} for its entries",
                    object.path.display(),
                    known.name
                );
            }
        }
        Ok(())
    }
}

/// Thunks objtool finds the sites of by the name a call or jump uses
/// (return-thunk and retpoline sites): where objtool runs on the linked
/// package module, new code must refer to them by name, not through a
/// symbol of the package's own that apply resolves.
pub fn named_by_objtool(name: &str) -> bool {
    name == "__x86_return_thunk"
        || [
            "__x86_indirect_thunk_",
            "__x86_indirect_call_thunk_",
            "__x86_indirect_jump_thunk_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Code referenced only through entries of a table (alternative
/// replacement instructions); copied in the ranges kept entries use.
pub const ALT_REPLACEMENT: &str = ".altinstr_replacement";

/// How the diff engine treats a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionRole {
    /// Executable code, compared function by function.
    Text,
    /// A table of per-instruction entries that follows the code; its
    /// entry layout in a given kernel is `KernelAbi::table`.
    Entries(&'static SpecialSection),
    /// The second half of a paired table (no relocations).
    PairedEntries,
    /// Replacement code for alternatives.
    AltReplacement,
    /// Data (variables, constants, string literals), compared by symbol.
    Data,
    /// Only run at boot or module init; freed afterwards.
    Init,
    /// Metadata with no effect on the running kernel: debug info, notes,
    /// objtool annotations, symbol tables.
    Ignored,
    /// Registration tables (initcalls, exports, parameters, ...) whose
    /// change would need the kernel to re-run registration.
    Registration,
    /// Descriptors the kernel only lists (dynamic debug sites, the printk
    /// index): their line numbers move with every edit and do not change
    /// behaviour. Not compared; new ones are carried with the code that
    /// uses them.
    Descriptors,
}

/// How the engine treats a section, whatever the kernel.
pub fn classify(name: &str, alloc: bool, exec: bool) -> SectionRole {
    if let Some(s) = SPECIAL_SECTIONS.iter().find(|s| s.name == name) {
        return SectionRole::Entries(s);
    }
    if SPECIAL_SECTIONS
        .iter()
        .any(|s| s.paired.is_some_and(|(p, _)| p == name))
    {
        return SectionRole::PairedEntries;
    }
    if name == ALT_REPLACEMENT {
        return SectionRole::AltReplacement;
    }
    if is_ignored(name) || !alloc {
        return SectionRole::Ignored;
    }
    if is_init(name) {
        return SectionRole::Init;
    }
    if exec {
        return SectionRole::Text;
    }
    if is_descriptors(name) {
        return SectionRole::Descriptors;
    }
    if is_registration(name) {
        return SectionRole::Registration;
    }
    SectionRole::Data
}

fn is_ignored(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        ".discard",
        ".debug",
        ".note",
        ".comment",
        ".BTF",
        ".eh_frame",
        ".rela",
        ".symtab",
        ".strtab",
        ".shstrtab",
        ".llvm",
        ".GCC",
        ".modinfo",
        "__patchable_function_entries",
    ];
    name.is_empty() || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Sections the kernel frees after boot (or after a module's init).
pub fn is_init(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        ".init.",
        ".exit.",
        ".head.text",
        ".x86_cpu_dev.init",
        ".init_array",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Per-call-site records the kernel only lists: dynamic debug descriptors
/// (`__dyndbg`, `__verbose` in older kernels) and the printk format index
/// (`.printk_index`, pointers to records in `.rodata`).
fn is_descriptors(name: &str) -> bool {
    name.starts_with("__dyndbg") || name == "__verbose" || name == ".printk_index"
}

fn is_registration(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        ".initcall",
        "__ksymtab",
        "___ksymtab",
        "__kcrctab",
        "__param",
        "__modver",
        "__tracepoints",
        "_ftrace_events",
        "_ftrace_eval_map",
        "__syscalls_metadata",
        "__bpf_raw_tp_map",
        "__kprobe_blacklist",
        "_error_injection_whitelist",
        ".con_initcall",
        ".security_initcall",
        "__setup",
        ".apicdrivers",
        "__early_param",
        ".export_symbol",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64, members: &[(&str, u64)]) -> StructLayout {
        StructLayout {
            size,
            members: members.iter().map(|(m, at)| (m.to_string(), *at)).collect(),
        }
    }

    /// Layouts as Linux 6.1 on x86-64 has them; `alt_instr` as given.
    fn kernel(alt_instr: StructLayout, paravirt: bool) -> KernelAbi {
        let mut layouts = BTreeMap::new();
        layouts.insert("struct alt_instr".to_string(), alt_instr);
        layouts.insert("struct exception_table_entry".into(), layout(12, &[]));
        layouts.insert("struct bug_entry".into(), layout(12, &[]));
        layouts.insert("struct jump_entry".into(), layout(16, &[]));
        layouts.insert("struct static_call_site".into(), layout(8, &[]));
        layouts.insert("struct orc_entry".into(), layout(6, &[]));
        if paravirt {
            layouts.insert(
                "struct paravirt_patch_site".into(),
                layout(16, &[("instr", 0), ("type", 8), ("len", 9)]),
            );
        }
        KernelAbi::from_layouts(&layouts, false).unwrap()
    }

    fn linux_6_1() -> KernelAbi {
        kernel(
            layout(
                12,
                &[
                    ("instr_offset", 0),
                    ("repl_offset", 4),
                    ("cpuid", 8),
                    ("instrlen", 10),
                    ("replacementlen", 11),
                ],
            ),
            true,
        )
    }

    #[test]
    fn rewritten_bytes_cover_the_instruction_the_compiler_emitted() {
        let abi = linux_6_1();
        // jmp rel8 at 0, nop5 at 2, jcc rel32 at 7.
        let code = [
            0xeb, 0x05, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x0f, 0x84, 0, 0, 0, 0,
        ];
        let len = |table: &str, entry: &[u8], site: usize| {
            abi.table(table).unwrap().rewritten_len(entry, &code, site)
        };
        assert_eq!(len("__jump_table", &[], 0), Some(2));
        assert_eq!(len("__jump_table", &[], 2), Some(5));
        assert_eq!(len(".retpoline_sites", &[], 7), Some(6));
        let alt = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11, 3];
        assert_eq!(len(".altinstructions", &alt, 0), Some(11));
        assert_eq!(len("__ex_table", &[0; 12], 0), None);
        assert_eq!(
            abi.table(".orc_unwind_ip").unwrap().paired,
            Some((".orc_unwind", 6))
        );
    }

    #[test]
    fn entry_layouts_follow_the_targets_headers() {
        // Linux 6.12: feature flags beside the CPUID bit, no paravirt sites.
        let abi = kernel(
            layout(
                14,
                &[
                    ("instr_offset", 0),
                    ("repl_offset", 4),
                    ("ft_flags", 8),
                    ("instrlen", 12),
                    ("replacementlen", 13),
                ],
            ),
            false,
        );
        let alt = abi.table(".altinstructions").unwrap();
        assert_eq!(alt.entry_size, 14);
        assert_eq!(alt.replacement, Some((4, 13)));
        let entry = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 5];
        assert_eq!(alt.rewritten_len(&entry, &[0x90; 8], 0), Some(7));
        assert!(abi.table(".parainstructions").is_none());
        assert_eq!(
            linux_6_1().table(".altinstructions").unwrap().entry_size,
            12
        );
        // A length byte the headers do not have is an error, not a guess.
        let mut layouts = BTreeMap::new();
        layouts.insert(
            "struct alt_instr".to_string(),
            layout(12, &[("repl_offset", 4)]),
        );
        let error = KernelAbi::from_layouts(&layouts, false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("struct alt_instr has no byte-sized member instrlen"),
            "{error}"
        );
    }

    #[test]
    fn per_call_site_records_are_descriptors() {
        for name in ["__dyndbg", "__dyndbg_classes", "__verbose", ".printk_index"] {
            assert_eq!(
                classify(name, true, false),
                SectionRole::Descriptors,
                "{name}"
            );
        }
        assert_eq!(
            classify("__ksymtab_strings", true, false),
            SectionRole::Registration
        );
        assert_eq!(classify("__verbose_x", true, true), SectionRole::Text);
    }
}
