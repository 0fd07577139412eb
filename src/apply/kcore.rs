//! Reading the running kernel's code through /proc/kcore, an ELF core file
//! whose PT_LOAD segments map kernel virtual addresses (kernel text, the
//! module area, the direct map) to file offsets.

use anyhow::{bail, Context, Result};
use object::read::elf::FileHeader as _;
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

/// Most of the file's start read for its program headers: 18,000 segments.
const MAX_HEADERS: u64 = 1 << 20;

impl Kcore {
    pub fn open(path: &Path) -> Result<Kcore> {
        let file = File::open(path).with_context(|| {
            format!(
                "cannot open {} to verify the running code (needs root and CONFIG_PROC_KCORE; kernel lockdown forbids it)",
                path.display()
            )
        })?;
        let read = |len: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, 0)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok(buf)
        };
        let not_core = || format!("{} is not a 64-bit ELF core file", path.display());
        // The header says how far the program headers reach.
        let header = read(64)?;
        let end = headers_end(&header).with_context(not_core)?;
        if end > MAX_HEADERS {
            bail!("{}: program headers end at {end} bytes", not_core());
        }
        let segments = parse_segments(&read(end)?).with_context(not_core)?;
        Ok(Kcore { file, segments })
    }
}

/// Where the program header table of an ELF64 file ends, from its header.
fn headers_end(header: &[u8]) -> Result<u64> {
    let parsed = object::elf::FileHeader64::<object::LittleEndian>::parse(header)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let endian = object::LittleEndian;
    let table = u64::from(parsed.e_phnum.get(endian)) * u64::from(parsed.e_phentsize.get(endian));
    parsed
        .e_phoff
        .get(endian)
        .checked_add(table)
        .context("program header table wraps")
}

/// The PT_LOAD segments of a little-endian ELF64 core file whose start
/// (header and program headers) is `start`.
fn parse_segments(start: &[u8]) -> Result<Vec<Segment>> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let header = object::elf::FileHeader64::<object::LittleEndian>::parse(start)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let endian = header.endian().map_err(|e| anyhow::anyhow!("{e}"))?;
    let headers = header
        .program_headers(endian, start)
        .map_err(|e| anyhow::anyhow!("program headers: {e}"))?;
    if headers.is_empty() {
        bail!("no program headers");
    }
    Ok(headers
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| Segment {
            offset: ph.p_offset(endian),
            vaddr: ph.p_vaddr(endian),
            size: ph.p_filesz(endian),
        })
        .collect())
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

    const PT_LOAD: u32 = object::elf::PT_LOAD;

    /// A core file's header and program headers, as /proc/kcore lays them out.
    fn core_file(segments: &[(u32, u64, u64, u64)]) -> Vec<u8> {
        const EHDR_LEN: usize = 64;
        const PHDR_LEN: usize = 56;
        let mut f = vec![0u8; EHDR_LEN];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        f[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, offset, vaddr, size) in segments {
            let mut ph = vec![0u8; PHDR_LEN];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            ph[40..48].copy_from_slice(&size.to_le_bytes());
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
        let segs = parse_segments(&f).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].vaddr, 0xffff_ffff_8100_0000);
        assert_eq!(segs[0].offset, 0x1000);
        assert!(parse_segments(&f[..80]).is_err(), "a truncated table");
        assert_eq!(headers_end(&f).unwrap(), 64 + 2 * 56);
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
