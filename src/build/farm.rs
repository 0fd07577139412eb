//! The link farm the patched build compiles in, and the journal of the
//! patched files written into it: a build that dies is undone by the next.

use super::{child, Trees};
use crate::cache;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Patched files currently written into the link farm; `restore` puts
/// the pristine ones back (also when dropped, e.g. on an error).
pub(super) struct Worktree<'a> {
    trees: &'a Trees,
    written: Vec<PathBuf>,
    /// Keeps an interrupt from ending the process before the restore.
    _patched: std::sync::MutexGuard<'static, ()>,
}

impl<'a> Worktree<'a> {
    /// What a build that died left written: the files its journal names.
    pub(super) fn left_behind(trees: &'a Trees, written: Vec<PathBuf>) -> Worktree<'a> {
        Worktree {
            trees,
            written,
            _patched: child::tree_patched(),
        }
    }

    pub(super) fn apply(
        trees: &'a Trees,
        sources: &[PathBuf],
        changes: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    ) -> Result<Worktree<'a>> {
        let patched = child::tree_patched();
        // The journal is written before any file, so a crash at any point
        // leaves enough to undo everything.
        let mut journal = String::new();
        for s in sources {
            journal.push_str(&s.to_string_lossy());
            journal.push('\n');
        }
        let mut file = fs::File::create(&trees.journal)
            .with_context(|| format!("cannot write {}", trees.journal.display()))?;
        file.write_all(journal.as_bytes())?;
        file.sync_all()?;
        let mut worktree = Worktree {
            trees,
            written: sources.to_vec(),
            _patched: patched,
        };
        for s in sources {
            let Some(Some(content)) = changes.get(s) else {
                continue;
            };
            let dest = trees.src.join(s);
            // Renaming over the link replaces the link, never the pristine
            // file it shares its inode with.
            if let Err(e) = cache::write_atomic(&dest, content) {
                let _ = worktree.restore_all();
                worktree.written.clear();
                return Err(e);
            }
        }
        Ok(worktree)
    }

    pub(super) fn restore(mut self) -> Result<()> {
        let result = self.restore_all();
        self.written.clear();
        result
    }

    pub(super) fn restore_all(&self) -> Result<()> {
        for rel in &self.written {
            restore_file(&self.trees.source, &self.trees.src, rel)?;
        }
        match fs::remove_file(&self.trees.journal) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("cannot remove {}", self.trees.journal.display()))
            }
        }
    }
}

impl Drop for Worktree<'_> {
    fn drop(&mut self) {
        if !self.written.is_empty() {
            if let Err(e) = self.restore_all() {
                eprintln!("warning: cannot restore the work tree: {e:#}");
            }
        }
    }
}

/// Put the pristine version of `rel` back into the link farm.
///
/// A `.c` file goes back as a link: its object is always deleted before
/// it is compiled again, so its old mtime cannot make make reuse a stale
/// object. Any other file (a header, were one ever written) goes back as
/// a fresh copy: its new mtime makes everything compiled against the
/// patched version look out of date to make, so no stale object or
/// generated file built from it is reused. Headers are refused today, so
/// in practice only `.c` files take this path. (Supporting headers must
/// also revisit the farm sync for user trees, which would put a link with
/// the old mtime back in place of such a copy.)
pub(super) fn restore_file(source: &Path, src: &Path, rel: &Path) -> Result<()> {
    let pristine = source.join(rel);
    let dest = src.join(rel);
    let tmp = dest.with_file_name(format!(
        ".{}.dynamos-restore",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    if fs::symlink_metadata(&pristine).is_err() {
        // The patch created this file: it has no pristine version.
        return match fs::remove_file(&dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", dest.display())),
        };
    }
    if rel.extension().is_some_and(|e| e == "c") {
        link_one(&pristine, &tmp)?;
    } else {
        fs::copy(&pristine, &tmp).with_context(|| format!("cannot copy {}", pristine.display()))?;
    }
    fs::rename(&tmp, &dest).with_context(|| format!("cannot restore {}", dest.display()))
}

/// Hard link `to` to `from`, or symlink when they are on different file systems.
pub(super) fn link_one(from: &Path, to: &Path) -> Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            std::os::unix::fs::symlink(from, to)
                .with_context(|| format!("cannot link {} to {}", to.display(), from.display()))
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot link {} to {}", to.display(), from.display()))
        }
    }
}

