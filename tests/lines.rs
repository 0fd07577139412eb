//! Line-number-only changes: functions that differ only because `__LINE__`
//! moved are the same; every other difference still counts.
//!
//! C is compiled at test time with kernel-like flags; the same file name
//! is used for both builds so `__FILE__` matches, as it does in a kernel
//! tree.

mod common;

use common::KERNEL_LIKE_FLAGS;
use dynamos::diff::lines::{
    line_number_sites, same_but_line_numbers, Code, LINE_CONSUMERS, MAX_LINE,
};
use dynamos::diff::object::reloc_width;
use dynamos::diff::{InstructionIndex, ObjectFile};
use std::path::Path;
use std::process::Command;

const HEADER: &str = r#"
extern void __might_sleep(const char *file, int line);
extern void __might_fault(const char *file, int line);
extern int _printk(const char *fmt, ...);
extern void other(const char *file, int line);
struct super_block;
extern void __ext4_error(struct super_block *, const char *, unsigned int, _Bool,
			 int, unsigned long long, const char *, ...);
extern void *__ext4_iget(struct super_block *sb, unsigned long ino, int flags,
			 const char *function, unsigned int line);
#define might_sleep() __might_sleep(__FILE__, __LINE__)
#define might_fault() __might_fault(__FILE__, __LINE__)
struct s { int a; int b; };
"#;

/// A translation unit with knobs: `shift` blank/comment lines inserted
/// above the functions, the multiplier in `sleeper`, the callee of its
/// second check, and the constant in `plain`.
struct Source {
    shift: usize,
    factor: u32,
    second_check: &'static str,
    constant: u32,
}

impl Default for Source {
    fn default() -> Self {
        Source {
            shift: 0,
            factor: 3,
            second_check: "might_sleep()",
            constant: 10,
        }
    }
}

impl Source {
    fn text(&self) -> String {
        let mut text = HEADER.to_string();
        for i in 0..self.shift {
            text.push_str(if i % 2 == 0 { "\n" } else { "/* moved */\n" });
        }
        text.push_str(&format!(
            r#"
int sleeper(struct s *p, int x)
{{
	might_sleep();
	p->a = x * {factor};
	if (x > 5)
		_printk("bad %s:%d\n", __FILE__, __LINE__);
	{second};
	return p->b + 10;
}}

int reporter(int x)
{{
	if (x)
		_printk("at %s:%d\n", __FILE__, __LINE__);
	return x;
}}

int bare_line(int x)
{{
	if (x)
		_printk("line %d\n", __LINE__);
	return x;
}}

int unknown_consumer(int x)
{{
	other(__FILE__, __LINE__);
	return x;
}}

int ext4_like(struct super_block *sb, int x)
{{
	if (x < 0)
		__ext4_error(sb, __func__, __LINE__, 1, x, 0, "bad %d", x);
	return __ext4_iget(sb, x, 0, __func__, __LINE__) != 0;
}}

/* The line in the third argument where the callee takes it second. */
int misplaced_line(struct super_block *sb, int x)
{{
	__ext4_iget(sb, x, __LINE__, __func__, 7);
	return x;
}}

int plain(int x)
{{
	return x + {constant};
}}
"#,
            factor = self.factor,
            second = self.second_check,
            constant = self.constant,
        ));
        text
    }
}

fn compile(dir: &Path, source: &Source) -> ObjectFile {
    std::fs::create_dir_all(dir).unwrap();
    let c = dir.join("unit.c");
    let o = dir.join("unit.o");
    std::fs::write(&c, source.text()).unwrap();
    // Compile from inside the directory so __FILE__ is the same relative
    // path for every build.
    let status = Command::new("cc")
        .current_dir(dir)
        .args(KERNEL_LIKE_FLAGS)
        .arg("unit.c")
        .arg("-o")
        .arg("unit.o")
        .status()
        .expect("cc runs");
    assert!(status.success(), "compiling {} failed", c.display());
    ObjectFile::read(&o).unwrap()
}

