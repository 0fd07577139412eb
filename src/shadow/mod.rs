//! Shadow members: the shadow stage sits between patch and build.
//!
//! A member the patch adds to a struct or union cannot be added to the
//! objects the running kernel already has. The stage takes the added
//! declarations out of the patched text, so every file compiles against the
//! original layout; turns each access to an added member into an access to
//! a shadow object keyed by the object's address; and frees the shadow where
//! the object is freed. docs/shadow-members.md describes the approach.

mod members;
mod sites;

pub use members::{added_members, AddedMember, Addition};
pub use sites::rewrite_accesses;

use crate::diff::ObjectFile;
use crate::error::{Error, Refusal};
pub use crate::package::ShadowType;
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Section of the patched objects naming each release point found: one
/// 16-byte record per point, the code address then the type index.
pub const RELEASE_SECTION: &str = ".discard.dynamos.shadow_release";

/// Largest shadow object, in bytes: a read of an object without one is
/// served from a zeroed area of this size.
pub const MAX_SHADOW_SIZE: usize = 512;

/// Functions that free the object their argument at the index points to.
const FREE_CALLS: &[(&str, usize)] = &[
    ("kfree", 0),
    ("kvfree", 0),
    ("kfree_sensitive", 0),
    ("vfree", 0),
    ("kfree_rcu", 0),
    ("kvfree_rcu", 0),
    ("kmem_cache_free", 1),
];

/// Copies whose destination (or, for kmemdup, source) is the argument at
/// the index: a copy of a shadowed object would not carry its shadow.
const COPY_CALLS: &[(&str, usize)] = &[("memcpy", 0), ("memmove", 0), ("kmemdup", 0)];

/// What the compiler says where a copy of a shadowed object was found.
pub(crate) const COPY_ERROR: &str = "dynamos-shadow-copy:";

/// Functions the livepatch module defines for the rewritten code; the
/// extracted objects keep them as undefined names, bound when the module
/// is linked.
pub fn is_runtime_symbol(name: &str) -> bool {
    matches!(
        name,
        "dynamos_shadow_get"
            | "dynamos_shadow_peek"
            | "dynamos_shadow_release"
            | "dynamos_shadow_release_rcu"
    )
}

impl ShadowType {
    fn struct_tag(&self) -> String {
        format!("__dynamos_shadow_{}", self.index)
    }

    fn member_names(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|d| members_of_declaration(d))
            .flatten()
            .collect()
    }

    /// Whether the type is defined in a header (and so visible in any file).
    fn in_header(&self) -> bool {
        self.file.ends_with(".h")
    }
}

fn members_of_declaration(declaration: &str) -> Option<Vec<String>> {
    let text = format!("struct __probe {{ {declaration} }};");
    let found = added_members(b"struct __probe { };", text.as_bytes());
    found.into_iter().next().map(|a| {
        a.members
            .into_iter()
            .flat_map(|m| m.names)
            .collect::<Vec<_>>()
    })
}

/// What the stage found and did, for the later stages.
#[derive(Debug, Clone, Default)]
pub struct ShadowPlan {
    pub types: Vec<ShadowType>,
    /// Headers that only gained members: left out of the build.
    pub unchanged_headers: Vec<PathBuf>,
}

impl ShadowPlan {
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The type an access diagnostic names (`struct task_struct`, `Node`)
    /// with that member; one defined in `file` itself comes first, as two
    /// files may each have a `struct priv` of their own.
    fn type_for(&self, type_text: &str, member: &str, file: Option<&Path>) -> Option<&ShadowType> {
        let wanted = type_text
            .trim_start_matches("const ")
            .trim_start_matches("volatile ")
            .trim();
        let all: Vec<&ShadowType> = self
            .types
            .iter()
            .filter(|t| t.type_name == wanted && t.member_names().iter().any(|m| m == member))
            .collect();
        all.iter()
            .find(|t| file.is_some_and(|f| Path::new(&t.file) == f))
            .or_else(|| all.iter().find(|t| t.in_header()))
            .copied()
    }

