//! `dynamos vm`: run shell commands as root in a throwaway QEMU machine that
//! boots a Debian kernel, with this tool and the given packages inside.
//!
//! The guest is an initramfs built here: a static busybox, the `dynamos`
//! binary with the shared libraries it loads, the packages under
//! `/packages`, trusted keys under `/etc/dynamos/trusted.d`, and an `/init`
//! that runs the command and powers off. The kernel console goes to the
//! first serial port and the command's output to the second, which ends
//! with a marker line carrying the exit status. No marker means the guest
//! died (panic, crash) or hung until the timeout killed it.

pub mod cpio;
mod host;
pub mod modules;

use crate::target::{DebianBuild, DEFAULT_RELEASE};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the tool itself lives in the guest.
pub const GUEST_DYNAMOS: &str = "/usr/bin/dynamos";
/// Where packages are placed in the guest.
pub const GUEST_PACKAGES: &str = "/packages";
/// Where trusted public keys are placed in the guest.
pub const GUEST_TRUSTED_KEYS: &str = "/etc/dynamos/trusted.d";

/// Console lines quoted in errors about a guest that did not finish.
const CONSOLE_TAIL_LINES: usize = 30;
/// Lines of the command's output quoted when it had to be stopped.
const OUTPUT_TAIL_LINES: usize = 10;

/// What to run, and in which machine.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Debian ABI release of the kernel to boot; `None` means
    /// [`DEFAULT_RELEASE`].
    pub kernel: Option<String>,
    /// Files copied to `/packages/<file name>` in the guest.
    pub packages: Vec<PathBuf>,
    /// Public key files copied to `/etc/dynamos/trusted.d/<file name>`.
    pub trusted_keys: Vec<PathBuf>,
    /// The `dynamos` binary to put on the guest's PATH; `None` means the
    /// running executable.
    pub dynamos_binary: Option<PathBuf>,
    /// Shell commands, run by `/bin/sh -c` as root.
    pub command: String,
    /// Limit on the machine's whole lifetime, boot included.
    pub timeout: Duration,
    /// Guest memory.
    pub memory_mb: u32,
    /// Kernel modules of the booted kernel to make `modprobe`-able in the
    /// guest (with their dependencies).
    pub modules: Vec<String>,
    /// Run the guest clock off executed instructions (QEMU `-icount
    /// shift=N`: one instruction is 2^N ns) instead of host time, so guest
    /// timings count work done and not how loaded the host is.
    pub instruction_clock_shift: Option<u32>,
    /// A raw disk image attached as the guest's `/dev/vda` (virtio; the
    /// guest loads `virtio_pci` and `virtio_blk` itself). It outlives the
    /// machine: a second run with the same image is a reboot.
    pub disk: Option<PathBuf>,
    /// Further kernel command-line words (`dynamos.enable=0`,
    /// `module.sig_enforce=1`).
    pub kernel_arguments: Vec<String>,
}