/// A function's bytes and relocations as `Code` wants them. Targets are
/// bare symbol names when the relocation points at the symbol itself,
/// `str:"..."` for string literals, `name+offset` otherwise.
fn function(
    obj: &ObjectFile,
    section: usize,
    start: u64,
    end: u64,
) -> (Vec<u8>, Vec<(u64, usize, String)>) {
    let bytes = obj.data(section)[start as usize..end as usize].to_vec();
    let mut index = InstructionIndex::default();
    let mut relocs = Vec::new();
    for r in obj.sections[section]
        .relocs
        .iter()
        .filter(|r| r.offset >= start && r.offset < end)
        // NOP'd mcount calls' R_X86_64_NONE patches nothing.
        .filter(|r| reloc_width(r.r_type) != Some(0))
    {
        let width = reloc_width(r.r_type).unwrap_or(4);
        let sym = &obj.symbols[r.symbol];
        let position = r.addend + index.pc_bias(obj, section, r);
        let target = match sym.section() {
            Some(s) if sym.is_section() && obj.sections[s].is_strings() => {
                let data = obj.data(s);
                let start = usize::try_from(position)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let rest = &data[start..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                format!("str:{:?}", String::from_utf8_lossy(&rest[..end]))
            }
            _ if position == 0 => sym.name.clone(),
            _ => format!("{}{:+}", sym.name, position),
        };
        relocs.push((r.offset - start, width, target));
    }
    (bytes, relocs)
}

fn code_of(obj: &ObjectFile, name: &str) -> (Vec<u8>, Vec<(u64, usize, String)>) {
    let section = obj
        .section_by_name(&format!(".text.{name}"))
        .unwrap_or_else(|| panic!("no .text.{name}"));
    function(obj, section, 0, obj.sections[section].size)
}

fn same(a: &ObjectFile, b: &ObjectFile, name: &str) -> bool {
    let (ab, ar) = code_of(a, name);
    let (bb, br) = code_of(b, name);
    let result = same_but_line_numbers(
        &Code {
            bytes: &ab,
            relocs: &ar,
        },
        &Code {
            bytes: &bb,
            relocs: &br,
        },
    );
    let reverse = same_but_line_numbers(
        &Code {
            bytes: &bb,
            relocs: &br,
        },
        &Code {
            bytes: &ab,
            relocs: &ar,
        },
    );
    assert_eq!(result, reverse, "{name}: the answer depends on the order");
    result
}

fn bytes_differ(a: &ObjectFile, b: &ObjectFile, name: &str) -> bool {
    code_of(a, name).0 != code_of(b, name).0
}

fn build(source: Source) -> (tempfile::TempDir, ObjectFile) {
    let dir = tempfile::tempdir().unwrap();
    let obj = compile(dir.path(), &source);
    (dir, obj)
}

#[test]
fn moved_lines_alone_are_the_same() {
    let (_a, orig) = build(Source::default());
    let (_b, moved) = build(Source {
        shift: 3,
        ..Source::default()
    });
    for name in ["sleeper", "reporter", "ext4_like"] {
        assert!(bytes_differ(&orig, &moved, name), "{name} should move");
        assert!(same(&orig, &moved, name), "{name}: only lines moved");
    }
    // Untouched code without line numbers is byte-identical.
    assert!(same(&orig, &moved, "plain"));
}

#[test]
fn line_numbers_for_unknown_callees_still_count() {
    let (_a, orig) = build(Source::default());
    let (_b, moved) = build(Source {
        shift: 3,
        ..Source::default()
    });
    // `other` is not known to take a line number.
    assert!(bytes_differ(&orig, &moved, "unknown_consumer"));
    assert!(!same(&orig, &moved, "unknown_consumer"));
    // A printk with a line but no __FILE__ before it is not trusted.
    assert!(bytes_differ(&orig, &moved, "bare_line"));
    assert!(!same(&orig, &moved, "bare_line"));
    // A known consumer, but the moving value is not its line argument.
    assert!(bytes_differ(&orig, &moved, "misplaced_line"));
    assert!(!same(&orig, &moved, "misplaced_line"));
}

#[test]
fn real_change_with_moved_lines_counts() {
    let (_a, orig) = build(Source::default());
    let (_b, arithmetic) = build(Source {
        shift: 2,
        factor: 5,
        ..Source::default()
    });
    assert!(!same(&orig, &arithmetic, "sleeper"));
    let (_c, other_call) = build(Source {
        shift: 2,
        second_check: "might_fault()",
        ..Source::default()
    });
    assert!(!same(&orig, &other_call, "sleeper"));
}

#[test]
fn other_immediates_count() {
    let (_a, orig) = build(Source::default());
    let (_b, changed) = build(Source {
        constant: 11,
        ..Source::default()
    });
    assert!(bytes_differ(&orig, &changed, "plain"));
    assert!(!same(&orig, &changed, "plain"));
}

#[test]
fn identical_code_is_the_same() {
    let (_a, one) = build(Source::default());
    let (_b, two) = build(Source::default());
    for name in [
        "sleeper",
        "reporter",
        "bare_line",
        "unknown_consumer",
        "plain",
    ] {
        assert!(same(&one, &two, name), "{name}");
    }
}

#[test]
fn sites_are_found_where_lines_are_passed() {
    let (_a, obj) = build(Source::default());
    let (bytes, relocs) = code_of(&obj, "sleeper");
    let sites = line_number_sites(&Code {
        bytes: &bytes,
        relocs: &relocs,
    })
    .unwrap();
    let callees: Vec<&str> = sites.iter().map(|s| s.2).collect();
    assert_eq!(
        callees.iter().filter(|c| **c == "__might_sleep").count(),
        2,
        "{sites:?}"
    );
    assert!(callees.contains(&"_printk"), "{sites:?}");
}

// Hand-assembled sequences for the register rules.

const MOV_ESI_LINE: [u8; 5] = [0xbe, 0x08, 0x00, 0x00, 0x00]; // mov $8, %esi
const MOV_RDI_STR: [u8; 7] = [0x48, 0xc7, 0xc7, 0, 0, 0, 0]; // mov $str, %rdi
const CALL: [u8; 5] = [0xe8, 0, 0, 0, 0];
const RET: [u8; 1] = [0xc3];

/// Assemble pieces; `relocs` names (piece index, offset in piece, target).
fn assemble(
    pieces: &[&[u8]],
    relocs: &[(usize, u64, &str)],
) -> (Vec<u8>, Vec<(u64, usize, String)>) {
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for p in pieces {
        starts.push(bytes.len() as u64);
        bytes.extend_from_slice(p);
    }
    let relocs = relocs
        .iter()
        .map(|(piece, at, target)| (starts[*piece] + at, 4, target.to_string()))
        .collect();
    (bytes, relocs)
}

/// Compare `pieces` with the same pieces where the first mov's immediate
/// is `line`.
fn check(pieces: &[&[u8]], relocs: &[(usize, u64, &str)], line: u32) -> bool {
    let (a, ar) = assemble(pieces, relocs);
    let mut other: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
    let first = other
        .iter()
        .position(|p| p.len() == 5 && (0xb8..=0xbf).contains(&p[0]))
        .expect("a mov $imm, %r32 piece");
    other[first][1..5].copy_from_slice(&line.to_le_bytes());
    let refs: Vec<&[u8]> = other.iter().map(|p| p.as_slice()).collect();
    let (b, br) = assemble(&refs, relocs);
    same_but_line_numbers(
        &Code {
            bytes: &a,
            relocs: &ar,
        },
        &Code {
            bytes: &b,
            relocs: &br,
        },
    )
}

const FILE: &str = "str:\"kernel/sched/core.c\"";

#[test]
fn hand_assembled_rules() {
    let sleep = [(1, 3, FILE), (2, 1, "__might_sleep")];
    // The plain case.
    assert!(check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &RET],
        &sleep,
        9
    ));
    // Line numbers must look like line numbers in both builds.
    assert!(!check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &RET],
        &sleep,
        0
    ));
    assert!(!check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &RET],
        &sleep,
        100_001
    ));
    // Unknown callee.
    assert!(!check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &RET],
        &[(1, 3, FILE), (2, 1, "schedule")],
        9
    ));
    // The wrong argument register: mov $8, %edx before __might_sleep.
    let mov_edx = [0xba, 0x08, 0, 0, 0];
    assert!(!check(&[&mov_edx, &MOV_RDI_STR, &CALL, &RET], &sleep, 9));
    // The register is read before the call: lea 1(%rsi), %eax.
    let read = [0x8d, 0x46, 0x01];
    assert!(!check(
        &[&MOV_ESI_LINE, &read, &MOV_RDI_STR, &CALL, &RET],
        &[(2, 3, FILE), (3, 1, "__might_sleep")],
        9
    ));
    // ...or overwritten: mov %eax, %esi.
    let overwrite = [0x89, 0xc6];
    assert!(!check(
        &[&MOV_ESI_LINE, &overwrite, &MOV_RDI_STR, &CALL, &RET],
        &[(2, 3, FILE), (3, 1, "__might_sleep")],
        9
    ));
    // A branch between the mov and the call: jmp +0.
    let jump = [0xeb, 0x00];
    assert!(!check(
        &[&MOV_ESI_LINE, &jump, &MOV_RDI_STR, &CALL, &RET],
        &[(2, 3, FILE), (3, 1, "__might_sleep")],
        9
    ));
    // A patchable nop (static key) between them.
    let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    assert!(!check(
        &[&MOV_ESI_LINE, &nop5, &MOV_RDI_STR, &CALL, &RET],
        &[(2, 3, FILE), (3, 1, "__might_sleep")],
        9
    ));
    // Read again after the call as if the callee had kept it: mov %esi, %eax.
    let reuse = [0x89, 0xf0];
    assert!(!check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &reuse, &RET],
        &sleep,
        9
    ));
    // Overwritten after the call is fine: mov %eax, %esi.
    assert!(check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &CALL, &overwrite, &RET],
        &sleep,
        9
    ));
    // A tail call.
    let jmp32 = [0xe9, 0, 0, 0, 0];
    assert!(check(
        &[&MOV_ESI_LINE, &MOV_RDI_STR, &jmp32],
        &[(1, 3, FILE), (2, 1, "__might_sleep")],
        9
    ));
    // Too far from the call.
    let filler = [0x90u8; 20]; // twenty single-byte nops
    let fillers: Vec<&[u8]> = (0..20).map(|i| &filler[i..=i]).collect();
    let mut far: Vec<&[u8]> = vec![&MOV_ESI_LINE];
    far.extend(&fillers);
    far.extend([&MOV_RDI_STR[..], &CALL[..], &RET[..]]);
    assert!(!check(&far, &[(21, 3, FILE), (22, 1, "__might_sleep")], 9));
}

