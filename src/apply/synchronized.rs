//! Synchronized functions on the running kernel: the phases of
//! docs/synchronized-updates.md, driven through the update module's
//! `phase` and `wake` parameters, with the tasks that hold each phase
//! found on their kernel stacks.

use super::stack::Frame;
use super::{read_trimmed, SystemPaths};
use crate::package::Manifest;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs;
use std::time::{Duration, Instant};

/// How often a phase's condition is checked, and sleepers woken again.
const POLL: Duration = Duration::from_millis(100);
/// How long a timed-out phase 1 waits for the clone to empty before it
/// completes the update instead of withdrawing it.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(2);
/// Scans in a row that must find no task in the original function: a task
/// running on another CPU shows the stack of its last switch.
const CLEAN_SCANS: usize = 3;

/// One synchronized function's counters, as the module reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionStatus {
    pub name: String,
    /// Tasks in the clone's original and patched bodies.
    pub in_original: u32,
    pub in_patched: u32,
    /// Tasks that left the original (patched) body at a sleep point.
    pub moved_to_patched: u32,
    pub moved_to_original: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub phase: u8,
    pub functions: Vec<FunctionStatus>,
}

impl Status {
    pub fn describe_phase(&self) -> &'static str {
        match self.phase {
            0 => "not redirected",
            1 => "phase 1: calls run the original code in the clone",
            2 => "phase 2: sleepers move to the new code",
            3 if self.functions.iter().all(|f| f.in_original == 0) => {
                "phase 3: complete, calls run the new code"
            }
            3 => "phase 3: calls run the new code, tasks remain in the original",
            4 => "reverting: sleepers move to the original code",
            _ => "reverting: calls run the original code",
        }
    }
}

/// What the phases of one apply took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Waiting for the original functions to become inactive.
    pub original_inactive: Duration,
    /// Moving the sleepers and waiting for the clone's original body to empty.
    pub moved: Duration,
    /// Tasks that continued in the new code from a sleep point.
    pub tasks_moved: u32,
    /// Tasks still in the original function when apply stopped waiting:
    /// they finish their call in the old code.
    pub left_in_original: Vec<String>,
    /// Tasks still in the clone's original code, not at a sleep point, when
    /// apply stopped waiting: likewise.
    pub left_in_old_code: Vec<String>,
}

fn phase_path(paths: &SystemPaths, module: &str) -> std::path::PathBuf {
    paths
        .sys_module
        .join(module)
        .join("parameters")
        .join("phase")
}

/// The module's phase and counters; None for a module without
/// synchronized functions.
pub fn status(paths: &SystemPaths, module: &str) -> Option<Status> {
    let text = fs::read_to_string(phase_path(paths, module)).ok()?;
    let mut lines = text.lines();
    let phase = lines.next()?.trim().parse().ok()?;
    let functions = lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok());
            Some(FunctionStatus {
                name: f.first()?.to_string(),
                in_original: n(1)?,
                in_patched: n(2)?,
                moved_to_patched: n(3)?,
                moved_to_original: n(4)?,
            })
        })
        .collect();
    Some(Status { phase, functions })
}

fn set_phase(paths: &SystemPaths, module: &str, phase: u8) -> std::io::Result<()> {
    fs::write(phase_path(paths, module), phase.to_string())
}

/// A task of the running system: `pid/tid (comm)`.
fn task_name(pid: &str, tid: &str, comm: &str) -> String {
    format!("{pid}/{tid} ({comm})")
}

/// Tasks with a frame `accept` takes on their kernel stack, as
/// (thread id, description with the frame).
fn tasks_with_frame(paths: &SystemPaths, accept: impl Fn(&Frame) -> bool) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for task in super::each_task(&paths.proc) {
        let Ok(stack) = fs::read_to_string(task.dir.join("stack")) else {
            continue;
        };
        if let Some(frame) = stack.lines().filter_map(Frame::parse).find(|f| accept(f)) {
            let comm = read_trimmed(&task.dir.join("comm")).unwrap_or_default();
            if let Ok(id) = task.tid.parse() {
                out.push((
                    id,
                    format!(
                        "{} in {}",
                        task_name(&task.pid, &task.tid, &comm),
                        frame.text
                    ),
                ));
            }
        }
    }
    out
}

