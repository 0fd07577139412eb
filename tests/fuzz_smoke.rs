//! Each fuzz target (fuzz/, run by scripts/fuzz.sh) runs a few seconds
//! from its seeds without a crash. A longer run is `scripts/fuzz.sh TARGET
//! SECONDS`. Needs cargo-fuzz, which scripts/install-deps.sh installs.

use std::path::Path;
use std::process::Command;

const TARGETS: [&str; 3] = ["patch_parse", "package_read", "object_diff"];
const SECONDS: &str = "5";

#[test]
fn fuzz_targets_run_without_crashing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = Command::new("cargo").args(["fuzz", "--version"]).output();
    assert!(
        matches!(&tool, Ok(out) if out.status.success()),
        "cargo-fuzz is not installed: run scripts/install-deps.sh (or cargo install --locked cargo-fuzz)"
    );
    for target in TARGETS {
        let out = Command::new(root.join("scripts/fuzz.sh"))
            .args([target, SECONDS])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            out.status.success(),
            "{target} failed:\n{}",
            tail.join("\n")
        );
        // libFuzzer ends with "Done N runs in S second(s)".
        let runs: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Done ")?.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{target}: no run count in:\n{}", tail.join("\n")));
        assert!(runs >= 100, "{target}: only {runs} runs");
        eprintln!("{target}: {runs} runs in {SECONDS} s");
    }
}