#[test]
fn printk_needs_file_before_line() {
    let mov_edx = [0xba, 0x0b, 0, 0, 0]; // mov $11, %edx
    let mov_rsi = [0x48, 0xc7, 0xc6, 0, 0, 0, 0]; // mov $str, %rsi
    let fmt = "str:\"bad %s:%d\\n\"";
    let pieces: [&[u8]; 5] = [&mov_edx, &mov_rsi, &MOV_RDI_STR, &CALL, &RET];
    assert!(check(
        &pieces,
        &[(1, 3, FILE), (2, 3, fmt), (3, 1, "_printk")],
        12
    ));
    // Not a path before the line.
    assert!(!check(
        &pieces,
        &[(1, 3, "str:\"name\""), (2, 3, fmt), (3, 1, "_printk")],
        12
    ));
    // File loaded before the mov, on a straight path: fine.
    let before: [&[u8]; 5] = [&mov_rsi, &mov_edx, &MOV_RDI_STR, &CALL, &RET];
    assert!(check(
        &before,
        &[(0, 3, FILE), (2, 3, fmt), (3, 1, "_printk")],
        12
    ));
    // ...unless something jumps in between: jmp over nothing lands on the mov.
    let jump = [0xeb, 0x00];
    let landing: [&[u8]; 6] = [&mov_rsi, &jump, &mov_edx, &MOV_RDI_STR, &CALL, &RET];
    assert!(!check(
        &landing,
        &[(0, 3, FILE), (3, 3, fmt), (4, 1, "_printk")],
        12
    ));
}

