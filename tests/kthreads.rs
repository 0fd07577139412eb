//! Kernel threads whose main function a patch changes: `dynamos-build`
//! finds them from the original object's relocations and says so, and
//! `dynamos apply` refuses the update at once, naming the running threads,
//! instead of waiting for a livepatch transition that could never finish.

mod common;

use common::*;
use dynamos::diff::frame_locals::locals_at_calls;
use dynamos::diff::ObjectFile;
use dynamos::generate::kthreads::{restartable, thread_function};
use dynamos::package::{LocalLocation, ThreadFunction};
use std::process::Command;

/// `source` compiled as kernel code is.
fn kernel_like_object(source: &str) -> ObjectFile {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("unit.c"), source).unwrap();
    let status = Command::new("cc")
        .args(KERNEL_LIKE_FLAGS)
        .arg("unit.c")
        .current_dir(dir.path())
        .args(["-o", "unit.o"])
        .status()
        .expect("cc runs");
    assert!(status.success());
    ObjectFile::read(&dir.path().join("unit.o")).unwrap()
}

/// Threads started the ways kernel code starts them, compiled with
/// kernel-like flags: the detection reads only the object's relocations.
const THREADS_C: &str = r#"
struct task_struct;
struct task_struct *kthread_create_on_node(int (*fn)(void *), void *data, int node, const char *fmt, ...);
struct task_struct *kthread_create_on_cpu(int (*fn)(void *), void *data, unsigned int cpu, const char *fmt);
int wake_up_process(struct task_struct *t);
int kthread_stop(struct task_struct *t);
long schedule_timeout_interruptible(long timeout);
int should_stop(void);

static struct task_struct *loop_task;
static int loop(void *data) { for (;;) schedule_timeout_interruptible(100); return 0; }
static int per_cpu_loop(void *data) { while (!should_stop()) schedule_timeout_interruptible(1); return 0; }
static int helper(void *data) { return data != 0; }

int start_loop(void)
{
        loop_task = kthread_create_on_node(loop, 0, -1, "loop");
        return wake_up_process(loop_task);
}
int start_per_cpu(unsigned int cpu) { return kthread_create_on_cpu(per_cpu_loop, 0, cpu, "pc/%u") != 0; }
int stop_loop(void) { return kthread_stop(loop_task); }
int call_helper(void) { return helper(&loop_task); }
struct holder { struct task_struct *task; };
static int held(void *data) { for (;;) schedule_timeout_interruptible(10); return 0; }
int start_held(struct holder *h) { h->task = kthread_create_on_node(held, h, -1, "held"); return h->task != 0; }
int stop_held(struct holder *h) { return kthread_stop(h->task); }
/* A starter that hands another function to another call (a /proc show
   function next to its kthread_run()): that one is no thread function. */
int register_show(const char *name, int mode, void *parent, int (*show)(void *));
static int show(void *m) { return m != 0; }
int start_with_show(void)
{
        register_show("x", 0444, 0, show);
        loop_task = kthread_create_on_node(per_cpu_loop, 0, -1, "other");
        return wake_up_process(loop_task);
}
"#;

#[test]
fn thread_functions_are_found_from_the_original_object() {
    let object = kernel_like_object(THREADS_C);
    assert_eq!(
        thread_function(&object, "loop"),
        Some(ThreadFunction {
            started_by: vec!["start_loop".into()],
            per_cpu: false,
            stopped_by_kthread_stop: true,
            // stop_loop reads loop_task, but stop_held stops some other thread.
            stopped_through_task_pointers: false,
            task_escapes: false,
            stop_hazard: None,
        })
    );
    assert_eq!(
        thread_function(&object, "per_cpu_loop"),
        Some(ThreadFunction {
            started_by: vec!["start_per_cpu".into(), "start_with_show".into()],
            per_cpu: true,
            stopped_by_kthread_stop: true,
            stopped_through_task_pointers: false,
            task_escapes: false,
            stop_hazard: None,
        })
    );
    // Kept in, and stopped through, a structure's field.
    assert_eq!(
        thread_function(&object, "held"),
        Some(ThreadFunction {
            started_by: vec!["start_held".into()],
            per_cpu: false,
            stopped_by_kthread_stop: true,
            stopped_through_task_pointers: false,
            // Kept in h->task, which a restart cannot find to switch.
            task_escapes: true,
            stop_hazard: None,
        })
    );
    // Called, or its neighbour's address taken: not a thread function.
    assert_eq!(thread_function(&object, "helper"), None);
    assert_eq!(thread_function(&object, "show"), None);
    assert_eq!(thread_function(&object, "start_loop"), None);
}

