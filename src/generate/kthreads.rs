//! Thread functions: a replaced function that the original object passes to
//! a thread-creating call is the main function of kernel threads. It never
//! returns while such a thread runs, so the livepatch transition cannot
//! finish for that thread; `dynamos apply` restarts those threads, or
//! refuses the update when it cannot.

use crate::diff::frame_locals;
use crate::diff::object::{ObjectFile, SymbolPlace};
use crate::package::{ThreadFunction, ThreadState, ThreadStateSite};
use crate::synchronize::threads::RestorePoint;

/// Calls that create a kernel thread running the function passed to them
/// (`kthread_run` and `kthread_create` expand to the first).
const THREAD_CREATORS: &[&str] = &["kthread_create_on_node", "kthread_create_on_cpu"];

/// Calls after which a created thread is bound to one CPU.
const PER_CPU_MARKERS: &[&str] = &["kthread_create_on_cpu", "kthread_bind", "kthread_bind_mask"];

/// Calls that stop a kernel thread by its task pointer.
const THREAD_STOPPERS: &[&str] = &["kthread_stop", "kthread_stop_put"];

/// How `original` starts threads running `function`, if it does.
pub fn thread_function(original: &ObjectFile, function: &str) -> Option<ThreadFunction> {
    let target = original
        .symbols
        .iter()
        .position(|s| s.is_function() && s.name == function && s.section().is_some())?;
    let target_section = original.symbols[target].section()?;
    let refers_to_target = |symbol: usize| {
        let s = &original.symbols[symbol];
        symbol == target || (s.is_section() && s.section() == Some(target_section))
    };
    let mut started_by = Vec::new();
    let mut per_cpu = false;
    for (index, section) in original.sections.iter().enumerate() {
        if !section.is_exec() || !section.relocs.iter().any(|r| refers_to_target(r.symbol)) {
            continue;
        }
        // Functions of this section that take the address of `function`.
        for r in section.relocs.iter().filter(|r| refers_to_target(r.symbol)) {
            let Some(caller) = crate::diff::covering_symbol(original, index, r.offset as i64)
            else {
                continue;
            };
            let caller = &original.symbols[caller];
            if caller.name == function || started_by.contains(&caller.name) {
                continue;
            }
            let (start, end) = (caller.value, caller.value + caller.size.max(1));
            let calls: Vec<&str> = section
                .relocs
                .iter()
                .filter(|c| c.offset >= start && c.offset < end)
                .map(|c| original.symbols[c.symbol].name.as_str())
                .collect();
            if calls.iter().any(|c| THREAD_CREATORS.contains(c)) {
                started_by.push(caller.name.clone());
                per_cpu |= calls.iter().any(|c| PER_CPU_MARKERS.contains(c));
            }
        }
    }
    if started_by.is_empty() {
        return None;
    }
    started_by.sort();
    let undefined_calls = |section: usize| {
        original.sections[section]
            .relocs
            .iter()
            .map(|r| &original.symbols[r.symbol])
            .filter(|s| s.place == SymbolPlace::Undefined)
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    let stopped_by_kthread_stop = (0..original.sections.len())
        .filter(|&i| original.sections[i].is_exec())
        .flat_map(undefined_calls)
        .any(|n| THREAD_STOPPERS.contains(&n.as_str()));
    Some(ThreadFunction {
        started_by,
        per_cpu,
        stopped_by_kthread_stop,
    })
}

/// Whether `dynamos apply` can restart the threads of `thread` into a new
/// version: not per-CPU threads (CPU hotplug parks and stops them by their
/// task) nor threads their file stops with kthread_stop().
pub fn restartable(thread: &ThreadFunction) -> bool {
    !thread.per_cpu && !thread.stopped_by_kthread_stop
}

/// Variables of `original` a thread's starters store a task pointer in:
/// 8-byte data symbols written by the functions in `started_by`, as
/// (name, is global).
pub fn task_pointers(original: &ObjectFile, started_by: &[String]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for starter in started_by {
        let Some(s) = original
            .symbols
            .iter()
            .find(|s| s.is_function() && &s.name == starter && s.section().is_some())
        else {
            continue;
        };
        let Some(section) = s.section() else { continue };
        let (start, end) = (s.value, s.value + s.size.max(1));
        for r in original.sections[section]
            .relocs
            .iter()
            .filter(|r| r.offset >= start && r.offset < end)
        {
            // A static is often reached through its section's symbol.
            let mut target = &original.symbols[r.symbol];
            if target.is_section() {
                let place = r.addend
                    + if r.r_type == object::elf::R_X86_64_PC32 {
                        4
                    } else {
                        0
                    };
                let Some(covering) = target
                    .section()
                    .and_then(|sec| crate::diff::covering_symbol(original, sec, place))
                else {
                    continue;
                };
                target = &original.symbols[covering];
            }
            if target.is_object()
                && target.size == 8
                && target.section().is_some()
                && !out.iter().any(|(n, _)| n == &target.name)
            {
                out.push((target.name.clone(), !target.is_local()));
            }
        }
    }
    out
}

/// The build-time note for a replaced thread function.
pub fn note(function: &str, thread: &ThreadFunction, task_pointers: &[String]) -> String {
    if restartable(thread) {
        format!(
            "{function} is the main function of kernel threads started by {}: \
             `dynamos apply` restarts them into the new version at their sleep point{}",
            thread.started_by.join(", "),
            if task_pointers.is_empty() {
                String::new()
            } else {
                format!(" and points {} at the new thread", task_pointers.join(", "))
            }
        )
    } else {
        format!(
            "{function} is the main function of kernel threads started by {}: \
             `dynamos apply` refuses this update while such a thread runs ({})",
            thread.started_by.join(", "),
            if thread.per_cpu {
                "per-CPU threads are parked and stopped by CPU hotplug"
            } else {
                "its file stops them with kthread_stop(), which needs the very task it started"
            }
        )
    }
}

/// What a restarted thread of `point`'s function carries, and the note
/// that says so: where the original's locals are at each call it makes.
pub fn thread_state(
    original: &ObjectFile,
    point: &RestorePoint,
    state_of: &str,
) -> (ThreadState, String) {
    let (sites, unreadable) =
        match frame_locals::locals_at_calls(original, &point.name, &point.old_locals) {
            Ok(sites) => (sites, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
    // Where a thread can be found asleep; every call when none is known.
    let sleeping: Vec<&ThreadStateSite> = sites
        .iter()
        .filter(|s| crate::synchronize::is_sleeping_call(&s.callee))
        .collect();
    let candidates: Vec<&ThreadStateSite> = if sleeping.is_empty() {
        sites.iter().collect()
    } else {
        sleeping
    };
    let located = |index: usize| {
        let at = candidates
            .iter()
            .filter(|s| s.locations.get(index).is_some_and(Option::is_some))
            .count();
        (at, candidates.len())
    };
    let mut sleeps: Vec<&str> = candidates.iter().map(|s| s.callee.as_str()).collect();
    sleeps.dedup();
    let mut carried = Vec::new();
    let mut partly = Vec::new();
    let mut lost = Vec::new();
    for name in &point.restored {
        let index = point.old_locals.iter().position(|l| l == name).unwrap_or(0);
        match located(index) {
            (0, _) => lost.push(format!(
                "{name} (in no register or stack slot at its calls of {})",
                sleeps.join(", ")
            )),
            (at, all) if at == all => carried.push(name.clone()),
            (at, all) => partly.push(format!(
                "{name} (at {at} of {all} calls of {})",
                sleeps.join(", ")
            )),
        }
    }
    let mut fresh: Vec<String> = point
        .new_locals
        .iter()
        .filter(|l| !point.restored.contains(l))
        .cloned()
        .collect();
    fresh.extend(
        point
            .not_carriable
            .iter()
            .map(|(n, why)| format!("{n} ({why})")),
    );
    let mut parts = Vec::new();
    if !carried.is_empty() {
        parts.push(format!(
            "carries {} from where the old thread sleeps ({})",
            carried.join(", "),
            sleeps.join(", ")
        ));
    }
    if !partly.is_empty() {
        parts.push(format!("carries where located {}", partly.join(", ")));
    }
    if let Some(t) = &point.transfer {
        parts.push(format!("runs {t} to set the rest"));
    }
    let mut afresh: Vec<String> = lost;
    if point.transfer.is_none() {
        afresh.extend(fresh);
    }
    if !afresh.is_empty() {
        parts.push(format!("starts afresh with {}", afresh.join(", ")));
    }
    if let Some(e) = unreadable {
        parts.push(format!(
            "carries nothing: its locals cannot be located ({e})"
        ));
    }
    let note = format!(
        "{} of {}: a restarted thread runs the new version from its start and, at line {} before its loop, {}",
        point.name,
        point.file,
        point.line,
        if parts.is_empty() { "has no locals to carry".to_string() } else { parts.join("; ") }
    );
    let state = ThreadState {
        state_of: state_of.to_string(),
        locals: point.old_locals.clone(),
        restored: point.restored.clone(),
        transfer: point.transfer.clone(),
        sites,
    };
    (state, note)
}
