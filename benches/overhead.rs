//! Redirect overhead: what a live update costs the calls it redirects.
//!
//! In one VM run of the default target, the guest micro-benchmark
//! `tests/guest/overhead.c` times fork, brk, execve, open, read, write, a
//! page fault and kill with
//!   (a) no update,
//!   (b) an identity update of the functions behind those calls
//!       (`patches/overhead-identity.diff` with `--replace-unchanged`: the
//!       new code is the old code, so only the redirect differs),
//!   (c) the same with an adaptation handler that always returns false
//!       (`patches/overhead-adaptation-false.diff`); when that package
//!       cannot be built, or runs no handler (its `dynamos list` shows
//!       nothing that (b)'s does not: a build that ignores the handlers
//!       makes another identity update), the column says why and the rest
//!       still runs.
//!   (d) no update, but an ftrace direct call at each of those functions'
//!       entries to a trampoline that returns into the function
//!       (`benches/ftrace_direct/`, built against the target's headers):
//!       the floor of what a redirect through a direct call would cost.
//! Passes alternate (a), (b), (c), (d) so that drift of the loaded host hits
//! every column alike; each figure is the median over passes of the
//! guest's per-pass median. Also prints each package's module size from
//! /proc/modules.
//!
//! The guest clock counts executed instructions (`dynamos vm --icount 0`:
//! one instruction is one ns), so the figures are path lengths that the
//! host's load does not move; `DYNAMOS_OVERHEAD_CLOCK=host` times with the
//! host's clock instead, as emulated, which a loaded 2-core host makes
//! noisier than the effect measured.
//!
//! Run with `cargo bench --bench overhead` (or `scripts/overhead.sh`).
//! `DYNAMOS_OVERHEAD_PASSES` (3), `DYNAMOS_OVERHEAD_ROUNDS` (5) and
//! `DYNAMOS_OVERHEAD_ROUND_MS` (50, of guest time) set the effort.

mod common;

use common::text;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The functions the benchmark's calls go through, one or more per row;
/// each has an ftrace entry in the default target and is called, not
/// inlined, on that row's path.
const FUNCTIONS: &[(&str, &str)] = &[
    ("fork", "kernel_clone"),
    ("brk", "__x64_sys_brk"),
    ("execve", "bprm_execve"),
    ("open", "do_sys_openat2"),
    ("read", "ksys_read"),
    ("write", "ksys_write"),
    ("pagefault", "handle_mm_fault"),
    ("kill", "kill_pid_info"),
];

const DIRECT_TITLE: &str = "ftrace direct call returning into the function";

const ROWS: &[&str] = &[
    "fork",
    "brk",
    "execve",
    "open",
    "read",
    "write",
    "pagefault",
    "kill",
];

/// One package of the comparison: its column label and package name.
struct Column {
    label: &'static str,
    title: &'static str,
    package: &'static str,
    patch: &'static str,
}

const IDENTITY: Column = Column {
    label: "b",
    title: "identity update",
    package: "overhead_identity",
    patch: "overhead-identity.diff",
};

const HANDLER: Column = Column {
    label: "c",
    title: "handler returning false",
    package: "overhead_handler",
    patch: "overhead-adaptation-false.diff",
};

fn fail(message: &str) -> ! {
    eprintln!("overhead: {message}");
    std::process::exit(1);
}

fn last_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .to_string()
}

fn build_package(root: &Path, keys: &Path, column: &Column, out: &Path) -> Output {
    let mut command = Command::new(root.join("target/release/dynamos-build"));
    command
        .arg(root.join("patches").join(column.patch))
        .args(["--name", column.package])
        .arg("-o")
        .arg(out)
        .env("DYNAMOS_CONFIG", keys);
    for (_, function) in FUNCTIONS {
        command.args(["--replace-unchanged", function]);
    }
    command.output().expect("dynamos-build runs")
}

