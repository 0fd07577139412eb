//! Patches that change headers: every translation unit including the
//! header is rebuilt, built-in and module alike, and only the functions
//! whose code changed are replaced. A header too many files include, an
//! exported symbol whose MODVERSIONS CRC changes, and a module type whose
//! layout changes are refused, each naming what is refused.

mod common;

use common::*;
use std::process::Output;

fn exit_and_message(out: &Output) -> (Option<i32>, String) {
    (out.status.code(), stderr(out))
}

#[test]
fn a_header_and_its_user_change_together_and_go_live() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-header-helper.dynpkg");
    let out = build(&keys, "proc-header-helper.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    // fs/proc/internal.h reaches two dozen files of fs/proc; only
    // version.c uses the new helper, so only its function is replaced.
    let built = stdout(&out);
    let replaced: Vec<&str> = built.lines().filter(|l| l.starts_with("replace")).collect();
    assert_eq!(
        replaced,
        ["replace  version_proc_show (vmlinux, fs/proc/version.c)"],
        "{built}"
    );

    let script = r#"
echo "@@ before: $(grep -c 'reached through fs/proc/internal.h' /proc/version) @@"
dynamos apply /packages/proc-header-helper.dynpkg
echo "@@ applied: $(grep 'reached through' /proc/version) @@"
dynamos revert --all
echo "@@ reverted: $(grep -c 'reached through fs/proc/internal.h' /proc/version) @@"
"#;
    let (text, code) = vm(&keys, &[pkg], script);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("@@ before: 0 @@"), "{text}");
    assert!(
        text.contains("@@ applied: dynamos: version reached through fs/proc/internal.h @@"),
        "{text}"
    );
    assert!(text.contains("@@ reverted: 0 @@"), "{text}");
}

#[test]
fn a_header_most_of_the_kernel_includes_is_refused_naming_it() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let patch = work.path().join("fs-h-comment.diff");
    std::fs::write(
        &patch,
        "--- a/include/linux/fs.h\n+++ b/include/linux/fs.h\n@@ -1,3 +1,4 @@\n /* SPDX-License-Identifier: GPL-2.0 */\n+/* touched */\n #ifndef _LINUX_FS_H\n #define _LINUX_FS_H\n",
    )
    .unwrap();
    // An absolute path stands for itself among the example patch names.
    let out = build(
        &keys,
        patch.to_str().unwrap(),
        &work.path().join("x.dynpkg"),
    );
    let (code, message) = exit_and_message(&out);
    assert_eq!(code, Some(2), "{message}");
    assert!(
        message.contains("include/linux/fs.h: more than 200 source files include it"),
        "{message}"
    );
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(!work.path().join("x.dynpkg").exists());
}

#[test]
fn an_exported_symbols_version_change_is_refused_naming_the_symbol() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    let out = build(&keys, "refused-export-version.diff", &pkg);
    let (code, message) = exit_and_message(&out);
    assert_eq!(code, Some(2), "{message}");
    // struct proc_dir_entry is part of proc_mkdir's interface as genksyms
    // sees it: renaming a member's type changes the CRC, not the layout.
    // The old CRC is the one the shipped kernel's Module.symvers records.
    let debian = dynamos::target::Target::resolve(&Default::default()).unwrap();
    let symvers =
        std::fs::read_to_string(debian.headers.as_ref().unwrap().join("Module.symvers")).unwrap();
    let shipped = symvers
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            (fields.get(1) == Some(&"proc_mkdir")).then(|| fields[0].to_string())
        })
        .expect("proc_mkdir in Module.symvers");
    assert!(
        message.contains(&format!(
            "proc_mkdir: exported symbol version changes ({shipped} -> "
        )),
        "{shipped}: {message}"
    );
    assert!(message.contains("(fs/proc/generic.c)"), "{message}");
    assert!(!pkg.exists());
}

#[test]
fn a_module_type_layout_change_is_refused_naming_the_member() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    let out = build(&keys, "refused-module-layout.diff", &pkg);
    let (code, message) = exit_and_message(&out);
    assert_eq!(code, Some(2), "{message}");
    assert!(
        message.contains("Node.offset: data type layout changed"),
        "{message}"
    );
    assert!(message.contains("(fs/binfmt_misc.c)"), "{message}");
    assert!(!pkg.exists());
}
