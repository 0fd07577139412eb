//! Kernel threads whose main function an update replaces.
//!
//! A kernel thread calls its main function from `kthread()` and, for the
//! threads that loop forever, never returns from it: the function stays on
//! the thread's stack, so the livepatch core never switches that thread and
//! the transition never finishes. Threads the package can restart are
//! restarted into the new version through its module (docs/architecture.md,
//! "Kernel threads"); the others are refused before anything is loaded,
//! naming the threads, instead of timing out.

use super::kcore::KernelMemory;
use super::stack::{frames, Frame};
use crate::package::{Manifest, ThreadFunction};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::Path;

/// `PF_KTHREAD` of `task_struct::flags` (include/linux/sched.h), the ninth
/// field of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// A running kernel thread and the function `kthread()` runs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelThread {
    pub pid: u32,
    pub comm: String,
    pub main_function: String,
    /// The main function's size as the stack listing gives it (up to the
    /// next kernel symbol).
    pub main_size: Option<u64>,
}

/// The main function of a kernel thread and its size from its
/// /proc/PID/stack listing: the frame just above `kthread`.
pub fn main_function(stack: &str) -> Option<(String, Option<u64>)> {
    let frames = super::stack::frames(stack);
    let at = frames.iter().position(|f| f.function == "kthread")?;
    let frame = frames.get(at.checked_sub(1)?)?;
    // A loop GCC deemed unlikely runs in the function's `.cold` part, whose
    // size says nothing of the function's.
    match frame.function.strip_suffix(".cold") {
        Some(function) => Some((function.to_string(), None)),
        None => Some((frame.function.clone(), frame.size)),
    }
}

/// Whether a stack frame's function of `frame_size` bytes (the distance to
/// the next kernel symbol) can be the original function of `code_size`
/// bytes: the same, or padded up to the next function's alignment.
fn same_size(frame_size: Option<u64>, code_size: Option<usize>) -> bool {
    match (frame_size, code_size) {
        (Some(frame), Some(code)) => (code as u64..code as u64 + 64).contains(&frame),
        _ => true,
    }
}

/// Every kernel thread under `proc` whose stack shows its main function.
pub fn running_threads(proc: &Path) -> Vec<KernelThread> {
    let mut out: Vec<KernelThread> = kernel_threads(proc)
        .into_iter()
        .filter_map(|t| {
            let (main_function, main_size) = main_function(&t.stack)?;
            Some(KernelThread {
                pid: t.pid,
                comm: t.comm,
                main_function,
                main_size,
            })
        })
        .collect();
    out.sort_by_key(|t| t.pid);
    out
}

/// The flags field of a /proc/PID/stat line; the command name in
/// parentheses may itself hold spaces and parentheses.
fn stat_flags(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    // After the name: state ppid pgrp session tty_nr tpgid flags.
    rest.split_whitespace().nth(6)?.parse().ok()
}

/// A kernel thread the update replaced by a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartedThread {
    pub function: String,
    pub comm: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// Locals of the old thread the new one restored.
    #[serde(default)]
    pub carried: Vec<String>,
}

/// The main function's frame of a kernel thread: the frame just above
/// `kthread` (the scheduler's own frames are not listed for a sleeping
/// task, so the function it sleeps in may not show).
fn main_frame(stack: &str) -> Option<Frame> {
    let frames = frames(stack);
    let at = frames.iter().position(|f| f.function == "kthread")?;
    frames.get(at.checked_sub(1)?).cloned()
}

/// The function a `call` ending at `return_address` calls, read from the
/// running code: a direct `call rel32` to something other than a
/// retpoline thunk.
fn called_before(memory: &dyn KernelMemory, kallsyms: &str, return_address: u64) -> Option<u64> {
    let bytes = memory.read(return_address.checked_sub(5)?, 5).ok()?;
    if bytes.len() != 5 || bytes[0] != 0xe8 {
        return None;
    }
    let displacement = i32::from_le_bytes(bytes[1..5].try_into().ok()?);
    let target = return_address.wrapping_add(displacement as i64 as u64);
    let thunk = kallsyms.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next().and_then(|a| u64::from_str_radix(a, 16).ok()) == Some(target)
            && w.nth(1)
                .is_some_and(|n| n.starts_with("__x86_indirect_thunk"))
    });
    (!thunk).then_some(target)
}

