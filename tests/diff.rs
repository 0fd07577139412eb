//! The diff stage on objects compiled at test time with kernel-like flags
//! (function/data sections, fentry with recorded mcount locations, kernel
//! code model), through the `dynamos diff` command.

mod common;

use common::KERNEL_LIKE_FLAGS;
use std::path::{Path, PathBuf};
use std::process::Command;

const INIT: &str = "#define __init __attribute__((__section__(\".init.text\"), __cold__))\n";

/// Compiles `source` as `unit.c` in a folder of its own, so that both
/// builds of a unit see the same `__FILE__`, as kernel builds do.
fn compile(dir: &Path, name: &str, source: &str) -> PathBuf {
    compile_with(dir, name, source, &[])
}

fn compile_with(dir: &Path, name: &str, source: &str, drop_flags: &[&str]) -> PathBuf {
    let src_dir = dir.join(name);
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::write(src_dir.join("unit.c"), source).unwrap();
    let o = dir.join(format!("{name}.o"));
    let status = Command::new("cc")
        .args(KERNEL_LIKE_FLAGS.iter().filter(|f| !drop_flags.contains(f)))
        .arg("unit.c")
        .current_dir(&src_dir)
        .arg("-o")
        .arg(&o)
        .status()
        .expect("cc runs");
    assert!(status.success(), "compiling {name}.c failed");
    o
}

struct DiffRun {
    code: i32,
    json: serde_json::Value,
}

fn diff(orig_src: &str, patched_src: &str) -> DiffRun {
    diff_with(orig_src, patched_src, &[])
}

/// `diff` with some of the kernel-like flags left out of both compiles.
fn diff_with(orig_src: &str, patched_src: &str, drop_flags: &[&str]) -> DiffRun {
    let dir = tempfile::tempdir().unwrap();
    let a = compile_with(dir.path(), "orig", orig_src, drop_flags);
    let b = compile_with(dir.path(), "patched", patched_src, drop_flags);
    run_diff(&a, &b)
}

/// `dynamos diff --json` on two objects.
fn run_diff(a: &Path, b: &Path) -> DiffRun {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamos"))
        .args(["diff", "--json"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    DiffRun {
        code: out.status.code().unwrap(),
        json,
    }
}

fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

fn refused_symbols(v: &serde_json::Value) -> Vec<String> {
    v["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["symbol"].as_str().unwrap().to_string())
        .collect()
}

const BASE: &str = r#"
extern int printk(const char *fmt, ...);
static int counter;
int shown(int x)
{
    static int calls;
    calls++;
    counter += x;
    printk("shown %d\n", x);
    return counter;
}
int other(int y) { return y * 3 + counter; }
"#;

#[test]
fn identical_sources_have_no_change() {
    let run = diff(BASE, BASE);
    assert_eq!(run.code, 3);
    assert!(names(&run.json, "changed").is_empty());
}

#[test]
fn a_changed_body_is_reported_alone() {
    let patched = BASE.replace("counter += x;", "counter += 2 * x;");
    let run = diff(BASE, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["shown"]);
    assert!(names(&run.json, "new").is_empty());
}

#[test]
fn a_changed_string_literal_changes_only_its_function() {
    let patched = BASE.replace("shown %d\\n", "shown now %d\\n");
    let run = diff(BASE, &patched);
    assert_eq!(names(&run.json, "changed"), ["shown"]);
}

#[test]
fn a_new_function_is_new_and_its_caller_changed() {
    let patched = BASE.replace(
        "int other(int y) { return y * 3 + counter; }",
        "static __attribute__((noinline)) int helper(int y) { return y ^ counter; }\n\
         int other(int y) { return helper(y) * 3 + counter; }",
    );
    let run = diff(BASE, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["other"]);
    assert_eq!(names(&run.json, "new"), ["helper"]);
}

#[test]
fn renumbered_static_locals_are_not_changes() {
    // A new static local earlier in the file shifts GCC's numbering of
    // `calls` in shown(); shown itself is unchanged.
    let patched = format!("int first(void) {{ static int calls; return ++calls; }}\n{BASE}");
    let run = diff(BASE, &patched);
    assert!(names(&run.json, "changed").is_empty(), "{}", run.json);
    assert_eq!(names(&run.json, "new"), ["first"]);
}

#[test]
fn static_locals_renumbered_by_a_later_function_keep_their_identity() {
    // GCC numbers same-named static locals in reverse order: a function
    // added after shown() makes shown's `calls` change number.
    let patched = format!("{BASE}\nint later(void) {{ static int calls; return ++calls; }}\n");
    let run = diff(BASE, &patched);
    assert!(names(&run.json, "changed").is_empty(), "{}", run.json);
    assert_eq!(names(&run.json, "new"), ["later"]);
    assert_eq!(run.code, 0);
}

/// Once-flags share one section (`.data.once`), and `cmpb $0, flag(%rip)`
/// has an immediate after its displacement: a flag added before another
/// must not make the other's user look changed.
#[test]
fn a_new_once_flag_in_a_shared_section_leaves_other_users_alone() {
    const ONCE: &str = "#define ONCE_FLAG static _Bool __attribute__((section(\".data.once\"))) __already_done\n\
        extern void note(int);\n\
        int old_user(int x) { ONCE_FLAG; if (!__already_done) { __already_done = 1; note(x); } return x; }\n";
    let patched = format!(
        "{ONCE}int new_user(int x) {{ ONCE_FLAG; if (!__already_done) {{ __already_done = 1; note(-x); }} return -x; }}\n"
    );
    let run = diff(ONCE, &patched);
    assert!(names(&run.json, "changed").is_empty(), "{}", run.json);
    assert_eq!(names(&run.json, "new"), ["new_user"]);
}

#[test]
fn a_changed_init_function_is_refused_by_name() {
    let orig = format!("{INIT}static int level;\nint __init setup_level(void) {{ level = 1; return 0; }}\nint get_level(void) {{ return level; }}\n");
    let patched = orig.replace("level = 1;", "level = 2;");
    let run = diff(&orig, &patched);
    assert_eq!(run.code, 2);
    assert_eq!(refused_symbols(&run.json), ["setup_level"]);
}

// Changed initial values of variables: value updates, or refusals.

/// The value updates of a diff as (name, old bytes, new bytes).
fn value_updates(v: &serde_json::Value) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let bytes = |b: &serde_json::Value| -> Vec<u8> {
        b.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect()
    };
    v["value_updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_string(),
                bytes(&u["old"]),
                bytes(&u["new"]),
            )
        })
        .collect()
}

