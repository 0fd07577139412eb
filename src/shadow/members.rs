//! Which struct and union members a patch adds, read from the original
//! and patched text of one file with tree-sitter-c.
//!
//! A definition counts as "members added" only when deleting whole member
//! declarations from the patched body gives back the original body (comments
//! and spacing aside). Anything else about the type is left alone here: the
//! DWARF layout check of the diff stage refuses it, naming type and member.

use std::ops::Range;
use tree_sitter::{Node, Parser, Tree};

/// Members one struct or union definition of a file gains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addition {
    /// `struct task_struct`, or the typedef name of an untagged struct (`Node`).
    pub type_name: String,
    /// Whether the type is named through a typedef of an untagged struct.
    pub typedef_only: bool,
    pub members: Vec<AddedMember>,
    /// Byte offset just past the definition in the patched text.
    pub definition_end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedMember {
    /// The names it declares (`int a, b;` declares two).
    pub names: Vec<String>,
    /// The declaration as written, e.g. `int newpid;`.
    pub declaration: String,
    /// Where it is in the patched text.
    pub range: Range<usize>,
}

pub(crate) fn parse(text: &[u8]) -> Option<Tree> {
    let mut parser = Parser::new();
    parser.set_language(&tree_sitter_c::LANGUAGE.into()).ok()?;
    parser.parse(text, None)
}

/// A struct or union definition with a body, by the name code uses for it.
pub(crate) struct Definition<'t> {
    pub type_name: String,
    typedef_only: bool,
    /// The member list, inside the struct or union specifier.
    pub body: Node<'t>,
    /// Byte offset just past the definition.
    pub end: usize,
}

/// Every struct or union definition under `root` that has a name.
pub(crate) fn definitions<'t>(root: Node<'t>, text: &[u8]) -> Vec<Definition<'t>> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if matches!(node.kind(), "struct_specifier" | "union_specifier") {
            if let Some(body) = node.child_by_field_name("body") {
                let keyword = if node.kind() == "struct_specifier" {
                    "struct"
                } else {
                    "union"
                };
                let named = match node.child_by_field_name("name") {
                    Some(name) => Some((format!("{keyword} {}", text_of(text, name)), false)),
                    None => typedef_name(node, text).map(|n| (n, true)),
                };
                if let Some((type_name, typedef_only)) = named {
                    out.push(Definition {
                        type_name,
                        typedef_only,
                        body,
                        end: node.end_byte(),
                    });
                }
            }
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    out
}

/// `typedef struct { ... } Node;` names the untagged struct `Node`.
fn typedef_name(specifier: Node, text: &[u8]) -> Option<String> {
    let parent = specifier.parent()?;
    if parent.kind() != "type_definition" {
        return None;
    }
    let declarator = parent.child_by_field_name("declarator")?;
    (declarator.kind() == "type_identifier").then(|| text_of(text, declarator).to_string())
}

pub(crate) fn text_of<'a>(text: &'a [u8], node: Node) -> &'a str {
    std::str::from_utf8(&text[node.byte_range()]).unwrap_or("")
}

/// The items of a member list in order, looking into `#if` blocks.
fn items<'t>(body: Node<'t>) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    let mut cursor = body.walk();
    for child in body.named_children(&mut cursor) {
        match child.kind() {
            "preproc_if" | "preproc_ifdef" | "preproc_else" | "preproc_elif" => {
                out.extend(items(child))
            }
            "comment" => {}
            _ => out.push(child),
        }
    }
    out
}

/// Text without comments and with runs of white space as one space;
/// string and character literals are kept as written.
pub(crate) fn normalized(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let rest = &text[i..];
        let is_space = c.is_whitespace() || rest.starts_with("/*") || rest.starts_with("//");
        if is_space {
            if rest.starts_with("/*") {
                let end = text[i + 2..]
                    .find("*/")
                    .map_or(text.len(), |e| i + 2 + e + 2);
                while chars.peek().is_some_and(|&(j, _)| j < end) {
                    chars.next();
                }
            } else if rest.starts_with("//") {
                while chars.peek().is_some_and(|&(_, c)| c != '\n') {
                    chars.next();
                }
            }
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
        if c == '"' || c == '\'' {
            while let Some((_, d)) = chars.next() {
                out.push(d);
                if d == '\\' {
                    if let Some((_, escaped)) = chars.next() {
                        out.push(escaped);
                    }
                } else if d == c || d == '\n' {
                    break;
                }
            }
        }
    }
    out
}

/// Names a member declaration declares; empty for an anonymous member.
fn declared_names(declaration: Node, text: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor = declaration.walk();
    for declarator in declaration.children_by_field_name("declarator", &mut cursor) {
        let mut node = declarator;
        loop {
            if node.kind() == "field_identifier" {
                names.push(text_of(text, node).to_string());
                break;
            }
            match node
                .child_by_field_name("declarator")
                .or_else(|| node.named_child(0))
            {
                Some(inner) => node = inner,
                None => break,
            }
        }
    }
    names
}

