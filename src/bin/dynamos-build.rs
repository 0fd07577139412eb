//! `dynamos-build fix.diff [-o FILE]`: compile only what a kernel fix
//! touches and emit one signed live-update package.

use clap::Parser;
use dynamos::cli::build::Args;
use dynamos::error::{exit, exit_code_of, Error, Refusal};
use dynamos::generate::module_signature::ModuleSigningKey;
use dynamos::pipeline::{build_package, BuildReport, BuildRequest};
use dynamos::target::TargetSpec;
use serde::Serialize;
use std::path::PathBuf;

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

/// What `dynamos-build --json` prints: one object, `status` first.
#[derive(Serialize)]
struct BuildSummary {
    /// `written`, `refused`, `no_change` or `error`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    package: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
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
