//! The per-task consistency model, seen from `dynamos apply`: an update of
//! the function a task sleeps in (killable, so the livepatch core's fake
//! signal does not move it) cannot finish its transition. Apply times out,
//! names the task and the function, and leaves the kernel as it was; once
//! the task wakes, the same update goes through, and the next call runs the
//! new code.

mod common;

use common::*;

#[test]
fn a_task_sleeping_in_the_replaced_function_holds_the_transition() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("fork-vfork-wait.dynpkg");
    let out = build(&keys, "fork-vfork-wait.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let replaced = stdout(&out);
    assert!(replaced.contains("replace  kernel_clone"), "{replaced}");
    let sleeper = work.path().join("vfork-sleeper");
    compile_static_probe("vfork_sleeper.c", &sleeper);

    let script = r#"
cp /packages/vfork-sleeper /tmp/; chmod +x /tmp/vfork-sleeper
left() {
  echo "@@ $1 exit $2 livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c '^dynamos' /proc/modules) records $(ls /run/dynamos/applied 2>/dev/null | wc -l) @@"
}
mkfifo /tmp/fifo
/tmp/vfork-sleeper /tmp/fifo > /tmp/sleeper.log &
sleeper=$!
sleep 2
dynamos apply --timeout 6 /packages/fork-vfork-wait.dynpkg 2>/tmp/err; rc=$?
left blocked $rc
echo "@@ blocked says: $(cat /tmp/err) @@"
echo "@@ sleeper $(grep State /proc/$sleeper/status | tr -s ' \t' ' ') @@"

(sleep 5; echo x > /tmp/fifo) &
dynamos apply --timeout 60 /packages/fork-vfork-wait.dynpkg; rc=$?
left woken $rc
wait $sleeper; echo "@@ sleeper exit $? $(tail -1 /tmp/sleeper.log) @@"

# The next vfork wait runs the new code.
/tmp/vfork-sleeper /tmp/fifo > /dev/null & next=$!
sleep 1; echo y > /tmp/fifo; wait $next
echo "@@ new code ran $(dmesg | grep -c 'first vfork wait ended in live-updated code') @@"
dynamos revert --all > /dev/null; left reverted $?
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let (text, code) = vm(&keys, &[pkg, sleeper], script);
    assert_eq!(code, Some(0), "{text}");
    let expect = |line: &str| assert!(text.contains(line), "missing `{line}` in:\n{text}");
    // Timed out: nothing left behind, the sleeper named with its frame.
    expect("@@ blocked exit 1 livepatches 0 modules 0 records 0 @@");
    let says = section(&text, "@@ blocked says: ", " @@");
    assert!(says.contains("did not finish within 6s"), "{says}");
    assert!(says.contains("(vfork-sleeper) in kernel_clone+"), "{says}");
    assert!(says.contains("reverted and unloaded"), "{says}");
    assert_eq!(says.lines().count(), 1, "{says}");
    expect("@@ sleeper State: D (disk sleep) @@");
    // Once the sleeper left kernel_clone the same update went through.
    expect("@@ woken exit 0 livepatches 1 modules 1 records 1 @@");
    expect("@@ sleeper exit 0 vfork-sleeper: woke @@");
    expect("@@ new code ran 1 @@");
    expect("@@ reverted exit 0 livepatches 0 modules 0 records 0 @@");
}
