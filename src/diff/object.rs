//! Read side: a relocatable x86-64 ELF object as the diff engine sees it.
//!
//! Everything is validated on the way in (class, machine, type, bounds of
//! every section, symbol and relocation), so later stages index freely.

use anyhow::{bail, Context, Result};
use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use object::Endianness;
use std::path::{Path, PathBuf};

type Header = elf::FileHeader64<Endianness>;

/// Largest section accepted (256 TiB, far beyond any real object): symbol
/// values, sizes and relocation offsets within it stay far from overflow
/// as u64 and as i64, so later stages can add and subtract them freely.
pub const MAX_SECTION_SIZE: u64 = 1 << 48;

/// A name from the object as an error message shows it: on one line, with
/// control characters escaped.
fn shown(name: &str) -> String {
    name.escape_debug().to_string()
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub align: u64,
    pub size: u64,
    pub entsize: u64,
    /// Byte range of the contents in the file; empty for NOBITS.
    file_range: (usize, usize),
    /// Relocations applying to this section, sorted by offset.
    pub relocs: Vec<Reloc>,
}

impl Section {
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    pub fn is_exec(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
    pub fn is_write(&self) -> bool {
        self.flags & u64::from(elf::SHF_WRITE) != 0
    }
    pub fn is_strings(&self) -> bool {
        let both = u64::from(elf::SHF_MERGE | elf::SHF_STRINGS);
        self.flags & both == both
    }
    pub fn is_nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    /// Index into `ObjectFile::symbols`.
    pub symbol: usize,
    pub addend: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolPlace {
    Undefined,
    Absolute,
    Common,
    Section(usize),
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub st_type: u8,
    pub bind: u8,
    pub place: SymbolPlace,
    pub value: u64,
    pub size: u64,
}

impl Symbol {
    pub fn is_function(&self) -> bool {
        self.st_type == elf::STT_FUNC
    }
    pub fn is_object(&self) -> bool {
        self.st_type == elf::STT_OBJECT || self.st_type == elf::STT_TLS
    }
    pub fn is_section(&self) -> bool {
        self.st_type == elf::STT_SECTION
    }
    pub fn is_local(&self) -> bool {
        self.bind == elf::STB_LOCAL
    }
    /// A symbol with a name of its own defined in a section (not a section
    /// or file symbol).
    pub fn is_named_definition(&self) -> bool {
        self.section().is_some()
            && !self.name.is_empty()
            && matches!(
                self.st_type,
                elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE | elf::STT_TLS
            )
    }
    pub fn section(&self) -> Option<usize> {
        match self.place {
            SymbolPlace::Section(i) => Some(i),
            _ => None,
        }
    }
}

/// A parsed relocatable object. Section and symbol indices are the ELF ones.
#[derive(Debug, Clone)]
pub struct ObjectFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
}

impl ObjectFile {
    pub fn read(path: &Path) -> Result<ObjectFile> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<ObjectFile> {
        let fail = |what: &str| format!("{}: {what}", path.display());
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            bail!("{}", fail("not an ELF file"));
        }
        if bytes.get(4) != Some(&elf::ELFCLASS64) {
            bail!("{}", fail("not a 64-bit ELF object (x86-64 expected)"));
        }
        let header = Header::parse(&*bytes).map_err(|e| anyhow::anyhow!(fail(&e.to_string())))?;
        let endian = header
            .endian()
            .map_err(|e| anyhow::anyhow!(fail(&e.to_string())))?;
        if header.e_machine(endian) != elf::EM_X86_64 {
            bail!(
                "{}",
                fail(&format!(
                    "machine {} is not x86-64",
                    header.e_machine(endian)
                ))
            );
        }
        if header.e_type(endian) != elf::ET_REL {
            bail!("{}", fail("not a relocatable object (ET_REL)"));
        }
        let data = &*bytes;
        let table = header
            .sections(endian, data)
            .map_err(|e| anyhow::anyhow!(fail(&e.to_string())))?;
        let mut sections = Vec::with_capacity(table.len());
        for (index, sh) in table.iter().enumerate() {
            let name = table
                .section_name(endian, sh)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .map_err(|e| anyhow::anyhow!(fail(&format!("section {index}: {e}"))))?;
            let sh_type = sh.sh_type(endian);
            // An inactive section has no contents, whatever its size says.
            let size = if sh_type == elf::SHT_NULL {
                0
            } else {
                sh.sh_size(endian)
            };
            if size > MAX_SECTION_SIZE {
                bail!(
                    "{}",
                    fail(&format!("section {} claims {size:#x} bytes", shown(&name)))
                );
            }
            let file_range = if sh_type == elf::SHT_NOBITS || sh_type == elf::SHT_NULL {
                (0, 0)
            } else {
                let start = usize::try_from(sh.sh_offset(endian)).unwrap_or(usize::MAX);
                let len = usize::try_from(size).unwrap_or(usize::MAX);
                match start.checked_add(len) {
                    Some(end) if end <= data.len() => (start, end),
                    _ => bail!(
                        "{}",
                        fail(&format!(
                            "section {} lies outside the file (truncated?)",
                            shown(&name)
                        ))
                    ),
                }
            };
            sections.push(Section {
                name,
                sh_type,
                flags: sh.sh_flags(endian),
                align: sh.sh_addralign(endian),
                size,
                entsize: sh.sh_entsize(endian),
                file_range,
                relocs: Vec::new(),
            });
        }