    /// Whether an added member is an array or a struct or union held by
    /// value: a read of it can yield a pointer into the shadow, so every
    /// access goes through the writable shadow.
    pub(crate) fn is_aggregate(&self, index: usize, member: &str) -> bool {
        let Some(t) = self.types.get(index) else {
            return true;
        };
        t.members.iter().any(|declaration| {
            let names = members_of_declaration(declaration).unwrap_or_default();
            let start = declaration.trim_start();
            names.iter().any(|n| n == member)
                && (declaration.contains('[')
                    || ((start.starts_with("struct ") || start.starts_with("union "))
                        && !declaration.contains('*')))
        })
    }

    /// Caveats for the build's notes: what objects from before the update
    /// read, and the headers left out of the build.
    pub fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self
            .types
            .iter()
            .map(|t| {
                let names = t.member_names();
                format!(
                    "{}: {} of objects from before the update read{} as zero until written",
                    t.type_name,
                    names.join(", "),
                    if names.len() == 1 { "s" } else { "" },
                )
            })
            .collect();
        notes.extend(self.unchanged_headers.iter().map(|h| {
            format!(
                "{}: only gains members; the files including it are not rebuilt",
                h.display()
            )
        }));
        notes
    }
}

/// Take added members out of the patched files and prepare every patched C
/// file for shadow accesses. Refused: members added to an untagged type a
/// header defines (other files cannot name it).
pub fn plan(
    changes: &mut BTreeMap<PathBuf, Option<Vec<u8>>>,
    original: impl Fn(&Path) -> Option<Vec<u8>>,
) -> Result<ShadowPlan> {
    let mut plan = ShadowPlan::default();
    let mut refusals = Vec::new();
    let paths: Vec<PathBuf> = changes.keys().cloned().collect();
    for path in &paths {
        let is_c = path.extension().is_some_and(|e| e == "c");
        let is_h = path.extension().is_some_and(|e| e == "h");
        let (Some(Some(patched)), true) = (changes.get(path), is_c || is_h) else {
            continue;
        };
        let Some(before) = original(path) else {
            continue;
        };
        let additions = added_members(&before, patched);
        if additions.is_empty() {
            continue;
        }
        let mut stripped = patched.clone();
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        for addition in &additions {
            if addition.typedef_only && is_h {
                refusals.push(Refusal {
                    symbol: addition.type_name.clone(),
                    reason: format!(
                        "members added to an untagged struct typedef'd in {}: other files cannot name it for its shadow; give the struct a tag",
                        path.display()
                    ),
                });
                continue;
            }
            ranges.extend(addition.members.iter().map(|m| m.range.clone()));
            plan.types.push(ShadowType {
                index: plan.types.len(),
                type_name: addition.type_name.clone(),
                file: path.display().to_string(),
                members: addition
                    .members
                    .iter()
                    .map(|m| m.declaration.clone())
                    .collect(),
                release_points: Vec::new(),
            });
        }
        ranges.sort_by_key(|r| std::cmp::Reverse(r.start));
        for range in ranges {
            // Keep the lines: `__LINE__` and the debug info stay as they were.
            let newlines: Vec<u8> = stripped[range.clone()]
                .iter()
                .copied()
                .filter(|&b| b == b'\n')
                .collect();
            stripped.splice(range, newlines);
        }
        // Only spacing, comments and line numbers differ: the original stands.
        let same = members::normalized(&String::from_utf8_lossy(&stripped))
            == members::normalized(&String::from_utf8_lossy(&before));
        if same {
            changes.remove(path);
            if is_h {
                plan.unchanged_headers.push(path.clone());
            }
        } else {
            changes.insert(path.clone(), Some(stripped));
        }
    }
    crate::error::refuse_any(refusals)?;
    if plan.is_empty() {
        return Ok(plan);
    }
    let paths: Vec<PathBuf> = changes.keys().cloned().collect();
    let mut next_point = 0;
    for path in paths {
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let Some(Some(text)) = changes.get(&path) else {
            continue;
        };
        let prepared = prepare_file(&path, text, &plan, &mut next_point);
        changes.insert(path, Some(prepared));
    }
    Ok(plan)
}