/// Where threads sleep: (the function called, the return address, the
/// frame's symbol, the offset in it).
type SleepSite = (u64, u64, String, u64);

/// Restart the kernel threads of the package's restartable thread
/// functions into `version` (`new` or `original`) through the module's
/// `restart` parameter; what was restarted.
pub fn restart(
    paths: &super::SystemPaths,
    manifest: &Manifest,
    module: &str,
    version: &str,
) -> Result<Vec<RestartedThread>> {
    let functions: Vec<(&str, &crate::package::ReplacedFunction)> = manifest
        .objects
        .iter()
        .flat_map(|o| o.replaced.iter().map(move |f| (o.object.as_str(), f)))
        .filter(|(_, f)| f.restart.is_some())
        .collect();
    if functions.is_empty() {
        return Ok(Vec::new());
    }
    let parameters = paths.sys_module.join(module).join("parameters");
    if version == "original" {
        // New threads their subsystem stopped since no longer hold the module.
        fs::write(parameters.join("restart"), "release")
            .context("cannot let the module release exited threads")?;
    }
    // Each thread function's two versions, as the module has them.
    let addresses: Vec<(u64, u64)> = fs::read_to_string(parameters.join("thread_functions"))
        .context("cannot read the module's thread functions")?
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((
                u64::from_str_radix(w.get(2)?, 16).ok()?,
                u64::from_str_radix(w.get(3)?, 16).ok()?,
            ))
        })
        .collect();
    let kallsyms = fs::read_to_string(&paths.kallsyms).context("cannot read kallsyms")?;
    let memory = super::kcore::Kcore::open(&paths.kcore)?;
    let mut restarted = Vec::new();
    for (index, &(object, f)) in functions.iter().enumerate() {
        let code_size = manifest
            .objects
            .iter()
            .filter(|o| o.object == object)
            .flat_map(|o| &o.expected_code)
            .find(|c| c.name == f.name && c.file == f.file)
            .map(|c| c.bytes.len());
        let Some(&(original, new_version)) = addresses.get(index) else {
            bail!("the module does not list thread function {}", f.name);
        };
        let base = if version == "new" {
            original
        } else {
            new_version
        };
        // Threads started from now on run `version` (before any restart into
        // the original, so that restarted threads are not sent back).
        fs::write(parameters.join("restart"), format!("{index} {version} 0 0"))
            .with_context(|| format!("cannot redirect new threads of {}", f.name))?;
        if base == 0 {
            continue; // a module's function while that module is not loaded
        }
        // The code the threads to restart run: the function's own module, or ours.
        let home = match version {
            "new" => (object != "vmlinux").then_some(object),
            _ => Some(module),
        };
        // The threads running the version being replaced, and where each sleeps.
        let mut sites: Vec<(SleepSite, Vec<u32>)> = Vec::new();
        for thread in kernel_threads(&paths.proc) {
            let Some(main) = main_frame(&thread.stack) else {
                continue;
            };
            let part_of_function = main.function == f.name
                || main.function.strip_suffix(".cold") == Some(f.name.as_str());
            if main.module.as_deref() != home || !part_of_function {
                continue;
            }
            // A same-named function of another file differs in size, mostly.
            if version == "new" && main.function == f.name && !same_size(main.size, code_size) {
                continue;
            }
            let Some(part) = part_address(&kallsyms, &main.function, home, base) else {
                bail!(
                    "{} (pid {}) waits in {}, which kallsyms does not list",
                    thread.comm,
                    thread.pid,
                    main.text
                );
            };
            let return_address = part + main.offset;
            let sleep = called_before(&memory, &kallsyms, return_address).with_context(|| {
                format!(
                    "{} (pid {}) waits at {}+{:#x}, after no direct call: its sleep cannot be intercepted",
                    thread.comm, thread.pid, main.function, main.offset
                )
            })?;
            let key = (sleep, return_address, main.function.clone(), main.offset);
            match sites.iter_mut().find(|(k, _)| *k == key) {
                Some((_, pids)) => pids.push(thread.pid),
                None => sites.push((key, vec![thread.pid])),
            }
        }
        let state = f.restart.as_ref().and_then(|r| r.state.as_ref());
        for ((sleep, return_address, part, offset), pids) in sites {
            // Where the old thread's locals are at this call, for the new version.
            let places: String = state
                .filter(|_| version == "new")
                .and_then(|s| {
                    s.sites
                        .iter()
                        .find(|site| site.part == part && site.return_offset == offset)
                })
                .map(|site| {
                    site.locations
                        .iter()
                        .enumerate()
                        .filter_map(|(i, l)| l.map(|l| format!(" {}", l.parameter(i))))
                        .collect()
                })
                .unwrap_or_default();
            fs::write(
                parameters.join("restart"),
                // The module stops the thread at `from + OFFSET`, wrapping.
                // Only the threads seen sleeping there (`pPID`).
                format!(
                    "{index} {version} {sleep:x} {:x}{}{places}",
                    return_address.wrapping_sub(base),
                    pids.iter().map(|p| format!(" p{p}")).collect::<String>()
                ),
            )
            .with_context(|| {
                format!(
                    "restarting the kernel threads of {} into the {version} version failed (see dmesg); the thread that failed keeps running its version",
                    f.name
                )
            })?;
            let report = fs::read_to_string(parameters.join("restart")).unwrap_or_default();
            for line in report.lines() {
                let w: Vec<&str> = line.split_whitespace().collect();
                if let [function, comm, old, new, carried] = w[..] {
                    let mask = u64::from_str_radix(carried, 16).unwrap_or(0);
                    let carried = state
                        .map(|s| {
                            (s.locals.iter().enumerate())
                                .filter(|(i, n)| {
                                    mask & (1 << i) != 0
                                        && (s.restored.contains(n) || s.transfer.is_some())
                                })
                                .map(|(_, n)| n.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    restarted.push(RestartedThread {
                        function: function.to_string(),
                        comm: comm.to_string(),
                        old_pid: old.parse().unwrap_or(0),
                        new_pid: new.parse().unwrap_or(0),
                        carried,
                    });
                }
            }
        }
    }
    Ok(restarted)
}

/// The address of `name` in `module` (None: vmlinux) from kallsyms; of
/// several, the one nearest `near` (a function's `.cold` part lies close
/// to it).
fn part_address(kallsyms: &str, name: &str, module: Option<&str>, near: u64) -> Option<u64> {
    kallsyms
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let address = u64::from_str_radix(w.next()?, 16).ok()?;
            let _kind = w.next()?;
            let symbol = w.next()?;
            let owner = w.next().map(|m| m.trim_matches(|c| c == '[' || c == ']'));
            (symbol == name && owner == module).then_some(address)
        })
        .min_by_key(|a| a.abs_diff(near))
}

