//! Updates of an out-of-tree module (`dynamos-build --module-src DIR`):
//! the fixture module `tests/fixtures/counter-module` (a counting kernel
//! thread and `/proc/dynamos_counter`) is built against the target's
//! headers as a vendor would, loaded in the VM, and updated by a package
//! built from `patches/counter-module-proc.diff`, whose paths are relative
//! to the module's folder. The module is loaded before the package,
//! reloaded while it is applied, and loaded only after it. The folder
//! given to `--module-src` is never written.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Seconds the VM run may take, boot included (about 30 s on TCG).
const VM_BUDGET: u64 = 240;

fn fixture() -> PathBuf {
    root().join("tests/fixtures/counter-module")
}

/// Every file below `dir` with its contents and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::metadata(&path).unwrap();
        if meta.is_dir() {
            files.extend(snapshot(&path));
        } else {
            files.insert(
                path.clone(),
                (std::fs::read(&path).unwrap(), meta.modified().unwrap()),
            );
        }
    }
    files
}

/// The fixture module built as its vendor ships it: a copy of its folder
/// compiled with `make -C <headers> M=<copy> modules`.
fn vendor_build(into: &Path) -> PathBuf {
    let target = dynamos::target::Target::resolve(&dynamos::target::TargetSpec::default())
        .expect("default target");
    let headers = target.headers.expect("a Debian target has headers");
    let copy = into.join("counter-module");
    std::fs::create_dir_all(&copy).unwrap();
    for name in ["Kbuild", "dynamos_counter.c"] {
        std::fs::copy(fixture().join(name), copy.join(name)).unwrap();
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", copy.display()))
        .arg("modules")
        .env_remove("MAKEFLAGS")
        .output()
        .expect("make runs");
    assert!(
        out.status.success(),
        "building the fixture module failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    copy.join("dynamos_counter.ko")
}

#[test]
fn an_external_module_is_updated_loaded_before_reloaded_and_loaded_after() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let ko = vendor_build(work.path());

    let before = snapshot(&fixture());
    let pkg = work.path().join("counter-module-proc.dynpkg");
    let module_src = fixture();
    let out = build_with(
        &keys,
        &["counter-module-proc.diff"],
        ["--module-src".as_ref(), module_src.as_os_str()],
        &pkg,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    expect_line(
        &stdout(&out),
        "replace  counter_proc_show (dynamos_counter, dynamos_counter.c)",
    );
    assert_eq!(snapshot(&fixture()), before, "--module-src folder changed");
    let inspect = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        manifest["manifest"]["objects"][0]["object"], "dynamos_counter",
        "{manifest}"
    );

    let script = r#"
P=/packages/counter-module-proc.dynpkg
K=/packages/dynamos_counter.ko
show() { cat /proc/dynamos_counter; }
insmod $K; sleep 2
echo "@@ before: $(show) @@"
echo "@@ counting: $(dmesg | grep -c 'dynamos_counter: iteration') @@"
dynamos apply $P; echo "@@ applied $? @@"
echo "@@ applied: $(show) @@"
rmmod dynamos_counter && insmod $K; echo "@@ reloaded: $(show) @@"
dynamos revert --all; echo "@@ reverted $? @@"
echo "@@ reverted: $(show) @@"
rmmod dynamos_counter
dynamos apply $P; echo "@@ applied unloaded $? @@"
insmod $K; echo "@@ loaded after: $(show) @@"
dynamos revert --all; echo "@@ reverted while loaded: $(show) @@"
rmmod dynamos_counter
"#;
    let started = Instant::now();
    let text = vm_with_modules(&keys, &[], &[&pkg, &ko], script);
    assert!(
        started.elapsed() < Duration::from_secs(VM_BUDGET),
        "took {:?}",
        started.elapsed()
    );
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: dynamos_counter: original @@");
    let counted: u32 = section(&text, "@@ counting: ", " @@")
        .trim()
        .parse()
        .unwrap();
    assert!(counted > 0, "the counter thread logged nothing:\n{text}");
    expect("live     counter_proc_show (dynamos_counter)");
    expect("@@ applied 0 @@");
    expect("@@ applied: dynamos_counter: live-updated @@");
    expect("@@ reloaded: dynamos_counter: live-updated @@");
    expect("@@ reverted 0 @@");
    expect("@@ reverted: dynamos_counter: original @@");
    expect("pending  counter_proc_show (dynamos_counter: patched when it loads)");
    expect("@@ applied unloaded 0 @@");
    expect("@@ loaded after: dynamos_counter: live-updated @@");
    expect("@@ reverted while loaded: dynamos_counter: original @@");
}

/// The fixture's kernel thread counts in a local; a change to its loop is
/// applied by restarting the thread into the new version, and the count
/// carries on where the old thread left it (read from the register the
/// original's debug info names at its sleep call). The module's exit stops
/// the new thread through `counter_task`, which the restart switched; the
/// thread of the module loaded again while the update is applied runs the
/// new loop; revert restarts it into the original.
#[test]
fn an_external_modules_thread_is_restarted_with_its_count_carried() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let ko = vendor_build(work.path());
    let pkg = work.path().join("counter-module-loop.dynpkg");
    let module_src = fixture();
    let out = build_with(
        &keys,
        &["counter-module-loop.diff"],
        ["--module-src".as_ref(), module_src.as_os_str()],
        &pkg,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let built = stdout(&out);
    assert!(
        built.contains(
            "note: counter_thread of dynamos_counter.c: a restarted thread runs the new version from its start and, \
             at line 22 before its loop, carries count from where the old thread sleeps (schedule_timeout_interruptible)"
        ),
        "{built}"
    );
    assert!(
        built.contains("points counter_task at the new thread"),
        "{built}"
    );
    // The new version names it `iterations`; the patch's transfer function
    // takes the old `count` over.
    let renamed = work.path().join("counter-module-state-transfer.dynpkg");
    let out = build_with(
        &keys,
        &["counter-module-state-transfer.diff"],
        ["--module-src".as_ref(), module_src.as_os_str()],
        &renamed,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("runs counter_state, which may read the old thread's count"),
        "{}",
        stdout(&out)
    );

    // A new loop that sleeps holding a mutex: its thread could not be
    // stopped where it sleeps without exiting with the mutex held.
    let locked = work
        .path()
        .join("refused-counter-module-locked-sleep.dynpkg");
    let out = build_with(
        &keys,
        &["refused-counter-module-locked-sleep.diff"],
        ["--module-src".as_ref(), module_src.as_os_str()],
        &locked,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(
            "refuses this update while such a thread runs (in the patched version, it sleeps in \
             schedule_timeout_interruptible() at line 27 after mutex_lock() at line 24: a thread stopped there would exit holding it)"
        ),
        "{}",
        stdout(&out)
    );

    let script = r#"
P=/packages/counter-module-loop.dynpkg
K=/packages/dynamos_counter.ko
pid_of() { for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = "$1" ] && echo ${d#/proc/}; done; }
insmod $K; sleep 2
echo "@@ thread $(pid_of dynamos_counter) @@"
dynamos apply $P > /tmp/apply.log 2>&1; echo "@@ apply exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
sleep 2
echo "@@ list: $(dynamos list | grep thread) @@"
dmesg | grep -o 'dynamos_counter: .*iteration [0-9]*' | sed 's/^/@@ log /; s/$/ @@/'
dmesg -c > /dev/null
rmmod dynamos_counter && insmod $K; echo "@@ reloaded $? @@"; sleep 1.5
dmesg | grep -o 'dynamos_counter: .*iteration [0-9]*' | sed 's/^/@@ relog /; s/$/ @@/'
dmesg -c > /dev/null
dynamos revert --all > /tmp/revert.log 2>&1; echo "@@ revert exit $?: $(tr '\n' ' ' < /tmp/revert.log)@@"
sleep 1.5
dmesg | grep -o 'dynamos_counter: .*iteration [0-9]*' | sed 's/^/@@ rlog /; s/$/ @@/'
dynamos apply $P > /dev/null 2>&1; echo "@@ applied again $? @@"
rmmod dynamos_counter; echo "@@ rmmod $? thread $(pid_of dynamos_counter) @@"
dynamos revert --all > /dev/null 2>&1; echo "@@ reverted after rmmod $?, modules $(grep -c '^dynamos' /proc/modules) @@"
insmod $K; sleep 2
dynamos apply /packages/counter-module-state-transfer.dynpkg > /tmp/apply.log 2>&1; echo "@@ transfer apply $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
sleep 1.5
dmesg | grep -o 'dynamos_counter: .*iteration [0-9]*' | sed 's/^/@@ tlog /; s/$/ @@/'
dynamos revert --all > /dev/null 2>&1; echo "@@ transfer reverted $? @@"
dynamos apply /packages/refused-counter-module-locked-sleep.dynpkg > /tmp/apply.log 2>&1; echo "@@ locked apply $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ locked modules $(grep -v '^dynamos_counter ' /proc/modules | grep -c '^dynamos') @@"
rmmod dynamos_counter
"#;
    let started = Instant::now();
    let text = vm_with_modules(&keys, &[], &[&pkg, &renamed, &locked, &ko], script);
    assert!(
        started.elapsed() < Duration::from_secs(VM_BUDGET),
        "took {:?}",
        started.elapsed()
    );
    let before: u32 = section(&text, "@@ thread ", " @@")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{text}"));
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains(&format!("restarted dynamos_counter (pid {before}) as pid "))
            && apply.contains(", running the new counter_thread, carrying count"),
        "{text}"
    );
    assert!(
        section(&text, "@@ list: ", " @@").contains("carrying count"),
        "{text}"
    );
    // The last count of the old loop, then the first of the new one.
    let log = counts(&text, "@@ log dynamos_counter: ");
    let first_new = log
        .iter()
        .position(|(new, _)| *new)
        .unwrap_or_else(|| panic!("no line of the new loop:\n{text}"));
    assert!(first_new > 0, "{text}");
    let (last_old, first) = (log[first_new - 1].1, log[first_new].1);
    eprintln!("old loop's last count {last_old}, new loop's first {first}");
    assert_eq!(first, last_old + 1, "the count did not carry on:\n{text}");
    assert!(
        log[first_new..].iter().all(|(new, _)| *new),
        "the old loop kept running:\n{text}"
    );
    // A thread the module starts while the update is applied runs the new
    // loop from its start.
    expect_line(&text, "@@ reloaded 0 @@");
    let reloaded = counts(&text, "@@ relog dynamos_counter: ");
    assert!(
        !reloaded.is_empty() && reloaded[0] == (true, 1) && reloaded.iter().all(|(new, _)| *new),
        "{text}"
    );
    assert!(text.contains("@@ revert exit 0: "), "{text}");
    // The original code has no restore point: its loop starts counting afresh.
    let reverted = counts(&text, "@@ rlog dynamos_counter: ");
    let first_original = reverted
        .iter()
        .position(|(new, _)| !*new)
        .unwrap_or_else(|| panic!("no line of the original loop after revert:\n{text}"));
    assert_eq!(reverted[first_original].1, 1, "{text}");
    assert!(
        reverted[first_original..].iter().all(|(new, _)| !*new),
        "{text}"
    );
    expect_line(&text, "@@ applied again 0 @@");
    expect_line(&text, "@@ rmmod 0 thread  @@");
    expect_line(&text, "@@ reverted after rmmod 0, modules 0 @@");

    assert!(
        section(&text, "@@ transfer apply 0: ", "@@").contains(", carrying count"),
        "{text}"
    );
    let transferred = counts_of(&text, "@@ tlog dynamos_counter: ", "renamed");
    let first_renamed = transferred
        .iter()
        .position(|(renamed, _)| *renamed)
        .unwrap_or_else(|| panic!("no line of the renamed loop:\n{text}"));
    assert!(first_renamed > 0, "{text}");
    assert_eq!(
        transferred[first_renamed].1,
        transferred[first_renamed - 1].1 + 1,
        "counter_state did not carry count into iterations:\n{text}"
    );
    expect_line(&text, "@@ transfer reverted 0 @@");
    let refused = section(&text, "@@ locked apply 2: ", "@@");
    assert!(
        refused.contains("counter_thread: is the main function of the running kernel thread dynamos_counter (pid ")
            && refused.contains("a thread stopped there would exit holding it"),
        "{text}"
    );
    expect_line(&text, "@@ locked modules 0 @@");
}

/// The counter lines after `prefix`: (from the new loop, count).
fn counts(text: &str, prefix: &str) -> Vec<(bool, u64)> {
    counts_of(text, prefix, "live-updated")
}

/// The counter lines after `prefix`: (starts with `new_loop`, count).
fn counts_of(text: &str, prefix: &str, new_loop: &str) -> Vec<(bool, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let l = l.trim_end_matches(" @@");
            let (kind, n) = l.rsplit_once(' ')?;
            Some((kind.starts_with(new_loop), n.parse().ok()?))
        })
        .collect()
}

