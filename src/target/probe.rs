//! Measuring a target kernel's ABI: `templates/layouts.c` compiled against
//! its kbuild folder, the entry types of its special sections read from the
//! object's DWARF, and the result cached beside the target's builds.

use super::abi::{self, KernelAbi};
use super::toolchain::Toolchain;
use crate::diff::types::{struct_layout, StructLayout};
use crate::diff::ObjectFile;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

const PROBE: &str = include_str!("../../templates/layouts.c");
const PROBE_NAME: &str = "dynamos_layouts";

/// The ABI of the kernel `kbuild_dir` builds modules for, measured once
/// and remembered in `work`; `objtool_at_link` as the build found it.
pub fn kernel_abi(
    kbuild_dir: &Path,
    work: &Path,
    toolchain: &Toolchain,
    objtool_at_link: bool,
) -> Result<KernelAbi> {
    let cached = work.join("kernel-abi");
    let stamp = format!("# {}", probe_digest(kbuild_dir, toolchain));
    let layouts = match fs::read_to_string(&cached)
        .ok()
        .and_then(|text| parse_layouts(&text, &stamp))
    {
        Some(layouts) => layouts,
        None => {
            let layouts = measure(kbuild_dir, work, toolchain)?;
            crate::cache::write_atomic(&cached, render_layouts(&layouts, &stamp).as_bytes())?;
            layouts
        }
    };
    KernelAbi::from_layouts(&layouts, objtool_at_link)
}

/// The probe's source, the kbuild folder it is compiled in and the
/// compiler: a change to any measures again.
fn probe_digest(kbuild_dir: &Path, toolchain: &Toolchain) -> String {
    let mut hasher = Sha256::new();
    hasher.update(PROBE.as_bytes());
    hasher.update(kbuild_dir.to_string_lossy().as_bytes());
    hasher.update(toolchain.describe().as_bytes());
    // A tree configured again in place (a user's) measures again.
    for generated in [
        "include/generated/autoconf.h",
        "include/generated/utsrelease.h",
    ] {
        hasher.update(fs::read(kbuild_dir.join(generated)).unwrap_or_default());
    }
    hex::encode(&hasher.finalize()[..8])
}

fn measure(
    kbuild_dir: &Path,
    work: &Path,
    toolchain: &Toolchain,
) -> Result<BTreeMap<String, StructLayout>> {
    let dir = work.join(format!("layouts.{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = compile_and_read(kbuild_dir, &dir, toolchain);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn compile_and_read(
    kbuild_dir: &Path,
    dir: &Path,
    toolchain: &Toolchain,
) -> Result<BTreeMap<String, StructLayout>> {
    fs::write(dir.join(format!("{PROBE_NAME}.c")), PROBE)?;
    // Debug info even where the config has none: the layouts come from it.
    fs::write(
        dir.join("Kbuild"),
        format!("obj-m := {PROBE_NAME}.o\nccflags-y += -g\n"),
    )?;
    let progress = crate::report::spinner("measuring the target kernel's special sections".into());
    let mut make = toolchain.command("make");
    make.arg("-C")
        .arg(kbuild_dir)
        .arg(toolchain.make_cc())
        .arg(format!("M={}", dir.display()))
        .arg(format!("{PROBE_NAME}.o"));
    let run = crate::build::run_make_logged(make, &dir.join("make.log"), None);
    progress.finish_and_clear();
    let run = run?;
    let object = dir.join(format!("{PROBE_NAME}.o"));
    if !run.success || !object.is_file() {
        let tail: Vec<&str> = run.output.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "cannot compile the layout probe against {}:\n{}",
            kbuild_dir.display(),
            tail.join("\n")
        );
    }
    let object = ObjectFile::read(&object)?;
    let mut layouts = BTreeMap::new();
    for name in abi::probed_types() {
        if let Some(layout) = struct_layout(&object, name)? {
            layouts.insert(name.to_string(), layout);
        }
    }
    Ok(layouts)
}

/// One line per type: `struct alt_instr<TAB>12<TAB>instrlen=10 ...`.
fn render_layouts(layouts: &BTreeMap<String, StructLayout>, stamp: &str) -> String {
    let mut text = format!("{stamp}\n");
    for (name, layout) in layouts {
        let members: Vec<String> = layout
            .members
            .iter()
            .map(|(member, at)| format!("{member}={at}"))
            .collect();
        text.push_str(&format!("{name}\t{}\t{}\n", layout.size, members.join(" ")));
    }
    text
}

/// The layouts of a cache file written for `stamp`; None when it is for
/// another probe or malformed.
fn parse_layouts(text: &str, stamp: &str) -> Option<BTreeMap<String, StructLayout>> {
    let mut lines = text.lines();
    if lines.next()? != stamp {
        return None;
    }
    let mut layouts = BTreeMap::new();
    for line in lines {
        let mut fields = line.split('\t');
        let (name, size, members) = (fields.next()?, fields.next()?, fields.next()?);
        let members = members
            .split_whitespace()
            .map(|m| {
                let (member, at) = m.split_once('=')?;
                Some((member.to_string(), at.parse().ok()?))
            })
            .collect::<Option<BTreeMap<String, u64>>>()?;
        layouts.insert(
            name.to_string(),
            StructLayout {
                size: size.parse().ok()?,
                members,
            },
        );
    }
    Some(layouts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_layouts_read_back_and_other_stamps_do_not() {
        let mut layouts = BTreeMap::new();
        layouts.insert(
            "struct alt_instr".to_string(),
            StructLayout {
                size: 14,
                members: [("instrlen".to_string(), 12), ("repl_offset".to_string(), 4)]
                    .into_iter()
                    .collect(),
            },
        );
        let text = render_layouts(&layouts, "# abc");
        assert_eq!(parse_layouts(&text, "# abc"), Some(layouts));
        assert_eq!(parse_layouts(&text, "# abd"), None);
        assert_eq!(parse_layouts("# abc\nstruct x\tbig\t\n", "# abc"), None);
    }
}
