//! Code linked from `lib.a` (kbuild's `lib-y`, as `lib/xarray.c`) is
//! built-in code like any other: a fix to it is compiled, original and
//! patched, and judged on its code.

mod common;

use common::{stderr, stdout, Keys};

#[test]
fn a_fix_to_lib_xarray_is_compiled_and_judged_on_its_code() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("xarray-find-empty-range.dynpkg");
    let out = common::build(&keys, "xarray-find-empty-range.diff", &package);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!text.contains("not built by this kernel config"), "{text}");
    // lib/Makefile removes the ftrace flags from everything in lib/: the
    // changed function was compiled and compared, and it is that which
    // keeps it from being redirected.
    assert_eq!(out.status.code(), Some(2), "{text}");
    let message = stderr(&out);
    let message = message.trim_end();
    assert_eq!(message.lines().count(), 1, "{text}");
    assert!(
        message.contains("xa_find: cannot be redirected: it has no ftrace entry")
            && message.ends_with("(lib/xarray.c)"),
        "{text}"
    );
    assert!(!package.exists());
}