/// Names of the package's synchronized functions.
pub fn functions(manifest: &Manifest) -> Vec<String> {
    manifest
        .objects
        .iter()
        .flat_map(|o| &o.replaced)
        .filter(|f| f.synchronized.is_some())
        .map(|f| f.name.clone())
        .collect()
}

/// Tasks inside the running kernel's own (original) copies of `names`.
fn in_originals(paths: &SystemPaths, names: &[String]) -> Vec<(u32, String)> {
    // GCC's pieces of a function (`.part.N`, `.cold`) count as the function.
    let of = |function: &str, name: &str| {
        function == name
            || function
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('.'))
    };
    tasks_with_frame(paths, |f| {
        f.module.is_none() && names.iter().any(|n| of(&f.function, n))
    })
}

/// Tasks inside the module's clones.
fn in_clones(paths: &SystemPaths, module: &str) -> Vec<(u32, String)> {
    tasks_with_frame(paths, |f| {
        f.module.as_deref() == Some(module) && f.function.starts_with("__dynamos_sync_")
    })
}

/// Tasks in the original functions or their clones, for `dynamos list`.
pub fn tasks(paths: &SystemPaths, manifest: &Manifest, module: &str) -> Vec<String> {
    let names = functions(manifest);
    if names.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<String> = in_originals(paths, &names)
        .into_iter()
        .map(|(_, t)| format!("{t} (original)"))
        .collect();
    out.extend(
        in_clones(paths, module)
            .into_iter()
            .map(|(_, t)| format!("{t} (transitional clone)")),
    );
    out
}

fn wake(paths: &SystemPaths, module: &str, tasks: &[(u32, String)]) {
    let path = paths
        .sys_module
        .join(module)
        .join("parameters")
        .join("wake");
    for (tid, _) in tasks {
        // A task that exited meanwhile needs no wake-up.
        let _ = fs::write(&path, tid.to_string());
    }
}

fn describe(tasks: &[(u32, String)]) -> String {
    let mut names: Vec<&str> = tasks.iter().map(|(_, t)| t.as_str()).take(10).collect();
    if tasks.len() > names.len() {
        names.push("...");
    }
    names.join(", ")
}

/// Wait until `done`, waking the tasks in the clone each round when
/// `wake_clone`; false on timeout.
fn wait_until(
    paths: &SystemPaths,
    module: &str,
    timeout: Duration,
    wake_clone: bool,
    mut done: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        if wake_clone {
            wake(paths, module, &in_clones(paths, module));
        }
        std::thread::sleep(POLL);
    }
}

/// Stop redirecting and wait for the clones to empty, so the module may go.
fn withdraw(paths: &SystemPaths, module: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match set_phase(paths, module, 0) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout => {
                std::thread::sleep(POLL)
            }
            Err(e) => {
                let tasks = in_clones(paths, module);
                bail!(
                    "cannot stop redirecting to the transitional clones of {module}: {e}; tasks still in them: {}",
                    describe(&tasks)
                );
            }
        }
    }
}

