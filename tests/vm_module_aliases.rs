//! `dynamos vm --module ext4` is enough to mount an ext4 image: the kernel's
//! own module requests (`fs-ext4`, `crypto-crc32c`, the loop device's
//! `char-major-10-237`) reach the guest's modprobe through `modules.alias`,
//! and the modules they name are there.

mod common;

use common::{dynamos, expect_line, stderr, stdout, Keys};
use std::path::Path;
use std::process::Command;

/// An 8 MiB ext4 image holding `hello.txt`, made with e2fsprogs.
fn make_image(dir: &Path) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from ext4\n").unwrap();
    let image = dir.join("hello.img");
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.ext4");
    let out = Command::new(mkfs)
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("8M")
        .output()
        .expect("mkfs.ext4 runs (e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {}", stderr(&out));
    image
}

#[test]
fn naming_ext4_alone_mounts_an_ext4_image() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    // No modprobe at all: mount asks for the loop device and the file
    // system, ext4 for its checksum driver.
    let script = "mkdir -p /mnt/img && \
        mount -o loop -t ext4 /packages/hello.img /mnt/img && \
        echo \"@@ read: $(cat /mnt/img/hello.txt) @@\" && \
        echo \"@@ crc32c: $(grep -c '^crc32c_generic ' /proc/modules) @@\" && \
        umount /mnt/img && \
        echo \"@@ driver errors: $(dmesg | grep -c 'Cannot load crc32c driver') @@\"";
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--timeout",
            "240",
            "--module",
            "ext4",
            "--package",
            image.to_str().unwrap(),
            "--",
            script,
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    expect_line(&text, "@@ read: hello from ext4 @@");
    expect_line(&text, "@@ crc32c: 1 @@");
    expect_line(&text, "@@ driver errors: 0 @@");
}
