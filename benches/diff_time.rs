//! Time of the diff stage on a large real object: kernel/sched/core.o of the
//! default target against itself changed in one function
//! (nr_context_switches). Target: under 100 ms, dominated by reading.
//!
//! Run with `cargo bench --bench diff_time` (builds the two objects through
//! the build stage first; the default target must be fetchable).

use dynamos::diff::{diff_objects, ObjectFile};
use dynamos::target::{Target, TargetSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let target = Target::resolve(&TargetSpec::default())?;
    let file = PathBuf::from("kernel/sched/core.c");
    let source = std::fs::read_to_string(target.source.join(&file))?;
    let patched = source.replacen(
        "\t\tsum += cpu_rq(i)->nr_switches;",
        "\t\tsum += READ_ONCE(cpu_rq(i)->nr_switches);",
        1,
    );
    assert_ne!(source, patched, "the benchmark's edit no longer applies");
    let changes = BTreeMap::from([(file, Some(patched.into_bytes()))]);
    let built = dynamos::build::build(&target, &changes)?;
    let pair = &built.pairs[0];

    let runs = 20;
    let mut read = Vec::new();
    let mut total = Vec::new();
    let mut changed = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let orig = ObjectFile::read(&pair.original)?;
        let new = ObjectFile::read(&pair.patched)?;
        let after_read = start.elapsed();
        let diff = diff_objects(&orig, &new)?;
        total.push(start.elapsed().as_secs_f64() * 1000.0);
        read.push(after_read.as_secs_f64() * 1000.0);
        changed = diff.changed();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let size = std::fs::metadata(&pair.original)?.len();
    println!(
        "diff of kernel/sched/core.o ({:.1} MiB) changed in one function: median {:.1} ms total, {:.1} ms of it reading, over {runs} runs; changed: {:?}",
        size as f64 / (1024.0 * 1024.0),
        median(&mut total),
        median(&mut read),
        changed
    );
    Ok(())
}
