//! `dynamos`: inspect, verify, apply and revert update packages, try them in
//! a throwaway VM, and run the diff stage alone.

use anyhow::Result;
use clap::{Parser, Subcommand};
use dynamos::error::{exit, exit_code_of};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dynamos",
    version,
    about = "Live updates for a running Linux kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare two builds of one object file function by function.
    Diff {
        original: PathBuf,
        patched: PathBuf,
        /// Print {"changed": [...], "new": [...], "refused": [...]}.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("dynamos: {err:#}");
            exit_code_of(&err)
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Diff {
            original,
            patched,
            json,
        } => diff(&original, &patched, json),
    }
}

fn diff(original: &std::path::Path, patched: &std::path::Path, json: bool) -> Result<i32> {
    let orig = dynamos::diff::ObjectFile::read(original)?;
    let new = dynamos::diff::ObjectFile::read(patched)?;
    let result = dynamos::diff::diff_objects(&orig, &new)?;
    if json {
        let value = serde_json::json!({
            "changed": result.changed(),
            "new": result.new_functions(),
            "refused": result.refused,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for name in result.changed() {
            println!("changed  {name}");
        }
        for name in result.new_functions() {
            println!("new      {name}");
        }
        for r in &result.refused {
            println!("refused  {}: {}", r.symbol, r.reason);
        }
    }
    Ok(if !result.refused.is_empty() {
        exit::REFUSED
    } else if result.functions.is_empty() {
        exit::NO_CHANGE
    } else {
        exit::OK
    })
}