/// The refusal reasons of a diff, one string each.
fn refusal_reasons(v: &serde_json::Value) -> String {
    v["refused"].to_string()
}

/// A sysctl-like variable: its address is taken, so it stays a variable.
const TUNABLE: &str = "static int limit = 10;\nint *limit_ptr(void) { return &limit; }\nint get_limit(void) { return limit; }\n";

#[test]
fn a_changed_initial_value_is_a_value_update() {
    let run = diff(TUNABLE, &TUNABLE.replace("= 10", "= 20"));
    assert_eq!(run.code, 0, "{}", run.json);
    assert!(names(&run.json, "changed").is_empty(), "{}", run.json);
    assert_eq!(
        value_updates(&run.json),
        [("limit".to_string(), vec![10, 0, 0, 0], vec![20, 0, 0, 0])]
    );
}

#[test]
fn a_zero_variable_given_a_value_is_a_value_update_from_zero() {
    let orig = TUNABLE.replace(" = 10", "");
    let run = diff(&orig, TUNABLE);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(
        value_updates(&run.json),
        [("limit".to_string(), vec![0; 4], vec![10, 0, 0, 0])]
    );
}

#[test]
fn a_changed_variable_size_is_refused() {
    let orig = "long sizes[2] = { 1, 2 };\nlong get(int i) { return sizes[i]; }\n";
    let run = diff(orig, &orig.replace("[2] = { 1, 2 }", "[3] = { 1, 2, 3 }"));
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["sizes"]);
    assert!(
        refusal_reasons(&run.json).contains("changed size of initialised data (16 to 24 bytes)"),
        "{}",
        run.json
    );
}

#[test]
fn a_huge_variable_is_refused() {
    let orig = "char big[100000] = { 1 };\nchar get(int i) { return big[i]; }\n";
    let run = diff(orig, &orig.replace("{ 1 }", "{ 2 }"));
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["big"]);
    assert!(
        refusal_reasons(&run.json).contains("up to 65536 bytes"),
        "{}",
        run.json
    );
}