/// Deterministic xorshift so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn arbitrary_input_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted_changes = 0;
    let mut line_changes = 0;
    let names = ["__might_sleep", "_printk", FILE, "x", "str:\"a.c\""];
    let pieces: [&[u8]; 6] = [
        &MOV_ESI_LINE,
        &MOV_RDI_STR,
        &CALL,
        &RET,
        &[0xba, 1, 0, 0, 0],
        &[0x90],
    ];
    for round in 0..20_000 {
        let len = rng.below(64) as usize;
        let mut a: Vec<u8> = if round % 2 == 0 {
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            // Mostly plausible code, so the decoding path is exercised.
            let mut v = Vec::new();
            while v.len() < len {
                v.extend_from_slice(pieces[rng.below(pieces.len() as u64) as usize]);
            }
            v
        };
        let mut relocs: Vec<(u64, usize, String)> = (0..rng.below(5))
            .map(|_| {
                (
                    rng.below(a.len() as u64 + 4),
                    rng.below(10) as usize,
                    names[rng.below(names.len() as u64) as usize].to_string(),
                )
            })
            .collect();
        if rng.below(2) == 0 {
            relocs.sort_by_key(|r| r.0);
        }
        let mut line_fields = Vec::new();
        if round % 4 == 3 {
            // Well-formed might_sleep() sites, so accepted line changes
            // occur too.
            a.clear();
            relocs.clear();
            for _ in 0..1 + rng.below(3) {
                line_fields.push(a.len() + 1);
                a.extend_from_slice(&MOV_ESI_LINE);
                relocs.push((a.len() as u64 + 3, 4, FILE.to_string()));
                a.extend_from_slice(&MOV_RDI_STR);
                relocs.push((a.len() as u64 + 1, 4, "__might_sleep".to_string()));
                a.extend_from_slice(&CALL);
                if rng.below(3) == 0 {
                    a.extend_from_slice(pieces[rng.below(pieces.len() as u64) as usize]);
                }
            }
            a.extend_from_slice(&RET);
        }
        let mut b = a.clone();
        // Whether b is a with only plausible line numbers changed.
        let mut only_lines = !line_fields.is_empty();
        for &field in &line_fields {
            if rng.below(2) == 0 {
                let line = rng.below(MAX_LINE as u64 + 10) as u32;
                only_lines &= (1..=MAX_LINE).contains(&i64::from(line));
                b[field..field + 4].copy_from_slice(&line.to_le_bytes());
            }
        }
        for _ in 0..rng.below(3) {
            if !b.is_empty() && (line_fields.is_empty() || rng.below(3) == 0) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next() as u8;
                only_lines = false;
            }
        }
        if rng.below(10) == 0 {
            a.push(0x90);
            only_lines = false;
        }
        let ca = Code {
            bytes: &a,
            relocs: &relocs,
        };
        let cb = Code {
            bytes: &b,
            relocs: &relocs,
        };
        let valid = relocs_well_formed(&relocs, a.len());
        // Identical code is the same exactly when its relocations are well
        // formed (sorted, disjoint, 1 to 8 bytes, inside the code).
        assert_eq!(same_but_line_numbers(&ca, &ca), valid, "round {round}");
        let same = same_but_line_numbers(&ca, &cb);
        if only_lines {
            assert!(same, "round {round}: only line numbers moved");
        }
        assert_eq!(same, same_but_line_numbers(&cb, &ca), "round {round}");
        if a.len() != b.len() {
            assert!(!same, "round {round}: lengths differ");
        }
        let sites = line_number_sites(&ca);
        if let Some(sites) = &sites {
            assert!(valid, "round {round}: sites of malformed relocations");
            for (at, width, callee) in sites {
                assert!(at + *width as u64 <= a.len() as u64, "round {round}");
                assert!(
                    LINE_CONSUMERS.iter().any(|(name, _)| name == callee),
                    "round {round}: {callee}"
                );
            }
        }
        if same {
            // Every byte that differs outside a relocation lies in a
            // line-number immediate both versions report.
            let unrelocated: Vec<usize> = (0..a.len())
                .filter(|&i| a[i] != b[i])
                .filter(|&i| {
                    !relocs
                        .iter()
                        .any(|r| r.0 <= i as u64 && (i as u64) < r.0 + r.1 as u64)
                })
                .collect();
            if !unrelocated.is_empty() {
                line_changes += 1;
                let sites_a = sites.expect("code with line changes decodes");
                let sites_b = line_number_sites(&cb).expect("code with line changes decodes");
                let in_site = |sites: &[(u64, usize, &str)], i: usize| {
                    sites
                        .iter()
                        .any(|s| s.0 <= i as u64 && (i as u64) < s.0 + s.1 as u64)
                };
                for i in unrelocated {
                    assert!(
                        in_site(&sites_a, i) && in_site(&sites_b, i),
                        "round {round}: byte {i} differs outside a line-number site"
                    );
                }
            }
            if a != b {
                accepted_changes += 1;
            }
        }
    }
    eprintln!("{accepted_changes} changed pairs accepted, {line_changes} in line numbers");
    // The generator does produce changed code the check accepts, line
    // numbers included.
    assert!(accepted_changes > 0 && line_changes > 0);
}