/// A counter thread's locals at its calls, from the debug info of a real
/// compile: `count` lives across the sleep call, so it is in a callee-saved
/// register or a stack slot there; `limit` is a constant.
#[test]
fn a_thread_functions_locals_are_located_at_its_calls() {
    const COUNTER_C: &str = r#"
long schedule_timeout_interruptible(long timeout);
int should_stop(void);
void report(unsigned long count, int limit);
int counter(void *data)
{
        unsigned long count = 0;
        int limit = 7;
        while (!should_stop()) {
                count++;
                report(count, limit);
                schedule_timeout_interruptible(50);
        }
        return 0;
}
struct task_struct;
struct task_struct *kthread_create_on_node(int (*fn)(void *), void *data, int node, const char *fmt, ...);
int kthread_stop(struct task_struct *t);
static struct task_struct *counter_task;
int start(void) { counter_task = kthread_create_on_node(counter, 0, -1, "counter"); return counter_task != 0; }
void stop(void) { kthread_stop(counter_task); }
"#;
    let object = kernel_like_object(COUNTER_C);
    // Stopped only through counter_task, which a restart points at the new thread.
    let thread = thread_function(&object, "counter").unwrap();
    assert!(thread.stopped_through_task_pointers, "{thread:?}");
    assert!(restartable(&thread));
    let locals = [
        "count".to_string(),
        "limit".to_string(),
        "missing".to_string(),
    ];
    let sites = locals_at_calls(&object, "counter", &locals).unwrap();
    // __fentry__, should_stop, report, schedule_timeout_interruptible.
    assert!(sites.len() >= 3, "{sites:?}");
    let sleep = sites.last().unwrap();
    let count = sleep.locations[0].expect("count is located at the sleep call");
    assert!(
        matches!(
            count,
            LocalLocation::Register {
                register: 3 | 6 | 12..=15,
                size: 8
            } | LocalLocation::Memory { size: 8, .. }
        ),
        "{count:?}"
    );
    assert_eq!(
        sleep.locations[1],
        Some(LocalLocation::Constant { value: 7, size: 4 })
    );
    assert_eq!(sleep.locations[2], None);
}

/// khungtaskd, whose loop `watchdog()` never returns, is restarted into
/// the new loop: a new thread under the same name, which the sysctl handler
/// wakes through the file's `watchdog_task` and which still reports a task
/// blocked in D state; revert restarts the original loop the same way.
#[test]
fn khungtaskd_is_restarted_into_its_new_loop_and_back() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let khungtaskd = work.path().join("khungtaskd.dynpkg");
    let built = build(&keys, "khungtaskd-loop.diff", &khungtaskd);
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        stdout(&built).contains(
            "note: watchdog is the main function of kernel threads started by hung_task_init: \
             `dynamos apply` restarts them into the new version at their sleep point and points watchdog_task at the new thread"
        ),
        "{}",
        stdout(&built)
    );
    // hung_last_checked is in rbx at the call khungtaskd sleeps in.
    assert!(
        stdout(&built).contains(
            "note: watchdog of kernel/hung_task.c: a restarted thread runs the new version from its start and, \
             at line 367 before its loop, carries hung_last_checked from where the old thread sleeps (schedule_timeout_interruptible)"
        ),
        "{}",
        stdout(&built)
    );
    let inspected = dynamos(&keys.dir, &["inspect", khungtaskd.to_str().unwrap()]);
    assert!(
        stdout(&inspected).contains(
            "thread   watchdog is the main function of kernel threads started by hung_task_init\n\
             restart  watchdog: its threads restart into the new version, carrying hung_last_checked"
        ),
        "{}",
        stdout(&inspected)
    );
    let d_state = work.path().join("d-state");
    compile_static_probe("d_state.c", &d_state);

    let script = r#"
