//! Adaptation handlers: both versions of a function live at once and a
//! handler from the patch chooses per call. Refusals are checked on real
//! builds; the behaviour in the VM: by command name (`cat` and `head` see
//! different versions at the same time, the per-version counts, promote,
//! revert, and stacking over an earlier update), and by cgroup under a
//! load of readers that check every answer through apply, promote and
//! revert.

mod common;

use common::*;
use std::collections::BTreeMap;

#[test]
fn handlers_no_dispatcher_can_honour_are_refused() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    for (patch, message) in [
        (
            "refused-handler-unchanged-function.diff",
            "version_proc_show: has an adaptation handler but the patch does not change it",
        ),
        (
            "refused-handler-signature.diff",
            "version_proc_show: its adaptation handler version_for_head is bool (struct seq_file *), not bool (struct seq_file *, void *)",
        ),
        (
            "refused-handler-inlined-function.diff",
            "pipe_readable: has an adaptation handler but is inlined everywhere it is called",
        ),
    ] {
        let out = build(&keys, patch, &work.path().join("out.dynpkg"));
        assert_eq!(out.status.code(), Some(2), "{patch}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(message), "{patch}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{patch}: one line: {err}");
        assert!(!work.path().join("out.dynpkg").exists(), "{patch}");
    }
}

#[test]
fn cat_and_head_see_different_versions_until_promoted() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let adaptive = work.path().join("adaptive.dynpkg");
    let banner = work.path().join("banner.dynpkg");
    for (patch, out) in [
        ("proc-version-adaptive.diff", &adaptive),
        ("proc-version-banner.diff", &banner),
    ] {
        let built = build(&keys, patch, out);
        assert!(built.status.success(), "{patch}: {}", stderr(&built));
    }
    let inspected = dynamos(&keys.dir, &["inspect", adaptive.to_str().unwrap()]);
    assert!(
        stdout(&inspected)
            .contains("version_proc_show (vmlinux, fs/proc/version.c) chosen by version_for_head"),
        "{}",
        stdout(&inspected)
    );

    // new = the adaptive package's line, banner = the earlier package's.
    let script = r#"
v() {
  echo "@@ $1: cat=$(cat /proc/version | grep -c 'chosen for head') head=$(head /proc/version | grep -c 'chosen for head') cat-banner=$(cat /proc/version | grep -c 'banner applied') head-banner=$(head /proc/version | grep -c 'banner applied') @@"
}
v start
dynamos apply /packages/adaptive.dynpkg && v applied
i=0; while [ $i -lt 50 ]; do cat /proc/version; i=$((i+1)); done > /tmp/cat.out &
i=0; while [ $i -lt 50 ]; do head /proc/version; i=$((i+1)); done > /tmp/head.out &
wait
echo "@@ together: cat-new=$(grep -c 'chosen for head' /tmp/cat.out) head-new=$(grep -c 'chosen for head' /tmp/head.out) head-reads=$(grep -c '^Linux version' /tmp/head.out) @@"
echo "@@ list-applied"; dynamos list; echo "@@ end-list"
dynamos promote version_proc_show && v promoted
echo "@@ list-promoted"; dynamos list; echo "@@ end-list"
dynamos revert proc-version-adaptive && v reverted
dynamos apply /packages/banner.dynpkg && dynamos apply /packages/adaptive.dynpkg && v stacked
dynamos revert proc-version-banner; echo "@@ revert-below exit $? @@"
v still-stacked
dynamos revert proc-version-adaptive && v banner-back
dynamos revert proc-version-banner && v end
dynamos promote version_proc_show; echo "@@ promote-nothing exit $? @@"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let (text, code) = vm(&keys, &[adaptive, banner], script);
    assert_eq!(code, Some(0), "{text}");
    let expect = |label: &str, state: &str| {
        let line = format!("@@ {label}: {state} @@");
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    };
    expect("start", "cat=0 head=0 cat-banner=0 head-banner=0");
    expect("applied", "cat=0 head=1 cat-banner=0 head-banner=0");
    expect("together", "cat-new=0 head-new=50 head-reads=50");
    // Each read of /proc/version is one call: 2 + 50 by cat, 2 + 50 by head.
    let listed = section(&text, "@@ list-applied", "@@ end-list");
    assert!(
        listed.contains("vmlinux: version_proc_show  chosen by version_for_head: 52 calls previous version, 52 new"),
        "{listed}"
    );
    expect("promoted", "cat=1 head=1 cat-banner=0 head-banner=0");
    let listed = section(&text, "@@ list-promoted", "@@ end-list");
    assert!(
        listed.contains("vmlinux: version_proc_show  promoted by version_for_head: 52 calls previous version, 56 new"),
        "{listed}"
    );
    expect("reverted", "cat=0 head=0 cat-banner=0 head-banner=0");
    // Over an earlier update, the handler's false choice is that update's version.
    expect("stacked", "cat=0 head=1 cat-banner=1 head-banner=0");
    assert!(text.contains("@@ revert-below exit 2 @@"), "{text}");
    assert!(
        text.contains("revert dynamos_proc_version_adaptive first"),
        "{text}"
    );
    expect("still-stacked", "cat=0 head=1 cat-banner=1 head-banner=0");
    expect("banner-back", "cat=0 head=0 cat-banner=1 head-banner=1");
    expect("end", "cat=0 head=0 cat-banner=0 head-banner=0");
    assert!(text.contains("@@ promote-nothing exit 1 @@"), "{text}");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}

