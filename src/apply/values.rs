//! Value updates on the running kernel: before anything is loaded, every
//! variable a package sets must still hold its old initial value. One
//! that does not (an administrator changed a sysctl, or the kernel itself
//! wrote it) is refused naming the variable and both values; the module's
//! own callback checks again, atomically, as it writes.

use super::kcore::KernelMemory;
use super::resolve::ResolvedSymbol;
use super::AppliedRecord;
use crate::diff::values::describe_value;
use crate::error::{Error, Refusal};
use crate::package::{Manifest, ValueUpdate};
use anyhow::Result;

/// Refuse the package unless each variable it updates holds the old
/// initial value the package expects; `resolved` gives their addresses,
/// `applied` the updates already live (to name one that set the value).
pub fn check_running_values(
    manifest: &Manifest,
    resolved: &[ResolvedSymbol],
    memory: &dyn KernelMemory,
    applied: &[AppliedRecord],
) -> Result<()> {
    let mut refusals = Vec::new();
    for object in &manifest.objects {
        for update in &object.value_updates {
            let symbol = format!("{} ({})", update.name, update.file);
            let Some(address) = resolved
                .iter()
                .find(|r| r.module_symbol == update.module_symbol)
                .map(|r| r.address)
            else {
                refusals.push(Refusal {
                    symbol,
                    reason: "the package names no address for this variable".into(),
                });
                continue;
            };
            let reason = match memory.read(address, update.old.len()) {
                Ok(running) if running == update.old => continue,
                Ok(running) => format!(
                    "running value {} is not the old initial value {} the update expects (it would set {}); {}",
                    describe_value(&running),
                    describe_value(&update.old),
                    describe_value(&update.new),
                    match setter(applied, update, &running) {
                        Some(name) => format!("live update {name} set it"),
                        None => "it was changed since boot, by an administrator or the kernel".into(),
                    }
                ),
                Err(e) => format!("cannot read its running value: {e:#}"),
            };
            refusals.push(Refusal { symbol, reason });
        }
    }
    crate::error::refuse_any(refusals)
}

/// A variable an applied update set, as `dynamos list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LiveValue {
    pub object: String,
    pub name: String,
    pub file: String,
    /// The values, as `describe_value` shows them.
    pub old: String,
    pub new: String,
}

/// The variables the update of `record` set.
pub fn live_values(record: &super::AppliedRecord) -> Vec<LiveValue> {
    record
        .manifest
        .objects
        .iter()
        .flat_map(|o| {
            o.value_updates.iter().map(|v| LiveValue {
                object: o.object.clone(),
                name: v.name.clone(),
                file: v.file.clone(),
                old: describe_value(&v.old),
                new: describe_value(&v.new),
            })
        })
        .collect()
}

/// The module's pre_patch callback found a variable changed between the
/// check above and its own write (it fails the load with ECANCELED): a
/// refusal like the check's, with nothing loaded.
pub fn refuse_changed_before_write(manifest: &Manifest, load: &std::io::Error) -> Result<()> {
    let names: Vec<String> = manifest
        .objects
        .iter()
        .flat_map(|o| o.value_updates.iter())
        .map(|v| format!("{} ({})", v.name, v.file))
        .collect();
    if names.is_empty() || load.raw_os_error() != Some(libc::ECANCELED) {
        return Ok(());
    }
    Err(Error::refused(
        &manifest.name,
        format!(
            "{} changed while the update was being loaded, before its new value was written; nothing was applied (see dmesg)",
            names.join(", ")
        ),
    )
    .into())
}

/// The applied update that set `update`'s variable to `running`, if any.
fn setter<'a>(
    applied: &'a [AppliedRecord],
    update: &ValueUpdate,
    running: &[u8],
) -> Option<&'a str> {
    applied
        .iter()
        .rev()
        .find(|r| {
            r.manifest.objects.iter().any(|o| {
                o.value_updates
                    .iter()
                    .any(|v| v.name == update.name && v.file == update.file && v.new == running)
            })
        })
        .map(|r| r.manifest.name.as_str())
}

