//! Where a function's locals are at each call it makes, from DWARF.
//!
//! A kernel thread restarted into a new version stops where its main
//! function calls the function it sleeps in. At that call the update
//! module has the thread's registers (its ftrace handler saves them all)
//! and its stack; the original build's location lists say which register,
//! stack slot or constant holds each local at that instruction. Only plain
//! places are used: a local the compiler split into pieces, optimized out
//! or can only recompute (an entry value, an arithmetic expression) is not
//! carried.

use super::object::ObjectFile;
use super::types::Sections;
use crate::package::{LocalLocation, ThreadStateSite};
use anyhow::{anyhow, bail, Context, Result};
use gimli::{
    constants as dw, AttributeValue, BaseAddresses, CfaRule, DebugFrame, EndianSlice, LittleEndian,
    Operation, SectionId, UnitOffset, UnwindContext, UnwindSection,
};
use object::elf;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Where the function's section is placed while reading: far from the
/// other code sections, which all start at 0 in a relocatable object.
const PLACED_AT: u64 = 1 << 40;

const SECTIONS: [SectionId; 11] = [
    SectionId::DebugLine,
    SectionId::DebugInfo,
    SectionId::DebugAbbrev,
    SectionId::DebugStr,
    SectionId::DebugLineStr,
    SectionId::DebugStrOffsets,
    SectionId::DebugLoc,
    SectionId::DebugLocLists,
    SectionId::DebugRanges,
    SectionId::DebugRngLists,
    SectionId::DebugAddr,
];

/// For each direct call `function` makes in `obj`, in its own code and in
/// its `.cold` part (where GCC moves what it deems unlikely, sometimes a
/// thread's whole loop), where each of `locals` (top-level locals of the
/// function, by name) is just before the call.
pub fn locals_at_calls(
    obj: &ObjectFile,
    function: &str,
    locals: &[String],
) -> Result<Vec<ThreadStateSite>> {
    let cold = format!("{function}.cold");
    // (part, its section, start and end in the section, where it is placed)
    let mut parts = Vec::new();
    for (k, name) in [function, cold.as_str()].into_iter().enumerate() {
        let Some(symbol) = obj
            .symbols
            .iter()
            .find(|s| s.is_function() && s.name == name && s.section().is_some())
        else {
            continue;
        };
        let section = symbol.section().expect("checked");
        // Both in one section: one placement serves both.
        let base = match parts.iter().find(|&&(_, s, _, _, _)| s == section) {
            Some(&(_, _, _, _, base)) => base,
            None => PLACED_AT * (k as u64 + 1),
        };
        parts.push((
            name,
            section,
            symbol.value,
            symbol.value + symbol.size,
            base,
        ));
    }
    let Some(&(_, _, main_start, _, main_base)) = parts.first().filter(|p| p.0 == function) else {
        bail!("{function} is not defined in {}", obj.path.display());
    };
    let placed: Vec<(usize, u64)> = parts.iter().map(|p| (p.1, p.4)).collect();
    let sections = Sections::load_placed(obj, &SECTIONS, &placed)?;
    let frame = Sections::load_placed(obj, &[SectionId::DebugFrame], &placed)?;
    let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>> {
        Ok(EndianSlice::new(sections.get(id), LittleEndian))
    })?;
    let mut debug_frame = DebugFrame::new(frame.get(SectionId::DebugFrame), LittleEndian);
    debug_frame.set_address_size(8);
    let subprogram = find_subprogram(&dwarf, main_base + main_start)
        .with_context(|| format!("{}: malformed DWARF", obj.path.display()))?
        .ok_or_else(|| anyhow!("{}: no debug info for {function}", obj.path.display()))?;
    let mut sites = Vec::new();
    for &(part, section, start, end, base) in &parts {
        for (call, return_address, callee) in direct_calls(obj, section, start, end) {
            let pc = base + call;
            let cfa = cfa_at(&debug_frame, pc);
            let locations = locals
                .iter()
                .map(|name| {
                    let variable = subprogram.variables.iter().find(|v| &v.name == name)?;
                    variable.location_at(&dwarf, &subprogram, pc, cfa)
                })
                .collect();
            sites.push(ThreadStateSite {
                part: part.to_string(),
                return_offset: return_address - start,
                callee,
                locations,
            });
        }
    }
    Ok(sites)
}

