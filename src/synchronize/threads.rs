//! Restore points of kernel-thread main functions.
//!
//! A kernel thread restarted into a new version of its main function starts
//! that function from its beginning. Just before the new version's main
//! loop this stage writes a restore point: a restarted thread copies there
//! the locals the old thread had at the top of its function body, which
//! the update module saved where the old thread stopped (their places come
//! from the original build's debug info, `diff::frame_locals`). The
//! inserted text stays on the lines it is inserted into, so no `__LINE__`
//! of the file moves.

use super::{declared_identifier, macro_arguments, members, normalize, Source};
use super::{descendants, is_conditional_wait, is_static, is_unconditional_sleep, line_of};
use crate::error::Refusal;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tree_sitter::Node;

/// The macro a patch names a state-transfer function with (`dynamos.h`).
const STATE_MACRO: &str = "DYNAMOS_THREAD_STATE";

/// Calls that start a kernel thread running the function given first.
const THREAD_STARTERS: &[&str] = &[
    "kthread_run",
    "kthread_create",
    "kthread_create_on_node",
    "kthread_create_on_cpu",
    "kthread_run_on_cpu",
];

/// The most locals a restore point carries (`DYNAMOS_THREAD_LOCALS`).
pub const MAX_CARRIED: usize = 16;

/// A changed thread main function with a restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePoint {
    /// Source file, relative to the tree root.
    pub file: String,
    pub name: String,
    /// Function of the patched file returning its `struct dynamos_thread`.
    pub state_of: String,
    /// The original's locals at the top of its body, in the order the
    /// module saves them.
    pub old_locals: Vec<String>,
    /// Original locals the source alone rules out, with why.
    pub not_carriable: Vec<(String, String)>,
    /// Locals of the patched version, at the top of its body.
    pub new_locals: Vec<String>,
    /// New locals restored by name (same name and type in both versions).
    pub restored: Vec<String>,
    /// The patch's state-transfer function, if it names one.
    pub transfer: Option<String>,
    /// 1-based line of the patched main loop.
    pub line: usize,
}

/// A thread function for which no restore point was written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithoutRestorePoint {
    pub file: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct RestorePoints {
    pub points: Vec<RestorePoint>,
    pub without: Vec<WithoutRestorePoint>,
    /// Changed thread functions whose threads cannot be stopped safely
    /// where they sleep, with why.
    pub hazards: Vec<StopHazard>,
}

/// Why a thread of a changed thread function cannot be stopped where it
/// sleeps: it would exit holding a lock, or with an entry of its stack
/// still on a wait queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopHazard {
    pub file: String,
    pub name: String,
    pub reason: String,
}

/// Write a restore point into every changed thread main function of the
/// patched C files. `original` reads a file of the unpatched tree;
/// `skip` names functions updated otherwise (transitional clones).
pub fn add_restore_points(
    changes: &mut BTreeMap<PathBuf, Option<Vec<u8>>>,
    original: impl Fn(&Path) -> Option<Vec<u8>>,
    skip: &[String],
) -> Result<RestorePoints, Vec<Refusal>> {
    let mut out = RestorePoints::default();
    let mut refusals = Vec::new();
    for (path, content) in changes.iter_mut() {
        let Some(patched) = content else { continue };
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let file = path.to_string_lossy().into_owned();
        let transfers: BTreeMap<String, String> = macro_arguments(patched, STATE_MACRO)
            .into_iter()
            .filter(|a| a.len() == 2)
            .map(|a| (a[0].clone(), a[1].clone()))
            .collect();
        let Some(old) = original(path) else {
            refusals.extend(transfers.keys().map(|n| Refusal {
                symbol: n.clone(),
                reason: format!(
                    "{STATE_MACRO} names a function of {file}, which the patch creates"
                ),
            }));
            continue;
        };
        match restore_points_of(&file, &old, patched, &transfers, skip) {
            Ok((text, points, without, hazards)) => {
                *patched = text.into_bytes();
                out.points.extend(points);
                out.without.extend(without);
                out.hazards.extend(hazards);
            }
            Err(mut r) => refusals.append(&mut r),
        }
    }
    if refusals.is_empty() {
        Ok(out)
    } else {
        Err(refusals)
    }
}

