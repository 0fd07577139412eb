//! `dynamos-build fix.diff [-o FILE]`: compile only what a kernel fix
//! touches and emit one signed live-update package.

use clap::Parser;
use dynamos::error::exit_code_of;
use dynamos::pipeline::{build_package, BuildRequest};
use dynamos::target::TargetSpec;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dynamos-build",
    version,
    about = "Build a signed live-update package from kernel patches"
)]
struct Args {
    /// Unified diffs against the kernel tree (applied with -p1, in order).
    #[arg(required = true)]
    patches: Vec<PathBuf>,
    /// Package file to write (default: NAME.dynpkg from the first patch).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Debian kernel build to target, e.g. 6.1.0-57-amd64 (the default).
    #[arg(long)]
    target: Option<String>,
    /// Your own kernel source tree (used read-only), with --config.
    #[arg(long, requires = "config")]
    src: Option<PathBuf>,
    /// Kernel config for --src.
    #[arg(long, requires = "src")]
    config: Option<PathBuf>,
    /// Module.symvers of the kernel built from --src (needed with CONFIG_MODVERSIONS).
    #[arg(long, requires = "src")]
    symvers: Option<PathBuf>,
    /// Secret key to sign with (default: the one `dynamos keygen` wrote).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Package name (default: the first patch's file name without .diff).
    #[arg(long)]
    name: Option<String>,
    /// Make a cumulative update superseding this earlier package; repeat for
    /// several. Applying it replaces every applied update atomically.
    #[arg(long, value_name = "PACKAGE")]
    replaces: Vec<String>,
    /// Let a hunk land ignoring up to N context lines at its start and end
    /// (as `patch --fuzz N`); each such hunk is noted.
    #[arg(long, value_name = "N", default_value_t = 0)]
    fuzz: usize,
    /// Replace FUNCTION even if the patches leave its code unchanged (an
    /// identity update, e.g. to measure the redirect's cost); repeatable.
    /// FUNCTION must be in a file the patches touch and have an ftrace entry.
    #[arg(long, value_name = "FUNCTION")]
    replace_unchanged: Vec<String>,
    /// Print how long each stage took.
    #[arg(long)]
    timings: bool,
}

fn main() {
    let args = Args::parse();
    let request = BuildRequest {
        patches: args.patches,
        output: args.output,
        target: TargetSpec {
            release: args.target,
            src: args.src,
            config: args.config,
            symvers: args.symvers,
        },
        signing_key: args.key,
        name: args.name,
        replaces: args.replaces,
        fuzz: args.fuzz,
        replace_unchanged: args.replace_unchanged,
    };
    match build_package(&request) {
        Ok(report) => {
            for object in &report.manifest.objects {
                for f in &object.replaced {
                    match &f.adaptation {
                        Some(a) => println!(
                            "replace  {} ({}, {}) chosen by {}",
                            f.name, object.object, f.file, a.handler
                        ),
                        None => println!("replace  {} ({}, {})", f.name, object.object, f.file),
                    }
                }
                for f in &object.added {
                    println!("add      {} ({})", f, object.object);
                }
                for v in &object.value_updates {
                    println!("value    {}", v.summary(&object.object));
                }
            }
            for note in &report.notes {
                println!("note: {note}");
            }
            println!(
                "wrote {} for {}",
                report.package_path.display(),
                report.manifest.target.release
            );
            if args.timings {
                for (stage, time) in &report.timings {
                    eprintln!("{stage:>16}: {:.3} s", time.as_secs_f64());
                }
            }
        }
        Err(err) => {
            eprintln!("dynamos-build: {err:#}");
            std::process::exit(exit_code_of(&err));
        }
    }
}