#[test]
fn a_changed_pointer_initialiser_is_refused() {
    let orig = "int a, b;\nint *which = &a;\nint get(void) { return *which; }\n";
    let run = diff(orig, &orig.replace("&a;", "&b;"));
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["which"]);
    assert!(
        refusal_reasons(&run.json).contains("holding addresses"),
        "{}",
        run.json
    );
}

#[test]
fn per_cpu_and_read_only_after_init_variables_are_refused() {
    for (section, why) in [
        (".data..percpu", "per-CPU"),
        (".data..ro_after_init", "__ro_after_init"),
    ] {
        let orig = format!(
            "__attribute__((section(\"{section}\"))) int mode = 1;\nint *mode_ptr(void) {{ return &mode; }}\n"
        );
        let run = diff(&orig, &orig.replace("= 1;", "= 2;"));
        assert_eq!(run.code, 2, "{section}: {}", run.json);
        assert_eq!(refused_symbols(&run.json), ["mode"], "{section}");
        assert!(
            refusal_reasons(&run.json).contains(why),
            "{section}: {}",
            run.json
        );
    }
}

#[test]
fn changed_init_data_is_refused() {
    let orig = format!(
        "{INIT}__attribute__((section(\".init.data\"))) int boot_level = 1;\nint __init setup(void) {{ return boot_level; }}\nint *level_ptr(void) {{ return &boot_level; }}\n"
    );
    let run = diff(&orig, &orig.replace("= 1;", "= 2;"));
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["boot_level"]);
    assert!(
        refusal_reasons(&run.json).contains("freed it"),
        "{}",
        run.json
    );
}

#[test]
fn changed_read_only_data_used_by_unchanged_data_is_refused() {
    // A table another variable points at: that user is not replaced.
    let orig = "const int limits[2] = { 1, 2 };\nconst int *table = limits;\nint get(int i) { return limits[i]; }\n";
    let run = diff(orig, &orig.replace("{ 1, 2 }", "{ 1, 3 }"));
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["limits"]);
    assert!(
        refusal_reasons(&run.json).contains("also used by section .data.table"),
        "{}",
        run.json
    );
}

#[test]
fn changed_read_only_data_only_replaced_code_reads_is_carried_privately() {
    let orig = "static const int limits[2] = { 1, 2 };\nint get(int i) { return limits[i & 1]; }\n";
    let run = diff(orig, &orig.replace("{ 1, 2 }", "{ 1, 3 }"));
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["get"]);
    assert!(value_updates(&run.json).is_empty(), "{}", run.json);
}

#[test]
fn notrace_functions_cannot_be_redirected() {
    let orig = "__attribute__((no_instrument_function)) int quiet(int x) { return x + 1; }\n";
    let patched = orig.replace("x + 1", "x + 2");
    let run = diff(orig, &patched);
    assert_eq!(run.code, 2);
    assert_eq!(refused_symbols(&run.json), ["quiet"]);
}

#[test]
fn malformed_objects_are_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = compile(dir.path(), "good", BASE);
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"hello world".to_vec()),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header-only", bytes[..64].to_vec()),
    ];
    for (name, data) in cases {
        let bad = dir.path().join(format!("{name}.o"));
        std::fs::write(&bad, data).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_dynamos"))
            .arg("diff")
            .arg(&good)
            .arg(&bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{name}: {stderr}");
    }
}

const TABLE: &str = r#"
static const int weights[4] = { 1, 2, 3, 4 };
int weigh(int i) { return weights[i & 3] * 7; }
static const int limits[2] = { 10, 20 };
int limit(int i) { return limits[i & 1]; }
int limit_twice(int i) { return 2 * limits[i & 1]; }
"#;

#[test]
fn changed_rodata_used_only_by_changed_functions_is_carried() {
    let patched = TABLE.replace("{ 1, 2, 3, 4 }", "{ 1, 2, 3, 5 }");
    let run = diff(TABLE, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["weigh"]);
}

#[test]
fn changed_rodata_with_an_unchanged_user_is_refused() {
    // limit() and limit_twice() both read limits[]; changing the table
    // changes both, and both are carried.
    let patched = TABLE.replace("{ 10, 20 }", "{ 10, 30 }");
    let run = diff(TABLE, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["limit", "limit_twice"]);
    // A table also referenced from data that stays is refused.
    let with_pointer = format!("{TABLE}\nconst int *const exported_limits = limits;\n");
    let run = diff(
        &with_pointer,
        &with_pointer.replace("{ 10, 20 }", "{ 10, 30 }"),
    );
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["limits"]);
}

