//! Data-type layout comparison on objects compiled at test time with the
//! kernel's section flags, in DWARF 5 (the kernel's format) and DWARF 4,
//! and on real kernel objects built from example patches.

mod common;

use dynamos::diff::object::ObjectFile;
use dynamos::diff::types::{layout_changes, LayoutChange};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const FLAGS: &[&str] = &["-c", "-g", "-O2", "-ffunction-sections", "-fdata-sections"];

fn compile_with(dir: &Path, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&c, source).unwrap();
    let status = Command::new("cc")
        .args(FLAGS)
        .args(extra)
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .status()
        .expect("cc runs");
    assert!(status.success(), "compiling {name}.c failed");
    o
}

fn changes_with(orig: &str, patched: &str, extra: &[&str]) -> Vec<LayoutChange> {
    let dir = tempfile::tempdir().unwrap();
    let a = compile_with(dir.path(), "orig", orig, extra);
    let b = compile_with(dir.path(), "patched", patched, extra);
    let a = ObjectFile::read(&a).unwrap();
    let b = ObjectFile::read(&b).unwrap();
    layout_changes(&a, &b).unwrap()
}

fn changes(orig: &str, patched: &str) -> Vec<LayoutChange> {
    changes_with(orig, patched, &[])
}

/// The single change reported, checked for type and member.
fn one(changes: &[LayoutChange], type_name: &str, member: Option<&str>) -> LayoutChange {
    assert_eq!(changes.len(), 1, "expected one change, got {changes:#?}");
    let c = changes[0].clone();
    assert_eq!(c.type_name, type_name, "{c:?}");
    assert_eq!(c.member.as_deref(), member, "{c:?}");
    c
}

const CONN: &str = "struct conn { int fd; long seq; };\n\
                    int get_fd(struct conn *c) { return c->fd; }\n";
const CONN_FLAGS: &str = "struct conn { int fd; long seq; int flags; };\n\
                          int get_fd(struct conn *c) { return c->fd; }\n";

#[test]
fn identical_sources_have_no_change() {
    assert!(changes(CONN, CONN).is_empty());
}

#[test]
fn member_added_at_the_end_of_a_type_used_through_pointers() {
    let found = changes(CONN, CONN_FLAGS);
    let c = one(&found, "struct conn", Some("flags"));
    assert!(c.detail.contains("member added: flags"), "{c}");
    assert!(c.detail.contains("size 16 -> 24"), "{c}");
}

#[test]
fn type_only_passed_along_by_pointer_is_still_compared() {
    let orig = "struct ctx { int a; };\n\
                void take(struct ctx *);\n\
                void pass(struct ctx *c) { take(c); }\n";
    let patched = "struct ctx { int a; int b; };\n\
                   void take(struct ctx *);\n\
                   void pass(struct ctx *c) { take(c); }\n";
    let found = changes(orig, patched);
    one(&found, "struct ctx", Some("b"));
}

#[test]
fn member_inserted_in_the_middle_names_the_first_moved_member() {
    let orig = "struct rec { long a; long b; long c; };\n\
                long get_c(struct rec *r) { return r->c; }\n";
    let patched = "struct rec { long a; long z; long b; long c; };\n\
                   long get_c(struct rec *r) { return r->c; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct rec", Some("b"));
    assert!(c.detail.starts_with("member b: offset 8 -> 16"), "{c}");
    assert!(c.detail.contains("size 24 -> 32"), "{c}");
}

#[test]
fn member_type_change_of_the_same_size() {
    let orig = "struct ctr { int x; int y; };\n\
                int get(struct ctr *c) { return c->y; }\n";
    let patched = "struct ctr { unsigned int x; int y; };\n\
                   int get(struct ctr *c) { return c->y; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct ctr", Some("x"));
    assert_eq!(c.detail, "member x: type int -> unsigned int");
}

#[test]
fn pointer_member_types_are_named() {
    let orig = "struct list_head { struct list_head *next, *prev; };\n\
                struct item { struct list_head node; char tag[16]; };\n\
                struct item *first(struct item *i) { return i; }\n";
    let patched = "struct list_head { struct list_head *next, *prev; };\n\
                   struct item { struct list_head *node; char tag[16]; };\n\
                   struct item *first(struct item *i) { return i; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct item", Some("node"));
    assert!(
        c.detail
            .starts_with("member node: type struct list_head -> struct list_head *"),
        "{c}"
    );
}

#[test]
fn bit_field_width_change() {
    let orig = "struct fl { unsigned a:3; unsigned b:5; int n; };\n\
                int get(struct fl *f) { return f->a + f->b; }\n";
    let patched = "struct fl { unsigned a:4; unsigned b:5; int n; };\n\
                   int get(struct fl *f) { return f->a + f->b; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct fl", Some("a"));
    assert_eq!(c.detail, "member a: bit size 3 -> 4");
}

