//! Value updates in the running kernel: a patch that changes a sysctl's
//! default (`lease_break_time` of fs/locks.c, 45 → 20 seconds, shown as
//! /proc/sys/fs/lease-break-time) takes effect when the package is
//! applied and is undone by revert; when an administrator has set the
//! sysctl, the package is refused naming the variable and both values, and
//! nothing is loaded, also when the administrator's write lands after
//! apply's check (the module's own check refuses it). A second update of
//! the variable, and a cumulative update that would retire the one that
//! set it, are refused. A module variable's changed initial value is refused
//! by `dynamos-build`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PATCH: &str = "lease-break-time-default.diff";
const SYSCTL: &str = "/proc/sys/fs/lease-break-time";
/// Seconds one VM run may take, boot included (it takes about 20 s on TCG).
const VM_BUDGET: u64 = 240;

fn built(keys: &Keys, out: &Path) {
    let run = build(keys, PATCH, out);
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    expect_line(
        &stdout(&run),
        "value    lease_break_time (vmlinux, fs/locks.c): 45 -> 20",
    );
    let shown = dynamos(&keys.dir, &["inspect", out.to_str().unwrap()]);
    assert!(
        stdout(&shown).contains("value    lease_break_time (vmlinux, fs/locks.c): 45 -> 20"),
        "{}",
        stdout(&shown)
    );
}

/// Run `script` in the VM with `files` under /packages (checking exit 0,
/// no Oops, BUG or WARNING, no unexpected taint), within the time budget.
fn in_vm(keys: &Keys, files: &[&Path], script: &str) -> String {
    let started = Instant::now();
    let text = vm_with_modules(keys, &[], files, script);
    assert!(
        started.elapsed() < Duration::from_secs(VM_BUDGET),
        "took {:?}",
        started.elapsed()
    );
    text
}

fn package_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("lease-break-time-default.dynpkg")
}

#[test]
fn a_changed_sysctl_default_takes_effect_and_is_restored_by_revert() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = package_path(&work);
    built(&keys, &pkg);
    // The same change once more, as a second update and as a cumulative one.
    let second = work.path().join("second.dynpkg");
    let cumulative = work.path().join("cumulative.dynpkg");
    for (out, extra) in [
        (&second, vec!["--name", "second"]),
        (
            &cumulative,
            vec![
                "--name",
                "cumulative",
                "--replaces",
                "lease-break-time-default",
            ],
        ),
    ] {
        let run = build_with(&keys, &[PATCH], extra, out);
        assert!(run.status.success(), "{}", stderr(&run));
    }
    let text = in_vm(
        &keys,
        &[&pkg, &second, &cumulative],
        &format!(
            r#"
echo "@@ boot $(cat {SYSCTL}) @@"
dynamos apply --timeout 60 /packages/lease-break-time-default.dynpkg; echo "@@ apply exit $? @@"
echo "@@ applied $(cat {SYSCTL}) @@"
dynamos list
dynamos apply /packages/second.dynpkg 2>&1; echo "@@ second exit $? @@"
dynamos apply /packages/cumulative.dynpkg 2>&1; echo "@@ cumulative exit $? @@"
echo "@@ still $(cat {SYSCTL}) livepatches $(ls /sys/kernel/livepatch | wc -l) @@"
dynamos revert lease-break-time-default; echo "@@ revert exit $? @@"
echo "@@ reverted $(cat {SYSCTL}) @@"
dynamos apply --timeout 60 /packages/lease-break-time-default.dynpkg >/dev/null; echo "@@ again exit $? @@"
echo 33 > {SYSCTL}
dynamos revert lease-break-time-default >/dev/null; echo "@@ revert after admin exit $? @@"
echo "@@ kept $(cat {SYSCTL}) @@"
echo "@@ livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@"
dmesg | grep 'lease_break_time was changed'
"#
        ),
    );
    for line in [
        "@@ boot 45 @@",
        "value    lease_break_time = 20 (was 45)",
        "@@ apply exit 0 @@",
        "@@ applied 20 @@",
        "    vmlinux: lease_break_time = 20 (was 45)",
        // A second update of the variable finds it already set.
        "dynamos: refused: lease_break_time (fs/locks.c): running value 20 is not the old initial value 45 the update expects (it would set 20); live update lease-break-time-default set it",
        "@@ second exit 2 @@",
        // Atomic replace would run none of the retired update's callbacks.
        "dynamos: refused: cumulative: would retire live update lease-break-time-default, which set lease_break_time (fs/locks.c) to 20; a cumulative update cannot take over value updates: revert lease-break-time-default first",
        "@@ cumulative exit 2 @@",
        "@@ still 20 livepatches 1 @@",
        "@@ revert exit 0 @@",
        "@@ reverted 45 @@",
        "@@ again exit 0 @@",
        "@@ revert after admin exit 0 @@",
        // What the administrator set while the update was on stays.
        "@@ kept 33 @@",
        "lease_break_time was changed while the update was applied; keeping its current value",
        "@@ livepatches 0 modules 0 @@",
    ] {
        expect_line(&text, line);
    }
}

