//! Functions that differ only because source lines moved.
//!
//! A patch that adds or removes lines shifts `__LINE__` for everything
//! below the edit. Where a macro passes `__LINE__` to a function at run
//! time (`might_sleep()`, `might_fault()`, ...), the line number is an
//! immediate in the code, so an untouched function still compiles to
//! different bytes. Such a function must not count as changed.
//!
//! The test here is deliberately narrow. Two versions of a function are
//! "the same but line numbers" only when they decode to the same
//! instructions with the same relocations, and every byte that differs
//! lies in the immediate of a `mov $imm, %reg` whose value (in both
//! versions) looks like a line number and whose register is provably the
//! line argument of a call to a function known to take one:
//!
//! * the `mov` writes a whole 32- or 64-bit general register;
//! * it is followed, within [`WINDOW`] instructions, by a direct call
//!   (or tail-call jump) whose relocation names a known line consumer;
//! * no instruction in between branches, reads or writes that register,
//!   or is a multi-byte nop (a site the kernel may patch into a jump:
//!   static keys, alternatives);
//! * the register is the consumer's line argument (see
//!   [`LINE_CONSUMERS`]);
//! * after a call, the register is not read again before being
//!   overwritten (it is caller-saved, so nothing may rely on it).
//!
//! Under these conditions the immediate's only use is the line argument,
//! so its value cannot change what the function computes beyond the
//! diagnostic it prints. Anything else, including code that does not
//! decode cleanly, makes the answer `false`.

use iced_x86::{
    Code as Op, ConstantOffsets, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use std::collections::BTreeSet;

/// A function's code for comparison.
#[derive(Debug, Clone, Copy)]
pub struct Code<'a> {
    pub bytes: &'a [u8],
    /// (offset in `bytes`, width in bytes, canonical target text — e.g.
    /// "__might_sleep", "printk", or "str:\"fs/proc/version.c\"") of every
    /// relocation, sorted by offset. A call target must be the bare symbol
    /// name; a string literal must be `str:` followed by its contents in
    /// double quotes.
    pub relocs: &'a [(u64, usize, String)],
}

/// How far (in instructions) a line-number `mov` may sit from its call.
pub const WINDOW: usize = 16;

/// Largest immediate taken for a line number.
pub const MAX_LINE: i64 = 100_000;

/// Which argument of a consumer carries the line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineArg {
    /// The n-th argument (1-based, passed in a register: 1 to 6), e.g. 2
    /// for `f(const char *file, int line, ...)` (`%esi`).
    Argument(usize),
    /// A variadic argument placed directly after an argument that is a
    /// source path string (`printk(fmt, __FILE__, __LINE__)`): the
    /// position is not fixed by the prototype, so the `__FILE__` next to
    /// it is required as evidence.
    AfterFile,
}

