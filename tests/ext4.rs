//! A fix of the ext4 module's mballoc, observed on a crafted filesystem.
//! The image (1 KiB blocks, so groups 0 and 1 share one buddy-cache page)
//! has a bad block bitmap checksum in group 0 only. The first load of
//! group 0 reads both bitmaps of the page, skips the bad one and, in the
//! original `ext4_mb_init_group`, still reports success: the group's buddy
//! is handed out unbuilt, and `/proc/fs/ext4/loopN/mb_groups` shows it as
//! zero fragments with "Block bitmap corrupted!". With the fix applied the
//! load fails with -EFSCORRUPTED and the line reads "I/O error". Shown with
//! ext4 loaded and the images mounted before the package, across an unload
//! and reload of ext4, and with ext4 loaded only after the package; each
//! observation uses a freshly mounted copy of the image, since the first
//! load changes the group's state.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const IMAGE: &str = "ext4-bad-bitmap.img";

/// A program of e2fsprogs, with fixed timestamps.
fn e2fsprogs(name: &str) -> Command {
    let mut command = sbin_command(name);
    // Fixed timestamps, UUID and hash seed: the same image on every run.
    command.env("E2FSPROGS_FAKE_TIME", "1700000000");
    command
}

/// A 16 MiB ext4 image with 1 KiB blocks (two groups, one buddy-cache page)
/// whose group 0 descriptor records a wrong block bitmap checksum (the
/// descriptor's own checksum is recomputed, so it mounts).
fn make_image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join(IMAGE);
    let uuid = "6c1e2a3b-0d4f-4e5a-8b6c-7d8e9f0a1b2c";
    let extended = format!("hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0");
    let out = e2fsprogs("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "1024",
            "-O",
            "metadata_csum",
            "-U",
            uuid,
            "-E",
        ])
        .arg(&extended)
        .arg(&image)
        .arg("16M")
        .output()
        .expect("mkfs.ext4 runs");
    assert!(out.status.success(), "mkfs.ext4: {}", stderr(&out));

    let commands = dir.join("damage.cmds");
    std::fs::write(
        &commands,
        "set_bg 0 block_bitmap_csum 0x0badc0de\nset_bg 0 checksum calc\n",
    )
    .unwrap();
    let out = e2fsprogs("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(&image)
        .output()
        .expect("debugfs runs");
    assert!(out.status.success(), "debugfs: {}", stderr(&out));

    // dumpe2fs exits non-zero on the bad bitmap but still lists the groups.
    let out = e2fsprogs("dumpe2fs")
        .arg(&image)
        .output()
        .expect("dumpe2fs runs");
    let listing = stdout(&out);
    assert!(
        listing.contains("csum 0x0badc0de"),
        "damage not recorded:\n{listing}{}",
        stderr(&out)
    );
    image
}

#[test]
fn an_ext4_fix_refuses_a_group_whose_bad_bitmap_was_skipped() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("ext4-mballoc-shared-page.dynpkg");
    let out = build(&keys, "ext4-mballoc-shared-page.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    // The fix adds a line: every function below it that passes __LINE__
    // to ext4's error and journal helpers moves, and none of them counts
    // as changed.
    let built = stdout(&out);
    let replaced: Vec<&str> = built.lines().filter(|l| l.starts_with("replace")).collect();
    assert_eq!(
        replaced,
        ["replace  ext4_mb_init_group (ext4, fs/ext4/mballoc.c)"],
        "{built}"
    );
    let inspect = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        manifest["manifest"]["objects"][0]["object"], "ext4",
        "{manifest}"
    );

    let image = make_image(work.path());

    let script = r#"
I=/packages/ext4-bad-bitmap.img
up() { cp $I /tmp/$1.img && losetup /dev/$1 /tmp/$1.img && mkdir -p /mnt/$1 &&
  mount -t ext4 -o errors=continue,no_prefetch_block_bitmaps /dev/$1 /mnt/$1; }
down() { umount /mnt/$1 && losetup -d /dev/$1 && rm /tmp/$1.img; }
g0() {
  L=$(grep '^#0 ' /proc/fs/ext4/$1/mb_groups | tr -s ' ')
  echo "mb_groups $1: $L" >&2
  case "$L" in
    *'I/O error'*) echo refused ;;
    *'Block bitmap corrupted!'*) echo handed out ;;
    *) echo "unexpected: $L" ;;
  esac
}
modprobe crc32c_generic && modprobe loop && modprobe ext4 || exit 3
up loop0; up loop1
echo "@@ before: $(g0 loop0) @@"
dynamos apply /packages/ext4-mballoc-shared-page.dynpkg
echo "@@ applied: $(g0 loop1) @@"
down loop0; down loop1; rmmod ext4; modprobe ext4
up loop0; up loop1
echo "@@ reloaded: $(g0 loop0) @@"
dynamos revert --all; echo "@@ reverted: $(g0 loop1) @@"
down loop0; down loop1; rmmod ext4
dynamos apply /packages/ext4-mballoc-shared-page.dynpkg
modprobe ext4; up loop0; up loop1
echo "@@ loaded after: $(g0 loop0) @@"
dynamos revert --all; echo "@@ reverted while loaded: $(g0 loop1) @@"
down loop0; down loop1; rmmod ext4
echo "@@ checksum errors $(dmesg | grep -c 'EXT4-fs error (device loop[01]): .*bg 0: bad block bitmap checksum') @@"
"#;
    let text = vm_with_modules(
        &keys,
        &["crc32c_generic", "loop", "ext4"],
        &[&image, &pkg],
        script,
    );
    let expect = |line: &str| expect_line(&text, line);
    expect("@@ before: handed out @@");
    expect("live     ext4_mb_init_group (ext4)");
    expect("@@ applied: refused @@");
    expect("@@ reloaded: refused @@");
    expect("@@ reverted: handed out @@");
    expect("pending  ext4_mb_init_group (ext4: patched when it loads)");
    expect("@@ loaded after: refused @@");
    expect("@@ reverted while loaded: handed out @@");
    // Each of the six mounts reports the damage once, patched or not.
    expect("@@ checksum errors 6 @@");
}
