//! Accesses to added members, as the compiler reports them: the patched
//! files compile against the original layout, so each access is a "has no
//! member named" error that names the file, line, column, type and member.
//! Each one becomes an access to the object's shadow.

use super::{apply_edits, members, ShadowPlan};
use crate::error::{Error, Refusal};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tree_sitter::Node;

/// One "has no member named" error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingMember {
    pub path: String,
    pub line: usize,
    /// As the compiler counts: tabs to the next multiple of 8, from 1.
    pub column: usize,
    pub type_text: String,
    /// What a typedef names, as the compiler adds it.
    pub aka: Option<String>,
    pub member: String,
}

/// Text between the first pair of quotes (ASCII or typographic) in `text`.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let open = text.find(['\'', '\u{2018}'])?;
    let after = &text[open..];
    let open_len = after.chars().next()?.len_utf8();
    let rest = &after[open_len..];
    let close = rest.find(['\'', '\u{2019}'])?;
    let close_len = rest[close..].chars().next()?.len_utf8();
    Some((&rest[..close], &rest[close + close_len..]))
}

/// Every "has no member named" error in a compiler log.
pub fn missing_members(log: &str) -> Vec<MissingMember> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some((location, message)) = line.split_once(": error: ") else {
            continue;
        };
        let Some((before, after)) = message.split_once(" has no member named ") else {
            continue;
        };
        let (Some((type_text, rest)), Some((member, _))) = (quoted(before), quoted(after)) else {
            continue;
        };
        // `'foo_t' {aka 'struct foo'}`: the typedef and what it names.
        let aka = rest
            .split_once("aka ")
            .and_then(|(_, a)| quoted(a))
            .map(|(a, _)| a.to_string());
        let mut parts = location.rsplitn(3, ':');
        let (Some(column), Some(number), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(column), Ok(number)) = (column.parse(), number.parse()) else {
            continue;
        };
        out.push(MissingMember {
            path: path.to_string(),
            line: number,
            column,
            type_text: type_text.to_string(),
            aka,
            member: member.to_string(),
        });
    }
    out.dedup();
    out
}

/// The changed file a compiler path names (absolute, or relative to some
/// build folder): the longest changed path it ends with.
fn changed_file<'a>(path: &str, changes: impl Iterator<Item = &'a PathBuf>) -> Option<PathBuf> {
    changes
        .filter(|c| {
            let c = c.to_string_lossy();
            path == c || path.ends_with(&format!("/{c}"))
        })
        .max_by_key(|c| c.as_os_str().len())
        .cloned()
}

/// Start of the line the compiler numbers `line`, through `#line`
/// directives: the last line so numbered, as the shadow declarations come
/// before the original lines their numbers repeat.
fn line_start(text: &[u8], line: usize) -> Option<usize> {
    let mut found = None;
    let mut number = 1;
    let mut start = 0;
    while start <= text.len() {
        let end = text[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |e| start + e);
        let directive = std::str::from_utf8(&text[start..end])
            .ok()
            .and_then(|l| l.strip_prefix("#line "))
            .and_then(|n| n.trim().parse::<usize>().ok());
        if number == line {
            found = Some(start);
        }
        number = directive.unwrap_or(number + 1);
        start = end + 1;
    }
    found
}

/// Byte offset of a compiler line and column in `text`.
fn offset_of(text: &[u8], line: usize, column: usize) -> Option<usize> {
    let start = line_start(text, line)?;
    let end = text[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |e| start + e);
    let line_text = std::str::from_utf8(&text[start..end]).ok()?;
    let mut shown = 1;
    for (i, c) in line_text.char_indices() {
        if shown >= column {
            return Some(start + i);
        }
        shown = if c == '\t' {
            (shown - 1) / 8 * 8 + 9
        } else {
            shown + 1
        };
    }
    None
}

/// Whether the member access at `node` writes (or lets code write) the member.
fn is_written(mut node: Node) -> bool {
    loop {
        let Some(parent) = node.parent() else {
            return false;
        };
        match parent.kind() {
            "parenthesized_expression" => node = parent,
            // `p->added.x` and `p->added[i]` are written when the whole is.
            "field_expression" | "subscript_expression"
                if parent.child_by_field_name("argument") == Some(node) =>
            {
                node = parent
            }
            "assignment_expression" => return parent.child_by_field_name("left") == Some(node),
            "update_expression" => return true,
            "pointer_expression" => {
                return parent
                    .child_by_field_name("operator")
                    .is_some_and(|o| o.kind() == "&")
            }
            _ => return false,
        }
    }
}

