//! Builds against the real default target: the first run downloads and
//! unpacks the Debian source and configures two kernel trees; later runs
//! reuse the cache and take seconds.

use dynamos::build::{build, BuildOutput};
use dynamos::patch::{apply_all, parse, tree_reader};
use dynamos::target::{Target, TargetSpec};
use dynamos::Error;
use std::path::Path;
use std::time::Instant;

/// Builds of one target serialize on a lock anyway; running the tests one
/// after the other keeps their timings meaningful.
/// One test of this file at a time, across processes (nextest runs each
/// test in its own): some fake what a killed build leaves in the shared
/// work tree, which the others' checks of that tree would see.
fn serial() -> dynamos::cache::Lock {
    let lock = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("build_tests.lock");
    dynamos::cache::Lock::acquire(&lock).unwrap()
}

/// The lock every build takes on the work tree: tests in other processes
/// (nextest runs each test in its own) build in the same tree, so a test
/// looking at the tree between builds holds it.
fn work_lock(target: &Target) -> dynamos::cache::Lock {
    dynamos::cache::Lock::acquire(&target.work.join(".build.lock")).unwrap()
}

fn target() -> Target {
    Target::resolve(&TargetSpec::default()).expect("default target")
}

fn build_patch(target: &Target, patch: &str) -> anyhow::Result<BuildOutput> {
    let patch = parse(patch, Path::new("test.patch"))?;
    let changes = apply_all(&[patch], tree_reader(&target.source))?;
    build(target, &changes)
}