/// Mirror the tree at `source` into the folder `dest`: folders are
/// created, files hard linked (symlinked across file systems or where hard
/// links are refused), symlinks copied as symlinks. `.git` is skipped.
///
/// With `sync`, `dest` may already hold a mirror: entries that no longer
/// match the source (replaced files, changed symlinks, new files) are
/// relinked by renaming a new link over them, never by writing through
/// one. Files removed from the source stay in `dest`.
pub(super) fn link_tree(source: &Path, dest: &Path, sync: bool) -> Result<()> {
    let same_fs = fs::metadata(source)?.dev() == fs::metadata(dest)?.dev();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = source.join(&rel);
        let entries =
            fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && name == ".git" {
                continue;
            }
            let child = rel.join(&name);
            let from = source.join(&child);
            let to = dest.join(&child);
            let kind = entry.file_type()?;
            let existing = if sync {
                fs::symlink_metadata(&to).ok()
            } else {
                None
            };
            if kind.is_dir() {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    fs::create_dir(&to)
                        .with_context(|| format!("cannot create {}", to.display()))?;
                }
                stack.push(child);
                continue;
            }
            if let Some(existing) = &existing {
                let current = if kind.is_symlink() || existing.file_type().is_symlink() {
                    let want = if kind.is_symlink() {
                        fs::read_link(&from)?
                    } else {
                        from.clone()
                    };
                    fs::read_link(&to).is_ok_and(|t| t == want)
                } else {
                    existing.ino() == entry.metadata()?.ino()
                };
                if current {
                    continue;
                }
            }
            // Build the new entry beside the old one, then swap it in.
            let place = if existing.is_some() {
                to.with_file_name(format!(".{}.dynamos-sync", name.to_string_lossy()))
            } else {
                to.clone()
            };
            let _ = fs::remove_file(&place);
            if kind.is_symlink() {
                let target = fs::read_link(&from)?;
                std::os::unix::fs::symlink(&target, &place)
                    .with_context(|| format!("cannot create {}", to.display()))?;
            } else if same_fs {
                // Falls back to a symlink where hard links are not allowed.
                link_one(&from, &place)?;
            } else {
                std::os::unix::fs::symlink(&from, &place)
                    .with_context(|| format!("cannot link {}", to.display()))?;
            }
            if place != to {
                fs::rename(&place, &to)
                    .with_context(|| format!("cannot update {}", to.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_farm_and_restore_leave_pristine_alone() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        fs::create_dir_all(source.join("a/b")).unwrap();
        fs::write(source.join("a/b/x.c"), "pristine\n").unwrap();
        fs::write(source.join("top.h"), "header\n").unwrap();
        std::os::unix::fs::symlink("a/b/x.c", source.join("link.c")).unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        link_tree(&source, &src, false).unwrap();
        assert_eq!(
            fs::read_to_string(src.join("a/b/x.c")).unwrap(),
            "pristine\n"
        );
        assert_eq!(
            fs::read_link(src.join("link.c")).unwrap(),
            Path::new("a/b/x.c")
        );
        cache::write_atomic(&src.join("a/b/x.c"), b"patched\n").unwrap();
        assert_eq!(
            fs::read_to_string(source.join("a/b/x.c")).unwrap(),
            "pristine\n"
        );
        restore_file(&source, &src, Path::new("a/b/x.c")).unwrap();
        assert_eq!(
            fs::read_to_string(src.join("a/b/x.c")).unwrap(),
            "pristine\n"
        );
        assert_eq!(
            fs::metadata(src.join("a/b/x.c")).unwrap().ino(),
            fs::metadata(source.join("a/b/x.c")).unwrap().ino()
        );
        // A header comes back as a copy with a fresh mtime.
        cache::write_atomic(&src.join("top.h"), b"patched\n").unwrap();
        restore_file(&source, &src, Path::new("top.h")).unwrap();
        assert_eq!(fs::read_to_string(src.join("top.h")).unwrap(), "header\n");
        assert_ne!(
            fs::metadata(src.join("top.h")).unwrap().ino(),
            fs::metadata(source.join("top.h")).unwrap().ino()
        );
        // A file the patch created is removed.
        fs::write(src.join("new.c"), "new\n").unwrap();
        restore_file(&source, &src, Path::new("new.c")).unwrap();
        assert!(!src.join("new.c").exists());

        // The source changes the way a checkout does it: files replaced,
        // added, a symlink retargeted. Syncing follows without writing
        // through any link.
        let x = source.join("a/b/x.c");
        fs::remove_file(&x).unwrap();
        fs::write(&x, "checked out\n").unwrap();
        fs::write(source.join("a/added.c"), "added\n").unwrap();
        fs::remove_file(source.join("link.c")).unwrap();
        std::os::unix::fs::symlink("top.h", source.join("link.c")).unwrap();
        let untouched_ino = fs::metadata(src.join("a/b")).unwrap().ino();
        link_tree(&source, &src, true).unwrap();
        assert_eq!(
            fs::read_to_string(src.join("a/b/x.c")).unwrap(),
            "checked out\n"
        );
        assert_eq!(
            fs::read_to_string(src.join("a/added.c")).unwrap(),
            "added\n"
        );
        assert_eq!(
            fs::read_link(src.join("link.c")).unwrap(),
            Path::new("top.h")
        );
        assert_eq!(fs::metadata(src.join("a/b")).unwrap().ino(), untouched_ino);
        // The copy made for the header was not the source's file: replaced by a link.
        assert_eq!(
            fs::metadata(src.join("top.h")).unwrap().ino(),
            fs::metadata(source.join("top.h")).unwrap().ino()
        );
    }
}