/// The member accesses naming `member` on the line the compiler numbers
/// `line`.
fn accesses_on_line<'t>(root: Node<'t>, text: &[u8], line: usize, member: &str) -> Vec<Node<'t>> {
    let Some(line_start) = line_start(text, line) else {
        return Vec::new();
    };
    let line_end = text[line_start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |e| line_start + e);
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if node.end_byte() < line_start || node.start_byte() > line_end {
            continue;
        }
        if node.kind() == "field_expression" {
            let field = node.child_by_field_name("field");
            if field.is_some_and(|f| {
                members::text_of(text, f) == member
                    && f.start_byte() >= line_start
                    && f.end_byte() <= line_end
            }) {
                found.push(node);
            }
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    found.sort_by_key(|n| n.start_byte());
    found
}

/// The accesses a line's diagnostics name: all of the line's accesses to
/// the member when the compiler reported as many; else the one at each
/// reported column (the operator's, or the member's when gcc suggests
/// another). Columns after a `#line` are not to be trusted: gcc measures
/// them on the physical line of that number.
fn reported_accesses<'t>(
    root: Node<'t>,
    text: &[u8],
    line: usize,
    member: &str,
    columns: &[usize],
) -> Option<Vec<Node<'t>>> {
    let on_line = accesses_on_line(root, text, line, member);
    if on_line.len() == columns.len() {
        return Some(on_line);
    }
    columns
        .iter()
        .map(|&column| {
            let at = offset_of(text, line, column)?;
            on_line.iter().copied().find(|n| {
                n.child_by_field_name("operator")
                    .is_some_and(|o| o.start_byte() == at)
                    || n.child_by_field_name("field")
                        .is_some_and(|f| f.start_byte() == at)
            })
        })
        .collect()
}

