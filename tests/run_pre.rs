//! Run-pre verification in the running kernel: a package built from source
//! whose original function differs from what the kernel runs is refused
//! before anything is loaded, naming the function and the offset. Two
//! kinds of difference: other instructions, and the same instructions
//! referring to another symbol (only the relocation check can see that).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// A user's tree that is the Debian source except for `version_proc_show`,
/// edited outside what the patch touches (`from` → `to`). Hard links keep
/// the copy cheap; the edited file is a file of its own.
fn tree_with_edited_original(debian_source: &Path, at: &Path, from: &str, to: &str) {
    if !at.exists() {
        let status = Command::new("cp")
            .arg("-al")
            .arg(debian_source)
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let file = at.join("fs/proc/version.c");
    let text = std::fs::read_to_string(debian_source.join("fs/proc/version.c")).unwrap();
    let edited = text.replace(from, to);
    assert_ne!(edited, text, "fs/proc/version.c changed upstream");
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, edited).unwrap();
}

fn build_from(tree: &Path, debian: &dynamos::target::Target, keys: &Keys, pkg: &Path) {
    let out = build_from_tree(keys, debian, tree, "proc-version-banner.diff", pkg);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_package_built_from_other_source_is_refused_naming_the_function() {
    let debian = dynamos::target::Target::resolve(&Default::default()).unwrap();
    let keys = Keys::new();
    // A fixed place, so the configured build folders are reused across runs.
    let tree = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run-pre-tree");

    let work = tempfile::tempdir().unwrap();
    let other_code = work.path().join("other-code.dynpkg");
    tree_with_edited_original(
        &debian.source,
        &tree,
        "{\n\tseq_printf(m, linux_proc_banner,",
        "{\n\tif (!v)\n\t\treturn -EINVAL;\n\tseq_printf(m, linux_proc_banner,",
    );
    build_from(&tree, &debian, &keys, &other_code);
    let other_symbol = work.path().join("other-symbol.dynpkg");
    tree_with_edited_original(
        &debian.source,
        &tree,
        "\tseq_printf(m, linux_proc_banner,",
        "\tseq_printf(m, linux_banner,",
    );
    build_from(&tree, &debian, &keys, &other_symbol);

    let (text, code) = vm(
        &keys,
        &[other_code, other_symbol],
        "for p in other-code other-symbol; do \
           dynamos apply /packages/$p.dynpkg; \
           echo \"@@ $p exit $? livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@\"; \
         done; cat /proc/version",
    );
    assert_eq!(code, Some(0), "{text}");
    for p in ["other-code", "other-symbol"] {
        assert!(
            text.contains(&format!("@@ {p} exit 2 livepatches 0 modules 0 @@")),
            "{text}"
        );
    }
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("run-pre check failed"))
        .collect();
    assert_eq!(refusals.len(), 2, "{text}");
    for refusal in &refusals {
        assert!(refusal.contains("version_proc_show"), "{refusal}");
        assert!(refusal.contains("at +0x"), "{refusal}");
    }
    assert!(refusals[0].contains("running code differs"), "{text}");
    assert!(
        refusals[1].contains("refers to linux_proc_banner where the package expects linux_banner"),
        "{text}"
    );
    assert!(
        !text.contains("dynamos: live update proc-version-banner applied"),
        "{text}"
    );
}