#[test]
fn bit_field_width_change_in_dwarf4() {
    let orig = "struct fl { unsigned a:3; unsigned b:5; int n; };\n\
                int get(struct fl *f) { return f->a + f->b; }\n";
    let patched = "struct fl { unsigned a:4; unsigned b:5; int n; };\n\
                   int get(struct fl *f) { return f->a + f->b; }\n";
    let found = changes_with(orig, patched, &["-gdwarf-4"]);
    let c = one(&found, "struct fl", Some("a"));
    assert_eq!(c.detail, "member a: bit size 3 -> 4");
    assert!(changes_with(orig, orig, &["-gdwarf-4"]).is_empty());
}

#[test]
fn dwarf4_offsets_and_type_units() {
    let orig = "struct rec { long a; long b; };\n\
                long get(struct rec *r) { return r->b; }\n";
    let patched = "struct rec { long a; int z; long b; };\n\
                   long get(struct rec *r) { return r->b; }\n";
    for extra in [
        &["-gdwarf-4"][..],
        &["-gdwarf-4", "-fdebug-types-section"][..],
        &["-gdwarf-5", "-fdebug-types-section"][..],
    ] {
        let found = changes_with(orig, patched, extra);
        let c = one(&found, "struct rec", Some("b"));
        assert!(
            c.detail.starts_with("member b: offset 8 -> 16"),
            "{extra:?}: {c}"
        );
        assert!(changes_with(orig, orig, extra).is_empty(), "{extra:?}");
    }
}

#[test]
fn function_body_change_alone_is_no_change() {
    let patched = "struct conn { int fd; long seq; };\n\
                   int get_fd(struct conn *c) { return c->fd + 1; }\n";
    assert!(changes(CONN, patched).is_empty());
}

#[test]
fn struct_only_in_the_patched_build_is_new() {
    let patched = "struct conn { int fd; long seq; };\n\
                   struct extra { int a; char b[4]; };\n\
                   int get_fd(struct conn *c) { return c->fd; }\n\
                   int get_a(struct extra *e) { return e->a; }\n";
    assert!(changes(CONN, patched).is_empty());
}

#[test]
fn named_member_of_anonymous_union_type_is_flattened() {
    let orig = "struct val { int kind; union { int i; long l; } u; int tail; };\n\
                int get(struct val *v) { return v->tail + v->u.i; }\n";
    let patched = "struct val { int kind; union { unsigned i; long l; } u; int tail; };\n\
                   int get(struct val *v) { return v->tail + v->u.i; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct val", Some("u.i"));
    assert_eq!(c.detail, "member u.i: type int -> unsigned int");
}

#[test]
fn unnamed_anonymous_union_members_sit_at_the_outer_level() {
    let orig = "struct val { int kind; union { int i; long l; }; int tail; };\n\
                int get(struct val *v) { return v->tail + v->i; }\n";
    let patched = "struct val { int kind; union { int i; long l; char s[16]; }; int tail; };\n\
                   int get(struct val *v) { return v->tail + v->i; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "struct val", Some("tail"));
    assert!(c.detail.starts_with("member tail: offset 16 -> 24"), "{c}");
}

#[test]
fn anonymous_struct_named_by_a_typedef() {
    let orig = "typedef struct { int counter; } atomic_t;\n\
                int get(atomic_t *a) { return a->counter; }\n";
    let patched = "typedef struct { long counter; } atomic_t;\n\
                   int get(atomic_t *a) { return a->counter; }\n";
    let found = changes(orig, patched);
    let c = one(&found, "atomic_t", Some("counter"));
    assert!(
        c.detail.starts_with("member counter: type int -> long int"),
        "{c}"
    );
}

#[test]
fn typedefs_are_resolved_to_the_underlying_type() {
    let orig = "typedef unsigned int u32;\n\
                struct h { u32 v; };\n\
                int get(struct h *h) { return h->v; }\n";
    let patched = "struct h { unsigned int v; };\n\
                   int get(struct h *h) { return h->v; }\n";
    assert!(changes(orig, patched).is_empty());
}

const LOCALS: &str = "int f(void) { struct tmp { int a; } t = { 1 }; \
                      return *(volatile int *)&t.a; }\n\
                      long g(void) { struct tmp { long x; long y; } t = { 1, 2 }; \
                      return *(volatile long *)&t.y; }\n";

#[test]
fn different_local_types_with_one_name_compare_as_a_set() {
    assert!(changes(LOCALS, LOCALS).is_empty());
    let patched = LOCALS.replace("long x; long y;", "long x; int y;");
    let found = changes(LOCALS, &patched);
    let c = one(&found, "struct tmp", Some("y"));
    assert!(
        c.detail.starts_with("member y: type long int -> int"),
        "{c}"
    );
}

