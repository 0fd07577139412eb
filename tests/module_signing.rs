//! Module signatures: with a module-signing key, `dynamos-build` signs the
//! update module with the target's own scripts/sign-file and binds every
//! kernel symbol at build time, so apply loads the module byte for byte as
//! signed. A kernel that enforces signatures (module.sig_enforce=1) refuses
//! unsigned and untrusted modules, and apply says which it was.
//!
//! Debian's kernel trusts only keys built in or enrolled through UEFI
//! (MOK), which a QEMU boot without firmware cannot enroll: the signature
//! is checked on the host against the certificate, and the guest shows
//! that the kernel finds it (an unavailable key, not an unsigned module).

mod common;

use common::*;
use object::{Object, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One boot takes about 15 s on an idle machine.
const BOOT_BUDGET: Duration = Duration::from_secs(120);

/// A module-signing key and its DER certificate, made as the kernel's
/// certs/Makefile makes its own (RSA, digitalSignature).
fn module_signing_key(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join("module-key.pem"), dir.join("module-cert.der"));
    let out = Command::new("openssl")
        .args([
            "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500",
        ])
        .args(["-batch", "-x509", "-newkey", "rsa:2048"])
        .args(["-subj", "/CN=dynamos test module key/"])
        .args(["-addext", "keyUsage=digitalSignature"])
        .args(["-addext", "subjectKeyIdentifier=hash"])
        .args(["-outform", "DER", "-out"])
        .arg(&cert)
        .arg("-keyout")
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key, cert)
}

/// `cert` (DER) as PEM, the form `openssl cms -certfile` reads.
fn pem_of(cert: &Path) -> PathBuf {
    let pem = cert.with_extension("pem");
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(cert)
        .arg("-out")
        .arg(&pem)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl x509");
    pem
}

fn module_of(package: &Path) -> Vec<u8> {
    let bytes = std::fs::read(package).unwrap();
    dynamos::package::read_unverified(&bytes).unwrap().0.module
}

const MARKER: &[u8] = b"~Module signature appended~\n";

/// Whether openssl finds `module`'s appended PKCS#7 signature valid over
/// the rest of it for `cert`.
fn signature_verifies(module: &[u8], cert: &Path, work: &Path) -> bool {
    // module | PKCS#7 | struct module_signature (12 bytes, length last) | marker
    let tail = module.len() - MARKER.len();
    let length = u32::from_be_bytes(module[tail - 4..tail].try_into().unwrap()) as usize;
    let signature_start = tail - 12 - length;
    let (body, signature) = (work.join("body"), work.join("signature.p7"));
    std::fs::write(&body, &module[..signature_start]).unwrap();
    std::fs::write(&signature, &module[signature_start..tail - 12]).unwrap();
    Command::new("openssl")
        .args(["cms", "-verify", "-binary", "-inform", "DER", "-noverify"])
        .arg("-in")
        .arg(&signature)
        .arg("-content")
        .arg(&body)
        .arg("-certfile")
        .arg(cert)
        .args(["-nointern", "-out", "/dev/null"])
        .output()
        .expect("openssl")
        .status
        .success()
}