#[test]
fn a_sysctl_an_administrator_changed_is_refused_naming_both_values() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = package_path(&work);
    built(&keys, &pkg);
    let racer = work.path().join("sysctl-racer");
    compile_static_probe("sysctl_racer.c", &racer);
    let text = in_vm(
        &keys,
        &[&pkg, &racer],
        &format!(
            r#"
echo 60 > {SYSCTL}
dynamos apply --timeout 60 /packages/lease-break-time-default.dynpkg 2>/tmp/err; echo "@@ apply exit $? @@"
echo "@@ error $(cat /tmp/err) @@"
echo "@@ error lines $(wc -l < /tmp/err) @@"
echo "@@ value $(cat {SYSCTL}) @@"
echo "@@ livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@"
# The administrator's write lands after apply's check, as the module loads.
echo 45 > {SYSCTL}
cp /packages/sysctl-racer /tmp/ && chmod +x /tmp/sysctl-racer
/tmp/sysctl-racer {SYSCTL} 70 dynamos apply --timeout 60 /packages/lease-break-time-default.dynpkg 2>/tmp/err; echo "@@ raced apply exit $? @@"
echo "@@ raced error $(cat /tmp/err) @@"
echo "@@ raced value $(cat {SYSCTL}) livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@"
dmesg | grep 'no longer holds its old initial value'
"#
        ),
    );
    expect_line(&text, "@@ apply exit 2 @@");
    expect_line(
        &text,
        "@@ error dynamos: refused: lease_break_time (fs/locks.c): running value 60 is not the old initial value 45 the update expects (it would set 20)",
    );
    expect_line(&text, "@@ error lines 1 @@");
    expect_line(&text, "@@ value 60 @@");
    expect_line(&text, "@@ livepatches 0 modules 0 @@");
    // The module's own check refuses what apply's could not see.
    expect_line(&text, "@@ raced apply exit 2 @@");
    expect_line(
        &text,
        "@@ raced error dynamos: refused: lease-break-time-default: lease_break_time (fs/locks.c) changed while the update was being loaded, before its new value was written; nothing was applied (see dmesg) @@",
    );
    expect_line(&text, "@@ raced value 70 livepatches 0 modules 0 @@");
    expect_line(
        &text,
        "dynamos_lease_break_time_default: lease_break_time no longer holds its old initial value; update not applied",
    );
}

#[test]
fn a_changed_initial_value_in_a_module_is_refused_at_build_time() {
    // binfmt_misc's `enabled` would start from its old value whenever the
    // module loads after the update.
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("refused.dynpkg");
    let run = build(&keys, "refused-module-value.diff", &out);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    expect_line(
        &stderr(&run),
        "enabled: changed initial value of a variable of module binfmt_misc: value updates cover vmlinux variables only",
    );
    assert!(!out.exists());
}
