//! Synchronize stage, between patch and build: for every function a patch
//! names with `DYNAMOS_SYNCHRONIZED`, write its transitional clone into the
//! patched source, so the build compiles it with the rest of the file.
//!
//! The clone holds two bodies: the original function's and the patched
//! one's. After each sleep point of either body (a `wait_event*` statement
//! found in both versions with the same text) a task leaves for the same
//! point of the other body when the update's module asks it to, carrying
//! the locals in scope there. The wait condition is extended with that
//! request, so a wake-up without a signal gets a sleeper out.
//! docs/synchronized-updates.md describes the phases; this module only
//! understands C (with tree-sitter) and writes the clone.

use crate::error::{Error, Refusal};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tree_sitter::{Node, Parser, Tree};

pub mod threads;

/// The macro a patch uses to name a synchronized function (`dynamos.h`).
const MACRO: &str = "DYNAMOS_SYNCHRONIZED";
/// The macro that pairs sleep points by order where their text differs.
const MATCH_MACRO: &str = "DYNAMOS_SLEEP_POINTS_MATCH";

/// Sleeping calls with a wait condition the clone can extend: the
/// condition is always their second argument.
fn is_conditional_wait(name: &str) -> bool {
    name.starts_with("wait_event") || name.starts_with("wait_var_event")
}

/// Sleeping calls without a condition: a task asleep there could only be
/// moved by a signal.
fn is_unconditional_sleep(name: &str) -> bool {
    [
        "schedule",
        "schedule_timeout",
        "schedule_timeout_interruptible",
        "schedule_timeout_killable",
        "schedule_timeout_uninterruptible",
        "schedule_timeout_idle",
        "schedule_hrtimeout",
        "schedule_hrtimeout_range",
        "io_schedule",
        "io_schedule_timeout",
        "freezable_schedule",
        "freezable_schedule_timeout",
        "msleep",
        "msleep_interruptible",
        "ssleep",
        "usleep_range",
    ]
    .contains(&name)
        || name.starts_with("wait_for_completion")
}

/// Whether a call of `name` is one a task sleeps in.
pub fn is_sleeping_call(name: &str) -> bool {
    is_unconditional_sleep(name)
        || is_conditional_wait(name)
        || name.starts_with("__wait_event")
        || name.starts_with("schedule")
        || name.starts_with("freezable_schedule")
}

/// One function updated through a transitional clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynchronizedFunction {
    /// Source file, relative to the tree root.
    pub file: String,
    pub name: String,
    /// The clone's entry point: what calls of `name` are redirected to.
    pub entry: String,
    /// Function returning the clone's `struct dynamos_sync`.
    pub control: String,
    pub sleep_points: Vec<SleepPoint>,
    /// The adaptation handler that chooses which calls start, and which
    /// sleepers continue, in the patched code.
    pub handler: Option<String>,
}

/// A statement where tasks sleep, found in both versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SleepPoint {
    /// The sleeping call, e.g. `wait_event_interruptible_exclusive`.
    pub call: String,
    /// 1-based lines in the original and the patched file.
    pub original_line: usize,
    pub patched_line: usize,
    /// Locals carried from one body to the other at this point.
    pub carried: Vec<String>,
}

impl SleepPoint {
    pub fn describe(&self) -> String {
        format!(
            "{}() at line {} (carries {})",
            self.call,
            self.original_line,
            if self.carried.is_empty() {
                "no locals".to_string()
            } else {
                self.carried.join(", ")
            }
        )
    }
}

/// The patched files with their clones, and what was cloned.
pub struct Synchronized {
    pub changes: BTreeMap<PathBuf, Option<Vec<u8>>>,
    pub functions: Vec<SynchronizedFunction>,
    /// Restore points written into changed kernel-thread main functions.
    pub restore_points: threads::RestorePoints,
}

/// Add the clones of every function the patched files name with
/// `DYNAMOS_SYNCHRONIZED`. `original` reads a file of the unpatched tree.
pub fn add_transitional_clones(
    mut changes: BTreeMap<PathBuf, Option<Vec<u8>>>,
    original: impl Fn(&Path) -> Option<Vec<u8>>,
) -> Result<Synchronized> {
    let mut functions = Vec::new();
    let mut refusals = Vec::new();
    let headers: Vec<String> = changes
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e != "c"))
        .map(|p| p.display().to_string())
        .collect();
    for (path, content) in changes.iter_mut() {
        let Some(patched) = content else { continue };
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let names = declared_names(patched);
        if names.is_empty() {
            continue;
        }
        let file = path.to_string_lossy().into_owned();
        let Some(old) = original(path) else {
            refusals.extend(names.iter().map(|n| Refusal {
                symbol: n.clone(),
                reason: format!("{MACRO} names a function of {file}, which the patch creates"),
            }));
            continue;
        };
        if let Some(header) = headers.first() {
            refusals.extend(names.iter().map(|n| Refusal {
                symbol: n.clone(),
                reason: format!(
                    "the patch also changes {header}, which the transitional clone's original code would be compiled with"
                ),
            }));
            continue;
        }
        let mut appended = String::new();
        for name in &names {
            let handler = declared_handler(patched, name);
            match transitional_clone(&file, name, handler.as_deref(), &old, patched) {
                Ok((text, function)) => {
                    appended.push_str(&text);
                    functions.push(function);
                }
                Err(reason) => refusals.push(Refusal {
                    symbol: name.clone(),
                    reason,
                }),
            }
        }
        patched.extend_from_slice(appended.as_bytes());
    }
    let cloned: Vec<String> = functions.iter().map(|f| f.name.clone()).collect();
    let restore_points = match threads::add_restore_points(&mut changes, &original, &cloned) {
        Ok(points) => points,
        Err(mut r) => {
            refusals.append(&mut r);
            threads::RestorePoints::default()
        }
    };
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(Synchronized {
        changes,
        functions,
        restore_points,
    })
}