type FileResult = (
    String,
    Vec<RestorePoint>,
    Vec<WithoutRestorePoint>,
    Vec<StopHazard>,
);

fn restore_points_of(
    file: &str,
    old: &[u8],
    patched: &[u8],
    transfers: &BTreeMap<String, String>,
    skip: &[String],
) -> Result<FileResult, Vec<Refusal>> {
    let unchanged = || {
        (
            String::from_utf8_lossy(patched).into_owned(),
            vec![],
            vec![],
            vec![],
        )
    };
    let (Some(old_source), Some(new_source)) = (Source::new(old), Source::new(patched)) else {
        return Ok(unchanged());
    };
    let old_definitions = old_source.definitions();
    let new_definitions = new_source.definitions();
    let started = started_threads(&old_source);
    let mut refusals: Vec<Refusal> = transfers
        .keys()
        .filter(|f| !started.contains(f))
        .map(|f| Refusal {
            symbol: f.clone(),
            reason: format!(
                "{STATE_MACRO} names a function {file} does not start kernel threads with"
            ),
        })
        .collect();
    let has_header = String::from_utf8_lossy(patched).contains("<dynamos.h>");
    let mut edits = Vec::new();
    let mut appended = String::new();
    let mut points = Vec::new();
    let mut without = Vec::new();
    let mut hazards = Vec::new();
    let mut first_definition: Option<usize> = None;
    for name in &started {
        let (Some(&old_def), Some(&new_def)) =
            (old_definitions.get(name), new_definitions.get(name))
        else {
            continue;
        };
        if skip.contains(name)
            || normalize(old_source.text_of(old_def)) == normalize(new_source.text_of(new_def))
        {
            continue;
        }
        // Apply stops threads of the original where they sleep, revert those of the patched.
        let hazard = stop_hazard(&old_source, old_def).or_else(|| {
            stop_hazard(&new_source, new_def).map(|r| format!("in the patched version, {r}"))
        });
        if let Some(reason) = hazard {
            hazards.push(StopHazard {
                file: file.to_string(),
                name: name.clone(),
                reason,
            });
            continue;
        }
        let transfer = transfers.get(name).cloned();
        let no_point = |reason: String| WithoutRestorePoint {
            file: file.to_string(),
            name: name.clone(),
            reason,
        };
        let (Some(old_loop), Some(new_loop)) = (
            main_loop(&old_source, old_def),
            main_loop(&new_source, new_def),
        ) else {
            if transfer.is_some() {
                refusals.push(Refusal {
                    symbol: name.clone(),
                    reason: format!(
                        "{STATE_MACRO} names it, but it has no loop at the top of its body to restore state before"
                    ),
                });
            } else {
                without.push(no_point("it has no loop at the top of its body".into()));
            }
            continue;
        };
        let (old_locals, not_carriable) = top_locals(&old_source, old_def, old_loop);
        let (new_locals, _) = top_locals(&new_source, new_def, new_loop);
        let old_locals: Vec<(String, String, String)> =
            old_locals.into_iter().take(MAX_CARRIED).collect();
        let mut restore = String::new();
        let mut restored = Vec::new();
        for (index, (local, member, init)) in old_locals.iter().enumerate() {
            // A changed initializer is the patch's own: the local starts with it.
            if new_locals
                .iter()
                .any(|(n, m, i)| n == local && m == member && i == init)
            {
                restore.push_str(&format!(
                    "if (__dynamos_old->carried & (1UL << {index})) __builtin_memcpy(&{local}, &__dynamos_old->value[{index}], sizeof({local}) < 8 ? sizeof({local}) : 8); "
                ));
                restored.push(local.clone());
            }
        }
        if let Some(t) = &transfer {
            let addresses: String = new_locals
                .iter()
                .map(|(n, _, _)| format!(", &{n}"))
                .collect();
            restore.push_str(&format!("{t}(__dynamos_old{addresses}); "));
        }
        let control = format!("__dynamos_thread_{name}");
        let state_of = format!("__dynamos_thread_state_of_{name}");
        // Woken early through a switched pointer, it waits for the old thread to stop.
        edits.push((
            new_loop.start_byte(),
            format!(
                "if (READ_ONCE({control}.restoring) == current) {{ struct dynamos_thread *__dynamos_old = &{control}; int __dynamos_wait = 10 * HZ; while (!smp_load_acquire(&__dynamos_old->ready) && __dynamos_wait-- > 0) schedule_timeout_uninterruptible(1); if (__dynamos_old->ready) {{ {restore}}} WRITE_ONCE(__dynamos_old->restoring, NULL); }} "
            ),
        ));
        first_definition =
            Some(first_definition.map_or(new_def.start_byte(), |f| f.min(new_def.start_byte())));
        let quoted: Vec<String> = old_locals
            .iter()
            .map(|(n, _, _)| format!("\"{n}\""))
            .collect();
        edits.push((new_def.start_byte(), format!(
            "static const char *const __dynamos_thread_names_{name}[] = {{ {} }}; static struct dynamos_thread {control} = {{ .names = __dynamos_thread_names_{name}, .count = {} }}; ",
            if quoted.is_empty() { "NULL".to_string() } else { quoted.join(", ") },
            old_locals.len()
        )));
        appended.push_str(&format!(
            "\n/* dynamos-build: the restore state of {name}'s restarted kernel threads, for the update module. */\n\
             struct dynamos_thread *{state_of}(void);\n\
             struct dynamos_thread *{state_of}(void)\n{{\n\treturn &{control};\n}}\n"
        ));
        points.push(RestorePoint {
            file: file.to_string(),
            name: name.clone(),
            state_of,
            old_locals: old_locals.into_iter().map(|(n, _, _)| n).collect(),
            not_carriable,
            new_locals: new_locals.into_iter().map(|(n, _, _)| n).collect(),
            restored,
            transfer,
            line: line_of(new_loop),
        });
    }
    if !refusals.is_empty() {
        return Err(refusals);
    }
    // Defined once, before the first function that uses it.
    if let (Some(at), false) = (first_definition, has_header) {
        edits.push((at, format!("{} ", one_line_struct())));
    }
    let mut text = patched.to_vec();
    // Stable, in reverse: of two insertions at one place, the struct (pushed
    // last) ends up first.
    edits.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, insert) in edits {
        text.splice(at..at, insert.into_bytes());
    }
    text.extend_from_slice(appended.as_bytes());
    Ok((
        String::from_utf8_lossy(&text).into_owned(),
        points,
        without,
        hazards,
    ))
}

