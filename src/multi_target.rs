//! `dynamos-build` for several kernel builds in one run (`--target` given
//! more than once): one worker process per target, each the same program
//! told which target is its own, at most `--jobs` of them at once.
//!
//! A process per target keeps apart what a run for one target owns alone
//! (its notes, its temporary files named after the process, its handling
//! of an interrupt), while the on-disk cache (downloads, trees, the
//! compiler's root) is shared and locked as between any two runs.

use crate::error::exit;
use anyhow::{bail, Result};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The package file of `release` when one run builds for several:
/// `NAME-RELEASE.dynpkg` in `folder`, so that no two collide.
pub fn package_file(folder: &Path, name: &str, release: &str) -> PathBuf {
    folder.join(format!("{name}-{release}.dynpkg"))
}

/// Target builds run at once: `jobs` when given, else one per core (a warm
/// build is mostly one busy process, so this keeps every core busy
/// without oversubscribing), never more than there are targets.
pub fn concurrent_builds(jobs: Option<usize>, targets: usize) -> usize {
    jobs.unwrap_or_else(crate::build::cores).min(targets).max(1)
}

/// The exit code of a run for several targets: 0 when every target's
/// package was written, else the most serious code a target ended with,
/// could not run (1) before refused (2) before no change (3).
pub fn overall_exit_code(codes: &[i32]) -> i32 {
    [exit::ERROR, exit::REFUSED, exit::NO_CHANGE]
        .into_iter()
        .find(|serious| codes.contains(serious))
        .unwrap_or(if codes.iter().all(|&c| c == exit::OK) {
            exit::OK
        } else {
            exit::ERROR
        })
}

/// What is wrong with a list of targets before anything is built: a
/// repeated one, or one the archive does not serve (its one-line reason).
pub fn check_targets(releases: &[String]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for release in releases {
        if !seen.insert(release) {
            bail!("--target {release} is given twice");
        }
    }
    for release in releases {
        crate::target::DebianBuild::by_release(release)?;
    }
    Ok(())
}

/// How one target's worker ended.
pub struct WorkerOutcome {
    pub release: String,
    /// Its exit code; a worker killed by a signal counts as could not run.
    pub code: i32,
    /// What it printed on standard output, when that was kept.
    pub stdout: String,
    pub wall: Duration,
}

/// Run `program` with `args_for(release)` once per release, at most
/// `at_once` at a time, and wait for all. Every line a worker prints on
/// standard error, and on standard output unless `keep_stdout`, is relayed
/// with its release in front ([`crate::report::relay`]). Outcomes come in
/// the order of `releases`.
pub fn run_workers(
    program: &Path,
    args_for: impl Fn(&str) -> Vec<OsString> + Sync,
    releases: &[String],
    at_once: usize,
    keep_stdout: bool,
) -> Vec<WorkerOutcome> {
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<WorkerOutcome>>> =
        Mutex::new(releases.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..at_once.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(release) = releases.get(index) else {
                    break;
                };
                let outcome = run_worker(program, &args_for(release), release, keep_stdout);
                if let Ok(mut outcomes) = outcomes.lock() {
                    outcomes[index] = Some(outcome);
                }
            });
        }
    });
    outcomes
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

fn run_worker(
    program: &Path,
    args: &[OsString],
    release: &str,
    keep_stdout: bool,
) -> WorkerOutcome {
    let started = Instant::now();
    let ended = |code: i32, stdout: String| WorkerOutcome {
        release: release.to_string(),
        code,
        stdout,
        wall: started.elapsed(),
    };
    crate::report::relay(release, "building", false);
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        // A run killed or stopped stops its workers, which then undo their
        // work trees as on their own SIGTERM.
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = command.spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            let why = format!("cannot run {}: {e}", program.display());
            crate::report::relay(release, &format!("dynamos-build: {why}"), false);
            return ended(exit::ERROR, String::new());
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return ended(exit::ERROR, String::new());
    };
    let kept = std::thread::scope(|scope| {
        scope.spawn(|| relay_lines(stderr, release, false));
        let mut kept = String::new();
        if keep_stdout {
            let _ = BufReader::new(stdout).read_to_string(&mut kept);
        } else {
            relay_lines(stdout, release, true);
        }
        kept
    });
    let code = match child.wait() {
        Ok(status) => status.code().unwrap_or(exit::ERROR),
        Err(_) => exit::ERROR,
    };
    ended(code, kept)
}

fn relay_lines(from: impl Read, release: &str, to_stdout: bool) {
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        crate::report::relay(release, &line, to_stdout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overall_code_is_the_most_serious_one() {
        assert_eq!(overall_exit_code(&[0, 0, 0]), 0);
        assert_eq!(overall_exit_code(&[0, 3, 0]), 3);
        assert_eq!(overall_exit_code(&[3, 2, 0]), 2);
        assert_eq!(overall_exit_code(&[2, 1, 3]), 1);
        // A code no target should end with is a failure to run.
        assert_eq!(overall_exit_code(&[0, 101]), 1);
    }

    #[test]
    fn packages_are_named_after_their_target() {
        assert_eq!(
            package_file(Path::new("out"), "fix", "6.1.0-57-amd64"),
            Path::new("out/fix-6.1.0-57-amd64.dynpkg")
        );
    }

    #[test]
    fn builds_at_once_are_bounded_by_the_targets() {
        assert_eq!(concurrent_builds(Some(4), 3), 3);
        assert_eq!(concurrent_builds(Some(1), 3), 1);
        assert!(concurrent_builds(None, 3) >= 1);
    }

    #[test]
    fn a_repeated_target_is_refused_before_anything_is_built() {
        let twice = ["6.1.0-57-amd64".to_string(), "6.1.0-57-amd64".to_string()];
        let err = check_targets(&twice).unwrap_err().to_string();
        assert_eq!(err, "--target 6.1.0-57-amd64 is given twice");
    }
}
