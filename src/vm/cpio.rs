//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Only what an initramfs needs: directories, regular files, symlinks and
//! device nodes, all owned by root. Parent directories are emitted on demand
//! so entries can be added in any order.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams an archive into `W`; call [`Archive::finish`] to write the trailer.
pub struct Archive<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Archive<W> {
        Archive {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory (and its missing parents) with permission bits `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        let name = normalize(path)?;
        if name.is_empty() || self.dirs.contains(&name) {
            return Ok(());
        }
        self.parents(&name)?;
        self.header(&Header {
            name: &name,
            mode: S_IFDIR | (perm & 0o7777),
            size: 0,
            rdev: (0, 0),
        })?;
        self.dirs.insert(name);
        Ok(())
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.header(&Header {
            name: &name,
            mode: S_IFREG | (perm & 0o7777),
            size: size32(data.len() as u64, &name)?,
            rdev: (0, 0),
        })?;
        self.write_all(data)?;
        self.pad()
    }

    /// A regular file copied from `source` on the host (following symlinks).
    pub fn file_from(&mut self, path: &str, perm: u32, source: &Path) -> Result<()> {
        let name = normalize(path)?;
        let mut input =
            File::open(source).with_context(|| format!("cannot read {}", source.display()))?;
        let len = input
            .metadata()
            .with_context(|| format!("cannot read {}", source.display()))?
            .len();
        self.parents(&name)?;
        self.header(&Header {
            name: &name,
            mode: S_IFREG | (perm & 0o7777),
            size: size32(len, &name)?,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut (&mut input).take(len), &mut self.out)
            .with_context(|| format!("cannot copy {} into the archive", source.display()))?;
        if copied != len {
            bail!("{} changed size while being archived", source.display());
        }
        self.written += copied;
        self.pad()
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.header(&Header {
            name: &name,
            mode: S_IFLNK | 0o777,
            size: size32(target.len() as u64, &name)?,
            rdev: (0, 0),
        })?;
        self.write_all(target.as_bytes())?;
        self.pad()
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.header(&Header {
            name: &name,
            mode: S_IFCHR | (perm & 0o7777),
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Write the trailer entry and return the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        self.header(&Header {
            name: TRAILER,
            mode: 0,
            size: 0,
            rdev: (0, 0),
        })?;
        // Round the archive up to a whole 512-byte block, as cpio tools do.
        let rem = (self.written % 512) as usize;
        if rem != 0 {
            self.write_all(&vec![0; 512 - rem])?;
        }
        self.out.flush().context("cannot write the archive")?;
        Ok(self.out)
    }

    fn parents(&mut self, name: &str) -> Result<()> {
        let mut end = 0;
        while let Some(pos) = name[end..].find('/') {
            end += pos;
            let parent = &name[..end];
            if !self.dirs.contains(parent) {
                self.header(&Header {
                    name: parent,
                    mode: S_IFDIR | 0o755,
                    size: 0,
                    rdev: (0, 0),
                })?;
                self.dirs.insert(parent.to_string());
            }
            end += 1;
        }
        Ok(())
    }

    fn header(&mut self, h: &Header) -> Result<()> {
        let ino = if h.name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let nlink = if h.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            if h.name == TRAILER { 1 } else { nlink },
            0, // mtime: fixed, so archives are reproducible
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            h.name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::with_capacity(110 + h.name.len() + 1);
        head.push_str(MAGIC);
        for field in fields {
            head.push_str(&format!("{field:08x}"));
        }
        head.push_str(h.name);
        head.push('\0');
        self.write_all(head.as_bytes())?;
        self.pad()
    }

    fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .context("cannot write the archive")?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_all(&[0; 3][..4 - rem])?;
        }
        Ok(())
    }
}

/// Archive member names are relative (`usr/bin/x`), without `.` or `..`.
fn normalize(path: &str) -> Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        bail!("archive path {path:?} must not contain `..`");
    }
    if path.contains('\0') {
        bail!("archive path {path:?} contains a NUL byte");
    }
    Ok(parts.join("/"))
}

fn size32(len: u64, name: &str) -> Result<u32> {
    u32::try_from(len)
        .map_err(|_| anyhow::anyhow!("{name} is too large for a cpio archive (4 GiB limit)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        u32::from_str_radix(std::str::from_utf8(&header[start..start + 8]).unwrap(), 16).unwrap()
    }

    /// Parse an archive back into (name, mode, data) entries.
    fn parse(mut data: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&data[..6], MAGIC.as_bytes(), "bad magic at {offset}");
            let mode = field(data, 1);
            let size = field(data, 6) as usize;
            let namesize = field(data, 11) as usize;
            let name = String::from_utf8(data[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = (110 + namesize).next_multiple_of(4);
            let body = data[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            offset += next;
            data = &data[next..];
            if name == TRAILER {
                break;
            }
            entries.push((name, mode, body));
        }
        entries
    }

    #[test]
    fn round_trips_entries_with_parents_first() {
        let mut archive = Archive::new(Vec::new());
        archive.file("/usr/bin/tool", 0o755, b"hello").unwrap();
        archive.symlink("bin/sh", "busybox").unwrap();
        archive.dir("/tmp", 0o1777).unwrap();
        archive.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = archive.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "bin",
                "bin/sh",
                "tmp",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].2, b"hello");
        assert_eq!(entries[4].1, S_IFLNK | 0o777);
        assert_eq!(entries[4].2, b"busybox");
        assert_eq!(entries[5].1, S_IFDIR | 0o1777);
    }

    #[test]
    fn rejects_parent_components() {
        let mut archive = Archive::new(Vec::new());
        assert!(archive.file("../etc/passwd", 0o644, b"").is_err());
    }

    #[test]
    fn copies_host_files() {
        let dir = std::env::temp_dir().join(format!("dynamos-cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("blob");
        let blob: Vec<u8> = (0..1001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &blob).unwrap();
        let mut archive = Archive::new(Vec::new());
        archive.file_from("packages/blob", 0o644, &src).unwrap();
        let entries = parse(&archive.finish().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(entries[1].0, "packages/blob");
        assert_eq!(entries[1].2, blob);
    }
}
