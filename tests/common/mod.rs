//! Helpers shared by the tests that drive the command-line tools against
//! the real default target.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A signing key of the test's own, so tests never touch the user's keys.
pub struct Keys {
    pub dir: tempfile::TempDir,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let out = dynamos(&dir, &["keygen"]);
        assert!(out.status.success(), "keygen: {}", stderr(&out));
        Keys { dir }
    }
}

pub fn dynamos(keys: &tempfile::TempDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamos"))
        .args(args)
        .env("DYNAMOS_CONFIG", keys.path())
        .output()
        .unwrap()
}

pub fn build(keys: &Keys, patch: &str, out: &Path) -> Output {
    build_with(keys, &[patch], [] as [&str; 0], out)
}

/// `dynamos-build` on example patches (names in `patches/`, or absolute
/// paths), with further arguments (`--target`, `--name`, ...).
pub fn build_with<S: AsRef<OsStr>>(
    keys: &Keys,
    patches: &[&str],
    extra: impl IntoIterator<Item = S>,
    out: &Path,
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamos-build"))
        .args(patches.iter().map(|p| root().join("patches").join(p)))
        .args(extra)
        .arg("-o")
        .arg(out)
        .env("DYNAMOS_CONFIG", keys.dir.path())
        .output()
        .unwrap()
}

/// `dynamos-build` on an example patch against `tree` as a user's own
/// source tree, with the Debian target's config and exported symbols.
pub fn build_from_tree(
    keys: &Keys,
    debian: &dynamos::target::Target,
    tree: &Path,
    patch: &str,
    out: &Path,
) -> Output {
    let symvers = debian.headers.as_ref().unwrap().join("Module.symvers");
    let extra: [&OsStr; 8] = [
        "--src".as_ref(),
        tree.as_os_str(),
        "--config".as_ref(),
        debian.config.as_os_str(),
        "--symvers".as_ref(),
        symvers.as_os_str(),
        "--target".as_ref(),
        debian.release.as_ref(),
    ];
    build_with(keys, &[patch], extra, out)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Section of the VM output between two marker lines.
pub fn section<'a>(text: &'a str, from: &str, to: &str) -> &'a str {
    let start = text
        .find(from)
        .unwrap_or_else(|| panic!("no {from} in:\n{text}"));
    let rest = &text[start + from.len()..];
    let end = rest.find(to).unwrap_or(rest.len());
    &rest[..end]
}

/// Run `dynamos vm` with these packages and shell script; returns its
/// output and exit code.
pub fn vm(keys: &Keys, packages: &[PathBuf], script: &str) -> (String, Option<i32>) {
    let mut args: Vec<String> = vec!["vm".into()];
    for pkg in packages {
        args.push("--package".into());
        args.push(pkg.to_string_lossy().into_owned());
    }
    args.push("--".into());
    args.push(script.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dynamos(&keys.dir, &args);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    (text, out.status.code())
}

/// Compile `tests/guest/<source>` into a static program for the guest.
pub fn compile_static_probe(source: &str, out: &Path) {
    let source = root().join("tests/guest").join(source);
    let status = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(out)
        .arg(&source)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cannot compile {}", source.display());
}

/// Flags that make gcc emit what kernel objects contain: function and data
/// sections, fentry calls with recorded mcount locations, kernel code model.
pub const KERNEL_LIKE_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-c",
    "-ffunction-sections",
    "-fdata-sections",
    "-mcmodel=kernel",
    "-fno-pic",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-fno-asynchronous-unwind-tables",
    "-fno-jump-tables",
    "-mno-red-zone",
    "-fno-common",
];

/// Taint bits every live update sets: out-of-tree, unsigned and livepatch
/// modules.
pub const MODULE_TAINTS: u64 = (1 << 12) | (1 << 13) | (1 << 15);

/// Script lines that end a module test in the VM: the taint bits, and exit
/// 9 on any Oops, BUG, WARNING or refused relocation in the kernel log.
const KERNEL_CHECK: &str = r#"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:|invalid relocation' && exit 9 || true
"#;