/// A patch written into `dir` under `name`.
fn patch_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Exit codes of what `--module-src` cannot build: 1 for a folder that is
/// not a module's source, 2 for a Kbuild change, a C file no module is
/// built from or an export whose version changes, 3 for a header that changes no object; one line each, and
/// the folder untouched.
#[test]
fn a_folder_that_is_no_module_source_is_an_error_and_build_changes_are_refused() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    let run = |patch: &Path, module_src: &Path| {
        build_with(
            &keys,
            &[patch.to_str().unwrap()],
            ["--module-src".as_ref(), module_src.as_os_str()],
            &pkg,
        )
    };
    let one_line = |out: &std::process::Output| {
        let err = stderr(out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };

    // A folder without a Kbuild or Makefile declaring modules.
    let not_module = tempfile::tempdir().unwrap();
    std::fs::write(not_module.path().join("dynamos_counter.c"), "int x;\n").unwrap();
    let proc_patch = root().join("patches/counter-module-proc.diff");
    let out = run(&proc_patch, not_module.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(
        err.contains("is not an external module's source: no Kbuild or Makefile with obj-m"),
        "{err}"
    );
    let out = run(&proc_patch, &work.path().join("missing"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    one_line(&out);

    let before = snapshot(&fixture());
    // The module's Kbuild.
    let kbuild = patch_file(
        work.path(),
        "kbuild.diff",
        "--- a/Kbuild\n+++ b/Kbuild\n@@ -1,2 +1,2 @@\n # SPDX-License-Identifier: GPL-2.0\n-obj-m := dynamos_counter.o\n+obj-m += dynamos_counter.o\n",
    );
    let out = run(&kbuild, &fixture());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(
        err.contains("Kbuild: build system changes (Makefile/Kbuild/Kconfig) are not supported"),
        "{err}"
    );

    // A new C file no module is built from.
    let stray = patch_file(
        work.path(),
        "stray.diff",
        "--- /dev/null\n+++ b/stray.c\n@@ -0,0 +1,2 @@\n+// SPDX-License-Identifier: GPL-2.0\n+int dynamos_stray(void) { return 1; }\n",
    );
    let out = run(&stray, &fixture());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(
        err.contains("stray.c: not built into any module of"),
        "{err}"
    );

    // An exported function's interface (its MODVERSIONS CRC) changes.
    let exporting = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("Kbuild"), exporting.path().join("Kbuild")).unwrap();
    let mut source = std::fs::read_to_string(fixture().join("dynamos_counter.c")).unwrap();
    let lines = source.lines().count();
    source.push_str(
        "\nint dynamos_counter_value(int x)\n{\n\treturn x + 1;\n}\nEXPORT_SYMBOL_GPL(dynamos_counter_value);\n",
    );
    std::fs::write(exporting.path().join("dynamos_counter.c"), source).unwrap();
    let export = patch_file(
        work.path(),
        "export.diff",
        &format!(
            "--- a/dynamos_counter.c\n+++ b/dynamos_counter.c\n@@ -{0},4 +{0},4 @@\n \n-int dynamos_counter_value(int x)\n+long dynamos_counter_value(long x)\n {{\n \treturn x + 1;\n",
            lines + 1
        ),
    );
    let out = run(&export, exporting.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(
        err.contains("dynamos_counter_value: exported symbol version changes"),
        "{err}"
    );

    // A header of the module folder: every object of the module is
    // compared, and none changes.
    let header = patch_file(
        work.path(),
        "header.diff",
        "--- /dev/null\n+++ b/counter.h\n@@ -0,0 +1,2 @@\n+/* SPDX-License-Identifier: GPL-2.0 */\n+#define DYNAMOS_COUNTER_UNUSED 1\n",
    );
    let out = run(&header, &fixture());
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no binary change"),
        "{}",
        stderr(&out)
    );

    assert_eq!(snapshot(&fixture()), before, "--module-src folder changed");
    assert!(!pkg.exists());
}
