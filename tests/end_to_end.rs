//! The whole path on the default target, through the command-line tools:
//! build packages from the example patches against the real Debian kernel
//! source, boot that kernel in QEMU, apply each package, observe the new
//! behaviour, revert, observe the old one.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn example_patches_go_live_and_revert_in_the_vm() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let cases = [
        (
            "proc-version-banner",
            "/proc/version",
            "dynamos: live update proc-version-banner applied",
        ),
        (
            "proc-loadavg-new-helper",
            "/proc/loadavg",
            "dynamos: loadavg marker",
        ),
        (
            "proc-cmdline-suffix",
            "/proc/cmdline",
            "dynamos.cmdline=patched",
        ),
    ];
    let mut packages: Vec<PathBuf> = Vec::new();
    for (name, _, _) in &cases {
        let pkg = work.path().join(format!("{name}.dynpkg"));
        let out = build(&keys, &format!("{name}.diff"), &pkg);
        assert!(
            out.status.success(),
            "dynamos-build {name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(stdout(&out).contains("replace"), "{}", stdout(&out));
        packages.push(pkg);
    }

    // inspect --json shows the manifest.
    let out = dynamos(
        &keys.dir,
        &["inspect", "--json", packages[1].to_str().unwrap()],
    );
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = manifest.to_string();
    assert!(text.contains("loadavg_proc_show"), "{text}");
    assert!(text.contains("loadavg_show_marker"), "{text}");
    assert!(text.contains("6.1.0-57-amd64"), "{text}");
    assert!(text.contains("key_id"), "{text}");

    // A copy with one flipped byte must be refused without touching the kernel.
    let tampered = work.path().join("tampered.dynpkg");
    let mut bytes = std::fs::read(&packages[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&tampered, bytes).unwrap();

    let mut script = String::from(
        "set -e\n\
         if dynamos apply /packages/tampered.dynpkg; then echo '@@ tampered applied'; fi\n\
         echo \"@@ livepatches after tampered: $(ls /sys/kernel/livepatch | wc -l) @@\"\n",
    );
    for (name, file, _) in &cases {
        script.push_str(&format!(
            "echo '@@ {name} before'; cat {file}\n\
             dynamos apply /packages/{name}.dynpkg\n\
             echo '@@ {name} live'; cat {file}\n\
             dynamos list\n\
             dynamos revert {name}\n\
             echo '@@ {name} reverted'; cat {file}\n\
             echo '@@ {name} end'\n"
        ));
    }
    script.push_str("echo \"@@ tainted $(cat /proc/sys/kernel/tainted)\"\ndmesg | grep -E 'Oops:|BUG:|WARNING:' && exit 9 || true\n");

    let mut all = packages.clone();
    all.push(tampered);
    let (text, code) = vm(&keys, &all, &script);
    assert_eq!(code, Some(0), "vm run:\n{text}");
    assert!(!text.contains("@@ tampered applied"), "{text}");
    assert!(text.contains("bad signature"), "{text}");
    assert!(
        text.contains("@@ livepatches after tampered: 0 @@"),
        "{text}"
    );
    for (name, _, marker) in &cases {
        let before = section(
            &text,
            &format!("@@ {name} before"),
            &format!("@@ {name} live"),
        );
        let live = section(
            &text,
            &format!("@@ {name} live"),
            &format!("@@ {name} reverted"),
        );
        let after = section(
            &text,
            &format!("@@ {name} reverted"),
            &format!("@@ {name} end"),
        );
        assert!(!before.contains(marker), "{name} before:\n{before}");
        assert!(live.contains(marker), "{name} live:\n{live}");
        assert!(!after.contains(marker), "{name} reverted:\n{after}");
    }
    // Only the module taints (out-of-tree, unsigned, livepatch) are expected.
    let taint: u64 = section(&text, "@@ tainted ", "\n").trim().parse().unwrap();
    assert_eq!(
        taint & !MODULE_TAINTS,
        0,
        "unexpected taint {taint:#x}:\n{text}"
    );
}

#[test]
fn a_patch_to_init_code_only_is_refused_naming_the_function() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let out = build(
        &keys,
        "refused-init-only.diff",
        &work.path().join("x.dynpkg"),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("proc_cmdline_init"),
        "{}",
        stderr(&out)
    );
    assert!(!work.path().join("x.dynpkg").exists());
}

#[test]
fn a_patch_without_binary_change_exits_3() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let out = build(
        &keys,
        "no-change-comment.diff",
        &work.path().join("x.dynpkg"),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(!work.path().join("x.dynpkg").exists());
}

#[test]
fn a_patch_that_does_not_apply_is_an_error_in_one_line() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let patch = work.path().join("stale.diff");
    std::fs::write(
        &patch,
        "--- a/fs/proc/version.c\n+++ b/fs/proc/version.c\n@@ -1,2 +1,2 @@\n-this line is not in the file\n+replacement\n context that is not there either\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dynamos-build"))
        .arg(&patch)
        .arg("-o")
        .arg(work.path().join("x.dynpkg"))
        .env("DYNAMOS_CONFIG", keys.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("stale.diff"), "{message}");
    assert!(!work.path().join("x.dynpkg").exists());
}

#[test]
fn a_users_own_tree_builds_a_package_that_goes_live() {
    // The Debian source stands in for a user's tree: --src/--config, with
    // the kernel's Module.symvers because the config uses MODVERSIONS.
    let debian = dynamos::target::Target::resolve(&Default::default()).unwrap();
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-version-banner.dynpkg");
    let out = build_from_tree(
        &keys,
        &debian,
        &debian.source,
        "proc-version-banner.diff",
        &pkg,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let (text, code) = vm(
        &keys,
        &[pkg],
        "dynamos apply /packages/proc-version-banner.dynpkg && cat /proc/version",
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("dynamos: live update proc-version-banner applied"),
        "{text}"
    );
}

#[test]
fn verify_accepts_the_signed_package_and_refuses_any_flipped_byte() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("proc-cmdline-suffix.dynpkg");
    let out = build(&keys, "proc-cmdline-suffix.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let public = keys.dir.path().join("signing.pub");
    let trust = ["--trust", public.to_str().unwrap()];

    let ok = dynamos(
        &keys.dir,
        &[&["verify", pkg.to_str().unwrap()][..], &trust].concat(),
    );
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Without trusting the key: refused, naming the key.
    let untrusted = dynamos(&keys.dir, &["verify", pkg.to_str().unwrap()]);
    assert_eq!(untrusted.status.code(), Some(2), "{}", stderr(&untrusted));

    let bytes = std::fs::read(&pkg).unwrap();
    let tampered = work.path().join("tampered.dynpkg");
    for at in [
        0,
        9,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 70,
        bytes.len() - 1,
    ] {
        let mut copy = bytes.clone();
        copy[at] ^= 0x20;
        std::fs::write(&tampered, &copy).unwrap();
        let out = dynamos(
            &keys.dir,
            &[&["verify", tampered.to_str().unwrap()][..], &trust].concat(),
        );
        assert!(!out.status.success(), "byte {at} flipped was accepted");
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
}
