//! Reading the running kernel's code through /proc/kcore, an ELF core file
//! whose PT_LOAD segments map kernel virtual addresses (kernel text, the
//! module area, the direct map) to file offsets.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where code of the running kernel can be read from.
pub trait KernelMemory {
    /// `len` bytes at kernel virtual address `address`.
    fn read(&self, address: u64, len: usize) -> Result<Vec<u8>>;
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    offset: u64,
    size: u64,
}

pub struct Kcore {
    file: File,
    segments: Vec<Segment>,
}

const PT_LOAD: u32 = 1;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;

impl Kcore {
    pub fn open(path: &Path) -> Result<Kcore> {
        let file = File::open(path).with_context(|| {
            format!(
                "cannot open {} to verify the running code (needs root and CONFIG_PROC_KCORE; kernel lockdown forbids it)",
                path.display()
            )
        })?;
        let mut header = [0u8; EHDR_LEN];
        file.read_exact_at(&mut header, 0)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let segments = parse_segments(&header, |offset, buf| file.read_exact_at(buf, offset))
            .with_context(|| format!("{} is not a 64-bit ELF core file", path.display()))?;
        Ok(Kcore { file, segments })
    }
}

/// The PT_LOAD segments of a little-endian ELF64 core file, given its ELF
/// header and a way to read the program headers.
fn parse_segments(
    header: &[u8; EHDR_LEN],
    read_at: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Vec<Segment>> {
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        bail!("bad ELF identification");
    }
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
    let phoff = u64::from_le_bytes(header[32..40].try_into()?);
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    if phentsize < PHDR_LEN || phnum == 0 || phnum > 4096 {
        bail!("unexpected program header table ({phnum} entries of {phentsize} bytes)");
    }
    let mut table = vec![0u8; phentsize * phnum];
    read_at(phoff, &mut table)?;
    let mut segments = Vec::new();
    for ph in table.chunks_exact(phentsize) {
        let word = |o: usize| u64::from_le_bytes(ph[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32::from_le_bytes(ph[..4].try_into()?) != PT_LOAD {
            continue;
        }
        segments.push(Segment {
            offset: word(8),
            vaddr: word(16),
            size: word(32),
        });
    }
    Ok(segments)
}

impl KernelMemory for Kcore {
    fn read(&self, address: u64, len: usize) -> Result<Vec<u8>> {
        let end = address
            .checked_add(len as u64)
            .context("address range wraps")?;
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.vaddr <= address && end <= s.vaddr.saturating_add(s.size))
        else {
            bail!("address {address:#x} is not mapped in /proc/kcore");
        };
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, seg.offset + (address - seg.vaddr))
            .with_context(|| format!("cannot read {len} bytes at {address:#x} from /proc/kcore"))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core_file(segments: &[(u32, u64, u64, u64)]) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_LEN];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, offset, vaddr, size) in segments {
            let mut ph = vec![0u8; PHDR_LEN];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            f.extend(ph);
        }
        f
    }

    #[test]
    fn only_load_segments_are_kept() {
        let f = core_file(&[
            (4, 0, 0, 0),
            (PT_LOAD, 0x1000, 0xffff_ffff_8100_0000, 0x2000),
        ]);
        let header: [u8; EHDR_LEN] = f[..EHDR_LEN].try_into().unwrap();
        let segs = parse_segments(&header, |o, buf| {
            let o = o as usize;
            buf.copy_from_slice(&f[o..o + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].vaddr, 0xffff_ffff_8100_0000);
        assert_eq!(segs[0].offset, 0x1000);
    }

    #[test]
    fn reads_through_the_segment_map_and_refuses_unmapped_addresses() {
        let mut f = core_file(&[(PT_LOAD, 0x200, 0xffff_ffff_8100_0000, 0x10)]);
        f.resize(0x210, 0);
        f[0x204..0x208].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kcore");
        std::fs::write(&path, &f).unwrap();
        let kcore = Kcore::open(&path).unwrap();
        assert_eq!(
            kcore.read(0xffff_ffff_8100_0004, 4).unwrap(),
            vec![0xde, 0xad, 0xbe, 0xef]
        );
        assert!(kcore.read(0xffff_ffff_8100_000e, 4).is_err());
        assert!(kcore.read(0x1000, 1).is_err());
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kcore");
        std::fs::write(&path, vec![0u8; 128]).unwrap();
        assert!(Kcore::open(&path).is_err());
    }
}