/// `struct dynamos_thread` from `dynamos.h`, on one line.
fn one_line_struct() -> String {
    let header = crate::build::AUTHOR_HEADER;
    let start = header
        .find("struct dynamos_thread {")
        .expect("dynamos.h defines struct dynamos_thread");
    let end = start + header[start..].find("};").expect("the struct ends") + 2;
    let without_comments: String = header[start..end]
        .lines()
        .map(|l| l.split("/*").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ");
    normalize(&without_comments.replace("DYNAMOS_THREAD_LOCALS", &MAX_CARRIED.to_string()))
}

/// Functions of the file passed to a thread-starting call, in order.
fn started_threads(source: &Source) -> Vec<String> {
    let mut out = Vec::new();
    for n in descendants(source.tree.root_node()) {
        if n.kind() != "call_expression" {
            continue;
        }
        let Some(called) = super::called_name(source, n) else {
            continue;
        };
        if !THREAD_STARTERS.contains(&called) {
            continue;
        }
        let first = n
            .child_by_field_name("arguments")
            .and_then(|a| a.named_child(0))
            .filter(|a| a.kind() == "identifier");
        if let Some(first) = first {
            let name = source.text_of(first).to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The loop a thread function runs forever: the first loop statement at the
/// top of its body that sleeps, else the last one there.
fn main_loop<'t>(source: &Source, definition: Node<'t>) -> Option<Node<'t>> {
    let body = definition.child_by_field_name("body")?;
    let mut cursor = body.walk();
    let loops: Vec<Node> = body
        .named_children(&mut cursor)
        .filter(|c| {
            matches!(
                c.kind(),
                "for_statement" | "while_statement" | "do_statement"
            )
        })
        .collect();
    let sleeps = |l: &Node| {
        descendants(*l).iter().any(|n| {
            n.kind() == "call_expression"
                && super::called_name(source, *n)
                    .is_some_and(|c| is_unconditional_sleep(c) || is_conditional_wait(c))
        })
    };
    loops.iter().find(|l| sleeps(l)).or(loops.last()).copied()
}

/// Locals declared at the top of the body before `main_loop`, as (name,
/// declaration without qualifiers, initializer), and those that cannot be
/// carried, with why.
type TopLocals = (Vec<(String, String, String)>, Vec<(String, String)>);

fn top_locals(source: &Source, definition: Node, main_loop: Node) -> TopLocals {
    let mut carriable = Vec::new();
    let mut not = Vec::new();
    let Some(body) = definition.child_by_field_name("body") else {
        return (carriable, not);
    };
    let mut cursor = body.walk();
    for child in body.named_children(&mut cursor) {
        if child.start_byte() >= main_loop.start_byte() {
            break;
        }
        if child.kind() != "declaration" || is_static(source, child) {
            continue;
        }
        match members(source, child) {
            Ok(m) => {
                let inits = initializers(source, child);
                carriable.extend(m.into_iter().map(|(name, member)| {
                    let init = inits.get(&name).cloned().unwrap_or_default();
                    (name, member, init)
                }))
            }
            Err(why) => {
                let name = first_declared(source, child)
                    .unwrap_or_else(|| format!("line {}", line_of(child)));
                not.push((name, why));
            }
        }
    }
    (carriable, not)
}

/// Each variable's initializer in a declaration, normalized.
fn initializers(source: &Source, declaration: Node) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut cursor = declaration.walk();
    for d in declaration.children_by_field_name("declarator", &mut cursor) {
        if d.kind() != "init_declarator" {
            continue;
        }
        let (Some(plain), Some(value)) = (
            d.child_by_field_name("declarator"),
            d.child_by_field_name("value"),
        ) else {
            continue;
        };
        if let Some(id) = declared_identifier(plain) {
            out.insert(
                source.text_of(id).to_string(),
                normalize(source.text_of(value)),
            );
        }
    }
    out
}

/// Calls that take a lock (or enter a section) a thread must not exit in.
fn acquires(name: &str) -> bool {
    let exact = [
        "down",
        "down_interruptible",
        "down_killable",
        "down_timeout",
        "down_trylock",
        "rcu_read_lock",
        "rcu_read_lock_bh",
        "rcu_read_lock_sched",
        "srcu_read_lock",
        "rtnl_lock",
        "lock_sock",
        "preempt_disable",
        "local_irq_disable",
        "local_bh_disable",
        "mutex_trylock",
        "spin_trylock",
        "local_irq_save",
    ];
    let prefixes = [
        "mutex_lock",
        "down_read",
        "down_write",
        "spin_lock",
        "raw_spin_lock",
        "read_lock",
        "write_lock",
    ];
    !name.ends_with("_init")
        && (exact.contains(&name) || prefixes.iter().any(|p| name.starts_with(p)))
}

/// Calls that give back what [`acquires`] took.
fn releases(name: &str) -> bool {
    let exact = [
        "up",
        "rcu_read_unlock",
        "rcu_read_unlock_bh",
        "rcu_read_unlock_sched",
        "srcu_read_unlock",
        "rtnl_unlock",
        "release_sock",
        "preempt_enable",
        "local_irq_enable",
        "local_bh_enable",
        "local_irq_restore",
    ];
    let prefixes = [
        "mutex_unlock",
        "up_read",
        "up_write",
        "spin_unlock",
        "raw_spin_unlock",
        "read_unlock",
        "write_unlock",
    ];
    exact.contains(&name) || prefixes.iter().any(|p| name.starts_with(p))
}

/// Why a thread of `definition` cannot be stopped where it sleeps, if it
/// cannot: a sleep after a lock taken earlier in the function and not yet
/// given back (counted in text order, which also covers a loop that takes
/// and releases it around the sleep), or a wait on an entry of its own
/// stack (`wait_event*()` and friends queue one and sleep in `schedule()`:
/// a thread stopped there would leave it queued).
fn stop_hazard(source: &Source, definition: Node) -> Option<String> {
    let body = definition.child_by_field_name("body")?;
    let text = source.text_of(body);
    for queued in ["DEFINE_WAIT", "DECLARE_WAITQUEUE", "DEFINE_WAIT_FUNC"] {
        if text.contains(queued) {
            return Some(format!(
                "it declares a wait-queue entry on its stack ({queued}): a thread stopped where it sleeps would leave the entry queued"
            ));
        }
    }
    let mut calls: Vec<Node> = descendants(body)
        .into_iter()
        .filter(|n| n.kind() == "call_expression")
        .collect();
    calls.sort_by_key(|n| n.start_byte());
    let mut held: Vec<(String, usize)> = Vec::new();
    for call in calls {
        let Some(name) = super::called_name(source, call) else {
            continue;
        };
        if name.starts_with("wait_event")
            || name.starts_with("wait_var_event")
            || name.starts_with("prepare_to_wait")
            || name.starts_with("add_wait_queue")
        {
            return Some(format!(
                "it sleeps in {name}() at line {}, on a wait-queue entry of its stack: a thread stopped there would leave the entry queued",
                line_of(call)
            ));
        }
        if acquires(name) {
            held.push((name.to_string(), line_of(call)));
        } else if releases(name) {
            held.pop();
        } else if is_unconditional_sleep(name) || is_conditional_wait(name) {
            if let Some((lock, at)) = held.last() {
                return Some(format!(
                    "it sleeps in {name}() at line {} after {lock}() at line {at}: a thread stopped there would exit holding it",
                    line_of(call)
                ));
            }
        }
    }
    None
}

/// The first variable a declaration names.
fn first_declared(source: &Source, declaration: Node) -> Option<String> {
    let declarator = declaration.child_by_field_name("declarator")?;
    let plain = if declarator.kind() == "init_declarator" {
        declarator.child_by_field_name("declarator")?
    } else {
        declarator
    };
    declared_identifier(plain).map(|id| source.text_of(id).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"// SPDX-License-Identifier: GPL-2.0
#include <linux/kthread.h>

static struct task_struct *counter_task;

static int counter_thread(void *data)
{
	unsigned long count = 0;
	int errors[2];

	set_freezable();
	while (!kthread_should_stop()) {
		count++;
		pr_info("count %lu\n", count);
		schedule_timeout_interruptible(HZ);
	}
	return 0;
}

static int __init start(void)
{
	counter_task = kthread_run(counter_thread, NULL, "counter");
	return 0;
}
"#;

    fn patched() -> String {
        ORIGINAL.replace("pr_info(\"count", "pr_info(\"new count")
    }

    fn run(patched: &str) -> Result<(String, RestorePoints), Vec<Refusal>> {
        let mut changes = BTreeMap::new();
        changes.insert(
            PathBuf::from("drivers/counter.c"),
            Some(patched.as_bytes().to_vec()),
        );
        let points = add_restore_points(&mut changes, |_| Some(ORIGINAL.into()), &[])?;
        let text = String::from_utf8(changes.into_values().next().unwrap().unwrap()).unwrap();
        Ok((text, points))
    }

    #[test]
    fn a_changed_thread_function_restores_its_top_locals_before_its_loop() {
        let (text, points) = run(&patched()).unwrap();
        let point = &points.points[0];
        assert_eq!(point.name, "counter_thread");
        assert_eq!(point.old_locals, ["count"]);
        assert_eq!(point.restored, ["count"]);
        assert_eq!(point.not_carriable[0].0, "errors");
        assert_eq!(point.line, 12);
        // No line moves: every inserted statement shares an existing line.
        let before_appended = &text[..text.find("\n/* dynamos-build").unwrap()];
        assert_eq!(before_appended.lines().count(), patched().lines().count());
        let line = text.lines().nth(11).unwrap();
        assert!(
            line.contains("__dynamos_thread_counter_thread.restoring) == current"),
            "{line}"
        );
        assert!(line.ends_with("while (!kthread_should_stop()) {"), "{line}");
        assert!(text
            .lines()
            .nth(5)
            .unwrap()
            .contains("struct dynamos_thread {"));
        assert!(text
            .contains("struct dynamos_thread *__dynamos_thread_state_of_counter_thread(void)\n{"));
    }

    #[test]
    fn a_state_transfer_function_gets_the_new_locals() {
        let with = patched()
            .replace(
                "static int __init start",
                "DYNAMOS_THREAD_STATE(counter_thread, carry);\nstatic int __init start",
            )
            .replace(
                "#include <linux/kthread.h>",
                "#include <linux/kthread.h>\n#include <dynamos.h>",
            );
        let (text, points) = run(&with).unwrap();
        assert_eq!(points.points[0].transfer.as_deref(), Some("carry"));
        assert!(text.contains("carry(__dynamos_old, &count); "), "{text}");
        // The header defines the struct: it is not written again.
        assert!(!text.contains("struct dynamos_thread {"));
    }

    #[test]
    fn a_changed_initializer_is_not_restored() {
        let changed = patched().replace("unsigned long count = 0;", "unsigned long count = 100;");
        let (_, points) = run(&changed).unwrap();
        assert_eq!(points.points[0].old_locals, ["count"]);
        assert!(points.points[0].restored.is_empty());
    }

    #[test]
    fn threads_that_cannot_stop_where_they_sleep_get_a_hazard() {
        let locked = patched().replace(
            "\t\tschedule_timeout_interruptible(HZ);",
            "\t\tmutex_lock(&m);\n\t\tmsleep(10);\n\t\tmutex_unlock(&m);\n\t\tschedule_timeout_interruptible(HZ);",
        );
        let (text, points) = run(&locked).unwrap();
        assert!(points.points.is_empty());
        assert!(!text.contains("dynamos_thread"));
        let reason = &points.hazards[0].reason;
        assert!(
            reason.starts_with("in the patched version, it sleeps in msleep() at line 16 after mutex_lock() at line 15"),
            "{reason}"
        );
        // Taken and given back around the sleep, in loop order: no hazard.
        let around = patched().replace(
            "\t\tcount++;",
            "\t\tmutex_lock(&m);\n\t\tcount++;\n\t\tmutex_unlock(&m);",
        );
        assert!(run(&around).unwrap().1.hazards.is_empty());
        let waits = patched().replace(
            "schedule_timeout_interruptible(HZ);",
            "wait_event_interruptible(wq, count > 3);",
        );
        let reason = &run(&waits).unwrap().1.hazards[0].reason;
        assert!(
            reason.contains("wait_event_interruptible() at line 15, on a wait-queue entry"),
            "{reason}"
        );
    }

    #[test]
    fn unchanged_and_loopless_functions_get_none() {
        let (text, points) = run(ORIGINAL).unwrap();
        assert_eq!(text, ORIGINAL);
        assert!(points.points.is_empty());
        let refused = run(&patched().replace(
            "static int __init start",
            "DYNAMOS_THREAD_STATE(start, carry);\nstatic int __init start",
        ))
        .unwrap_err();
        assert_eq!(refused[0].symbol, "start");
    }
}
