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
    // Every target runs, so a crash in one does not hide the others.
    let mut failures = Vec::new();
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
        // libFuzzer ends with "Done N runs in S second(s)".
        let runs: Option<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("Done ")?.split(' ').next()?.parse().ok());
        match runs {
            Some(runs) if out.status.success() && runs >= 100 => {
                eprintln!("{target}: {runs} runs in {SECONDS} s")
            }
            _ => failures.push(format!(
                "{target} failed ({runs:?} runs):\n{}",
                what_failed(&text)
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The lines of a fuzz run's output that say what went wrong: the panic
/// and its message, where the crashing input was saved, cargo's errors;
/// otherwise its last lines.
fn what_failed(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut said: Vec<&str> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            said.extend(lines.get(i..i + 2).unwrap_or(&lines[i..]).iter().copied());
        } else if line.contains("Test unit written to") || line.starts_with("error") {
            said.push(*line);
        }
    }
    if said.is_empty() {
        said = lines[lines.len().saturating_sub(20)..].to_vec();
    }
    said.join("\n")
}
