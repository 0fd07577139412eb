//! Members a patch adds to a struct live in shadow data (`dynamos::shadow`).
//!
//! `task-newpid-shadow.diff` is the natural form of kpatch's shadow-newpid
//! example: `int newpid;` added to `struct task_struct`, set in
//! `kernel_clone()`, printed in /proc/PID/status. Tasks created after apply
//! show their PID, tasks from before show 0; 10,000 forks later the live
//! shadows are back where they were; revert frees the rest.
//! `binfmt-misc-node-generation.diff` adds a member in the middle of
//! binfmt_misc's `Node`, with the module loaded before and after the package.
//! What cannot be followed is refused by the build, naming type and member.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Seconds one VM run may take, boot and 20,000 forks under TCG included.
const VM_BUDGET: u64 = 300;

fn in_vm(keys: &Keys, modules: &[&str], files: &[&std::path::Path], script: &str) -> String {
    let started = Instant::now();
    let text = vm_with_modules(keys, modules, files, script);
    assert!(
        started.elapsed() < Duration::from_secs(VM_BUDGET),
        "took {:?}",
        started.elapsed()
    );
    text
}

/// The number after `key` on the line starting with `@@ key`.
fn figure(text: &str, key: &str) -> i64 {
    section(text, &format!("@@ {key} "), " @@")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no figure {key} in:\n{text}"))
}

#[test]
fn a_member_added_to_task_struct_lives_in_shadow_data() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("task-newpid-shadow.dynpkg");
    let out = build(&keys, "task-newpid-shadow.diff", &pkg);
    let built = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{built}");
    for line in [
        "replace  kernel_clone (vmlinux, kernel/fork.c)",
        "replace  proc_pid_status (vmlinux, fs/proc/array.c)",
        "replace  free_task (vmlinux, kernel/fork.c)",
        "note: include/linux/sched.h: only gains members; the files including it are not rebuilt",
    ] {
        expect_line(&built, line);
    }
    let shadow = section(&built, "shadow   ", "\n");
    assert!(
        shadow.starts_with("struct task_struct (include/linux/sched.h): int newpid; freed in ")
            && shadow.contains("free_task"),
        "{built}"
    );
    expect_line(
        &built,
        "note: struct task_struct: newpid of objects from before the update reads as zero until written",
    );
    let forker = work.path().join("fork-many");
    compile_static_probe("fork_many.c", &forker);
    let text = in_vm(
        &keys,
        &[],
        &[&pkg, &forker],
        r#"
cp /packages/fork-many /tmp/ && chmod +x /tmp/fork-many
shadows() { dynamos list | sed -n 's/^    shadows of struct task_struct: \([0-9]*\) live.*/\1/p'; }
echo "@@ without $(/tmp/fork-many 10000) @@"
sleep 600 & OLD=$!
dynamos apply --timeout 120 /packages/task-newpid-shadow.dynpkg; echo "@@ apply exit $? @@"
sleep 600 & NEW=$!
echo "@@ old task shows $(awk '/^newpid:/ {print $2}' /proc/$OLD/status) @@"
echo "@@ new pid $NEW @@"
echo "@@ new task shows $(awk '/^newpid:/ {print $2}' /proc/$NEW/status) @@"
echo "@@ before forks $(shadows) @@"
/tmp/fork-many 10000
# Exited tasks are freed after an RCU grace period.
prev=-1; for i in $(seq 30); do c=$(shadows); [ "$c" = "$prev" ] && break; prev=$c; sleep 0.5; done
echo "@@ after forks $(shadows) @@"
dynamos list | grep 'shadows of'
kill $OLD $NEW; wait
dynamos revert task-newpid-shadow; echo "@@ revert exit $? @@"
dmesg | grep 'shadow(s) of struct task_struct'
echo "@@ livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@"
"#,
    );
    expect_line(&text, "@@ apply exit 0 @@");
    expect_line(&text, "@@ old task shows 0 @@");
    let new_pid = figure(&text, "new pid");
    assert_eq!(figure(&text, "new task shows"), new_pid, "{text}");
    let before = figure(&text, "before forks");
    let after = figure(&text, "after forks");
    assert!(before >= 1, "the new task has a shadow: {text}");
    // A few kernel workers may come or go meanwhile; 10,000 leaked shadows would not.
    assert!(
        (after - before).abs() <= 3,
        "before {before}, after {after}:\n{text}"
    );
    expect_line(&text, "forked 10000 in ");
    eprintln!(
        "live task_struct shadows: {before} before 10,000 forks, {after} after; fork, exit and wait of 10,000 children: {} without the update, {} with it",
        section(&text, "@@ without forked 10000 in ", " @@").trim(),
        section(&text, "\nforked 10000 in ", "\n").trim()
    );
    expect_line(&text, "@@ revert exit 0 @@");
    expect_line(&text, "dynamos_task_newpid_shadow: freeing ");
    expect_line(&text, "@@ livepatches 0 modules 0 @@");
}

