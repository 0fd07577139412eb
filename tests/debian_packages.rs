//! dynamos as a .deb, and an update wrapped as a .deb, installed with dpkg
//! in a clean Debian 12 root (debootstrap, minbase): the update's package
//! refuses to install without the exact kernel build it is for, installs
//! with it, stores the update through `dynamos install` in its postinst and
//! forgets it in its prerm.

mod common;

use common::*;
use dynamos::debian::{download, Archive, DebRef};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// debootstrap from the mirror, the kernel image's download and dpkg:
/// about 2 minutes on an idle machine with a warm mirror.
const BUDGET: Duration = Duration::from_secs(480);

/// Run `script` in the root with `sh -e`; returns its status and output.
fn in_root(root: &Path, script: &str) -> (bool, String) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "chroot"])
        .arg(root)
        .args(["/bin/sh", "-c", script])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn dynamos_and_an_update_install_as_debian_packages_in_a_clean_root() {
    let started = Instant::now();
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("banner.dynpkg");
    let out = build(&keys, "proc-version-banner.diff", &pkg);
    assert!(out.status.success(), "dynamos-build: {}", stderr(&out));

    // The update's .deb.
    let update_deb = work.path().join("update.deb");
    let out = dynamos(
        &keys.dir,
        &[
            "deb",
            pkg.to_str().unwrap(),
            "-o",
            update_deb.to_str().unwrap(),
            "--deb-version",
            "2",
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}");
    let out = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = manifest["target"]["debian_version"]
        .as_str()
        .unwrap_or_else(|| panic!("no Debian version in {manifest}"))
        .to_string();
    expect_line(
        &text,
        &format!("depends on dynamos (>= 0.1.0), linux-image-6.1.0-57-amd64 (= {version})"),
    );
    let out = dynamos(
        &keys.dir,
        &["deb", pkg.to_str().unwrap(), "--deb-version", "v2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a Debian version"),
        "{}",
        stderr(&out)
    );

    // dynamos's own .deb, from the binaries under test.
    let binaries = Path::new(env!("CARGO_BIN_EXE_dynamos")).parent().unwrap();
    let tool_deb = work.path().join("dynamos.deb");
    let out = dynamos(
        &keys.dir,
        &[
            "package-tool",
            "--binaries",
            binaries.to_str().unwrap(),
            "-o",
            tool_deb.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let contents = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&tool_deb)
        .output()
        .unwrap();
    let contents = stdout(&contents);
    for file in [
        "./usr/bin/dynamos",
        "./usr/bin/dynamos-build",
        "./lib/systemd/system/dynamos.service",
        "./lib/systemd/system/dynamos-confirm.timer",
        "./usr/share/man/man1/dynamos-install.1",
        "./usr/share/man/man1/dynamos-build.1",
        "./usr/share/bash-completion/completions/dynamos",
        "./usr/share/zsh/vendor-completions/_dynamos-build",
        "./usr/share/fish/vendor_completions.d/dynamos.fish",
    ] {
        assert!(contents.contains(file), "{file} missing:\n{contents}");
    }

    // A clean Debian 12 root, with what the kernel image's postinst runs.
    let root = work.path().join("root");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "debootstrap"])
        .args(["--variant=minbase", "--include=kmod,linux-base", "bookworm"])
        .arg(&root)
        .arg(format!("{}/debian", dynamos::debian::mirror()))
        .output()
        .unwrap();
    assert!(out.status.success(), "debootstrap: {}", stdout(&out));
    eprintln!("clean root made at {:?}", started.elapsed());
    for (deb, name) in [(&tool_deb, "dynamos.deb"), (&update_deb, "update.deb")] {
        std::fs::copy(deb, root.join("tmp").join(name)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc/dynamos/trusted.d")).unwrap();
    std::fs::copy(
        keys.dir.path().join("signing.pub"),
        root.join("etc/dynamos/trusted.d/test.pub"),
    )
    .unwrap();

    let (ok, text) = in_root(&root, "dpkg -i /tmp/dynamos.deb && dynamos --version && test -f /usr/share/man/man1/dynamos-install.1");
    assert!(ok, "{text}");
    expect_line(&text, "dynamos 0.1.0");

    // Without the kernel build the update is for, dpkg refuses it.
    let (ok, text) = in_root(&root, "dpkg -i /tmp/update.deb");
    assert!(!ok, "{text}");
    expect_line(&text, "depends on linux-image-6.1.0-57-amd64");
    let (_, text) = in_root(
        &root,
        "dynamos list; dpkg --remove dynamos-update-proc-version-banner-6.1.0-57-amd64",
    );
    // Its postinst never ran: nothing is installed in dynamos's store.
    expect_line(&text, "no live updates");
    assert!(!text.contains("installed proc-version-banner"), "{text}");

    // The real kernel image package (its initramfs tool left out).
    std::fs::create_dir_all(work.path().join("debs")).unwrap();
    let debs = download(
        &[DebRef::new("linux-image-6.1.0-57-amd64", Some(&version))],
        &work.path().join("debs"),
        Archive::Kernels,
    )
    .unwrap();
    std::fs::copy(&debs[0], root.join("tmp/linux-image.deb")).unwrap();
    let (ok, text) = in_root(
        &root,
        "dpkg --force-depends -i /tmp/linux-image.deb >/dev/null 2>&1; \
         dpkg-query -W -f='${Status} ${Version}\\n' linux-image-6.1.0-57-amd64",
    );
    assert!(ok, "{text}");
    expect_line(&text, &format!("install ok installed {version}"));

    let (ok, text) = in_root(
        &root,
        "dpkg -i /tmp/update.deb && dynamos list && \
         dpkg --remove dynamos-update-proc-version-banner-6.1.0-57-amd64 && \
         echo '@@ after remove' && dynamos list",
    );
    assert!(ok, "{text}");
    let (before, after) = text.split_once("@@ after remove").unwrap();
    assert!(
        before
            .contains("installed proc-version-banner  6.1.0-57-amd64  #1  not yet applied at boot"),
        "{text}"
    );
    assert!(!after.contains("installed proc-version-banner"), "{text}");
    assert!(
        started.elapsed() < BUDGET,
        "took {:?} (budget {BUDGET:?})",
        started.elapsed()
    );
}
