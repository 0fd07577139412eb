//! Pipe throughput with the synchronized pipefs update
//! (`patches/pipe-adaptive-ring.diff`): a bulk transfer through one pipe,
//! whose ring the update grows to 1 MiB, and a stream of small round trips
//! that never make it grow, each timed without the update and with it, in
//! one VM run of the default target. Passes alternate the two columns so
//! that drift hits both alike; each figure is the median over passes.
//!
//! The guest clock counts executed instructions by default (`dynamos vm
//! --icount 0`), so the figures do not move with the host's load;
//! `DYNAMOS_PIPE_CLOCK=host` uses the emulated wall clock instead.
//!
//! Run with `cargo bench --bench pipe_throughput` (or
//! `scripts/pipe-throughput.sh`). `DYNAMOS_PIPE_PASSES` (3),
//! `DYNAMOS_PIPE_BULK_MIB` (256) and `DYNAMOS_PIPE_SMALL` (20000 round
//! trips) set the effort.

mod common;

use common::text;
use std::path::Path;
use std::process::Command;

const PACKAGE: &str = "pipe-adaptive-ring";

fn fail(message: &str) -> ! {
    eprintln!("pipe_throughput: {message}");
    std::process::exit(1);
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// Seconds of every `@@ throughput LABEL KIND ... in S s` line.
fn seconds(output: &str, label: &str, kind: &str) -> Vec<f64> {
    let prefix = format!("@@ throughput {label} {kind} ");
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once(" in ")?.1.split_once(" s")?.0.parse().ok())
        .collect()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let number = |name, default| common::env_number(name, default).unwrap_or_else(|e| fail(&e));
    let passes = number("DYNAMOS_PIPE_PASSES", 3).max(1);
    let bulk_mib = number("DYNAMOS_PIPE_BULK_MIB", 256).max(1);
    let small = number("DYNAMOS_PIPE_SMALL", 20000).max(1);
    let instruction_clock =
        common::instruction_clock("DYNAMOS_PIPE_CLOCK").unwrap_or_else(|e| fail(&e));
    let (work, keys) = common::prepare(root).unwrap_or_else(|e| fail(&e));
    let probe = work.path().join("pipe-throughput");
    common::compile_probe(root, "pipe_throughput.c", &probe).unwrap_or_else(|e| fail(&e));
    let pkg = work.path().join(format!("{PACKAGE}.dynpkg"));
    let out = Command::new(root.join("target/release/dynamos-build"))
        .arg(root.join("patches").join(format!("{PACKAGE}.diff")))
        .arg("-o")
        .arg(&pkg)
        .env("DYNAMOS_CONFIG", &keys)
        .output()
        .expect("dynamos-build runs");
    if !out.status.success() {
        fail(&format!("the pipefs update did not build: {}", text(&out)));
    }

    let measure = |label: &str| {
        format!(
            "  /tmp/pipe-throughput {label} bulk {bulk_mib} || exit 5\n  /tmp/pipe-throughput {label} small {small} || exit 5\n"
        )
    };
    let mut script =
        String::from("set -u\ncp /packages/pipe-throughput /tmp/; chmod +x /tmp/pipe-throughput\n");
    script += &format!("for pass in $(seq {passes}); do\n");
    script += &format!(
        "  if [ $((pass % 2)) = 1 ]; then\n{}  fi\n",
        measure("without")
    );
    script += &format!(
        "  dynamos apply /packages/{PACKAGE}.dynpkg > /tmp/apply.log 2>&1 || {{ echo \"@@ apply failed: $(tail -1 /tmp/apply.log)\"; exit 6; }}\n"
    );
    script += &measure("with");
    script += "  dynamos revert --all > /tmp/revert.log 2>&1 || { echo \"@@ revert failed: $(tail -1 /tmp/revert.log)\"; exit 7; }\n";
    script += &format!(
        "  if [ $((pass % 2)) = 0 ]; then\n{}  fi\n",
        measure("without")
    );
    script += "done\n";
    script += "echo \"@@ tainted $(cat /proc/sys/kernel/tainted) @@\"\n";
    script += "dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true\n";

    let timeout = (600 + passes * (bulk_mib / 2 + small / 200 + 120)).to_string();
    let mut vm = Command::new(root.join("target/release/dynamos"));
    vm.args(["vm", "--timeout", &timeout]);
    if instruction_clock {
        vm.args(["--icount", "0"]);
    }
    let out = vm
        .arg("--package")
        .arg(&pkg)
        .arg("--package")
        .arg(&probe)
        .arg("--")
        .arg(&script)
        .env("DYNAMOS_CONFIG", &keys)
        .output()
        .expect("dynamos vm runs");
    let output = text(&out);
    if !out.status.success() {
        fail(&format!("the VM run failed:\n{output}"));
    }
    let figure = |label: &str, kind: &str| {
        let mut values = seconds(&output, label, kind);
        if values.len() != passes as usize {
            fail(&format!(
                "expected {passes} {kind} figures {label} the update, found {}:\n{output}",
                values.len()
            ));
        }
        median(&mut values)
    };
    let (bulk_without, bulk_with) = (figure("without", "bulk"), figure("with", "bulk"));
    let (small_without, small_with) = (figure("without", "small"), figure("with", "small"));
    let clock = if instruction_clock {
        "guest instruction clock"
    } else {
        "emulated wall clock"
    };
    let field = |label: &str, name: &str| -> Vec<String> {
        let prefix = format!("@@ throughput {label} bulk ");
        output
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&prefix))
            .filter_map(|l| l.split_once(&format!("{name} "))?.1.split_once([',', ' ']))
            .map(|(value, _)| value.to_string())
            .collect()
    };
    let sizes = |label: &str| field(label, "pipe size");
    let switches = |label: &str| field(label, "switches");
    println!("pipe throughput, {passes} passes, median, {clock}:");
    println!(
        "pipe size after the bulk write: without {}; with {}",
        sizes("without").join(", "),
        sizes("with").join(", ")
    );
    println!(
        "voluntary context switches of writer and reader in the bulk transfer: without {}; with {}",
        switches("without").join(", "),
        switches("with").join(", ")
    );
    println!(
        "bulk {bulk_mib} MiB: without {:.1} MiB/s, with {:.1} MiB/s: {:+.1}%",
        f64::from(bulk_mib) / bulk_without,
        f64::from(bulk_mib) / bulk_with,
        (bulk_without / bulk_with - 1.0) * 100.0
    );
    println!(
        "small {small} round trips of 64 bytes: without {:.2} us, with {:.2} us each: {:+.1}%",
        small_without / f64::from(small) * 1e6,
        small_with / f64::from(small) * 1e6,
        (small_with / small_without - 1.0) * 100.0
    );
}
