//! Updates of loadable-module code: the module loaded before the package,
//! unloaded and loaded again while it is applied, and loaded only after
//! the package. The new `bm_status_read` of binfmt_misc reads the module's
//! own static `enabled` through a livepatch symbol, so each reload must
//! bind it to the new instance of the module (`echo 0 > status` shows it).
//! Then one patch fixing vmlinux and a module together, in one package,
//! applied with the module loaded before and loaded after.

mod common;

use common::*;

#[test]
fn a_module_stays_patched_across_unload_and_reload_and_when_loaded_later() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("binfmt-misc-status.dynpkg");
    let out = build(&keys, "binfmt-misc-status.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replace  bm_status_read (binfmt_misc, fs/binfmt_misc.c)"),
        "{}",
        stdout(&out)
    );
    let inspect = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let object = &manifest["manifest"]["objects"][0];
    assert_eq!(object["object"], "binfmt_misc", "{manifest}");
    assert_eq!(object["load_time"][0]["name"], "enabled", "{manifest}");

    let mixed = work.path().join("mixed.dynpkg");
    let out = build_with(
        &keys,
        &["proc-version-and-binfmt-status.diff"],
        ["--name", "mixed"],
        &mixed,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let built = stdout(&out);
    assert!(
        built.contains("replace  version_proc_show (vmlinux"),
        "{built}"
    );
    assert!(
        built.contains("replace  bm_status_read (binfmt_misc"),
        "{built}"
    );

    let script = r#"
B=/proc/sys/fs/binfmt_misc
up() { modprobe binfmt_misc && mount -t binfmt_misc none $B; }
down() { umount $B && rmmod binfmt_misc; }
up; echo "@@ before: $(cat $B/status) @@"
dynamos apply /packages/binfmt-misc-status.dynpkg; echo "@@ applied: $(cat $B/status) @@"
down; up; echo "@@ reloaded: $(cat $B/status) @@"
echo 0 > $B/status; echo "@@ disabled: $(cat $B/status) @@"; echo 1 > $B/status
down; up; echo "@@ reloaded again: $(cat $B/status) @@"; down
dynamos revert --all; up; echo "@@ reverted: $(cat $B/status) @@"; down
dynamos apply /packages/binfmt-misc-status.dynpkg
up; echo "@@ loaded after: $(cat $B/status) @@"
dynamos revert --all; echo "@@ reverted while loaded: $(cat $B/status) @@"; down
up; dynamos apply /packages/mixed.dynpkg
echo "@@ mixed, module loaded before: $(grep -c 'proc-version-banner applied' /proc/version) $(cat $B/status) @@"
dynamos revert mixed; down
dynamos apply /packages/mixed.dynpkg
echo "@@ mixed vmlinux: $(grep -c 'proc-version-banner applied' /proc/version) @@"
up; echo "@@ mixed module: $(cat $B/status) @@"
dynamos revert mixed; echo "@@ mixed reverted: $(grep -c 'proc-version-banner applied' /proc/version) $(cat $B/status) @@"
"#;
    let text = vm_with_modules(&keys, &["binfmt_misc"], &[&pkg, &mixed], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: enabled @@");
    expect("live     bm_status_read (binfmt_misc)");
    expect("@@ applied: enabled (live-updated) @@");
    expect("@@ reloaded: enabled (live-updated) @@");
    expect("@@ disabled: disabled (live-updated) @@");
    expect("@@ reloaded again: enabled (live-updated) @@");
    expect("@@ reverted: enabled @@");
    expect("pending  bm_status_read (binfmt_misc: patched when it loads)");
    expect("@@ loaded after: enabled (live-updated) @@");
    expect("@@ reverted while loaded: enabled @@");
    expect("pending  bm_status_read (binfmt_misc: patched when it loads)");
    expect("@@ mixed, module loaded before: 1 enabled (live-updated) @@");
    expect("@@ mixed vmlinux: 1 @@");
    expect("@@ mixed module: enabled (live-updated) @@");
    expect("@@ mixed reverted: 0 enabled @@");
}

/// New module code whose jump labels sit on the module's own dynamic debug
/// descriptors: the loader reads `__jump_table` before the livepatch core
/// resolves module symbols, so those prints are pointed at a key that is
/// never enabled. The update loads, works across a reload, and the prints
/// stay silent in the new code while the old code's still print.
#[test]
fn module_code_with_dynamic_debug_prints_goes_live_with_them_silent() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("binfmt-misc-absolute-interpreter.dynpkg");
    let out = build(&keys, "binfmt-misc-absolute-interpreter.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let built = stdout(&out);
    assert!(
        built.contains("replace  bm_register_write (binfmt_misc, fs/binfmt_misc.c)"),
        "{built}"
    );
    assert!(
        built.contains("note: its dynamic debug prints of binfmt_misc: silent in the new code"),
        "{built}"
    );

    let script = r#"
B=/proc/sys/fs/binfmt_misc
up() { modprobe binfmt_misc && mount -t binfmt_misc none $B; }
down() { umount $B && rmmod binfmt_misc; }
reg() { if echo ":$1:E::$1x::$2:" > $B/register 2>/dev/null; then echo registered; else echo refused; fi; }
prints() { dmesg | grep -c 'register: interpreter'; }
up; echo "module binfmt_misc +p" > /proc/dynamic_debug/control
echo "@@ before: $(reg rel1 interp) $(reg abs1 /bin/interp) prints $(prints) @@"
dynamos apply /packages/binfmt-misc-absolute-interpreter.dynpkg
echo "@@ applied: $(reg rel2 interp) $(reg abs2 /bin/interp) prints $(prints) @@"
down; up; echo "module binfmt_misc +p" > /proc/dynamic_debug/control
echo "@@ reloaded: $(reg rel3 interp) $(reg abs3 /bin/interp) prints $(prints) @@"
dynamos revert --all
echo "@@ reverted: $(reg rel4 interp) prints $(prints) @@"; down
"#;
    let text = vm_with_modules(&keys, &["binfmt_misc"], &[&pkg], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: registered registered prints 2 @@");
    expect("live     bm_register_write (binfmt_misc)");
    expect("@@ applied: refused registered prints 2 @@");
    expect("@@ reloaded: refused registered prints 2 @@");
    expect("@@ reverted: registered prints 3 @@");
}

/// New module code calling the module's own tracepoints: their jump labels
/// and static call sites point at never-enabled keys of the update, and the
/// kernel turns those calls into NOPs as the update loads, so nothing may
/// write the calls' targets afterwards. The update goes live, the
/// tracepoints can be switched on and off while it is applied, and the
/// module reloads.
#[test]
fn module_code_calling_its_own_tracepoints_goes_live() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("9p-fid-destroy-tracepoint.dynpkg");
    let out = build(&keys, "9p-fid-destroy-tracepoint.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let built = stdout(&out);
    assert!(
        built.contains("replace  p9_client_clunk (9pnet, net/9p/client.c)"),
        "{built}"
    );
    assert!(
        built.contains("note: tracepoint 9p_fid_ref of 9pnet: silent in the new code"),
        "{built}"
    );

    let script = r#"
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs none $T
modprobe 9pnet
dynamos apply /packages/9p-fid-destroy-tracepoint.dynpkg; echo "@@ applied $? @@"
echo 1 > $T/events/9p/enable; echo "@@ tracing on $? @@"; echo 0 > $T/events/9p/enable
rmmod 9pnet && modprobe 9pnet; echo "@@ reloaded $? @@"
echo 1 > $T/events/9p/enable; echo 0 > $T/events/9p/enable
dynamos revert --all; echo "@@ reverted $? @@"; rmmod 9pnet
"#;
    let text = vm_with_modules(&keys, &["9pnet"], &[&pkg], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("live     p9_client_clunk (9pnet)");
    expect("@@ applied 0 @@");
    expect("@@ tracing on 0 @@");
    expect("@@ reloaded 0 @@");
    expect("@@ reverted 0 @@");
}
