//! Debian 13 ("trixie", Linux 6.12): a kernel built with gcc-14, IBT, call
//! padding and call-depth tracking, whose objtool runs on the linked
//! vmlinux.o and modules. The build uses trixie's gcc-14 in a root of its
//! own, and the package goes live and comes back out on that kernel.

mod common;
use common::*;

const DEBIAN_13: &str = "6.12.117+deb13-amd64";

/// `dynamos-build --target DEBIAN_13 PATCH [extra] -o out`, which must
/// succeed; its standard output.
fn built(keys: &Keys, patch: &str, extra: &[&str], out: &std::path::Path) -> String {
    let target = ["--target", DEBIAN_13];
    let result = build_with(keys, &[patch], target.iter().chain(extra), out);
    assert!(result.status.success(), "{}", stderr(&result));
    stdout(&result)
}

/// A /proc fix built for Debian 13's kernel goes live there, its running
/// code verified by run-pre, and is reverted; the return-thunk sites of
/// the new code are patched like the kernel's own (an unpatched one warns
/// through `__warn_thunk`, which the kernel check below would catch).
#[test]
fn a_proc_fix_goes_live_on_debian_13_and_is_reverted() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-version-banner.dynpkg");
    let said = built(&keys, "proc-version-banner.diff", &[], &pkg);
    assert!(said.contains(&format!("for {DEBIAN_13}")), "{said}");
    // Entry layouts come from the target's own headers: 6.12's alt_instr
    // has feature flags beside the CPUID bit and is 14 bytes, not 6.1's 12.
    let abi = std::fs::read_to_string(
        dynamos::cache::cache_root()
            .join("targets")
            .join(DEBIAN_13)
            .join("work/kernel-abi"),
    )
    .unwrap();
    assert!(abi.contains("struct alt_instr\t14\t"), "{abi}");
    assert!(!abi.contains("struct paravirt_patch_site"), "{abi}");

    let text = vm_on_kernel(
        &keys,
        DEBIAN_13,
        &[&pkg],
        r#"
echo "@@ running $(uname -r) @@"
dynamos apply /packages/proc-version-banner.dynpkg > /tmp/apply.log 2>&1; echo "@@ apply exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ banner lines $(grep -c 'live update proc-version-banner applied' /proc/version) @@"
dynamos revert --all > /dev/null; echo "@@ revert exit $? @@"
echo "@@ banner lines after revert $(grep -c 'live update proc-version-banner applied' /proc/version) @@"
echo "@@ modules $(grep -c '^dynamos' /proc/modules) @@"
"#,
    );
    expect_line(&text, &format!("@@ running {DEBIAN_13} @@"));
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains("running code verified: 1 functions"),
        "{text}"
    );
    expect_line(&text, "@@ banner lines 1 @@");
    expect_line(&text, "@@ revert exit 0 @@");
    expect_line(&text, "@@ banner lines after revert 0 @@");
    expect_line(&text, "@@ modules 0 @@");
}

/// A fix of a module Debian 13 ships compressed (`binfmt_misc.ko.xz`) goes
/// live with the module loaded before the package, stays live when the
/// module is unloaded and loaded again, is reverted, and goes live again
/// for the module loaded only after the package.
#[test]
fn a_module_fix_goes_live_on_debian_13_across_a_reload() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("binfmt.dynpkg");
    let said = built(&keys, "binfmt-misc-status-debian13.diff", &[], &pkg);
    assert!(
        said.contains("replace  bm_status_read (binfmt_misc, fs/binfmt_misc.c)"),
        "{said}"
    );
    let status = "/proc/sys/fs/binfmt_misc/status";
    let script = format!(
        r#"
mount_binfmt() {{ mount -t binfmt_misc none /proc/sys/fs/binfmt_misc; }}
modprobe binfmt_misc && mount_binfmt
echo "@@ before: $(cat {status}) @@"
dynamos apply /packages/binfmt.dynpkg > /tmp/apply.log 2>&1; echo "@@ apply exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ applied: $(cat {status}) @@"
umount /proc/sys/fs/binfmt_misc; rmmod binfmt_misc; modprobe binfmt_misc && mount_binfmt
echo "@@ reloaded: $(cat {status}) @@"
dynamos revert --all > /dev/null; echo "@@ revert exit $? @@"
echo "@@ reverted: $(cat {status}) @@"
umount /proc/sys/fs/binfmt_misc; rmmod binfmt_misc
dynamos apply /packages/binfmt.dynpkg > /dev/null; echo "@@ applied without the module: $? @@"
modprobe binfmt_misc && mount_binfmt
echo "@@ loaded after: $(cat {status}) @@"
dynamos revert --all > /dev/null
"#
    );
    let text = vm_on_kernel_with_modules(&keys, DEBIAN_13, &["binfmt_misc"], &[&pkg], &script);
    expect_line(&text, "@@ before: enabled @@");
    let apply = section(&text, "@@ apply exit 0: ", "@@");
    assert!(
        apply.contains("running code verified: 1 functions"),
        "{text}"
    );
    expect_line(&text, "@@ applied: enabled (live-updated) @@");
    expect_line(&text, "@@ reloaded: enabled (live-updated) @@");
    expect_line(&text, "@@ revert exit 0 @@");
    expect_line(&text, "@@ reverted: enabled @@");
    expect_line(&text, "@@ applied without the module: 0 @@");
    expect_line(&text, "@@ loaded after: enabled (live-updated) @@");
}

