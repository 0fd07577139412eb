//! A fix of the nfsd module whose effect a client sees on the wire: the new
//! `nfsd4_sequence` answers a SEQUENCE whose slot id is above the highest
//! slot id of the same request with NFS4ERR_INVAL (22) before looking the
//! session up, where the old code answers NFS4ERR_BADSESSION (10052) for
//! the made-up session `tests/guest/nfs4_sequence.c` sends. The in-kernel
//! server runs without any user-space daemon (NFSv4 only, the client's
//! address entered in the auth.unix.ip cache by hand). The fix is applied
//! while nfsd serves, survives stopping, unloading and reloading it, is
//! patched in when nfsd loads only after the package, and reverts; the
//! path through the session lookup (consistent slot ids) still works in
//! the new code, which calls sunrpc through livepatch symbols.

mod common;

use common::*;

#[test]
fn nfsd_answers_inconsistent_sequence_slots_with_inval_while_patched() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("nfsd-sequence-slot-check.dynpkg");
    let out = build(&keys, "nfsd-sequence-slot-check.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replace  nfsd4_sequence (nfsd, fs/nfsd/nfs4state.c)"),
        "{}",
        stdout(&out)
    );
    let probe = work.path().join("nfs4-sequence");
    compile_static_probe("nfs4_sequence.c", &probe);

    let script = r#"
cp /packages/nfs4-sequence /tmp/; chmod +x /tmp/nfs4-sequence
probe() { /tmp/nfs4-sequence "$@" 2>&1; }
D=/proc/fs/nfsd
ip link set lo up; mkdir -p /var/lib/nfs/v4recovery
up() {
  modprobe nfsd && mount -t nfsd nfsd $D &&
  echo "-2 -3 +4 +4.1 +4.2" > $D/versions &&
  echo "nfsd 127.0.0.1 2147483647 localhost" > /proc/net/rpc/auth.unix.ip/channel &&
  echo 4 > $D/threads || echo "@@ nfsd did not start @@"
}
down() { echo 0 > $D/threads; umount $D; rmmod nfsd || echo "@@ rmmod nfsd failed @@"; }
up; echo "@@ before: $(probe 5 0) @@"
echo "@@ before, consistent slots: $(probe 0 0) @@"
dynamos apply /packages/nfsd-sequence-slot-check.dynpkg; echo "@@ applied: $(probe 5 0) @@"
echo "@@ applied, consistent slots: $(probe 0 0) @@"
down; up; echo "@@ reloaded: $(probe 5 0) @@"
echo "@@ reloaded, consistent slots: $(probe 0 0) @@"
dynamos revert --all; echo "@@ reverted: $(probe 5 0) @@"; down
dynamos apply /packages/nfsd-sequence-slot-check.dynpkg
up; echo "@@ loaded after: $(probe 5 0) @@"
echo "@@ loaded after, consistent slots: $(probe 0 0) @@"
dynamos revert --all; echo "@@ reverted while loaded: $(probe 5 0) @@"; down
"#;
    let text = vm_with_modules(&keys, &["nfsd"], &[&pkg, &probe], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: status 10052 @@");
    expect("@@ before, consistent slots: status 10052 @@");
    expect("live     nfsd4_sequence (nfsd)");
    expect("@@ applied: status 22 @@");
    expect("@@ applied, consistent slots: status 10052 @@");
    expect("@@ reloaded: status 22 @@");
    expect("@@ reloaded, consistent slots: status 10052 @@");
    expect("@@ reverted: status 10052 @@");
    expect("pending  nfsd4_sequence (nfsd: patched when it loads)");
    expect("@@ loaded after: status 22 @@");
    expect("@@ loaded after, consistent slots: status 10052 @@");
    expect("@@ reverted while loaded: status 10052 @@");
    assert!(!text.contains("@@ nfsd did not start @@"), "{text}");
    assert!(!text.contains("@@ rmmod nfsd failed @@"), "{text}");
}
