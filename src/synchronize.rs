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

/// The macro a patch uses to name a synchronized function (`dynamos.h`).
const MACRO: &str = "DYNAMOS_SYNCHRONIZED";

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
}

/// Add the clones of every function the patched files name with
/// `DYNAMOS_SYNCHRONIZED`. `original` reads a file of the unpatched tree.
pub fn add_transitional_clones(
    mut changes: BTreeMap<PathBuf, Option<Vec<u8>>>,
    original: impl Fn(&Path) -> Option<Vec<u8>>,
) -> Result<Synchronized> {
    let mut functions = Vec::new();
    let mut refusals = Vec::new();
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
        let mut appended = String::new();
        for name in &names {
            match transitional_clone(&file, name, &old, patched) {
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
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(Synchronized { changes, functions })
}

/// Functions named by `DYNAMOS_SYNCHRONIZED(name);` lines of a file.
fn declared_names(text: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    let mut names = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix(MACRO) else {
            continue;
        };
        let Some(inner) = rest.trim_start().strip_prefix('(') else {
            continue;
        };
        let Some((name, _)) = inner.split_once(')') else {
            continue;
        };
        let name = name.trim();
        if !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_string());
        }
    }
    names
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

impl<'s, 'a> Body<'s, 'a> {
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
                for (name, member) in members(source, sibling)? {
                    locals.entry(name).or_insert(member);
                }
            }
        }
        if parent.kind() == "for_statement" {
            if let Some(init) = parent.child_by_field_name("initializer") {
                if init.kind() == "declaration" && init.id() != child.id() {
                    for (name, member) in members(source, init)? {
                        locals.entry(name).or_insert(member);
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

fn apply_edits(text: &str, base: usize, mut edits: Vec<Edit>) -> String {
    edits.sort_by_key(|e| std::cmp::Reverse((e.start, e.end)));
    let mut out = text.to_string();
    for e in edits {
        out.replace_range(e.start - base..e.end - base, &e.text);
    }
    out
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
    original: &[u8],
    patched: &[u8],
) -> Result<(String, SynchronizedFunction), String> {
    let old = Source::new(original).ok_or("cannot parse the original file")?;
    let new = Source::new(patched).ok_or("cannot parse the patched file")?;
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
    // The original body is compiled with the patched file: it must find the
    // helpers it calls unchanged there.
    for callee in bodies[0].calls() {
        if callee == name {
            continue;
        }
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
        if statement_text(&bodies[0], p) != statement_text(&bodies[1], q) {
            return Err(format!(
                "its sleep point {}() at line {} changes in the patched code (line {}): cannot tell where a sleeper continues",
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
        // Labels are function-wide: each body keeps its own.
        let labels = body.labels();
        let locals: BTreeSet<&String> = body.points.iter().flat_map(|p| p.locals.keys()).collect();
        for n in descendants(body.node) {
            if matches!(n.kind(), "statement_identifier" | "identifier") {
                let text = body.source.text_of(n);
                if labels.contains(text) && !locals.contains(&text.to_string()) {
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
                text: format!(
                    "({}) || DYNAMOS_SYNC_LEAVING(__dynamos_sync, {index})",
                    body.source.text_of(condition)
                ),
            });
            let carried = &sleep_points[k].carried;
            let mut leave = format!(
                "\n\t__dynamos_arrive_{k}_{index}: if (unlikely(__dynamos_arriving == {})) {{\n\t\t__dynamos_arriving = -1;\n",
                k
            );
            for local in carried {
                leave.push_str(&format!(
                    "\t\t__builtin_memcpy((void *)&{local}, &__dynamos_point_{k}.{local}, sizeof({local}));\n"
                ));
            }
            leave.push_str(&format!(
                "\t}}\n\tif (unlikely(DYNAMOS_SYNC_LEAVING(__dynamos_sync, {index}))) {{\n"
            ));
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
        );
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
	int __dynamos_body = DYNAMOS_SYNC_ENTER(__dynamos_sync);

	{call}
}}
"#,
        version = crate::TOOL_VERSION,
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
