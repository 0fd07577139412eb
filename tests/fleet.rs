//! Installed packages across reboots: one disk image booted several times,
//! each boot running what the shipped systemd units run (the guest has no
//! systemd, so their ExecStart lines are read and run as they are).

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// Each boot of the disk takes about 20 s on an idle machine.
const BOOT_BUDGET: Duration = Duration::from_secs(150);

/// The command an installed unit file runs.
fn exec_start(unit: &str) -> String {
    let path = root().join("dist/systemd").join(unit);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(lines.len(), 1, "{}: one ExecStart", path.display());
    lines[0].to_string()
}

/// Script lines that mount the guest's /var/lib/dynamos from the disk.
const MOUNT_STATE: &str = "set -e\n\
     modprobe virtio_pci; modprobe virtio_blk; modprobe ext4\n\
     i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
     mkdir -p /var/lib/dynamos\n\
     mount -t ext4 /dev/vda /var/lib/dynamos\n\
     set +e\n";

/// Boot the disk once with `script`; returns the exit code and output.
fn boot(
    keys: &Keys,
    disk: &Path,
    files: &[&Path],
    append: &[&str],
    script: &str,
) -> (Option<i32>, String) {
    let mut options: Vec<&str> = vec!["--disk", disk.to_str().unwrap()];
    for module in ["virtio_pci", "virtio_blk", "ext4"] {
        options.extend(["--module", module]);
    }
    for word in append {
        options.extend(["--append", word]);
    }
    vm_boot(keys, &options, files, script, BOOT_BUDGET)
}

fn status(text: &str, what: &str) -> String {
    section(text, &format!("@@ {what} "), " @@")
        .trim()
        .to_string()
}

