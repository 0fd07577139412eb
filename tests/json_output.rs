//! `--json` output: one JSON object on standard output, with the
//! documented exit code, from `dynamos-build` (a package written, refused
//! and unchanged) and from `dynamos apply` and `revert` in the VM.

mod common;

use common::*;

fn json_build(keys: &Keys, patch: &str, out: &std::path::Path) -> (serde_json::Value, Option<i32>) {
    let built = build_with(keys, &[patch], ["--json"], out);
    let value: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap_or_else(|e| {
        panic!(
            "{patch}: not JSON ({e}): {}{}",
            stdout(&built),
            stderr(&built)
        )
    });
    (value, built.status.code())
}

#[test]
fn build_results_are_one_json_object_with_the_exit_code() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.dynpkg");

    let (written, code) = json_build(&keys, "proc-version-adaptive.diff", &out);
    assert_eq!(code, Some(0), "{written}");
    assert_eq!(written["status"], "written", "{written}");
    assert_eq!(written["target"], "6.1.0-57-amd64", "{written}");
    assert_eq!(written["package"], out.to_str().unwrap(), "{written}");
    assert_eq!(written["module_signed"], false, "{written}");
    assert_eq!(
        written["replaced"][0]["function"], "version_proc_show",
        "{written}"
    );
    assert_eq!(written["replaced"][0]["object"], "vmlinux", "{written}");
    assert_eq!(
        written["replaced"][0]["handler"], "version_for_head",
        "{written}"
    );
    assert_eq!(
        written["added"][0]["function"], "version_for_head",
        "{written}"
    );
    assert!(
        written["timings"].as_array().is_some_and(|t| !t.is_empty()),
        "{written}"
    );
    assert!(out.is_file());

    let refused_out = work.path().join("refused.dynpkg");
    let (refused, code) = json_build(&keys, "refused-handler-signature.diff", &refused_out);
    assert_eq!(code, Some(2), "{refused}");
    assert_eq!(refused["status"], "refused", "{refused}");
    assert_eq!(
        refused["refused"][0]["symbol"], "version_proc_show",
        "{refused}"
    );
    assert!(
        refused["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r
                .contains("its adaptation handler version_for_head is bool (struct seq_file *)")),
        "{refused}"
    );
    assert!(!refused_out.exists());

    let (unchanged, code) = json_build(&keys, "no-change-comment.diff", &refused_out);
    assert_eq!(code, Some(3), "{unchanged}");
    assert_eq!(unchanged["status"], "no_change", "{unchanged}");
}

#[test]
fn apply_and_revert_print_one_json_object_each() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("banner.dynpkg");
    let built = build(&keys, "proc-version-banner.diff", &pkg);
    assert!(built.status.success(), "{}", stderr(&built));
    let script = r#"
dynamos apply --json /packages/banner.dynpkg > /tmp/apply.json; echo "@@ apply exit $? @@"
dynamos apply --json /packages/banner.dynpkg > /tmp/again.json; echo "@@ again exit $? @@"
dynamos revert --json proc-version-banner > /tmp/revert.json; echo "@@ revert exit $? @@"
for f in apply again revert; do echo "@@ $f"; cat /tmp/$f.json; echo "@@ end"; done
"#;
    let text = vm_with_modules(&keys, &[], &[&pkg], script);
    expect_line(&text, "@@ apply exit 0 @@");
    expect_line(&text, "@@ again exit 2 @@");
    expect_line(&text, "@@ revert exit 0 @@");
    let parsed = |name: &str| -> serde_json::Value {
        let body = section(&text, &format!("@@ {name}\n"), "@@ end");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"))
    };
    let applied = parsed("apply");
    assert_eq!(applied["status"], "applied", "{applied}");
    assert_eq!(applied["package"], "proc-version-banner", "{applied}");
    assert_eq!(
        applied["live"][0]["function"], "version_proc_show",
        "{applied}"
    );
    assert_eq!(applied["verified_functions"], 1, "{applied}");
    let again = parsed("again");
    assert_eq!(again["status"], "refused", "{again}");
    assert!(
        again["message"]
            .as_str()
            .is_some_and(|m| m.contains("already loaded")),
        "{again}"
    );
    let reverted = parsed("revert");
    assert_eq!(reverted["status"], "reverted", "{reverted}");
    assert_eq!(
        reverted["reverted"][0], "dynamos_proc_version_banner",
        "{reverted}"
    );
}
