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

/// Register numbers of the x86-64 argument registers after the first
/// (rsi, rdx, rcx, r8, r9): a thread creator takes its function in rdi.
const LATER_ARGUMENT_REGISTERS: &[u8] = &[6, 2, 1, 8, 9];

/// The register an instruction loads with the address whose relocation
/// field starts at `field`, for the forms compilers load a function's
/// address with: `mov $imm32, %r64`, `lea rel32(%rip), %r64`, `mov $imm32,
/// %r32`. `None` for any other instruction (a store, a push, ...).
fn loaded_into_register(code: &[u8], field: usize) -> Option<u8> {
    let byte = |back: usize| field.checked_sub(back).and_then(|i| code.get(i)).copied();
    let (rex, op, modrm) = (byte(3), byte(2), byte(1));
    if let (Some(rex), Some(op), Some(modrm)) = (rex, op, modrm) {
        // REX.W, then C7 /0 with a register operand, or 8D with RIP-relative memory.
        if rex & 0xf8 == 0x48 && op == 0xc7 && modrm & 0xf8 == 0xc0 {
            return Some((modrm & 7) | ((rex & 1) << 3));
        }
        if rex & 0xf8 == 0x48 && op == 0x8d && modrm & 0xc7 == 0x05 {
            return Some(((modrm >> 3) & 7) | ((rex & 4) << 1));
        }
    }
    match (byte(2), byte(1)) {
        (Some(0x41), Some(op @ 0xb8..=0xbf)) => Some(op - 0xb8 + 8),
        (_, Some(op @ 0xb8..=0xbf)) => Some(op - 0xb8),
        _ => None,
    }
}

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
        let code = original.data(index);
        for r in section.relocs.iter().filter(|r| refers_to_target(r.symbol)) {
            // The address loaded straight into the register of a later
            // argument goes to some other call (`proc_create_single(...,
            // show)` next to a `kthread_run()` of another function).
            if loaded_into_register(code, r.offset as usize)
                .is_some_and(|reg| LATER_ARGUMENT_REGISTERS.contains(&reg))
            {
                continue;
            }
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
    let pointers: Vec<String> = task_pointers(original, &started_by)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let stopped_through_task_pointers =
        stopped_by_kthread_stop && stops_through(original, &pointers);
    let task_escapes = started_by.iter().any(|starter| {
        original
            .symbols
            .iter()
            .find(|s| s.is_function() && &s.name == starter && s.section().is_some())
            .and_then(|s| {
                let section = s.section()?;
                Some(created_tasks(original, section, s.value, s.value + s.size).escapes)
            })
            .unwrap_or(true)
    });
    Some(ThreadFunction {
        started_by,
        per_cpu,
        stopped_by_kthread_stop,
        stopped_through_task_pointers,
        task_escapes,
        stop_hazard: None,
    })
}

/// Whether `dynamos apply` can restart the threads of `thread` into a new
/// version: not per-CPU threads (CPU hotplug parks and stops them by their
/// task) nor threads their file stops with kthread_stop() other than
/// through the task pointers a restart switches.
pub fn restartable(thread: &ThreadFunction) -> bool {
    !thread.per_cpu
        && (!thread.stopped_by_kthread_stop || thread.stopped_through_task_pointers)
        && !thread.task_escapes
        && thread.stop_hazard.is_none()
}

/// The symbol a relocation reaches, through its section's symbol for a
/// static (often reached that way).
fn named_target<'o>(
    original: &'o ObjectFile,
    r: &crate::diff::object::Reloc,
) -> Option<&'o crate::diff::object::Symbol> {
    let target = original.symbols.get(r.symbol)?;
    if !target.is_section() {
        return Some(target);
    }
    let place = r.addend
        + if r.r_type == object::elf::R_X86_64_PC32 {
            4
        } else {
            0
        };
    let covering = crate::diff::covering_symbol(original, target.section()?, place)?;
    original.symbols.get(covering)
}