#[test]
fn a_member_added_in_the_middle_of_a_module_struct_goes_live() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("binfmt-misc-node-generation.dynpkg");
    let out = build(&keys, "binfmt-misc-node-generation.diff", &pkg);
    let built = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{built}");
    expect_line(
        &built,
        "replace  bm_register_write (binfmt_misc, fs/binfmt_misc.c)",
    );
    expect_line(
        &built,
        "shadow   Node (fs/binfmt_misc.c): unsigned long generation; freed in ",
    );
    expect_line(&built, "put_binfmt_handler");
    let text = in_vm(
        &keys,
        &["binfmt_misc"],
        &[&pkg],
        r#"
B=/proc/sys/fs/binfmt_misc
up() { modprobe binfmt_misc && mount -t binfmt_misc none $B; }
down() { umount $B && rmmod binfmt_misc; }
shadows() { dynamos list | sed -n 's/^    shadows of Node: \([0-9]*\) live.*/\1/p'; }
up
echo ':old:E::oldext::/bin/true:' > $B/register
dynamos apply --timeout 60 /packages/binfmt-misc-node-generation.dynpkg; echo "@@ apply exit $? @@"
echo ':new:E::newext::/bin/true:' > $B/register
echo "@@ old entry $(grep generation $B/old) @@"
echo "@@ new entry $(grep generation $B/new) @@"
echo "@@ shadows $(shadows) @@"
echo -1 > $B/new
echo "@@ removed, shadows $(shadows) @@"
down; up
echo ':again:E::againext::/bin/true:' > $B/register
echo "@@ reloaded entry $(grep generation $B/again) @@"
echo "@@ reloaded shadows $(shadows) @@"
down
dynamos revert binfmt-misc-node-generation; echo "@@ revert exit $? @@"
up; echo ':after:E::afterext::/bin/true:' > $B/register
echo "@@ reverted entry $(grep -c generation $B/after) @@"
down
"#,
    );
    expect_line(&text, "@@ apply exit 0 @@");
    expect_line(&text, "@@ old entry generation 0 @@");
    expect_line(&text, "@@ new entry generation 1 @@");
    expect_line(&text, "@@ shadows 1 @@");
    expect_line(&text, "@@ removed, shadows 0 @@");
    expect_line(&text, "@@ reloaded entry generation 2 @@");
    expect_line(&text, "@@ reloaded shadows 1 @@");
    expect_line(&text, "@@ revert exit 0 @@");
    expect_line(&text, "@@ reverted entry 0 @@");
}

/// dynamos-build's exit code and one-line message for `patch`; no package.
fn refused(patch: &str) -> String {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    let out = build(&keys, patch, &pkg);
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(!pkg.exists());
    message
}

#[test]
fn an_added_member_read_in_a_header_is_refused() {
    // An inline of fs/proc/internal.h: unchanged code could call it.
    let message = refused("refused-shadow-header-inline.diff");
    assert!(
        message.contains("struct pde_opener.reads: added member used in fs/proc/internal.h:"),
        "{message}"
    );
}

#[test]
fn an_added_member_without_a_release_point_is_refused() {
    // Only /proc reads the member: no file of the patch frees a task.
    let message = refused("refused-shadow-no-release.diff");
    assert!(
        message.contains("struct task_struct: no release point found")
            && message.contains("DYNAMOS_SHADOW_FREE(object)"),
        "{message}"
    );
}

#[test]
fn a_moved_member_is_still_refused() {
    let message = refused("refused-module-layout.diff");
    assert!(
        message.contains("Node.offset: data type layout changed"),
        "{message}"
    );
}

#[test]
fn a_member_of_a_local_object_is_refused() {
    // The snapshot of refused-shadow-copy.diff, read through its own member.
    let patch = std::fs::read_to_string(root().join("patches/refused-shadow-copy.diff")).unwrap();
    let local = patch.replace("status, e->generation,", "status, snapshot.generation,");
    assert_ne!(local, patch);
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("refused-shadow-local.diff");
    std::fs::write(&path, local).unwrap();
    let message = refused(path.to_str().unwrap());
    assert!(
        message.contains("Node.generation: added member used at fs/binfmt_misc.c:")
            && message.contains("snapshot is a local object: nothing would free its shadow"),
        "{message}"
    );
}

#[test]
fn a_copied_object_with_added_members_is_refused() {
    // A memcpy of a Node would leave the copy without the shadow.
    let message = refused("refused-shadow-copy.diff");
    assert!(
        message.contains("Node: an object with added members is copied (memcpy, memmove or kmemdup) in entry_status at fs/binfmt_misc.c:567"),
        "{message}"
    );
}
