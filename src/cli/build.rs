//! The command line of `dynamos-build` (see `cli/dynamos.rs` for why it
//! lives in the library).

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dynamos-build",
    version,
    about = "Build a signed live-update package from kernel patches"
)]
pub struct Args {
    /// Unified diffs against the kernel tree (applied with -p1, in order).
    #[arg(required = true)]
    pub patches: Vec<PathBuf>,
    /// Package file to write (default: NAME.dynpkg from the first patch).
    /// With several --target: the folder to write NAME-RELEASE.dynpkg in
    /// (default: the current one).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Debian kernel build to target, e.g. 6.1.0-57-amd64 (the default).
    /// Repeat to build one package per kernel build in one run.
    #[arg(long, value_name = "RELEASE")]
    pub target: Vec<String>,
    /// With several --target: how many target builds run at once (default:
    /// one per processor); kbuild's -j is divided among them.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Internal: a run for several targets builds RELEASE's package here.
    #[arg(long, value_name = "RELEASE", hide = true)]
    pub worker_for: Option<String>,
    /// Your own kernel source tree (used read-only), with --config.
    #[arg(long, requires = "config")]
    pub src: Option<PathBuf>,
    /// Kernel config for --src.
    #[arg(long, requires = "src")]
    pub config: Option<PathBuf>,
    /// Module.symvers of the kernel built from --src (needed with CONFIG_MODVERSIONS).
    #[arg(long, requires = "src")]
    pub symvers: Option<PathBuf>,
    /// Source folder of an out-of-tree module built with kbuild (a Kbuild
    /// or Makefile with obj-m), used read-only: the patches fix it (paths
    /// relative to DIR) instead of the kernel tree.
    #[arg(long, value_name = "DIR")]
    pub module_src: Option<PathBuf>,
    /// Secret key to sign with (default: the one `dynamos keygen` wrote).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Also sign the kernel module with this X.509 module-signing key (a
    /// PEM private key, or a PKCS#11 URI), as the target's scripts/sign-file
    /// does, for kernels that enforce module signatures (Secure Boot,
    /// module.sig_enforce=1). The kernel must trust its certificate.
    #[arg(long, value_name = "KEY")]
    pub module_key: Option<PathBuf>,
    /// Certificate of --module-key, PEM or DER (default: the --module-key
    /// file, which then holds both, as the kernel's signing_key.pem does).
    #[arg(long, value_name = "CERT", requires = "module_key")]
    pub module_cert: Option<PathBuf>,
    /// Package name (default: the first patch's file name without .diff).
    #[arg(long)]
    pub name: Option<String>,
    /// Make a cumulative update superseding this earlier package; repeat for
    /// several. Applying it replaces every applied update atomically.
    #[arg(long, value_name = "PACKAGE")]
    pub replaces: Vec<String>,
    /// Let a hunk land ignoring up to N context lines at its start and end
    /// (as `patch --fuzz N`); each such hunk is noted.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fuzz: usize,
    /// Replace FUNCTION even if the patches leave its code unchanged (an
    /// identity update, e.g. to measure the redirect's cost); repeatable.
    /// FUNCTION must be in a file the patches touch and have an ftrace entry.
    #[arg(long, value_name = "FUNCTION")]
    pub replace_unchanged: Vec<String>,
    /// Print how long each stage took.
    #[arg(long)]
    pub timings: bool,
    /// Print one JSON object on standard output instead of text: what the
    /// package replaces and adds, its notes and stage timings, or why it
    /// was not written (docs/user-guide.md describes the fields).
    #[arg(long)]
    pub json: bool,
}