/// The thread functions whose threads `manifest` restarts.
pub fn restarted_functions(manifest: &Manifest) -> Vec<String> {
    manifest
        .objects
        .iter()
        .flat_map(|o| &o.replaced)
        .filter(|f| f.restart.is_some())
        .map(|f| f.name.clone())
        .collect()
}

/// Refuse restarting the threads of a function an applied update already
/// restarted: its threads run that update's module, and only its own
/// revert brings them back.
pub fn refuse_stacked_restarts(
    manifest: &Manifest,
    records: &[super::AppliedRecord],
) -> Result<()> {
    let mut refusals = Vec::new();
    for f in manifest.objects.iter().flat_map(|o| &o.replaced) {
        if f.restart.is_none() && f.kthread.is_none() {
            continue;
        }
        let earlier = records.iter().find(|r| {
            r.manifest
                .objects
                .iter()
                .flat_map(|o| &o.replaced)
                .any(|g| g.restart.is_some() && g.name == f.name && g.file == f.file)
        });
        if let Some(r) = earlier {
            refusals.push(crate::error::Refusal {
                symbol: f.name.clone(),
                reason: format!(
                    "live update {} already restarted its threads into its own version; revert it first",
                    r.manifest.name
                ),
            });
        }
    }
    crate::error::refuse_any(refusals)
}

/// A kernel thread and its stack listing.
struct ThreadStack {
    pid: u32,
    comm: String,
    stack: String,
}

