//! Sorting the touched files by how they are built: C files compiled,
//! headers whose includers are compiled, files that are not kernel code,
//! and files that cannot be updated live.

use crate::{Error, Refusal};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The touched files by how they are built.
pub(crate) struct SortedChanges {
    pub sources: Vec<PathBuf>,
    pub headers: Vec<PathBuf>,
    pub ignored: Vec<PathBuf>,
}

/// Sort the touched files, noting those ignored (not `what`); refused
/// ([`Error::Refused`]) for files that cannot be updated, and
/// [`Error::NoChange`] when nothing is left to compile.
pub(crate) fn sort_changes(
    changes: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    what: &str,
) -> Result<SortedChanges> {
    let mut sorted = SortedChanges {
        sources: Vec::new(),
        headers: Vec::new(),
        ignored: Vec::new(),
    };
    let mut refusals = Vec::new();
    for (path, content) in changes {
        match classify(path, content) {
            Kind::Compile => sorted.sources.push(path.clone()),
            Kind::Header => sorted.headers.push(path.clone()),
            Kind::Ignore => sorted.ignored.push(path.clone()),
            Kind::Refuse(reason) => refusals.push(Refusal {
                symbol: path.display().to_string(),
                reason,
            }),
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals).into());
    }
    for path in &sorted.ignored {
        crate::report::note(format!("ignoring {}: not {what}", path.display()));
    }
    if sorted.sources.is_empty() && sorted.headers.is_empty() {
        return Err(Error::NoChange.into());
    }
    Ok(sorted)
}

/// How a touched file is handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A C file compiled into the kernel or a module.
    Compile,
    /// A header: every translation unit including it is compiled.
    Header,
    /// Not part of what runs in the kernel.
    Ignore,
    Refuse(String),
}

pub(super) fn classify(path: &Path, content: &Option<Vec<u8>>) -> Kind {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    let top = path
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    let not_kernel_dirs = ["Documentation", "tools", "samples", "LICENSES", "usr"];
    let doc_names = [
        "MAINTAINERS",
        "CREDITS",
        "README",
        "COPYING",
        ".mailmap",
        ".gitignore",
        ".clang-format",
        ".cocciconfig",
        ".get_maintainer.ignore",
    ];
    let doc_exts = ["rst", "txt", "md", "yaml", "json", "cocci"];
    if (not_kernel_dirs.contains(&top.as_str()) && path.components().count() > 1)
        || doc_names.contains(&name.as_str())
        || doc_exts.contains(&ext.as_str())
    {
        return Kind::Ignore;
    }
    if top == "scripts" {
        return Kind::Refuse(
            "changes to build scripts alter how the whole kernel is built; they cannot be applied live"
                .into(),
        );
    }
    if name == "Makefile" || name == "Kbuild" || name.starts_with("Kconfig") || ext == "mk" {
        return Kind::Refuse(
            "build system changes (Makefile/Kbuild/Kconfig) are not supported".into(),
        );
    }
    match ext.as_str() {
        "h" if content.is_none() => Kind::Refuse("deleting a header is not supported".into()),
        "h" => Kind::Header,
        "c" if content.is_none() => Kind::Refuse("deleting a source file is not supported".into()),
        "c" => Kind::Compile,
        "S" | "s" => Kind::Refuse("assembly changes are not supported".into()),
        "lds" => Kind::Refuse("linker script changes are not supported".into()),
        "rs" => Kind::Refuse("Rust changes are not supported".into()),
        _ => Kind::Refuse("changes to this kind of file are not supported".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(path: &str) -> Kind {
        classify(Path::new(path), &Some(Vec::new()))
    }

    #[test]
    fn classifies_touched_files() {
        assert_eq!(kind("fs/proc/version.c"), Kind::Compile);
        assert_eq!(kind("Documentation/admin-guide/foo.rst"), Kind::Ignore);
        assert_eq!(kind("tools/perf/builtin-top.c"), Kind::Ignore);
        assert_eq!(kind("MAINTAINERS"), Kind::Ignore);
        assert_eq!(kind("include/linux/fs.h"), Kind::Header);
        assert!(matches!(kind("fs/proc/Makefile"), Kind::Refuse(_)));
        assert!(matches!(kind("init/Kconfig"), Kind::Refuse(_)));
        assert!(matches!(kind("arch/x86/entry/entry_64.S"), Kind::Refuse(_)));
        assert!(matches!(kind("scripts/mod/modpost.c"), Kind::Refuse(_)));
        assert!(matches!(
            classify(Path::new("fs/proc/version.c"), &None),
            Kind::Refuse(_)
        ));
    }
}
