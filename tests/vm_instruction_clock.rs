//! `dynamos vm --icount`: the guest clock counts executed instructions, so
//! the same work takes the same guest time however loaded the host is.

mod common;

use common::*;

#[test]
fn the_instruction_clock_times_the_same_work_alike() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let probe = work.path().join("overhead");
    compile_static_probe("overhead.c", &probe);
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--icount",
            "0",
            "--package",
            probe.to_str().unwrap(),
            "--",
            "echo \"@@ cpus $(grep -c ^processor /proc/cpuinfo) @@\"; cp /packages/overhead /tmp/; chmod +x /tmp/overhead; /tmp/overhead icount 5 5",
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    expect_line(&text, "@@ cpus 1 @@");
    // One line per row: overhead icount ROW median_ns M min_ns MIN max_ns MAX ...
    let mut rows = 0;
    for line in text.lines().filter(|l| l.starts_with("overhead icount ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |at: usize| -> f64 { words[at].parse().unwrap() };
        let (median, min, max) = (number(4), number(6), number(8));
        // System calls that do the same work every time: the rounds agree
        // to within a fraction of a percent, where the host clock under a
        // loaded host gave them tens of percent apart.
        if ["brk", "read", "write", "kill"].contains(&words[2]) {
            assert!((max - min) / median < 0.01, "{line}");
        }
        rows += 1;
    }
    assert_eq!(rows, 8, "{text}");
}
