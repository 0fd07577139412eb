//! Several live updates at once, checked by behaviour in the VM: two
//! stacked on the same function (the newest wins, reverting it brings the
//! older one back), one on another function beside them, and a cumulative
//! update that atomically retires all of them, undoing what it does not
//! carry. A cumulative update that would silently drop an update it does
//! not name is refused.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Build from example patches, or fail the test.
fn built(keys: &Keys, patches: &[&str], extra: &[&str], out: &Path) {
    let out = build_with(keys, patches, extra, out);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn stacked_and_cumulative_updates_behave_as_declared() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = |n: &str| work.path().join(format!("{n}.dynpkg"));
    built(&keys, &["proc-version-banner.diff"], &[], &pkg("v1"));
    built(&keys, &["proc-version-banner-v2.diff"], &[], &pkg("v2"));
    built(
        &keys,
        &["proc-loadavg-new-helper.diff"],
        &[],
        &pkg("loadavg"),
    );
    built(
        &keys,
        &["proc-version-banner-v2.diff", "proc-cmdline-suffix.diff"],
        &[
            "--name",
            "cumulative",
            "--replaces",
            "proc-version-banner",
            "--replaces",
            "proc-version-banner-v2",
            "--replaces",
            "proc-loadavg-new-helper",
        ],
        &pkg("cumulative"),
    );
    built(
        &keys,
        &["proc-cmdline-suffix.diff"],
        &["--name", "partial", "--replaces", "proc-version-banner"],
        &pkg("partial"),
    );
    let packages: Vec<PathBuf> = ["v1", "v2", "loadavg", "cumulative", "partial"]
        .iter()
        .map(|n| pkg(n))
        .collect();

    let out = dynamos(&keys.dir, &["inspect", packages[3].to_str().unwrap()]);
    assert!(
        stdout(&out).contains("replaces proc-loadavg-new-helper (cumulative)"),
        "{}",
        stdout(&out)
    );

    // v1 = banner line, v2 = second-update line, l = loadavg marker,
    // c = cmdline suffix.
    let script = r#"
state() {
  echo "@@ $1: v1=$(grep -c 'proc-version-banner applied' /proc/version) v2=$(grep -c 'second update' /proc/version) l=$(grep -c 'loadavg marker' /proc/loadavg) c=$(grep -c 'dynamos.cmdline' /proc/cmdline) live=$(ls /sys/kernel/livepatch | wc -l) @@"
}
state start
dynamos apply /packages/v1.dynpkg && state v1
dynamos apply /packages/v2.dynpkg && state v2-on-v1
dynamos apply /packages/loadavg.dynpkg && state loadavg-beside
dynamos list
dynamos revert proc-version-banner-v2 && state v2-reverted
dynamos apply /packages/v2.dynpkg && state v2-reapplied
dynamos revert proc-version-banner && state v1-reverted-under-v2
dynamos apply /packages/v1.dynpkg && state v1-reapplied
dynamos apply /packages/partial.dynpkg; echo "@@ partial exit $? @@"; state after-partial
dynamos apply /packages/cumulative.dynpkg && state cumulative
dynamos list
echo "@@ modules $(grep -c '^dynamos' /proc/modules) @@"
dynamos revert cumulative && state end
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let (text, code) = vm(&keys, &packages, script);
    assert_eq!(code, Some(0), "{text}");
    let expect = |label: &str, state: &str| {
        let line = format!("@@ {label}: {state} @@");
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    };
    expect("start", "v1=0 v2=0 l=0 c=0 live=0");
    expect("v1", "v1=1 v2=0 l=0 c=0 live=1");
    // The newest update of a function is the one that runs.
    expect("v2-on-v1", "v1=0 v2=1 l=0 c=0 live=2");
    expect("loadavg-beside", "v1=0 v2=1 l=1 c=0 live=3");
    // Reverting the top of the stack brings the one below back.
    expect("v2-reverted", "v1=1 v2=0 l=1 c=0 live=2");
    expect("v2-reapplied", "v1=0 v2=1 l=1 c=0 live=3");
    // Reverting the one below leaves the top running.
    expect("v1-reverted-under-v2", "v1=0 v2=1 l=1 c=0 live=2");
    expect("v1-reapplied", "v1=1 v2=0 l=1 c=0 live=3");
    // A cumulative update naming only some of the live ones: refused,
    // nothing changed.
    assert!(text.contains("@@ partial exit 2 @@"), "{text}");
    assert!(text.contains("does not supersede"), "{text}");
    expect("after-partial", "v1=1 v2=0 l=1 c=0 live=3");
    // The cumulative one: its own changes live, the loadavg change it does
    // not carry undone, every earlier update retired and unloaded.
    expect("cumulative", "v1=0 v2=1 l=0 c=1 live=1");
    assert!(text.contains("@@ modules 1 @@"), "{text}");
    for retired in [
        "dynamos_proc_version_banner",
        "dynamos_proc_version_banner_v2",
        "dynamos_proc_loadavg_new_helper",
    ] {
        assert!(text.contains(&format!("retired  {retired}\n")), "{text}");
    }
    let listed = section(&text, "@@ cumulative:", "@@ modules");
    assert!(
        listed.contains("cumulative  dynamos_cumulative  enabled"),
        "{listed}"
    );
    assert!(!listed.contains("proc-version-banner  "), "{listed}");
    expect("end", "v1=0 v2=0 l=0 c=0 live=0");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}
