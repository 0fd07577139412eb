//! `dynamos-build --replace-unchanged`: an identity update of a function a
//! patch does not change, built from the real default target.

mod common;

use common::*;

#[test]
fn a_comment_patch_with_replace_unchanged_replaces_the_function() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("identity.dynpkg");
    let out = build_with(
        &keys,
        &["no-change-comment.diff"],
        ["--replace-unchanged", "version_proc_show"],
        &pkg,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    expect_line(
        &stdout(&out),
        "replace  version_proc_show (vmlinux, fs/proc/version.c)",
    );
    let inspect = dynamos(&keys.dir, &["inspect", pkg.to_str().unwrap(), "--json"]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        manifest["functions_replaced"],
        serde_json::json!(["vmlinux:version_proc_show"]),
        "{manifest}"
    );

    // Live, the copy runs in place of the function and reads the same.
    let text = vm_with_modules(
        &keys,
        &[],
        &[&pkg],
        r#"
before=$(cat /proc/version)
dynamos apply /packages/identity.dynpkg || exit 3
echo "@@ redirected $(ls /sys/kernel/livepatch/*/vmlinux/) @@"
[ "$(cat /proc/version)" = "$before" ] && echo "@@ same text @@"
dynamos revert --all || exit 4
"#,
    );
    assert!(
        section(&text, "@@ redirected ", " @@").contains("version_proc_show,"),
        "{text}"
    );
    expect_line(&text, "@@ same text @@");
}

/// `--replace-unchanged FUNCTION` on a patch that only touches a comment:
/// exit 2, one line naming the function, no package.
fn assert_replacing_is_refused(function: &str) {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    let out = build_with(
        &keys,
        &["no-change-comment.diff"],
        ["--replace-unchanged", function],
        &pkg,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains(function), "{message}");
    assert!(!pkg.exists());
}

#[test]
fn replace_unchanged_of_a_function_the_patch_does_not_build_exits_2() {
    assert_replacing_is_refused("no_such_function");
}

#[test]
fn replace_unchanged_of_init_code_exits_2() {
    assert_replacing_is_refused("proc_version_init");
}
