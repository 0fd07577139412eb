//! Editing the livepatch module image before it is loaded: resolved
//! kernel symbols become absolute symbols, so the kernel's module loader
//! applies every relocation against them.

use anyhow::{anyhow, bail, Result};

const SHT_SYMTAB: u32 = 2;
const SHN_UNDEF: u16 = 0;
const SHN_ABS: u16 = 0xfff1;
const STB_GLOBAL: u8 = 1;
const SYM_SIZE: usize = 24;

struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

struct Elf {
    big_endian: bool,
    sections: Vec<Section>,
    shstrndx: usize,
}

fn bytes_at(data: &[u8], offset: u64, len: u64) -> Result<&[u8]> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= data.len() as u64)
        .ok_or_else(|| anyhow!("module image is damaged: data out of bounds"))?;
    Ok(&data[offset as usize..end as usize])
}

impl Elf {
    fn parse(data: &[u8]) -> Result<Elf> {
        if data.len() < 64 || data[..4] != *b"\x7fELF" {
            bail!("package module is not an ELF file");
        }
        if data[4] != 2 {
            bail!("package module is not a 64-bit ELF file");
        }
        let big_endian = match data[5] {
            1 => false,
            2 => true,
            _ => bail!("package module has an unknown ELF byte order"),
        };
        let mut elf = Elf {
            big_endian,
            sections: Vec::new(),
            shstrndx: 0,
        };
        let shoff = elf.u64(data, 0x28)?;
        let shentsize = elf.u16(data, 0x3a)? as u64;
        let mut shnum = elf.u16(data, 0x3c)? as u64;
        let mut shstrndx = elf.u16(data, 0x3e)? as u64;
        if shoff == 0 {
            bail!("package module has no section headers");
        }
        if shentsize < 64 {
            bail!("package module has malformed section headers");
        }
        if shnum == 0 || shstrndx == 0xffff {
            // Extended numbering: the real values live in section 0.
            let first = bytes_at(data, shoff, 64)?;
            if shnum == 0 {
                shnum = elf.u64(first, 0x20)?;
            }
            if shstrndx == 0xffff {
                shstrndx = elf.u32(first, 0x28)? as u64;
            }
        }
        // Bounds-check the whole table before reserving anything for it.
        bytes_at(
            data,
            shoff,
            shnum
                .checked_mul(shentsize)
                .ok_or_else(|| anyhow!("module image is damaged: too many sections"))?,
        )?;
        for i in 0..shnum {
            let h = bytes_at(data, shoff + i * shentsize, 64)?;
            elf.sections.push(Section {
                name: elf.u32(h, 0)?,
                kind: elf.u32(h, 4)?,
                offset: elf.u64(h, 0x18)?,
                size: elf.u64(h, 0x20)?,
                link: elf.u32(h, 0x28)?,
                entsize: elf.u64(h, 0x38)?,
            });
        }
        elf.shstrndx = shstrndx as usize;
        Ok(elf)
    }

    fn u16(&self, d: &[u8], off: u64) -> Result<u16> {
        let b: [u8; 2] = bytes_at(d, off, 2)?.try_into().unwrap();
        Ok(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }
    fn u32(&self, d: &[u8], off: u64) -> Result<u32> {
        let b: [u8; 4] = bytes_at(d, off, 4)?.try_into().unwrap();
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    fn u64(&self, d: &[u8], off: u64) -> Result<u64> {
        let b: [u8; 8] = bytes_at(d, off, 8)?.try_into().unwrap();
        Ok(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }

    fn section_data<'a>(&self, data: &'a [u8], index: usize) -> Result<&'a [u8]> {
        let s = self
            .sections
            .get(index)
            .ok_or_else(|| anyhow!("module image is damaged: bad section index {index}"))?;
        bytes_at(data, s.offset, s.size)
    }

    fn section_name<'a>(&self, data: &'a [u8], index: usize) -> Result<&'a [u8]> {
        let strtab = self.section_data(data, self.shstrndx)?;
        c_str_at(strtab, self.sections[index].name as usize)
    }
}

fn c_str_at(table: &[u8], offset: usize) -> Result<&[u8]> {
    let tail = table
        .get(offset..)
        .ok_or_else(|| anyhow!("module image is damaged: name out of bounds"))?;
    let len = tail
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| anyhow!("module image is damaged: unterminated name"))?;
    Ok(&tail[..len])
}

/// Turn each named undefined global symbol of the module image into an
/// absolute symbol with the given value, editing the symbol table in place.
/// Every name must be present exactly once as an undefined global symbol.
pub fn make_symbols_absolute(image: &mut [u8], values: &[(String, u64)]) -> Result<()> {
    let elf = Elf::parse(image)?;
    let mut found = vec![0usize; values.len()];
    let mut edits: Vec<(usize, u64)> = Vec::new(); // (symbol entry offset, value)
    for (index, sec) in elf.sections.iter().enumerate() {
        if sec.kind != SHT_SYMTAB {
            continue;
        }
        if sec.entsize as usize != SYM_SIZE {
            bail!(
                "module image is damaged: symbol table entry size {}",
                sec.entsize
            );
        }
        let symtab = elf.section_data(image, index)?;
        let strtab = elf.section_data(image, sec.link as usize)?;
        for n in 0..symtab.len() / SYM_SIZE {
            let entry = &symtab[n * SYM_SIZE..(n + 1) * SYM_SIZE];
            let name = c_str_at(strtab, elf.u32(entry, 0)? as usize)?;
            let Some(want) = values.iter().position(|(v, _)| v.as_bytes() == name) else {
                continue;
            };
            let shndx = elf.u16(entry, 6)?;
            let bind = entry[4] >> 4;
            if shndx != SHN_UNDEF || bind != STB_GLOBAL {
                bail!(
                    "module symbol {} is not an undefined global symbol",
                    values[want].0
                );
            }
            found[want] += 1;
            edits.push((sec.offset as usize + n * SYM_SIZE, values[want].1));
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
        let (shndx, val) = if elf.big_endian {
            (SHN_ABS.to_be_bytes(), value.to_be_bytes())
        } else {
            (SHN_ABS.to_le_bytes(), value.to_le_bytes())
        };
        image[at + 6..at + 8].copy_from_slice(&shndx);
        image[at + 8..at + 16].copy_from_slice(&val);
    }
    Ok(())
}

/// The `name=` entry of the module's .modinfo section, if any.
pub fn modinfo_name(image: &[u8]) -> Result<Option<String>> {
    let elf = Elf::parse(image)?;
    for index in 0..elf.sections.len() {
        if elf.section_name(image, index)? != b".modinfo" {
            continue;
        }
        let info = elf.section_data(image, index)?;
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
        let elf = Elf::parse(&original).unwrap();
        let shoff = u64::from_le_bytes(original[0x28..0x30].try_into().unwrap()) as usize;
        let headers = shoff..shoff + elf.sections.len() * 64;
        let range = |i: usize| {
            let s = &elf.sections[i];
            s.offset as usize..(s.offset + s.size) as usize
        };
        let mut read_by_edit = vec![0..64, headers.clone()];
        for (i, s) in elf.sections.iter().enumerate() {
            if s.kind == SHT_SYMTAB {
                read_by_edit.push(range(i));
                read_by_edit.push(range(s.link as usize));
            }
        }
        let mut read_by_modinfo = vec![0..64, headers.clone(), range(elf.shstrndx)];
        read_by_modinfo.extend(
            (0..elf.sections.len())
                .filter(|&i| elf.section_name(&original, i).unwrap() == b".modinfo")
                .map(range),
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
