//! Value updates on the running kernel: before anything is loaded, every
//! variable a package sets must still hold its old initial value. One
//! that does not (an administrator changed a sysctl, or the kernel itself
//! wrote it) is refused naming the variable and both values; the module's
//! own callback checks again, atomically, as it writes.

use super::kcore::KernelMemory;
use super::resolve::ResolvedSymbol;
use crate::diff::values::describe_value;
use crate::error::{Error, Refusal};
use crate::package::Manifest;
use anyhow::Result;

/// Refuse the package unless each variable it updates holds the old
/// initial value the package expects; `resolved` gives their addresses.
pub fn check_running_values(
    manifest: &Manifest,
    resolved: &[ResolvedSymbol],
    memory: &dyn KernelMemory,
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
                    "running value {} is not the old initial value {} the update expects (it would set {}); it was changed since boot, by an administrator or the kernel",
                    describe_value(&running),
                    describe_value(&update.old),
                    describe_value(&update.new)
                ),
                Err(e) => format!("cannot read its running value: {e:#}"),
            };
            refusals.push(Refusal { symbol, reason });
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(refusals).into())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{ObjectUpdate, TargetIdentity, ValueUpdate};
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
        }
    }

    fn resolved(address: u64) -> Vec<ResolvedSymbol> {
        vec![ResolvedSymbol {
            module_symbol: "__dynamos_value_0".into(),
            name: "lease_break_time".into(),
            object: "vmlinux".into(),
            address,
        }]
    }

    #[test]
    fn the_old_initial_value_passes() {
        let memory = Memory(HashMap::from([(0x1000, 45i32.to_le_bytes().to_vec())]));
        check_running_values(&manifest(), &resolved(0x1000), &memory).unwrap();
    }

    #[test]
    fn a_changed_running_value_is_refused_naming_both_values() {
        let memory = Memory(HashMap::from([(0x1000, 60i32.to_le_bytes().to_vec())]));
        let err = check_running_values(&manifest(), &resolved(0x1000), &memory).unwrap_err();
        assert_eq!(
            crate::error::exit_code_of(&err),
            crate::error::exit::REFUSED
        );
        let text = format!("{err:#}");
        assert!(
            text.contains(
                "lease_break_time (fs/locks.c): running value 60 is not the old initial value 45"
            ),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn unreadable_or_unresolved_variables_are_refused() {
        let memory = Memory(HashMap::new());
        let err = check_running_values(&manifest(), &resolved(0x1000), &memory).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read its running value"));
        let err = check_running_values(&manifest(), &[], &memory).unwrap_err();
        assert!(format!("{err:#}").contains("names no address"));
    }
}
