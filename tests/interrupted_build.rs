//! A `dynamos-build` killed while it compiles takes its `make` with it,
//! and the shared work tree comes back to the pristine source: after
//! SIGKILL by the next build, after SIGTERM at once.

mod common;

use common::{root, stderr, stdout, Keys};
use dynamos::target::{Target, TargetSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PATCH: &str = "proc-version-banner.diff";
const PATCHED_FILE: &str = "fs/proc/version.c";

/// Longest wait for the compile to start: a build of another process may
/// hold the work tree first, or the trees may still be configured.
const COMPILE_START_LIMIT: Duration = Duration::from_secs(900);

/// The two tests one after the other: a build the SIGKILL test kills leaves
/// its patched file in the work tree until the next build restores it,
/// which the SIGTERM test's check would see.
fn one_at_a_time() -> dynamos::cache::Lock {
    let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interrupted_build.lock");
    dynamos::cache::Lock::acquire(&lock).unwrap()
}

fn target() -> Target {
    Target::resolve(&TargetSpec::default()).expect("default target")
}

fn start_build(keys: &Keys, out: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dynamos-build"))
        .arg(root().join("patches").join(PATCH))
        .arg("-o")
        .arg(out)
        .env("DYNAMOS_CONFIG", keys.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Direct children of `pid`, over all its threads.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn command_line(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Wait until the build runs the compile stage's `make` (the one given
/// `-k` and the objects); returns that make's process id, which is also
/// its process group.
fn wait_for_compile(build: &mut Child) -> u32 {
    let started = Instant::now();
    loop {
        for child in children(build.id()) {
            let args = command_line(child);
            let is_make = args.first().is_some_and(|a| a.ends_with("make"));
            if is_make && args.iter().any(|a| a == "-k") {
                return child;
            }
        }
        if let Some(status) = build.try_wait().unwrap() {
            let out = build.wait_with_output_now();
            panic!("dynamos-build ended ({status}) before compiling:\n{out}");
        }
        assert!(
            started.elapsed() < COMPILE_START_LIMIT,
            "dynamos-build did not start compiling within {COMPILE_START_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

trait OutputNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl OutputNow for Child {
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut out) = self.stdout.take() {
            let _ = out.read_to_string(&mut text);
        }
        if let Some(mut err) = self.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

/// Processes of process group `group`, with their command names.
fn group_members(group: u32) -> Vec<(u32, String)> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("");
        if fields.get(2) == Some(&group.to_string().as_str()) && state != "Z" {
            members.push((pid, stat[open + 1..close].to_string()));
        }
    }
    members
}

/// Whether process group `group` is gone within `limit`.
fn group_gone_within(group: u32, limit: Duration) -> Result<(), Vec<(u32, String)>> {
    let started = Instant::now();
    loop {
        let members = group_members(group);
        if members.is_empty() {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(members);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The patched file in the work tree is the pristine one again, and no
/// journal is left. Builds of other processes share the tree: the check
/// holds the lock they take.
fn assert_work_tree_pristine(target: &Target, pristine: &[u8]) {
    let _lock = dynamos::cache::Lock::acquire(&target.work.join(".build.lock")).unwrap();
    let source = target.source.join(PATCHED_FILE);
    assert_eq!(
        std::fs::read(&source).unwrap(),
        pristine,
        "the pristine source changed"
    );
    let farm: PathBuf = target.work.join("src").join(PATCHED_FILE);
    assert_eq!(
        std::fs::read(&farm).unwrap(),
        pristine,
        "{} is not the pristine file",
        farm.display()
    );
    assert!(
        !target.work.join("src.journal").exists(),
        "a journal of patched files is left"
    );
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: a signal to the child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[test]
fn sigkill_during_the_compile_leaves_no_make_and_the_next_build_restores() {
    let _serial = one_at_a_time();
    let target = target();
    let pristine = std::fs::read(target.source.join(PATCHED_FILE)).unwrap();
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("killed.dynpkg");

    let mut build = start_build(&keys, &out);
    let make = wait_for_compile(&mut build);
    signal(build.id(), libc::SIGKILL);
    build.wait().unwrap();
    // Left alone, kbuild's sub-makes would go on compiling for seconds.
    if let Err(left) = group_gone_within(make, Duration::from_secs(2)) {
        panic!("processes of the killed build's make still run: {left:?}");
    }
    assert!(!out.exists(), "a killed build wrote a package");

    let next = dir.path().join("next.dynpkg");
    let done = common::build(&keys, PATCH, &next);
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}{}",
        stdout(&done),
        stderr(&done)
    );
    assert!(next.is_file());
    assert_work_tree_pristine(&target, &pristine);
}

#[test]
fn sigterm_during_the_compile_exits_promptly_with_the_work_tree_restored() {
    let _serial = one_at_a_time();
    let target = target();
    let pristine = std::fs::read(target.source.join(PATCHED_FILE)).unwrap();
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("terminated.dynpkg");

    let mut build = start_build(&keys, &out);
    let make = wait_for_compile(&mut build);
    let signalled = Instant::now();
    signal(build.id(), libc::SIGTERM);
    let status = build.wait().unwrap();
    let took = signalled.elapsed();
    let text = build.wait_with_output_now();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(took < Duration::from_secs(15), "took {took:?} to exit");
    let message = text.lines().last().unwrap_or("");
    assert!(
        message.starts_with("dynamos-build: interrupted by SIGTERM"),
        "{text}"
    );
    if let Err(left) = group_gone_within(make, Duration::from_secs(5)) {
        panic!("processes of the terminated build's make still run: {left:?}");
    }
    assert!(!out.exists(), "an interrupted build wrote a package");
    assert_work_tree_pristine(&target, &pristine);
}