cp /packages/d-state /tmp/; chmod +x /tmp/d-state
pid_of() { for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = "$1" ] && echo ${d#/proc/}; done; }
before=$(pid_of khungtaskd)
echo "@@ khungtaskd $before nice $(cut -d' ' -f19 /proc/$before/stat) @@"
start=$(date +%s); applying=$(cut -d' ' -f1 /proc/uptime)
dynamos apply /packages/khungtaskd.dynpkg > /tmp/apply.log 2>&1; applied=$?; took=$(( $(date +%s) - start ))
echo 10 > /proc/sys/kernel/hung_task_timeout_secs
while ! dmesg | grep -q 'live-updated loop checks (timeout 10s)' && [ $(( $(date +%s) - start )) -lt 30 ]; do sleep 0.1; done
echo "@@ check timing: apply started at $applying s, new loop checked at $(cut -d' ' -f1 /proc/uptime) s @@"
echo "@@ apply exit $applied: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ apply took $took s @@"
after=$(pid_of khungtaskd)
echo "@@ khungtaskd now $after nice $(cut -d' ' -f19 /proc/$after/stat) runs $(grep -o 'watchdog+[^ ]* \[dynamos_khungtaskd_loop\]' /proc/$after/stack | cut -d+ -f1) @@"
echo "@@ old alive: $([ -d /proc/$before ] && echo yes || echo no) @@"
echo "@@ list: $(dynamos list | grep thread) @@"
/tmp/d-state > /tmp/d-state.log 2>&1 &
i=0; while ! dmesg | grep -q 'INFO: task d-state:.* blocked for more than 10 seconds' && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "@@ blocked task reported: $(dmesg | grep -c 'INFO: task d-state:.* blocked for more than 10 seconds') @@"
kill -9 $(sed -n 's/d-state: child \([0-9]*\),.*/\1/p' /tmp/d-state.log); wait
dmesg -c > /dev/null
dynamos revert --all > /tmp/revert.log 2>&1; echo "@@ revert exit $?: $(tr '\n' ' ' < /tmp/revert.log)@@"
reverted=$(pid_of khungtaskd)
echo "@@ khungtaskd reverted $reverted runs $(grep -c 'watchdog+.*dynamos' /proc/$reverted/stack) module frames @@"
echo 4 > /proc/sys/kernel/hung_task_timeout_secs; sleep 6
echo "@@ new loop messages after revert: $(dmesg | grep -c 'live-updated loop') modules $(grep -c '^dynamos' /proc/modules) @@"
echo 0 > /proc/sys/kernel/hung_task_timeout_secs
"#;
    let text = vm_with_modules(&keys, &[], &[&khungtaskd, &d_state], script);
    let first = section(&text, "@@ khungtaskd ", " nice");
    let before: u32 = first.trim().parse().unwrap_or_else(|_| panic!("{text}"));
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains(&format!("restarted khungtaskd (pid {before}) as pid ")),
        "{text}"
    );
    assert!(
        apply.contains(", running the new watchdog, carrying hung_last_checked"),
        "{text}"
    );
    let took: u64 = section(&text, "@@ apply took ", " s @@")
        .trim()
        .parse()
        .unwrap();
    assert!(took <= 10, "apply took {took} s:\n{text}");
    let now = section(&text, "@@ khungtaskd now ", "@@");
    let after: u32 = now.split(' ').next().unwrap().parse().unwrap();
    assert_ne!(after, before, "{text}");
    assert!(now.ends_with("runs watchdog "), "{text}");
    assert_eq!(
        section(&text, &format!("@@ khungtaskd {before} nice "), " @@"),
        section(&text, "@@ khungtaskd now ", " runs")
            .split(" nice ")
            .nth(1)
            .unwrap(),
        "nice value not carried:\n{text}"
    );
    expect_line(&text, "@@ old alive: no @@");
    let list = section(&text, "@@ list: ", " @@");
    assert!(
        list.contains(&format!(
            "thread khungtaskd: restarted into the new watchdog, pid {after} (was {before}), carrying hung_last_checked"
        )),
        "{text}"
    );
    let timing = section(&text, "@@ check timing: apply started at ", " s @@");
    let (applying, checked) = timing
        .split_once(" s, new loop checked at ")
        .unwrap_or_else(|| panic!("{text}"));
    let (applying, checked): (f64, f64) = (applying.parse().unwrap(), checked.parse().unwrap());
    eprintln!(
        "the new khungtaskd checked {:.1} s after the apply started",
        checked - applying
    );
    // A thread started afresh sets hung_last_checked when it starts, during
    // the apply, and checks 10 s later. Carried over from the old thread (its
    // last check was at boot) it checks as soon as the sysctl write wakes it.
    assert!(
        checked - applying < 9.5,
        "the new thread did not check before a fresh thread would (hung_last_checked not carried, or the sysctl write missed):\n{text}"
    );
    expect_line(&text, "@@ blocked task reported: 1 @@");
    assert!(text.contains("@@ revert exit 0: "), "{text}");
    assert!(
        section(&text, "@@ khungtaskd reverted ", " runs").trim() != after.to_string(),
        "{text}"
    );
    assert!(text.contains(" runs 0 module frames @@"), "{text}");
    expect_line(&text, "@@ new loop messages after revert: 0 modules 0 @@");
}

/// Per-CPU threads (smpboot) are refused at once, naming them.
#[test]
fn per_cpu_thread_functions_are_refused_before_loading() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let smpboot = work.path().join("smpboot.dynpkg");
    let built = build(&keys, "refused-smpboot-thread.diff", &smpboot);
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        stdout(&built).contains(
            "note: smpboot_thread_fn is the main function of kernel threads started by __smpboot_create_thread"
        ),
        "{}",
        stdout(&built)
    );
    let script = r#"
start=$(date +%s)
dynamos apply /packages/smpboot.dynpkg 2>/tmp/smpboot.err; echo "@@ smpboot exit $? @@"
echo "@@ smpboot took $(( $(date +%s) - start )) s @@"
echo "@@ smpboot-err $(cat /tmp/smpboot.err) @@"
echo "@@ livepatches [$(ls /sys/kernel/livepatch)] @@"
"#;
    let text = vm_with_modules(&keys, &[], &[&smpboot], script);
    expect_line(&text, "@@ smpboot exit 2 @@");
    let took: u64 = section(&text, "@@ smpboot took ", " s @@")
        .trim()
        .parse()
        .unwrap();
    assert!(took <= 10, "the refusal took {took} s");
    let err = section(&text, "@@ smpboot-err ", " @@");
    assert!(
        err.contains("smpboot_thread_fn: is the main function of the running kernel threads ")
            && err.contains("ksoftirqd/0 (pid ")
            && err.contains("they are per-CPU threads, parked and stopped by CPU hotplug"),
        "{err}"
    );
    expect_line(&text, "@@ livepatches [] @@");
}