#[test]
fn a_cgroup_canary_under_load_through_apply_promote_and_revert() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary.dynpkg");
    let built = build(&keys, "proc-cmdline-canary-cgroup.diff", &canary);
    assert!(built.status.success(), "{}", stderr(&built));

    // Two readers, one in the cgroup "canary", classify every read of
    // /proc/cmdline; a read counts for a phase only when the phase was the
    // same before and after it.
    let script = r#"
mount -t cgroup2 none /sys/fs/cgroup && mkdir /sys/fs/cgroup/canary || exit 7
orig=$(cat /proc/cmdline)
echo before > /tmp/phase
reader() {
  while [ ! -e /tmp/stop ]; do
    p1=$(cat /tmp/phase); c=$(cat /proc/cmdline); p2=$(cat /tmp/phase)
    case "$c" in
      "$orig dynamos.cmdline=canary") k=new ;;
      "$orig") k=old ;;
      *) k=bad ;;
    esac
    [ "$p1" = "$p2" ] && echo "$1 $p1 $k"
  done
}
(echo 0 > /sys/fs/cgroup/canary/cgroup.procs && reader canary > /tmp/canary.log) &
reader other > /tmp/other.log &
phase() { echo "$1" > /tmp/phase; sleep "$2"; }
phase before 3
phase applying 0; dynamos apply /packages/canary.dynpkg || echo "@@ apply failed @@"
phase applied 5
phase promoting 0; dynamos promote cmdline_proc_show || echo "@@ promote failed @@"
phase promoted 5
phase reverting 0; dynamos revert proc-cmdline-canary-cgroup || echo "@@ revert failed @@"
phase reverted 3
touch /tmp/stop; wait
echo "@@ counts"; cat /tmp/canary.log /tmp/other.log | sort | uniq -c; echo "@@ end-counts"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let (text, code) = vm(&keys, &[canary], script);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("failed @@"), "{text}");
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for line in section(&text, "@@ counts", "@@ end-counts").lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [n, reader, phase, kind] = fields[..] {
            counts.insert(
                (reader.into(), phase.into(), kind.into()),
                n.parse().unwrap(),
            );
        }
    }
    let count = |reader: &str, phase: &str, kind: &str| {
        counts
            .get(&(reader.into(), phase.into(), kind.into()))
            .copied()
            .unwrap_or(0)
    };
    // Never a wrong answer, in any phase.
    assert!(
        !counts.keys().any(|(_, _, kind)| kind == "bad"),
        "{counts:?}\n{text}"
    );
    for (phase, canary_sees, other_sees) in [
        ("before", "old", "old"),
        ("applied", "new", "old"),
        ("promoted", "new", "new"),
        ("reverted", "old", "old"),
    ] {
        for (reader, sees) in [("canary", canary_sees), ("other", other_sees)] {
            let wrong = if sees == "new" { "old" } else { "new" };
            assert!(
                count(reader, phase, sees) > 0,
                "{reader} read nothing while {phase}: {counts:?}"
            );
            assert_eq!(
                count(reader, phase, wrong),
                0,
                "{reader} saw the {wrong} version while {phase}: {counts:?}"
            );
        }
    }
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}

/// A module function with a handler: both versions read the module's own
/// static `enabled` through livepatch relocations, across a reload of the
/// module and when the module loads only after the package.
#[test]
fn a_module_function_chosen_per_call_across_reloads() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("canary.dynpkg");
    let built = build(&keys, "binfmt-misc-status-canary.diff", &pkg);
    assert!(built.status.success(), "{}", stderr(&built));
    let script = r#"
B=/proc/sys/fs/binfmt_misc
up() { modprobe binfmt_misc && mount -t binfmt_misc none $B; }
down() { umount $B && rmmod binfmt_misc; }
s() { echo "@@ $1: cat=$(cat $B/status) head=$(head $B/status) @@"; }
up; dynamos apply /packages/canary.dynpkg; s applied
echo 0 > $B/status; s disabled; echo 1 > $B/status
down; up; s reloaded; down
dynamos revert binfmt-misc-status-canary; dynamos apply /packages/canary.dynpkg
up; s loaded-after
dynamos promote bm_status_read; s promoted
dynamos revert binfmt-misc-status-canary; s reverted; down
"#;
    let text = vm_with_modules(&keys, &["binfmt_misc"], &[&pkg], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ applied: cat=enabled head=enabled (canary) @@");
    expect("@@ disabled: cat=disabled head=disabled (canary) @@");
    expect("@@ reloaded: cat=enabled head=enabled (canary) @@");
    expect("@@ loaded-after: cat=enabled head=enabled (canary) @@");
    expect("@@ promoted: cat=enabled (canary) head=enabled (canary) @@");
    expect("@@ reverted: cat=enabled head=enabled @@");
}
