//! `dynamos`: make keys; inspect, verify, apply and revert update packages;
//! try them in a throwaway VM; run the diff stage alone.

use anyhow::Result;
use clap::Parser;
use dynamos::apply::{self, installed, ApplyOptions};
use dynamos::cli::dynamos::{Cli, Command, TrustArgs};
use dynamos::diff::values::describe_value;
use dynamos::error::{exit, exit_code_of};
use dynamos::package::{self, keys};
use std::path::Path;
use std::time::Duration;

fn main() {
    // `dynamos list | head -1`: end quietly when the reader goes away, as
    // Unix tools do, instead of panicking on a failed print.
    // SAFETY: called before any other thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = run(cli);
    for note in dynamos::report::take_notes() {
        eprintln!("dynamos: note: {note}");
    }
    let code = match result {
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
        Command::Keygen { dir, force } => {
            let (secret, public) = keys::keygen(dir.as_deref(), force)?;
            println!("wrote {} and {}", secret.display(), public.display());
            Ok(exit::OK)
        }
        Command::Inspect {
            package,
            json,
            save_module,
        } => inspect(&package, json, save_module.as_deref()),
        Command::Verify { package, trust } => {
            let bytes = package::read_file(&package)?;
            let pkg = package::read_verified(&bytes, &trusted_keys(&trust)?)?;
            println!(
                "{}: good signature, package {}",
                package.display(),
                pkg.manifest.name
            );
            Ok(exit::OK)
        }
        Command::Apply {
            package,
            trust,
            timeout,
            json,
        } => {
            let opts = ApplyOptions {
                extra_trust: trust.trust,
                transition_timeout: Duration::from_secs(timeout),
                ..ApplyOptions::default()
            };
            if json {
                return print_json(apply::apply(&package, &opts).map(|a| applied_json(&a)));
            }
            let applied = apply::apply(&package, &opts)?;
            for object in &applied.manifest.objects {
                for v in &object.value_updates {
                    println!(
                        "value    {} = {} (was {})",
                        v.name,
                        describe_value(&v.new),
                        describe_value(&v.old)
                    );
                }
                let later = applied.not_loaded.contains(&object.object);
                for f in &object.replaced {
                    if later {
                        println!(
                            "pending  {} ({}: patched when it loads)",
                            f.name, object.object
                        );
                    } else {
                        println!("live     {} ({})", f.name, object.object);
                    }
                }
            }
            for module in &applied.retired {
                println!("retired  {module}");
            }
            for t in &applied.restarted {
                println!(
                    "restarted {} (pid {}) as pid {}, running the new {}{}",
                    t.comm,
                    t.old_pid,
                    t.new_pid,
                    t.function,
                    carried_suffix(&t.carried)
                );
            }
            if let Some(phases) = &applied.synchronized {
                println!(
                    "synchronized: original code inactive after {:.1} s; {} sleeping task(s) moved to the new code, complete {:.1} s later",
                    phases.original_inactive.as_secs_f64(),
                    phases.tasks_moved,
                    phases.moved.as_secs_f64()
                );
                for task in &phases.left_in_original {
                    eprintln!("dynamos: warning: still in the original function, finishing its call in the old code: {task}");
                }
                for task in &phases.left_in_old_code {
                    eprintln!("dynamos: warning: still in the clone's original code, finishing its call there: {task}");
                }
            }
            println!(
                "applied {} in {:.1} s (running code verified: {} functions)",
                applied.manifest.name,
                applied.transition.as_secs_f64(),
                applied.verified_functions
            );
            for problem in &applied.retire_problems {
                eprintln!("dynamos: warning: retiring a superseded update: {problem}");
            }
            Ok(exit::OK)
        }
        Command::Revert {
            name,
            all,
            timeout,
            json,
        } => {
            let name = if all { None } else { name.as_deref() };
            if json {
                return print_json(apply::revert(name, Duration::from_secs(timeout)).map(
                    |reverted| serde_json::json!({ "status": "reverted", "reverted": reverted }),
                ));
            }
            for reverted in apply::revert(name, Duration::from_secs(timeout))? {
                println!("reverted {reverted}");
            }
            Ok(exit::OK)
        }
        Command::Install {
            package,
            trust,
            json,
        } => {
            let opts = ApplyOptions {
                extra_trust: trust.trust,
                ..ApplyOptions::default()
            };
            let done = installed::install(&package, &opts);
            let code = |change| match change {
                installed::InstallChange::Unchanged => exit::NO_CHANGE,
                _ => exit::OK,
            };
            if json {
                let change = done.as_ref().ok().map(|i| i.change);
                let printed = print_json(done)?;
                return Ok(change.map_or(printed, code));
            }
            let done = done?;
            let (name, release, path) = (&done.name, &done.release, done.path.display());
            match done.change {
                installed::InstallChange::Installed => println!(
                    "installed {name} for {release} ({path}); it is applied at every boot of that kernel"
                ),
                installed::InstallChange::Replaced => println!(
                    "replaced the installed {name} for {release} with this package ({path})"
                ),
                installed::InstallChange::Unchanged => {
                    println!("{name} is already installed for {release} ({path})")
                }
            }
            Ok(code(done.change))
        }
        Command::Uninstall {
            name,
            release,
            json,
        } => {
            let done =
                installed::uninstall(&apply::SystemPaths::default(), &name, release.as_deref());
            if json {
                return print_json(done);
            }
            let done = done?;
            for release in &done.releases {
                println!("uninstalled {name} for {release}");
            }
            if done.still_applied {
                println!("{name} stays applied until `dynamos revert {name}`");
            }
            Ok(exit::OK)
        }
        Command::Unhold { name, json } => {
            let done = installed::unhold(&apply::SystemPaths::default(), &name);
            if json {
                return print_json(done);
            }
            for release in done?.releases {
                println!("{name} for {release} is applied again at boot");
            }
            Ok(exit::OK)
        }
        Command::Boot {
            confirm,
            grace,
            timeout,
            json,
        } => boot(
            confirm.then(|| Duration::from_secs(grace)),
            Duration::from_secs(timeout),
            json,
        ),
        Command::Deb {
            package,
            output,
            version,
            maintainer,
        } => {
            let deb = dynamos::deb::wrap(
                &package,
                &dynamos::deb::DebOptions {
                    version,
                    maintainer,
                    output,
                },
            )?;
            println!(
                "wrote {} ({}, depends on {})",
                deb.path.display(),
                deb.name,
                deb.depends
            );
            Ok(exit::OK)
        }
        Command::PackageTool {
            binaries,
            output,
            maintainer,
        } => {
            let deb = dynamos::deb::wrap_tool(&binaries, &output, &maintainer)?;
            println!("wrote {} (depends on {})", deb.path.display(), deb.depends);
            Ok(exit::OK)
        }
        Command::Promote { function } => {
            let module = apply::adaptive::promote(&apply::SystemPaths::default(), &function)?;
            println!("promoted {function} in {module}: the new version serves every call");
            Ok(exit::OK)
        }
        Command::List { json } => {
            let updates = apply::list()?;
            let installed = installed::installed_at(&apply::SystemPaths::default())?;
            if json {
                let value = serde_json::json!({ "live": updates, "installed": installed });
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(exit::OK);
            }
            print_installed(&installed);
            if updates.is_empty() {
                println!("no live updates");
            } else {
                for u in &updates {
                    let state = match (u.in_kernel, u.enabled, u.transition) {
                        (false, _, _) => "gone",
                        (true, true, true) => "enabling",
                        (true, false, true) => "disabling",
                        (true, true, false) => "enabled",
                        (true, false, false) => "disabled",
                    };
                    println!(
                        "{}  {}  {}",
                        u.package.as_deref().unwrap_or("-"),
                        u.name,
                        state
                    );
                    for o in &u.objects {
                        for f in &o.functions {
                            match u.adaptive.iter().find(|a| a.function == f.name) {
                                Some(a) => println!(
                                    "    {}: {}  {} by {}: {} calls previous version, {} new",
                                    o.object,
                                    f.name,
                                    if a.promoted { "promoted" } else { "chosen" },
                                    a.handler,
                                    a.previous,
                                    a.new
                                ),
                                None => println!("    {}: {}", o.object, f.name),
                            }
                        }
                    }
                    for v in &u.value_updates {
                        println!("    {}: {} = {} (was {})", v.object, v.name, v.new, v.old);
                    }
                    for shadow in &u.shadows {
                        println!(
                            "    shadows of {}: {} live{}",
                            shadow.type_name,
                            shadow.live,
                            if shadow.failed > 0 {
                                format!(", {} writes lost for want of memory", shadow.failed)
                            } else {
                                String::new()
                            }
                        );
                    }
                    for t in &u.restarted {
                        println!(
                            "    thread {}: restarted into the new {}, pid {} (was {}){}",
                            t.comm,
                            t.function,
                            t.new_pid,
                            t.old_pid,
                            carried_suffix(&t.carried)
                        );
                    }
                    if let Some(sync) = &u.synchronized {
                        for f in &sync.functions {
                            println!(
                                "    synchronized {}: {}; tasks in its original code {}, new code {}; moved at sleep points: {} to the new code, {} back",
                                f.name,
                                sync.describe_phase(),
                                f.in_original,
                                f.in_patched,
                                f.moved_to_patched,
                                f.moved_to_original
                            );
                        }
                        for t in &u.synchronized_tasks {
                            println!("      {t}");
                        }
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Vm {
            kernel,
            packages,
            trust,
            timeout,
            memory,
            modules,
            icount,
            disk,
            kernel_arguments,
            command,
        } => {
            // The local signing key is trusted in the guest: that is what
            // makes `dynamos vm` the place to try freshly built packages.
            let mut trusted_keys = trust;
            let own = keys::default_dir().join(keys::PUBLIC_FILE);
            if own.is_file() {
                trusted_keys.push(own);
            }
            let outcome = dynamos::vm::run(&dynamos::vm::VmOptions {
                kernel,
                packages,
                trusted_keys,
                command: command.join(" "),
                timeout: Duration::from_secs(timeout),
                memory_mb: memory,
                modules,
                instruction_clock_shift: icount,
                disk,
                kernel_arguments,
                ..Default::default()
            })?;
            print!("{}", outcome.output);
            Ok(outcome.exit_code)
        }
        Command::Diff {
            original,
            patched,
            json,
        } => diff(&original, &patched, json),
    }
}

fn trusted_keys(trust: &TrustArgs) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    let mut keys_found = keys::load_trusted_dir(Path::new(apply::DEFAULT_TRUSTED_DIR))?;
    for path in &trust.trust {
        keys_found.push(keys::load_public_key(path)?);
    }
    Ok(keys_found)
}

fn inspect(path: &Path, json: bool, save_module: Option<&Path>) -> Result<i32> {
    let bytes = package::read_file(path)?;
    let (pkg, key_id) = package::read_unverified(&bytes)?;
    if let Some(out) = save_module {
        dynamos::cache::write_atomic(out, &pkg.module)?;
    }
    let value = package::inspect_json(&pkg, &key_id);
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(exit::OK);
    }
    let m = &pkg.manifest;
    println!("package  {}", m.name);
    println!("target   {}", m.target.release);
    let module_signature = if dynamos::apply::is_signed(&pkg.module) {
        ", signed for the kernel's module loader"
    } else {
        ""
    };
    println!(
        "module   {} ({} bytes{module_signature})",
        m.module_name,
        pkg.module.len()
    );
    println!("signed   key {key_id}");
    for replaced in &m.replaces {
        println!("replaces {replaced} (cumulative)");
    }
    for object in &m.objects {
        for f in &object.replaced {
            match &f.adaptation {
                Some(a) => println!(
                    "replace  {} ({}, {}) chosen by {}",
                    f.name, object.object, f.file, a.handler
                ),
                None => println!("replace  {} ({}, {})", f.name, object.object, f.file),
            }
            if let Some(t) = &f.kthread {
                println!(
                    "thread   {} is the main function of kernel threads started by {}",
                    f.name,
                    t.started_by.join(", ")
                );
                if let Some(restart) = &f.restart {
                    let carries = match &restart.state {
                        Some(state) if !state.restored.is_empty() || state.transfer.is_some() => {
                            let mut what = state.restored.join(", ");
                            if let Some(t) = &state.transfer {
                                if !what.is_empty() {
                                    what.push_str(", ");
                                }
                                what.push_str(&format!("what {t} sets"));
                            }
                            format!(", carrying {what}")
                        }
                        _ => String::new(),
                    };
                    println!(
                        "restart  {}: its threads restart into the new version{carries}",
                        f.name
                    );
                }
            }
            if let Some(sync) = &f.synchronized {
                for point in &sync.sleep_points {
                    println!("sleep    {}: sleepers move at {point}", f.name);
                }
                if let Some(handler) = &sync.handler {
                    println!("sleep    {}: {handler} chooses who moves", f.name);
                }
            }
        }
        for f in &object.added {
            println!("add      {} ({})", f, object.object);
        }
        for v in &object.value_updates {
            println!("value    {}", v.summary(&object.object));
        }
    }
    for shadow in &m.shadows {
        println!("shadow   {}", shadow.summary());
    }
    Ok(exit::OK)
}

fn diff(original: &Path, patched: &Path, json: bool) -> Result<i32> {
    let orig = dynamos::diff::ObjectFile::read(original)?;
    let new = dynamos::diff::ObjectFile::read(patched)?;
    let result = dynamos::diff::diff_objects(&orig, &new)?;
    if json {
        let value = serde_json::json!({
            "changed": result.changed(),
            "new": result.new_functions(),
            "value_updates": result.value_updates,
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
        for v in &result.value_updates {
            println!(
                "value    {}: {} -> {}",
                v.name,
                describe_value(&v.old),
                describe_value(&v.new)
            );
        }
        for r in &result.refused {
            println!("refused  {}: {}", r.symbol, r.reason);
        }
    }
    Ok(if !result.refused.is_empty() {
        exit::REFUSED
    } else if result.functions.is_empty() && result.value_updates.is_empty() {
        exit::NO_CHANGE
    } else {
        exit::OK
    })
}

/// `--json` output of a command: its result, or on failure
/// `{status: refused|error, message, refused}`, with the usual exit code.
fn print_json<T: serde::Serialize>(result: Result<T>) -> Result<i32> {
    let (value, code) = match result {
        // Through a `Value`, so every command's keys come out sorted alike.
        Ok(done) => (serde_json::to_value(done)?, exit::OK),
        Err(err) => {
            let refused = err
                .chain()
                .find_map(|e| e.downcast_ref::<dynamos::error::Error>())
                .and_then(|e| match e {
                    dynamos::error::Error::Refused(r) => Some(r.clone()),
                    _ => None,
                });
            let status = if refused.is_some() {
                "refused"
            } else {
                "error"
            };
            let value = serde_json::json!({
                "status": status,
                "message": format!("{err:#}"),
                "refused": refused.unwrap_or_default(),
            });
            (value, exit_code_of(&err))
        }
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(code)
}

/// What `dynamos apply --json` prints for an applied package.
fn applied_json(applied: &apply::AppliedPackage) -> serde_json::Value {
    let mut live = Vec::new();
    let mut pending = Vec::new();
    let mut values = Vec::new();
    for object in &applied.manifest.objects {
        let later = applied.not_loaded.contains(&object.object);
        for f in &object.replaced {
            let entry = serde_json::json!({ "function": f.name, "object": object.object });
            if later {
                pending.push(entry);
            } else {
                live.push(entry);
            }
        }
        values.extend(
            object
                .value_updates
                .iter()
                .map(|v| v.summary(&object.object)),
        );
    }
    serde_json::json!({
        "status": "applied",
        "package": applied.manifest.name,
        "module": applied.manifest.module_name,
        "live": live,
        "pending": pending,
        "value_updates": values,
        "retired": applied.retired,
        "retire_problems": applied.retire_problems,
        "transition_seconds": applied.transition.as_secs_f64(),
        "verified_functions": applied.verified_functions,
        "synchronized": applied.synchronized,
        "restarted": applied.restarted,
    })
}

/// The installed packages, one line each, before the live updates.
fn print_installed(packages: &[installed::InstalledPackage]) {
    for p in packages {
        let state = match (&p.record.held, &p.record.last) {
            (Some(reason), _) => format!("held: {reason}"),
            (None, None) => "not yet applied at boot".to_string(),
            (None, Some(last)) => format!(
                "boot apply {} ({})",
                match last.stage {
                    installed::BootStage::Started => "started",
                    installed::BootStage::Applied => "done, boot not yet confirmed",
                    installed::BootStage::Confirmed => "done and confirmed",
                    installed::BootStage::Failed => "failed",
                },
                installed::describe_time(last.at)
            ),
        };
        println!("installed {}  {}  #{}  {state}", p.name, p.release, p.order);
    }
}

/// `dynamos boot`: apply the installed packages, or confirm this boot.
/// Exits 0 when every installed package for this kernel is live (or
/// superseded), 1 when one failed or is held.
fn boot(confirm: Option<Duration>, timeout: Duration, json: bool) -> Result<i32> {
    let opts = ApplyOptions {
        transition_timeout: timeout,
        ..ApplyOptions::default()
    };
    if let Some(grace) = confirm {
        let confirmed = installed::confirm(&opts.paths, grace);
        if json {
            return print_json(
                confirmed
                    .map(|names| serde_json::json!({ "status": "confirmed", "confirmed": names })),
            );
        }
        for name in confirmed? {
            println!("confirmed {name}: this boot survived its apply");
        }
        return Ok(exit::OK);
    }
    if installed::boot_disabled(&opts.paths)? {
        if json {
            println!(
                "{}",
                serde_json::json!({ "status": "disabled", "packages": [] })
            );
        } else {
            println!("dynamos.enable=0 on the kernel command line: no installed package applied");
        }
        return Ok(exit::OK);
    }
    let results = installed::boot(&opts);
    let code = match &results {
        Ok(results) if results.iter().all(|r| r.outcome.is_fine()) => exit::OK,
        _ => exit::ERROR,
    };
    if json {
        let code_json =
            print_json(results.map(|r| serde_json::json!({ "status": "booted", "packages": r })))?;
        return Ok(code_json.max(code));
    }
    let results = results?;
    if results.is_empty() {
        println!("no package is installed for this kernel");
    }
    for r in results {
        match &r.outcome {
            installed::BootOutcome::Applied => println!("applied  {}", r.name),
            installed::BootOutcome::AlreadyLive => println!("live     {} (already)", r.name),
            installed::BootOutcome::Superseded { by } => {
                println!("skipped  {} (superseded by {by})", r.name)
            }
            installed::BootOutcome::Held { reason } => eprintln!(
                "dynamos: held {}: {reason}; `dynamos unhold {}` lets it be applied again",
                r.name, r.name
            ),
            installed::BootOutcome::Failed { message } => {
                eprintln!("dynamos: failed {}: {message}", r.name)
            }
        }
    }
    Ok(code)
}

/// `, carrying a, b` for a restarted thread's carried locals.
fn carried_suffix(carried: &[String]) -> String {
    if carried.is_empty() {
        String::new()
    } else {
        format!(", carrying {}", carried.join(", "))
    }
}
