//! Editing the livepatch module image before it is loaded: resolved
//! kernel symbols become absolute symbols, so the kernel's module loader
//! applies every relocation against them. The image is read with the
//! `object` crate's checked ELF types and edited in place.

use anyhow::{anyhow, bail, Result};
use object::elf::{FileHeader64, SHN_ABS, SHN_UNDEF, STB_GLOBAL};
use object::read::elf::{FileHeader, SectionHeader, SectionTable, Sym};
use object::LittleEndian;

/// What ends a signed module (`MODULE_SIG_STRING`): the kernel checks the
/// signature before it looks at anything else in the module.
pub const MODULE_SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// Whether the module image carries an appended signature.
pub fn is_signed(image: &[u8]) -> bool {
    image.ends_with(MODULE_SIGNATURE_MARKER)
}

/// Size of one ELF64 symbol table entry.
const SYM_SIZE: usize = 24;

fn damaged(e: object::read::Error) -> anyhow::Error {
    anyhow!("module image is damaged: {e}")
}

/// The image's section table, after the checks that name what is wrong.
fn sections(data: &[u8]) -> Result<SectionTable<'_, FileHeader64<LittleEndian>>> {
    if data.len() < 64 || data[..4] != *b"\x7fELF" {
        bail!("package module is not an ELF file");
    }
    if data[4] != 2 {
        bail!("package module is not a 64-bit ELF file");
    }
    match data[5] {
        1 => {}
        2 => bail!("package module is big-endian; only x86-64 modules are loaded"),
        _ => bail!("package module has an unknown ELF byte order"),
    }
    let header = FileHeader64::<LittleEndian>::parse(data).map_err(damaged)?;
    let sections = header.sections(LittleEndian, data).map_err(damaged)?;
    if sections.is_empty() {
        bail!("package module has no section headers");
    }
    Ok(sections)
}