fn kernel_threads(proc: &Path) -> Vec<ThreadStack> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(proc) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let is_kthread = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| stat_flags(&s))
            .is_some_and(|f| f & PF_KTHREAD != 0);
        if !is_kthread {
            continue;
        }
        let Ok(stack) = fs::read_to_string(entry.path().join("stack")) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        out.push(ThreadStack { pid, comm, stack });
    }
    out
}

/// Refuse `manifest` when a running kernel thread's main function is one
/// of the functions it replaces and cannot restart.
pub fn refuse_replaced_thread_functions(manifest: &Manifest, proc: &Path) -> Result<()> {
    let threads = running_threads(proc);
    let mut refusals = Vec::new();
    for (object, function) in manifest
        .objects
        .iter()
        .flat_map(|o| o.replaced.iter().map(move |f| (o, f)))
        .filter(|(_, f)| f.restart.is_none())
    {
        // Same-named functions of other files differ in size, mostly.
        let code_size = object
            .expected_code
            .iter()
            .find(|c| c.name == function.name && c.file == function.file)
            .map(|c| c.bytes.len());
        let hits: Vec<&KernelThread> = threads
            .iter()
            .filter(|t| t.main_function == function.name && same_size(t.main_size, code_size))
            .collect();
        if hits.is_empty() {
            continue;
        }
        let named: Vec<String> = hits
            .iter()
            .map(|t| format!("{} (pid {})", t.comm, t.pid))
            .collect();
        let why = match &function.kthread {
            Some(ThreadFunction {
                stop_hazard: Some(hazard),
                ..
            }) => format!("; {hazard}"),
            Some(t) if t.per_cpu => {
                "; they are per-CPU threads, parked and stopped by CPU hotplug".to_string()
            }
            Some(t) if t.task_escapes => {
                "; its starter keeps the created task where a restart cannot switch it to the new thread"
                    .to_string()
            }
            Some(t) if t.stopped_by_kthread_stop => {
                "; its file stops them with kthread_stop() other than through a task pointer it stores, \
                 and kthread_stop() needs the very task it started"
                    .to_string()
            }
            _ => String::new(),
        };
        refusals.push(crate::error::Refusal {
            symbol: function.name.clone(),
            reason: format!(
                "is the main function of the running kernel thread{} {}, which never return{} from it, \
                 so the update could never finish{why}",
                if hits.len() == 1 { "" } else { "s" },
                named.join(", "),
                if hits.len() == 1 { "s" } else { "" },
            ),
        });
    }
    crate::error::refuse_any(refusals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_above_kthread_is_the_main_function() {
        let stack = "[<0>] schedule_timeout+0x95/0x150\n\
                     [<0>] watchdog+0x6e/0x150\n\
                     [<0>] kthread+0xd7/0x100\n\
                     [<0>] ret_from_fork+0x1f/0x30\n";
        assert_eq!(
            main_function(stack),
            Some(("watchdog".to_string(), Some(0x150)))
        );
        let cold = "[<0>] schedule_timeout+0x95/0x150\n\
                    [<0>] counter_thread.cold+0x2f/0x45 [dynamos_counter]\n\
                    [<0>] kthread+0xd7/0x100\n";
        assert_eq!(
            main_function(cold),
            Some(("counter_thread".to_string(), None))
        );
        // A module's frame names its module after the size.
        let module = "[<0>] counter_thread+0x4f/0x120 [dynamos_counter]\n\
                      [<0>] kthread+0xd7/0x100\n";
        assert_eq!(
            main_function(module),
            Some(("counter_thread".to_string(), Some(0x120)))
        );
        assert_eq!(main_function("[<0>] do_syscall_64+0x1/0x2\n"), None);
        assert_eq!(main_function("[<0>] kthread+0xd7/0x100\n"), None);
    }

    #[test]
    fn padding_to_the_next_symbol_is_the_same_size() {
        assert!(same_size(Some(0x150), Some(0x14b)));
        assert!(!same_size(Some(0x150), Some(0x200)));
        assert!(!same_size(Some(0x250), Some(0x150)));
        assert!(same_size(None, Some(0x150)));
    }

    #[test]
    fn stat_flags_after_an_odd_command_name() {
        let stat = "42 (a) b (c) S 2 0 0 0 -1 2129984 0 0";
        assert_eq!(stat_flags(stat), Some(2129984));
        assert_ne!(stat_flags(stat).unwrap() & PF_KTHREAD, 0);
    }
}