/// A cumulative update retires live updates without running their
/// callbacks: values they set would stay set, and its own updates would
/// find them already changed. Refused until those are reverted first.
pub fn refuse_retiring_value_updates(
    manifest: &Manifest,
    applied: &[AppliedRecord],
    retiring: &[String],
) -> Result<()> {
    let refusals: Vec<Refusal> = super::retired_records(applied, retiring)
        .flat_map(|r| {
            r.manifest.objects.iter().flat_map(move |o| {
                o.value_updates.iter().map(move |v| Refusal {
                    symbol: manifest.name.clone(),
                    reason: format!(
                        "would retire live update {}, which set {} ({}) to {}; a cumulative update cannot take over value updates: revert {} first",
                        r.manifest.name,
                        v.name,
                        v.file,
                        describe_value(&v.new),
                        r.manifest.name
                    ),
                })
            })
        })
        .collect();
    crate::error::refuse_any(refusals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{ObjectUpdate, TargetIdentity};
    use std::collections::HashMap;

    /// Kernel memory as a map of addresses to bytes.
    struct Memory(HashMap<u64, Vec<u8>>);

    impl KernelMemory for Memory {
        fn read(&self, address: u64, len: usize) -> Result<Vec<u8>> {
            match self.0.get(&address) {
                Some(bytes) if bytes.len() == len => Ok(bytes.clone()),
                _ => anyhow::bail!("address {address:#x} is not mapped"),
            }
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "fix".into(),
            module_name: "dynamos_fix".into(),
            tool_version: "0".into(),
            target: TargetIdentity {
                release: "r".into(),
                debian_version: None,
                build_id: None,
            },
            patches: vec![],
            objects: vec![ObjectUpdate {
                object: "vmlinux".into(),
                value_updates: vec![ValueUpdate {
                    name: "lease_break_time".into(),
                    file: "fs/locks.c".into(),
                    module_symbol: "__dynamos_value_0".into(),
                    old: 45i32.to_le_bytes().to_vec(),
                    new: 20i32.to_le_bytes().to_vec(),
                }],
                ..ObjectUpdate::default()
            }],
            replaces: vec![],
            shadows: vec![],
        }
    }

    fn resolved(address: u64) -> Vec<ResolvedSymbol> {
        vec![ResolvedSymbol {
            module_symbol: "__dynamos_value_0".into(),
            name: "lease_break_time".into(),
            object: "vmlinux".into(),
            address,
            bound_at_build: false,
        }]
    }

    #[test]
    fn the_old_initial_value_passes() {
        let memory = Memory(HashMap::from([(0x1000, 45i32.to_le_bytes().to_vec())]));
        check_running_values(&manifest(), &resolved(0x1000), &memory, &[]).unwrap();
    }

    #[test]
    fn a_changed_running_value_is_refused_naming_both_values() {
        let memory = Memory(HashMap::from([(0x1000, 60i32.to_le_bytes().to_vec())]));
        let text = refusal(check_running_values(
            &manifest(),
            &resolved(0x1000),
            &memory,
            &[],
        ));
        assert!(
            text.contains(
                "lease_break_time (fs/locks.c): running value 60 is not the old initial value 45"
            ),
            "{text}"
        );
    }

    /// The message of a refusal (exit 2), which must be one line.
    fn refusal(result: Result<()>) -> String {
        let err = result.unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = format!("{err:#}");
        assert!(!text.contains('\n'), "{text}");
        text
    }

    fn record(name: &str) -> AppliedRecord {
        AppliedRecord::for_test(manifest(), name)
    }

    #[test]
    fn a_value_another_live_update_set_names_that_update() {
        let memory = Memory(HashMap::from([(0x1000, 20i32.to_le_bytes().to_vec())]));
        let err = check_running_values(&manifest(), &resolved(0x1000), &memory, &[record("first")])
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("running value 20 is not the old initial value 45"),
            "{text}"
        );
        assert!(text.contains("live update first set it"), "{text}");
    }

    #[test]
    fn a_cumulative_update_retiring_value_updates_is_refused() {
        let records = [record("first"), record("other")];
        let text = refusal(refuse_retiring_value_updates(
            &manifest(),
            &records,
            &["dynamos_first".into()],
        ));
        assert!(
            text.contains(
                "would retire live update first, which set lease_break_time (fs/locks.c) to 20"
            ),
            "{text}"
        );
        assert!(!text.contains("other"), "{text}");
        refuse_retiring_value_updates(&manifest(), &records, &[]).unwrap();
    }

    #[test]
    fn a_load_the_module_cancelled_is_a_refusal() {
        let cancelled = std::io::Error::from_raw_os_error(libc::ECANCELED);
        let text = refusal(refuse_changed_before_write(&manifest(), &cancelled));
        assert!(
            text.contains(
                "lease_break_time (fs/locks.c) changed while the update was being loaded"
            ),
            "{text}"
        );
        let other = std::io::Error::from_raw_os_error(libc::EPERM);
        refuse_changed_before_write(&manifest(), &other).unwrap();
        let mut without = manifest();
        without.objects[0].value_updates.clear();
        refuse_changed_before_write(&without, &cancelled).unwrap();
    }

    #[test]
    fn unreadable_or_unresolved_variables_are_refused() {
        let memory = Memory(HashMap::new());
        let err = check_running_values(&manifest(), &resolved(0x1000), &memory, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read its running value"));
        let err = check_running_values(&manifest(), &[], &memory, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("names no address"));
    }
}
