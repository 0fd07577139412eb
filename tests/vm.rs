//! Boots the real Debian kernel under QEMU (TCG). The first run fetches the
//! kernel image, QEMU and busybox into the cache; later runs reuse them.
//! Boots are slow, so each test packs several checks into one boot.

use dynamos::vm::{self, VmOptions};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn options(command: &str) -> VmOptions {
    VmOptions {
        dynamos_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_dynamos"))),
        command: command.to_string(),
        timeout: Duration::from_secs(240),
        ..VmOptions::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamos-vm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn runs_command_with_tool_packages_and_keys() {
    let dir = scratch("files");
    let package = dir.join("demo.dlp");
    let payload: Vec<u8> = (0..200_003u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&package, &payload).unwrap();
    let key = dir.join("release.pub");
    std::fs::write(&key, b"not really a key\n").unwrap();
    let expected_sum = hex::encode(Sha256::digest(&payload));

    let mut opts = options(
        r#"
uname -r
echo hello >&2
echo "dynamos at $(command -v dynamos)"
test -x "$(command -v dynamos)" && dynamos --version || true
dynamos --version >/dev/null 2>&1; echo "dynamos ran: $?"
sha256sum /packages/demo.dlp
cat /etc/dynamos/trusted.d/release.pub
id -u
touch /tmp/t /var/t && echo writable
exit 7
"#,
    );
    opts.packages = vec![package];
    opts.trusted_keys = vec![key];
    let outcome = vm::run(&opts).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let out = &outcome.output;
    assert_eq!(outcome.exit_code, 7, "output:\n{out}");
    assert!(out.contains("6.1.0-57-amd64"), "output:\n{out}");
    assert!(out.contains("hello"), "output:\n{out}");
    assert!(
        out.contains("dynamos at /usr/bin/dynamos"),
        "output:\n{out}"
    );
    // The binary and its shared libraries are complete enough to start.
    assert!(out.contains("dynamos ran: 0"), "output:\n{out}");
    assert!(
        out.contains(&format!("{expected_sum}  /packages/demo.dlp")),
        "output:\n{out}"
    );
    assert!(out.contains("not really a key"), "output:\n{out}");
    assert!(out.contains("\n0\n"), "not root? output:\n{out}");
    assert!(out.contains("writable"), "output:\n{out}");
    // Kernel messages stay on the console, apart from the command's output.
    assert!(outcome.console.contains("Linux version 6.1.0-57-amd64"));
    assert!(!out.contains("Linux version"), "output:\n{out}");
}

#[test]
fn hung_guest_is_stopped_at_the_timeout() {
    let mut opts = options("echo started; sleep 1000");
    opts.timeout = Duration::from_secs(60);
    let started = Instant::now();
    let err = vm::run(&opts).unwrap_err().to_string();
    let elapsed = started.elapsed();
    assert!(err.contains("did not finish within 60 s"), "{err}");
    // What the command printed before hanging is part of the report.
    assert!(err.contains("started"), "{err}");
    assert!(err.contains("Run /init"), "{err}");
    // The clock starts after the downloads, so allow for a first-run fetch.
    assert!(elapsed < Duration::from_secs(60 + 240), "took {elapsed:?}");
}

#[test]
fn kernel_panic_is_an_error() {
    let opts = options("echo c > /proc/sysrq-trigger; sleep 100");
    let err = vm::run(&opts).unwrap_err().to_string();
    assert!(err.contains("panicked"), "{err}");
}