/// Functions that take `__LINE__`, as declared in Linux 6.1:
///
/// * `__might_sleep(const char *file, int line)` — `might_sleep()`,
///   include/linux/kernel.h;
/// * `__might_resched(const char *file, int line, unsigned int offsets)` —
///   `cond_resched()` and the `*_lock` variants, include/linux/sched.h;
/// * `__might_fault(const char *file, int line)` — `might_fault()`,
///   include/linux/kernel.h;
/// * `__cant_sleep(const char *file, int line, int preempt_offset)` and
///   `__cant_migrate(const char *file, int line)` — include/linux/kernel.h;
/// * `lockdep_rcu_suspicious(const char *file, const int line, const char *s)`
///   — `RCU_LOCKDEP_WARN()`, include/linux/rcupdate.h;
/// * `warn_slowpath_fmt(const char *file, const int line, unsigned taint, ...)`
///   — `__WARN_printf()` on architectures without `__WARN_FLAGS`,
///   include/asm-generic/bug.h;
/// * `_printk(const char *fmt, ...)` (and `printk`, its name before 5.15)
///   when called as `printk(fmt, ..., __FILE__, __LINE__, ...)`, e.g.
///   the generic `BUG()` in include/asm-generic/bug.h.
///
/// Deliberately absent: `__warn_printk` (takes only the format; WARN's
/// line lives in `__bug_table`, data the diff compares separately),
/// `___might_sleep` (gone since 5.16, replaced by `__might_resched`),
/// `__dynamic_pr_debug` (the line is in the `__dyndbg` descriptor, not an
/// argument), and the lock initialisers `__mutex_init`, `__init_rwsem`,
/// `__raw_spin_lock_init`, `lockdep_init_map_type` (name and class key,
/// no line).
///
/// ext4's error, journalling and checking helpers take `__LINE__` too, in
/// the positions their 6.1 prototypes in fs/ext4/{ext4,ext4_jbd2}.h,
/// extents.c and xattr.c give (a fix that adds a line to an ext4 file
/// would otherwise change every function below it that can report an
/// error). Other subsystems' helpers (btrfs, ACPI, sound, ...) are not
/// covered: a function using them still counts as changed when only
/// lines moved.
pub const LINE_CONSUMERS: &[(&str, LineArg)] = &[
    ("__might_sleep", LineArg::Argument(2)),
    ("__might_resched", LineArg::Argument(2)),
    ("__might_fault", LineArg::Argument(2)),
    ("__cant_sleep", LineArg::Argument(2)),
    ("__cant_migrate", LineArg::Argument(2)),
    ("lockdep_rcu_suspicious", LineArg::Argument(2)),
    ("warn_slowpath_fmt", LineArg::Argument(2)),
    ("_printk", LineArg::AfterFile),
    ("printk", LineArg::AfterFile),
    // ext4: (function, line, ...)
    ("__ext4_check_dir_entry", LineArg::Argument(2)),
    ("__ext4_grp_locked_error", LineArg::Argument(2)),
    ("ext4_check_blockref", LineArg::Argument(2)),
    ("__ext4_journal_get_write_access", LineArg::Argument(2)),
    ("__ext4_journal_get_create_access", LineArg::Argument(2)),
    ("__ext4_forget", LineArg::Argument(2)),
    ("__ext4_handle_dirty_metadata", LineArg::Argument(2)),
    ("__ext4_journal_stop", LineArg::Argument(2)),
    ("__ext4_ext_check", LineArg::Argument(2)),
    ("__ext4_ext_dirty", LineArg::Argument(2)),
    // ext4: (sb or inode or handle, line, ...)
    ("__ext4_journal_start_sb", LineArg::Argument(2)),
    ("__ext4_journal_start", LineArg::Argument(2)),
    ("__ext4_journal_start_reserved", LineArg::Argument(2)),
    // ext4: (object, function, line, ...)
    ("__ext4_error", LineArg::Argument(3)),
    ("__ext4_error_inode", LineArg::Argument(3)),
    ("__ext4_error_file", LineArg::Argument(3)),
    ("__ext4_warning", LineArg::Argument(3)),
    ("__ext4_warning_inode", LineArg::Argument(3)),
    ("__ext4_std_error", LineArg::Argument(3)),
    // ext4: further along
    ("__dump_mmp_msg", LineArg::Argument(4)),
    ("__ext4_mark_inode_dirty", LineArg::Argument(4)),
    ("__ext4_iget", LineArg::Argument(5)),
    ("__xattr_check_inode", LineArg::Argument(5)),
];

/// Integer argument registers of the x86-64 SysV calling convention.
pub(crate) const ARGUMENT_REGISTERS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// True when `a` and `b` are the same code except for immediates that are
/// source line numbers passed to a line-consuming call.
pub fn same_but_line_numbers(a: &Code, b: &Code) -> bool {
    if a.bytes.len() != b.bytes.len() || a.relocs != b.relocs || !relocs_valid(a) {
        return false;
    }
    let covered = relocated_bytes(a);
    let differing: Vec<usize> = (0..a.bytes.len())
        .filter(|&i| !covered[i] && a.bytes[i] != b.bytes[i])
        .collect();
    if differing.is_empty() {
        return true;
    }
    let (Some(da), Some(db)) = (Decoded::new(a), Decoded::new(b)) else {
        return false;
    };
    if da.instrs.len() != db.instrs.len() {
        return false;
    }
    let same_shape = da
        .instrs
        .iter()
        .zip(&db.instrs)
        .all(|(x, y)| x.ip() == y.ip() && x.len() == y.len() && x.code() == y.code());
    if !same_shape {
        return false;
    }

    let mut checked: BTreeSet<usize> = BTreeSet::new();
    for &at in &differing {
        let index = da.index_at(at as u64);
        if !checked.insert(index) {
            continue;
        }
        let start = da.instrs[index].ip() as usize;
        let (imm_start, imm_end) = immediate_field(&da.instrs[index], &da.offsets[index]);
        let end = start + da.instrs[index].len();
        let only_immediate = (start..end)
            .filter(|&i| !covered[i] && a.bytes[i] != b.bytes[i])
            .all(|i| i >= start + imm_start && i < start + imm_end);
        if !only_immediate || !da.is_line_site(index) || !db.is_line_site(index) {
            return false;
        }
    }
    true
}

