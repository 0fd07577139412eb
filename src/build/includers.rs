//! Which source files a changed header reaches: every `#include` of the
//! tree (and of kbuild's generated `asm` wrappers) read once, then searched
//! backwards from the header to the C files that include it, directly or
//! through other headers and included `.c` files.
//!
//! Resolution errs on the side of too many: a quoted include that names an
//! existing file next to the includer means that file, and anything else
//! matches every indexed path that ends with the directive (kbuild's
//! per-folder `-I` flags are not read). A file wrongly taken as an includer
//! costs a compile whose object comes out unchanged; a missed one would
//! leave old code running, so the index never guesses narrowly.

use anyhow::{Context, Result};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Top-level folders whose files never go into a kernel build.
const NOT_KERNEL: &[&str] = &[
    ".git",
    "Documentation",
    "LICENSES",
    "samples",
    "scripts",
    "tools",
    "usr",
    "debian",
];

/// One `#include` line.
#[derive(Debug, Clone)]
struct Directive {
    /// Index of the including file in [`IncludeIndex::files`].
    file: usize,
    /// The name between the quotes or angle brackets.
    name: String,
    quoted: bool,
}

/// The include graph of one source tree.
#[derive(Debug, Default)]
pub struct IncludeIndex {
    /// Indexed `.c` and `.h` files, relative to the tree root.
    files: Vec<PathBuf>,
    known: HashSet<PathBuf>,
    /// Directives by the last component of the name they include.
    by_file_name: HashMap<String, Vec<Directive>>,
}

/// More source files include the header than a live update rebuilds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyIncluders {
    pub header: PathBuf,
    pub limit: usize,
}

impl IncludeIndex {
    /// Index `source` (only `arch/<srcarch>` of the architectures) and the
    /// generated headers under `generated`, given as (folder on disk,
    /// path it stands for relative to the tree root).
    pub fn scan(source: &Path, srcarch: &str, generated: &[(PathBuf, PathBuf)]) -> Result<Self> {
        let mut found = Vec::new();
        walk(source, Path::new(""), srcarch, &mut found)
            .with_context(|| format!("cannot read the source tree {}", source.display()))?;
        for (dir, as_path) in generated {
            if dir.is_dir() {
                walk(dir, as_path, srcarch, &mut found)
                    .with_context(|| format!("cannot read {}", dir.display()))?;
            }
        }
        let mut index = IncludeIndex::default();
        for (disk, rel) in found {
            let text = match fs::read(&disk) {
                Ok(t) => t,
                // A dangling link or a file removed meanwhile includes nothing.
                Err(_) => continue,
            };
            let file = index.files.len();
            for (name, quoted) in include_directives(&text) {
                let last = file_name(&name).to_string();
                index
                    .by_file_name
                    .entry(last)
                    .or_default()
                    .push(Directive { file, name, quoted });
            }
            index.known.insert(rel.clone());
            index.files.push(rel);
        }
        Ok(index)
    }

    /// Number of indexed files.
    pub fn indexed_files(&self) -> usize {
        self.files.len()
    }

    /// The `.c` files that include any of `headers`, directly or not, in
    /// path order; more than `limit` of them is an error naming the header
    /// that reached the limit.
    pub fn c_files_including(
        &self,
        headers: &[PathBuf],
        limit: usize,
    ) -> Result<Vec<PathBuf>, TooManyIncluders> {
        let mut c_files = BTreeSet::new();
        for header in headers {
            let mut seen: HashSet<PathBuf> = HashSet::from([header.clone()]);
            let mut queue = VecDeque::from([header.clone()]);
            while let Some(path) = queue.pop_front() {
                for includer in self.direct_includers(&path) {
                    if !seen.insert(includer.clone()) {
                        continue;
                    }
                    if includer.extension().is_some_and(|e| e == "c") {
                        c_files.insert(includer.clone());
                        if c_files.len() > limit {
                            return Err(TooManyIncluders {
                                header: header.clone(),
                                limit,
                            });
                        }
                    }
                    queue.push_back(includer);
                }
            }
        }
        Ok(c_files.into_iter().collect())
    }

    /// Files with an `#include` that may mean `target`.
    fn direct_includers(&self, target: &Path) -> Vec<PathBuf> {
        let Some(name) = target.file_name().map(|n| n.to_string_lossy()) else {
            return Vec::new();
        };
        let Some(directives) = self.by_file_name.get(name.as_ref()) else {
            return Vec::new();
        };
        directives
            .iter()
            .filter(|d| self.may_mean(d, target))
            .map(|d| self.files[d.file].clone())
            .collect()
    }

    fn may_mean(&self, directive: &Directive, target: &Path) -> bool {
        let includer = &self.files[directive.file];
        if directive.quoted {
            let beside = normalize(
                &includer
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(&directive.name),
            );
            if let Some(beside) = beside {
                if self.known.contains(&beside) {
                    return beside == target;
                }
            }
        }
        // Searched along include paths: any folder may be one.
        let name: PathBuf = Path::new(&directive.name)
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        target.ends_with(&name)
    }
}