/// Whether every function of `original` that calls kthread_stop() also
/// reads one of `task_pointers`: then it stops the thread those point to,
/// which a restart points at the new thread.
pub fn stops_through(original: &ObjectFile, task_pointers: &[String]) -> bool {
    if task_pointers.is_empty() {
        return false;
    }
    for (index, section) in original.sections.iter().enumerate() {
        if !section.is_exec() {
            continue;
        }
        for r in &section.relocs {
            let called = &original.symbols[r.symbol].name;
            if !THREAD_STOPPERS.contains(&called.as_str()) {
                continue;
            }
            let Some(caller) = crate::diff::covering_symbol(original, index, r.offset as i64)
            else {
                return false;
            };
            let caller = &original.symbols[caller];
            let (start, end) = (caller.value, caller.value + caller.size.max(1));
            let reads_pointer = section
                .relocs
                .iter()
                .filter(|p| p.offset >= start && p.offset < end)
                .filter_map(|p| named_target(original, p))
                .any(|t| task_pointers.contains(&t.name));
            if !reads_pointer {
                return false;
            }
        }
    }
    true
}

/// Variables of `original` a thread's starters store the created task in
/// (what `kthread_run()`/`kthread_create()` returned), as (name, is
/// global): found by following the call's result through register copies
/// to a store into a variable.
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
        for target in created_tasks(original, section, s.value, s.value + s.size).stored {
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

/// Instructions after a thread-creating call within which its result is
/// stored, if it is.
const STORE_WINDOW: usize = 32;

/// Where code keeps the tasks it creates.
struct CreatedTasks<'o> {
    /// Variables a created task is stored in.
    stored: Vec<&'o crate::diff::object::Symbol>,
    /// A created task also went where a restart cannot follow it: into a
    /// structure, to a function other than those setting it up, or back
    /// to the caller.
    escapes: bool,
}

/// Calls that may be given a created task without keeping it.
const TASK_SETUP_CALLS: &[&str] = &[
    "wake_up_process",
    "kthread_bind",
    "kthread_bind_mask",
    "set_user_nice",
    "sched_set_fifo",
    "sched_set_fifo_low",
    "sched_set_normal",
    "sched_setattr_nocheck",
    "set_cpus_allowed_ptr",
];