impl Default for VmOptions {
    fn default() -> VmOptions {
        VmOptions {
            kernel: None,
            packages: Vec::new(),
            trusted_keys: Vec::new(),
            dynamos_binary: None,
            command: String::new(),
            timeout: Duration::from_secs(300),
            memory_mb: 1024,
            modules: Vec::new(),
            instruction_clock_shift: None,
            disk: None,
            kernel_arguments: Vec::new(),
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// The command's stdout and stderr, interleaved as written.
    pub output: String,
    /// The command's exit status (128 + signal number if it was killed).
    pub exit_code: i32,
    /// The kernel console log.
    pub console: String,
}

/// Boot the kernel, run `opts.command` in the guest and report how it ended.
/// A guest that panics, hangs past the timeout or stops without reporting the
/// command's status is an error.
pub fn run(opts: &VmOptions) -> Result<VmOutcome> {
    if opts.timeout.is_zero() {
        bail!("the virtual machine timeout must be longer than zero");
    }
    if opts.instruction_clock_shift.is_some_and(|shift| shift > 10) {
        bail!("the instruction clock shift must be 0 to 10 (one instruction is 2^shift ns)");
    }
    if opts.memory_mb < 256 {
        bail!(
            "{} MB is too little memory for the virtual machine (at least 256 MB)",
            opts.memory_mb
        );
    }
    if let Some(disk) = &opts.disk {
        if !disk.is_file() {
            bail!("disk image {} not found", disk.display());
        }
    }
    if let Some(bad) = opts
        .kernel_arguments
        .iter()
        .find(|a| a.is_empty() || a.contains(char::is_whitespace))
    {
        bail!("kernel argument {bad:?} must be one word");
    }
    let packages = guest_files(&opts.packages, "package")?;
    let keys = guest_files(&opts.trusted_keys, "trusted key")?;
    let dynamos = match &opts.dynamos_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot locate the running dynamos binary")?,
    };
    if !dynamos.is_file() {
        bail!("dynamos binary {} not found", dynamos.display());
    }

    let release = opts.kernel.as_deref().unwrap_or(DEFAULT_RELEASE);
    let kernel = DebianBuild::by_release(release)?.vmlinuz()?;
    if !kernel.is_file() {
        bail!(
            "kernel image {} is missing from the cache",
            kernel.display()
        );
    }
    let guest_modules = if opts.modules.is_empty() {
        modules::GuestModules::default()
    } else {
        modules::collect(
            &DebianBuild::by_release(release)?.modules_dir()?,
            &opts.modules,
        )?
    };
    let qemu = host::Qemu::get()?;
    let busybox = host::busybox()?;

    let work = WorkDir::create()?;
    let marker = format!("DYNAMOS-VM-EXIT-{}", nonce()?);
    let initrd = work.path.join("initrd.cpio");
    write_initramfs(
        &initrd,
        &Guest {
            busybox: &busybox,
            dynamos: &dynamos,
            packages: &packages,
            keys: &keys,
            command: &opts.command,
            marker: &marker,
            release,
            modules: &guest_modules,
        },
    )?;

    let console_log = work.path.join("console.log");
    let output_log = work.path.join("output.log");
    let qemu_log = work.path.join("qemu.log");
    let qemu_log_file =
        File::create(&qemu_log).with_context(|| format!("cannot create {}", qemu_log.display()))?;
    let mut command = Command::new(&qemu.binary);
    command
        .env("LD_LIBRARY_PATH", &qemu.library_path)
        .env("QEMU_MODULE_DIR", &qemu.module_dir)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // One host thread runs both vCPUs in turn: with a thread per vCPU, code
        // patched by one vCPU (text_poke of static keys) was once seen to leave
        // the other spinning in a soft lockup under a loaded host.
        .args([
            "-machine",
            "pc",
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-smp",
            // Under the instruction clock the second CPU never came up.
            if opts.instruction_clock_shift.is_some() {
                "1"
            } else {
                "2"
            },
        ])
        .arg("-m")
        .arg(opts.memory_mb.to_string())
        .args(["-net", "none", "-no-reboot"]);
    if let Some(shift) = opts.instruction_clock_shift {
        // sleep=on: an idle guest's clock still follows host time.
        command.args(["-icount", &format!("shift={shift},sleep=on")]);
    }
    for dir in &qemu.firmware_dirs {
        command.arg("-L").arg(dir);
    }
    if let Some(disk) = &opts.disk {
        command.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=writeback",
            qemu_path(disk)?
        ));
    }
    let mut append = "console=ttyS0 panic=-1 rdinit=/init".to_string();
    for word in &opts.kernel_arguments {
        append.push(' ');
        append.push_str(word);
    }
    command
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(&append)
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", qemu_path(&console_log)?))
        .args(["-serial", "chardev:console"])
        .arg("-chardev")
        .arg(format!("file,id=output,path={}", qemu_path(&output_log)?))
        .args(["-serial", "chardev:output"])
        .stdin(Stdio::null())
        .stdout(qemu_log_file.try_clone()?)
        .stderr(qemu_log_file);

    let progress = crate::report::spinner(format!("running the command in a {release} guest"));
    let started = Instant::now();
    let mut child = KillOnDrop(
        command
            .spawn()
            .with_context(|| format!("cannot start {}", qemu.binary.display()))?,
    );
    let status = loop {
        if let Some(status) = child.0.try_wait().context("cannot wait for QEMU")? {
            break Some(status);
        }
        if started.elapsed() >= opts.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    progress.finish_and_clear();
    if status.is_none() {
        let _ = child.0.kill();
        let _ = child.0.wait();
    }

    let console = read_lossy(&console_log);
    let raw_output = read_lossy(&output_log);
    let Some(status) = status else {
        bail!(
            "the virtual machine did not finish within {} s and was stopped{}{}",
            opts.timeout.as_secs(),
            output_tail(&raw_output),
            console_tail(&console)
        );
    };
    if let Some((output, exit_code)) = parse_output(&raw_output, &marker) {
        return Ok(VmOutcome {
            output,
            exit_code,
            console,
        });
    }
    if let Some(line) = console.lines().find(|l| l.contains("Kernel panic")) {
        bail!(
            "the guest kernel panicked: {}{}",
            line.trim(),
            console_tail(&console)
        );
    }
    if !status.success() {
        let qemu_errors = read_lossy(&qemu_log);
        bail!(
            "QEMU failed ({status}): {}{}",
            qemu_errors.trim().lines().last().unwrap_or("no message"),
            console_tail(&console)
        );
    }
    bail!(
        "the guest stopped without reporting the command's exit status{}",
        console_tail(&console)
    )
}

