//! A fix written against a neighbouring version of the default target's
//! source: its hunk header is 23 lines off and one context line differs.
//! `dynamos-build` refuses it with the fuzz it needs, and builds it with
//! `--fuzz 1`, saying where the hunk landed.

mod common;

use common::*;

/// `patches/proc-version-banner.diff` with its hunk 23 lines further down
/// and its first context line changed.
fn shifted_and_damaged() -> String {
    let original =
        std::fs::read_to_string(root().join("patches/proc-version-banner.diff")).unwrap();
    assert!(original.contains("@@ -13,6 +13,7 @@\n"), "{original}");
    assert!(
        original.contains("\n \t\tutsname()->sysname,\n"),
        "{original}"
    );
    original
        .replace("@@ -13,6 +13,7 @@\n", "@@ -36,6 +36,7 @@\n")
        .replace(
            "\n \t\tutsname()->sysname,\n",
            "\n \t\tutsname()->nodename,\n",
        )
}

#[test]
fn offset_and_fuzz_against_the_real_tree() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let patch = work.path().join("banner-shifted.diff");
    std::fs::write(&patch, shifted_and_damaged()).unwrap();
    let patch = patch.to_str().unwrap();
    let out = work.path().join("banner.dynpkg");

    let refused = build_with(&keys, &[patch], [] as [&str; 0], &out);
    let said = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert_eq!(
        said.trim_end(),
        format!(
            "dynamos-build: {patch}: line 3: hunk #1 for fs/proc/version.c does not apply \
             without fuzz: applies with fuzz 1 at line 13; rerun with --fuzz 1 to accept it"
        )
    );
    assert!(!out.exists());

    let built = build_with(&keys, &[patch], ["--fuzz", "1"], &out);
    let said = stdout(&built);
    assert!(built.status.success(), "{said}{}", stderr(&built));
    // With the package's other notes, on standard output.
    assert!(
        said.contains(
            "note: fs/proc/version.c: hunk #1 applied at line 13 with fuzz 1 (offset -23 lines)\n"
        ),
        "{said}"
    );
    assert!(
        said.contains("replace  version_proc_show (vmlinux, fs/proc/version.c)\n"),
        "{said}"
    );
    let inspected = dynamos(&keys.dir, &["inspect", out.to_str().unwrap()]);
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    assert!(
        stdout(&inspected).contains("version_proc_show"),
        "{}",
        stdout(&inspected)
    );
}
