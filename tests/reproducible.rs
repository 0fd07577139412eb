//! The same patches, target, key and dynamos version give a byte-identical
//! package, so anyone can check a package by rebuilding it.

mod common;

use common::{stderr, stdout, Keys};

#[test]
fn two_builds_of_the_same_patch_give_the_same_bytes() {
    let keys = Keys::new();
    // vmlinux and a module in one package: both code paths of generate.
    let patch = "proc-version-and-binfmt-status.diff";
    let packages: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let package = dir.path().join("update.dynpkg");
            let out = common::build(&keys, patch, &package);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}{}",
                stdout(&out),
                stderr(&out)
            );
            std::fs::read(&package).unwrap()
        })
        .collect();
    assert!(
        packages[0] == packages[1],
        "two builds of {patch} differ ({} and {} bytes)",
        packages[0].len(),
        packages[1].len()
    );
}