/// Host files and the names they get in the guest; names must be distinct.
fn guest_files(paths: &[PathBuf], what: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for path in paths {
        if !path.is_file() {
            bail!("{what} {} not found", path.display());
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{what} {} has no usable file name", path.display()))?
            .to_string();
        if !seen.insert(name.clone()) {
            bail!("two {what} files are named {name}; the guest needs distinct names");
        }
        files.push((name, path.clone()));
    }
    Ok(files)
}

struct Guest<'a> {
    busybox: &'a Path,
    dynamos: &'a Path,
    packages: &'a [(String, PathBuf)],
    keys: &'a [(String, PathBuf)],
    command: &'a str,
    marker: &'a str,
    release: &'a str,
    modules: &'a modules::GuestModules,
}

fn write_initramfs(path: &Path, guest: &Guest) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut archive = cpio::Archive::new(BufWriter::new(file));
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "root", "run", "var/log", "etc",
    ] {
        archive.dir(dir, 0o755)?;
    }
    archive.dir("tmp", 0o1777)?;
    archive.dir("var/tmp", 0o1777)?;
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.char_device("dev/console", 0o600, 5, 1)?;
    archive.char_device("dev/null", 0o666, 1, 3)?;
    archive.file_from("bin/busybox", 0o755, guest.busybox)?;
    archive.symlink("bin/sh", "busybox")?;

    archive.file_from(GUEST_DYNAMOS, 0o755, guest.dynamos)?;
    let mut copied = BTreeSet::new();
    for library in host::shared_libraries(guest.dynamos)? {
        let name = library.to_string_lossy().into_owned();
        if copied.insert(name.clone()) {
            archive.file_from(&name, 0o755, &library)?;
        }
    }

    archive.dir(GUEST_PACKAGES, 0o755)?;
    for (name, source) in guest.packages {
        archive.file_from(&format!("{GUEST_PACKAGES}/{name}"), 0o644, source)?;
    }
    archive.dir(GUEST_TRUSTED_KEYS, 0o755)?;
    for (name, source) in guest.keys {
        archive.file_from(&format!("{GUEST_TRUSTED_KEYS}/{name}"), 0o644, source)?;
    }

    if !guest.modules.files.is_empty() {
        let base = format!("lib/modules/{}", guest.release);
        for (rel, source) in &guest.modules.files {
            // Uncompressed, as modules.order names them: busybox's modprobe
            // loads plain files.
            let data = crate::target::module_bytes(source)?;
            archive.file(&format!("{base}/{rel}"), 0o644, &data)?;
        }
        archive.file(
            &format!("{base}/modules.dep"),
            0o644,
            guest.modules.modules_dep.as_bytes(),
        )?;
        archive.file(
            &format!("{base}/modules.alias"),
            0o644,
            guest.modules.modules_alias.as_bytes(),
        )?;
        // Where the kernel runs modprobe for its own requests.
        archive.symlink("sbin/modprobe", "/bin/busybox")?;
    }

    archive.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    archive.file("etc/group", 0o644, b"root:x:0:\n")?;
    archive.file("etc/hostname", 0o644, b"dynamos-vm\n")?;
    archive.file("dynamos/command", 0o600, guest.command.as_bytes())?;
    let device_nodes: String = guest
        .modules
        .device_nodes
        .iter()
        .map(|n| {
            format!(
                "mknod -m 600 /dev/{} {} {} {}\n",
                n.name, n.kind, n.major, n.minor
            )
        })
        .collect();
    archive.file(
        "init",
        0o755,
        init_script(guest.marker, &device_nodes).as_bytes(),
    )?;
    archive.finish()?;
    Ok(())
}