/// Where code in `[start, end)` of `section` keeps the results of its
/// thread-creating calls.
fn created_tasks(original: &ObjectFile, section: usize, start: u64, end: u64) -> CreatedTasks<'_> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};
    let code = original.data(section);
    let (Some(bytes), relocs) = (
        code.get(start as usize..(end as usize).min(code.len())),
        &original.sections[section].relocs,
    ) else {
        return CreatedTasks {
            stored: Vec::new(),
            escapes: false,
        };
    };
    let reloc_at = |offset: u64| relocs.iter().find(|r| r.offset == offset);
    let calls_creator = |insn: &iced_x86::Instruction| {
        insn.flow_control() == FlowControl::Call
            && reloc_at(insn.ip() + insn.len() as u64 - 4).is_some_and(|r| {
                THREAD_CREATORS.contains(&original.symbols[r.symbol].name.as_str())
            })
    };
    let callee_saved = [
        Register::RBX,
        Register::RBP,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    let arguments = crate::diff::lines::ARGUMENT_REGISTERS;
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut escapes = false;
    // Registers holding the created task, and instructions left to watch.
    let mut holders: Vec<Register> = Vec::new();
    let mut left = 0;
    while decoder.can_decode() {
        let offsets_base = decoder.position();
        let insn = decoder.decode();
        if calls_creator(&insn) {
            holders = vec![Register::RAX];
            left = STORE_WINDOW;
            continue;
        }
        if left == 0 {
            continue;
        }
        left -= 1;
        let passed = holders.iter().any(|r| arguments.contains(r));
        match insn.flow_control() {
            FlowControl::Call | FlowControl::UnconditionalBranch if passed => {
                let callee = reloc_at(insn.ip() + insn.len() as u64 - 4)
                    .map(|r| original.symbols[r.symbol].name.as_str());
                escapes |= !callee.is_some_and(|c| TASK_SETUP_CALLS.contains(&c))
                    && (insn.flow_control() == FlowControl::Call || callee.is_some());
            }
            FlowControl::IndirectCall => escapes |= passed,
            FlowControl::Return => escapes |= holders.contains(&Register::RAX),
            _ => {}
        }
        if insn.flow_control() == FlowControl::Call {
            holders.retain(|r| callee_saved.contains(r));
        } else if insn.mnemonic() == Mnemonic::Mov && insn.op_count() == 2 {
            match (insn.op0_kind(), insn.op1_kind()) {
                (OpKind::Register, OpKind::Register) => {
                    let (to, from) = (
                        insn.op0_register().full_register(),
                        insn.op1_register().full_register(),
                    );
                    holders.retain(|&r| r != to);
                    if holders.contains(&from) {
                        holders.push(to);
                    }
                }
                (OpKind::Memory, OpKind::Register)
                    if insn.is_ip_rel_memory_operand()
                        && holders.contains(&insn.op1_register().full_register()) =>
                {
                    let offsets = decoder.get_constant_offsets(&insn);
                    let field =
                        start + (offsets_base as u64) + offsets.displacement_offset() as u64;
                    match reloc_at(field).and_then(|r| named_target(original, r)) {
                        Some(target) => out.push(target),
                        None => escapes = true,
                    }
                }
                (OpKind::Memory, OpKind::Register)
                    if holders.contains(&insn.op1_register().full_register()) =>
                {
                    escapes = true;
                }
                (OpKind::Register, _) => {
                    holders.retain(|&r| r != insn.op0_register().full_register())
                }
                _ => {}
            }
        } else if insn.op_count() > 0 && insn.op0_kind() == OpKind::Register {
            // Most instructions write their first operand; comparisons do not.
            if !matches!(insn.mnemonic(), Mnemonic::Cmp | Mnemonic::Test) {
                holders.retain(|&r| r != insn.op0_register().full_register());
            }
        }
        if holders.is_empty() {
            left = 0;
        }
    }
    CreatedTasks {
        stored: out,
        escapes,
    }
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
            if let Some(hazard) = &thread.stop_hazard {
                hazard.as_str()
            } else if thread.per_cpu {
                "per-CPU threads are parked and stopped by CPU hotplug"
            } else if thread.task_escapes {
                "its starter keeps the created task where a restart cannot switch it to the new thread"
            } else {
                "its file stops them with kthread_stop() other than through a task pointer it stores, \
                 and kthread_stop() needs the very task it started"
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
        let handed: Vec<&str> = point
            .old_locals
            .iter()
            .enumerate()
            .filter(|&(i, _)| located(i).0 > 0)
            .map(|(_, n)| n.as_str())
            .collect();
        parts.push(if handed.is_empty() {
            format!("runs {t}, which finds none of the old thread's locals")
        } else {
            format!(
                "runs {t}, which may read the old thread's {}",
                handed.join(", ")
            )
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_an_address_is_loaded_into() {
        let field = |prefix: &[u8]| {
            let mut code = prefix.to_vec();
            code.extend([0, 0, 0, 0]);
            loaded_into_register(&code, prefix.len())
        };
        assert_eq!(field(&[0x48, 0xc7, 0xc7]), Some(7)); // mov $f, %rdi
        assert_eq!(field(&[0x48, 0xc7, 0xc1]), Some(1)); // mov $f, %rcx
        assert_eq!(field(&[0x49, 0xc7, 0xc0]), Some(8)); // mov $f, %r8
        assert_eq!(field(&[0x48, 0x8d, 0x35]), Some(6)); // lea f(%rip), %rsi
        assert_eq!(field(&[0x4c, 0x8d, 0x0d]), Some(9)); // lea f(%rip), %r9
        assert_eq!(field(&[0xbf]), Some(7)); // mov $f, %edi
        assert_eq!(field(&[0xba]), Some(2)); // mov $f, %edx
        assert_eq!(field(&[0x41, 0xb9]), Some(9)); // mov $f, %r9d
        assert_eq!(field(&[0x48, 0xc7, 0x05]), None); // a store
        assert_eq!(field(&[0x68]), None); // push
        assert_eq!(field(&[]), None);
    }
}
