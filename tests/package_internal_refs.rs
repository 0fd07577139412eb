//! References between the changed files of one package: a new global
//! function of fs/proc/cmdline.c called from fs/proc/meminfo.c, and a new
//! global variable of meminfo.c used by that function, link inside the
//! package (the running kernel has neither).

mod common;

use common::*;

#[test]
fn a_new_function_and_variable_shared_by_two_changed_files_go_live() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("shared.dynpkg");
    let out = build(&keys, "proc-shared-new-function.diff", &pkg);
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "dynamos-build: {printed}");
    expect_line(&printed, "add      print_message (vmlinux)");

    // Nothing of the package is left for apply to look up in the kernel.
    let out = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    let manifest = stdout(&out);
    assert!(!manifest.contains("\"print_message\","), "{manifest}");
    assert!(!manifest.contains("dynamos_shared_messages"), "{manifest}");

    let script = "set -e\n\
        echo '@@ before'; cat /proc/cmdline; tail -n 1 /proc/meminfo\n\
        dynamos apply /packages/shared.dynpkg\n\
        echo '@@ live'; cat /proc/cmdline; tail -n 1 /proc/meminfo; cat /proc/cmdline\n\
        dynamos revert proc-shared-new-function\n\
        echo '@@ reverted'; cat /proc/cmdline; tail -n 1 /proc/meminfo\n\
        echo '@@ end'\n";
    let text = vm_with_modules(&keys, &[], &[&pkg], script);
    let before = section(&text, "@@ before", "@@ live");
    let live = section(&text, "@@ live", "@@ reverted");
    let after = section(&text, "@@ reverted", "@@ end");
    assert!(!before.contains("dynamos:"), "before:\n{before}");
    assert!(!after.contains("dynamos:"), "reverted:\n{after}");
    // One counter, defined by meminfo.c, counts the messages of both files.
    let messages: Vec<&str> = live
        .lines()
        .filter(|l| l.starts_with("dynamos: shared message"))
        .collect();
    assert_eq!(
        messages,
        [
            "dynamos: shared message from cmdline, 1 so far",
            "dynamos: shared message from meminfo, 2 so far",
            "dynamos: shared message from cmdline, 3 so far",
        ],
        "live:\n{live}"
    );
}

/// A new function of one file of the module 9pnet called from another of
/// its files: linked inside the package, loaded with 9pnet there, across a
/// reload of 9pnet, and reverted.
#[test]
fn a_new_function_shared_by_two_files_of_a_module_loads_with_it() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("9p-shared-new-function.dynpkg");
    let out = build(&keys, "9p-shared-new-function.diff", &pkg);
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "dynamos-build: {printed}");
    expect_line(
        &printed,
        "replace  p9_client_begin_disconnect (9pnet, net/9p/client.c)",
    );
    expect_line(&printed, "add      p9_note_disconnect (9pnet)");

    let script = r#"
modprobe 9pnet
dynamos apply /packages/9p-shared-new-function.dynpkg; echo "@@ applied $? @@"
rmmod 9pnet && modprobe 9pnet; echo "@@ reloaded $? @@"
dynamos list
dynamos revert --all; echo "@@ reverted $? @@"; rmmod 9pnet
"#;
    let text = vm_with_modules(&keys, &["9pnet"], &[&pkg], script);
    expect_line(&text, "live     p9_client_begin_disconnect (9pnet)");
    expect_line(&text, "@@ applied 0 @@");
    expect_line(&text, "@@ reloaded 0 @@");
    expect_line(&text, "@@ reverted 0 @@");
}

/// vmlinux code cannot call a new function of a module: the module may not
/// be loaded when it runs. Refused by dynamos-build, naming the function.
#[test]
fn vmlinux_code_calling_a_new_module_function_is_refused_at_build_time() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("refused.dynpkg");
    let out = build(
        &keys,
        "refused-vmlinux-calls-new-module-function.diff",
        &pkg,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}{err}", stdout(&out));
    assert!(
        err.contains(
            "p9_note_disconnect: new in net/9p/protocol.c (9pnet) and used by new code of fs/proc/version.c (vmlinux)"
        ),
        "{err}"
    );
    assert!(!pkg.exists());
}
