//! The command line of `dynamos`, here so that man pages and shell
//! completions are made from the same definitions (`scripts/deb.sh`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dynamos",
    version,
    about = "Live updates for a running Linux kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the ed25519 key pair packages are signed with.
    Keygen {
        /// Folder for signing.key and signing.pub (default ~/.config/dynamos).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Replace an existing key pair.
        #[arg(long)]
        force: bool,
    },
    /// Print a package's manifest: target, functions, signing key.
    Inspect {
        package: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also write the package's kernel module (.ko) to this file.
        #[arg(long, value_name = "FILE")]
        save_module: Option<PathBuf>,
    },
    /// Check a package's signature against the trusted keys.
    Verify {
        package: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Load a package into the running kernel (root).
    Apply {
        package: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Seconds to wait for every task to switch to the new functions.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Undo an applied package (root).
    Revert {
        /// Package (or module) name, as `dynamos list` shows it.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Revert every applied package, newest first.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Verify a package and keep it under /var/lib/dynamos/installed for the
    /// kernel it targets, to be applied at every boot of that kernel (root).
    /// Applying it now is `apply`.
    Install {
        package: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Forget an installed package; an applied update stays applied until
    /// `revert` (root).
    Uninstall {
        /// Package name, as `dynamos list` shows it.
        name: String,
        /// Only the copy for this kernel release (default: every release).
        #[arg(long)]
        release: Option<String>,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Let a package held by the crash guard be applied at boot again (root).
    Unhold {
        /// Package name, as `dynamos list` shows it.
        name: String,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Apply the installed packages for the running kernel, in install
    /// order; run early at boot by dynamos.service (root).
    Boot {
        /// Record that this boot survived its applies made at least --grace
        /// seconds ago (dynamos-confirm.timer runs it every minute); an
        /// apply never confirmed holds its package at the next boot.
        #[arg(long)]
        confirm: bool,
        /// With --confirm: how old, in seconds, an apply must be to be
        /// confirmed.
        #[arg(long, default_value_t = 120, requires = "confirm")]
        grace: u64,
        /// Seconds each package's transition may take.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Print one JSON object on standard output (docs/user-guide.md).
        #[arg(long)]
        json: bool,
    },
    /// Wrap an update package as a Debian package that depends on the exact
    /// linux-image build it is for and installs it with `dynamos install`.
    Deb {
        package: PathBuf,
        /// The .deb to write (default: NAME_VERSION_amd64.deb here).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Debian version of the .deb; raise it for a rebuilt fix.
        #[arg(long = "deb-version", default_value = "1")]
        version: String,
        #[arg(long, default_value = "dynamos <root@localhost>")]
        maintainer: String,
    },
    /// Write dynamos's own Debian package from built binaries
    /// (scripts/deb.sh).
    #[command(hide = true)]
    PackageTool {
        /// Folder holding the `dynamos` and `dynamos-build` binaries.
        #[arg(long)]
        binaries: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "dynamos <root@localhost>")]
        maintainer: String,
    },
    /// End the rollout of an adaptively replaced function: its new version
    /// serves every call from now on, its handler is no longer asked (root).
    Promote {
        /// Function name, as `dynamos list` shows it.
        function: String,
    },
    /// Show the live updates of the running kernel.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Boot the target kernel in a throwaway QEMU machine and run commands
    /// there as root, with this binary on PATH and packages under /packages.
    Vm {
        /// Debian kernel build to boot (default 6.1.0-57-amd64).
        #[arg(long)]
        kernel: Option<String>,
        /// A package to copy to /packages in the guest (repeatable).
        #[arg(long = "package")]
        packages: Vec<PathBuf>,
        /// A public key to trust in the guest besides your own signing key.
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        /// Seconds before the machine is stopped.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// A module of the booted kernel to make loadable with `modprobe`
        /// in the guest, with its dependencies (repeatable).
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        /// Guest clock from executed instructions, one per 2^SHIFT ns, not
        /// host time: timings that do not depend on the host's load.
        #[arg(long, value_name = "SHIFT")]
        icount: Option<u32>,
        /// A raw disk image to attach as /dev/vda; it keeps what the guest
        /// writes, so a second run with it is a reboot.
        #[arg(long, value_name = "IMAGE")]
        disk: Option<PathBuf>,
        /// A further kernel command-line word (repeatable).
        #[arg(long = "append", value_name = "WORD")]
        kernel_arguments: Vec<String>,
        /// Shell commands to run in the guest.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Compare two builds of one object file function by function.
    Diff {
        original: PathBuf,
        patched: PathBuf,
        /// Print {"changed": [...], "new": [...], "refused": [...]}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct TrustArgs {
    /// A further trusted public key file (besides /etc/dynamos/trusted.d).
    #[arg(long = "trust")]
    pub trust: Vec<PathBuf>,
}
