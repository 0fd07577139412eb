//! `dynamos-build -o` into a folder that does not exist is refused before
//! anything else happens, and the folder is not created.

mod common;

use common::*;

#[test]
fn missing_output_folder_is_refused_first() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("no-such-folder");
    let out = missing.join("x.dynpkg");
    // The patch does not exist either: the output folder is checked before it is read.
    let no_patch = work.path().join("no-such.diff");
    let run = build_with(&keys, &[no_patch.to_str().unwrap()], [] as [&str; 0], &out);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert_eq!(
        stderr(&run),
        format!(
            "dynamos-build: {}: output folder {} does not exist\n",
            out.display(),
            missing.display()
        )
    );
    assert!(!missing.exists());

    // An existing folder given as the package file is refused the same way.
    let run = build_with(
        &keys,
        &[no_patch.to_str().unwrap()],
        [] as [&str; 0],
        work.path(),
    );
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert_eq!(
        stderr(&run),
        format!(
            "dynamos-build: {}: is a folder; name the package file to write\n",
            work.path().display()
        )
    );
}
