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
    let table = target_symbols::read_vmlinuz(&image).unwrap();
    // Debian 12's 6.1 is built without IBT: nothing is sealed.
    assert!(table.sealed.is_empty(), "{}", table.sealed.len());
    let symbols = table.symbols;
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
}

/// io_wq_create's `init_completion` uses a lockdep key, `__key.0`, of which
/// the running kernel has over a hundred that nothing tells apart: the
/// package starts its own, and the update applies and runs.
#[test]
fn a_lockdep_key_the_kernel_cannot_tell_apart_starts_afresh_and_applies() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("io-wq.dynpkg");
    let out = build(&keys, "io-wq-create-lockdep-key.diff", &pkg);
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "dynamos-build: {printed}");
    expect_line(
        &printed,
        "replace  io_wq_create (vmlinux, io_uring/io-wq.c)",
    );
    expect_line(
        &printed,
        "note: __key.0 of io_uring/io-wq.c: starts afresh in the new code",
    );
    let out = dynamos(&keys.dir, &["inspect", "--json", pkg.to_str().unwrap()]);
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let externals = manifest["manifest"]["objects"][0]["externals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert!(!externals.is_empty());
    assert!(
        !externals.iter().any(|n| n.starts_with("__key.")),
        "{externals:?}"
    );

    let probe = work.path().join("io-uring-setup");
    compile_static_probe("io_uring_setup.c", &probe);
    // The image's table, as /proc/kallsyms lists vmlinux: type and name in order.
    let image = DebianBuild::by_release(DEFAULT_RELEASE)
        .unwrap()
        .vmlinuz()
        .unwrap();
    let table: String = target_symbols::read_vmlinuz(&image)
        .unwrap()
        .symbols
        .iter()
        .map(|s| format!("{} {}\n", s.kind, s.name))
        .collect();
    let table_file = work.path().join("image-kallsyms");
    std::fs::write(&table_file, table).unwrap();

    let script = "set -e\n\
        cp /packages/io-uring-setup /tmp/; chmod +x /tmp/io-uring-setup\n\
        awk 'NF == 3 { print $2, $3 }' /proc/kallsyms > /tmp/running-kallsyms\n\
        if cmp -s /tmp/running-kallsyms /packages/image-kallsyms; then echo '@@ kallsyms same @@'; \
        else echo \"@@ kallsyms differ: $(wc -l < /tmp/running-kallsyms) running @@\"; fi\n\
        echo \"@@ before: $(/tmp/io-uring-setup) @@\"\n\
        dynamos apply /packages/io-wq.dynpkg\n\
        echo \"@@ live: $(/tmp/io-uring-setup) @@\"\n\
        dmesg | grep 'live-updated io_wq_create'\n\
        dynamos revert io-wq-create-lockdep-key\n\
        echo \"@@ reverted: $(/tmp/io-uring-setup) @@\"\n";
    let text = vm_with_modules(&keys, &[], &[&pkg, &probe, &table_file], script);
    expect_line(&text, "@@ kallsyms same @@");
    expect_line(&text, "@@ before: ring 3 @@");
    expect_line(&text, "@@ live: ring 3 @@");
    expect_line(&text, "@@ reverted: ring 3 @@");
    assert!(
        text.lines()
            .any(|l| l
                .contains("dynamos: io-wq of io-uring-setup created by live-updated io_wq_create")),
        "{text}"
    );
}

/// serdev_controller_add's new code reads the static `is_registered`; the
/// running kernel has two (serdev's and i2c's) and nothing near serdev's
/// names its file. Not bookkeeping, so dynamos-build refuses it.
#[test]
fn an_ambiguous_static_is_refused_at_build_time() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("serdev.dynpkg");
    let out = build(&keys, "refused-ambiguous-static.diff", &pkg);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}{err}", stdout(&out));
    assert!(
        err.contains("is_registered: ambiguous: 2 data symbols of this name"),
        "{err}"
    );
    assert!(err.contains("read at build time"), "{err}");
    assert!(!pkg.exists());
}