/// PID 1 of the guest: set up the filesystems and the device nodes that
/// load a module when opened, run the command with its output on the
/// second serial port, report the status, power off.
fn init_script(marker: &str, device_nodes: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
{device_nodes}mount -t devpts devpts /dev/pts 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname dynamos-vm
cd /root
{{
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    /bin/sh -c "$(cat /dynamos/command)" </dev/null 2>&1
    rc=$?
    printf '\n%s %d\n' '{marker}' "$rc"
}} >/dev/ttyS1
sync
poweroff -f
"#
    )
}

/// Split the second serial port's text into the command's output and its
/// exit status; `None` when the marker line never arrived.
fn parse_output(raw: &str, marker: &str) -> Option<(String, i32)> {
    let start = raw.rfind(&format!("\n{marker} "))?;
    let status_text = raw[start + 1 + marker.len()..].trim_start();
    let status: i32 = status_text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())?;
    Some((raw[..start].to_string(), status))
}

fn console_tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    if lines.is_empty() {
        return " (the kernel console stayed empty)".to_string();
    }
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
    format!("\n--- kernel console, last lines ---\n{}", tail.join("\n"))
}

fn output_tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..];
    format!("\n--- command output, last lines ---\n{}", tail.join("\n"))
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).replace("\r\n", "\n"))
        .unwrap_or_default()
}

/// A path for a QEMU option value, where commas must be doubled.
fn qemu_path(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    Ok(text.replace(',', ",,"))
}

fn nonce() -> Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(bytes))
}

/// A private scratch folder, removed when the run ends.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create() -> Result<WorkDir> {
        let path =
            std::env::temp_dir().join(format!("dynamos-vm-{}-{}", std::process::id(), nonce()?));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// QEMU is never left running, even when the caller unwinds.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_are_split_at_the_marker() {
        let raw = "hello\nworld\nM-1 7\n";
        assert_eq!(
            parse_output(raw, "M-1"),
            Some(("hello\nworld".to_string(), 7))
        );
        // Output without a final newline keeps it absent.
        assert_eq!(
            parse_output("abc\nM-1 0\n", "M-1"),
            Some(("abc".to_string(), 0))
        );
        assert_eq!(parse_output("\nM-1 3\n", "M-1"), Some((String::new(), 3)));
        assert_eq!(parse_output("abc\n", "M-1"), None);
        assert_eq!(parse_output("abc\nM-1 ", "M-1"), None);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let missing = VmOptions {
            packages: vec![PathBuf::from("/nonexistent/pkg.dlp")],
            command: "true".into(),
            ..VmOptions::default()
        };
        let err = run(&missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/pkg.dlp"), "{err}");
        let kernel = VmOptions {
            kernel: Some("9.9.9-bogus".into()),
            command: "true".into(),
            ..VmOptions::default()
        };
        let err = run(&kernel).unwrap_err().to_string();
        assert!(err.contains("not a Debian amd64 kernel release"), "{err}");
        let no_time = VmOptions {
            timeout: Duration::ZERO,
            ..VmOptions::default()
        };
        assert!(run(&no_time).unwrap_err().to_string().contains("timeout"));
        let tiny = VmOptions {
            memory_mb: 16,
            ..VmOptions::default()
        };
        assert!(run(&tiny).unwrap_err().to_string().contains("memory"));
        let too_coarse_clock = VmOptions {
            instruction_clock_shift: Some(11),
            ..VmOptions::default()
        };
        let err = run(&too_coarse_clock).unwrap_err().to_string();
        assert!(err.contains("instruction clock"), "{err}");
        let no_binary = VmOptions {
            dynamos_binary: Some(PathBuf::from("/nonexistent/dynamos")),
            ..VmOptions::default()
        };
        let err = run(&no_binary).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/dynamos"), "{err}");
    }
}
