//! What the engine knows about the kernel's special sections: the tables
//! whose fixed-size entries describe code (exception fixups, WARN sites,
//! alternatives, ...), the sections to ignore, and everything else.
//!
//! Entry sizes are those of Linux 6.1 on x86-64; each entry's first
//! relocation names the code it describes, which is how entries follow the
//! functions a package carries.

/// A table of fixed-size entries, one or more per instruction of interest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryTable {
    pub name: &'static str,
    pub entry_size: u64,
    /// A relocation-free table whose entries pair by index with this one's
    /// (`.orc_unwind` beside `.orc_unwind_ip`).
    pub paired: Option<(&'static str, u64)>,
}

const ENTRY_TABLES: &[EntryTable] = &[
    table("__mcount_loc", 8),
    table(".return_sites", 4),
    table(".retpoline_sites", 4),
    table(".call_sites", 4),
    table(".ibt_endbr_seal", 4),
    table(".smp_locks", 4),
    // struct exception_table_entry { int insn, fixup, data; }
    table("__ex_table", 12),
    // struct bug_entry with relative pointers: disp, file_disp, line, flags
    table("__bug_table", 12),
    // struct jump_entry { s32 code; s32 target; long key; }
    table("__jump_table", 16),
    // struct alt_instr { s32 instr, repl; u16 cpuid; u8 instrlen, replacementlen; }
    table(".altinstructions", 12),
    // struct paravirt_patch_site { u8 *instr; u8 type; u8 len; } padded
    table(".parainstructions", 16),
    // struct static_call_site { s32 addr; s32 key; }
    table(".static_call_sites", 8),
    EntryTable {
        name: ".orc_unwind_ip",
        entry_size: 4,
        paired: Some((".orc_unwind", 6)),
    },
];

const fn table(name: &'static str, entry_size: u64) -> EntryTable {
    EntryTable {
        name,
        entry_size,
        paired: None,
    }
}

/// Code referenced only through entries of a table (alternative
/// replacement instructions); copied in the ranges kept entries use.
pub const ALT_REPLACEMENT: &str = ".altinstr_replacement";

/// How the diff engine treats a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionRole {
    /// Executable code, compared function by function.
    Text,
    /// A table of per-instruction entries that follows the code.
    Entries(EntryTable),
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

pub fn classify(name: &str, alloc: bool, exec: bool) -> SectionRole {
    if let Some(t) = ENTRY_TABLES.iter().find(|t| t.name == name) {
        return SectionRole::Entries(*t);
    }
    if ENTRY_TABLES
        .iter()
        .any(|t| t.paired.is_some_and(|(p, _)| p == name))
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
