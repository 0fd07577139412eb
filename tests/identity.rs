//! A package records the exact kernel build it was made for: its release
//! and the GNU build-id of its vmlinux, taken from the Debian image at
//! build time. The running kernel shows the same build-id in
//! /sys/kernel/notes; another build refuses the package.

mod common;

use common::*;

#[test]
fn a_package_knows_its_kernel_build_and_another_build_refuses_it() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-version-banner.dynpkg");
    let out = build(&keys, "proc-version-banner.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let build_id = manifest["target"]["build_id"].as_str().unwrap().to_string();
    assert_eq!(build_id.len(), 40, "{manifest}");

    // The running default kernel exposes that very build-id.
    let (text, code) = vm(
        &keys,
        std::slice::from_ref(&pkg),
        "echo \"@@ notes $(hexdump -v -e '1/1 \"%02x\"' /sys/kernel/notes) @@\"",
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        section(&text, "@@ notes ", " @@").contains(&build_id),
        "{text}"
    );

    // Another Debian build refuses it, names both, and loads nothing.
    let mut args = vec!["vm", "--kernel", "6.1.0-54-amd64", "--package"];
    let pkg_arg = pkg.to_string_lossy().into_owned();
    args.push(&pkg_arg);
    args.push("--");
    args.push(
        "dynamos apply /packages/proc-version-banner.dynpkg; echo \"@@ exit $? livepatches $(ls /sys/kernel/livepatch | wc -l) @@\"",
    );
    let out = dynamos(&keys.dir, &args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("@@ exit 2 livepatches 0 @@"), "{text}");
    assert!(
        text.contains("6.1.0-57-amd64") && text.contains("6.1.0-54-amd64"),
        "{text}"
    );
}

/// Any Debian build apt serves is a target, found through apt rather than a
/// table: `--target` fetches that build's source, config and headers, and
/// the package goes live on that kernel, its code verified by run-pre
/// against that build. 6.1.0-50 is older than any build the tool was
/// first written for.
#[test]
fn a_package_for_another_debian_build_goes_live_on_that_build() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-version-banner.dynpkg");
    let out = build_with(
        &keys,
        &["proc-version-banner.diff"],
        ["--target", "6.1.0-50-amd64"],
        &pkg,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("for 6.1.0-50-amd64"),
        "{}",
        stdout(&out)
    );

    let pkg_arg = pkg.to_string_lossy().into_owned();
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--kernel",
            "6.1.0-50-amd64",
            "--package",
            &pkg_arg,
            "--",
            "echo \"@@ running $(uname -r) @@\"; dynamos apply /packages/proc-version-banner.dynpkg && cat /proc/version && dynamos revert --all",
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("@@ running 6.1.0-50-amd64 @@"), "{text}");
    assert!(text.contains("Debian 6.1.176-1"), "{text}");
    assert!(
        text.contains("dynamos: live update proc-version-banner applied"),
        "{text}"
    );
    assert!(
        text.contains("running code verified: 1 functions"),
        "{text}"
    );
}

/// A release apt does not serve is named with the ones it does; a build
/// whose image is still served but whose source is not says exactly that.
#[test]
fn a_target_apt_cannot_build_gets_a_clear_error() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("x.dynpkg");
    for (target, expected) in [
        (
            "6.1.0-99-amd64",
            vec![
                "unknown target 6.1.0-99-amd64: apt serves no linux-image-6.1.0-99-amd64; the kernels it serves are ",
                "6.1.0-57-amd64",
                // Debian 13's, whatever release the host runs.
                "6.12.117+deb13-amd64",
            ],
        ),
        (
            "6.1.0-48-amd64",
            vec![
                "target 6.1.0-48-amd64: apt serves linux-image-6.1.0-48-amd64 ",
                " but not linux-source-6.1 ",
                "so the fix cannot be compiled for it",
            ],
        ),
        ("../57", vec!["\"../57\" is not a Debian amd64 kernel release"]),
    ] {
        let out = build_with(&keys, &["proc-version-banner.diff"], ["--target", target], &pkg);
        let message = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
        for part in expected {
            assert!(message.contains(part), "{part} in {message}");
        }
        assert!(!pkg.exists());
    }
}
