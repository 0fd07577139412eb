//! Synchronized updates (docs/synchronized-updates.md): functions in which
//! tasks sleep are updated through a transitional clone, without waiting
//! for every sleeper to leave and without signalling anyone. The control
//! experiment, today's livepatch switch cutting a write short, is
//! tests/livepatch_signal.rs.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

/// The pipefs example: a writer asleep in the original pipe_write when the
/// update starts finishes there; a writer that entered the clone and sleeps
/// in its original code moves to the new code when asked (its adaptation
/// handler agrees: a bulk write), goes on waiting there and, once woken by
/// its reader, grows its pipe to 1 MiB; nobody gets a short write or a
/// signal.
#[test]
fn sleeping_writers_finish_their_writes_across_the_update() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("pipe-adaptive-ring.dynpkg");
    let out = build(&keys, "pipe-adaptive-ring.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let notes = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        notes.contains("pipe_write of fs/pipe.c: synchronized update; sleepers move between versions at wait_event_interruptible_exclusive()")
            && notes.contains("; pipe_write_is_bulk chooses the calls and sleepers that run the new code"),
        "{notes}"
    );
    let inspected = stdout(&dynamos(&keys.dir, &["inspect", pkg.to_str().unwrap()]));
    assert!(
        inspected.contains("sleep    pipe_write: sleepers move at wait_event_interruptible_exclusive() at line 576 (carries ")
            && inspected.contains("sleep    pipe_write: pipe_write_is_bulk chooses who moves"),
        "{inspected}"
    );
    let writer = work.path().join("pipe-sync-writer");
    compile_static_probe("pipe_sync_writer.c", &writer);

    let script = r#"