/// The text between two marker lines of the guest's output.
fn section(output: &str, from: &str, to: &str) -> String {
    output
        .split_once(from)
        .and_then(|(_, rest)| rest.split_once(to))
        .map_or_else(String::new, |(inside, _)| inside.to_string())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// The guest script: PASSES passes of (a) and each package applied,
/// measured and reverted. Lines starting with `@@` are for the parser.
fn guest_script(
    columns: &[&Column],
    direct_floor: bool,
    passes: u32,
    rounds: u32,
    round_ms: u32,
) -> String {
    let mut script =
        String::from("set -u\ncp /packages/overhead /tmp/overhead; chmod +x /tmp/overhead\n");
    // The direct calls' sites: the functions' addresses, which apply
    // looks up the same way.
    script += "ips=''\n";
    for (_, function) in FUNCTIONS {
        script += &format!(
            "ips=\"$ips${{ips:+,}}0x$(grep ' {function}$' /proc/kallsyms | head -1 | cut -d' ' -f1)\"\n"
        );
    }
    // Odd passes measure (a) first, even ones last: no column always
    // follows a fresh boot or a revert.
    let baseline = format!("  /tmp/overhead a {rounds} {round_ms} || exit 5\n");
    script += &format!("for pass in $(seq {passes}); do\n");
    script += &format!("  if [ $((pass % 2)) = 1 ]; then\n{baseline}  fi\n");
    for column in columns {
        let module = format!("dynamos_{}", column.package);
        script += &format!(
            "  dynamos apply /packages/{package}.dynpkg > /tmp/apply.log 2>&1 || {{ echo \"@@ apply {label} failed: $(tail -1 /tmp/apply.log)\"; exit 6; }}\n\
             \x20 [ $pass = 1 ] && {{ echo \"@@ list {label} begin @@\"; dynamos list; echo \"@@ list {label} end @@\"; }}\n\
             \x20 echo \"@@ module {label} $(grep '^{module} ' /proc/modules | cut -d' ' -f2) coresize $(cat /sys/module/{module}/coresize) functions $(ls -d /sys/kernel/livepatch/{module}/vmlinux/*/ | wc -l) @@\"\n\
             \x20 /tmp/overhead {label} {rounds} {round_ms} || exit 5\n\
             \x20 dynamos revert {package} > /tmp/revert.log 2>&1 || {{ echo \"@@ revert {label} failed: $(tail -1 /tmp/revert.log)\"; exit 7; }}\n",
            package = column.package,
            label = column.label,
        );
    }
    if direct_floor {
        script += &format!(
            "  insmod /packages/{DIRECT_MODULE}.ko ips=$ips || {{ echo \"@@ insmod d failed\"; exit 8; }}\n\
             \x20 /tmp/overhead d {rounds} {round_ms} || exit 5\n\
             \x20 rmmod {DIRECT_MODULE} || exit 8\n"
        );
    }
    script += &format!("  if [ $((pass % 2)) = 0 ]; then\n{baseline}  fi\n");
    script += "done\n";
    script += "echo \"@@ tainted $(cat /proc/sys/kernel/tainted) @@\"\n";
    script += "dmesg | grep -E 'Oops|BUG:|WARNING:' && exit 9 || true\n";
    script
}

/// The kernel module of column (d), from `benches/ftrace_direct/`.
const DIRECT_MODULE: &str = "direct_return";

/// Builds column (d)'s module against the default target's headers, as
/// `dynamos-build` builds a package's module.
fn build_direct_module(root: &Path, work: &Path) -> Result<PathBuf, String> {
    let target = dynamos::target::Target::resolve(&Default::default())
        .map_err(|e| format!("no default target: {e:#}"))?;
    let headers = target
        .headers
        .ok_or("the default target has no headers folder")?;
    let folder = work.join("ftrace_direct");
    std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
    for file in ["Kbuild", "direct_return.c"] {
        std::fs::copy(
            root.join("benches/ftrace_direct").join(file),
            folder.join(file),
        )
        .map_err(|e| format!("{file}: {e}"))?;
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", folder.display()))
        .arg("modules")
        .output()
        .map_err(|e| format!("cannot run make: {e}"))?;
    if !out.status.success() {
        return Err(format!("make failed: {}", last_line(&out)));
    }
    Ok(folder.join(format!("{DIRECT_MODULE}.ko")))
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let number = |name, default| common::env_number(name, default).unwrap_or_else(|e| fail(&e));
    let passes = number("DYNAMOS_OVERHEAD_PASSES", 3).max(1);
    let rounds = number("DYNAMOS_OVERHEAD_ROUNDS", 5).clamp(1, 64);
    let round_ms = number("DYNAMOS_OVERHEAD_ROUND_MS", 50).max(1);
    let instruction_clock =
        common::instruction_clock("DYNAMOS_OVERHEAD_CLOCK").unwrap_or_else(|e| fail(&e));
    let (work, keys) = common::prepare(root).unwrap_or_else(|e| fail(&e));
    let probe = work.path().join("overhead");
    common::compile_probe(root, "overhead.c", &probe).unwrap_or_else(|e| fail(&e));

    let mut packages: Vec<PathBuf> = vec![probe];
    let mut columns: Vec<&Column> = Vec::new();
    // (label, why) of each column that cannot be measured.
    let mut unavailable: Vec<(&str, String)> = Vec::new();
    for column in [&IDENTITY, &HANDLER] {
        let pkg = work.path().join(format!("{}.dynpkg", column.package));
        let out = build_package(root, &keys, column, &pkg);
        if out.status.success() {
            println!(
                "({}) {}: built {}",
                column.label, column.title, column.patch
            );
            packages.push(pkg);
            columns.push(column);
        } else if column.label == IDENTITY.label {
            fail(&format!(
                "the identity update did not build: {}",
                text(&out)
            ));
        } else {
            let reason = last_line(&out);
            println!("({}) unavailable: {reason}", column.label);
            unavailable.push((column.label, reason));
        }
    }
    let direct_floor = match build_direct_module(root, work.path()) {
        Ok(module) => {
            println!("(d) {DIRECT_TITLE}: built benches/ftrace_direct");
            packages.push(module);
            true
        }
        Err(reason) => {
            println!("(d) unavailable: {reason}");
            unavailable.push(("d", reason));
            false
        }
    };

    let script = guest_script(&columns, direct_floor, passes, rounds, round_ms);
    // Each measured round, with the calibration's, runs about 40 times
    // slower than guest time on a loaded 2-core host; boot, apply and
    // revert take minutes more.
    let guest_runs = passes * (columns.len() as u32 + 1 + u32::from(direct_floor));
    let measured_seconds = guest_runs * ROWS.len() as u32 * (rounds + 4) * round_ms / 1000;
    let timeout = (600 + guest_runs * 60 + measured_seconds * 40).to_string();
    let mut vm = Command::new(root.join("target/release/dynamos"));
    vm.args(["vm", "--timeout", &timeout]);
    if instruction_clock {
        vm.args(["--icount", "0"]);
    }
    vm.env("DYNAMOS_CONFIG", &keys);
    for pkg in &packages {
        vm.arg("--package").arg(pkg);
    }
    let out = vm.arg("--").arg(&script).output().expect("dynamos vm runs");
    let output = text(&out);
    if out.status.code() != Some(0) {
        fail(&format!("the guest run failed:\n{output}"));
    }

    // A handler the build ignored leaves (c) an identity update: its
    // listing is then (b)'s under another name.
    if columns.iter().any(|c| c.label == HANDLER.label) {
        let listing = |column: &Column| {
            let label = column.label;
            section(
                &output,
                &format!("@@ list {label} begin @@"),
                &format!("@@ list {label} end @@"),
            )
            .replace(column.package, "PACKAGE")
        };
        if listing(&HANDLER) == listing(&IDENTITY) {
            let reason = "the package applied but `dynamos list` shows no adaptation handler: this dynamos-build ignores DYNAMOS_ADAPTATION_HANDLER".to_string();
            println!("(c) unavailable: {reason}");
            columns.retain(|c| c.label != HANDLER.label);
            unavailable.push((HANDLER.label, reason));
        }
    }

    // (label, row) → per-pass medians, in ns.
    let mut figures: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["overhead", label, row, "median_ns", ns, ..] => {
                let ns: f64 = ns
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad line {line}")));
                figures
                    .entry((label.to_string(), row.to_string()))
                    .or_default()
                    .push(ns);
            }
            ["@@", "module", label, rest @ ..] => {
                modules
                    .entry(label.to_string())
                    .or_insert_with(|| rest.join(" ").trim_end_matches(" @@").to_string());
            }
            _ => {}
        }
    }

    let figure = |label: &str, row: &str| -> Option<f64> {
        let mut values = figures.get(&(label.to_string(), row.to_string()))?.clone();
        Some(median(&mut values))
    };
    println!();
    println!(
        "Redirect overhead, {passes} passes x {rounds} rounds of {round_ms} ms, {} (ns per call; ratio to (a))",
        if instruction_clock {
            "guest clock = executed instructions"
        } else {
            "guest clock = host time"
        }
    );
    // Measured columns, then those that could not be, in label order.
    let mut measured: Vec<&str> = columns.iter().map(|c| c.label).collect();
    if direct_floor {
        measured.push("d");
    }
    let mut unmeasured: Vec<&str> = unavailable.iter().map(|(label, _)| *label).collect();
    unmeasured.sort();
    let mut header = String::from("| call | functions | (a) ns | (a) spread |");
    for label in &measured {
        header += &format!(" ({label}) ns | ({label}) / (a) |");
    }
    for label in &unmeasured {
        header += &format!(" ({label}) / (a) |");
    }
    println!("{header}");
    println!("{}", "|---".repeat(header.matches('|').count() - 1) + "|");
    for row in ROWS {
        let functions: Vec<&str> = FUNCTIONS
            .iter()
            .filter(|(r, _)| r == row)
            .map(|(_, f)| *f)
            .collect();
        let Some(base) = figure("a", row) else {
            fail(&format!("no (a) figure for {row}:\n{output}"));
        };
        // How far apart the passes' (a) figures are: the noise floor.
        let passes_of_a = &figures[&("a".to_string(), row.to_string())];
        let low = passes_of_a.iter().cloned().fold(f64::INFINITY, f64::min);
        let high = passes_of_a.iter().cloned().fold(0.0, f64::max);
        let mut line = format!(
            "| {row} | {} | {base:.0} | {:.1}% |",
            functions.join(", "),
            (high - low) / base * 100.0
        );
        for label in &measured {
            match figure(label, row) {
                Some(ns) => line += &format!(" {ns:.0} | {:.3} |", ns / base),
                None => line += " — | — |",
            }
        }
        for _ in &unmeasured {
            line += " unavailable |";
        }
        println!("{line}");
    }
    println!();
    for column in &columns {
        match modules.get(column.label) {
            Some(size) => println!(
                "({}) {}: /proc/modules size {size} (DynAMOS: 42 KB)",
                column.label, column.title
            ),
            None => println!(
                "({}) {}: module size not reported",
                column.label, column.title
            ),
        }
    }
    for (label, reason) in &unavailable {
        println!("({label}) unavailable: {reason}");
    }
}