        let symtab = table
            .symbols(endian, data, elf::SHT_SYMTAB)
            .map_err(|e| anyhow::anyhow!(fail(&e.to_string())))?;
        let mut symbols = Vec::with_capacity(symtab.len());
        for (index, sym) in symtab.iter().enumerate() {
            let raw_name = symtab
                .symbol_name(endian, sym)
                .map_err(|e| anyhow::anyhow!(fail(&format!("symbol {index}: {e}"))))?;
            let shndx = sym.st_shndx(endian);
            let place = match shndx {
                elf::SHN_UNDEF => SymbolPlace::Undefined,
                elf::SHN_ABS => SymbolPlace::Absolute,
                elf::SHN_COMMON => SymbolPlace::Common,
                elf::SHN_XINDEX => bail!("{}", fail("extended section indices are not supported")),
                i if usize::from(i) < sections.len() => SymbolPlace::Section(usize::from(i)),
                i => bail!(
                    "{}",
                    fail(&format!("symbol {index} refers to missing section {i}"))
                ),
            };
            let mut name = String::from_utf8_lossy(raw_name).into_owned();
            if sym.st_type() == elf::STT_SECTION {
                if let SymbolPlace::Section(i) = place {
                    name = sections[i].name.clone();
                }
            }
            let (value, size) = (sym.st_value(endian), sym.st_size(endian));
            if let SymbolPlace::Section(i) = place {
                // Later stages index section contents by symbol extents.
                let section = &sections[i];
                if value.checked_add(size).is_none_or(|end| end > section.size) {
                    bail!(
                        "{}",
                        fail(&format!(
                            "symbol {} ({value:#x}, {size:#x} bytes) lies outside section {} ({:#x} bytes)",
                            shown(&name),
                            shown(&section.name),
                            section.size
                        ))
                    );
                }
            }
            symbols.push(Symbol {
                name,
                st_type: sym.st_type(),
                bind: sym.st_bind(),
                place,
                value,
                size,
            });
        }

