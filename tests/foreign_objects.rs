//! Objects from other kernels and compilers: the fixture pairs under
//! `tests/fixtures/foreign/` compiled by gcc and clang with the flags of
//! each kernel era, with the mcount pass kbuild ran on each object
//! (recordmcount in 4.x, objtool for clang from 5.13) done here the same
//! way, and the diff verdict of every pair checked exactly.

use dynamos::diff::{diff_objects, ObjectFile};
use object::build::elf::{Builder, SectionData};
use object::build::ByteString;
use object::elf;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/foreign")
}

/// Code generation flags every era shares (what kbuild passes on x86-64).
const COMMON_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-c",
    "-ffunction-sections",
    "-fdata-sections",
    "-mcmodel=kernel",
    "-fno-pic",
    "-fno-asynchronous-unwind-tables",
    "-fno-jump-tables",
    "-mno-red-zone",
    "-fno-common",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compiler {
    Gcc,
    Clang,
}

impl Compiler {
    fn command(self) -> &'static str {
        match self {
            Compiler::Gcc => "gcc",
            Compiler::Clang => "clang",
        }
    }
}

/// What found the mcount call sites after the compiler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum McountPass {
    /// None: the compiler recorded them itself (`-mrecord-mcount`), or,
    /// for clang, objtool has not run yet (as in kbuild's `.o` before
    /// objtool, and in this project's own builds).
    Compiler,
    /// scripts/recordmcount of Linux 4.x: sites in the sections it traces
    /// go to `__mcount_loc`; calls anywhere else become NOPs whose
    /// relocation is rewritten to R_X86_64_NONE.
    RecordMcount,
    /// `objtool --mcount --mnop`: every call becomes a NOP with an
    /// R_X86_64_NONE relocation; those outside noinstr code are recorded.
    ObjtoolNop,
}

/// Sections recordmcount of Linux 4.x traced; `-ffunction-sections`'
/// `.text.<name>` is not among them.
const RECORDMCOUNT_TRACED: &[&str] = &[
    ".text",
    ".init.text",
    ".ref.text",
    ".sched.text",
    ".spinlock.text",
    ".irqentry.text",
    ".softirqentry.text",
    ".kprobes.text",
    ".cpuidle.text",
    ".text.unlikely",
];

/// The 5-byte NOP both tools write over a call.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

impl McountPass {
    fn records(self, section: &str) -> bool {
        match self {
            McountPass::Compiler => false,
            McountPass::RecordMcount => RECORDMCOUNT_TRACED.contains(&section),
            McountPass::ObjtoolNop => section != ".noinstr.text" && section != ".entry.text",
        }
    }
    fn nops(self, section: &str) -> bool {
        match self {
            McountPass::Compiler => false,
            McountPass::RecordMcount => !RECORDMCOUNT_TRACED.contains(&section),
            McountPass::ObjtoolNop => true,
        }
    }
}

/// A kernel era: flags and mcount pass per compiler.
struct Era {
    name: &'static str,
    gcc: (&'static [&'static str], McountPass),
    clang: (&'static [&'static str], McountPass),
}