/// Run-pre on Debian 13: a package built from a tree whose
/// `version_proc_show` is not the one the kernel runs (an extra check at
/// its start) is refused before anything is loaded, naming the function.
/// The code is compared with the running 6.12 code after the kernel's own
/// rewrites (return thunks, ENDBR, call padding) are masked, so the same
/// package built from the right tree goes live (the first test).
#[test]
fn a_package_built_from_other_source_is_refused_on_debian_13() {
    let spec = dynamos::target::TargetSpec {
        release: Some(DEBIAN_13.into()),
        ..Default::default()
    };
    let debian = dynamos::target::Target::resolve(&spec).unwrap();
    let keys = Keys::new();
    // A fixed place, so the configured build folders are reused across runs.
    let tree = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("run-pre-tree-debian13");
    if !tree.exists() {
        let status = std::process::Command::new("cp")
            .arg("-al")
            .arg(&debian.source)
            .arg(&tree)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let file = tree.join("fs/proc/version.c");
    let text = std::fs::read_to_string(debian.source.join("fs/proc/version.c")).unwrap();
    let edited = text.replace(
        "{\n\tseq_printf(m, linux_proc_banner,",
        "{\n\tif (!v)\n\t\treturn -EINVAL;\n\tseq_printf(m, linux_proc_banner,",
    );
    assert_ne!(edited, text, "fs/proc/version.c changed upstream");
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, edited).unwrap();

    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("other-code.dynpkg");
    let out = build_from_tree(&keys, &debian, &tree, "proc-version-banner.diff", &pkg);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    let text = vm_on_kernel(
        &keys,
        DEBIAN_13,
        &[&pkg],
        r#"
dynamos apply /packages/other-code.dynpkg > /tmp/apply.log 2>&1
echo "@@ apply exit $? livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c dynamos /proc/modules) @@"
cat /tmp/apply.log
"#,
    );
    expect_line(&text, "@@ apply exit 2 livepatches 0 modules 0 @@");
    let refusal = text
        .lines()
        .find(|l| l.contains("run-pre check failed"))
        .unwrap_or_else(|| panic!("no run-pre refusal:\n{text}"));
    assert!(refusal.contains("version_proc_show"), "{refusal}");
    assert!(refusal.contains("running code differs"), "{refusal}");
}

/// IBT: new code that takes the address of a kernel function the kernel
/// sealed at boot (vmlinux never takes `seq_put_hex_ll`'s address, so its
/// ENDBR became a NOP) is refused at build time naming the function. The
/// guest shows the sealing in the running code: `seq_put_hex_ll` no longer
/// starts with ENDBR64, `version_proc_show` (whose address /proc's table
/// holds) still does. TCG does not enforce IBT, so the running code is
/// read rather than a fault awaited.
#[test]
fn a_pointer_to_a_sealed_function_is_refused_on_debian_13() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("sealed.dynpkg");
    let out = build_with(
        &keys,
        &["refused-sealed-function-pointer-debian13.diff"],
        ["--target", DEBIAN_13],
        &pkg,
    );
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{message}");
    assert!(
        message.contains("refused: seq_put_hex_ll: the new code takes its address, but the target kernel seals its ENDBR at boot"),
        "{message}"
    );
    assert!(!pkg.exists());

    let reader = work.path().join("kcore-bytes");
    compile_static_probe("kcore_bytes.c", &reader);
    let text = vm_on_kernel(
        &keys,
        DEBIAN_13,
        &[&reader],
        r#"
cp /packages/kcore-bytes /tmp/; chmod +x /tmp/kcore-bytes
for f in seq_put_hex_ll version_proc_show; do
    address=$(grep " [tT] $f\$" /proc/kallsyms | cut -d' ' -f1)
    echo "@@ $f starts with $(/tmp/kcore-bytes $address 4) @@"
done
"#,
    );
    let endbr64 = "f3 0f 1e fa";
    let sealed = section(&text, "@@ seq_put_hex_ll starts with ", " @@");
    assert_eq!(sealed.split(' ').count(), 4, "{text}");
    assert_ne!(sealed, endbr64, "{text}");
    expect_line(
        &text,
        &format!("@@ version_proc_show starts with {endbr64} @@"),
    );
}

/// A cumulative update on Debian 13: the second banner, built with
/// `--replaces proc-version-banner`, takes over from the first in one
/// transition; the first is retired and unloaded, and reverting the
/// cumulative one leaves the kernel's own code.
#[test]
fn a_cumulative_update_replaces_the_first_on_debian_13() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let first = work.path().join("first.dynpkg");
    built(&keys, "proc-version-banner.diff", &[], &first);
    let cumulative = work.path().join("cumulative.dynpkg");
    built(
        &keys,
        "proc-version-banner-v2.diff",
        &["--name", "cumulative", "--replaces", "proc-version-banner"],
        &cumulative,
    );
    let text = vm_on_kernel(
        &keys,
        DEBIAN_13,
        &[&first, &cumulative],
        r#"
banners() { echo "$(grep -c 'live update proc-version-banner applied' /proc/version) $(grep -c 'second update' /proc/version)"; }
dynamos apply /packages/first.dynpkg > /dev/null; echo "@@ first: $(banners) @@"
dynamos apply /packages/cumulative.dynpkg > /tmp/apply.log 2>&1; echo "@@ cumulative exit $?: $(tr '\n' ' ' < /tmp/apply.log)@@"
echo "@@ cumulative: $(banners) modules $(grep -c '^dynamos' /proc/modules) @@"
dynamos revert --all > /dev/null; echo "@@ reverted: $(banners) modules $(grep -c '^dynamos' /proc/modules) @@"
"#,
    );
    expect_line(&text, "@@ first: 1 0 @@");
    let apply = section(&text, "@@ cumulative exit 0: ", "@@");
    assert!(
        apply.contains("retired  dynamos_proc_version_banner"),
        "{text}"
    );
    expect_line(&text, "@@ cumulative: 0 1 modules 1 @@");
    expect_line(&text, "@@ reverted: 0 0 modules 0 @@");
}