/// The identifier arguments of every `MACRO(a, b, ...)` line of a file.
fn macro_arguments(text: &[u8], macro_name: &str) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(text);
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix(macro_name) else {
            continue;
        };
        let Some(inner) = rest.trim_start().strip_prefix('(') else {
            continue;
        };
        let Some((inner, _)) = inner.split_once(')') else {
            continue;
        };
        let arguments: Vec<String> = inner.split(',').map(|a| a.trim().to_string()).collect();
        let identifiers = arguments
            .iter()
            .all(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if identifiers && !out.contains(&arguments) {
            out.push(arguments);
        }
    }
    out
}

/// The locals `function` of a C file declares (statics excepted), in
/// order; None when the file does not define it.
pub fn locals_of(text: &[u8], function: &str) -> Option<Vec<String>> {
    let source = Source::new(text)?;
    let definitions = source.definitions();
    let body = definitions.get(function)?.child_by_field_name("body")?;
    let mut out = Vec::new();
    for n in descendants(body) {
        if n.kind() != "declaration" || is_static(&source, n) {
            continue;
        }
        let mut cursor = n.walk();
        let declarators: Vec<Node> = n
            .children_by_field_name("declarator", &mut cursor)
            .collect();
        for d in declarators {
            let plain = if d.kind() == "init_declarator" {
                d.child_by_field_name("declarator").unwrap_or(d)
            } else {
                d
            };
            if let Some(id) = declared_identifier(plain) {
                let name = source.text_of(id).to_string();
                if plain.kind() != "function_declarator" && !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    Some(out)
}

/// Functions named by `DYNAMOS_SYNCHRONIZED(name);` lines of a file.
fn declared_names(text: &[u8]) -> Vec<String> {
    macro_arguments(text, MACRO)
        .into_iter()
        .filter(|a| a.len() == 1)
        .map(|mut a| a.remove(0))
        .collect()
}

/// The adaptation handler a file declares for `function`, if any.
fn declared_handler(text: &[u8], function: &str) -> Option<String> {
    macro_arguments(text, "DYNAMOS_ADAPTATION_HANDLER")
        .into_iter()
        .find(|a| a.len() == 2 && a[0] == function)
        .map(|a| a[1].clone())
}

fn parse(text: &[u8]) -> Option<Tree> {
    let mut parser = Parser::new();
    parser.set_language(&tree_sitter_c::LANGUAGE.into()).ok()?;
    parser.parse(text, None)
}

/// A parsed file with the text its nodes index.
struct Source<'a> {
    text: &'a [u8],
    tree: Tree,
}

impl<'a> Source<'a> {
    fn new(text: &'a [u8]) -> Option<Source<'a>> {
        Some(Source {
            text,
            tree: parse(text)?,
        })
    }

    fn text_of(&self, node: Node) -> &'a str {
        std::str::from_utf8(&self.text[node.byte_range()]).unwrap_or("")
    }

    /// Function definitions by name: top level, or inside a stretch the
    /// parser could not read (a macro it does not know, before them).
    fn definitions(&self) -> BTreeMap<String, Node<'_>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.tree.root_node()];
        while let Some(node) = stack.pop() {
            let mut cursor = node.walk();
            for child in node.named_children(&mut cursor) {
                match child.kind() {
                    "function_definition" => {
                        if let Some(name) = function_name(child) {
                            out.entry(self.text_of(name).to_string()).or_insert(child);
                        }
                    }
                    "ERROR" | "preproc_if" | "preproc_ifdef" | "preproc_else" | "preproc_elif" => {
                        stack.push(child)
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// The identifier a function definition defines.
fn function_name(definition: Node) -> Option<Node> {
    let mut declarator = definition.child_by_field_name("declarator")?;
    loop {
        match declarator.kind() {
            "function_declarator" => {
                let inner = declarator.child_by_field_name("declarator")?;
                return (inner.kind() == "identifier").then_some(inner);
            }
            _ => declarator = declarator.child_by_field_name("declarator")?,
        }
    }
}

/// The identifier a (possibly pointer, array or initialised) declarator names.
fn declared_identifier(mut declarator: Node) -> Option<Node> {
    loop {
        match declarator.kind() {
            "identifier" => return Some(declarator),
            "parenthesized_declarator" => declarator = declarator.named_child(0)?,
            _ => declarator = declarator.child_by_field_name("declarator")?,
        }
    }
}

fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn line_of(node: Node) -> usize {
    node.start_position().row + 1
}

/// Every descendant of `node`, depth first.
fn descendants(node: Node) -> Vec<Node> {
    let mut out = Vec::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        out.push(n);
        let mut cursor = n.walk();
        let children: Vec<Node> = n.children(&mut cursor).collect();
        stack.extend(children.into_iter().rev());
    }
    out
}

/// A call in a body, by the name it calls.
fn called_name<'a>(source: &Source<'a>, call: Node) -> Option<&'a str> {
    let function = call.child_by_field_name("function")?;
    (function.kind() == "identifier").then(|| source.text_of(function))
}

/// One body of the function, analysed.
struct Body<'s, 'a> {
    source: &'s Source<'a>,
    node: Node<'s>,
    points: Vec<Point<'s>>,
}

/// A sleep point of one body.
struct Point<'s> {
    call: Node<'s>,
    name: String,
    /// The statement holding the call, a child of a block.
    statement: Node<'s>,
    /// Locals in scope at the statement: name → declaration as a struct
    /// member (qualifiers dropped).
    locals: BTreeMap<String, String>,
}

/// Macro definitions of a file by name, as text.
fn macros(source: &Source) -> BTreeMap<String, String> {
    descendants(source.tree.root_node())
        .into_iter()
        .filter(|n| matches!(n.kind(), "preproc_def" | "preproc_function_def"))
        .filter_map(|n| {
            let name = n.child_by_field_name("name")?;
            Some((
                source.text_of(name).to_string(),
                normalize(source.text_of(n)),
            ))
        })
        .collect()
}

/// Identifiers a definition uses.
fn identifiers(source: &Source, definition: Node) -> BTreeSet<String> {
    descendants(definition)
        .into_iter()
        .filter(|n| n.kind() == "identifier")
        .map(|n| source.text_of(n).to_string())
        .collect()
}

/// Locals whose address a body takes (`&name`).
fn addressed(source: &Source, body: Node) -> BTreeSet<String> {
    descendants(body)
        .into_iter()
        .filter(|n| n.kind() == "pointer_expression" && source.text_of(*n).starts_with('&'))
        .filter_map(|n| n.child_by_field_name("argument").and_then(expression))
        .filter(|n| n.kind() == "identifier")
        .map(|n| source.text_of(n).to_string())
        .collect()
}

impl<'s, 'a> Body<'s, 'a> {
    /// Calls made by the body of `definition`.
    fn calls_of(source: &Source, definition: Node) -> Result<BTreeSet<String>, ()> {
        let body = definition.child_by_field_name("body").ok_or(())?;
        Ok(descendants(body)
            .into_iter()
            .filter(|n| n.kind() == "call_expression")
            .filter_map(|n| called_name(source, n))
            .map(str::to_string)
            .collect())
    }

    fn new(source: &'s Source<'a>, definition: Node<'s>, function: &str) -> Result<Self, String> {
        let node = definition
            .child_by_field_name("body")
            .ok_or_else(|| format!("cannot find the body of {function}"))?;
        let mut points = Vec::new();
        for n in descendants(node) {
            if n.kind() == "declaration" && is_static(source, n) {
                return Err(format!(
                    "has a static local at line {}: the clone would have a copy of its own",
                    line_of(n)
                ));
            }
            if n.kind() != "call_expression" {
                continue;
            }
            let Some(name) = called_name(source, n) else {
                continue;
            };
            if is_unconditional_sleep(name) {
                return Err(format!(
                    "sleeps in {name}() at line {}, which has no wait condition a transitional clone can extend",
                    line_of(n)
                ));
            }
            if !is_conditional_wait(name) {
                continue;
            }
            let statement = enclosing_statement(n)
                .filter(|s| s.kind() != "ERROR")
                .ok_or_else(|| {
                    format!(
                        "cannot place the sleep point {name}() at line {}",
                        line_of(n)
                    )
                })?;
            check_statement_shape(source, statement, n, name)?;
            let locals = locals_in_scope(source, statement, node)?;
            points.push(Point {
                call: n,
                name: name.to_string(),
                statement,
                locals,
            });
        }
        Ok(Body {
            source,
            node,
            points,
        })
    }

    /// Labels defined in this body.
    fn labels(&self) -> BTreeSet<String> {
        descendants(self.node)
            .into_iter()
            .filter(|n| n.kind() == "labeled_statement")
            .filter_map(|n| n.child_by_field_name("label"))
            .map(|l| self.source.text_of(l).to_string())
            .collect()
    }

    /// Calls of the body by name.
    fn calls(&self) -> BTreeSet<String> {
        descendants(self.node)
            .into_iter()
            .filter(|n| n.kind() == "call_expression")
            .filter_map(|n| called_name(self.source, n))
            .map(str::to_string)
            .collect()
    }
}

fn is_static(source: &Source, declaration: Node) -> bool {
    let mut cursor = declaration.walk();
    let found = declaration
        .children(&mut cursor)
        .any(|c| c.kind() == "storage_class_specifier" && source.text_of(c) == "static");
    found
}

/// The statement that holds `call` and sits directly in a block (or a
/// `case`): what a task has finished when it wakes.
fn enclosing_statement(call: Node) -> Option<Node> {
    let mut node = call;
    loop {
        let parent = node.parent()?;
        if matches!(parent.kind(), "compound_statement" | "case_statement") {
            return Some(node);
        }
        node = parent;
    }
}

/// A sleeper asked to leave returns from the wait as if its condition had
/// come true (0, or the time left for a `_timeout` wait); the statement
/// holding the wait must do nothing with that but fall through to the leave
/// check after it. Accepted: the wait alone, an assignment of its value, or
/// an `if` without `else` whose branch is taken only on failure.
fn check_statement_shape(
    source: &Source,
    statement: Node,
    call: Node,
    name: &str,
) -> Result<(), String> {
    let refuse = || {
        Err(format!(
            "its sleep point {name}() at line {} is used in a way a sleeper asked to leave would misread (only `{name}(...);`, `x = {name}(...);` and `if` on its failure are understood)",
            line_of(call)
        ))
    };
    if statement
        .parent()
        .is_some_and(|p| p.kind() == "case_statement")
    {
        return Err(format!(
            "its sleep point {name}() at line {} is in a `case` of a switch, whose locals cannot be listed",
            line_of(call)
        ));
    }
    match statement.kind() {
        "expression_statement" => {
            let Some(e) = statement.named_child(0).and_then(expression) else {
                return refuse();
            };
            if e.id() == call.id() {
                return Ok(());
            }
            if e.kind() == "assignment_expression"
                && e.child_by_field_name("right")
                    .and_then(expression)
                    .is_some_and(|r| r.id() == call.id())
            {
                return Ok(());
            }
            refuse()
        }
        "if_statement" => {
            if statement.child_by_field_name("alternative").is_some() {
                return refuse();
            }
            let Some(condition) = statement
                .child_by_field_name("condition")
                .and_then(expression)
            else {
                return refuse();
            };
            let timeout = name.contains("timeout");
            let is_call =
                |n: Option<Node>| n.and_then(expression).is_some_and(|n| n.id() == call.id());
            let is_zero = |n: Option<Node>| n.is_some_and(|n| source.text_of(n).trim() == "0");
            let failure_only = if condition.id() == call.id() {
                // nonzero: an error, or for a timeout wait the time left
                !timeout
            } else if condition.kind() == "unary_expression" {
                source.text_of(condition).trim_start().starts_with('!')
                    && is_call(condition.child_by_field_name("argument"))
                    && timeout
            } else if condition.kind() == "binary_expression" {
                let operator = condition
                    .child_by_field_name("operator")
                    .map(|o| source.text_of(o))
                    .unwrap_or("");
                is_call(condition.child_by_field_name("left"))
                    && is_zero(condition.child_by_field_name("right"))
                    && match operator {
                        "<" => true,
                        "!=" => !timeout,
                        "==" | "<=" => timeout,
                        _ => false,
                    }
            } else {
                false
            };
            if failure_only {
                Ok(())
            } else {
                refuse()
            }
        }
        _ => refuse(),
    }
}

/// An expression without the parentheses around it.
fn expression(mut n: Node) -> Option<Node> {
    while n.kind() == "parenthesized_expression" {
        n = n.named_child(0)?;
    }
    Some(n)
}

/// Whether a preprocessor conditional at block level declares locals in
/// one of its branches.
fn conditionally_declares(source: &Source, conditional: Node) -> bool {
    let mut cursor = conditional.walk();
    let children: Vec<Node> = conditional.named_children(&mut cursor).collect();
    children.into_iter().any(|c| {
        c.kind() == "declaration"
            || declares_through_macro(source, c).is_some()
            || (c.kind().starts_with("preproc_") && conditionally_declares(source, c))
    })
}

/// Calls at block level that declare a variable through a macro
/// (`DEFINE_WAIT(w);`), which the parser reads as calls.
fn declares_through_macro(source: &Source, statement: Node) -> Option<String> {
    if statement.kind() != "expression_statement" {
        return None;
    }
    let call = statement.named_child(0)?;
    if call.kind() != "call_expression" {
        return None;
    }
    let name = called_name(source, call)?;
    let declares = name.starts_with("DEFINE_")
        || name.starts_with("DECLARE_")
        || name.ends_with("_HEAD")
        || matches!(name, "guard" | "scoped_guard" | "LIST_HEAD");
    declares.then(|| name.to_string())
}

/// Locals declared before `statement` in the blocks around it, up to the
/// function body.
fn locals_in_scope(
    source: &Source,
    statement: Node,
    body: Node,
) -> Result<BTreeMap<String, String>, String> {
    let mut locals = BTreeMap::new();
    let mut child = statement;
    while child.id() != body.id() {
        let Some(parent) = child.parent() else { break };
        if parent.kind() == "ERROR" {
            return Err(format!(
                "cannot read the code around its sleep point at line {} as C",
                line_of(statement)
            ));
        }
        let mut cursor = parent.walk();
        for sibling in parent.children(&mut cursor) {
            if sibling.id() == child.id() {
                break;
            }
            if sibling.kind().starts_with("preproc_") && conditionally_declares(source, sibling) {
                return Err(format!(
                    "declares locals under a preprocessor conditional at line {} before its sleep point at line {}: they cannot be listed",
                    line_of(sibling),
                    line_of(statement)
                ));
            }
            if let Some(macro_name) = declares_through_macro(source, sibling) {
                return Err(format!(
                    "declares a local with {macro_name}() at line {} before its sleep point at line {}: it cannot be carried",
                    line_of(sibling),
                    line_of(statement)
                ));
            }
            // A declaration the parser could not read may hide a local.
            if sibling.kind() == "ERROR" || (sibling.kind() == "declaration" && sibling.has_error())
            {
                return Err(format!(
                    "cannot read line {} as C, so the locals in scope at its sleep point at line {} are not known",
                    line_of(sibling),
                    line_of(statement)
                ));
            }
            if sibling.kind() == "declaration" {
                if is_static(source, sibling) {
                    continue;
                }
                for (name, member) in members(source, sibling)? {
                    if locals.insert(name.clone(), member).is_some() {
                        return Err(format!(
                            "has two locals named `{name}` in scope at its sleep point at line {}",
                            line_of(statement)
                        ));
                    }
                }
            }
        }
        if parent.kind() == "for_statement" {
            if let Some(init) = parent.child_by_field_name("initializer") {
                if init.kind() == "declaration" && init.id() != child.id() {
                    for (name, member) in members(source, init)? {
                        if locals.insert(name.clone(), member).is_some() {
                            return Err(format!(
                                "has two locals named `{name}` in scope at its sleep point at line {}",
                                line_of(statement)
                            ));
                        }
                    }
                }
            }
        }
        child = parent;
    }
    Ok(locals)
}

/// The variables one declaration declares, each as a struct member.
fn members(source: &Source, declaration: Node) -> Result<Vec<(String, String)>, String> {
    let mut cursor = declaration.walk();
    let children: Vec<(Option<&str>, Node)> = declaration
        .children(&mut cursor)
        .enumerate()
        .map(|(i, c)| (declaration.field_name_for_child(i as u32), c))
        .collect();
    let first_declarator = children
        .iter()
        .find(|(field, _)| *field == Some("declarator"))
        .map(|(_, n)| n.start_byte())
        .unwrap_or(declaration.end_byte());
    let specifiers =
        std::str::from_utf8(&source.text[declaration.start_byte()..first_declarator]).unwrap_or("");
    let mut out = Vec::new();
    for (_, declarator) in children.iter().filter(|(f, _)| *f == Some("declarator")) {
        let plain = if declarator.kind() == "init_declarator" {
            declarator
                .child_by_field_name("declarator")
                .unwrap_or(*declarator)
        } else {
            *declarator
        };
        if plain.kind() == "function_declarator" {
            continue; // a local prototype declares no variable
        }
        let name = declared_identifier(plain)
            .map(|n| source.text_of(n).to_string())
            .ok_or_else(|| {
                format!(
                    "cannot read the local declared at line {}",
                    line_of(declaration)
                )
            })?;
        let qualified = |n: Node, qualifier: &str| {
            let mut cursor = n.walk();
            let found = n
                .children(&mut cursor)
                .any(|c| c.kind() == "type_qualifier" && source.text_of(c) == qualifier);
            found
        };
        let storage = |class: &str| {
            let mut cursor = declaration.walk();
            let found = declaration
                .children(&mut cursor)
                .any(|c| c.kind() == "storage_class_specifier" && source.text_of(c) == class);
            found
        };
        let declaration_text = source.text_of(declaration);
        let refusal = if storage("extern") {
            Some("is an extern declaration")
        } else if (qualified(declaration, "const") && plain.kind() != "pointer_declarator")
            || (plain.kind() == "pointer_declarator" && qualified(plain, "const"))
        {
            Some("is const: the compiler may use its initial value wherever it is read")
        } else if plain.kind() == "array_declarator" {
            Some("is an array: pointers into it would not follow it")
        } else if declaration_text.contains("__free(") || declaration_text.contains("cleanup(") {
            Some("has a cleanup handler, which leaving its block would run")
        } else {
            None
        };
        if let Some(why) = refusal {
            return Err(format!(
                "its local `{name}` (line {}) {why}",
                line_of(declaration)
            ));
        }
        let member = unqualified(&format!("{specifiers} {}", source.text_of(plain)));
        out.push((name, member));
    }
    Ok(out)
}

/// A declaration without `const` and `volatile`: the state copy writes it.
fn unqualified(text: &str) -> String {
    let spaced = text.replace('*', " * ");
    normalize(
        &spaced
            .split_whitespace()
            .filter(|w| !matches!(*w, "const" | "volatile"))
            .collect::<Vec<_>>()
            .join(" "),
    )
    .replace(" * ", " *")
    .replace("* ", "*")
}

/// A text edit of one body.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// The text with `edits` made; None when two of them overlap.
fn apply_edits(text: &str, base: usize, mut edits: Vec<Edit>) -> Option<String> {
    edits.sort_by_key(|e| std::cmp::Reverse((e.start, e.end)));
    let mut out = text.to_string();
    let mut limit = usize::MAX;
    for e in edits {
        if e.end > limit || e.start < base || e.end - base > text.len() {
            return None;
        }
        limit = e.start;
        out.replace_range(e.start - base..e.end - base, &e.text);
    }
    Some(out)
}

/// The part of a function definition before its body, with the name
/// replaced and `static`/`inline` dropped.
fn header(
    source: &Source,
    definition: Node,
    new_name: &str,
    extra_parameter: Option<&str>,
) -> String {
    let name = function_name(definition).expect("checked");
    let body = definition.child_by_field_name("body").expect("checked");
    let mut edits = vec![Edit {
        start: name.start_byte(),
        end: name.end_byte(),
        text: new_name.to_string(),
    }];
    let mut cursor = definition.walk();
    for c in definition.children(&mut cursor) {
        let text = source.text_of(c);
        if (c.kind() == "storage_class_specifier" && text == "static")
            || (c.kind() == "storage_class_specifier" && text == "inline")
        {
            edits.push(Edit {
                start: c.start_byte(),
                end: c.end_byte(),
                text: String::new(),
            });
        }
    }
    if let Some(extra) = extra_parameter {
        let parameters = parameter_list(definition).expect("checked");
        let inner = source
            .text_of(parameters)
            .trim_matches(|c| c == '(' || c == ')');
        if normalize(inner) == "void" || inner.trim().is_empty() {
            edits.push(Edit {
                start: parameters.start_byte(),
                end: parameters.end_byte(),
                text: format!("({extra})"),
            });
        } else {
            edits.push(Edit {
                start: parameters.end_byte() - 1,
                end: parameters.end_byte() - 1,
                text: format!(", {extra}"),
            });
        }
    }
    let text =
        std::str::from_utf8(&source.text[definition.start_byte()..body.start_byte()]).unwrap_or("");
    apply_edits(text, definition.start_byte(), edits)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn parameter_list(definition: Node) -> Option<Node> {
    let mut declarator = definition.child_by_field_name("declarator")?;
    while declarator.kind() != "function_declarator" {
        declarator = declarator.child_by_field_name("declarator")?;
    }
    declarator.child_by_field_name("parameters")
}

/// Parameter names in order, or why the function cannot be cloned.
fn parameter_names(source: &Source, definition: Node) -> Result<Vec<String>, String> {
    let list = parameter_list(definition).ok_or("cannot read its parameters")?;
    let mut cursor = list.walk();
    let mut names = Vec::new();
    for p in list.named_children(&mut cursor) {
        match p.kind() {
            "parameter_declaration" => {
                let Some(declarator) = p.child_by_field_name("declarator") else {
                    // `(void)`
                    continue;
                };
                let id = declared_identifier(declarator).ok_or("has an unnamed parameter")?;
                names.push(source.text_of(id).to_string());
            }
            "variadic_parameter" => return Err("takes variable arguments".into()),
            "comment" => {}
            _ => return Err("has parameters the clone cannot pass on".into()),
        }
    }
    Ok(names)
}

/// Whether the function returns nothing.
fn returns_void(source: &Source, definition: Node) -> bool {
    let direct = definition
        .child_by_field_name("declarator")
        .is_some_and(|d| d.kind() == "function_declarator");
    direct
        && definition
            .child_by_field_name("type")
            .is_some_and(|t| source.text_of(t) == "void")
}

const BODY: [&str; 2] = ["original", "patched"];

/// Write the clone of `name` (to append to the patched file), or say why not.
fn transitional_clone(
    file: &str,
    name: &str,
    handler: Option<&str>,
    original: &[u8],
    patched: &[u8],
) -> Result<(String, SynchronizedFunction), String> {
    let old = Source::new(original).ok_or("cannot parse the original file")?;
    let new = Source::new(patched).ok_or("cannot parse the patched file")?;
    // The author may say that the k-th sleep point of one version is the
    // k-th of the other even where their statements differ.
    let points_match = macro_arguments(patched, MATCH_MACRO)
        .iter()
        .any(|a| a.len() == 1 && a[0] == name);
    let old_definitions = old.definitions();
    let new_definitions = new.definitions();
    let old_def = *old_definitions
        .get(name)
        .ok_or_else(|| format!("{MACRO} names a function {file} does not define"))?;
    let new_def = *new_definitions
        .get(name)
        .ok_or_else(|| format!("{MACRO} names a function the patch removes from {file}"))?;
    // Kernel macros with type arguments (min_t, container_of) do not parse
    // as C; the body is copied as text, so only what the clone reads from
    // the tree must parse: the signature and the code around sleep points.
    for (def, which) in [(old_def, "original"), (new_def, "patched")] {
        if def
            .child_by_field_name("declarator")
            .is_none_or(|d| d.has_error())
        {
            return Err(format!(
                "cannot parse its {which} signature (line {}) as C",
                line_of(def)
            ));
        }
    }
    if normalize(old.text_of(old_def)) == normalize(new.text_of(new_def)) {
        return Err(format!(
            "{MACRO} names a function the patch does not change"
        ));
    }
    let old_header = normalize(&header(&old, old_def, name, None));
    let new_header = normalize(&header(&new, new_def, name, None));
    if old_header != new_header {
        return Err(format!(
            "the patch changes its signature ({old_header} → {new_header})"
        ));
    }
    let parameters = parameter_names(&old, old_def)?;
    let bodies = [
        Body::new(&old, old_def, name).map_err(|e| format!("{e} (original code)"))?,
        Body::new(&new, new_def, name).map_err(|e| format!("{e} (patched code)"))?,
    ];
    if bodies[0].points.is_empty() {
        return Err(
            "has no sleep point (a wait_event*() statement), so tasks do not stay in it: a plain update serves it"
                .to_string(),
        );
    }
    if bodies.iter().any(|b| b.calls().contains(name)) {
        return Err("calls itself: the inner call would start a new clone call".into());
    }
    // Calls from other changed code would reach the new version directly.
    for (other, definition) in &new_definitions {
        let changed = old_definitions.get(other).is_none_or(|before| {
            normalize(old.text_of(*before)) != normalize(new.text_of(*definition))
        });
        if other != name && changed {
            if let Ok(body) = Body::calls_of(&new, *definition) {
                if body.contains(name) {
                    return Err(format!(
                        "{other}, which the patch changes or adds, calls it directly: that call would bypass the transitional clone"
                    ));
                }
            }
        }
    }
    // The original body is compiled with the patched file: it must find the
    // macros and helpers it uses unchanged there.
    let old_macros = macros(&old);
    let new_macros = macros(&new);
    for identifier in identifiers(&old, old_def) {
        if let Some(before) = old_macros.get(&identifier) {
            if new_macros.get(&identifier) != Some(before) {
                return Err(format!(
                    "its original code uses the macro {identifier}, which the patch changes"
                ));
            }
        }
    }
    for callee in bodies[0].calls() {
        if let Some(before) = old_definitions.get(&callee) {
            match new_definitions.get(&callee) {
                None => {
                    return Err(format!(
                        "its original code calls {callee}, which the patch removes"
                    ))
                }
                Some(after) if normalize(old.text_of(*before)) != normalize(new.text_of(*after)) => {
                    return Err(format!(
                        "its original code calls {callee}, which the patch changes: the clone's original body would run the new {callee}"
                    ))
                }
                Some(_) => {}
            }
        }
    }
    // Pair the sleep points: same statement text, same order.
    let statement_text = |b: &Body, p: &Point| normalize(b.source.text_of(p.statement));
    let mut sleep_points = Vec::new();
    let (old_points, new_points) = (&bodies[0].points, &bodies[1].points);
    for (i, p) in old_points.iter().enumerate() {
        let Some(q) = new_points.get(i) else {
            return Err(format!(
                "its sleep point {}() at line {} has no counterpart in the patched code",
                p.name,
                line_of(p.call)
            ));
        };
        if statement_text(&bodies[0], p) != statement_text(&bodies[1], q) && !points_match {
            return Err(format!(
                "its sleep point {}() at line {} changes in the patched code (line {}): cannot tell where a sleeper continues \
                 (if the sleep points of both versions correspond in order, say so with {MATCH_MACRO}({name}))",
                p.name,
                line_of(p.call),
                line_of(q.call)
            ));
        }
        for (local, member) in &p.locals {
            match q.locals.get(local) {
                None => {
                    return Err(format!(
                        "at its sleep point {}() at line {}, local `{local}` of the original code has no counterpart in the patched code",
                        p.name,
                        line_of(p.call)
                    ))
                }
                Some(other) if other != member => {
                    return Err(format!(
                        "at its sleep point {}() at line {}, local `{local}` changes type ({member} → {other})",
                        p.name,
                        line_of(p.call)
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = q.locals.keys().find(|l| !p.locals.contains_key(*l)) {
            return Err(format!(
                "at its sleep point {}() at line {}, local `{extra}` of the patched code has no value in the original code",
                p.name,
                line_of(p.call)
            ));
        }
        for body in &bodies {
            if let Some(local) = addressed(body.source, body.node)
                .into_iter()
                .find(|l| p.locals.contains_key(l) && !parameters.contains(l))
            {
                return Err(format!(
                    "takes the address of `{local}`, which a sleeper at {}() at line {} would carry: pointers to it would not follow",
                    p.name,
                    line_of(p.call)
                ));
            }
        }
        sleep_points.push(SleepPoint {
            call: p.name.clone(),
            original_line: line_of(p.call),
            patched_line: line_of(q.call),
            carried: p
                .locals
                .keys()
                .filter(|l| !parameters.contains(l))
                .cloned()
                .collect(),
        });
    }
    if new_points.len() > old_points.len() {
        let q = &new_points[old_points.len()];
        return Err(format!(
            "its patched code adds the sleep point {}() at line {}, which the original code lacks",
            q.name,
            line_of(q.call)
        ));
    }

    let ident = name;
    let control = format!("__dynamos_sync_control_{ident}");
    let control_of = format!("__dynamos_sync_control_of_{ident}");
    let bodies_fn = format!("__dynamos_sync_bodies_{ident}");
    let entry = format!("__dynamos_sync_entry_{ident}");
    let void = returns_void(&old, old_def);
    let mut rendered = [String::new(), String::new()];
    for (index, body) in bodies.iter().enumerate() {
        let other = 1 - index;
        let suffix = format!("__dynamos_{}", BODY[index]);
        let mut edits = Vec::new();
        // Sleepers leave the original body only where the handler agrees;
        // a revert moves every one back.
        let leaving = match handler {
            Some(h) if index == 0 => format!(
                "(DYNAMOS_SYNC_LEAVING(__dynamos_sync, 0) && {h}({}))",
                parameters.join(", ")
            ),
            _ => format!("DYNAMOS_SYNC_LEAVING(__dynamos_sync, {index})"),
        };
        // Labels are function-wide: each body keeps its own.
        let labels = body.labels();
        for n in descendants(body.node) {
            if n.kind() == "statement_identifier" {
                let text = body.source.text_of(n);
                if labels.contains(text) {
                    edits.push(Edit {
                        start: n.start_byte(),
                        end: n.end_byte(),
                        text: format!("{text}{suffix}"),
                    });
                }
            }
        }
        for (k, p) in body.points.iter().enumerate() {
            let arguments = p.call.child_by_field_name("arguments").expect("a call");
            let condition = arguments.named_child(1).ok_or_else(|| {
                format!("{}() at line {} has no condition", p.name, line_of(p.call))
            })?;
            edits.push(Edit {
                start: condition.start_byte(),
                end: condition.end_byte(),
                text: format!("({}) || {leaving}", body.source.text_of(condition)),
            });
            // A sleeper arrives *before* the sleep statement and waits
            // again on its own condition: leaving made its wait return as if
            // the condition had come true.
            let carried = &sleep_points[k].carried;
            let mut arrive = format!(
                "__dynamos_arrive_{k}_{index}: if (unlikely(__dynamos_arriving == {k})) {{\n\t\t__dynamos_arriving = -1;\n"
            );
            for local in carried {
                arrive.push_str(&format!(
                    "\t\t__builtin_memcpy((void *)&{local}, &__dynamos_point_{k}.{local}, sizeof({local}));\n"
                ));
            }
            arrive.push_str("\t}\n\t");
            edits.push(Edit {
                start: p.statement.start_byte(),
                end: p.statement.start_byte(),
                text: arrive,
            });
            let mut leave = format!("\n\tif (unlikely({leaving})) {{\n");
            for local in carried {
                leave.push_str(&format!(
                    "\t\t__builtin_memcpy(&__dynamos_point_{k}.{local}, (void *)&{local}, sizeof({local}));\n"
                ));
            }
            leave.push_str(&format!(
                "\t\t__dynamos_arriving = {k};\n\t\tDYNAMOS_SYNC_MOVE(__dynamos_sync, __dynamos_body, {index}, {other});\n\t\tgoto __dynamos_arrive_{k}_{other};\n\t}}"
            ));
            edits.push(Edit {
                start: p.statement.end_byte(),
                end: p.statement.end_byte(),
                text: leave,
            });
        }
        rendered[index] = apply_edits(
            body.source.text_of(body.node),
            body.node.start_byte(),
            edits,
        )
        .ok_or_else(|| format!("cannot write the clone's {} body", BODY[index]))?;
    }

    let mut points_state = String::new();
    for (k, p) in old_points.iter().enumerate() {
        let members: Vec<String> = sleep_points[k]
            .carried
            .iter()
            .map(|l| format!("{};", p.locals[l]))
            .collect();
        points_state.push_str(&format!(
            "\tstruct {{ {} char __dynamos_none; }} __dynamos_point_{k};\n",
            members.join(" ")
        ));
    }
    let call_arguments = parameters
        .iter()
        .map(String::as_str)
        .chain(std::iter::once("&__dynamos_body"))
        .collect::<Vec<_>>()
        .join(", ");
    let bodies_header = header(&old, old_def, &bodies_fn, Some("int *__dynamos_body"));
    let entry_header = header(&old, old_def, &entry, None);
    let point_list: Vec<String> = sleep_points
        .iter()
        .map(|p| format!(" *   {}\n", p.describe()))
        .collect();
    let end_of_original = if void {
        "return;"
    } else {
        "__builtin_unreachable();"
    };
    let call = if void {
        format!(
            "{bodies_fn}({call_arguments});\n\tDYNAMOS_SYNC_EXIT(__dynamos_sync, __dynamos_body);"
        )
    } else {
        format!(
            "__auto_type __dynamos_ret = {bodies_fn}({call_arguments});\n\n\tDYNAMOS_SYNC_EXIT(__dynamos_sync, __dynamos_body);\n\treturn __dynamos_ret;"
        )
    };
    let text = format!(
        r#"

/*
 * Transitional clone of {name}(), written by dynamos-build {version} from
 * {file} before and after the patch (docs/synchronized-updates.md).
 * Body 0 is the original code, body 1 the patched code. At each sleep
 * point a task leaves the body the update's module names for the same
 * point of the other body, with these locals:
{points} */
#include <dynamos.h>

static struct dynamos_sync {control};

struct dynamos_sync *{control_of}(void);
struct dynamos_sync *{control_of}(void)
{{
	return &{control};
}}

static noinline {bodies_header}
{{
	struct dynamos_sync *const __dynamos_sync = &{control};
	int __dynamos_arriving = -1;
{points_state}
	if (*__dynamos_body == 1)
		goto __dynamos_patched_body;
	{original_body}
	{end_of_original}
__dynamos_patched_body:
	{patched_body}
}}

{entry_header};
{entry_header}
{{
	struct dynamos_sync *const __dynamos_sync = &{control};
	int __dynamos_body = DYNAMOS_SYNC_ENTER(__dynamos_sync, {choice});

	{call}
}}
"#,
        version = crate::TOOL_VERSION,
        choice = match handler {
            Some(h) => format!("{h}({})", parameters.join(", ")),
            None => "true".to_string(),
        },
        points = point_list.concat(),
        original_body = rendered[0],
        patched_body = rendered[1],
    );
    Ok((
        text,
        SynchronizedFunction {
            file: file.to_string(),
            name: name.to_string(),
            entry,
            control: control_of,
            sleep_points,
            handler: handler.map(str::to_string),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"
static int helper(int x) { return x + 1; }

static ssize_t
demo_write(struct demo *d, size_t len)
{
	ssize_t ret = 0;
	int i;

	for (i = 0; i < 3; i++) {
		if (d->full)
			goto out;
		wait_event_interruptible(d->wait, !d->full);
		ret += helper(i);
	}
out:
	return ret;
}
"#;

    fn patched(body_change: &str) -> String {
        ORIGINAL.replace("ret += helper(i);", body_change) + "\nDYNAMOS_SYNCHRONIZED(demo_write);\n"
    }

    fn clone(patched: &str) -> Result<Synchronized> {
        let mut changes = BTreeMap::new();
        changes.insert(PathBuf::from("demo.c"), Some(patched.as_bytes().to_vec()));
        add_transitional_clones(changes, |_| Some(ORIGINAL.as_bytes().to_vec()))
    }

    #[test]
    fn writes_both_bodies_with_transfer_points() {
        let done = clone(&patched("ret += 2 * helper(i);")).unwrap();
        let f = &done.functions[0];
        assert_eq!(f.name, "demo_write");
        assert_eq!(f.sleep_points.len(), 1);
        assert_eq!(f.sleep_points[0].carried, vec!["i", "ret"]);
        let text = String::from_utf8(done.changes[Path::new("demo.c")].clone().unwrap()).unwrap();
        assert!(text.contains("(!d->full) || DYNAMOS_SYNC_LEAVING(__dynamos_sync, 0)"));
        assert!(text.contains("(!d->full) || DYNAMOS_SYNC_LEAVING(__dynamos_sync, 1)"));
        assert!(text.contains("goto out__dynamos_original;"));
        assert!(text.contains("out__dynamos_patched:"));
        assert!(
            text.contains("ssize_t\n__dynamos_sync_entry_demo_write(struct demo *d, size_t len)")
        );
        assert!(text.contains("__dynamos_sync_bodies_demo_write(d, len, &__dynamos_body)"));
        assert!(
            text.contains("struct { ssize_t ret; int i; char __dynamos_none; } __dynamos_point_0;")
                || text.contains(
                    "struct { int i; ssize_t ret; char __dynamos_none; } __dynamos_point_0;"
                )
        );
    }

    #[test]
    fn refuses_a_changed_sleep_statement() {
        let p = patched("ret += helper(i);").replace(
            "wait_event_interruptible(d->wait, !d->full);",
            "wait_event_killable(d->wait, !d->full);",
        );
        let err = format!("{:#}", clone(&p).err().unwrap());
        assert!(err.contains("changes in the patched code"), "{err}");
    }

    #[test]
    fn the_author_may_pair_changed_sleep_points() {
        let p = patched("ret += helper(i);").replace(
            "wait_event_interruptible(d->wait, !d->full);",
            "wait_event_interruptible(d->wait, !d->full && !d->frozen);",
        ) + "DYNAMOS_SLEEP_POINTS_MATCH(demo_write);\n";
        let done = clone(&p).unwrap();
        let text = String::from_utf8(done.changes[Path::new("demo.c")].clone().unwrap()).unwrap();
        assert!(
            text.contains("(!d->full && !d->frozen) || DYNAMOS_SYNC_LEAVING(__dynamos_sync, 1)")
        );
    }

    #[test]
    fn refuses_a_new_local_at_a_sleep_point() {
        let p = patched("ret += helper(i);").replace("int i;", "int i;\n\tint extra = 0;");
        let err = format!("{:#}", clone(&p).err().unwrap());
        assert!(err.contains("local `extra` of the patched code"), "{err}");
    }

    #[test]
    fn refuses_a_changed_helper_of_the_original_code() {
        let p = patched("ret += helper(i) + 1;").replace("return x + 1;", "return x + 2;");
        let err = format!("{:#}", clone(&p).err().unwrap());
        assert!(
            err.contains("calls helper, which the patch changes"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_sleep_without_condition() {
        let p = patched("ret += helper(i); schedule();");
        let err = format!("{:#}", clone(&p).err().unwrap());
        assert!(err.contains("sleeps in schedule()"), "{err}");
    }
}
