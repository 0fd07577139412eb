//! Reading make's output when a build fails: which file failed, the lines
//! worth showing, and a hint when a tool is missing.

use std::path::{Path, PathBuf};

/// Did make say it has no rule for `object`?
pub(super) fn no_rule_for(output: &str, object: &Path) -> bool {
    let needle = format!("No rule to make target '{}'", object.display());
    output.contains(&needle)
}

/// The touched source a compiler error points at, if any.
pub(super) fn failed_source<'a>(output: &str, sources: &'a [PathBuf]) -> Option<&'a PathBuf> {
    sources.iter().find(|s| {
        let s = s.display().to_string();
        output.lines().any(|l| {
            (l.starts_with(&s) || l.contains(&format!("/{s}:")))
                && (l.contains("error:") || l.contains("Error "))
        }) || output.contains(&format!(
            "[{}] Error",
            Path::new(&s).with_extension("o").display()
        ))
    })
}

/// The file of the first compiler error in make's output, named relative
/// to the tree.
pub(super) fn first_error_file(output: &str, trees: &[&Path]) -> Option<String> {
    // make names the object it gave up on: `[scripts/Makefile.build:250: fs/x.o] Error 1`.
    let failed_object = output.lines().find_map(|l| {
        let (before, _) = l.split_once("] Error")?;
        let object = before.rsplit(' ').next()?;
        object.strip_suffix(".o").map(|stem| format!("{stem}.c"))
    });
    if failed_object.is_some() {
        return failed_object;
    }
    let line = output.lines().find(|l| l.contains(": error:"))?;
    let mut file = line.split(':').next()?.trim().to_string();
    for tree in trees {
        if let Some(rest) = file.strip_prefix(&format!("{}/", tree.display())) {
            file = rest.to_string();
        }
    }
    (!file.is_empty() && !file.contains(' ')).then_some(file)
}

/// The last `n` lines of make's output worth reading: directory
/// bookkeeping dropped, and the trees' folders cut from paths so compiler
/// messages name files as the patch does.
pub(super) fn tail(output: &str, n: usize, trees: &[&Path]) -> String {
    let prefixes: Vec<String> = trees.iter().map(|t| format!("{}/", t.display())).collect();
    let lines: Vec<String> = output
        .lines()
        .filter(|l| {
            !l.contains("Entering directory")
                && !l.contains("Leaving directory")
                && !l.contains("not remade because of errors")
        })
        .map(|l| {
            prefixes
                .iter()
                .fold(l.to_string(), |line, p| line.replace(p.as_str(), ""))
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// When make failed for lack of a build tool, which Debian package has it.
pub(super) fn missing_tool_hint(output: &str) -> Option<String> {
    let known: &[(&[&str], &str)] = &[
        (
            &[
                "flex: not found",
                "flex: No such file",
                "flex: command not found",
            ],
            "flex",
        ),
        (
            &[
                "bison: not found",
                "bison: No such file",
                "bison: command not found",
            ],
            "bison",
        ),
        (
            &["bc: not found", "bc: No such file", "bc: command not found"],
            "bc",
        ),
        (&["gelf.h", "libelf.h", "libelf"], "libelf-dev"),
        (&["openssl/", "libcrypto"], "libssl-dev"),
        (
            &["pahole: not found", "pahole: command not found"],
            "dwarves",
        ),
        (&["perl: not found", "perl: command not found"], "perl"),
        (
            &["gcc-12: not found", "gcc-12: command not found"],
            "gcc-12",
        ),
        (
            &["gcc: not found", "gcc: command not found", "cc: not found"],
            "gcc",
        ),
        (&["rsync: not found"], "rsync"),
        (&["zstd: not found"], "zstd"),
        (&["lz4: not found", "lz4c: not found"], "lz4"),
        (&["cpio: not found"], "cpio"),
        (&["python3: not found"], "python3"),
    ];
    let lower = output;
    known.iter().find_map(|(needles, package)| {
        needles.iter().any(|n| lower.contains(n)).then(|| {
            format!("a build tool is missing: install it with `apt-get install {package}`")
        })
    })
}
