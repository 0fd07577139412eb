//! One `dynamos-build` run for several kernel builds (`--target` repeated),
//! and a compiler wrapper from the environment (`DYNAMOS_CC_WRAPPER`) in
//! front of the target's own compiler. Both use the suite's two cached
//! Debian 12 targets and the cheapest fix (and the Debian 13 target for a
//! fix only it refuses), so they cost a warm build each.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

const PATCH: &str = "proc-version-banner.diff";
const TARGETS: [&str; 2] = ["6.1.0-57-amd64", "6.1.0-50-amd64"];

/// Variables set for a run.
type Env<'a> = &'a [(&'a str, &'a Path)];

/// `dynamos-build PATCH args...` with the test's key and `env` set.
fn build_run(keys: &Keys, args: &[&str], env: Env) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamos-build"));
    cmd.arg(root().join("patches").join(PATCH))
        .args(args)
        .env("DYNAMOS_CONFIG", keys.dir.path())
        .env_remove("DYNAMOS_CC_WRAPPER")
        .env_remove("CC");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().unwrap()
}

/// The kernel release a package file says it is for.
fn package_target(path: &Path) -> String {
    let bytes = dynamos::package::read_file(path).unwrap();
    let (package, _) = dynamos::package::read_unverified(&bytes).unwrap();
    package.manifest.target.release
}

#[test]
fn one_run_writes_a_package_for_each_target() {
    let keys = Keys::new();
    let out = tempfile::tempdir().unwrap();
    let folder = out.path().to_str().unwrap();
    let built = build_run(
        &keys,
        &[
            "--target", TARGETS[0], "--target", TARGETS[1], "--jobs", "2", "-o", folder, "--json",
        ],
        &[],
    );
    let (text, messages) = (stdout(&built), stderr(&built));
    assert_eq!(built.status.code(), Some(0), "{text}{messages}");
    let summary: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(summary["status"], "written", "{summary}");
    let entries = summary["targets"].as_array().expect("a targets array");
    assert_eq!(entries.len(), 2, "{summary}");
    for (entry, release) in entries.iter().zip(TARGETS) {
        let file = out
            .path()
            .join(format!("proc-version-banner-{release}.dynpkg"));
        assert_eq!(entry["status"], "written", "{entry}");
        assert_eq!(entry["target"], release, "{entry}");
        assert_eq!(entry["package"], file.to_str().unwrap(), "{entry}");
        assert_eq!(entry["replaced"][0]["function"], "version_proc_show");
        assert_eq!(package_target(&file), release);
        // Each build's lines come with its target in front.
        assert!(
            messages.contains(&format!("[{release}] building")),
            "{messages}"
        );
    }
}

/// A fix refused for one kernel (Debian 13 seals the function whose address
/// it takes) is still written for the other; the run exits 2 and says
/// which target refused and why.
#[test]
fn a_target_that_refuses_does_not_stop_the_others() {
    let keys = Keys::new();
    let out = tempfile::tempdir().unwrap();
    let debian_13 = "6.12.117+deb13-amd64";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamos-build"));
    cmd.arg(
        root()
            .join("patches")
            .join("refused-sealed-function-pointer-debian13.diff"),
    )
    .args([
        "--target", TARGETS[0], "--target", debian_13, "--json", "-o",
    ])
    .arg(out.path())
    .env("DYNAMOS_CONFIG", keys.dir.path())
    .env_remove("DYNAMOS_CC_WRAPPER")
    .env_remove("CC");
    let built = cmd.output().unwrap();
    let (text, messages) = (stdout(&built), stderr(&built));
    assert_eq!(built.status.code(), Some(2), "{text}{messages}");
    let summary: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(summary["status"], "refused", "{summary}");
    let [written, refused] = summary["targets"].as_array().unwrap().as_slice() else {
        panic!("two entries in {summary}");
    };
    assert_eq!(written["status"], "written", "{summary}");
    assert_eq!(written["target"], TARGETS[0], "{summary}");
    assert_eq!(refused["status"], "refused", "{summary}");
    assert_eq!(refused["target"], debian_13, "{summary}");
    assert_eq!(
        refused["refused"][0]["symbol"], "seq_put_hex_ll",
        "{summary}"
    );
    assert!(
        refused["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("seals its ENDBR")),
        "{summary}"
    );
    let mut files: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [format!(
            "refused-sealed-function-pointer-debian13-{}.dynpkg",
            TARGETS[0]
        )]
    );
}

#[test]
fn bad_input_among_several_targets_is_one_line_and_exit_1() {
    let keys = Keys::new();
    let out = tempfile::tempdir().unwrap();
    let folder = out.path().to_str().unwrap();
    let not_a_folder = out.path().join("file.dynpkg");
    std::fs::write(&not_a_folder, b"").unwrap();
    let missing_wrapper = out.path().join("no-such-ccache");
    let cases: [(Vec<&str>, Env, &str); 4] = [
        (
            vec![
                "--target",
                TARGETS[0],
                "--target",
                "6.1.0-99-amd64",
                "-o",
                folder,
            ],
            &[],
            "unknown target 6.1.0-99-amd64: apt serves no linux-image-6.1.0-99-amd64",
        ),
        (
            vec!["--target", TARGETS[0], "--target", TARGETS[0], "-o", folder],
            &[],
            "--target 6.1.0-57-amd64 is given twice",
        ),
        (
            vec![
                "--target",
                TARGETS[0],
                "--target",
                TARGETS[1],
                "-o",
                not_a_folder.to_str().unwrap(),
            ],
            &[],
            "with several --target, -o names an existing folder",
        ),
        (
            vec!["--target", TARGETS[0], "-o", not_a_folder.to_str().unwrap()],
            &[("DYNAMOS_CC_WRAPPER", &missing_wrapper)],
            "(from DYNAMOS_CC_WRAPPER) is not installed",
        ),
    ];
    for (args, env, expected) in cases {
        let built = build_run(&keys, &args, env);
        let message = stderr(&built);
        assert_eq!(built.status.code(), Some(1), "{args:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
        assert!(message.contains(expected), "{expected} in {message}");
    }
    let written: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(written, ["file.dynpkg"]);
}

/// A wrapper that logs its arguments and runs the rest, as ccache does,
/// sees the compiles, and the package is byte for byte the one built
/// without it.
#[test]
fn a_compiler_wrapper_runs_the_compiles_and_changes_nothing() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wrapper.log");
    let wrapper = dir.path().join("log-and-run");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let plain = dir.path().join("plain.dynpkg");
    let wrapped = dir.path().join("wrapped.dynpkg");
    for (package, env) in [
        (&plain, &[][..]),
        (&wrapped, &[("DYNAMOS_CC_WRAPPER", wrapper.as_path())][..]),
    ] {
        let built = build_run(
            &keys,
            &["--target", TARGETS[0], "-o", package.to_str().unwrap()],
            env,
        );
        assert_eq!(
            built.status.code(),
            Some(0),
            "{}{}",
            stdout(&built),
            stderr(&built)
        );
    }
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    // The patched fs/proc/version.c, and the generated module.
    for compiled in ["fs/proc/version.c", "dynamos_proc_version_banner"] {
        assert!(
            calls
                .lines()
                .any(|l| l.starts_with("gcc-12 ") && l.contains(compiled)),
            "no gcc-12 compile of {compiled} through the wrapper:\n{calls}"
        );
    }
    assert!(
        std::fs::read(&plain).unwrap() == std::fs::read(&wrapped).unwrap(),
        "the wrapper changed the package"
    );
}