#[test]
fn signed_modules_load_as_built_and_an_enforcing_kernel_refuses_the_rest() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let (key, cert) = module_signing_key(work.path());
    let signing = [
        "--module-key",
        key.to_str().unwrap(),
        "--module-cert",
        cert.to_str().unwrap(),
    ];
    let mut signed = Vec::new();
    // A vmlinux fix, one whose new code branches on a vmlinux static key,
    // and one of a module (tun) whose new code uses vmlinux symbols.
    for patch in [
        "proc-version-banner",
        "schedstat-static-key",
        "tun-vnet-hdr-size-limit",
    ] {
        let package = work.path().join(format!("{patch}.dynpkg"));
        let args = signing.iter().copied().chain(["--json"]);
        let out = build_with(&keys, &[&format!("{patch}.diff")], args, &package);
        assert!(out.status.success(), "{patch}: {}", stderr(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["module_signed"], true, "{summary}");
        signed.push(package);
    }
    let unsigned = work.path().join("unsigned/proc-version-banner.dynpkg");
    std::fs::create_dir_all(unsigned.parent().unwrap()).unwrap();
    let out = build(&keys, "proc-version-banner.diff", &unsigned);
    assert!(out.status.success(), "{}", stderr(&out));

    let cert_pem = pem_of(&cert);
    for package in &signed {
        let module = module_of(package);
        assert!(module.ends_with(MARKER), "{}", package.display());
        assert!(signature_verifies(&module, &cert_pem, work.path()));
        // The check can fail: one changed byte of the module voids it.
        let mut changed = module.clone();
        changed[100] ^= 1;
        assert!(!signature_verifies(&changed, &cert_pem, work.path()));
        // Nothing is left for apply to bind: every kernel symbol the new
        // code uses is a livepatch symbol the kernel resolves at load.
        let file = object::File::parse(module.as_slice()).unwrap();
        let names: Vec<&str> = file.symbols().filter_map(|s| s.name().ok()).collect();
        assert!(
            !names.iter().any(|n| n.starts_with("__dynamos_ext_")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.starts_with(".klp.sym.vmlinux.")));
        let bytes = std::fs::read(package).unwrap();
        let manifest = dynamos::package::read_unverified(&bytes)
            .unwrap()
            .0
            .manifest;
        assert!(manifest
            .objects
            .iter()
            .flat_map(|o| &o.externals)
            .all(|e| e.bound_at_build.is_some()));
    }
    assert!(!module_of(&unsigned).ends_with(MARKER));
    let out = dynamos(&keys.dir, &["inspect", signed[0].to_str().unwrap()]);
    assert!(
        stdout(&out).contains("signed for the kernel's module loader"),
        "{}",
        stdout(&out)
    );

    // A kernel that does not enforce signatures loads the signed modules,
    // and the livepatch core binds their symbols.
    let script = "\
        dynamos apply /packages/proc-version-banner.dynpkg && echo \"@@ $(grep -c 'proc-version-banner applied' /proc/version) banner @@\"\n\
        dynamos apply /packages/schedstat-static-key.dynpkg\n\
        echo 0 > /proc/sys/kernel/sched_schedstats\n\
        echo \"@@ key off: $(grep dynamos /proc/schedstat) @@\"\n\
        echo 1 > /proc/sys/kernel/sched_schedstats\n\
        echo \"@@ key on: $(grep dynamos /proc/schedstat) @@\"\n\
        dynamos apply /packages/tun-vnet-hdr-size-limit.dynpkg && modprobe tun\n\
        dynamos list\n\
        dmesg | grep 'applying patch'\n\
        for n in tun-vnet-hdr-size-limit schedstat-static-key proc-version-banner; do dynamos revert $n || echo \"@@ revert $n failed\"; done\n";
    let packages: Vec<&Path> = signed.iter().map(PathBuf::as_path).collect();
    // Exit 0, no taint but the modules', no Oops or warning.
    let text = vm_with_modules(&keys, &["tun"], &packages, script);
    expect_line(&text, "@@ 1 banner @@");
    expect_line(&text, "@@ key off: dynamos schedstats off @@");
    expect_line(&text, "@@ key on: dynamos schedstats on @@");
    expect_line(
        &text,
        "livepatch: applying patch 'dynamos_tun_vnet_hdr_size_limit' to loading module 'tun'",
    );
    assert!(!text.contains("@@ revert"), "{text}");

    // An enforcing kernel refuses both, and apply says why each time.
    let script = "\
        echo \"@@ enforced $(cat /sys/module/module/parameters/sig_enforce) @@\"\n\
        dynamos apply /packages/proc-version-banner.dynpkg; echo \"@@ unsigned exit $? @@\"\n\
        dynamos apply /packages/signed.dynpkg; echo \"@@ signed exit $? @@\"\n\
        dmesg | grep 'is rejected'\n\
        echo \"@@ $(grep -c 'proc-version-banner applied' /proc/version) banner @@\"\n\
        dynamos list\n";
    let renamed = work.path().join("signed.dynpkg");
    std::fs::copy(&signed[0], &renamed).unwrap();
    let (code, text) = vm_boot(
        &keys,
        &["--append", "module.sig_enforce=1"],
        &[&unsigned, &renamed],
        script,
        BOOT_BUDGET,
    );
    assert_eq!(code, Some(0), "{text}");
    expect_line(&text, "@@ enforced Y @@");
    expect_line(&text, "@@ unsigned exit 1 @@");
    expect_line(&text, "@@ signed exit 1 @@");
    expect_line(
        &text,
        "this kernel only loads modules signed by a key it trusts (module.sig_enforce), and this package's module is unsigned",
    );
    expect_line(
        &text,
        "and it does not trust the key that signed this package's module",
    );
    expect_line(&text, "Loading of unsigned module is rejected");
    expect_line(&text, "Loading of module with unavailable key is rejected");
    expect_line(&text, "@@ 0 banner @@");
    expect_line(&text, "no live updates");
}

/// A module key that cannot be read stops the build before it compiles,
/// and writes nothing.
#[test]
fn an_unreadable_module_key_is_refused_at_once() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let package = work.path().join("banner.dynpkg");
    let started = Instant::now();
    let out = build_with(
        &keys,
        &["proc-version-banner.diff"],
        ["--module-key", "/nonexistent/module-key.pem"],
        &package,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(
        text.contains("cannot read the module-signing key /nonexistent/module-key.pem"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!package.exists());
}

/// On Debian 13 (IBT, gcc-14) the target's sign-file runs in the
/// toolchain's root, and the signed module of a module fix goes live
/// unchanged.
#[test]
fn a_signed_module_goes_live_on_debian_13() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let (key, cert) = module_signing_key(work.path());
    let package = work.path().join("binfmt.dynpkg");
    let out = build_with(
        &keys,
        &["binfmt-misc-status-debian13.diff"],
        [
            "--target",
            "6.12.117+deb13-amd64",
            "--module-key",
            key.to_str().unwrap(),
            "--module-cert",
            cert.to_str().unwrap(),
        ],
        &package,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let module = module_of(&package);
    assert!(signature_verifies(&module, &pem_of(&cert), work.path()));
    let status = "/proc/sys/fs/binfmt_misc/status";
    let script = format!(
        "modprobe binfmt_misc && mount -t binfmt_misc none /proc/sys/fs/binfmt_misc\n\
         dynamos apply /packages/binfmt.dynpkg > /tmp/apply.log 2>&1; echo \"@@ apply exit $?: $(tr '\\n' ' ' < /tmp/apply.log)@@\"\n\
         echo \"@@ applied: $(cat {status}) @@\"\n\
         dynamos revert --all > /dev/null; echo \"@@ reverted: $(cat {status}) @@\"\n"
    );
    let text = vm_on_kernel_with_modules(
        &keys,
        "6.12.117+deb13-amd64",
        &["binfmt_misc"],
        &[&package],
        &script,
    );
    assert!(
        section(&text, "@@ apply exit 0: ", "@@").contains("running code verified: 1 functions"),
        "{text}"
    );
    expect_line(&text, "@@ applied: enabled (live-updated) @@");
    expect_line(&text, "@@ reverted: enabled @@");
}