cp /packages/pipe-sync-writer /tmp/; chmod +x /tmp/pipe-sync-writer
phase=/sys/module/dynamos_pipe_adaptive_ring/parameters/phase
wait_stack() { i=0; while ! grep -q "$2" /proc/$1/stack 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done; }
/tmp/pipe-sync-writer early /tmp/go-early > /tmp/early.log 2>&1 &
early=$!
wait_stack $early pipe_write
echo "@@ early writer asleep in: $(grep -o 'pipe_write+' /proc/$early/stack | head -1) @@"
dynamos apply --timeout 3 /packages/pipe-adaptive-ring.dynpkg > /tmp/timeout.log 2>&1; echo "@@ timed out exit $?: $(tr '\n' ' ' < /tmp/timeout.log)@@"
echo "@@ after the timeout: modules $(grep -c '^dynamos' /proc/modules), early writer in $(grep -o 'pipe_write+' /proc/$early/stack | head -1) @@"
dynamos apply --timeout 60 /packages/pipe-adaptive-ring.dynpkg > /tmp/apply.log 2>&1 &
apply=$!
i=0; while [ "$(head -1 $phase 2>/dev/null)" != 1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
/tmp/pipe-sync-writer late /tmp/go-late > /tmp/late.log 2>&1 &
late=$!
wait_stack $late __dynamos_sync_
echo "@@ late writer in the clone: $(grep -q '__dynamos_sync_' /proc/$late/stack && echo yes || echo no) @@"
sleep 2
echo "@@ phase while the early writer sleeps: $(head -1 $phase), apply waiting: $(kill -0 $apply 2>/dev/null && echo yes || echo no) @@"
touch /tmp/go-early
wait $early; echo "@@ early exit $?: $(tr '\n' ' ' < /tmp/early.log)@@"
wait $apply; echo "@@ apply exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ late writer asleep in the new code: $(grep -q '__dynamos_sync_' /proc/$late/stack && echo yes || echo no) @@"
tr '\n' ' ' < $phase > /tmp/status; echo "@@ status $(cat /tmp/status)@@"
touch /tmp/go-late
wait $late; echo "@@ late exit $?: $(tr '\n' ' ' < /tmp/late.log)@@"
dynamos list > /tmp/list.log 2>&1; echo "@@ list: $(grep synchronized /tmp/list.log) @@"
(sleep 2; touch /tmp/go-after) &
/tmp/pipe-sync-writer after /tmp/go-after > /tmp/after.log 2>&1; echo "@@ after exit $?: $(tr '\n' ' ' < /tmp/after.log)@@"
dynamos revert --all > /tmp/revert.log 2>&1; echo "@@ reverted exit $?: $(tr '\n' ' ' < /tmp/revert.log)@@"
(sleep 2; touch /tmp/go-reverted) &
/tmp/pipe-sync-writer reverted /tmp/go-reverted > /tmp/reverted.log 2>&1; echo "@@ reverted writer exit $?: $(tr '\n' ' ' < /tmp/reverted.log)@@"
echo "@@ signalled $(dmesg | grep -c 'signaling remaining tasks') modules $(grep -c '^dynamos' /proc/modules) @@"
"#;
    let text = vm_with_modules(&keys, &[], &[&pkg, &writer], script);
    expect_line(&text, "@@ early writer asleep in: pipe_write+ @@");
    // Phase 1 timed out with nobody in the clone: withdrawn, as before.
    let timed_out = section(&text, "@@ timed out exit 1: ", "@@");
    assert!(
        timed_out
            .contains("the original pipe_write did not become inactive within 3s; tasks in it: ")
            && timed_out.contains("(pipe-sync-write) in pipe_write+"),
        "{text}"
    );
    expect_line(
        &text,
        "@@ after the timeout: modules 0, early writer in pipe_write+ @@",
    );
    expect_line(&text, "@@ late writer in the clone: yes @@");
    // Phase 1 holds while a task sleeps in the original, without signalling it.
    expect_line(
        &text,
        "@@ phase while the early writer sleeps: 1, apply waiting: yes @@",
    );
    // The early writer finished in the original code: the ring never grew.
    let early = section(&text, "@@ early exit 0: early: wrote ", "@@");
    assert!(
        early.starts_with(&format!("{MIB} bytes")) && early.contains("pipe size 65536"),
        "{text}"
    );
    assert!(
        early.contains("early: reader read 1048576 bytes, checksum ok"),
        "{text}"
    );
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains("1 sleeping task(s) moved to the new code"),
        "{text}"
    );
    // The late writer moved to the new code and went on waiting there for
    // room; woken by its reader, it grew the pipe in the new code.
    expect_line(&text, "@@ late writer asleep in the new code: yes @@");
    let late = section(&text, "@@ late exit 0: late: wrote ", "@@");
    assert!(
        late.starts_with(&format!("{MIB} bytes")) && late.contains(&format!("pipe size {MIB}")),
        "{text}"
    );
    assert!(
        late.contains("late: reader read 1048576 bytes, checksum ok"),
        "{text}"
    );
    let status = section(&text, "@@ status ", "@@");
    assert!(status.starts_with("3 pipe_write 0 1 1 0"), "{text}");
    let list = section(&text, "@@ list: ", " @@");
    assert!(list.contains("phase 3: complete"), "{text}");
    // New calls start in the new code.
    let after = section(&text, "@@ after exit 0: after: wrote ", "@@");
    assert!(after.contains(&format!("pipe size {MIB}")), "{text}");
    assert!(text.contains("@@ reverted exit 0: "), "{text}");
    let reverted = section(&text, "@@ reverted writer exit 0: reverted: wrote ", "@@");
    assert!(reverted.contains("pipe size 65536"), "{text}");
    expect_line(&text, "@@ signalled 0 modules 0 @@");
}

/// A reader asleep in pipe_read through the whole update: it moves from the
/// clone's original code to the new code without a signal and goes on
/// sleeping there; a revert that cannot move it out of the clone in time
/// leaves the update applied; once it has read, the revert succeeds. The
/// update replaces pipe_read and pipe_write (`pipe-read-write-synchronized`).
#[test]
fn a_reader_sleeps_through_the_update_without_a_signal() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("pipe-read-write-synchronized.dynpkg");
    let out = build(&keys, "pipe-read-write-synchronized.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let notes = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        notes.contains("pipe_read of fs/pipe.c: synchronized update"),
        "{notes}"
    );
    assert!(
        notes.contains("pipe_write of fs/pipe.c: synchronized update"),
        "{notes}"
    );

    let script = r#"