#[test]
fn installed_packages_go_live_at_each_boot_and_a_crash_holds_them() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("banner.dynpkg");
    let out = build(&keys, "proc-version-banner.diff", &pkg);
    assert!(out.status.success(), "dynamos-build: {}", stderr(&out));
    let disk = work.path().join("state.img");
    // Journaled, as a machine's /var is: the crash below must not leave
    // the file system damaged, only the records as they were synced.
    let out = sbin_command("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 runs (e2fsprogs, scripts/install-deps.sh)");
    assert!(out.status.success(), "mkfs.ext4: {}", stderr(&out));
    let boot_unit = exec_start("dynamos.service");
    let confirm_unit = exec_start("dynamos-confirm.service");
    assert_eq!(boot_unit, "/usr/bin/dynamos boot");
    let patched = "dynamos: live update proc-version-banner applied";
    let version_is_patched = format!("grep -c '{patched}' /proc/version");

    // Boot 1, with dynamos.enable=0: install; the boot unit applies nothing.
    let script = format!(
        "{mount}\
         dynamos install /packages/banner.dynpkg; echo \"@@ install $? @@\"\n\
         dynamos install /packages/banner.dynpkg; echo \"@@ install again $? @@\"\n\
         {boot_unit}; echo \"@@ boot unit $? @@\"\n\
         echo \"@@ patched $({version_is_patched}) @@\"\n\
         dynamos list\n\
         umount /var/lib/dynamos\n",
        mount = MOUNT_STATE
    );
    let (code, text) = boot(&keys, &disk, &[&pkg], &["dynamos.enable=0"], &script);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(status(&text, "install"), "0", "{text}");
    assert_eq!(status(&text, "install again"), "3", "{text}");
    assert!(
        text.contains("already installed for 6.1.0-57-amd64"),
        "{text}"
    );
    assert_eq!(status(&text, "boot unit"), "0", "{text}");
    expect_line(&text, "dynamos.enable=0 on the kernel command line");
    assert_eq!(status(&text, "patched"), "0", "{text}");
    expect_line(
        &text,
        "installed proc-version-banner  6.1.0-57-amd64  #1  not yet applied at boot",
    );

    // Boot 2: the unit applies it; the confirm unit records the boot
    // survived once the apply is older than the grace (120 s by default;
    // one second here).
    let script = format!(
        "{mount}\
         echo \"@@ before $({version_is_patched}) @@\"\n\
         {boot_unit}; echo \"@@ boot unit $? @@\"\n\
         echo \"@@ patched $({version_is_patched}) @@\"\n\
         {confirm_unit}; echo \"@@ too early $? @@\"\n\
         dynamos list | grep -q 'done, boot not yet confirmed' && echo '@@ unconfirmed yes @@'\n\
         sleep 2; {confirm_unit} --grace 1; echo \"@@ confirm unit $? @@\"\n\
         dynamos list\n\
         umount /var/lib/dynamos\n",
        mount = MOUNT_STATE
    );
    let (code, text) = boot(&keys, &disk, &[], &[], &script);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(status(&text, "before"), "0", "{text}");
    assert_eq!(status(&text, "boot unit"), "0", "{text}");
    expect_line(&text, "applied  proc-version-banner");
    assert_eq!(status(&text, "patched"), "1", "{text}");
    assert_eq!(status(&text, "too early"), "0", "{text}");
    assert_eq!(status(&text, "unconfirmed"), "yes", "{text}");
    assert_eq!(status(&text, "confirm unit"), "0", "{text}");
    expect_line(&text, "confirmed proc-version-banner");
    expect_line(&text, "boot apply done and confirmed");

    // Boot 3: applied again, then the machine dies before the confirm.
    let script = format!(
        "{mount}\
         {boot_unit}\n\
         echo c > /proc/sysrq-trigger\n",
        mount = MOUNT_STATE
    );
    let (code, text) = boot(&keys, &disk, &[], &[], &script);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("the guest kernel panicked"), "{text}");

    // Boot 4: the crash guard holds it until an administrator unholds it;
    // then it is uninstalled, staying live. Both as CI would run them.
    let script = format!(
        "{mount}\
         {boot_unit}; echo \"@@ boot unit $? @@\"\n\
         echo \"@@ patched $({version_is_patched}) @@\"\n\
         dynamos list\n\
         {boot_unit}; echo \"@@ boot unit again $? @@\"\n\
         dynamos unhold --json proc-version-banner > /tmp/unhold.json; echo \"@@ unhold $? @@\"\n\
         dynamos unhold proc-version-banner; echo \"@@ unhold again $? @@\"\n\
         {boot_unit}; echo \"@@ boot unit unheld $? @@\"\n\
         echo \"@@ patched unheld $({version_is_patched}) @@\"\n\
         dynamos uninstall --json proc-version-banner > /tmp/uninstall.json; echo \"@@ uninstall $? @@\"\n\
         dynamos uninstall --json proc-version-banner > /tmp/again.json; echo \"@@ uninstall again $? @@\"\n\
         for f in unhold uninstall again; do echo \"@@ json $f\"; cat /tmp/$f.json; echo '@@ end'; done\n\
         umount /var/lib/dynamos\n",
        mount = MOUNT_STATE
    );
    let (code, text) = boot(&keys, &disk, &[], &[], &script);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(status(&text, "boot unit"), "1", "{text}");
    expect_line(
        &text,
        "dynamos: held proc-version-banner: the machine stopped before that boot was confirmed",
    );
    assert_eq!(status(&text, "patched"), "0", "{text}");
    expect_line(
        &text,
        "installed proc-version-banner  6.1.0-57-amd64  #1  held: the machine stopped before that boot was confirmed",
    );
    assert_eq!(status(&text, "boot unit again"), "1", "{text}");
    assert_eq!(status(&text, "unhold"), "0", "{text}");
    assert_eq!(status(&text, "unhold again"), "1", "{text}");
    expect_line(
        &text,
        "dynamos: no installed package named proc-version-banner is held (see dynamos list)",
    );
    assert_eq!(status(&text, "boot unit unheld"), "0", "{text}");
    assert_eq!(status(&text, "patched unheld"), "1", "{text}");
    assert_eq!(status(&text, "uninstall"), "0", "{text}");
    assert_eq!(status(&text, "uninstall again"), "1", "{text}");
    let json = |name: &str| -> serde_json::Value {
        let body = section(&text, &format!("@@ json {name}\n"), "@@ end");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"))
    };
    assert_eq!(
        json("unhold"),
        serde_json::json!({
            "status": "unheld",
            "package": "proc-version-banner",
            "releases": ["6.1.0-57-amd64"],
        })
    );
    assert_eq!(
        json("uninstall"),
        serde_json::json!({
            "status": "uninstalled",
            "package": "proc-version-banner",
            "releases": ["6.1.0-57-amd64"],
            "still_applied": true,
        })
    );
    let again = json("again");
    assert_eq!(again["status"], "error", "{again}");
    assert!(
        again["message"]
            .as_str()
            .is_some_and(|m| m.contains("no package named proc-version-banner is installed")),
        "{again}"
    );
}