/// `call rel32` instructions in `[start, end)` of code section `section`,
/// as (offset of the call, offset after it, callee), offsets from the
/// section start.
fn direct_calls(obj: &ObjectFile, section: usize, start: u64, end: u64) -> Vec<(u64, u64, String)> {
    let code = obj.data(section);
    let mut calls: Vec<(u64, u64, String)> = obj.sections[section]
        .relocs
        .iter()
        .filter(|r| matches!(r.r_type, elf::R_X86_64_PLT32 | elf::R_X86_64_PC32))
        .filter(|r| r.offset > start && r.offset + 4 <= end)
        .filter(|r| code.get(r.offset as usize - 1) == Some(&0xe8))
        .map(|r| {
            let callee = obj.symbols.get(r.symbol).map_or("", |s| s.name.as_str());
            (r.offset - 1, r.offset + 4, callee.to_string())
        })
        .collect();
    calls.sort();
    calls.dedup();
    calls
}

/// The CFA rule at `pc` as (register, offset), if the CFI has a plain one.
fn cfa_at(debug_frame: &DebugFrame<R<'_>>, pc: u64) -> Option<(u16, i64)> {
    let bases = BaseAddresses::default();
    let mut context = Box::new(UnwindContext::new());
    let fde = debug_frame
        .fde_for_address(&bases, pc, DebugFrame::cie_from_offset)
        .ok()?;
    let row = fde
        .unwind_info_for_address(debug_frame, &bases, &mut context, pc)
        .ok()?;
    match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => Some((register.0, *offset)),
        CfaRule::Expression(_) => None,
    }
}

/// The subprogram whose code starts at `address` and its top-level locals.
struct Subprogram<'d> {
    unit: gimli::Unit<R<'d>>,
    frame_base: Option<gimli::Expression<R<'d>>>,
    variables: Vec<Variable<'d>>,
}

struct Variable<'d> {
    name: String,
    location: Option<AttributeValue<R<'d>>>,
    /// DW_AT_const_value: the same value everywhere.
    constant: Option<u64>,
    size: Option<u64>,
}

fn find_subprogram<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    address: u64,
) -> Result<Option<Subprogram<'d>>> {
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let mut found: Option<(isize, Option<gimli::Expression<R<'d>>>)> = None;
        let mut variables = Vec::new();
        let mut cursor = unit.entries();
        while let Some(entry) = cursor.next_dfs()? {
            let depth = entry.depth();
            if let Some((at, _)) = found {
                if depth <= at {
                    break;
                }
                if depth == at + 1 && entry.tag() == dw::DW_TAG_variable {
                    let name = name_of(dwarf, &unit, entry)?.unwrap_or_default();
                    // A concrete copy of a function inlined elsewhere types
                    // its locals in the abstract instance.
                    let typed = match entry.attr_value(dw::DW_AT_abstract_origin) {
                        Some(AttributeValue::UnitRef(origin))
                            if entry.attr_value(dw::DW_AT_type).is_none() =>
                        {
                            unit.entry(origin)?.attr_value(dw::DW_AT_type)
                        }
                        _ => entry.attr_value(dw::DW_AT_type),
                    };
                    let size = match typed {
                        Some(AttributeValue::UnitRef(t)) => type_size(&unit, t, 0)?,
                        _ => None,
                    };
                    variables.push(Variable {
                        name,
                        location: entry.attr_value(dw::DW_AT_location),
                        constant: entry.attr_value(dw::DW_AT_const_value).and_then(|v| {
                            v.sdata_value()
                                .map(|s| s as u64)
                                .or_else(|| v.udata_value())
                        }),
                        size,
                    });
                }
                continue;
            }
            if entry.tag() != dw::DW_TAG_subprogram {
                continue;
            }
            // A function split into hot and cold parts has DW_AT_ranges.
            let mut ranges = dwarf.die_ranges(&unit, entry)?;
            let mut starts_here = false;
            while let Some(range) = ranges.next()? {
                starts_here |= range.begin == address;
            }
            if starts_here {
                let frame_base = match entry.attr_value(dw::DW_AT_frame_base) {
                    Some(AttributeValue::Exprloc(e)) => Some(e),
                    _ => None,
                };
                found = Some((depth, frame_base));
            }
        }
        if let Some((_, frame_base)) = found {
            return Ok(Some(Subprogram {
                unit,
                frame_base,
                variables,
            }));
        }
    }
    Ok(None)
}