/// Turn each named undefined global symbol of the module image into an
/// absolute symbol with the given value, editing the symbol table in place.
/// Every name must be present exactly once as an undefined global symbol.
pub fn make_symbols_absolute(image: &mut [u8], values: &[(String, u64)]) -> Result<()> {
    let endian = LittleEndian;
    let mut found = vec![0usize; values.len()];
    let mut edits: Vec<(usize, u64)> = Vec::new(); // (symbol entry offset, value)
    {
        let data: &[u8] = image;
        let sections = sections(data)?;
        for (index, section) in sections.iter().enumerate() {
            if section.sh_type(endian) != object::elf::SHT_SYMTAB {
                continue;
            }
            if section.sh_entsize(endian) as usize != SYM_SIZE {
                bail!(
                    "module image is damaged: symbol table entry size {}",
                    section.sh_entsize(endian)
                );
            }
            let table = sections
                .symbol_table_by_index(endian, data, object::SectionIndex(index))
                .map_err(damaged)?;
            let start = section.sh_offset(endian) as usize;
            for (n, symbol) in table.symbols().iter().enumerate() {
                let name = symbol.name(endian, table.strings()).map_err(damaged)?;
                let Some(want) = values.iter().position(|(v, _)| v.as_bytes() == name) else {
                    continue;
                };
                if symbol.st_shndx(endian) != SHN_UNDEF || symbol.st_bind() != STB_GLOBAL {
                    bail!(
                        "module symbol {} is not an undefined global symbol",
                        values[want].0
                    );
                }
                found[want] += 1;
                edits.push((start + n * SYM_SIZE, values[want].1));
            }
        }
    }
    for (i, count) in found.iter().enumerate() {
        match count {
            1 => {}
            0 => bail!("module has no symbol {} to resolve", values[i].0),
            _ => bail!("module has symbol {} more than once", values[i].0),
        }
    }
    for (at, value) in edits {
        image[at + 6..at + 8].copy_from_slice(&SHN_ABS.to_le_bytes());
        image[at + 8..at + 16].copy_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// The `name=` entry of the module's .modinfo section, if any.
pub fn modinfo_name(image: &[u8]) -> Result<Option<String>> {
    let endian = LittleEndian;
    let sections = sections(image)?;
    for section in sections.iter() {
        if sections.section_name(endian, section).map_err(damaged)? != b".modinfo" {
            continue;
        }
        let info = section.data(endian, image).map_err(damaged)?;
        for entry in info.split(|&b| b == 0) {
            if let Some(name) = entry.strip_prefix(b"name=") {
                return Ok(Some(String::from_utf8_lossy(name).into_owned()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    fn compile(dir: &Path, src: &str) -> Vec<u8> {
        let c = dir.join("t.c");
        let o = dir.join("t.o");
        fs::write(&c, src).unwrap();
        let st = std::process::Command::new("cc")
            .args(["-c", "-O2", "-fno-pic", "-o"])
            .arg(&o)
            .arg(&c)
            .status()
            .expect("cc must be installed to run this test");
        assert!(st.success());
        fs::read(&o).unwrap()
    }

    #[test]
    fn rewrites_undefined_symbols_to_absolute() {
        use object::{Object, ObjectSymbol, SymbolSection};
        let dir = tempfile::tempdir().unwrap();
        let src = "extern int __dynamos_ext_0(int);\nextern int __dynamos_ext_1;\n\
                   static int local_fn(int x) { return x + 1; }\n\
                   int f(int x) { return __dynamos_ext_0(x) + __dynamos_ext_1 + local_fn(x); }\n";
        let original = compile(dir.path(), src);
        let mut image = original.clone();
        let values = vec![
            ("__dynamos_ext_0".to_string(), 0xffffffff81234560u64),
            ("__dynamos_ext_1".to_string(), 0x12340u64),
        ];
        make_symbols_absolute(&mut image, &values).unwrap();
        assert_eq!(image.len(), original.len());
        let file = object::File::parse(&*image).unwrap();
        for (name, value) in &values {
            let sym = file.symbol_by_name(name).unwrap();
            assert_eq!(sym.section(), SymbolSection::Absolute, "{name}");
            assert_eq!(sym.address(), *value);
            assert!(sym.is_global());
        }
        // Only those two symbol entries changed.
        let changed = image.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed <= 2 * 10, "{changed} bytes changed");

        // Defined, local, missing or repeated requests are refused.
        let mut again = image.clone();
        let err = make_symbols_absolute(&mut again, &values[..1]).unwrap_err();
        assert!(err.to_string().contains("not an undefined global"), "{err}");
        let mut img = original.clone();
        assert!(make_symbols_absolute(&mut img, &[("f".into(), 1)]).is_err());
        let err = make_symbols_absolute(&mut img, &[("absent".into(), 1)]).unwrap_err();
        assert!(err.to_string().contains("no symbol absent"), "{err}");
        assert_eq!(img, original);
        assert_eq!(modinfo_name(&original).unwrap(), None);
    }

    /// Where `bytes` and `other` differ.
    fn changed_at(bytes: &[u8], other: &[u8]) -> Vec<usize> {
        (0..bytes.len()).filter(|&i| bytes[i] != other[i]).collect()
    }

    #[test]
    fn damaged_images_are_refused_untouched_or_edited_in_one_symbol() {
        let dir = tempfile::tempdir().unwrap();
        let original = compile(
            dir.path(),
            "extern int g(void); int f(void) { return g(); }\n",
        );
        let values = [("g".to_string(), 5u64)];
        let mut expected = original.clone();
        make_symbols_absolute(&mut expected, &values).unwrap();
        let edit = changed_at(&original, &expected);
        assert!(
            !edit.is_empty() && edit[edit.len() - 1] - edit[0] < 10,
            "{edit:?}"
        );

        // What the editor reads: the ELF header, the section headers, each
        // symbol table and its string table. modinfo_name reads the
        // section names too.
        let endian = LittleEndian;
        let table = sections(&original).unwrap();
        let shoff = u64::from_le_bytes(original[0x28..0x30].try_into().unwrap()) as usize;
        let headers = shoff..shoff + table.len() * 64;
        let range = |i: usize| {
            let s = table.section(object::SectionIndex(i)).unwrap();
            let start = s.sh_offset(endian) as usize;
            start..start + s.sh_size(endian) as usize
        };
        let mut read_by_edit = vec![0..64, headers.clone()];
        for (i, s) in table.iter().enumerate() {
            if s.sh_type(endian) == object::elf::SHT_SYMTAB {
                read_by_edit.push(range(i));
                read_by_edit.push(range(s.sh_link(endian) as usize));
            }
        }
        let shstrndx = u16::from_le_bytes(original[0x3e..0x40].try_into().unwrap()) as usize;
        let mut read_by_modinfo = vec![0..64, headers.clone(), range(shstrndx)];
        read_by_modinfo.extend(
            table
                .iter()
                .enumerate()
                .filter(|(_, s)| table.section_name(endian, s).unwrap() == b".modinfo")
                .map(|(i, _)| range(i)),
        );

        // gcc writes the section headers last: every truncation loses some
        // and is refused, leaving the image as it was.
        assert_eq!(headers.end, original.len());
        for len in 0..original.len() {
            let mut image = original[..len].to_vec();
            assert!(make_symbols_absolute(&mut image, &values).is_err(), "{len}");
            assert_eq!(image, original[..len]);
            assert!(modinfo_name(&original[..len]).is_err(), "{len}");
        }

        let mut refused = 0;
        for at in 0..original.len() {
            for v in [0x00u8, 0xff, 0x80] {
                if original[at] == v {
                    continue;
                }
                let mut input = original.clone();
                input[at] = v;
                let mut image = input.clone();
                let result = make_symbols_absolute(&mut image, &values);
                if !read_by_edit.iter().any(|r| r.contains(&at)) {
                    // A byte the editor never reads changes nothing but itself.
                    assert!(result.is_ok(), "byte {at} = {v:#x}: {result:?}");
                    let mut want = expected.clone();
                    want[at] = v;
                    assert_eq!(image, want, "byte {at} = {v:#x}");
                } else if result.is_err() {
                    refused += 1;
                    assert_eq!(image, input, "byte {at} = {v:#x}: refused but edited");
                } else {
                    // Accepted: one symbol's section index and value written,
                    // after which that symbol is no longer undefined.
                    let edit = changed_at(&input, &image);
                    assert!(
                        !edit.is_empty() && edit[edit.len() - 1] - edit[0] < 10,
                        "byte {at} = {v:#x}: edited {edit:?}"
                    );
                    let before = image.clone();
                    assert!(make_symbols_absolute(&mut image, &values).is_err());
                    assert_eq!(image, before);
                }
                let name = modinfo_name(&input);
                if !read_by_modinfo.iter().any(|r| r.contains(&at)) {
                    assert_eq!(name.unwrap(), None, "byte {at} = {v:#x}");
                }
            }
        }
        assert!(refused > 0);

        let with = |at: usize, v: u8| {
            let mut image = original.clone();
            image[at] = v;
            make_symbols_absolute(&mut image, &values)
                .unwrap_err()
                .to_string()
        };
        assert!(with(0, 0).contains("not an ELF file"));
        assert!(with(4, 1).contains("not a 64-bit ELF"));
        assert!(with(5, 3).contains("unknown ELF byte order"));
        assert!(with(5, 2).contains("big-endian"));
        assert!(make_symbols_absolute(&mut b"nope".to_vec(), &values).is_err());
    }

    #[test]
    fn finds_modinfo_name() {
        let dir = tempfile::tempdir().unwrap();
        let image = compile(
            dir.path(),
            "__attribute__((section(\".modinfo\"), used)) static const char a[] = \"license=GPL\";\n\
             __attribute__((section(\".modinfo\"), used)) static const char b[] = \"name=dynamos_fix\";\n",
        );
        assert_eq!(
            modinfo_name(&image).unwrap().as_deref(),
            Some("dynamos_fix")
        );
    }
}