phase=/sys/module/dynamos_pipe_read_write_synchronized/parameters/phase
mkfifo /tmp/fifo
dd if=/tmp/fifo of=/tmp/got bs=1 count=2 2>/dev/null &
reader=$!
exec 3>/tmp/fifo
i=0; while ! grep -q pipe_read /proc/$reader/stack 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "@@ reader asleep in: $(grep -o 'pipe_read+' /proc/$reader/stack | head -1) @@"
dynamos apply --timeout 60 /packages/pipe-read-write-synchronized.dynpkg > /tmp/apply.log 2>&1 &
apply=$!
i=0; while [ "$(head -1 $phase 2>/dev/null)" != 1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
sleep 1
printf a >&3
wait $apply; echo "@@ apply exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ reader still asleep in the clone: $(grep -q __dynamos_sync_ /proc/$reader/stack && echo yes || echo no) @@"
tr '\n' ' ' < $phase > /tmp/status; echo "@@ status $(cat /tmp/status)@@"
dynamos revert --timeout 3 --all > /tmp/revert.log 2>&1; echo "@@ revert while asleep exit $?: $(tr '\n' ' ' < /tmp/revert.log)@@"
echo "@@ after the failed revert: $(head -1 $phase), reader alive: $(kill -0 $reader 2>/dev/null && echo yes || echo no) @@"
printf b >&3
wait $reader; echo "@@ reader exit $?: read $(cat /tmp/got) @@"
exec 3>&-
dynamos revert --all > /tmp/revert.log 2>&1; echo "@@ reverted exit $?: $(tr '\n' ' ' < /tmp/revert.log)@@"
echo "@@ signalled $(dmesg | grep -c 'signaling remaining tasks') modules $(grep -c '^dynamos' /proc/modules) @@"
"#;
    let text = vm_with_modules(&keys, &[], &[&pkg], script);
    expect_line(&text, "@@ reader asleep in: pipe_read+ @@");
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains("sleeping task(s) moved to the new code"),
        "{text}"
    );
    expect_line(&text, "@@ reader still asleep in the clone: yes @@");
    // pipe_read: the reader asleep in the new body, moved there once.
    let status = section(&text, "@@ status ", "@@");
    let read_line = status
        .split("pipe_read ")
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    let counts: Vec<u32> = read_line
        .split_whitespace()
        .take(4)
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(&counts[..3], &[0, 1, 1], "{text}");
    assert!(status.starts_with("3 "), "{text}");
    let failed = section(&text, "@@ revert while asleep exit 1: ", "@@");
    assert!(
        failed.contains("tasks still sleep in the transitional clone of pipe_read, pipe_write")
            && failed.contains("(dd) in __dynamos_sync_bodies_pipe_read")
            && failed.contains("the update stays applied"),
        "{text}"
    );
    expect_line(&text, "@@ after the failed revert: 3, reader alive: yes @@");
    expect_line(&text, "@@ reader exit 0: read ab @@");
    assert!(text.contains("@@ reverted exit 0: "), "{text}");
    expect_line(&text, "@@ signalled 0 modules 0 @@");
}

/// What a transitional clone cannot carry is refused before anything
/// compiles, naming the function and the sleep point.
#[test]
fn unclonable_sleep_points_are_refused() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    for (patch, reason) in [
        (
            "refused-synchronized-schedule.diff",
            "refused: watchdog: sleeps in schedule_timeout_interruptible() at line 383, which has no wait condition a transitional clone can extend",
        ),
        (
            "refused-synchronized-changed-sleep.diff",
            "refused: pipe_write: its sleep point wait_event_interruptible_exclusive() at line 576 changes in the patched code (line 591)",
        ),
    ] {
        let pkg = work.path().join("refused.dynpkg");
        let out = build(&keys, patch, &pkg);
        assert_eq!(out.status.code(), Some(2), "{patch}: {}", stderr(&out));
        assert!(stderr(&out).contains(reason), "{patch}: {}", stderr(&out));
        assert!(!pkg.exists(), "{patch}");
    }
}
