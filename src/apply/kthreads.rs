//! Kernel threads whose main function an update replaces.
//!
//! A kernel thread calls its main function from `kthread()` and, for the
//! threads that loop forever, never returns from it: the function stays on
//! the thread's stack, so the livepatch core never switches that thread and
//! the transition never finishes. Such an update is refused before anything
//! is loaded, naming the threads, instead of timing out.

use crate::package::Manifest;
use anyhow::Result;
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
    let frames: Vec<&str> = stack
        .lines()
        .map(|l| l.split_once("] ").map_or(l, |(_, f)| f).trim())
        .filter(|f| !f.is_empty())
        .collect();
    let name = |f: &str| f.split('+').next().unwrap_or(f).to_string();
    let at = frames.iter().position(|&f| name(f) == "kthread")?;
    let frame = frames.get(at.checked_sub(1)?)?;
    let size = frame
        .rsplit_once('/')
        .and_then(|(_, size)| u64::from_str_radix(size.trim_start_matches("0x"), 16).ok());
    Some((name(frame), size))
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
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(proc) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(flags) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| stat_flags(&s))
        else {
            continue;
        };
        if flags & PF_KTHREAD == 0 {
            continue;
        }
        let Some((main_function, main_size)) = fs::read_to_string(entry.path().join("stack"))
            .ok()
            .and_then(|s| main_function(&s))
        else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        out.push(KernelThread {
            pid,
            comm,
            main_function,
            main_size,
        });
    }
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

/// Refuse `manifest` when a running kernel thread's main function is one
/// of the functions it replaces.
pub fn refuse_replaced_thread_functions(manifest: &Manifest, proc: &Path) -> Result<()> {
    let threads = running_threads(proc);
    let mut refusals = Vec::new();
    for (object, function) in manifest
        .objects
        .iter()
        .flat_map(|o| o.replaced.iter().map(move |f| (o, f)))
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
            Some(t) if t.per_cpu => "; they are per-CPU threads, parked and stopped by CPU hotplug",
            Some(t) if t.stopped_by_kthread_stop => {
                "; its file stops them with kthread_stop(), which needs the very task it started"
            }
            _ => "",
        };
        refusals.push(crate::error::Refusal {
            symbol: function.name.clone(),
            reason: format!(
                "is the main function of the running kernel thread{} {}, which never return{} from it, \
                 so the update could never finish; restarting kernel threads is not supported{why}",
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