const ERAS: &[Era] = &[
    Era {
        name: "4.x before 4.19",
        gcc: (
            &["-pg", "-mfentry", "-DDYNDBG_SECTION=\"__verbose\""],
            McountPass::RecordMcount,
        ),
        clang: (
            &["-pg", "-mfentry", "-DDYNDBG_SECTION=\"__verbose\""],
            McountPass::RecordMcount,
        ),
    },
    Era {
        name: "4.19",
        gcc: (
            &[
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-DDYNDBG_SECTION=\"__verbose\"",
            ],
            McountPass::Compiler,
        ),
        clang: (
            &["-pg", "-mfentry", "-DDYNDBG_SECTION=\"__verbose\""],
            McountPass::RecordMcount,
        ),
    },
    Era {
        name: "5.x",
        gcc: (
            &[
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::Compiler,
        ),
        clang: (
            &["-pg", "-mfentry", "-DDYNDBG_SECTION=\"__dyndbg\""],
            McountPass::ObjtoolNop,
        ),
    },
    Era {
        name: "6.1",
        gcc: (
            &[
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-mnop-mcount",
                "-fcf-protection=branch",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::Compiler,
        ),
        clang: (
            &[
                "-pg",
                "-mfentry",
                "-fcf-protection=branch",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::ObjtoolNop,
        ),
    },
    Era {
        name: "6.1 before objtool",
        gcc: (
            &[
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::Compiler,
        ),
        clang: (
            &[
                "-pg",
                "-mfentry",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::Compiler,
        ),
    },
    Era {
        name: "6.x call padding",
        gcc: (
            &[
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-fpatchable-function-entry=16,16",
                "-fcf-protection=branch",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::Compiler,
        ),
        clang: (
            &[
                "-pg",
                "-mfentry",
                "-fpatchable-function-entry=16,16",
                "-fcf-protection=branch",
                "-DPRINTK_INDEX",
                "-DDYNDBG_SECTION=\"__dyndbg\"",
            ],
            McountPass::ObjtoolNop,
        ),
    },
];

/// Compiles fixture `<name>_<side>.c` as `unit.c` in a folder of its own
/// (both sides see the same `__FILE__`, as in a kernel tree), then runs
/// the era's mcount pass on it.
fn compile(dir: &Path, fixture: &str, side: &str, cc: Compiler, era: &Era) -> PathBuf {
    let (flags, pass) = match cc {
        Compiler::Gcc => era.gcc,
        Compiler::Clang => era.clang,
    };
    let src_dir = dir.join(side);
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::copy(
        fixtures().join(format!("{fixture}_{side}.c")),
        src_dir.join("unit.c"),
    )
    .unwrap();
    let object = dir.join(format!("{side}.o"));
    // The diff ignores clang's .llvm_addrsig; object's ELF builder, which
    // runs the mcount pass here, cannot read it.
    let no_addrsig: &[&str] = match (cc, pass) {
        (Compiler::Clang, McountPass::RecordMcount | McountPass::ObjtoolNop) => &["-fno-addrsig"],
        _ => &[],
    };
    let out = Command::new(cc.command())
        .args(COMMON_FLAGS)
        .args(flags)
        .args(no_addrsig)
        .arg("-I")
        .arg(fixtures())
        .arg("unit.c")
        .arg("-o")
        .arg(&object)
        .current_dir(&src_dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (scripts/install-deps.sh installs it)",
                cc.command()
            )
        });
    assert!(
        out.status.success(),
        "{} {fixture}_{side}.c ({}): {}",
        cc.command(),
        era.name,
        String::from_utf8_lossy(&out.stderr)
    );
    if pass != McountPass::Compiler {
        run_mcount_pass(&object, pass);
    }
    object
}

/// Rewrites `path` as the era's mcount tool did: NOPs over the chosen
/// `__fentry__` calls with their relocations turned into R_X86_64_NONE,
/// and a `__mcount_loc` table of the recorded call sites.
fn run_mcount_pass(path: &Path, pass: McountPass) {
    let data = std::fs::read(path).unwrap();
    let mut builder = Builder::read(&*data).unwrap();
    let Some(fentry) = builder
        .symbols
        .iter()
        .find(|s| s.name.as_slice() == b"__fentry__")
        .map(|s| s.id())
    else {
        return;
    };
    let relocation_sections: Vec<_> = builder
        .sections
        .iter()
        .filter(|s| matches!(s.data, SectionData::Relocation(_)))
        .map(|s| s.id())
        .collect();
    let mut recorded = Vec::new();
    for rela in relocation_sections {
        let Some(text) = builder.sections.get(rela).sh_info_section else {
            continue;
        };
        let code = builder.sections.get(text);
        if code.sh_flags & u64::from(elf::SHF_EXECINSTR) == 0 {
            continue;
        }
        let name = String::from_utf8_lossy(code.name.as_slice()).into_owned();
        let mut nopped = Vec::new();
        let SectionData::Relocation(relocs) = &mut builder.sections.get_mut(rela).data else {
            unreachable!()
        };
        for r in relocs.iter_mut().filter(|r| r.symbol == Some(fentry)) {
            let call = r.r_offset - 1;
            if pass.records(&name) {
                recorded.push((text, call));
            }
            if pass.nops(&name) {
                r.r_type = elf::R_X86_64_NONE;
                nopped.push(call as usize);
            }
        }
        if !nopped.is_empty() {
            let SectionData::Data(bytes) = &mut builder.sections.get_mut(text).data else {
                panic!("{name} has no contents");
            };
            let bytes = bytes.to_mut();
            for call in nopped {
                assert_eq!(bytes[call], 0xe8, "{name}+{call:#x} is not a call");
                bytes[call..call + 5].copy_from_slice(&NOP5);
            }
        }
    }
    if !recorded.is_empty() {
        add_mcount_table(&mut builder, &recorded);
    }
    // clang keeps section names in .strtab; the builder writes them apart.
    if !builder
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let names = builder.sections.add();
        names.name = ByteString::from(".shstrtab");
        names.sh_type = elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = SectionData::SectionString;
    }
    let mut out = Vec::new();
    builder.write(&mut out).unwrap();
    std::fs::write(path, out).unwrap();
}

/// `__mcount_loc`: one 8-byte address per call site, each relocated
/// against its code section's symbol.
fn add_mcount_table(builder: &mut Builder, sites: &[(object::build::elf::SectionId, u64)]) {
    let symtab = builder
        .sections
        .iter()
        .find(|s| matches!(s.data, SectionData::Symbol))
        .map(|s| s.id())
        .expect("a symbol table");
    let mut relocs = Vec::new();
    for (index, &(text, offset)) in sites.iter().enumerate() {
        let existing = builder
            .symbols
            .iter()
            .find(|s| s.section == Some(text) && s.st_type() == elf::STT_SECTION)
            .map(|s| s.id());
        let symbol = existing.unwrap_or_else(|| {
            let s = builder.symbols.add();
            s.section = Some(text);
            s.set_st_info(elf::STB_LOCAL, elf::STT_SECTION);
            s.id()
        });
        relocs.push(object::build::elf::Relocation {
            r_offset: 8 * index as u64,
            symbol: Some(symbol),
            r_type: elf::R_X86_64_64,
            r_addend: offset as i64,
        });
    }
    let table = builder.sections.add();
    table.name = ByteString::from("__mcount_loc");
    table.sh_type = elf::SHT_PROGBITS;
    table.sh_flags = u64::from(elf::SHF_ALLOC);
    table.sh_addralign = 8;
    table.data = SectionData::Data(vec![0u8; 8 * sites.len()].into());
    let table = table.id();
    let rela = builder.sections.add();
    rela.name = ByteString::from(".rela__mcount_loc");
    rela.sh_type = elf::SHT_RELA;
    rela.sh_flags = u64::from(elf::SHF_INFO_LINK);
    rela.sh_addralign = 8;
    rela.sh_entsize = 24;
    rela.sh_link_section = Some(symtab);
    rela.sh_info_section = Some(table);
    rela.data = SectionData::Relocation(relocs);
}

/// What the diff must say about one fixture pair.
struct Verdict {
    changed: &'static [&'static str],
    /// (symbol, words the reason must hold)
    refused: &'static [(&'static str, &'static str)],
}

fn check(fixture: &str, expected: &Verdict) {
    let mut failures = Vec::new();
    for era in ERAS {
        for cc in [Compiler::Gcc, Compiler::Clang] {
            let dir = tempfile::tempdir().unwrap();
            let orig = compile(dir.path(), fixture, "orig", cc, era);
            let patched = compile(dir.path(), fixture, "patched", cc, era);
            let orig = ObjectFile::read(&orig).unwrap();
            let patched = ObjectFile::read(&patched).unwrap();
            let pass = match cc {
                Compiler::Gcc => era.gcc.1,
                Compiler::Clang => era.clang.1,
            };
            let nopped = orig
                .sections
                .iter()
                .flat_map(|s| &s.relocs)
                .filter(|r| r.r_type == elf::R_X86_64_NONE)
                .count();
            assert_eq!(
                nopped > 0,
                pass != McountPass::Compiler,
                "{fixture}, {} {}: {nopped} NOP'd mcount calls",
                era.name,
                cc.command()
            );
            let diff = diff_objects(&orig, &patched).unwrap();
            let refused: Vec<(String, String)> = diff
                .refused
                .iter()
                .map(|r| (r.symbol.clone(), r.reason.clone()))
                .collect();
            let refused_ok = refused.len() == expected.refused.len()
                && expected
                    .refused
                    .iter()
                    .all(|(s, words)| refused.iter().any(|(rs, rr)| rs == s && rr.contains(words)));
            if diff.changed() != expected.changed
                || !diff.new_functions().is_empty()
                || !refused_ok
                || !diff.private_copies.is_empty()
            {
                failures.push(format!(
                    "{fixture}, {} {}: changed {:?}, new {:?}, refused {refused:?}, own copies {:?}",
                    era.name,
                    cc.command(),
                    diff.changed(),
                    diff.new_functions(),
                    diff.private_copies
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn printk_index_records_are_listed_not_registered() {
    check(
        "printk",
        &Verdict {
            changed: &["report_count"],
            refused: &[],
        },
    );
}

#[test]
fn dynamic_debug_descriptors_in_either_section_are_listed() {
    check(
        "dyndbg",
        &Verdict {
            changed: &["debug_close"],
            refused: &[],
        },
    );
}

#[test]
fn lockdep_keys_of_both_compilers_start_afresh() {
    check(
        "lockdep",
        &Verdict {
            changed: &["locks_setup"],
            refused: &[],
        },
    );
}

#[test]
fn nopped_mcount_calls_are_no_ops_and_notrace_code_is_refused() {
    check(
        "ftrace",
        &Verdict {
            changed: &["raw_count", "traced_count"],
            refused: &[("raw_count", "no ftrace entry")],
        },
    );
}

/// The command line gives the same verdict, with its exit code, on a pair
/// whose every function carries a NOP'd mcount call.
#[test]
fn command_line_judges_a_recordmcount_clang_pair() {
    let dir = tempfile::tempdir().unwrap();
    let era = &ERAS[0];
    assert_eq!(era.clang.1, McountPass::RecordMcount);
    let orig = compile(dir.path(), "lockdep", "orig", Compiler::Clang, era);
    let patched = compile(dir.path(), "lockdep", "patched", Compiler::Clang, era);
    let out = Command::new(env!("CARGO_BIN_EXE_dynamos"))
        .args(["diff", "--json"])
        .arg(&orig)
        .arg(&patched)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["changed"],
        serde_json::json!(["locks_setup"]),
        "{text}"
    );
    assert_eq!(json["refused"], serde_json::json!([]), "{text}");
}
