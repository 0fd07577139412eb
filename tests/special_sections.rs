//! Real kernel fixes whose new code depends on what the diff engine carries
//! beside the instructions, checked by behaviour in the VM:
//!
//! - `readdir-hide-entry`: filldir64 writes to user memory inside a
//!   `user_write_access_begin` block (SMAP `stac`/`clac` alternatives) with
//!   `unsafe_put_user` (exception-table entries). Listing a directory works
//!   (alternatives applied) and a bad buffer gives EFAULT instead of an oops
//!   (exception table carried). The patch also shifts every line below it.
//! - `proc-version-warn`: a WARN_ONCE in new code reports file and line and
//!   continues (bug table carried) instead of dying on `ud2`.
//! - `schedstat-static-key`: a static branch in new code on a key the
//!   kernel does not export (`sched_schedstats`) follows the key when it is
//!   toggled at run time (jump table carried, key resolved before load).
//! - `proc-version-cpu-has`: `static_cpu_has()` in new code (an
//!   alternative plus its `.altinstr_aux` fallback) answers as the CPU does.
//! - `drop-caches-static-local`: new code uses the kernel's own instance of
//!   a function's static local, so state written by the new version is seen
//!   by the old one after revert; its changed string literal shows in dmesg.

mod common;

use common::*;
use std::path::PathBuf;

#[test]
fn carried_tables_and_static_locals_work_in_the_running_kernel() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let mut packages: Vec<PathBuf> = Vec::new();
    for name in [
        "readdir-hide-entry",
        "proc-version-warn",
        "drop-caches-static-local",
        "schedstat-static-key",
        "proc-version-cpu-has",
    ] {
        let pkg = work.path().join(format!("{name}.dynpkg"));
        let out = build(&keys, &format!("{name}.diff"), &pkg);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        packages.push(pkg);
    }
    let probe = work.path().join("getdents-fault");
    compile_static_probe("getdents_fault.c", &probe);
    packages.push(probe);

    let script = r#"
set -e
cp /packages/getdents-fault /tmp/getdents-fault; chmod +x /tmp/getdents-fault
mkdir /tmp/d; touch /tmp/d/dynamos-hidden /tmp/d/visible

echo "@@ ls before: $(ls /tmp/d | tr '\n' ' ')"
dynamos apply /packages/readdir-hide-entry.dynpkg
echo "@@ ls live: $(ls /tmp/d | tr '\n' ' ')"
/tmp/getdents-fault /tmp/d && echo "@@ fault probe passed"
dynamos revert readdir-hide-entry
echo "@@ ls reverted: $(ls /tmp/d | tr '\n' ' ')"

dynamos apply /packages/proc-version-warn.dynpkg
cat /proc/version >/dev/null
cat /proc/version >/dev/null && echo "@@ version readable after warn"
dynamos revert proc-version-warn

dynamos apply /packages/proc-version-cpu-has.dynpkg
echo "@@ $(grep 'dynamos: avx' /proc/version) cpuinfo $(grep -c ' avx ' /proc/cpuinfo) @@"
dynamos revert proc-version-cpu-has

dynamos apply /packages/schedstat-static-key.dynpkg
echo 0 > /proc/sys/kernel/sched_schedstats
echo "@@ key off: $(grep dynamos /proc/schedstat)"
echo 1 > /proc/sys/kernel/sched_schedstats
echo "@@ key on: $(grep dynamos /proc/schedstat)"
echo 0 > /proc/sys/kernel/sched_schedstats
dynamos revert schedstat-static-key

echo 1 > /proc/sys/vm/drop_caches
dynamos apply /packages/drop-caches-static-local.dynpkg
echo 1 > /proc/sys/vm/drop_caches
echo 4 > /proc/sys/vm/drop_caches
dynamos revert drop-caches-static-local
echo 1 > /proc/sys/vm/drop_caches
echo "@@ dmesg"
dmesg
echo "@@ tainted $(cat /proc/sys/kernel/tainted)"
"#;
    let (text, code) = vm(&keys, &packages, script);
    assert_eq!(code, Some(0), "vm run:\n{text}");

    // Alternatives and exception table of the new filldir64.
    assert!(
        text.contains("@@ ls before: dynamos-hidden visible"),
        "{text}"
    );
    assert!(text.contains("@@ ls live: visible \n"), "{text}");
    assert!(text.contains("@@ fault probe passed"), "{text}");
    assert!(
        text.contains("@@ ls reverted: dynamos-hidden visible"),
        "{text}"
    );

    // static_cpu_has() in new code agrees with the CPU's flags.
    let cpu_has = section(&text, "@@ dynamos: avx ", " @@");
    let (answer, cpus) = cpu_has.split_once(" cpuinfo ").unwrap();
    assert_eq!(answer == "yes", cpus.trim() != "0", "{text}");

    // The static branch follows the kernel's key both ways.
    assert!(
        text.contains("@@ key off: dynamos schedstats off"),
        "{text}"
    );
    assert!(text.contains("@@ key on: dynamos schedstats on"), "{text}");

    let dmesg = section(&text, "@@ dmesg", "@@ tainted");
    for bad in ["Oops", "BUG:", "invalid opcode", "general protection"] {
        assert!(!dmesg.contains(bad), "{bad} in dmesg:\n{dmesg}");
    }

    // The bug table entry of the new version_proc_show: file, line, message.
    assert!(
        dmesg.contains("dynamos: warning from a live-updated function"),
        "{dmesg}"
    );
    assert!(dmesg.contains("at fs/proc/version.c:16"), "{dmesg}");
    assert!(text.contains("@@ version readable after warn"), "{text}");

    // The static local: one message from the old code before the update,
    // two from the new one (1, then 4 which sets the kernel's `stfu`), and
    // none from the old code afterwards because it sees that state.
    assert_eq!(dmesg.matches("drop_caches: 1").count(), 1, "{dmesg}");
    assert_eq!(
        dmesg.matches("drop_caches (live-updated): 1").count(),
        1,
        "{dmesg}"
    );
    assert_eq!(
        dmesg.matches("drop_caches (live-updated): 4").count(),
        1,
        "{dmesg}"
    );

    // Module taints plus the WARN taint (bit 9) the test provoked.
    let taint: u64 = section(&text, "@@ tainted ", "\n").trim().parse().unwrap();
    assert_eq!(
        taint & !(MODULE_TAINTS | (1 << 9)),
        0,
        "unexpected taint {taint:#x}:\n{text}"
    );
}
