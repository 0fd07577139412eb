//! What the build decides about the symbols new code uses, from the
//! target's own symbol table: statics bound to exactly one kernel symbol,
//! lockdep keys started afresh, anything else refused before a package
//! exists.

mod common;

use common::*;
use dynamos::generate::target_symbols;
use dynamos::target::{DebianBuild, DEFAULT_RELEASE};

/// The kallsyms tables of the target's image decode to the symbol table
/// the running kernel shows: the functions and data this suite patches are
/// there, in address order, with their type letters.
#[test]
fn the_targets_kallsyms_are_read_from_its_image() {
    let image = DebianBuild::by_release(DEFAULT_RELEASE)
        .unwrap()
        .vmlinuz()
        .unwrap();
    let started = std::time::Instant::now();
    let symbols = target_symbols::read_vmlinuz(&image).unwrap();
    eprintln!(
        "{} symbols read in {:.1} s",
        symbols.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(symbols.len() > 50_000, "{}", symbols.len());
    let find = |name: &str| -> Vec<char> {
        symbols
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.kind)
            .collect()
    };
    assert_eq!(find("copy_process"), ['t']);
    assert_eq!(find("version_proc_show"), ['t']);
    // x86's strong definition won over kernel/fork.c's weak one.
    assert_eq!(find("arch_dup_task_struct"), ['T']);
    assert_eq!(find("jiffies"), ['D']);
    assert!(find("__key.0").len() > 100);
    let text: Vec<&str> = symbols
        .iter()
        .filter(|s| matches!(s.kind, 't' | 'T'))
        .map(|s| s.name.as_str())
        .collect();
    assert!(text.contains(&"_stext"));
    let addresses: Vec<u64> = symbols
        .iter()
        .filter(|s| s.kind != 'A' && s.kind != 'a')
        .map(|s| s.address)
        .collect();
    assert!(
        addresses.windows(2).all(|w| w[0] <= w[1]),
        "not in address order"
    );
    let _ = root();
}