/// Offsets of the immediate fields `same_but_line_numbers` would accept a
/// change in: `(offset of the field in bytes, field width, callee)`.
/// `None` when the code does not decode cleanly or its relocation list is
/// malformed.
pub fn line_number_sites(code: &Code) -> Option<Vec<(u64, usize, &'static str)>> {
    if !relocs_valid(code) {
        return None;
    }
    let decoded = Decoded::new(code)?;
    let mut sites = Vec::new();
    for index in 0..decoded.instrs.len() {
        if let Some(callee) = decoded.line_site_callee(index) {
            let (start, end) = immediate_field(&decoded.instrs[index], &decoded.offsets[index]);
            sites.push((
                decoded.instrs[index].ip() + start as u64,
                end - start,
                callee,
            ));
        }
    }
    Some(sites)
}

/// Relocations must be sorted, non-overlapping, of a plausible width and
/// inside the code.
fn relocs_valid(code: &Code) -> bool {
    let len = code.bytes.len() as u64;
    let mut next_free = 0u64;
    for (offset, width, _) in code.relocs {
        if !(1..=8).contains(width) || *offset < next_free {
            return false;
        }
        match offset.checked_add(*width as u64) {
            Some(end) if end <= len => next_free = end,
            _ => return false,
        }
    }
    true
}

/// Per byte: whether a relocation overwrites it (its stored value does
/// not matter; the relocation targets are compared instead).
fn relocated_bytes(code: &Code) -> Vec<bool> {
    let mut covered = vec![false; code.bytes.len()];
    for (offset, width, _) in code.relocs {
        let start = *offset as usize;
        covered[start..start + width].fill(true);
    }
    covered
}

/// Byte range of an instruction's (first) immediate, relative to its start.
fn immediate_field(instr: &Instruction, offsets: &ConstantOffsets) -> (usize, usize) {
    if !offsets.has_immediate() || is_branch(instr) {
        return (0, 0);
    }
    let start = offsets.immediate_offset();
    (start, start + offsets.immediate_size())
}

