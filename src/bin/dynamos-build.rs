//! `dynamos-build fix.diff [-o FILE]`: compile only what a kernel fix
//! touches and emit one signed live-update package.

use clap::Parser;
use dynamos::cli::build::Args;
use dynamos::error::{exit, exit_code_of, Error, Refusal};
use dynamos::generate::module_signature::ModuleSigningKey;
use dynamos::multi_target::{self, WorkerOutcome};
use dynamos::pipeline::{build_package, resolve_package_name, BuildReport, BuildRequest};
use dynamos::target::TargetSpec;
use serde::Serialize;
use std::path::PathBuf;

fn main() {
    let args = Args::parse();
    if args.jobs == Some(0) {
        fail("--jobs must be at least 1");
    }
    if args.worker_for.is_none() && args.target.len() > 1 {
        std::process::exit(build_for_targets(&args));
    }
    let (release, output) = match &args.worker_for {
        Some(release) => {
            let builds = multi_target::concurrent_builds(args.jobs, args.target.len());
            dynamos::build::share_cores_among(builds);
            let folder = args.output.clone().unwrap_or_default();
            let file = multi_target::package_file(&folder, &package_name_of(&args), release);
            (Some(release.clone()), Some(file))
        }
        None => (args.target.first().cloned(), args.output),
    };
    let request = BuildRequest {
        patches: args.patches,
        output,
        target: TargetSpec {
            release,
            src: args.src,
            config: args.config,
            symvers: args.symvers,
        },
        signing_key: args.key,
        name: args.name,
        replaces: args.replaces,
        fuzz: args.fuzz,
        replace_unchanged: args.replace_unchanged,
        module_source: args.module_src,
        module_signing_key: args.module_key.map(|key| ModuleSigningKey {
            certificate: args.module_cert.unwrap_or_else(|| key.clone()),
            key,
        }),
    };
    let result = build_package(&request);
    if args.json {
        let (summary, code) = match &result {
            Ok(report) => (BuildSummary::written(report), exit::OK),
            Err(err) => {
                let mut summary = BuildSummary::failed(err);
                // One of several targets: say which, written or not.
                summary.target = args.worker_for.clone();
                summary.notes = dynamos::report::take_notes();
                (summary, exit_code_of(err))
            }
        };
        match serde_json::to_string_pretty(&summary) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("dynamos-build: cannot write JSON: {e}");
                std::process::exit(exit::ERROR);
            }
        }
        std::process::exit(code);
    }
    match result {
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
            for shadow in &report.manifest.shadows {
                println!("shadow   {}", shadow.summary());
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
            // The notes found before the failure may explain it.
            for note in dynamos::report::take_notes() {
                eprintln!("note: {note}");
            }
            eprintln!("dynamos-build: {err:#}");
            std::process::exit(exit_code_of(&err));
        }
    }
}

/// A one-line error before anything was built: exit 1.
fn fail(message: &str) -> ! {
    eprintln!("dynamos-build: {message}");
    std::process::exit(exit::ERROR);
}

/// `--name`, or the first patch's file name; a bad `--name` is exit 1.
fn package_name_of(args: &Args) -> String {
    let Some(first) = args.patches.first() else {
        fail("no patch given");
    };
    resolve_package_name(args.name.as_deref(), first).unwrap_or_else(|e| fail(&format!("{e:#}")))
}

/// A run with several `--target`: every target built by a worker process
/// (this program with `--worker-for`), its lines relayed with the target
/// in front; then one outcome line per target, or one JSON object with an
/// entry per target. Returns the overall exit code.
fn build_for_targets(args: &Args) -> i32 {
    if args.src.is_some() {
        fail("--src is one kernel tree: give --target once with it");
    }
    let name = package_name_of(args);
    // No -o: the current folder, and file names without a folder in front.
    let folder = args.output.clone().unwrap_or_default();
    if !(folder.as_os_str().is_empty() || folder.is_dir()) {
        fail(&format!(
            "{}: with several --target, -o names an existing folder to write NAME-RELEASE.dynpkg in",
            folder.display()
        ));
    }
    if let Err(e) = multi_target::check_targets(&args.target) {
        fail(&format!("{e:#}"));
    }
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => fail(&format!("cannot find this program to run the builds: {e}")),
    };
    // The same command line, told which target is the worker's own.
    let args_for = |release: &str| {
        let mut worker = vec!["--worker-for".into(), release.into()];
        worker.extend(std::env::args_os().skip(1));
        worker
    };
    let started = std::time::Instant::now();
    let at_once = multi_target::concurrent_builds(args.jobs, args.target.len());
    let outcomes = multi_target::run_workers(&program, args_for, &args.target, at_once, args.json);
    let codes: Vec<i32> = outcomes.iter().map(|o| o.code).collect();
    let code = multi_target::overall_exit_code(&codes);
    if args.json {
        let targets: Vec<String> = outcomes.iter().map(worker_summary).collect();
        println!("{}", all_targets_json(status_name(code), &targets));
    } else {
        for outcome in &outcomes {
            let seconds = outcome.wall.as_secs_f64();
            match outcome.code {
                exit::OK => println!(
                    "{}: wrote {} ({seconds:.1} s)",
                    outcome.release,
                    multi_target::package_file(&folder, &name, &outcome.release).display()
                ),
                code => println!(
                    "{}: {} (exit {code}, {seconds:.1} s)",
                    outcome.release,
                    status_name(code).replace('_', " ")
                ),
            }
        }
    }
    if args.timings {
        eprintln!(
            "{:>16}: {:.3} s",
            "all targets",
            started.elapsed().as_secs_f64()
        );
    }
    code
}

