//! The running kernel's interfaces apply, revert and list use: the module
//! system calls, the livepatch sysfs files and the tasks' stacks under
//! /proc, and the state folder's lock and record paths.

use super::SystemPaths;
use anyhow::{bail, Context, Result};
use std::ffi::{CStr, CString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(super) fn kernel_release() -> Result<String> {
    // SAFETY: utsname is plain data; uname fills it and NUL-terminates fields.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        bail!("uname failed: {}", std::io::Error::last_os_error());
    }
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

pub(super) fn init_module(image: &[u8], params: &str) -> std::io::Result<()> {
    let params = CString::new(params).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: image and params outlive the call; the kernel copies both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len() as libc::c_ulong,
            params.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn delete_module(name: &str) -> std::io::Result<()> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: name is a valid C string for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Module and livepatch names are used in paths: keep them plain.
pub(super) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 55
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("{name:?} is not a valid kernel module name");
    }
    Ok(())
}

pub(super) fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Wait until the livepatch `name` is not in transition (its folder gone
/// counts as settled). Nothing is sent from here: Linux 6.1 has no `signal`
/// attribute, and the livepatch core itself retries about once a second and
/// sends its fake signal to the tasks still on the old side every 15th retry
/// (kernel/livepatch/transition.c), which wakes interruptible sleepers (a
/// writer waiting in pipe_write) so they switch on their way out. Killable
/// and uninterruptible sleepers are not woken; they hold the transition.
pub(super) fn wait_transition(paths: &SystemPaths, name: &str, timeout: Duration) -> bool {
    let dir = paths.livepatch.join(name);
    let start = Instant::now();
    loop {
        match read_trimmed(&dir.join("transition")) {
            None => return true,
            Some(v) if v == "0" => return true,
            _ => {}
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Tasks whose livepatch state differs from the transition's target, as
/// `pid/tid (comm) in FRAME`: the patched function on their kernel stack
/// when one is (what holds the transition), else the top frame.
pub(super) fn blocking_tasks(paths: &SystemPaths, name: &str) -> Vec<String> {
    let target = match read_trimmed(&paths.livepatch.join(name).join("enabled")).as_deref() {
        Some("1") => "1",
        Some("0") => "0",
        _ => return Vec::new(),
    };
    let patched = patched_functions(&paths.livepatch.join(name));
    let mut out = Vec::new();
    for task in each_task(&paths.proc) {
        let state = read_trimmed(&task.dir.join("patch_state"));
        match state.as_deref() {
            Some(s) if s != target && s != "-1" => {}
            _ => continue,
        }
        let comm = read_trimmed(&task.dir.join("comm")).unwrap_or_default();
        let top = fs::read_to_string(task.dir.join("stack"))
            .ok()
            .and_then(|s| blocking_frame(&s, &patched))
            .map(|f| format!(" in {f}"))
            .unwrap_or_default();
        out.push(format!("{}/{} ({comm}){top}", task.pid, task.tid));
        if out.len() >= 10 {
            break;
        }
    }
    out
}

/// A task (thread) of the running system and its /proc folder.
pub(crate) struct TaskDir {
    pub pid: String,
    pub tid: String,
    pub dir: PathBuf,
}

/// Every task under `proc`: /proc/PID/task/TID.
pub(crate) fn each_task(proc: &Path) -> Vec<TaskDir> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir(proc) else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            out.push(TaskDir {
                pid: pid.clone(),
                tid: t.file_name().to_string_lossy().into_owned(),
                dir: t.path(),
            });
        }
    }
    out
}

/// Function names a livepatch redirects, from its sysfs folders
/// (`<object>/<function>,<sympos>`).
pub(super) fn patched_functions(patch_dir: &Path) -> Vec<String> {
    super::list::sysfs_objects(patch_dir)
        .into_iter()
        .flat_map(|o| o.functions.into_iter().map(|f| f.name))
        .collect()
}

/// The frame of a /proc/PID/stack listing that runs one of `patched`, or
/// the top frame; as `function+0xoff/0xsize`.
pub(super) fn blocking_frame(stack: &str, patched: &[String]) -> Option<String> {
    let frames: Vec<&str> = stack
        .lines()
        .map(|l| l.split_once("] ").map_or(l, |(_, f)| f).trim())
        .filter(|f| !f.is_empty())
        .collect();
    let function = |f: &str| f.split('+').next().unwrap_or(f).to_string();
    frames
        .iter()
        .find(|f| patched.contains(&function(f)))
        .or(frames.first())
        .map(|f| f.to_string())
}

/// Disable the livepatch `name` if it is enabled, wait for it to settle,
/// then unload its module. If disabling does not settle in time, `restore`
/// turns the patch back on (as it was before: fully applied); without it
/// the kernel is left to finish switching back on its own.
pub(super) fn disable_and_unload(
    paths: &SystemPaths,
    name: &str,
    timeout: Duration,
    restore: bool,
) -> Result<()> {
    let dir = paths.livepatch.join(name);
    if read_trimmed(&dir.join("enabled")).as_deref() == Some("1") {
        fs::write(dir.join("enabled"), "0")
            .with_context(|| format!("cannot disable livepatch {name}"))?;
    }
    if !wait_transition(paths, name, timeout) {
        let blockers = blocking_tasks(paths, name);
        let outcome = if restore
            && fs::write(dir.join("enabled"), "1").is_ok()
            && wait_transition(paths, name, timeout)
        {
            "it was switched back on and is still applied".to_string()
        } else {
            format!("it is still switching back; run `dynamos revert {name}` once it settles")
        };
        bail!(
            "livepatch {name} did not finish disabling within {}s{}; {outcome}",
            timeout.as_secs(),
            describe_blockers(&blockers),
        );
    }
    unload_module(paths, name, timeout)
}

/// Unload module `name`, retrying while the livepatch core still holds it
/// (it lets go shortly after the patch is disabled).
pub(super) fn unload_module(paths: &SystemPaths, name: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match delete_module(name) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                    && start.elapsed() < timeout =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let still = if paths.livepatch.join(name).exists() {
                    " (its livepatch is still registered)"
                } else {
                    ""
                };
                bail!("cannot unload module {name}: {e}{still}");
            }
        }
    }
}

pub(super) fn describe_blockers(blockers: &[String]) -> String {
    if blockers.is_empty() {
        String::new()
    } else {
        format!("; tasks not yet switched: {}", blockers.join(", "))
    }
}

/// `dynamos COMMAND` changes the running kernel or the machine's store.
pub(super) fn require_root(command: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("dynamos {command} must run as root");
    }
    Ok(())
}

pub(super) fn lock(paths: &SystemPaths) -> Result<crate::cache::Lock> {
    crate::cache::Lock::acquire(&paths.state_dir.join(".lock"))
}

pub(super) fn record_path(paths: &SystemPaths, module: &str) -> PathBuf {
    paths.state_dir.join(format!("{module}.json"))
}
