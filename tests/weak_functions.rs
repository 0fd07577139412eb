//! Weak functions overridden at link time: kernel/fork.c's weak
//! `arch_dup_task_struct` lost to x86's. New code calls the one the kernel
//! runs, run-pre does not compare the one that lost, and a change of the
//! one that lost is refused at build time.

mod common;

use common::*;

#[test]
fn copy_process_calling_an_overridden_weak_function_goes_live() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("fork.dynpkg");
    let out = build(&keys, "fork-copy-process-weak-callee.diff", &pkg);
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "dynamos-build: {printed}");
    expect_line(&printed, "replace  copy_process (vmlinux, kernel/fork.c)");

    let out = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vmlinux = &manifest["manifest"]["objects"][0];
    let names = |list: &str| -> Vec<String> {
        vmlinux[list]
            .as_array()
            .unwrap_or_else(|| panic!("no {list} in {vmlinux}"))
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    // Called by the new code, resolved by name to the running definition,
    // and not compared with fork.c's weak code.
    assert!(names("externals").contains(&"arch_dup_task_struct".to_string()));
    let expected = names("expected_code");
    assert!(
        expected.contains(&"copy_process".to_string()),
        "{expected:?}"
    );
    assert!(
        !expected.contains(&"arch_dup_task_struct".to_string()),
        "{expected:?}"
    );

    let script = "set -e\n\
        dynamos apply /packages/fork.dynpkg\n\
        echo \"@@ live forks $(for i in $(seq 1 50); do sh -c 'echo x'; done | wc -l) @@\"\n\
        dmesg | grep 'through live-updated copy_process'\n\
        dynamos revert fork-copy-process-weak-callee\n\
        echo \"@@ reverted forks $(for i in $(seq 1 50); do sh -c 'echo x'; done | wc -l) @@\"\n";
    let text = vm_with_modules(&keys, &[], &[&pkg], script);
    expect_line(&text, "@@ live forks 50 @@");
    expect_line(&text, "@@ reverted forks 50 @@");
    assert!(
        text.lines().any(|l| l.contains("dynamos: ")
            && l.contains("forked pid")
            && l.contains("through live-updated copy_process")),
        "{text}"
    );
}

#[test]
fn a_change_of_a_weak_definition_that_lost_is_refused_at_build_time() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("weak.dynpkg");
    let out = build(&keys, "refused-overridden-weak.diff", &pkg);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}{err}", stdout(&out));
    assert!(
        err.contains("arch_dup_task_struct: a weak definition overridden at link time"),
        "{err}"
    );
    assert!(!pkg.exists());
}
