//! Kernel threads whose main function a patch changes: `dynamos-build`
//! finds them from the original object's relocations and says so, and
//! `dynamos apply` refuses the update at once, naming the running threads,
//! instead of waiting for a livepatch transition that could never finish.

mod common;

use common::*;
use dynamos::diff::ObjectFile;
use dynamos::generate::kthreads::thread_function;
use dynamos::package::ThreadFunction;
use std::process::Command;

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
"#;

#[test]
fn thread_functions_are_found_from_the_original_object() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("threads.c"), THREADS_C).unwrap();
    let status = Command::new("cc")
        .args(KERNEL_LIKE_FLAGS)
        .arg("threads.c")
        .current_dir(dir.path())
        .args(["-o", "threads.o"])
        .status()
        .expect("cc runs");
    assert!(status.success());
    let object = ObjectFile::read(&dir.path().join("threads.o")).unwrap();
    assert_eq!(
        thread_function(&object, "loop"),
        Some(ThreadFunction {
            started_by: vec!["start_loop".into()],
            per_cpu: false,
            stopped_by_kthread_stop: true,
        })
    );
    assert_eq!(
        thread_function(&object, "per_cpu_loop"),
        Some(ThreadFunction {
            started_by: vec!["start_per_cpu".into()],
            per_cpu: true,
            stopped_by_kthread_stop: true,
        })
    );
    // Called, or its neighbour's address taken: not a thread function.
    assert_eq!(thread_function(&object, "helper"), None);
    assert_eq!(thread_function(&object, "start_loop"), None);
}

#[test]
fn thread_main_functions_are_found_and_refused_before_loading() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let khungtaskd = work.path().join("khungtaskd.dynpkg");
    let smpboot = work.path().join("smpboot.dynpkg");
    for (patch, out, note) in [
        (
            "khungtaskd-loop.diff",
            &khungtaskd,
            "note: watchdog is the main function of kernel threads started by hung_task_init",
        ),
        (
            "refused-smpboot-thread.diff",
            &smpboot,
            "note: smpboot_thread_fn is the main function of kernel threads started by __smpboot_create_thread",
        ),
    ] {
        let built = build(&keys, patch, out);
        assert!(built.status.success(), "{patch}: {}", stderr(&built));
        assert!(stdout(&built).contains(note), "{patch}: {}", stdout(&built));
    }
    let inspected = dynamos(&keys.dir, &["inspect", khungtaskd.to_str().unwrap()]);
    assert!(
        stdout(&inspected).contains(
            "thread   watchdog is the main function of kernel threads started by hung_task_init"
        ),
        "{}",
        stdout(&inspected)
    );

    let script = r#"
pid_of() { for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = "$1" ] && echo ${d#/proc/}; done; }
before=$(pid_of khungtaskd)
echo "@@ khungtaskd $before @@"
start=$(date +%s)
dynamos apply /packages/khungtaskd.dynpkg 2>/tmp/khungtaskd.err; echo "@@ khungtaskd exit $? @@"
echo "@@ khungtaskd took $(( $(date +%s) - start )) s @@"
echo "@@ khungtaskd-err $(cat /tmp/khungtaskd.err) @@"
dynamos apply /packages/smpboot.dynpkg 2>/tmp/smpboot.err; echo "@@ smpboot exit $? @@"
echo "@@ smpboot-err $(cat /tmp/smpboot.err) @@"
echo "@@ livepatches [$(ls /sys/kernel/livepatch)] @@"
echo "@@ list"; dynamos list; echo "@@ end-list"
echo "@@ khungtaskd after $(pid_of khungtaskd) @@"
"#;
    let text = vm_with_modules(&keys, &[], &[&khungtaskd, &smpboot], script);
    eprintln!("{}", section(&text, "@@ khungtaskd ", "@@ livepatches"));
    let pid = section(&text, "@@ khungtaskd ", " @@").trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "no khungtaskd in:\n{text}");
    expect_line(&text, "@@ khungtaskd exit 2 @@");
    let took: u64 = section(&text, "@@ khungtaskd took ", " s @@")
        .trim()
        .parse()
        .unwrap();
    assert!(took <= 10, "the refusal took {took} s");
    let err = section(&text, "@@ khungtaskd-err ", " @@");
    assert!(
        err.contains(&format!(
            "watchdog: is the main function of the running kernel thread khungtaskd (pid {pid}), \
             which never returns from it, so the update could never finish; \
             restarting kernel threads is not supported"
        )),
        "{err}"
    );
    expect_line(&text, "@@ smpboot exit 2 @@");
    let err = section(&text, "@@ smpboot-err ", " @@");
    assert!(
        err.contains("smpboot_thread_fn: is the main function of the running kernel threads ")
            && err.contains("ksoftirqd/0 (pid ")
            && err.contains("they are per-CPU threads, parked and stopped by CPU hotplug"),
        "{err}"
    );
    // Nothing was loaded, and khungtaskd runs on as it was.
    expect_line(&text, "@@ livepatches [] @@");
    let listed = section(&text, "@@ list", "@@ end-list");
    assert!(
        !listed.contains("khungtaskd") && !listed.contains("smpboot"),
        "{listed}"
    );
    expect_line(&text, &format!("@@ khungtaskd after {pid} @@"));
}
