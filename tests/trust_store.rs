//! The keys `dynamos apply` trusts are safe from other users. In the guest,
//! a trusted folder or key file that others can write, and a key file
//! linking out of the folder, are refused naming the path (exit 2) before
//! anything is loaded, even for a package signed by a key such a user put
//! there; a malformed key file is skipped with a warning; with root-only
//! modes the package applies.

mod common;

use common::*;
use dynamos::package::{self, keys};

#[test]
fn trusted_keys_others_can_write_are_refused() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good.dynpkg");
    let out = build(&keys, "proc-cmdline-suffix.diff", &good);
    assert!(out.status.success(), "{}", stderr(&out));

    // The same update signed by another user's key, and that key.
    let other_keys = tempfile::tempdir().unwrap();
    let out = dynamos(&other_keys, &["keygen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let other_secret = keys::load_signing_key(&other_keys.path().join(keys::SECRET_FILE)).unwrap();
    let (pkg, _) = package::read_unverified(&std::fs::read(&good).unwrap()).unwrap();
    let other = work.path().join("other.dynpkg");
    std::fs::write(&other, package::write_signed(&pkg, &other_secret)).unwrap();
    let other_pub = work.path().join("other.pub");
    std::fs::copy(other_keys.path().join(keys::PUBLIC_FILE), &other_pub).unwrap();

    let script = r#"
T=/etc/dynamos/trusted.d
try() {
  dynamos apply /packages/$2.dynpkg >/dev/null 2>/tmp/err; rc=$?
  echo "@@ $1 exit $rc lines $(wc -l < /tmp/err) livepatches $(ls /sys/kernel/livepatch | wc -l) @@"
  echo "@@ $1 says: $(cat /tmp/err) @@"
  [ $rc -ne 0 ] || dynamos revert --all >/dev/null
}
echo "@@ modes: $(stat -c '%n %a %u' / /etc /etc/dynamos $T $T/signing.pub | tr '\n' ' ') @@"
# Another user could write the folder and put their key in it.
chmod 777 $T
cp /packages/other.pub $T/other.pub
try open-folder other
chmod 755 $T
# ... or replace the key file.
chmod 666 $T/signing.pub
try open-key good
chmod 644 $T/signing.pub
rm $T/other.pub
# A key file that is a link to a file elsewhere.
ln -s /packages/other.pub $T/other.pub
try link-out other
rm $T/other.pub
# Safe again, with one malformed key file beside the good one.
echo garbage > $T/broken.pub
try fixed good
rm $T/broken.pub
try untrusted other
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--timeout",
            "400",
            "--package",
            good.to_str().unwrap(),
            "--package",
            other.to_str().unwrap(),
            "--package",
            other_pub.to_str().unwrap(),
            "--",
            script,
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    for (name, exit) in [("open-folder", 2), ("open-key", 2), ("link-out", 2)] {
        expect_line(
            &text,
            &format!("@@ {name} exit {exit} lines 1 livepatches 0 @@"),
        );
    }
    expect_line(
        &text,
        "@@ open-folder says: dynamos: refused: /etc/dynamos/trusted.d: writable by group and others (mode 777)",
    );
    expect_line(
        &text,
        "@@ open-key says: dynamos: refused: /etc/dynamos/trusted.d/signing.pub: writable by group and others (mode 666)",
    );
    expect_line(
        &text,
        "@@ link-out says: dynamos: refused: /etc/dynamos/trusted.d/other.pub: symbolic link leading out of /etc/dynamos/trusted.d (to /packages/other.pub)",
    );
    expect_line(&text, "@@ fixed exit 0 lines 1 livepatches 1 @@");
    expect_line(
        &text,
        "@@ fixed says: dynamos: warning: /etc/dynamos/trusted.d/broken.pub: skipped: not a `dynamos-ed25519-public` key file @@",
    );
    expect_line(&text, "@@ untrusted exit 2 lines 1 livepatches 0 @@");
    expect_line(&text, "which is not trusted @@");
}
