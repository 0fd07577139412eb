//! Every way `dynamos apply` can fail leaves the running kernel as it was:
//! no module, no livepatch, no state record, a non-zero exit and one line
//! saying why. The wrong-kernel, run-pre and transition-timeout paths have
//! tests of their own (identity.rs, run_pre.rs, consistency.rs); here are
//! the others, in one boot: a flipped byte, a symbol the kernel lacks, a
//! module the kernel refuses to load, and the same update applied twice.
//!
//! The damaged packages are re-signed with the test's own key, so each one
//! gets past the signature check and fails exactly where it is meant to.

mod common;

use common::*;
use dynamos::package::{self, keys, Package};
use std::path::{Path, PathBuf};

fn resign(keys: &Keys, pkg: &Package, out: &Path) {
    let key = keys::load_signing_key(&keys.dir.path().join(keys::SECRET_FILE)).unwrap();
    std::fs::write(out, package::write_signed(pkg, &key)).unwrap();
}

#[test]
fn failed_applies_leave_nothing_behind() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good.dynpkg");
    let out = build(&keys, "proc-cmdline-suffix.diff", &good);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&good).unwrap();
    let (pkg, _) = package::read_unverified(&bytes).unwrap();

    let flipped = work.path().join("flipped.dynpkg");
    let mut copy = bytes.clone();
    let middle = copy.len() / 2;
    copy[middle] ^= 1;
    std::fs::write(&flipped, copy).unwrap();

    // The new code needs a kernel symbol this kernel does not have.
    let missing = work.path().join("missing-symbol.dynpkg");
    let mut broken = pkg.clone();
    let object = &mut broken.manifest.objects[0];
    assert!(!object.externals.is_empty(), "{:?}", broken.manifest);
    object.externals[0].name = "dynamos_no_such_symbol".into();
    resign(&keys, &broken, &missing);

    // A module image the kernel's loader rejects: its version magic claims
    // a kernel without SMP (with MODVERSIONS the loader compares the magic
    // from the first space on).
    let unloadable = work.path().join("unloadable.dynpkg");
    let mut broken = pkg.clone();
    let magic = b"vermagic=6.1.0-57-amd64 SMP";
    let at = broken
        .module
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("module has a version magic");
    broken.module[at + magic.len() - 1] = b'Q';
    resign(&keys, &broken, &unloadable);

    let packages: Vec<PathBuf> = vec![good, flipped, missing, unloadable];
    let script = r#"
left() {
  echo "@@ $1 exit $2 livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c '^dynamos' /proc/modules) records $(ls /run/dynamos/applied 2>/dev/null | wc -l) @@"
}
for p in flipped missing-symbol unloadable; do
  dynamos apply /packages/$p.dynpkg 2>/tmp/err; rc=$?
  echo "@@ $p says: $(cat /tmp/err) @@"; echo "@@ $p lines $(wc -l < /tmp/err) @@"
  left $p $rc
done
dynamos apply /packages/good.dynpkg >/dev/null; left good $?
dynamos apply /packages/good.dynpkg 2>/tmp/err; rc=$?
echo "@@ twice says: $(cat /tmp/err) @@"; echo "@@ twice lines $(wc -l < /tmp/err) @@"
left twice $rc
echo "@@ cmdline $(cat /proc/cmdline) @@"
dynamos revert --all >/dev/null; left reverted $?
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let (text, code) = vm(&keys, &packages, script);
    assert_eq!(code, Some(0), "{text}");
    let expect = |line: &str| assert!(text.contains(line), "missing `{line}` in:\n{text}");
    // A damaged file is an error (1); a refusal (2) is for packages that are
    // intact but must not land here.
    for (name, exit) in [("flipped", 1), ("missing-symbol", 2), ("unloadable", 1)] {
        expect(&format!(
            "@@ {name} exit {exit} livepatches 0 modules 0 records 0 @@"
        ));
        expect(&format!("@@ {name} lines 1 @@"));
    }
    expect("bad signature");
    expect("dynamos_no_such_symbol: not found in the running kernel");
    expect("the kernel refused to load module dynamos_proc_cmdline_suffix");
    expect("@@ unloadable lines 1 @@");
    expect("@@ good exit 0 livepatches 1 modules 1 records 1 @@");
    // Applying it again is refused and leaves the first one alone.
    expect("@@ twice exit 2 livepatches 1 modules 1 records 1 @@");
    expect("@@ twice lines 1 @@");
    expect("already loaded");
    expect("dynamos.cmdline=patched @@");
    expect("@@ reverted exit 0 livepatches 0 modules 0 records 0 @@");
}
