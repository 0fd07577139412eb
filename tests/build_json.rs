//! `dynamos-build --json`: one JSON object on standard output, with the
//! documented exit code, for a package written, refused and unchanged.

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