#[test]
fn objects_without_debug_info() {
    let dir = tempfile::tempdir().unwrap();
    let src = "struct s { int a; }; int f(struct s *p) { return p->a; }\n";
    let plain = compile_with(dir.path(), "plain", src, &["-g0"]);
    let debug = compile_with(dir.path(), "debug", src, &[]);
    let plain = ObjectFile::read(&plain).unwrap();
    let debug = ObjectFile::read(&debug).unwrap();
    assert!(layout_changes(&plain, &plain).unwrap().is_empty());
    let err = layout_changes(&debug, &plain).unwrap_err();
    assert!(
        format!("{err:#}").contains("no DWARF debug info"),
        "{err:#}"
    );
    assert!(layout_changes(&plain, &debug).is_err());
}

#[test]
fn garbage_and_truncated_objects_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = compile_with(dir.path(), "ok", CONN, &[]);
    let bytes = std::fs::read(&o).unwrap();
    let path = Path::new("bad.o");
    assert!(ObjectFile::parse(path, b"garbage, not an object".to_vec()).is_err());
    assert!(ObjectFile::parse(path, bytes[..bytes.len() / 2].to_vec()).is_err());

    let good = ObjectFile::parse(path, bytes.clone()).unwrap();
    let range = |name: &str| {
        let obj = ObjectFile::parse(path, bytes.clone()).unwrap();
        let index = obj.section_by_name(name).unwrap();
        let start = obj.data(index).as_ptr() as usize - obj.bytes().as_ptr() as usize;
        start..start + obj.data(index).len()
    };

    // Abbreviations overwritten: a clear error naming the object.
    let mut broken = bytes.clone();
    broken[range(".debug_abbrev")].fill(0xff);
    let bad = ObjectFile::parse(path, broken).unwrap();
    let err = layout_changes(&good, &bad).unwrap_err();
    assert!(format!("{err:#}").contains("bad.o"), "{err:#}");

    // Unit header cut short.
    let mut broken = bytes.clone();
    let info = range(".debug_info");
    broken[info.start..info.start + 4].copy_from_slice(&0xfff0u32.to_le_bytes());
    let bad = ObjectFile::parse(path, broken).unwrap();
    assert!(layout_changes(&good, &bad).is_err());

    // Corruption anywhere in the debug info: an error or a result, never a
    // panic.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut outcomes = Vec::new();
    for name in [".debug_info", ".debug_abbrev", ".debug_str"] {
        let r = range(name);
        for _ in 0..300 {
            let mut broken = bytes.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = r.start + (seed as usize) % r.len();
                broken[at] = (seed >> 32) as u8;
            }
            let bad = ObjectFile::parse(path, broken).unwrap();
            match layout_changes(&good, &bad) {
                Ok(_) => outcomes.push(true),
                Err(err) => {
                    // A clear error naming the object, like the cases above.
                    assert!(format!("{err:#}").contains("bad.o"), "{name}: {err:#}");
                    outcomes.push(false);
                }
            }
            // Whatever the corruption, an object never differs from itself.
            if let Ok(found) = layout_changes(&bad, &bad) {
                assert!(found.is_empty(), "{name}: {found:#?}");
            }
        }
    }
    // Both outcomes occur: the corruption reaches the parser.
    assert!(outcomes.contains(&true) && outcomes.contains(&false));
}

/// Real kernel objects, from both builds of example patches: each compares
/// equal to itself, patches that change no type leave every layout alone,
/// and the member moved in binfmt_misc's `Node` is found.
#[test]
fn kernel_objects_compare_equal_to_themselves() {
    let build = common::build_example_objects(&[
        "proc-version-banner.diff",
        "schedstat-static-key.diff",
        "refused-module-layout.diff",
    ]);
    let mut built: Vec<_> = build.pairs.iter().map(|p| p.object.clone()).collect();
    built.sort();
    assert_eq!(
        built,
        [
            Path::new("fs/binfmt_misc.o"),
            Path::new("fs/proc/version.o"),
            Path::new("kernel/sched/build_utility.o"),
        ],
        "objects built"
    );
    for pair in &build.pairs {
        let rel = pair.object.display();
        let a = ObjectFile::read(&pair.original).unwrap();
        let p = ObjectFile::read(&pair.patched).unwrap();
        let start = Instant::now();
        let found = layout_changes(&a, &a).unwrap();
        eprintln!(
            "{rel}: compared with itself in {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
        assert!(found.is_empty(), "{rel}: {found:#?}");
        assert!(layout_changes(&p, &p).unwrap().is_empty(), "{rel}");

        let start = Instant::now();
        let found = layout_changes(&a, &p).unwrap();
        eprintln!(
            "{rel}: orig vs patched build in {:.1} ms: {} layout change(s)",
            start.elapsed().as_secs_f64() * 1e3,
            found.len()
        );
        if pair.object == Path::new("fs/binfmt_misc.o") {
            assert!(!found.is_empty(), "{rel}: the moved member is not found");
            assert!(
                found.iter().all(|c| c.type_name == "Node"),
                "{rel}: {found:#?}"
            );
            assert!(
                found.iter().any(|c| c.member.as_deref() == Some("offset")),
                "{rel}: {found:#?}"
            );
        } else {
            assert!(found.is_empty(), "{rel}: {found:#?}");
        }
    }
}