/// Byte offset where the code for a type may start: the first item of
/// `block` (the file, or the `#if` block defining the type) holding a
/// function definition after `after`.
fn first_function_after(block: tree_sitter::Node, after: usize) -> Option<usize> {
    fn holds_function(node: tree_sitter::Node) -> bool {
        if node.kind() == "function_definition" {
            return true;
        }
        if !matches!(
            node.kind(),
            "preproc_if" | "preproc_ifdef" | "preproc_else" | "preproc_elif" | "ERROR"
        ) {
            return false;
        }
        let mut cursor = node.walk();
        let found = node.named_children(&mut cursor).any(holds_function);
        found
    }
    let mut cursor = block.walk();
    let found = block
        .named_children(&mut cursor)
        .find(|c| c.start_byte() >= after && holds_function(*c))
        .map(|c| c.start_byte());
    found
}

/// Insert the shadow declarations before the first function that can use
/// each type, and route every free in reach through the release macro.
fn prepare_file(path: &Path, text: &[u8], plan: &ShadowPlan, next_point: &mut usize) -> Vec<u8> {
    let Some(tree) = members::parse(text) else {
        return text.to_vec();
    };
    let root = tree.root_node();
    let file = path.display().to_string();
    // Where each type's declarations go.
    let mut points: BTreeMap<usize, Vec<&ShadowType>> = BTreeMap::new();
    for shadow in &plan.types {
        let (after, block) = if shadow.in_header() {
            // A file that never names the type cannot use it (nor may it
            // see the declarations of its added members).
            if !mentions(text, &shadow.type_name) {
                continue;
            }
            (0, root)
        } else if shadow.file == file {
            // After the definition, inside the #if block that holds it.
            match definition_place(root, text, &shadow.type_name) {
                Some(place) => place,
                None => continue,
            }
        } else {
            continue;
        };
        if let Some(at) = first_function_after(block, after) {
            points.entry(at).or_default().push(shadow);
        }
    }
    if points.is_empty() {
        return text.to_vec();
    }
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut in_scope: Vec<&ShadowType> = Vec::new();
    let starts: Vec<usize> = points.keys().copied().collect();
    // Names unique across the package's files: one unit may #include another.
    let first = *next_point;
    *next_point += points.len();
    for (n, (at, types)) in points.iter().enumerate() {
        in_scope.extend(types.iter().copied());
        edits.push((*at..*at, prologue(text, *at, first + n, types, &in_scope)));
    }
    // Frees and copies after a prologue use the newest one before them. A
    // check beside the call selects by type and evaluates nothing for
    // other types, so their code stays byte for byte what it was.
    for (calls, check) in [(FREE_CALLS, "release"), (COPY_CALLS, "copy")] {
        for site in call_arguments(root, text, calls) {
            let Some(k) = starts.iter().rposition(|&s| s <= site.call.start) else {
                continue;
            };
            let k = first + k;
            // kfree_rcu: RCU readers may still read the object; its shadow
            // goes after a grace period too.
            let check = if site.statement_macro && check == "release" {
                "release_rcu"
            } else {
                check
            };
            let argument = String::from_utf8_lossy(&text[site.argument.clone()]).into_owned();
            let call = String::from_utf8_lossy(&text[site.call.clone()]).into_owned();
            let guard = format!("__dynamos_{check}_check_{k}({argument})");
            // A release evaluates its argument again where the type matches.
            let repeatable = check == "copy" || site.argument_is_plain;
            if !repeatable && site.statement_macro {
                // Left to the author: DYNAMOS_SHADOW_FREE before it.
                continue;
            }
            if let (Some(statement), true) = (site.statement.clone(), repeatable) {
                let statement_text = String::from_utf8_lossy(&text[statement.clone()]).into_owned();
                edits.push((statement, format!("{{ {guard}; {statement_text} }}")));
            } else if repeatable && !site.statement_macro {
                edits.push((site.call, format!("({guard}, {call})")));
            } else {
                edits.push((site.argument, format!("__dynamos_released_{k}({argument})")));
            }
        }
    }
    apply_edits(text, edits)
}

