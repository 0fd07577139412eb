//! Wall time of `dynamos-build` for a single-function patch with a warm
//! cache, per stage. Target on a 2-core machine: at most 15 s in all, and
//! under 1 s for everything except the two compiles and the module build.
//!
//! Run with `cargo bench --bench build_time`. The first run fills the cache
//! (not measured); then the patch is built `DYNAMOS_BENCH_RUNS` times (3).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bins"])
        .current_dir(root)
        .status()
        .expect("cargo runs");
    assert!(status.success());
    let build = root.join("target/release/dynamos-build");
    let patch = root.join("patches/proc-version-banner.diff");
    let out = std::env::temp_dir().join("dynamos-bench.dynpkg");
    let runs: usize = std::env::var("DYNAMOS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    let run = |label: &str| {
        let start = Instant::now();
        let output = Command::new(&build)
            .arg("--timings")
            .arg(&patch)
            .arg("-o")
            .arg(&out)
            .output()
            .expect("dynamos-build runs");
        let wall = start.elapsed();
        if !output.status.success() {
            panic!(
                "dynamos-build failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!("{label}: {:.2} s wall", wall.as_secs_f64());
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("    {}", line.trim());
        }
        wall.as_secs_f64()
    };

    run("warm-up (fills the cache)");
    let mut times: Vec<f64> = (1..=runs).map(|i| run(&format!("run {i}"))).collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "dynamos-build {} warm cache: median {:.2} s, min {:.2} s, max {:.2} s over {} runs",
        patch.file_name().unwrap().to_string_lossy(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len()
    );
}