/// Run `script` in the VM with `modules` loadable by `modprobe` and `files`
/// under /packages, followed by [`KERNEL_CHECK`]. Asserts that it exited 0
/// and that the kernel carries no taint beyond [`MODULE_TAINTS`]; returns
/// the output.
pub fn vm_with_modules(keys: &Keys, modules: &[&str], files: &[&Path], script: &str) -> String {
    vm_checked(keys, None, modules, files, script)
}

/// [`vm_with_modules`] booting the Debian kernel `kernel` instead of the
/// default target.
pub fn vm_on_kernel(keys: &Keys, kernel: &str, files: &[&Path], script: &str) -> String {
    vm_checked(keys, Some(kernel), &[], files, script)
}

/// [`vm_on_kernel`] with `modules` of that kernel loadable.
pub fn vm_on_kernel_with_modules(
    keys: &Keys,
    kernel: &str,
    modules: &[&str],
    files: &[&Path],
    script: &str,
) -> String {
    vm_checked(keys, Some(kernel), modules, files, script)
}

fn vm_checked(
    keys: &Keys,
    kernel: Option<&str>,
    modules: &[&str],
    files: &[&Path],
    script: &str,
) -> String {
    let script = format!("{script}{KERNEL_CHECK}");
    let mut args: Vec<&str> = vec!["vm"];
    if let Some(kernel) = kernel {
        args.extend(["--kernel", kernel]);
    }
    for module in modules {
        args.extend(["--module", module]);
    }
    for file in files {
        args.extend(["--package", file.to_str().unwrap()]);
    }
    args.extend(["--", &script]);
    let out = dynamos(&keys.dir, &args);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
    text
}

/// One `dynamos vm` boot with `options` (`--disk`, `--module`, `--append`,
/// ...), `files` under /packages and `script`, which must end within
/// `budget`; returns the exit code and the output, for tests that check
/// failures in the guest themselves.
pub fn vm_boot(
    keys: &Keys,
    options: &[&str],
    files: &[&Path],
    script: &str,
    budget: std::time::Duration,
) -> (Option<i32>, String) {
    let timeout = budget.as_secs().to_string();
    let mut args: Vec<&str> = vec!["vm", "--timeout", &timeout];
    args.extend(options);
    for file in files {
        args.extend(["--package", file.to_str().unwrap()]);
    }
    args.extend(["--", script]);
    let started = std::time::Instant::now();
    let out = dynamos(&keys.dir, &args);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        started.elapsed() < budget,
        "one boot took {:?}:\n{text}",
        started.elapsed()
    );
    (out.status.code(), text)
}

/// A program that lives in /usr/sbin or /sbin (e2fsprogs), which a test's
/// PATH may lack.
pub fn sbin_command(name: &str) -> Command {
    let full = ["/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| Path::new(name).to_path_buf());
    Command::new(full)
}

/// Assert that the VM output `text` holds `line`.
pub fn expect_line(text: &str, line: &str) {
    assert!(text.contains(line), "missing `{line}` in:\n{text}");
}

/// Builds example patches (names in `patches/`) for the default target in
/// the cache `DYNAMOS_CACHE` names, as `dynamos-build` does; the objects
/// are this build's own copies, which later builds never touch.
pub fn build_example_objects(patches: &[&str]) -> dynamos::build::BuildOutput {
    let target = dynamos::target::Target::resolve(&dynamos::target::TargetSpec::default())
        .expect("default target");
    let parsed: Vec<_> = patches
        .iter()
        .map(|name| {
            let path = root().join("patches").join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            dynamos::patch::parse(&text, &path).unwrap()
        })
        .collect();
    let changes = dynamos::patch::apply_all(&parsed, dynamos::patch::tree_reader(&target.source))
        .expect("example patches apply");
    dynamos::build::build(&target, &changes)
        .unwrap_or_else(|e| panic!("building {patches:?}: {e:#}"))
}