/// Whether `text` names the type: its tag or typedef name as a word.
fn mentions(text: &[u8], type_name: &str) -> bool {
    let name = type_name.rsplit(' ').next().unwrap_or(type_name).as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    text.windows(name.len()).enumerate().any(|(i, w)| {
        w == name
            && (i == 0 || !is_word(text[i - 1]))
            && text.get(i + name.len()).is_none_or(|&b| !is_word(b))
    })
}

/// End of the definition of `type_name`, and the block that holds it: the
/// innermost `#if` around it, or the whole file.
fn definition_place<'t>(
    root: tree_sitter::Node<'t>,
    text: &[u8],
    type_name: &str,
) -> Option<(usize, tree_sitter::Node<'t>)> {
    let definition = members::definitions(root, text)
        .into_iter()
        .find(|d| d.type_name == type_name)?;
    let mut block = definition.body.parent();
    while let Some(b) = block {
        if matches!(
            b.kind(),
            "preproc_if" | "preproc_ifdef" | "preproc_else" | "preproc_elif"
        ) {
            break;
        }
        block = b.parent();
    }
    Some((definition.end, block.unwrap_or(root)))
}

/// One call of [`FREE_CALLS`] or [`COPY_CALLS`].
struct CallSite {
    call: std::ops::Range<usize>,
    argument: std::ops::Range<usize>,
    /// The statement the call is, when it is one: `kfree(p);`.
    statement: Option<std::ops::Range<usize>>,
    /// A variable or a member or element of one: evaluating it twice is harmless.
    argument_is_plain: bool,
    /// A macro that expands to a statement (`kfree_rcu`).
    statement_macro: bool,
}

/// Whether evaluating `node` has no side effects and calls nothing.
fn is_plain(node: tree_sitter::Node) -> bool {
    match node.kind() {
        "identifier" | "number_literal" | "null" => true,
        "field_expression" | "parenthesized_expression" | "cast_expression" => node
            .child_by_field_name("argument")
            .or_else(|| node.child_by_field_name("value"))
            .or_else(|| node.named_child(0))
            .is_some_and(is_plain),
        "pointer_expression" => node.child_by_field_name("argument").is_some_and(is_plain),
        "subscript_expression" => {
            node.child_by_field_name("argument").is_some_and(is_plain)
                && node.child_by_field_name("index").is_some_and(is_plain)
        }
        _ => false,
    }
}

/// Every call of one of `calls`, with the argument it names.
fn call_arguments(root: tree_sitter::Node, text: &[u8], calls: &[(&str, usize)]) -> Vec<CallSite> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if node.kind() == "call_expression" {
            let called = node
                .child_by_field_name("function")
                .filter(|f| f.kind() == "identifier")
                .map(|f| members::text_of(text, f));
            let found = called.and_then(|c| calls.iter().find(|(n, _)| *n == c));
            if let (Some(&(name, index)), Some(arguments)) =
                (found, node.child_by_field_name("arguments"))
            {
                let mut cursor = arguments.walk();
                let argument = arguments
                    .named_children(&mut cursor)
                    .filter(|a| a.kind() != "comment")
                    .nth(index);
                if let Some(argument) = argument {
                    out.push(CallSite {
                        call: node.byte_range(),
                        argument: argument.byte_range(),
                        statement: node
                            .parent()
                            .filter(|p| p.kind() == "expression_statement")
                            .map(|p| p.byte_range()),
                        argument_is_plain: is_plain(argument),
                        statement_macro: name.ends_with("_rcu"),
                    });
                }
            }
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    out
}