/// What `Code::relocs` must be: sorted, disjoint, 1 to 8 bytes wide and
/// inside the code.
fn relocs_well_formed(relocs: &[(u64, usize, String)], len: usize) -> bool {
    let mut next_free = 0;
    for (offset, width, _) in relocs {
        if !(1..=8).contains(width) || *offset < next_free {
            return false;
        }
        next_free = offset + *width as u64;
        if next_free > len as u64 {
            return false;
        }
    }
    true
}

/// Every function of real kernel objects (both builds of example patches
/// to kernel/, fs/ and ext4, whose helpers take `__LINE__`) is the same as
/// itself, and stays the same when each line-number site found is bumped
/// by one.
#[test]
fn kernel_objects_compare_with_themselves() {
    let build = common::build_example_objects(&[
        "fork-vfork-wait.diff",
        "pipe-read-write.diff",
        "ext4-mballoc-shared-page.diff",
    ]);
    let mut built: Vec<_> = build.pairs.iter().map(|p| p.object.clone()).collect();
    built.sort();
    assert_eq!(
        built,
        [
            Path::new("fs/ext4/mballoc.o"),
            Path::new("fs/pipe.o"),
            Path::new("kernel/fork.o")
        ],
        "objects built"
    );
    let objects: Vec<&Path> = build
        .pairs
        .iter()
        .flat_map(|p| [p.original.as_path(), p.patched.as_path()])
        .collect();
    let (mut functions, mut sites, mut undecoded) = (0, 0, 0);
    for path in &objects {
        let obj = ObjectFile::read(path).unwrap();
        for sym in obj.symbols.iter().filter(|s| s.is_function() && s.size > 0) {
            let Some(section) = sym.section() else {
                continue;
            };
            let s = &obj.sections[section];
            if !s.is_exec() || s.is_nobits() || sym.value + sym.size > s.size {
                continue;
            }
            let (bytes, relocs) = function(&obj, section, sym.value, sym.value + sym.size);
            let code = Code {
                bytes: &bytes,
                relocs: &relocs,
            };
            assert!(
                same_but_line_numbers(&code, &code),
                "{} {}",
                path.display(),
                sym.name
            );
            functions += 1;
            let Some(found) = line_number_sites(&code) else {
                undecoded += 1;
                continue;
            };
            if found.is_empty() {
                continue;
            }
            let mut bumped = bytes.clone();
            for (at, width, _) in &found {
                assert_eq!(*width, 4);
                let at = *at as usize;
                let value = u32::from_le_bytes(bumped[at..at + 4].try_into().unwrap());
                bumped[at..at + 4].copy_from_slice(&(value + 1).to_le_bytes());
                sites += 1;
            }
            let moved = Code {
                bytes: &bumped,
                relocs: &relocs,
            };
            assert!(
                same_but_line_numbers(&code, &moved),
                "{} {}: bumped line numbers",
                path.display(),
                sym.name
            );
        }
    }
    eprintln!(
        "{} objects, {functions} functions, {undecoded} not decodable, {sites} line-number sites",
        objects.len()
    );
    assert!(functions > 0 && sites > 0);
}