        for sh in table.iter() {
            if sh.sh_type(endian) == elf::SHT_REL {
                bail!("{}", fail("REL relocations are not used on x86-64"));
            }
            if sh.sh_type(endian) != elf::SHT_RELA {
                continue;
            }
            let target = sh.sh_info(endian) as usize;
            if target == 0 || target >= sections.len() {
                bail!(
                    "{}",
                    fail("relocation section applies to a missing section")
                );
            }
            let (relas, _) = sh
                .rela(endian, data)
                .map_err(|e| anyhow::anyhow!(fail(&e.to_string())))?
                .with_context(|| fail("bad relocation section"))?;
            let target_size = sections[target].size;
            let mut relocs = Vec::with_capacity(relas.len());
            for rela in relas {
                let symbol = rela.r_sym(endian, false) as usize;
                let offset = rela.r_offset(endian);
                if symbol >= symbols.len() {
                    bail!("{}", fail("relocation refers to a missing symbol"));
                }
                let r_type = rela.r_type(endian, false);
                // The field it patches must fit; an unknown type is refused
                // later with a reason, so only its start is checked here.
                let width = reloc_width(r_type).unwrap_or(0).max(1) as u64;
                if offset
                    .checked_add(width)
                    .is_none_or(|end| end > target_size)
                {
                    bail!(
                        "{}",
                        fail(&format!(
                            "relocation at {offset:#x} lies outside {} ({target_size:#x} bytes)",
                            shown(&sections[target].name)
                        ))
                    );
                }
                relocs.push(Reloc {
                    offset,
                    r_type,
                    symbol,
                    addend: rela.r_addend(endian),
                });
            }
            relocs.sort_by_key(|r| r.offset);
            sections[target].relocs = relocs;
        }

        Ok(ObjectFile {
            path: path.to_path_buf(),
            bytes,
            sections,
            symbols,
        })
    }

    /// Contents of a section; empty for NOBITS sections.
    pub fn data(&self, section: usize) -> &[u8] {
        let (start, end) = self.sections[section].file_range;
        &self.bytes[start..end]
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Index of the section called `name`.
    pub fn section_by_name(&self, name: &str) -> Option<usize> {
        self.sections.iter().position(|s| s.name == name)
    }

    /// Named (function or object) symbols defined in `section`, by address.
    pub fn symbols_in(&self, section: usize) -> Vec<usize> {
        let mut found: Vec<usize> = self
            .symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| s.section() == Some(section) && (s.is_function() || s.is_object()))
            .map(|(i, _)| i)
            .collect();
        found.sort_by_key(|&i| self.symbols[i].value);
        found
    }
}

/// Bytes a relocation of type `r_type` patches, or None for a type this
/// tool does not know. Covers what compilers emit for kernel and user
/// objects, so any object can be compared.
pub fn reloc_width(r_type: u32) -> Option<usize> {
    match r_type {
        // What recordmcount and objtool leave where they turned an mcount
        // call into a NOP: patches nothing.
        elf::R_X86_64_NONE => Some(0),
        elf::R_X86_64_64
        | elf::R_X86_64_PC64
        | elf::R_X86_64_GOTOFF64
        | elf::R_X86_64_GOTPC64
        | elf::R_X86_64_SIZE64 => Some(8),
        elf::R_X86_64_PC32
        | elf::R_X86_64_PLT32
        | elf::R_X86_64_32
        | elf::R_X86_64_32S
        | elf::R_X86_64_GOT32
        | elf::R_X86_64_GOTPCREL
        | elf::R_X86_64_GOTPCRELX
        | elf::R_X86_64_REX_GOTPCRELX
        | elf::R_X86_64_GOTPC32
        | elf::R_X86_64_TLSGD
        | elf::R_X86_64_TLSLD
        | elf::R_X86_64_GOTTPOFF
        | elf::R_X86_64_DTPOFF32
        | elf::R_X86_64_TPOFF32
        | elf::R_X86_64_SIZE32 => Some(4),
        elf::R_X86_64_16 | elf::R_X86_64_PC16 => Some(2),
        elf::R_X86_64_8 | elf::R_X86_64_PC8 => Some(1),
        _ => None,
    }
}

/// Whether the kernel's module loader can apply this relocation type
/// (x86-64 `apply_relocate_add` in Linux 6.1; it skips R_X86_64_NONE).
pub fn reloc_is_module_loadable(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_NONE
            | elf::R_X86_64_64
            | elf::R_X86_64_32
            | elf::R_X86_64_32S
            | elf::R_X86_64_PC32
            | elf::R_X86_64_PLT32
            | elf::R_X86_64_PC64
    )
}

/// Whether the relocation is relative to the place it patches.
pub fn reloc_is_pc_relative(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_PC32
            | elf::R_X86_64_PLT32
            | elf::R_X86_64_PC64
            | elf::R_X86_64_PC16
            | elf::R_X86_64_PC8
            | elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_GOTPC32
            | elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_GOTTPOFF
    )
}