const VERSION_PATCH: &str = r#"--- a/fs/proc/version.c
+++ b/fs/proc/version.c
@@ -9,7 +9,7 @@
 
 static int version_proc_show(struct seq_file *m, void *v)
 {
-	seq_printf(m, linux_proc_banner,
+	seq_printf(m, "patched: %s version %s (%s)\n",
 		utsname()->sysname,
 		utsname()->release,
 		utsname()->version);
"#;

fn section_names(path: &Path) -> Vec<String> {
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    assert_eq!(
        file.kind(),
        object::ObjectKind::Relocatable,
        "{}",
        path.display()
    );
    assert_eq!(file.format(), object::BinaryFormat::Elf);
    file.sections()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect()
}

#[test]
fn builds_original_and_patched_object() {
    let _serial = serial();
    let target = target();
    let pristine_path = target.source.join("fs/proc/version.c");
    let pristine = std::fs::read(&pristine_path).unwrap();
    let pristine_mtime = std::fs::metadata(&pristine_path)
        .unwrap()
        .modified()
        .unwrap();

    let started = Instant::now();
    let out = build_patch(&target, VERSION_PATCH).expect("build");
    eprintln!("build of fs/proc/version.c took {:.1?}", started.elapsed());

    assert_eq!(out.pairs.len(), 1);
    let pair = &out.pairs[0];
    assert_eq!(pair.source, Path::new("fs/proc/version.c"));
    assert_eq!(pair.object, Path::new("fs/proc/version.o"));
    assert_eq!(pair.touched, vec![pair.source.clone()]);
    assert_eq!(pair.kernel_object, "vmlinux");
    let orig = std::fs::read(&pair.original).unwrap();
    let patched = std::fs::read(&pair.patched).unwrap();
    assert_ne!(orig, patched, "the patch must change the object");
    for path in [&pair.original, &pair.patched] {
        let sections = section_names(path);
        assert!(
            sections.iter().any(|s| s == ".text.version_proc_show"),
            "{}: {sections:?}",
            path.display()
        );
    }
    // The patched string made it into the patched object only.
    let needle = b"patched: %s version";
    assert!(patched.windows(needle.len()).any(|w| w == needle));
    assert!(!orig.windows(needle.len()).any(|w| w == needle));

    // Pristine source untouched; the work tree file is back to pristine.
    assert_eq!(std::fs::read(&pristine_path).unwrap(), pristine);
    assert_eq!(
        std::fs::metadata(&pristine_path)
            .unwrap()
            .modified()
            .unwrap(),
        pristine_mtime
    );
    {
        // Released before the next build: a process cannot take it twice.
        let _lock = work_lock(&target);
        let worktree_file = target.work.join("src/fs/proc/version.c");
        assert_eq!(std::fs::read(&worktree_file).unwrap(), pristine);
        assert!(!target.work.join("src.journal").exists());
    }

    // The objects belong to the output and go away with it.
    let dir = out.dir.clone();
    drop(out);
    assert!(!dir.exists());

    // Warm cache: one more build of a single-file patch, timed.
    let started = Instant::now();
    let again = build_patch(&target, VERSION_PATCH).expect("second build");
    let warm = started.elapsed();
    eprintln!("warm-cache build of a single-file patch: {warm:.1?}");
    assert_eq!(
        std::fs::read(&again.pairs[0].patched).unwrap(),
        patched,
        "rebuilding the same patch gives the same object"
    );
}

#[test]
fn refuses_a_header_too_many_files_include() {
    let _serial = serial();
    let target = target();
    let patch = append_after_first_line(&target, &["include/linux/seq_file.h"], "/* changed */");
    let err = build_patch(&target, &patch).unwrap_err();
    let typed = err.downcast_ref::<Error>().expect("typed error");
    assert!(matches!(typed, Error::Refused(_)), "{err}");
    assert_eq!(typed.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("include/linux/seq_file.h"), "{text}");
    assert!(
        text.contains("more than 200 source files include it"),
        "{text}"
    );
}

#[test]
fn refuses_files_not_in_the_config() {
    let _serial = serial();
    let target = target();
    // The Debian amd64 config does not build this board driver.
    let file = "drivers/net/ethernet/ti/davinci_emac.c";
    let config = std::fs::read_to_string(&target.config).unwrap();
    assert!(
        !config.contains("CONFIG_TI_DAVINCI_EMAC=y")
            && !config.contains("CONFIG_TI_DAVINCI_EMAC=m")
    );
    let patch = append_after_first_line(&target, &[file], "/* changed */");
    let pristine = std::fs::read(target.source.join(file)).unwrap();
    let err = build_patch(&target, &patch).unwrap_err();
    let typed = err.downcast_ref::<Error>().expect("typed error");
    assert!(matches!(typed, Error::Refused(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(file) && msg.contains("not built by this kernel config"),
        "{msg}"
    );
    assert_eq!(std::fs::read(target.source.join(file)).unwrap(), pristine);
    let _lock = work_lock(&target);
    assert_eq!(
        std::fs::read(target.work.join("src").join(file)).unwrap(),
        pristine
    );
}

#[test]
fn unchanged_source_compiles_to_identical_objects() {
    let _serial = serial();
    let target = target();
    let file = Path::new("fs/proc/version.c");
    let mut changes = std::collections::BTreeMap::new();
    changes.insert(
        file.to_path_buf(),
        Some(std::fs::read(target.source.join(file)).unwrap()),
    );
    let out = build(&target, &changes).expect("build");
    let pair = &out.pairs[0];
    assert_eq!(
        std::fs::read(&pair.original).unwrap(),
        std::fs::read(&pair.patched).unwrap(),
        "the two trees must compile the same source to the same bytes"
    );
}

/// A patch inserting `text` after the first line of each file, with the
/// second line as trailing context, as `diff -U1` writes it.
fn append_after_first_line(target: &Target, files: &[&str], text: &str) -> String {
    let mut patch = String::new();
    for file in files {
        let content = std::fs::read_to_string(target.source.join(file)).unwrap();
        let mut lines = content.lines();
        let (first, second) = (lines.next().unwrap(), lines.next().unwrap());
        patch.push_str(&format!(
            "diff --git a/{file} b/{file}\n--- a/{file}\n+++ b/{file}\n@@ -1,2 +1,3 @@\n {first}\n+{text}\n {second}\n"
        ));
    }
    patch
}

#[test]
fn module_and_builtin_objects_in_one_build() {
    let _serial = serial();
    let target = target();
    let patch = append_after_first_line(
        &target,
        &[
            "fs/binfmt_misc.c",
            "fs/proc/cmdline.c",
            "Documentation/admin-guide/binfmt-misc.rst",
        ],
        "static const char dynamos_marker[] __used = \"marker\";",
    );
    let out = build_patch(&target, &patch).expect("build");
    let by_source = |s: &str| {
        out.pairs
            .iter()
            .find(|p| p.source == Path::new(s))
            .unwrap_or_else(|| panic!("{s} not built: {:?}", out.pairs))
    };
    assert_eq!(out.pairs.len(), 2);
    assert_eq!(by_source("fs/binfmt_misc.c").kernel_object, "binfmt_misc");
    assert_eq!(by_source("fs/proc/cmdline.c").kernel_object, "vmlinux");
    assert_eq!(
        out.ignored,
        vec![Path::new("Documentation/admin-guide/binfmt-misc.rst").to_path_buf()]
    );
    for pair in &out.pairs {
        assert_ne!(
            std::fs::read(&pair.original).unwrap(),
            std::fs::read(&pair.patched).unwrap()
        );
    }
}

#[test]
fn compile_errors_name_the_file() {
    let _serial = serial();
    let target = target();
    let patch = append_after_first_line(&target, &["fs/proc/cmdline.c"], "this is not C;");
    let err = build_patch(&target, &patch).unwrap_err();
    assert!(
        err.downcast_ref::<Error>().is_none(),
        "a plain failure: {err}"
    );
    let text = format!("{err:#}");
    eprintln!("{text}");
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("fs/proc/cmdline.c failed to compile (patched version)"),
        "{text}"
    );
    assert!(
        text.contains("fs/proc/cmdline.c:2:1: error:"),
        "make's output is shown, with paths as in the patch: {text}"
    );
    assert!(!text.contains(&target.work.display().to_string()), "{text}");
    // The work tree is clean again.
    let _lock = work_lock(&target);
    assert_eq!(
        std::fs::read(target.work.join("src/fs/proc/cmdline.c")).unwrap(),
        std::fs::read(target.source.join("fs/proc/cmdline.c")).unwrap()
    );
    assert!(!target.work.join("src.journal").exists());
}

#[test]
fn interrupted_build_is_undone_by_the_next() {
    use std::os::unix::fs::MetadataExt;
    let _serial = serial();
    let target = target();
    // What a build killed mid-way leaves: a journal and a patched file
    // renamed over its link in the work tree.
    // Hold the work tree's lock while faking the leftover.
    let file = "fs/proc/cmdline.c";
    let in_tree = target.work.join("src").join(file);
    {
        let _lock = work_lock(&target);
        let tmp = in_tree.with_extension("tmp-test");
        std::fs::write(&tmp, "left over by a killed build\n").unwrap();
        std::fs::rename(&tmp, &in_tree).unwrap();
        std::fs::write(target.work.join("src.journal"), format!("{file}\n")).unwrap();
    }

    let _out = build_patch(&target, VERSION_PATCH).expect("build");
    let _lock = work_lock(&target);
    let pristine = target.source.join(file);
    assert_eq!(
        std::fs::read(&in_tree).unwrap(),
        std::fs::read(&pristine).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&in_tree).unwrap().ino(),
        std::fs::metadata(&pristine).unwrap().ino(),
        "restored as a link to the pristine file"
    );
    assert!(!target.work.join("src.journal").exists());
}

#[test]
fn builds_files_included_by_others_through_their_includer() {
    let _serial = serial();
    let target = target();
    let patch = append_after_first_line(
        &target,
        &["kernel/sched/rt.c"],
        "static const char dynamos_marker[] __used = \"marker\";",
    );
    let started = Instant::now();
    let out = build_patch(&target, &patch).expect("build");
    eprintln!(
        "build through kernel/sched/build_policy.c took {:.1?}",
        started.elapsed()
    );
    assert_eq!(out.pairs.len(), 1);
    let pair = &out.pairs[0];
    assert_eq!(pair.source, Path::new("kernel/sched/build_policy.c"));
    assert_eq!(pair.object, Path::new("kernel/sched/build_policy.o"));
    assert_eq!(
        pair.touched,
        vec![Path::new("kernel/sched/rt.c").to_path_buf()]
    );
    assert_eq!(pair.kernel_object, "vmlinux");
    assert_ne!(
        std::fs::read(&pair.original).unwrap(),
        std::fs::read(&pair.patched).unwrap()
    );
}

#[test]
fn documentation_only_is_no_change() {
    let _serial = serial();
    let target = target();
    let patch = append_after_first_line(
        &target,
        &["Documentation/admin-guide/binfmt-misc.rst"],
        "More words.",
    );
    let err = build_patch(&target, &patch).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NoChange)),
        "{err}"
    );
}

#[test]
fn builds_from_a_user_tree() {
    let _serial = serial();
    // The Debian source used as if it were the user's own tree: its farm is
    // synced before every build and its original objects left to make.
    let debian = target();
    let user = Target::resolve(&TargetSpec {
        release: Some(debian.release.clone()),
        src: Some(debian.source.clone()),
        config: Some(debian.config.clone()),
        symvers: debian.headers.as_ref().map(|h| h.join("Module.symvers")),
    })
    .expect("user tree target");
    assert_ne!(user.work, debian.work);
    let started = Instant::now();
    let out = build_patch(&user, VERSION_PATCH).expect("build");
    eprintln!("user-tree build took {:.1?}", started.elapsed());
    let pair = &out.pairs[0];
    assert_eq!(pair.kernel_object, "vmlinux");
    assert_ne!(
        std::fs::read(&pair.original).unwrap(),
        std::fs::read(&pair.patched).unwrap()
    );
    let started = Instant::now();
    let _again = build_patch(&user, VERSION_PATCH).expect("second build");
    eprintln!("warm user-tree build took {:.1?}", started.elapsed());
}