/// The member declarations `patched` adds to struct and union definitions
/// that `original` also has. Types whose change is more than that are not
/// listed.
pub fn added_members(original: &[u8], patched: &[u8]) -> Vec<Addition> {
    let (Some(old_tree), Some(new_tree)) = (parse(original), parse(patched)) else {
        return Vec::new();
    };
    let old_defs = definitions(old_tree.root_node(), original);
    let new_defs = definitions(new_tree.root_node(), patched);
    let mut out = Vec::new();
    for new in &new_defs {
        let mut same_name = old_defs.iter().filter(|d| d.type_name == new.type_name);
        let (Some(old), None) = (same_name.next(), same_name.next()) else {
            continue;
        };
        if new_defs
            .iter()
            .filter(|d| d.type_name == new.type_name)
            .count()
            != 1
        {
            continue;
        }
        let old_body = normalized(text_of(original, old.body));
        if old_body == normalized(text_of(patched, new.body)) {
            continue;
        }
        let old_items: Vec<String> = items(old.body)
            .into_iter()
            .map(|n| normalized(text_of(original, n)))
            .collect();
        let new_items = items(new.body);
        // Match the original's items in order; what is left over was added.
        let mut next_old = 0;
        let mut added = Vec::new();
        for item in &new_items {
            let text = normalized(text_of(patched, *item));
            if next_old < old_items.len() && old_items[next_old] == text {
                next_old += 1;
            } else {
                added.push(*item);
            }
        }
        if next_old != old_items.len()
            || added.is_empty()
            || added.iter().any(|n| n.kind() != "field_declaration")
        {
            continue;
        }
        // The proof: the body without the additions is the original body.
        let body = new.body.byte_range();
        let mut rest = String::new();
        let mut at = body.start;
        for item in &added {
            rest.push_str(&String::from_utf8_lossy(&patched[at..item.start_byte()]));
            at = item.end_byte();
        }
        rest.push_str(&String::from_utf8_lossy(&patched[at..body.end]));
        if normalized(&rest) != old_body {
            continue;
        }
        let members: Vec<AddedMember> = added
            .iter()
            .map(|n| AddedMember {
                names: declared_names(*n, patched),
                declaration: text_of(patched, *n).to_string(),
                range: n.byte_range(),
            })
            .collect();
        if members.iter().any(|m| m.names.is_empty()) {
            continue;
        }
        out.push(Addition {
            type_name: new.type_name.clone(),
            typedef_only: new.typedef_only,
            members,
            definition_end: new.end,
        });
    }
    out.sort_by_key(|a| a.definition_end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_member_added_in_the_middle() {
        let old = b"typedef struct {\n\tstruct list_head list;\n\tunsigned long flags; /* type */\n\tint offset;\n} Node;\n";
        let new = b"typedef struct {\n\tstruct list_head list;\n\tunsigned long flags; /* type */\n\tunsigned long generation; /* new */\n\tint offset;\n} Node;\n";
        let found = added_members(old, new);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].type_name, "Node");
        assert!(found[0].typedef_only);
        assert_eq!(found[0].members[0].names, vec!["generation".to_string()]);
        assert_eq!(found[0].members[0].declaration, "unsigned long generation;");
    }

    #[test]
    fn looks_into_conditional_blocks_and_ignores_comments() {
        let old = b"struct task {\n#ifdef CONFIG_X\n\tint a;\n#endif\n\tlong b; // b\n};\n";
        let new = b"struct task {\n#ifdef CONFIG_X\n\tint a;\n#endif\n\tlong b; /* b */\n\tint newpid, other;\n};\n";
        let found = added_members(old, new);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].type_name, "struct task");
        assert_eq!(
            found[0].members[0].names,
            vec!["newpid".to_string(), "other".to_string()]
        );
    }

    #[test]
    fn normalizing_keeps_string_literals() {
        assert_eq!(normalized("a  /* x */ b // y\n c"), "a b c");
        assert_eq!(
            normalized("s = \"http://x/a  b\"; // c"),
            "s = \"http://x/a  b\";"
        );
        assert_ne!(normalized("\"http://x/a\""), normalized("\"http://x/b\""));
        assert_eq!(normalized("'\\''  x"), "'\\'' x");
    }

    #[test]
    fn leaves_other_layout_changes_to_the_layout_check() {
        let old = b"struct s { int a; long b; };";
        for new in [
            &b"struct s { long a; long b; int c; };"[..], // retyped
            b"struct s { long b; int a; int c; };",       // moved
            b"struct s { int a; };",                      // removed
            b"struct s { int a; long b; };",              // unchanged
        ] {
            assert!(
                added_members(old, new).is_empty(),
                "{}",
                String::from_utf8_lossy(new)
            );
        }
    }
}
