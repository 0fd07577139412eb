//! A fix of the tun driver (a loadable module) whose effect a program sees
//! through ioctls on /dev/net/tun: the new `__tun_chr_ioctl` refuses a
//! TUNSETVNETHDRSZ above 64 KiB with EINVAL and keeps the device's header
//! size, where the old code accepts any size from 10 bytes up. Sizes up to
//! 64 KiB still go through. The fix is applied while tun is loaded,
//! survives unloading and reloading it, is patched in when tun loads only
//! after the package, and reverts (`tests/guest/tun_vnet_hdr.c` creates a
//! throw-away TAP device for each check).

mod common;

use common::*;

#[test]
fn tun_refuses_oversized_vnet_headers_while_patched() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("tun-vnet-hdr-size-limit.dynpkg");
    let out = build(&keys, "tun-vnet-hdr-size-limit.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let built = stdout(&out);
    assert!(
        built.contains("replace  __tun_chr_ioctl (tun, drivers/net/tun.c)"),
        "{built}"
    );
    assert_eq!(
        built.lines().filter(|l| l.starts_with("replace ")).count(),
        1,
        "{built}"
    );
    let probe = work.path().join("tun-vnet-hdr");
    compile_static_probe("tun_vnet_hdr.c", &probe);

    let script = r#"
cp /packages/tun-vnet-hdr /tmp/; chmod +x /tmp/tun-vnet-hdr
probe() { /tmp/tun-vnet-hdr "$@" 2>&1; }
P=/packages/tun-vnet-hdr-size-limit.dynpkg
up() { modprobe tun || echo "@@ modprobe tun failed @@"; }
down() { rmmod tun || echo "@@ rmmod tun failed @@"; }
up; echo "@@ before: $(probe 65536) @@"
echo "@@ before, in range: $(probe 65535) @@"
dynamos apply $P; echo "@@ applied: $(probe 65536) @@"
echo "@@ applied, in range: $(probe 65535) @@"
echo "@@ applied, too small: $(probe 4) @@"
down; up; echo "@@ reloaded: $(probe 65536) @@"
echo "@@ reloaded, in range: $(probe 65535) @@"
dynamos revert --all; echo "@@ reverted: $(probe 65536) @@"; down
echo "@@ tun loaded: $(grep -c '^tun ' /proc/modules) @@"
dynamos apply $P
up; echo "@@ loaded after: $(probe 65536) @@"
echo "@@ loaded after, in range: $(probe 65535) @@"
dynamos revert --all; echo "@@ reverted while loaded: $(probe 65536) @@"; down
"#;
    let text = vm_with_modules(&keys, &["tun"], &[&pkg, &probe], script);
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: result 0 size 65536 @@");
    expect("@@ before, in range: result 0 size 65535 @@");
    expect("live     __tun_chr_ioctl (tun)");
    expect("@@ applied: errno 22 size 10 @@");
    expect("@@ applied, in range: result 0 size 65535 @@");
    expect("@@ applied, too small: errno 22 size 10 @@");
    expect("@@ reloaded: errno 22 size 10 @@");
    expect("@@ reloaded, in range: result 0 size 65535 @@");
    expect("@@ reverted: result 0 size 65536 @@");
    expect("@@ tun loaded: 0 @@");
    expect("pending  __tun_chr_ioctl (tun: patched when it loads)");
    expect("@@ loaded after: errno 22 size 10 @@");
    expect("@@ loaded after, in range: result 0 size 65535 @@");
    expect("@@ reverted while loaded: result 0 size 65536 @@");
    assert!(!text.contains("@@ modprobe tun failed @@"), "{text}");
    assert!(!text.contains("@@ rmmod tun failed @@"), "{text}");
}