const SLEEPY: &str = r#"
extern void __might_sleep(const char *file, int line);
#define might_sleep() __might_sleep(__FILE__, __LINE__)
int edited(int x) { return x + 1; }
int sleepy(int x) { might_sleep(); return x * 5; }
"#;

#[test]
fn line_numbers_shifted_by_an_edit_above_are_not_changes() {
    let patched = SLEEPY.replace(
        "int edited(int x) { return x + 1; }",
        "int edited(int x)\n{\n\treturn x + 2;\n}\n",
    );
    let run = diff(SLEEPY, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["edited"]);
}

#[test]
fn a_real_change_next_to_a_line_shift_still_counts() {
    let patched = SLEEPY
        .replace(
            "int edited(int x) { return x + 1; }",
            "int edited(int x)\n{\n\treturn x + 2;\n}\n",
        )
        .replace("x * 5", "x * 6");
    let run = diff(SLEEPY, &patched);
    assert_eq!(names(&run.json, "changed"), ["edited", "sleepy"]);
}

const CONN: &str = r#"
struct conn { int fd; long seq; };
int conn_fd(struct conn *c) { return c->fd; }
"#;

#[test]
fn a_struct_layout_change_behind_pointers_is_refused_naming_type_and_member() {
    let patched = CONN.replace("long seq; };", "long seq; int flags; };");
    let run = diff(CONN, &patched);
    assert_eq!(run.code, 2, "{}", run.json);
    assert_eq!(refused_symbols(&run.json), ["struct conn.flags"]);
}

#[test]
fn a_changed_inline_helper_changes_every_caller() {
    let orig = "static inline int scale(int x) { return x * 3; }\nint a(int x) { return scale(x) + 1; }\nint b(int x) { return scale(x) - 1; }\nint c(int x) { return x; }\n";
    let run = diff(orig, &orig.replace("x * 3", "x * 4"));
    assert_eq!(names(&run.json, "changed"), ["a", "b"]);
}

#[test]
fn a_change_in_a_cold_part_replaces_its_function() {
    // The unlikely branch calling a cold function is split into busy.cold.
    let orig = r#"
extern void report(int);
extern void warn_now(const char *) __attribute__((cold));
int busy(int x)
{
    if (__builtin_expect(x < 0, 0)) {
        warn_now("neg");
        report(x * 7);
        report(x * x);
        return -x;
    }
    report(x);
    return x + 1;
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "probe", orig);
    let symbols = Command::new("readelf")
        .arg("-sW")
        .arg(&object)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&symbols.stdout).contains("busy.cold"),
        "the compiler did not split busy.cold; the test needs another shape"
    );
    let run = diff(orig, &orig.replace("x * 7", "x * 9"));
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["busy"]);
}

#[test]
fn new_global_data_is_carried_not_refused() {
    let orig = "int count(int x) { return x; }\n";
    let patched = "int dynamos_counter;\nint count(int x) { dynamos_counter++; return x; }\n";
    let run = diff(orig, patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["count"]);
}

#[test]
fn calls_resolved_inside_a_shared_section_are_compared_by_target() {
    // Without -ffunction-sections the assembler resolves calls between
    // static functions of one .text itself: no relocation, and the
    // displacement changes when a function in between grows.
    let orig = r#"
static __attribute__((noinline)) int helper(int x) { return x * 3; }
int grows(int x) { return x + 1; }
static __attribute__((noinline)) int other(int x) { return x * 5; }
int caller(int x) { return helper(x) + other(x); }
"#;
    let patched = orig.replace("return x + 1;", "return (x + 1) * (x - 1) / 3;");
    let run = diff_with(orig, &patched, &["-ffunction-sections"]);
    assert_eq!(names(&run.json, "changed"), ["grows"], "{}", run.json);
}

