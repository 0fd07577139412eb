//! Stress: apply/revert cycles of an update replacing pipe_read and
//! pipe_write while processes stream data through pipes the whole time.
//! Every byte is checked against the stream the writer generated and both
//! ends' checksums must agree; the kernel must not oops, warn or pick up
//! any taint beyond what loading live-update modules sets. Prints the
//! cycles per minute reached under the VM's software emulation.
//!
//! The same runs with the synchronized version of the update
//! (docs/synchronized-updates.md), where no write may come back short and
//! no call may be interrupted.
//!
//! The suite runs a short soak (`DEFAULT_CYCLES`); the 200-cycle run is the
//! benchmark `scripts/stress.sh`, which sets `DYNAMOS_STRESS_CYCLES`.

mod common;

use common::*;

const DEFAULT_CYCLES: u32 = 20;

fn cycles() -> u32 {
    match std::env::var("DYNAMOS_STRESS_CYCLES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("DYNAMOS_STRESS_CYCLES={v:?} is not a cycle count")),
        Err(_) => DEFAULT_CYCLES,
    }
}

#[test]
fn pipes_carry_every_byte_through_live_update_cycles() {
    stress("pipe-read-write", false);
}

#[test]
fn pipes_carry_every_byte_through_synchronized_update_cycles() {
    stress("pipe-read-write-synchronized", true);
}

fn stress(package: &str, synchronized: bool) {
    let cycles = cycles();
    // Under TCG a cycle takes about 11 s; the rest is boot and the build.
    let timeout = (120 + cycles * 30).to_string();
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join(format!("{package}.dynpkg"));
    let out = build(&keys, &format!("{package}.diff"), &pkg);
    assert!(out.status.success(), "{}", stderr(&out));
    let replaced = stdout(&out);
    assert!(replaced.contains("replace  pipe_read"), "{replaced}");
    assert!(replaced.contains("replace  pipe_write"), "{replaced}");
    let stress = work.path().join("pipe-stress");
    compile_static_probe("pipe_stress.c", &stress);

    let script = format!(
        r#"
cp /packages/pipe-stress /tmp/; chmod +x /tmp/pipe-stress
/tmp/pipe-stress 4 /tmp/stop > /tmp/stress.log 2>&1 &
stress=$!
sleep 1
start=$(date +%s); done_cycles=0
for i in $(seq {cycles}); do
  dynamos apply /packages/{package}.dynpkg > /tmp/apply.log 2>&1 || {{ echo "@@ apply $i failed: $(cat /tmp/apply.log)"; break; }}
  dynamos revert --all > /tmp/revert.log 2>&1 || {{ echo "@@ revert $i failed: $(cat /tmp/revert.log)"; break; }}
  done_cycles=$i
done
end=$(date +%s)
touch /tmp/stop; wait $stress; rc=$?
echo "@@ cycles $done_cycles seconds $((end - start)) @@"
echo "@@ stress exit $rc: $(tail -1 /tmp/stress.log) @@"
echo "@@ livepatches $(ls /sys/kernel/livepatch | wc -l) modules $(grep -c '^dynamos' /proc/modules) @@"
echo "@@ tainted $(cat /proc/sys/kernel/tainted) @@"
dmesg | grep -E 'Oops|BUG:|WARNING:|pipe-stress' && exit 9 || true
"#
    );
    let out = dynamos(
        &keys.dir,
        &[
            "vm",
            "--timeout",
            &timeout,
            "--package",
            pkg.to_str().unwrap(),
            "--package",
            stress.to_str().unwrap(),
            "--",
            &script,
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    let expect = |line: &str| assert!(text.contains(line), "missing `{line}` in:\n{text}");

    let summary = section(&text, "@@ cycles ", " @@");
    let (done, seconds) = summary.split_once(" seconds ").unwrap();
    assert_eq!(done, cycles.to_string(), "{text}");
    let seconds: f64 = seconds.parse().unwrap();
    eprintln!(
        "stress ({package}): {cycles} apply/revert cycles in {seconds} s under TCG: {:.1} cycles per minute",
        f64::from(cycles) * 60.0 / seconds.max(1.0)
    );

    let stress = section(&text, "@@ stress exit ", " @@");
    assert!(
        stress.starts_with("0: pipe-stress: pairs 4 bytes "),
        "{text}"
    );
    assert!(stress.ends_with(" mismatches 0"), "{text}");
    if synchronized {
        // Nobody was signalled: no write came back short, nothing was interrupted.
        assert!(stress.contains(" short-writes 0 interrupted 0 "), "{text}");
    }
    let bytes: u64 = stress
        .split(" bytes ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(bytes > 0, "{text}");
    eprintln!("stress ({package}): {bytes} bytes checked");

    expect("@@ livepatches 0 modules 0 @@");
    let taint: u64 = section(&text, "@@ tainted ", " @@").trim().parse().unwrap();
    assert_eq!(taint & !MODULE_TAINTS, 0, "unexpected taint {taint:#x}");
}