/// Apply non-overlapping edits; an edit inside another's range is dropped.
pub(crate) fn apply_edits(
    text: &[u8],
    mut edits: Vec<(std::ops::Range<usize>, String)>,
) -> Vec<u8> {
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let mut out = Vec::with_capacity(text.len() + 1024);
    let mut at = 0;
    for (range, replacement) in edits {
        if range.start < at {
            continue;
        }
        out.extend_from_slice(&text[at..range.start]);
        out.extend_from_slice(replacement.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&text[at..]);
    out
}

/// 1-based line of a byte offset.
fn line_at(text: &[u8], at: usize) -> usize {
    text[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The declarations one insertion point adds, ending with a `#line` that
/// gives the following text its original line numbers back.
fn prologue(
    text: &[u8],
    at: usize,
    k: usize,
    types: &[&ShadowType],
    in_scope: &[&ShadowType],
) -> String {
    let line = line_at(text, at);
    let mid_line = at > 0 && text[at - 1] != b'\n';
    let mut out = String::new();
    if mid_line {
        out.push('\n');
    }
    out.push_str(
        "/* dynamos-build: the update's added members live in shadow data (docs/shadow-members.md). */\n\
         void *dynamos_shadow_get(const void *object, unsigned int type, unsigned long size);\n\
         const void *dynamos_shadow_peek(const void *object, unsigned int type);\n\
         void dynamos_shadow_release(const void *object, unsigned int type);\n\
         void dynamos_shadow_release_rcu(const void *object, unsigned int type);\n",
    );
    let record = |i: usize| {
        format!(
            "asm volatile(\".Ldynamos_release_%=:\\n\\t.pushsection {RELEASE_SECTION},\\\"\\\",@progbits\\n\\t.quad .Ldynamos_release_%=\\n\\t.quad {i}\\n\\t.popsection\" ::)"
        )
    };
    for t in types {
        let tag = t.struct_tag();
        let i = t.index;
        // A file that #includes another prepared file sees this twice.
        out.push_str(&format!(
            "#ifndef __DYNAMOS_SHADOW_{i}\n\
             #define __DYNAMOS_SHADOW_{i}\n\
             struct {tag} {{ {members} }};\n\
             _Static_assert(sizeof(struct {tag}) <= {MAX_SHADOW_SIZE}, \"dynamos: the members added to {name} take more than {MAX_SHADOW_SIZE} bytes\");\n\
             #define __dynamos_shadow_w_{i}(object) ((struct {tag} *)dynamos_shadow_get((object), {i}, sizeof(struct {tag})))\n\
             #define __dynamos_shadow_r_{i}(object) ((const struct {tag} *)dynamos_shadow_peek((object), {i}))\n\
             extern int __dynamos_copy_{i}(void) __attribute__((error(\"{COPY_ERROR} {name}\")));\n\
             #define __dynamos_release_{i}(object) ({{ {record}; dynamos_shadow_release((object), {i}); }})\n\
             #define __dynamos_release_rcu_{i}(object) ({{ {record}; dynamos_shadow_release_rcu((object), {i}); }})\n\
             #endif\n",
            members = t.members.join(" "),
            name = t.type_name,
            record = record(i),
        ));
    }
    let select = |what: &str, argument: &str| -> String {
        in_scope
            .iter()
            .map(|t| {
                let i = t.index;
                let ty = &t.type_name;
                let call = if what == "copy" {
                    format!("__dynamos_copy_{i}()")
                } else {
                    format!("__dynamos_{what}_{i}({argument})")
                };
                format!("{ty} *: {call}, const {ty} *: {call}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!(
        "#define __dynamos_release_check_{k}(pointer) _Generic((pointer), {}, default: (void)0)\n\
         #define __dynamos_release_rcu_check_{k}(pointer) _Generic((pointer), {}, default: (void)0)\n\
         #define __dynamos_copy_check_{k}(pointer) ((void)_Generic((pointer), {}, default: 0))\n\
         #define __dynamos_released_{k}(pointer) ({{ __auto_type __dynamos_object = (pointer); _Generic(__dynamos_object, {}, default: (void)0); __dynamos_object; }})\n\
         #undef DYNAMOS_SHADOW_FREE\n\
         #define DYNAMOS_SHADOW_FREE(object) ((void)__dynamos_released_{k}(object))\n\
         #line {line}\n",
        select("release", "pointer"),
        select("release_rcu", "pointer"),
        select("copy", "pointer"),
        select("release", "__dynamos_object"),
    ));
    out
}

/// The release points each type got, read from the patched objects'
/// records: functions by type index.
pub fn release_points(object: &ObjectFile) -> BTreeMap<usize, BTreeSet<String>> {
    let mut out: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let Some(index) = object
        .sections
        .iter()
        .position(|s| s.name == RELEASE_SECTION)
    else {
        return out;
    };
    let data = object.data(index);
    for reloc in &object.sections[index].relocs {
        if reloc.offset % 16 != 0 {
            continue;
        }
        let at = reloc.offset as usize + 8;
        let Some(bytes) = data.get(at..at + 8) else {
            continue;
        };
        let type_index = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])) as usize;
        let Some(symbol) = object.symbols.get(reloc.symbol) else {
            continue;
        };
        let Some(code_section) = symbol.section() else {
            continue;
        };
        let position = symbol.value as i64 + reloc.addend;
        if let Some(function) = crate::diff::covering_symbol(object, code_section, position) {
            // A function's `.cold` part frees for the function.
            let name = &object.symbols[function].name;
            let name = name.strip_suffix(".cold").unwrap_or(name);
            out.entry(type_index).or_default().insert(name.to_string());
        }
    }
    out
}

/// Shadows are allocated and freed under the livepatch core's spinlock
/// with `GFP_ATOMIC`, from whatever context the access is in. On a
/// `PREEMPT_RT` kernel that lock sleeps, and a write under a raw spinlock
/// (the scheduler's) would be a bug: refused there.
pub fn refuse_unsupported_kernel(plan: &ShadowPlan, config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    if !text.lines().any(|l| l.trim() == "CONFIG_PREEMPT_RT=y") {
        return Ok(());
    }
    let refusals = plan
        .types
        .iter()
        .map(|t| Refusal {
            symbol: t.type_name.clone(),
            reason: "members added on a PREEMPT_RT kernel: shadow data would be allocated under a lock that sleeps there".into(),
        })
        .collect();
    Err(Error::Refused(refusals).into())
}

/// Record the release points found in the patched objects; a type without
/// any is refused, saying how to name one.
pub fn check_release_points<'a>(
    plan: &mut ShadowPlan,
    patched: impl IntoIterator<Item = &'a ObjectFile>,
) -> Result<()> {
    for object in patched {
        for (index, functions) in release_points(object) {
            if let Some(t) = plan.types.get_mut(index) {
                for f in functions {
                    if !t.release_points.contains(&f) {
                        t.release_points.push(f);
                    }
                }
            }
        }
    }
    let refusals: Vec<Refusal> = plan
        .types
        .iter()
        .filter(|t| t.release_points.is_empty())
        .map(|t| Refusal {
            symbol: t.type_name.clone(),
            reason: format!(
                "no release point found for the shadow of its added members: no file of the patch frees a {} pointer with kfree, kvfree, kmem_cache_free or kfree_rcu; write DYNAMOS_SHADOW_FREE(object) (dynamos.h) where its objects are freed",
                t.type_name
            ),
        })
        .collect();
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn changes(files: &[(&str, &str)]) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), Some(t.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn a_header_that_only_gains_members_leaves_the_build() {
        let old_header = "struct task { int pid; };\n";
        let mut files = changes(&[
            ("include/task.h", "struct task { int pid;\n\tint newpid;\n};\n"),
            (
                "kernel/fork.c",
                "#include <task.h>\nstatic int x;\nvoid put(struct task *t)\n{\n\tkfree(t);\n}\nint clone(struct task *t)\n{\n\treturn t->newpid;\n}\n",
            ),
        ]);
        let plan = plan(&mut files, |p| {
            (p == Path::new("include/task.h"))
                .then(|| old_header.as_bytes().to_vec())
                .or_else(|| Some(b"#include <task.h>\n".to_vec()))
        })
        .unwrap();
        assert_eq!(plan.types.len(), 1);
        assert_eq!(plan.types[0].type_name, "struct task");
        assert_eq!(
            plan.unchanged_headers,
            vec![PathBuf::from("include/task.h")]
        );
        assert!(!files.contains_key(Path::new("include/task.h")));
        let fork = String::from_utf8(files[Path::new("kernel/fork.c")].clone().unwrap()).unwrap();
        assert!(
            fork.contains("{ __dynamos_release_check_0(t); kfree(t); }"),
            "{fork}"
        );
        assert!(fork.contains("#line 3\nvoid put"), "{fork}");
        assert!(
            fork.contains("struct __dynamos_shadow_0 { int newpid; };"),
            "{fork}"
        );
    }

    #[test]
    fn frees_and_copies_get_a_check_that_other_types_compile_away() {
        let mut files = changes(&[(
            "kernel/x.c",
            "struct task { int pid; int newpid; };\nvoid f(struct task *t, char *buf)\n{\n\tmemcpy(buf, t, 4);\n\tif (t)\n\t\tkfree(pop(t));\n\tkfree_rcu(t, rcu);\n\tt = kmemdup(t, 8, 0);\n}\n",
        )]);
        plan(&mut files, |_| {
            Some(b"struct task { int pid; };\nvoid f(struct task *t, char *buf)\n{\n}\n".to_vec())
        })
        .unwrap();
        let text = String::from_utf8(files[Path::new("kernel/x.c")].clone().unwrap()).unwrap();
        for expected in [
            "{ __dynamos_copy_check_0(buf); memcpy(buf, t, 4); }",
            // A call in the argument is evaluated once, through a temporary.
            "kfree(__dynamos_released_0(pop(t)));",
            "{ __dynamos_release_rcu_check_0(t); kfree_rcu(t, rcu); }",
            "t = (__dynamos_copy_check_0(t), kmemdup(t, 8, 0));",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn a_type_inside_an_if_block_gets_its_declarations_there() {
        let patched = "#ifdef CONFIG_X\nstruct priv { int a; int b; };\nstatic int f(struct priv *p)\n{\n\treturn p->b;\n}\n#endif\n";
        let mut files = changes(&[("drivers/x.c", patched)]);
        plan(&mut files, |_| {
            Some(b"#ifdef CONFIG_X\nstruct priv { int a; };\nstatic int f(struct priv *p)\n{\n\treturn 0;\n}\n#endif\n".to_vec())
        })
        .unwrap();
        let text = String::from_utf8(files[Path::new("drivers/x.c")].clone().unwrap()).unwrap();
        let declared = text.find("struct __dynamos_shadow_0 {").expect("declared");
        assert!(declared < text.find("static int f").unwrap(), "{text}");
        assert!(declared > text.find("#ifdef CONFIG_X").unwrap(), "{text}");
    }

    #[test]
    fn refuses_an_untagged_header_type() {
        let mut files = changes(&[("include/n.h", "typedef struct { int a; int b; } N;\n")]);
        let err = plan(&mut files, |_| {
            Some(b"typedef struct { int a; } N;\n".to_vec())
        })
        .unwrap_err();
        assert!(err.to_string().contains("untagged struct"), "{err}");
    }

    /// `int newpid;` added to a header's `struct task`.
    pub(crate) fn task_plan() -> ShadowPlan {
        ShadowPlan {
            types: vec![ShadowType {
                index: 0,
                type_name: "struct task".into(),
                file: "include/task.h".into(),
                members: vec!["int newpid;".into()],
                release_points: vec![],
            }],
            unchanged_headers: vec![],
        }
    }

    #[test]
    fn refuses_shadows_on_a_realtime_kernel() {
        let plan = task_plan();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, "CONFIG_PREEMPT_DYNAMIC=y\n").unwrap();
        refuse_unsupported_kernel(&plan, &config).unwrap();
        std::fs::write(&config, "CONFIG_PREEMPT_RT=y\n").unwrap();
        let err = refuse_unsupported_kernel(&plan, &config).unwrap_err();
        assert!(err.to_string().contains("PREEMPT_RT"), "{err}");
    }

    #[test]
    fn member_names_of_declarations() {
        assert_eq!(
            members_of_declaration("unsigned long a, *b;"),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }
}
