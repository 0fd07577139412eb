//! `dynamos list`: every livepatch of the running kernel with what its
//! module and dynamos's records say about it.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveFunction {
    pub name: String,
    pub sympos: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveObject {
    /// `vmlinux` or a module name.
    pub object: String,
    /// Whether the object's functions are redirected now (a module object
    /// is patched only while that module is loaded); unknown on old kernels.
    pub patched: Option<bool>,
    pub functions: Vec<LiveFunction>,
}

/// One live update known to the kernel or to dynamos.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveUpdate {
    /// Livepatch (and module) name.
    pub name: String,
    /// Package name, for updates applied by dynamos.
    pub package: Option<String>,
    /// Registered in /sys/kernel/livepatch; false for a dynamos record whose
    /// livepatch is gone (for instance replaced by a cumulative one).
    pub in_kernel: bool,
    pub enabled: bool,
    pub transition: bool,
    pub objects: Vec<LiveObject>,
    /// Calls each version of an adaptive function served since apply.
    pub adaptive: Vec<adaptive::ServedCalls>,
    /// Variables the update set to a new initial value (from its record).
    pub value_updates: Vec<values::LiveValue>,
    /// Phase and counters of the synchronized functions, if any.
    pub synchronized: Option<synchronized::Status>,
    /// Tasks in the transitional clones or the originals they replace.
    pub synchronized_tasks: Vec<String>,
    /// Kernel threads restarted into the new version (from its record).
    pub restarted: Vec<kthreads::RestartedThread>,
    /// Shadow objects alive per type with added members.
    pub shadows: Vec<shadows::LiveShadows>,
}

/// Every livepatch of the running kernel, and every dynamos update recorded.
pub fn list() -> Result<Vec<LiveUpdate>> {
    list_at(&SystemPaths::default())
}

pub fn list_at(paths: &SystemPaths) -> Result<Vec<LiveUpdate>> {
    let records = read_records(paths)?;
    let mut out = Vec::new();
    let names = live_patch_names(paths)?;
    for name in &names {
        let dir = paths.livepatch.join(name);
        let record = records.iter().find(|r| &r.manifest.module_name == name);
        let mut objects = sysfs_objects(&dir);
        if objects.is_empty() {
            if let Some(r) = record {
                objects = record_objects(r);
            }
        }
        out.push(LiveUpdate {
            name: name.clone(),
            package: record.map(|r| r.manifest.name.clone()),
            in_kernel: true,
            enabled: read_trimmed(&dir.join("enabled")).as_deref() == Some("1"),
            transition: read_trimmed(&dir.join("transition")).as_deref() == Some("1"),
            objects,
            adaptive: adaptive::served_calls(paths, name),
            value_updates: record.map(values::live_values).unwrap_or_default(),
            synchronized: synchronized::status(paths, name).filter(|s| !s.functions.is_empty()),
            synchronized_tasks: record
                .map(|r| synchronized::tasks(paths, &r.manifest, name))
                .unwrap_or_default(),
            restarted: record.map(|r| r.restarted.clone()).unwrap_or_default(),
            shadows: shadows::live_shadows(paths, name),
        });
    }
    for r in &records {
        if !names.contains(&r.manifest.module_name) {
            out.push(LiveUpdate {
                name: r.manifest.module_name.clone(),
                package: Some(r.manifest.name.clone()),
                in_kernel: false,
                enabled: false,
                transition: false,
                objects: record_objects(r),
                adaptive: Vec::new(),
                value_updates: values::live_values(r),
                synchronized: None,
                synchronized_tasks: Vec::new(),
                restarted: r.restarted.clone(),
                shadows: Vec::new(),
            });
        }
    }
    Ok(out)
}

pub(super) fn sysfs_objects(patch_dir: &Path) -> Vec<LiveObject> {
    let mut objects = Vec::new();
    let Ok(entries) = fs::read_dir(patch_dir) else {
        return objects;
    };
    for obj in entries.flatten().filter(|e| e.path().is_dir()) {
        let mut functions: Vec<LiveFunction> = fs::read_dir(obj.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let dir = e.file_name().to_string_lossy().into_owned();
                match dir.rsplit_once(',') {
                    Some((n, pos)) => LiveFunction {
                        name: n.to_string(),
                        sympos: pos.parse().ok(),
                    },
                    None => LiveFunction {
                        name: dir,
                        sympos: None,
                    },
                }
            })
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        objects.push(LiveObject {
            object: obj.file_name().to_string_lossy().into_owned(),
            patched: read_trimmed(&obj.path().join("patched")).map(|v| v == "1"),
            functions,
        });
    }
    objects.sort_by(|a, b| a.object.cmp(&b.object));
    objects
}

pub(super) fn record_objects(r: &AppliedRecord) -> Vec<LiveObject> {
    let mut pos = r.sympos.iter();
    r.manifest
        .objects
        .iter()
        .map(|o| LiveObject {
            object: o.object.clone(),
            patched: None,
            functions: o
                .replaced
                .iter()
                .map(|f| LiveFunction {
                    name: f.name.clone(),
                    sympos: pos.next().copied(),
                })
                .collect(),
        })
        .collect()
}