fn is_branch(instr: &Instruction) -> bool {
    matches!(
        instr.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
}

/// Whether `target` names a string literal that is a source file path,
/// as `__FILE__` expands to in a kernel build ("kernel/sched/core.c",
/// "include/linux/sched.h").
fn is_path_string(target: &str) -> bool {
    let Some(path) = target
        .strip_prefix("str:\"")
        .and_then(|rest| rest.strip_suffix('"'))
    else {
        return false;
    };
    (path.ends_with(".c") || path.ends_with(".h"))
        && path.len() > 2
        && path.len() <= 4096
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-' | b'+'))
}

fn consumer(name: &str) -> Option<(&'static str, LineArg)> {
    LINE_CONSUMERS
        .iter()
        .find(|(known, _)| *known == name)
        .copied()
}

/// A function decoded from offset 0, with what the analysis needs.
struct Decoded<'c, 'a> {
    code: &'c Code<'a>,
    instrs: Vec<Instruction>,
    offsets: Vec<ConstantOffsets>,
    /// Offsets jumped to from inside the function.
    targets: BTreeSet<u64>,
    /// An indirect jump makes every instruction a possible target.
    unknown_targets: bool,
}

impl<'c, 'a> Decoded<'c, 'a> {
    fn new(code: &'c Code<'a>) -> Option<Self> {
        let mut decoder = Decoder::with_ip(64, code.bytes, 0, DecoderOptions::NONE);
        let mut instrs = Vec::new();
        let mut offsets = Vec::new();
        while decoder.can_decode() {
            let instr = decoder.decode();
            if instr.is_invalid() {
                return None;
            }
            offsets.push(decoder.get_constant_offsets(&instr));
            instrs.push(instr);
        }
        let mut decoded = Decoded {
            code,
            instrs,
            offsets,
            targets: BTreeSet::new(),
            unknown_targets: false,
        };
        for index in 0..decoded.instrs.len() {
            let instr = &decoded.instrs[index];
            match instr.flow_control() {
                FlowControl::IndirectBranch | FlowControl::XbeginXabortXend => {
                    decoded.unknown_targets = true;
                }
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                    if is_branch(instr) =>
                {
                    // A relocated branch leaves the function.
                    let field = decoded.offsets[index];
                    let start = instr.ip() + field.immediate_offset() as u64;
                    if !decoded.relocated(start, start + field.immediate_size() as u64) {
                        decoded.targets.insert(instr.near_branch_target());
                    }
                }
                _ => {}
            }
        }
        Some(decoded)
    }

    /// Index of the instruction containing byte `at` (which is inside the
    /// code, so some instruction contains it).
    fn index_at(&self, at: u64) -> usize {
        match self.instrs.binary_search_by_key(&at, |i| i.ip()) {
            Ok(i) => i,
            Err(i) => i - 1,
        }
    }

    /// Whether any relocation touches bytes `start..end`.
    fn relocated(&self, start: u64, end: u64) -> bool {
        self.code
            .relocs
            .iter()
            .any(|(offset, width, _)| *offset < end && offset + *width as u64 > start)
    }

    /// The only relocation touching instruction `index`, if it lies
    /// exactly at `field_start..field_start + 4`.
    fn sole_reloc_at(&self, index: usize, field_start: u64) -> Option<&'a str> {
        let instr = &self.instrs[index];
        let mut touching = self.code.relocs.iter().filter(|(offset, width, _)| {
            *offset < instr.next_ip() && offset + *width as u64 > instr.ip()
        });
        let (offset, width, target) = touching.next()?;
        if touching.next().is_some() || *offset != field_start || *width != 4 {
            return None;
        }
        Some(target.as_str())
    }

    /// For a direct `call`/`jmp rel32` whose field is relocated, the
    /// target text.
    fn direct_target(&self, index: usize) -> Option<&'a str> {
        let instr = &self.instrs[index];
        if !matches!(instr.code(), Op::Call_rel32_64 | Op::Jmp_rel32_64) {
            return None;
        }
        self.sole_reloc_at(index, instr.next_ip() - 4)
    }

    fn is_line_site(&self, index: usize) -> bool {
        self.line_site_callee(index).is_some()
    }

    /// If instruction `index` loads a line number for a known consumer,
    /// that consumer's name.
    fn line_site_callee(&self, index: usize) -> Option<&'static str> {
        let instr = &self.instrs[index];
        let value = match instr.code() {
            Op::Mov_r32_imm32 => i64::from(instr.immediate32()),
            Op::Mov_rm32_imm32 if instr.op0_kind() == OpKind::Register => {
                i64::from(instr.immediate32())
            }
            Op::Mov_rm64_imm32 if instr.op0_kind() == OpKind::Register => instr.immediate32to64(),
            _ => return None,
        };
        if !(1..=MAX_LINE).contains(&value) || self.relocated(instr.ip(), instr.next_ip()) {
            return None;
        }
        let register = instr.op0_register().full_register();
        if !register.is_gpr64() {
            return None;
        }

        let mut info = InstructionInfoFactory::new();
        let last = (index + WINDOW).min(self.instrs.len() - 1);
        for next in index + 1..=last {
            if let Some(target) = self.direct_target(next) {
                let (name, arg) = consumer(target)?;
                let passes_line = match arg {
                    LineArg::Argument(n) => {
                        n >= 1 && ARGUMENT_REGISTERS.get(n - 1) == Some(&register)
                    }
                    LineArg::AfterFile => self.file_before(index, next, register),
                };
                if !passes_line {
                    return None;
                }
                let is_call = self.instrs[next].code() == Op::Call_rel32_64;
                if is_call && self.read_after_call(next, register) {
                    return None;
                }
                return Some(name);
            }
            let between = &self.instrs[next];
            if between.flow_control() != FlowControl::Next
                || (between.mnemonic() == Mnemonic::Nop && between.len() > 1)
                || info
                    .info(between)
                    .used_registers()
                    .iter()
                    .any(|u| u.register().full_register() == register)
            {
                return None;
            }
        }
        None
    }

    /// For a variadic consumer: whether the argument register just before
    /// `line_register` holds a source path string when instruction `call`
    /// runs after the line `mov` at `mov`.
    fn file_before(&self, mov: usize, call: usize, line_register: Register) -> bool {
        let Some(position) = ARGUMENT_REGISTERS.iter().position(|&r| r == line_register) else {
            return false;
        };
        // The format string comes first; the file must be a later argument.
        if position < 2 {
            return false;
        }
        let file_register = ARGUMENT_REGISTERS[position - 1];
        let mut info = InstructionInfoFactory::new();
        // The last write between the mov and the call decides...
        for index in (mov + 1..call).rev() {
            if writes(&mut info, &self.instrs[index], file_register) {
                return self.loads_path(index, file_register);
            }
        }
        // ...otherwise the last write before the mov on the straight path
        // into it, with nothing jumping in between.
        for index in (mov.saturating_sub(WINDOW)..mov).rev() {
            let landing = self.instrs[index + 1].ip();
            if self.unknown_targets || self.targets.contains(&landing) {
                return false;
            }
            let instr = &self.instrs[index];
            if instr.flow_control() != FlowControl::Next {
                return false;
            }
            if writes(&mut info, instr, file_register) {
                return self.loads_path(index, file_register);
            }
        }
        false
    }

    /// Whether instruction `index` sets `register` to the address of a
    /// source path string: `mov $str, %reg` or `lea str(%rip), %reg`.
    fn loads_path(&self, index: usize, register: Register) -> bool {
        let instr = &self.instrs[index];
        if instr.op0_kind() != OpKind::Register || instr.op0_register().full_register() != register
        {
            return false;
        }
        let field = self.offsets[index];
        let field_start = match instr.code() {
            Op::Mov_r32_imm32 | Op::Mov_rm32_imm32 | Op::Mov_rm64_imm32 => field.immediate_offset(),
            Op::Lea_r64_m
                if instr.memory_base() == Register::RIP
                    && instr.memory_index() == Register::None =>
            {
                field.displacement_offset()
            }
            _ => return false,
        };
        self.sole_reloc_at(index, instr.ip() + field_start as u64)
            .is_some_and(is_path_string)
    }

    /// Whether `register` is read after the call at `call` before being
    /// overwritten, along the straight run that follows. It is
    /// caller-saved, so a read would mean the code relies on the callee
    /// leaving the line number there.
    fn read_after_call(&self, call: usize, register: Register) -> bool {
        let mut info = InstructionInfoFactory::new();
        let last = (call + WINDOW).min(self.instrs.len() - 1);
        for index in call + 1..=last {
            let instr = &self.instrs[index];
            if instr.flow_control() != FlowControl::Next {
                return false;
            }
            let mut overwritten = false;
            for used in info.info(instr).used_registers() {
                if used.register().full_register() != register {
                    continue;
                }
                let whole = used.register().is_gpr32() || used.register().is_gpr64();
                if used.access() == OpAccess::Write && whole {
                    overwritten = true;
                } else {
                    return true;
                }
            }
            if overwritten {
                return false;
            }
        }
        false
    }
}

/// Whether `instr` may change `register` (any part of it).
fn writes(info: &mut InstructionInfoFactory, instr: &Instruction, register: Register) -> bool {
    info.info(instr).used_registers().iter().any(|u| {
        u.register().full_register() == register
            && matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            )
    })
}