/// Phases 1 to 3, after the livepatch transition of `module` completed.
///
/// A task asleep in the original function cannot be moved (it has no leave
/// checks). When it holds phase 1 past `timeout`, the update is withdrawn
/// (an error, as for a livepatch transition that times out) if no task
/// sleeps in the clone yet; otherwise the clone cannot go, and the update
/// is completed around the tasks still in old code, which are named: they
/// finish their call there. Phase 3 likewise.
pub fn forward(
    paths: &SystemPaths,
    manifest: &Manifest,
    module: &str,
    timeout: Duration,
) -> Result<Option<Report>> {
    let names = functions(manifest);
    if names.is_empty() {
        return Ok(None);
    }
    let adaptive = handled_functions(manifest);
    let mut report = Report::default();
    let start = Instant::now();
    set_phase(paths, module, 1).with_context(|| {
        format!(
            "cannot redirect {} to the transitional clone (another live update of it? see dmesg)",
            names.join(", ")
        )
    })?;
    // Phase 1: tasks in the originals finish there.
    let mut clean = 0;
    let inactive = wait_until(paths, module, timeout, false, || {
        if in_originals(paths, &names).is_empty() {
            clean += 1;
        } else {
            clean = 0;
        }
        clean >= CLEAN_SCANS
    });
    report.original_inactive = start.elapsed();
    if !inactive {
        let busy = in_originals(paths, &names);
        // As for a livepatch transition that times out: back to where we
        // were, when no task sleeps in the clone yet.
        if withdraw(paths, module, WITHDRAW_TIMEOUT).is_ok() {
            bail!(
                "the original {} did not become inactive within {}s; tasks in it: {}",
                names.join(", "),
                timeout.as_secs(),
                describe(&busy)
            );
        }
        // Tasks sleep in the clone's original code: it cannot go. Complete
        // around the tasks in the original function instead.
        report.left_in_original = busy.into_iter().map(|(_, t)| t).collect();
    }
    // Phase 2: sleepers leave the original body; phase 3: calls start in
    // the new one, and the update is complete once the original body is
    // empty (but for the calls an adaptation handler keeps there).
    let moving = Instant::now();
    set_phase(paths, module, 2)
        .and_then(|()| {
            wake(paths, module, &in_clones(paths, module));
            set_phase(paths, module, 3)
        })
        .context("cannot move the sleepers to the new code")?;
    let emptied = wait_until(paths, module, timeout, true, || {
        status(paths, module).is_some_and(|s| {
            s.functions
                .iter()
                .all(|f| f.in_original == 0 || adaptive.contains(&f.name))
        })
    });
    report.moved = moving.elapsed();
    if !emptied {
        report.left_in_old_code = in_clones(paths, module)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
    }
    report.tasks_moved = status(paths, module)
        .map(|s| s.functions.iter().map(|f| f.moved_to_patched).sum())
        .unwrap_or(0);
    Ok(Some(report))
}

/// Synchronized functions whose adaptation handler keeps some calls in
/// the original code.
fn handled_functions(manifest: &Manifest) -> Vec<String> {
    manifest
        .objects
        .iter()
        .flat_map(|o| &o.replaced)
        .filter(|f| f.synchronized.as_ref().is_some_and(|s| s.handler.is_some()))
        .map(|f| f.name.clone())
        .collect()
}

/// Phases 4, 5 and 0: sleepers back to the original code, calls to the
/// original function. On timeout the update is made complete again.
pub fn backward(
    paths: &SystemPaths,
    manifest: &Manifest,
    module: &str,
    timeout: Duration,
) -> Result<()> {
    if functions(manifest).is_empty() {
        return Ok(());
    }
    match status(paths, module) {
        None => return Ok(()),
        Some(s) if s.phase == 0 => return Ok(()),
        Some(_) => {}
    }
    set_phase(paths, module, 4).context("cannot move the sleepers back to the original code")?;
    wake(paths, module, &in_clones(paths, module));
    set_phase(paths, module, 5).context("cannot move the sleepers back to the original code")?;
    let emptied = wait_until(paths, module, timeout, true, || {
        status(paths, module).is_some_and(|s| s.functions.iter().all(|f| f.in_patched == 0))
    });
    let withdrawn = emptied && withdraw(paths, module, timeout).is_ok();
    if !withdrawn {
        let names = functions(manifest).join(", ");
        let what = if emptied {
            format!("tasks still sleep in the transitional clone of {names} (its module cannot go while they do) after {}s", timeout.as_secs())
        } else {
            format!(
                "tasks did not leave the new code of {names} within {}s",
                timeout.as_secs()
            )
        };
        let busy = in_clones(paths, module);
        // Back to where we started: the new code complete.
        let redo = set_phase(paths, module, 1)
            .and_then(|()| set_phase(paths, module, 2))
            .and_then(|()| {
                wake(paths, module, &in_clones(paths, module));
                set_phase(paths, module, 3)
            });
        bail!(
            "{what}: {}; {}",
            describe(&busy),
            match redo {
                Ok(()) => "the update stays applied".to_string(),
                Err(e) => format!("restoring the update failed too: {e}"),
            }
        );
    }
    Ok(())
}
