//! Adaptively replaced functions on the running kernel: what each
//! dispatcher falls back to, the calls each version served, promotion.
//!
//! A package's module exposes its dispatchers through two parameters:
//! `adaptive` (read: one line per function, `name handler previous-calls
//! new-calls adaptive|promoted`) and `promote` (write a function's name).

use super::resolve::Ksym;
use super::{AppliedRecord, SystemPaths};
use crate::package::Manifest;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::fs;

/// What a package's dispatcher of one function runs on a false choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// Address passed in the module's `previous` parameter; 0 for the
    /// package's own clone of the original.
    pub address: u64,
    /// The earlier update whose version that is.
    pub package_module: Option<String>,
}

/// For each adaptive function of `manifest`, in table order: the newest
/// live earlier update that replaces the same function, whose version ran
/// before this one. A cumulative update retires them all, so it falls back
/// to its own clone of the original.
pub fn fallbacks(
    manifest: &Manifest,
    records: &[AppliedRecord],
    live: &[String],
    kallsyms: &[Ksym],
) -> Result<Vec<Fallback>> {
    let earlier = live_newest_first(records, live);
    let mut out = Vec::new();
    for object in &manifest.objects {
        for f in object.replaced.iter().filter(|f| f.adaptation.is_some()) {
            if !manifest.replaces.is_empty() {
                out.push(Fallback {
                    address: 0,
                    package_module: None,
                });
                continue;
            }
            let previous = earlier.iter().find_map(|r| {
                r.manifest
                    .objects
                    .iter()
                    .filter(|o| o.object == object.object)
                    .flat_map(|o| &o.replaced)
                    .find(|g| g.name == f.name && g.file == f.file)
                    .map(|g| (r, g))
            });
            let Some((record, version)) = previous else {
                out.push(Fallback {
                    address: 0,
                    package_module: None,
                });
                continue;
            };
            let module = &record.manifest.module_name;
            let address = kallsyms
                .iter()
                .find(|k| k.name == version.new_symbol && k.module.as_deref() == Some(module))
                .map(|k| k.address)
                .ok_or_else(|| {
                    anyhow!(
                        "cannot find {} of live update {module} in kallsyms: the dispatcher of {} would have nothing to fall back to",
                        version.new_symbol,
                        f.name
                    )
                })?;
            out.push(Fallback {
                address,
                package_module: Some(module.clone()),
            });
        }
    }
    Ok(out)
}

/// The records of the updates still registered with the kernel, the most
/// recently applied (the top of the livepatch stack) first.
fn live_newest_first<'a>(records: &'a [AppliedRecord], live: &[String]) -> Vec<&'a AppliedRecord> {
    let mut found: Vec<&AppliedRecord> = records
        .iter()
        .filter(|r| live.contains(&r.manifest.module_name))
        .collect();
    found.sort_by_key(|r| std::cmp::Reverse(r.applied_at_ns));
    found
}

/// The module parameter naming what each dispatcher falls back to; empty
/// when every one falls back to the package's own clone.
pub fn previous_param(fallbacks: &[Fallback]) -> String {
    if fallbacks.iter().all(|f| f.address == 0) {
        return String::new();
    }
    let list: Vec<String> = fallbacks
        .iter()
        .map(|f| format!("{:#x}", f.address))
        .collect();
    format!("previous={}", list.join(","))
}

/// Calls one adaptive function's versions served since the update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedCalls {
    pub function: String,
    pub handler: String,
    /// Calls the version that ran before the update served.
    pub previous: u64,
    /// Calls the new version served.
    pub new: u64,
    pub promoted: bool,
}

/// What a live update's module says about its adaptive functions; empty
/// for a module without any.
pub fn served_calls(paths: &SystemPaths, module: &str) -> Vec<ServedCalls> {
    let path = paths
        .sys_module
        .join(module)
        .join("parameters")
        .join("adaptive");
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines().filter_map(parse_served_line).collect()
}

fn parse_served_line(line: &str) -> Option<ServedCalls> {
    let mut fields = line.split_whitespace();
    let (function, handler, previous, new, state) = (
        fields.next()?,
        fields.next()?,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
        fields.next()?,
    );
    Some(ServedCalls {
        function: function.to_string(),
        handler: handler.to_string(),
        previous,
        new,
        promoted: state == "promoted",
    })
}

/// Make the new version of `function` serve every call, in the newest live
/// update that dispatches it (the one whose dispatcher runs). Returns that
/// update's module name.
pub fn promote(paths: &SystemPaths, function: &str) -> Result<String> {
    let _lock = super::lock(paths)?;
    let records = super::read_records(paths)?;
    let live = super::live_patch_names(paths)?;
    for record in live_newest_first(&records, &live) {
        let module = &record.manifest.module_name;
        if !served_calls(paths, module)
            .iter()
            .any(|s| s.function == function)
        {
            continue;
        }
        let param = paths
            .sys_module
            .join(module)
            .join("parameters")
            .join("promote");
        fs::write(&param, function).with_context(|| format!("cannot write {}", param.display()))?;
        return Ok(module.clone());
    }
    Err(anyhow!(
        "no applied update has an adaptation handler for {function} (see dynamos list)"
    ))
}

/// Live updates whose dispatchers fall back to `module`'s versions: it
/// cannot be reverted before them.
pub fn dependents<'a>(records: &'a [AppliedRecord], module: &str) -> Vec<&'a str> {
    records
        .iter()
        .filter(|r| r.falls_back_to.iter().any(|m| m == module))
        .map(|r| r.manifest.module_name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_lines_are_read_field_by_field() {
        assert_eq!(
            parse_served_line("version_proc_show version_for_head 30 12 adaptive"),
            Some(ServedCalls {
                function: "version_proc_show".into(),
                handler: "version_for_head".into(),
                previous: 30,
                new: 12,
                promoted: false,
            })
        );
        assert!(parse_served_line("version_proc_show x 1 2 promoted").is_some_and(|s| s.promoted));
        assert_eq!(parse_served_line("garbage"), None);
    }

    #[test]
    fn no_earlier_version_means_no_parameter() {
        let own = Fallback {
            address: 0,
            package_module: None,
        };
        assert_eq!(previous_param(std::slice::from_ref(&own)), "");
        let earlier = Fallback {
            address: 0xffffffffc0001000,
            package_module: Some("dynamos_a".into()),
        };
        assert_eq!(
            previous_param(&[own, earlier]),
            "previous=0x0,0xffffffffc0001000"
        );
    }
}