/// DW_AT_name, also through DW_AT_abstract_origin (a concrete copy of a
/// function that is inlined elsewhere names its locals there).
fn name_of(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    entry: &gimli::DebuggingInformationEntry<R<'_>>,
) -> Result<Option<String>> {
    if let Some(name) = entry.attr_value(dw::DW_AT_name) {
        let text = dwarf.attr_string(unit, name)?;
        return Ok(Some(text.to_string_lossy().into_owned()));
    }
    if let Some(AttributeValue::UnitRef(origin)) = entry.attr_value(dw::DW_AT_abstract_origin) {
        let origin = unit.entry(origin)?;
        if let Some(name) = origin.attr_value(dw::DW_AT_name) {
            let text = dwarf.attr_string(unit, name)?;
            return Ok(Some(text.to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// Byte size of a type, through typedefs and qualifiers.
fn type_size(unit: &gimli::Unit<R<'_>>, at: UnitOffset, depth: usize) -> Result<Option<u64>> {
    if depth > 16 {
        bail!("type chain too deep");
    }
    let entry = unit.entry(at)?;
    if let Some(size) = entry
        .attr_value(dw::DW_AT_byte_size)
        .and_then(|v| v.udata_value())
    {
        return Ok(Some(size));
    }
    match entry.tag() {
        dw::DW_TAG_pointer_type => Ok(Some(8)),
        dw::DW_TAG_typedef | dw::DW_TAG_const_type | dw::DW_TAG_volatile_type => {
            match entry.attr_value(dw::DW_AT_type) {
                Some(AttributeValue::UnitRef(t)) => type_size(unit, t, depth + 1),
                _ => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

impl Variable<'_> {
    /// Where the variable is at `pc`, if somewhere the module can read.
    fn location_at(
        &self,
        dwarf: &gimli::Dwarf<R<'_>>,
        subprogram: &Subprogram,
        pc: u64,
        cfa: Option<(u16, i64)>,
    ) -> Option<LocalLocation> {
        let size = u8::try_from(self.size?)
            .ok()
            .filter(|s| (1..=8).contains(s))?;
        if let Some(value) = self.constant {
            return Some(LocalLocation::Constant { value, size });
        }
        let expression = match self.location? {
            AttributeValue::Exprloc(e) => e,
            value => {
                let mut list = dwarf.attr_locations(&subprogram.unit, value).ok()??;
                let mut at = None;
                while let Ok(Some(entry)) = list.next() {
                    if entry.range.begin <= pc && pc < entry.range.end {
                        at = Some(entry.data);
                        break;
                    }
                }
                at?
            }
        };
        let encoding = subprogram.unit.encoding();
        let operations = operations(expression, encoding)?;
        match operations.as_slice() {
            [Operation::Register { register }] => Some(LocalLocation::Register {
                register: register.0,
                size,
            }),
            [Operation::RegisterOffset {
                register, offset, ..
            }] => Some(LocalLocation::Memory {
                base: register.0,
                offset: *offset,
                size,
            }),
            [Operation::FrameOffset { offset }] => {
                let base = operations_of_frame_base(subprogram, encoding)?;
                match base.as_slice() {
                    [Operation::CallFrameCFA] => {
                        let (register, cfa_offset) = cfa?;
                        Some(LocalLocation::Memory {
                            base: register,
                            offset: cfa_offset.checked_add(*offset)?,
                            size,
                        })
                    }
                    [Operation::Register { register }] => Some(LocalLocation::Memory {
                        base: register.0,
                        offset: *offset,
                        size,
                    }),
                    _ => None,
                }
            }
            [Operation::UnsignedConstant { value }, Operation::StackValue] => {
                Some(LocalLocation::Constant {
                    value: *value,
                    size,
                })
            }
            [Operation::SignedConstant { value }, Operation::StackValue] => {
                Some(LocalLocation::Constant {
                    value: *value as u64,
                    size,
                })
            }
            _ => None,
        }
    }
}

fn operations_of_frame_base<'d>(
    subprogram: &Subprogram<'d>,
    encoding: gimli::Encoding,
) -> Option<Vec<Operation<R<'d>>>> {
    operations(subprogram.frame_base?, encoding)
}

fn operations<'d>(
    expression: gimli::Expression<R<'d>>,
    encoding: gimli::Encoding,
) -> Option<Vec<Operation<R<'d>>>> {
    let mut out = Vec::new();
    let mut iter = expression.operations(encoding);
    while let Some(op) = iter.next().ok()? {
        out.push(op);
        if out.len() > 8 {
            return None;
        }
    }
    Some(out)
}
