//! A static call in new module code through a key the module defines itself
//! (`static_call(kvm_x86_get_exit_info)` in kvm): the update calls the key's
//! trampoline `__SCT__kvm_x86_get_exit_info` through a livepatch relocation
//! and carries no `.static_call_sites` entry the module loader would read
//! before the key is resolved. In the VM, with kvm loaded (kvm_intel and
//! kvm_amd find no hardware under TCG, kvm itself loads), the running new
//! code's call goes to kvm's trampoline, and again after kvm is reloaded.

mod common;

use common::*;
use object::read::elf::{ElfFile64, FileHeader, Rela, SectionHeader, Sym};
use object::{elf, Endianness, SymbolIndex};
use std::path::Path;

const MODULE: &str = "dynamos_kvm_emulation_failure_insn_size";
const TRAMPOLINE: &str = "__SCT__kvm_x86_get_exit_info";

/// Relocations of `ko` as (relocation section, symbol, function it
/// writes into, offset in that function).
fn relocations(ko: &Path) -> Vec<(String, String, String, u64)> {
    let data = std::fs::read(ko).unwrap();
    let file = ElfFile64::<Endianness>::parse(data.as_slice()).unwrap();
    let endian = file.endian();
    let sections = file.elf_header().sections(endian, data.as_slice()).unwrap();
    let symbols = sections
        .symbols(endian, data.as_slice(), elf::SHT_SYMTAB)
        .unwrap();
    let name_of = |index: usize| {
        let sym = symbols.symbol(SymbolIndex(index)).unwrap();
        String::from_utf8_lossy(sym.name(endian, symbols.strings()).unwrap()).into_owned()
    };
    let mut out = Vec::new();
    for header in sections.iter() {
        let Some((relas, _symtab)) = header.rela(endian, data.as_slice()).unwrap() else {
            continue;
        };
        let target = header.sh_info(endian) as usize;
        let name = String::from_utf8_lossy(sections.section_name(endian, header).unwrap());
        for r in relas {
            let offset = r.r_offset(endian);
            let function = symbols
                .iter()
                .enumerate()
                .find(|(_, s)| {
                    s.st_type() == elf::STT_FUNC
                        && s.st_shndx(endian) as usize == target
                        && (s.st_value(endian)..s.st_value(endian) + s.st_size(endian))
                            .contains(&offset)
                })
                .map(|(i, s)| (name_of(i), offset - s.st_value(endian)));
            let (function, at) = function.unwrap_or_default();
            out.push((
                name.to_string(),
                name_of(r.r_sym(endian, false) as usize),
                function,
                at,
            ));
        }
    }
    out
}

#[test]
fn new_kvm_code_calls_the_trampoline_of_kvms_own_static_call_key() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("kvm-emulation-failure-insn-size.dynpkg");
    let out = build(&keys, "kvm-emulation-failure-insn-size.diff", &pkg);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    expect_line(
        &stdout(&out),
        "replace  prepare_emulation_failure_exit (kvm, arch/x86/kvm/x86.c)",
    );

    let ko = work.path().join("update.ko");
    let saved = dynamos(
        &keys.dir,
        &[
            "inspect",
            pkg.to_str().unwrap(),
            "--save-module",
            ko.to_str().unwrap(),
        ],
    );
    assert!(saved.status.success(), "{}", stderr(&saved));
    let relocs = relocations(&ko);
    // No static call site entry is left on a livepatch symbol...
    let early: Vec<_> = relocs
        .iter()
        .filter(|(section, symbol, ..)| {
            section == ".rela.static_call_sites" && symbol.starts_with(".klp.sym.")
        })
        .collect();
    assert!(early.is_empty(), "{early:?}");
    // ...and the call is a livepatch relocation of kvm's trampoline, one
    // byte into the call instruction.
    let call = relocs
        .iter()
        .find(|(section, symbol, ..)| {
            section == ".klp.rela.kvm..text.prepare_emulation_failure_exit"
                && *symbol == format!(".klp.sym.kvm.{TRAMPOLINE},0")
        })
        .unwrap_or_else(|| panic!("no livepatch relocation of {TRAMPOLINE}: {relocs:?}"));
    assert_eq!(call.2, "prepare_emulation_failure_exit", "{call:?}");
    let call_offset = format!("{:#x}", call.3 - 1);

    let probe = work.path().join("call-target");
    compile_static_probe("call_target.c", &probe);
    let script = format!(
        r#"
cp /packages/call-target /tmp/; chmod +x /tmp/call-target
modprobe kvm; echo "@@ kvm loaded $? @@"
dynamos apply --timeout 60 /packages/{pkg_file} > /tmp/apply.log 2>&1; echo "@@ apply exit $? @@"
cat /tmp/apply.log
echo "@@ live: $(/tmp/call-target {MODULE} prepare_emulation_failure_exit {call_offset}) @@"
rmmod kvm && modprobe kvm; echo "@@ reloaded $? patched $(cat /sys/kernel/livepatch/{MODULE}/kvm/patched) @@"
echo "@@ reloaded: $(/tmp/call-target {MODULE} prepare_emulation_failure_exit {call_offset}) @@"
dynamos revert --all > /dev/null; echo "@@ reverted $? @@"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:|invalid relocation|unable to find symbol' && exit 9 || true
"#,
        pkg_file = pkg.file_name().unwrap().to_str().unwrap(),
    );
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--timeout",
            "300",
            "--module",
            "kvm",
            "--package",
            pkg.to_str().unwrap(),
            "--package",
            probe.to_str().unwrap(),
            "--",
            &script,
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    expect_line(&text, "@@ kvm loaded 0 @@");
    expect_line(&text, "@@ apply exit 0 @@");
    expect_line(&text, "live     prepare_emulation_failure_exit (kvm)");
    let calls = format!("prepare_emulation_failure_exit+{call_offset} calls {TRAMPOLINE} [kvm] @@");
    expect_line(&text, &format!("@@ live: call-target: {calls}"));
    println!("{}", section(&text, "@@ live: ", " @@"));
    expect_line(&text, "@@ reloaded 0 patched 1 @@");
    expect_line(&text, &format!("@@ reloaded: call-target: {calls}"));
    expect_line(&text, "@@ reverted 0 @@");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}