#[test]
fn without_an_mcount_table_the_fentry_call_decides() {
    // Objects whose mcount table is added later (by objtool) still carry
    // the call; notrace functions have none.
    let orig = "int traced(int x) { return x + 1; }\n__attribute__((no_instrument_function)) int quiet(int x) { return x + 1; }\n";
    let patched = orig.replace("x + 1", "x + 2");
    let run = diff_with(orig, &patched, &["-mrecord-mcount"]);
    assert_eq!(
        names(&run.json, "changed"),
        ["quiet", "traced"],
        "{}",
        run.json
    );
    assert_eq!(refused_symbols(&run.json), ["quiet"], "{}", run.json);
}

#[test]
fn string_table_offsets_moved_by_another_function_are_not_changes() {
    let orig = r#"
extern int printk(const char *fmt, ...);
int first(int x) { printk("first %d\n", x); return x; }
int second(int x) { printk("second %d\n", x); return x; }
"#;
    // A longer string in first() moves second()'s string in the merged
    // string section; second() itself is the same.
    let patched = orig.replace("first %d\\n", "first call with a much longer message %d\\n");
    let run = diff(orig, &patched);
    assert_eq!(names(&run.json, "changed"), ["first"], "{}", run.json);
}

#[test]
fn unique_ids_renumbered_are_the_same_object() {
    let orig = r#"
#define __PASTE(a, b) a##b
#define PASTE(a, b) __PASTE(a, b)
#define UNIQUE(prefix) PASTE(PASTE(__UNIQUE_ID_, prefix), __COUNTER__)
int early(int x) { return x; }
static int UNIQUE(state) = 3;
int reader(void) { return ++PASTE(__UNIQUE_ID_state, 0); }
"#;
    // The patched file uses __COUNTER__ once more before: the ID changes.
    let patched = orig
        .replace(
            "int early(int x) { return x; }",
            "int early(int x) { return x + __COUNTER__ * 0; }",
        )
        .replace("__UNIQUE_ID_state, 0", "__UNIQUE_ID_state, 1");
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "probe", &patched);
    let symbols = Command::new("readelf")
        .arg("-sW")
        .arg(&object)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&symbols.stdout).contains("__UNIQUE_ID_state1"));
    let run = diff(orig, &patched);
    assert!(
        names(&run.json, "changed").iter().all(|n| n != "reader"),
        "{}",
        run.json
    );
    assert!(refused_symbols(&run.json).is_empty(), "{}", run.json);
}

#[test]
fn compiler_clones_are_matched_by_name() {
    // GCC specialises a static function for a constant argument
    // (`scale.constprop.0`); a change to an unrelated caller leaves it be.
    let orig = r#"
static __attribute__((noinline)) int scale(int x, int factor) { return x * factor + (x >> 3); }
int by_seven(int x) { return scale(x, 7); }
int by_seven_too(int y) { return scale(y, 7) + 1; }
int unrelated(int z) { return z - 1; }
"#;
    let dir = tempfile::tempdir().unwrap();
    let object = compile(dir.path(), "probe", orig);
    let symbols = Command::new("readelf")
        .arg("-sW")
        .arg(&object)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&symbols.stdout);
    assert!(
        table.contains("scale.constprop") || table.contains("scale.isra"),
        "the compiler made no clone; the test needs another shape:\n{table}"
    );
    let run = diff(orig, &orig.replace("z - 1", "z - 2"));
    assert_eq!(names(&run.json, "changed"), ["unrelated"], "{}", run.json);
}

#[test]
fn changed_read_mostly_data_is_a_value_update() {
    // `__read_mostly` only places a variable; it stays writable.
    let orig = "__attribute__((section(\".data..read_mostly\"))) int tunable = 5;\nint get_tunable(void) { return tunable; }\n";
    let run = diff(orig, &orig.replace("= 5", "= 6"));
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(
        value_updates(&run.json),
        [("tunable".to_string(), vec![5, 0, 0, 0], vec![6, 0, 0, 0])]
    );
}

