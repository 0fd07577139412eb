//! Which kernel build is which: the GNU build-id of vmlinux, read from a
//! Debian kernel image at build time and from /sys/kernel/notes on the
//! running kernel. A package records the one it was built for.

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The GNU build-id in a sequence of ELF notes (a `.notes` section, or
/// /sys/kernel/notes), as lowercase hex; None for notes that do not parse.
pub fn gnu_build_id(notes: &[u8]) -> Option<String> {
    use object::elf::FileHeader64;
    use object::read::elf::NoteIterator;
    let endian = object::LittleEndian;
    let mut iter =
        NoteIterator::<FileHeader64<object::LittleEndian>>::new(endian, 4, notes).ok()?;
    while let Ok(Some(note)) = iter.next() {
        if note.n_type(endian) == object::elf::NT_GNU_BUILD_ID
            && note.name() == object::elf::ELF_NOTE_GNU
        {
            return Some(hex::encode(note.desc()));
        }
    }
    None
}

/// Build-id of the running kernel, if it exposes its notes.
pub fn running_build_id() -> Result<Option<String>> {
    match std::fs::read("/sys/kernel/notes") {
        Ok(notes) => Ok(gnu_build_id(&notes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot read /sys/kernel/notes"),
    }
}

/// Build-id of the vmlinux inside an x86 bzImage: the compressed payload
/// is the stripped vmlinux ELF, whose `.notes` section is what
/// /sys/kernel/notes shows.
pub fn vmlinuz_build_id(vmlinuz: &Path) -> Result<String> {
    let vmlinux = vmlinuz_payload(vmlinuz)?;
    let elf = object::File::parse(&*vmlinux)
        .with_context(|| format!("{}: the decompressed kernel is not ELF", vmlinuz.display()))?;
    let notes = elf
        .section_by_name(".notes")
        .with_context(|| format!("{}: the kernel has no .notes section", vmlinuz.display()))?;
    let data = notes.data().context("cannot read the kernel's .notes")?;
    match gnu_build_id(data) {
        Some(id) => Ok(id),
        None => bail!("{}: the kernel has no GNU build-id", vmlinuz.display()),
    }
}

/// Decompressors of the payload formats Debian's kernels use, by magic:
/// xz (Debian 12) and zstd (Debian 13).
const DECOMPRESSORS: &[(&[u8], &str, &[&str])] = &[
    (
        b"\xfd7zXZ\x00",
        "xz",
        &["--decompress", "--stdout", "--single-stream"],
    ),
    (
        b"\x28\xb5\x2f\xfd",
        "zstd",
        &["--decompress", "--stdout", "--quiet"],
    ),
];

/// The entry of [`DECOMPRESSORS`] whose magic `data` starts with.
fn decompressor(
    data: &[u8],
) -> Option<&'static (&'static [u8], &'static str, &'static [&'static str])> {
    DECOMPRESSORS
        .iter()
        .find(|(magic, _, _)| data.starts_with(magic))
}

/// The stripped vmlinux ELF inside an x86 bzImage, found where the boot
/// protocol's setup header says the payload is.
pub fn vmlinuz_payload(vmlinuz: &Path) -> Result<Vec<u8>> {
    let image =
        std::fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let payload = bzimage_payload(&image)
        .with_context(|| format!("{}: not an x86 bzImage with a payload", vmlinuz.display()))?;
    let Some((_, tool, args)) = decompressor(payload) else {
        bail!(
            "{}: the kernel is compressed in a format other than xz or zstd",
            vmlinuz.display()
        );
    };
    decompress(payload, tool, args, false)
        .with_context(|| format!("cannot decompress the kernel in {}", vmlinuz.display()))
}

/// `data` decompressed when it starts with the magic of a format in
/// [`DECOMPRESSORS`] (Debian 13 ships its modules as `.ko.xz`), else as it is.
pub fn decompressed(data: Vec<u8>, what: &Path) -> Result<Vec<u8>> {
    match decompressor(&data) {
        Some((_, tool, args)) => decompress(&data, tool, args, true)
            .with_context(|| format!("cannot decompress {}", what.display())),
        None => Ok(data),
    }
}

/// The compressed kernel of a bzImage: `payload_offset` and
/// `payload_length` of the setup header (boot protocol 2.08 and later),
/// counted from the protected-mode code after the setup sectors.
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    image.get(start..start.checked_add(u32_at(0x24c)? as usize)?)
}

/// The first stream of `data` decompressed by `tool`. A bzImage payload
/// ends with the kernel's own size field after the stream, which zstd
/// reports as an error: only a `whole` file must decompress cleanly.
fn decompress(data: &[u8], tool: &str, args: &[&str], whole: bool) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool} (install it: apt-get install {tool})"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        // A decompressor may stop reading after the first stream.
        let _ = stdin.write_all(&input);
    });
    let output = child
        .wait_with_output()
        .with_context(|| format!("{tool} failed"))?;
    let _ = writer.join();
    if whole && !output.status.success() {
        bail!("{tool} found it damaged or truncated");
    }
    if output.stdout.is_empty() {
        bail!("{tool} produced nothing");
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::gnu_build_id;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out.extend_from_slice(desc);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    #[test]
    fn finds_the_build_id_among_other_notes() {
        let mut notes = note(b"Xen\0", 1, b"linux\0");
        notes.extend(note(b"GNU\0", 3, &[0xab; 20]));
        assert_eq!(gnu_build_id(&notes).unwrap(), "ab".repeat(20));
    }

    #[test]
    fn hostile_notes_give_none() {
        assert_eq!(gnu_build_id(&[]), None);
        assert_eq!(gnu_build_id(&[0xff; 40]), None);
        let mut truncated = note(b"GNU\0", 3, &[1; 20]);
        truncated.truncate(30);
        assert_eq!(gnu_build_id(&truncated), None);
    }
}
