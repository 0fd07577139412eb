//! Shadow members in the running kernel: what each update's module says
//! about its shadows, and the cumulative updates that would retire them.

use super::{AppliedRecord, SystemPaths};
use crate::error::Refusal;
use crate::package::Manifest;
use anyhow::Result;
use std::fs;

/// What a live update's module says about one type's shadows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LiveShadows {
    pub type_name: String,
    /// Shadows allocated and not yet freed.
    pub live: u64,
    /// Writes lost for want of memory.
    pub failed: u64,
}

/// The module's `shadows` parameter: "live failed type" per line.
pub fn live_shadows(paths: &SystemPaths, module: &str) -> Vec<LiveShadows> {
    let path = paths
        .sys_module
        .join(module)
        .join("parameters")
        .join("shadows");
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            Some(LiveShadows {
                live: fields.next()?.parse().ok()?,
                failed: fields.next()?.parse().ok()?,
                type_name: fields.next()?.to_string(),
            })
        })
        .collect()
}

/// A cumulative update has its own shadow ids: the members the retired
/// update keeps in shadow data would read as zero again. Refused until that
/// update is reverted first.
pub fn refuse_retiring_shadows(
    manifest: &Manifest,
    applied: &[AppliedRecord],
    retiring: &[String],
) -> Result<()> {
    let refusals: Vec<Refusal> = super::retired_records(applied, retiring)
        .flat_map(|r| {
            r.manifest.shadows.iter().map(move |t| Refusal {
                symbol: manifest.name.clone(),
                reason: format!(
                    "would retire live update {}, which keeps the members it adds to {} in shadow data; a cumulative update cannot take them over: revert {} first",
                    r.manifest.name, t.type_name, r.manifest.name
                ),
            })
        })
        .collect();
    crate::error::refuse_any(refusals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::ShadowType;

    fn record(name: &str, shadowed: bool) -> AppliedRecord {
        let mut manifest = crate::apply::resolve::tests::manifest();
        if shadowed {
            manifest.shadows = vec![ShadowType {
                index: 0,
                type_name: "struct task_struct".into(),
                file: "include/linux/sched.h".into(),
                members: vec!["int newpid;".into()],
                release_points: vec!["free_task".into()],
            }];
        }
        AppliedRecord::for_test(manifest, name)
    }

    #[test]
    fn a_cumulative_update_retiring_shadows_is_refused() {
        let records = [record("newpid", true), record("plain", false)];
        let next = record("next", false).manifest;
        let err = refuse_retiring_shadows(
            &next,
            &records,
            &["dynamos_newpid".into(), "dynamos_plain".into()],
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("would retire live update newpid, which keeps the members it adds to struct task_struct in shadow data"),
            "{text}"
        );
        assert!(!text.contains("plain"), "{text}");
        refuse_retiring_shadows(&next, &records, &["dynamos_plain".into()]).unwrap();
    }

    #[test]
    fn reads_the_module_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let parameters = dir.path().join("dynamos_x/parameters");
        fs::create_dir_all(&parameters).unwrap();
        fs::write(
            parameters.join("shadows"),
            "6 0 struct task_struct\n2 1 Node\n",
        )
        .unwrap();
        let paths = SystemPaths {
            sys_module: dir.path().to_path_buf(),
            ..SystemPaths::default()
        };
        let live = live_shadows(&paths, "dynamos_x");
        assert_eq!(live.len(), 2);
        assert_eq!((live[0].live, live[0].failed), (6, 0));
        assert_eq!(live[0].type_name, "struct task_struct");
        assert_eq!(live[1].type_name, "Node");
        assert!(live_shadows(&paths, "dynamos_y").is_empty());
    }
}