#[test]
fn user_space_objects_compare_but_cannot_be_carried() {
    // Position-independent code uses GOT relocations the kernel's module
    // loader cannot apply: the diff still names the changed function.
    let orig = "extern int shared;\nint touch(int x) { return shared + x; }\nint keep(int x) { return x; }\n";
    let patched = orig.replace("shared + x", "shared - x");
    let dir = tempfile::tempdir().unwrap();
    let objects: Vec<PathBuf> = [("orig", orig), ("patched", patched.as_str())]
        .iter()
        .map(|(name, src)| {
            let src_dir = dir.path().join(name);
            std::fs::create_dir_all(&src_dir).unwrap();
            std::fs::write(src_dir.join("unit.c"), src).unwrap();
            let out = dir.path().join(format!("{name}.o"));
            let status = Command::new("cc")
                .args(["-O2", "-fPIC", "-c", "unit.c", "-o"])
                .arg(&out)
                .current_dir(&src_dir)
                .status()
                .unwrap();
            assert!(status.success());
            out
        })
        .collect();
    let run = run_diff(&objects[0], &objects[1]);
    assert_eq!(names(&run.json, "changed"), ["touch"], "{}", run.json);
    assert_eq!(run.code, 2, "{}", run.json);
    assert!(
        refused_symbols(&run.json).contains(&"touch".to_string()),
        "{}",
        run.json
    );
}

#[test]
fn dynamic_debug_descriptors_moved_by_an_edit_are_not_refused() {
    // pr_debug() sites record their line in a __dyndbg descriptor; an edit
    // above moves them without changing behaviour.
    let orig = r#"
struct site { const char *format; unsigned int line; };
#define SITE(f) ({ static struct site __attribute__((section("__dyndbg"), used, aligned(8))) s = { f, __LINE__ }; &s; })
int edited(int x) { return x + 1; }
const void *noted(void) { return SITE("hello"); }
"#;
    let patched = orig.replace(
        "int edited(int x) { return x + 1; }",
        "int edited(int x)\n{\n\treturn x + 2;\n}\n",
    );
    let run = diff(orig, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["edited"]);
}

#[test]
fn an_added_ratelimit_state_beside_an_existing_one_is_carried_fresh() {
    // Two `_rs` statics in one function where there was one: which is new
    // cannot be told, and for ratelimit states it does not matter.
    let orig = r#"
extern int ratelimit(void *state);
extern int printk(const char *fmt, ...);
#define limited(fmt) ({ static int _rs[4]; if (ratelimit(_rs)) printk(fmt); })
int checks(int x) { if (x < 0) limited("negative\n"); return x; }
"#;
    let patched = orig.replace(
        "if (x < 0) limited(\"negative\\n\");",
        "if (x < 0) limited(\"negative\\n\"); if (x > 100) limited(\"large\\n\");",
    );
    let run = diff(orig, &patched);
    assert_eq!(run.code, 0, "{}", run.json);
    assert_eq!(names(&run.json, "changed"), ["checks"]);
}

/// Both builds of `source`, read as objects, diffed with `replace` forced.
fn diff_identical_replacing(source: &str, replace: &[&str]) -> dynamos::diff::ObjectDiff {
    let dir = tempfile::tempdir().unwrap();
    let a = compile(dir.path(), "orig", source);
    let b = compile(dir.path(), "patched", source);
    let orig = dynamos::diff::ObjectFile::read(&a).unwrap();
    let patched = dynamos::diff::ObjectFile::read(&b).unwrap();
    let replace = replace.iter().map(|s| s.to_string()).collect();
    dynamos::diff::diff_objects_replacing(&orig, &patched, &replace).unwrap()
}

#[test]
fn an_unchanged_function_named_to_replace_counts_as_changed() {
    let source =
        "int counter;\nint bump(int x) { return counter += x; }\nint other(void) { return 1; }\n";
    let diff = diff_identical_replacing(source, &["bump"]);
    assert!(diff.refused.is_empty(), "{:?}", diff.refused);
    assert_eq!(diff.changed(), ["bump"]);
    assert!(diff.new_functions().is_empty());
}

#[test]
fn an_unchanged_notrace_function_named_to_replace_is_refused() {
    let source = "__attribute__((no_instrument_function)) int quiet(int x) { return x + 1; }\n";
    let diff = diff_identical_replacing(source, &["quiet"]);
    assert_eq!(diff.refused.len(), 1, "{:?}", diff.refused);
    assert_eq!(diff.refused[0].symbol, "quiet");
    assert!(diff.refused[0].reason.contains("no ftrace entry"));
}

#[test]
fn a_name_to_replace_that_the_object_lacks_changes_nothing() {
    let diff = diff_identical_replacing("int one(void) { return 1; }\n", &["missing"]);
    assert!(
        diff.functions.is_empty() && diff.refused.is_empty(),
        "{diff:?}"
    );
}