/// The `status` word of an exit code, as `--json` names outcomes.
fn status_name(code: i32) -> &'static str {
    match code {
        exit::OK => "written",
        exit::REFUSED => "refused",
        exit::NO_CHANGE => "no_change",
        _ => "error",
    }
}

/// A worker's one-target JSON object as it printed it (keys in their
/// order); a worker that printed none gets an `error` object.
fn worker_summary(outcome: &WorkerOutcome) -> String {
    let printed = outcome.stdout.trim();
    if serde_json::from_str::<serde_json::Value>(printed).is_ok_and(|v| v.is_object()) {
        return printed.to_string();
    }
    let mut summary = BuildSummary::empty("error");
    summary.target = Some(outcome.release.clone());
    summary.message = Some(format!(
        "the build for {} ended without a result (exit {})",
        outcome.release, outcome.code
    ));
    serde_json::to_string_pretty(&summary).unwrap_or_default()
}

/// `{"status": ..., "targets": [...]}`, the targets' objects nested as printed.
fn all_targets_json(status: &str, targets: &[String]) -> String {
    let indent = |object: &String| {
        object
            .lines()
            .map(|line| format!("    {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let targets: Vec<String> = targets.iter().map(indent).collect();
    format!(
        "{{\n  \"status\": \"{status}\",\n  \"targets\": [\n{}\n  ]\n}}",
        targets.join(",\n")
    )
}

/// What `dynamos-build --json` prints: one object, `status` first.
#[derive(Serialize)]
struct BuildSummary {
    /// `written`, `refused`, `no_change` or `error`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    package: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    /// Whether the written package's kernel module is signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    module_signed: Option<bool>,
    replaced: Vec<ReplacedSummary>,
    added: Vec<AddedSummary>,
    value_updates: Vec<String>,
    notes: Vec<String>,
    refused: Vec<Refusal>,
    /// The error, for `error` and `no_change`.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Seconds per pipeline stage, in order.
    timings: Vec<(&'static str, f64)>,
}

#[derive(Serialize)]
struct ReplacedSummary {
    function: String,
    object: String,
    file: String,
    /// The adaptation handler that chooses the version per call, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    handler: Option<String>,
}

#[derive(Serialize)]
struct AddedSummary {
    function: String,
    object: String,
}

impl BuildSummary {
    fn empty(status: &'static str) -> BuildSummary {
        BuildSummary {
            status,
            package: None,
            target: None,
            module_signed: None,
            replaced: Vec::new(),
            added: Vec::new(),
            value_updates: Vec::new(),
            notes: Vec::new(),
            refused: Vec::new(),
            message: None,
            timings: Vec::new(),
        }
    }

    fn written(report: &BuildReport) -> BuildSummary {
        let mut summary = BuildSummary::empty("written");
        summary.package = Some(report.package_path.clone());
        summary.target = Some(report.manifest.target.release.clone());
        summary.module_signed = Some(report.module_signed);
        for object in &report.manifest.objects {
            summary
                .replaced
                .extend(object.replaced.iter().map(|f| ReplacedSummary {
                    function: f.name.clone(),
                    object: object.object.clone(),
                    file: f.file.clone(),
                    handler: f.adaptation.as_ref().map(|a| a.handler.clone()),
                }));
            summary
                .added
                .extend(object.added.iter().map(|f| AddedSummary {
                    function: f.clone(),
                    object: object.object.clone(),
                }));
            summary.value_updates.extend(
                object
                    .value_updates
                    .iter()
                    .map(|v| v.summary(&object.object)),
            );
        }
        summary.notes = report.notes.clone();
        summary.timings = report
            .timings
            .iter()
            .map(|(stage, time)| (*stage, time.as_secs_f64()))
            .collect();
        summary
    }

    fn failed(err: &anyhow::Error) -> BuildSummary {
        let typed = err.chain().find_map(|e| e.downcast_ref::<Error>());
        match typed {
            Some(Error::Refused(refusals)) => {
                let mut summary = BuildSummary::empty("refused");
                summary.refused = refusals.clone();
                summary
            }
            Some(Error::NoChange) => {
                let mut summary = BuildSummary::empty("no_change");
                summary.message = Some(format!("{err:#}"));
                summary
            }
            _ => {
                let mut summary = BuildSummary::empty("error");
                summary.message = Some(format!("{err:#}"));
                summary
            }
        }
    }
}
