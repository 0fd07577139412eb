//! The livepatch core's own fake signal, seen from a task it moves: a writer
//! asleep in pipe_write, mid-way through one 1 MiB write() to a pipe whose
//! reader never reads, holds the transition of an update of pipe_write
//! until the core signals the tasks left on the old side, about 15 s into
//! the transition (Linux 6.1 offers no way to ask for it sooner). The
//! signal cuts the write short at what the pipe holds: 65,536 bytes.

mod common;

use common::*;

/// The pipe's capacity: 16 pages.
const PIPE_CAPACITY: u64 = 65_536;

#[test]
fn a_writer_asleep_mid_write_is_cut_short_by_the_kernels_signal() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("pipe-read-write.dynpkg");
    let out = build(&keys, "pipe-read-write.diff", &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replace  pipe_write"),
        "{}",
        stdout(&out)
    );
    let writer = work.path().join("pipe-short-write");
    compile_static_probe("pipe_short_write.c", &writer);

    let script = r#"
cp /packages/pipe-short-write /tmp/; chmod +x /tmp/pipe-short-write
/tmp/pipe-short-write > /tmp/writer.log 2>&1 &
writer=$!
i=0
while ! grep -q pipe_write /proc/$writer/stack 2>/dev/null && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1))
done
echo "@@ writer asleep in: $(grep -o 'pipe_write' /proc/$writer/stack | head -1) @@"
dynamos apply --timeout 60 /packages/pipe-read-write.dynpkg > /tmp/apply.log 2>&1; rc=$?
echo "@@ apply exit $rc: $(tail -1 /tmp/apply.log) @@"
wait $writer; echo "@@ writer exit $?: $(cat /tmp/writer.log) @@"
echo "@@ core signalled $(dmesg | grep -c 'livepatch: signaling remaining tasks') @@"
dynamos revert --all > /dev/null; echo "@@ reverted exit $? @@"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true
"#;
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--timeout",
            "300",
            "--package",
            pkg.to_str().unwrap(),
            "--package",
            writer.to_str().unwrap(),
            "--",
            script,
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    expect_line(&text, "@@ writer asleep in: pipe_write @@");

    // apply prints "applied NAME in S.S s (...)": S is the transition.
    let applied = section(&text, "@@ apply exit 0: applied pipe-read-write in ", " s ");
    let transition: f64 = applied.trim().parse().unwrap();
    // The core retries about once a second and signals on the 15th retry;
    // the writer switches on its way out and the next retry completes.
    assert!(
        (14.0..=25.0).contains(&transition),
        "transition took {transition} s:\n{text}"
    );
    expect_line(&text, "@@ core signalled 1 @@");

    let wrote = section(&text, "@@ writer exit 0: pipe-short-write: wrote ", " @@");
    let (bytes, rest) = wrote.split_once(" bytes in ").expect(wrote);
    let bytes: u64 = bytes.parse().unwrap();
    let seconds: f64 = rest.trim_end_matches(" s").parse().unwrap();
    assert_eq!(bytes, PIPE_CAPACITY, "{text}");
    // It slept from before apply started until the signal.
    assert!(
        seconds >= transition - 2.0 && seconds <= 60.0,
        "write returned after {seconds} s, transition {transition} s:\n{text}"
    );
    println!("transition {transition:.1} s; write() returned {bytes} bytes after {seconds:.1} s");
    expect_line(&text, "@@ reverted exit 0 @@");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}