/// Rewrite the accesses to added members the compiler reported in `log`.
/// Ok(false): the log reports no such access (the failure is something
/// else). Refused: an access in a header, or one that cannot be rewritten.
pub fn rewrite_accesses(
    changes: &mut BTreeMap<PathBuf, Option<Vec<u8>>>,
    plan: &ShadowPlan,
    log: &str,
) -> Result<bool> {
    let mut by_file: BTreeMap<PathBuf, Vec<(MissingMember, usize)>> = BTreeMap::new();
    let mut refusals = Vec::new();
    for missing in missing_members(log) {
        let file = changed_file(&missing.path, changes.keys());
        let shadow = [Some(&missing.type_text), missing.aka.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|t| plan.type_for(t, &missing.member, file.as_deref()));
        let Some(shadow) = shadow else {
            continue;
        };
        let place = format!("{}:{}", shown_path(&missing.path), missing.line);
        if missing.path.ends_with(".h") {
            refusals.push(Refusal {
                symbol: format!("{}.{}", shadow.type_name, missing.member),
                reason: format!(
                    "added member used in {place}, a header: code outside the package may use it; use it from a C file the patch changes"
                ),
            });
            continue;
        }
        match file {
            Some(file) => by_file
                .entry(file)
                .or_default()
                .push((missing, shadow.index)),
            None => refusals.push(Refusal {
                symbol: format!("{}.{}", shadow.type_name, missing.member),
                reason: format!("added member used in {place}, which the patch does not change"),
            }),
        }
    }
    // `{ .added = 1 }`: an initializer cannot reach the shadow.
    for line in log.lines() {
        let Some((location, message)) = line.split_once(": error: unknown field ") else {
            continue;
        };
        let Some((member, _)) = quoted(message) else {
            continue;
        };
        let Some(shadow) = plan
            .types
            .iter()
            .find(|t| t.member_names().iter().any(|m| m == member))
        else {
            continue;
        };
        let place = location.rsplit_once(':').map_or(location, |(p, _)| p);
        refusals.push(Refusal {
            symbol: format!("{}.{member}", shadow.type_name),
            reason: format!(
                "added member set by an initializer at {}: set it by assignment, which can reach its shadow",
                shown_path(place)
            ),
        });
    }
    // A copy of a shadowed object: the prologue's error attribute fired
    // inside the copy macro; the last expansion note is the copy's line.
    let lines: Vec<&str> = log.lines().collect();
    let mut function = "";
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line
            .strip_prefix("In function ")
            .or_else(|| line.split_once(": In function ").map(|(_, f)| f))
        {
            function = name
                .trim_end_matches([':', ','])
                .trim_matches(['\'', '\u{2018}', '\u{2019}']);
        }
        let Some((location, shadowed)) = line.split_once(super::COPY_ERROR) else {
            continue;
        };
        let expansion = lines[i + 1..]
            .iter()
            .take_while(|l| !l.contains(": error:") && !l.contains("In function"))
            .filter(|l| l.contains(": note: in expansion of macro"))
            .last()
            .copied()
            .unwrap_or(location);
        let place = expansion.split(": ").next().unwrap_or(expansion);
        let (place, _) = place.rsplit_once(':').unwrap_or((place, ""));
        let shadowed = shadowed.trim_end_matches(['\'', '\u{2019}', '"']).trim();
        refusals.push(Refusal {
            symbol: shadowed.to_string(),
            reason: format!(
                "an object with added members is copied (memcpy, memmove or kmemdup) in {function} at {}: the copy would not carry its shadow",
                shown_path(place)
            ),
        });
    }
    let mut rewritten = writes_through_read_accessors(changes, log);
    for (file, sites) in by_file {
        let Some(Some(text)) = changes.get(&file) else {
            continue;
        };
        let Some(tree) = members::parse(text) else {
            continue;
        };
        let mut edits = Vec::new();
        // The diagnostics of one line and member, together.
        let mut groups: BTreeMap<(usize, String), Vec<(&MissingMember, usize)>> = BTreeMap::new();
        for (site, index) in &sites {
            groups
                .entry((site.line, site.member.clone()))
                .or_default()
                .push((site, *index));
        }
        for ((line, member), group) in groups {
            let (first, index) = group[0];
            let columns: Vec<usize> = group.iter().map(|(s, _)| s.column).collect();
            let Some(accesses) = reported_accesses(tree.root_node(), text, line, &member, &columns)
            else {
                refusals.push(Refusal {
                    symbol: format!("{}.{member}", first.type_text),
                    reason: format!(
                        "added member used at {}:{line} in a form that cannot be rewritten to its shadow (inside a macro?)",
                        file.display(),
                    ),
                });
                continue;
            };
            let always_write = plan.is_aggregate(index, &member);
            for access in accesses {
                match shadow_access(text, access, index, always_write) {
                    Ok(edit) => edits.push(edit),
                    Err(reason) => refusals.push(Refusal {
                        symbol: format!("{}.{member}", first.type_text),
                        reason: format!("added member used at {}:{line}: {reason}", file.display()),
                    }),
                }
            }
        }
        if !edits.is_empty() {
            let new_text = apply_edits(text, edits);
            changes.insert(file, Some(new_text));
            rewritten = true;
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(rewritten)
}

/// An access judged a read that code writes through (`WRITE_ONCE(p->m, v)`,
/// a macro's assignment): the read accessor is `const`, so the compiler
/// reports a read-only location on that line. Every read accessor on it
/// becomes a write accessor. Whether any did.
fn writes_through_read_accessors(
    changes: &mut BTreeMap<PathBuf, Option<Vec<u8>>>,
    log: &str,
) -> bool {
    let mut changed = false;
    for line in log.lines() {
        let Some((location, message)) = line.split_once(": error: ") else {
            continue;
        };
        if !message.contains("read-only") {
            continue;
        }
        let mut parts = location.rsplitn(3, ':');
        let (Some(_), Some(number), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<usize>() else {
            continue;
        };
        let Some(file) = changed_file(path, changes.keys()) else {
            continue;
        };
        let Some(Some(text)) = changes.get_mut(&file) else {
            continue;
        };
        let Some(start) = line_start(text, number) else {
            continue;
        };
        let end = text[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |e| start + e);
        let old = String::from_utf8_lossy(&text[start..end]).into_owned();
        let new = old.replace("__dynamos_shadow_r_", "__dynamos_shadow_w_");
        if new != old {
            text.splice(start..end, new.into_bytes());
            changed = true;
        }
    }
    changed
}

/// `p->m` → `__dynamos_shadow_r_0(p)->m`, `o.m` → `__dynamos_shadow_w_0(&(o))->m`.
/// Refused: a member of an object on the stack, whose shadow nothing frees.
fn shadow_access(
    text: &[u8],
    access: Node,
    index: usize,
    always_write: bool,
) -> Result<(std::ops::Range<usize>, String), String> {
    let argument = access.child_by_field_name("argument").unwrap_or(access);
    let operator = access.child_by_field_name("operator");
    let through_pointer = operator.is_some_and(|o| o.kind() == "->");
    if !through_pointer {
        if let Some(local) = local_object(text, argument) {
            return Err(format!(
                "{local} is a local object: nothing would free its shadow when the function returns"
            ));
        }
    }
    let side = if always_write || is_written(access) {
        'w'
    } else {
        'r'
    };
    let object = members::text_of(text, argument);
    let object = if through_pointer {
        object.to_string()
    } else {
        format!("&({object})")
    };
    let end = operator.map_or(argument.end_byte(), |o| o.end_byte());
    Ok((
        argument.start_byte()..end,
        format!("__dynamos_shadow_{side}_{index}({object})->"),
    ))
}

/// The variable an object expression names (`o`, `arr[i]`, `(o)`, `o.inner`)
/// when the enclosing function declares it, as a parameter or a local.
fn local_object(text: &[u8], mut object: Node) -> Option<String> {
    loop {
        match object.kind() {
            "identifier" => break,
            "parenthesized_expression" => object = object.named_child(0)?,
            "subscript_expression" => object = object.child_by_field_name("argument")?,
            "field_expression"
                if object
                    .child_by_field_name("operator")
                    .is_some_and(|o| o.kind() == ".") =>
            {
                object = object.child_by_field_name("argument")?
            }
            _ => return None,
        }
    }
    let name = members::text_of(text, object);
    let mut function = object.parent();
    while let Some(f) = function {
        if f.kind() == "function_definition" {
            break;
        }
        function = f.parent();
    }
    let function = function?;
    let mut stack = vec![function];
    while let Some(node) = stack.pop() {
        if matches!(node.kind(), "parameter_declaration" | "declaration") {
            let mut cursor = node.walk();
            let mut declarators: Vec<Node> = node
                .children_by_field_name("declarator", &mut cursor)
                .collect();
            while let Some(d) = declarators.pop() {
                match d.kind() {
                    "identifier" if members::text_of(text, d) == name => {
                        // `static` locals live as long as globals.
                        let is_static = {
                            let mut c = node.walk();
                            let found = node.children(&mut c).any(|n| {
                                n.kind() == "storage_class_specifier"
                                    && members::text_of(text, n) == "static"
                            });
                            found
                        };
                        return (!is_static).then(|| name.to_string());
                    }
                    "identifier" => {}
                    // `*p` is a pointer: its target is not on the stack.
                    "pointer_declarator" => {}
                    _ => {
                        if let Some(inner) = d.child_by_field_name("declarator") {
                            declarators.push(inner);
                        }
                    }
                }
            }
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    None
}

/// A compiler path shown relative to the tree where it can be.
fn shown_path(path: &str) -> String {
    let p = Path::new(path);
    for marker in ["include", "arch", "fs", "kernel", "mm", "net", "drivers"] {
        if let Some(pos) = path.find(&format!("/{marker}/")) {
            return path[pos + 1..].to_string();
        }
    }
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ShadowPlan {
        crate::shadow::tests::task_plan()
    }

    #[test]
    fn reads_compiler_errors_with_either_quotes() {
        let log = "../src/kernel/fork.c:11:24: error: \u{2018}struct task\u{2019} has no member named \u{2018}newpid\u{2019}\n\
                   fs/binfmt_misc.c:9:5: error: 'Node' {aka 'struct <anonymous>'} has no member named 'generation'\n";
        let found = missing_members(log);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path, "../src/kernel/fork.c");
        assert_eq!((found[0].line, found[0].column), (11, 24));
        assert_eq!(found[0].type_text, "struct task");
        assert_eq!(found[1].type_text, "Node");
        assert_eq!(found[1].member, "generation");
    }

    #[test]
    fn rewrites_reads_and_writes() {
        let source = "int f(struct task *p, struct task *q)\n{\n\tp->newpid = 1;\n\treturn p->newpid + (*q).newpid + p->pid;\n}\n";
        let mut changes: BTreeMap<PathBuf, Option<Vec<u8>>> = [(
            PathBuf::from("kernel/fork.c"),
            Some(source.as_bytes().to_vec()),
        )]
        .into();
        let log = "/tmp/x/kernel/fork.c:3:10: error: 'struct task' has no member named 'newpid'\n\
                   /tmp/x/kernel/fork.c:4:17: error: 'struct task' has no member named 'newpid'\n\
                   /tmp/x/kernel/fork.c:4:32: error: 'struct task' has no member named 'newpid'\n";
        assert!(rewrite_accesses(&mut changes, &plan(), log).unwrap());
        let text = String::from_utf8(changes[Path::new("kernel/fork.c")].clone().unwrap()).unwrap();
        assert!(
            text.contains("\t__dynamos_shadow_w_0(p)->newpid = 1;"),
            "{text}"
        );
        assert!(
            text.contains("return __dynamos_shadow_r_0(p)->newpid + __dynamos_shadow_r_0(&((*q)))->newpid + p->pid;"),
            "{text}"
        );
    }

    #[test]
    fn follows_line_directives() {
        let text = b"a\nb\nx\ny\n#line 2\nb\nc\n";
        assert_eq!(line_start(text, 2), Some(16));
        assert_eq!(line_start(text, 3), Some(18));
        assert_eq!(line_start(text, 1), Some(0));
    }

    #[test]
    fn refuses_a_member_of_a_local_object() {
        let source = "void g(void)\n{\n\tstruct task t;\n\tt.newpid = 1;\n}\n";
        let mut changes: BTreeMap<PathBuf, Option<Vec<u8>>> = [(
            PathBuf::from("kernel/fork.c"),
            Some(source.as_bytes().to_vec()),
        )]
        .into();
        let log = "kernel/fork.c:4:10: error: 'struct task' has no member named 'newpid'\n";
        let err = rewrite_accesses(&mut changes, &plan(), log).unwrap_err();
        assert!(err.to_string().contains("t is a local object"), "{err}");
    }

    #[test]
    fn a_read_written_through_becomes_a_write() {
        let source =
            "void g(struct task *p)\n{\n\tWRITE_ONCE(__dynamos_shadow_r_0(p)->newpid, 1);\n}\n";
        let mut changes: BTreeMap<PathBuf, Option<Vec<u8>>> = [(
            PathBuf::from("kernel/fork.c"),
            Some(source.as_bytes().to_vec()),
        )]
        .into();
        let log = "kernel/fork.c:3:2: error: assignment of read-only location '*(volatile int *)&__dynamos_shadow_r_0(p)->newpid'\n";
        assert!(rewrite_accesses(&mut changes, &plan(), log).unwrap());
        let text = String::from_utf8(changes[Path::new("kernel/fork.c")].clone().unwrap()).unwrap();
        assert!(
            text.contains("WRITE_ONCE(__dynamos_shadow_w_0(p)->newpid, 1);"),
            "{text}"
        );
    }

    #[test]
    fn refuses_a_use_in_a_header() {
        let mut changes = BTreeMap::new();
        let log = "include/linux/task.h:3:10: error: 'struct task' has no member named 'newpid'\n";
        let err = rewrite_accesses(&mut changes, &plan(), log).unwrap_err();
        assert!(err.to_string().contains("a header"), "{err}");
    }

    #[test]
    fn refuses_an_added_member_in_an_initializer() {
        let mut changes = BTreeMap::new();
        let log = "/w/kernel/fork.c:30:17: error: unknown field \u{2018}newpid\u{2019} specified in initializer\n";
        let err = rewrite_accesses(&mut changes, &plan(), log).unwrap_err();
        assert!(
            err.to_string().contains(
                "struct task.newpid: added member set by an initializer at kernel/fork.c:30"
            ),
            "{err}"
        );
    }

    #[test]
    fn other_errors_are_not_ours() {
        let mut changes = BTreeMap::new();
        let log = "kernel/fork.c:3:10: error: 'struct task' has no member named 'other'\n";
        assert!(!rewrite_accesses(&mut changes, &plan(), log).unwrap());
    }
}