/// Every file under `dir` worth indexing, as (path on disk, path relative
/// to the tree root).
fn walk(dir: &Path, rel: &Path, srcarch: &str, out: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let child_rel = rel.join(name.as_ref());
        let depth = child_rel.components().count();
        let file_type = entry.file_type()?;
        let is_dir = file_type.is_dir() || (file_type.is_symlink() && entry.path().is_dir());
        if is_dir {
            if depth == 1 && NOT_KERNEL.contains(&name.as_ref()) {
                continue;
            }
            if depth == 2 && rel == Path::new("arch") && name != srcarch {
                continue;
            }
            walk(&entry.path(), &child_rel, srcarch, out)?;
        } else if name.ends_with(".c") || name.ends_with(".h") {
            out.push((entry.path(), child_rel));
        }
    }
    Ok(())
}

/// The names a C file `#include`s, each with whether it was quoted.
fn include_directives(text: &[u8]) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line = trim_blank(line);
        let Some(rest) = line.strip_prefix(b"#") else {
            continue;
        };
        let Some(rest) = trim_blank(rest).strip_prefix(b"include") else {
            continue;
        };
        let rest = trim_blank(rest);
        let (close, quoted) = match rest.first() {
            Some(b'"') => (b'"', true),
            Some(b'<') => (b'>', false),
            _ => continue,
        };
        let Some(end) = rest[1..].iter().position(|&b| b == close) else {
            continue;
        };
        if let Ok(name) = std::str::from_utf8(&rest[1..1 + end]) {
            if !name.is_empty() {
                found.push((name.to_string(), quoted));
            }
        }
    }
    found
}

fn trim_blank(mut s: &[u8]) -> &[u8] {
    while let Some((&b, rest)) = s.split_first() {
        if b != b' ' && b != b'\t' {
            break;
        }
        s = rest;
    }
    s
}

fn file_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// `a/b/../c` → `a/c`, without asking the file system; `None` when it
/// climbs above the root or is absolute.
pub(super) fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        dir
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn reads_include_lines_in_their_spellings() {
        let text = b"#include <linux/fs.h>\n  #  include \"local.h\" /* x */\n#define include\n#include MACRO\n#includeX\n\t#include\t<a/b.h>\n";
        assert_eq!(
            include_directives(text),
            vec![
                ("linux/fs.h".to_string(), false),
                ("local.h".to_string(), true),
                ("a/b.h".to_string(), false),
            ]
        );
    }

    #[test]
    fn finds_c_files_through_headers_and_included_c_files() {
        let t = tree(&[
            ("include/linux/thing.h", "int thing;\n"),
            ("include/linux/wrap.h", "#include <linux/thing.h>\n"),
            ("fs/a/a.c", "#include <linux/wrap.h>\n"),
            ("fs/a/local.h", "#include \"../../include/linux/thing.h\"\n"),
            ("fs/a/b.c", "#include \"local.h\"\n"),
            ("kernel/rt.c", "#include <linux/thing.h>\n"),
            ("kernel/build_policy.c", "#include \"rt.c\"\n"),
            ("kernel/other.c", "#include <linux/other.h>\n"),
            ("arch/arm/x.c", "#include <linux/thing.h>\n"),
            ("tools/t.c", "#include <linux/thing.h>\n"),
        ]);
        let index = IncludeIndex::scan(t.path(), "x86", &[]).unwrap();
        let found = index
            .c_files_including(&paths(&["include/linux/thing.h"]), 10)
            .unwrap();
        assert_eq!(
            found,
            paths(&[
                "fs/a/a.c",
                "fs/a/b.c",
                "kernel/build_policy.c",
                "kernel/rt.c"
            ])
        );
    }

    #[test]
    fn a_quoted_include_of_a_file_beside_it_means_only_that_file() {
        let t = tree(&[
            ("fs/a/internal.h", "\n"),
            ("fs/b/internal.h", "\n"),
            ("fs/a/a.c", "#include \"internal.h\"\n"),
            ("fs/b/b.c", "#include \"internal.h\"\n"),
            ("drivers/c/c.c", "#include \"internal.h\"\n"),
        ]);
        let index = IncludeIndex::scan(t.path(), "x86", &[]).unwrap();
        let found = index
            .c_files_including(&paths(&["fs/a/internal.h"]), 10)
            .unwrap();
        // drivers/c has no internal.h beside it: an -I flag could reach fs/a.
        assert_eq!(found, paths(&["drivers/c/c.c", "fs/a/a.c"]));
    }

    #[test]
    fn generated_wrappers_lead_to_asm_generic_headers() {
        let t = tree(&[
            ("include/asm-generic/mcs.h", "\n"),
            ("kernel/lock.c", "#include <asm/mcs.h>\n"),
        ]);
        let gen = tree(&[("asm/mcs.h", "#include <asm-generic/mcs.h>\n")]);
        let index = IncludeIndex::scan(
            t.path(),
            "x86",
            &[(
                gen.path().to_path_buf(),
                "arch/x86/include/generated".into(),
            )],
        )
        .unwrap();
        let found = index
            .c_files_including(&paths(&["include/asm-generic/mcs.h"]), 10)
            .unwrap();
        assert_eq!(found, paths(&["kernel/lock.c"]));
    }

    #[test]
    fn too_many_includers_name_the_header() {
        let mut files = vec![("include/linux/wide.h".to_string(), String::new())];
        for i in 0..5 {
            files.push((format!("d/f{i}.c"), "#include <linux/wide.h>\n".into()));
        }
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let t = tree(&files);
        let index = IncludeIndex::scan(t.path(), "x86", &[]).unwrap();
        let err = index
            .c_files_including(&paths(&["include/linux/wide.h"]), 4)
            .unwrap_err();
        assert_eq!(err.header, PathBuf::from("include/linux/wide.h"));
        assert_eq!(err.limit, 4);
    }
}
