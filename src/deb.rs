//! `dynamos deb`: wrap an update package as a Debian package, so a fleet
//! rolls fixes out through its own apt repository. The .deb depends on the
//! exact linux-image build the update is for and on dynamos; its postinst
//! runs `dynamos install`, its prerm `dynamos uninstall` (docs/fleet.md).
//! (`crate::debian` is the other direction: reading Debian's archive.)

use crate::package::{self, Manifest};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the wrapped update package lands on the machine.
pub const PACKAGES_DIR: &str = "/usr/share/dynamos/packages";

#[derive(Debug, Clone)]
pub struct DebOptions {
    /// Debian version of the wrapper (`1`, `2`, ... for rebuilds of a fix).
    pub version: String,
    pub maintainer: String,
    /// The .deb to write; `None` means `<name>_<version>_amd64.deb` here.
    pub output: Option<PathBuf>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct DebPackage {
    pub path: PathBuf,
    /// The Debian package name.
    pub name: String,
    /// What it depends on, as in its control file.
    pub depends: String,
}

/// Write a .deb holding the update package at `package`.
pub fn wrap(package: &Path, opts: &DebOptions) -> Result<DebPackage> {
    let bytes = package::read_file(package)?;
    let (pkg, _) =
        package::read_unverified(&bytes).with_context(|| format!("{}", package.display()))?;
    let manifest = &pkg.manifest;
    if !is_debian_version(&opts.version) {
        bail!(
            "{:?} is not a Debian version (digits first, then letters, digits and .+~-)",
            opts.version
        );
    }
    if opts.maintainer.trim().is_empty() || opts.maintainer.contains('\n') {
        bail!("the maintainer must be one line, such as `Security Team <security@example.org>`");
    }
    let name = debian_name(manifest)?;
    check_control_values(manifest)?;
    let depends = depends(manifest);
    let output = opts
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}_{}_amd64.deb", opts.version)));

    let stage = tempfile::tempdir().context("cannot create a scratch folder")?;
    let root = stage.path().join("root");
    let installed_as = format!(
        "{PACKAGES_DIR}/{}_{}.dynpkg",
        manifest.name, manifest.target.release
    );
    write(&root, &installed_as, &bytes, 0o644)?;
    write(
        &root,
        "DEBIAN/control",
        control(manifest, &name, &depends, opts).as_bytes(),
        0o644,
    )?;
    write(
        &root,
        "DEBIAN/postinst",
        postinst(&installed_as).as_bytes(),
        0o755,
    )?;
    write(&root, "DEBIAN/prerm", prerm(manifest).as_bytes(), 0o755)?;
    build_deb(&root, &output)?;
    Ok(DebPackage {
        path: output,
        name,
        depends,
    })
}

/// The systemd units dynamos ships (`dist/systemd/`).
const UNITS: [(&str, &str); 3] = [
    (
        "dynamos.service",
        include_str!("../dist/systemd/dynamos.service"),
    ),
    (
        "dynamos-confirm.service",
        include_str!("../dist/systemd/dynamos-confirm.service"),
    ),
    (
        "dynamos-confirm.timer",
        include_str!("../dist/systemd/dynamos-confirm.timer"),
    ),
];

/// Documents installed under /usr/share/doc/dynamos.
const DOCS: [(&str, &str); 4] = [
    ("README.md", include_str!("../README.md")),
    ("user-guide.md", include_str!("../docs/user-guide.md")),
    ("fleet.md", include_str!("../docs/fleet.md")),
    (
        "package-format.md",
        include_str!("../docs/package-format.md"),
    ),
];

/// What `dynamos-build` runs, one package a line (`#` comments), the list
/// `scripts/install-deps.sh` installs.
const BUILD_DEPENDENCIES: &str = include_str!("../dist/build-dependencies");

/// [`BUILD_DEPENDENCIES`] as a control field's list.
fn build_recommends() -> String {
    BUILD_DEPENDENCIES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Write dynamos's own .deb from the `dynamos` and `dynamos-build`
/// binaries in `binaries`: the systemd units (enabled on install), man
/// pages and bash, zsh and fish completions made from the clap definitions,
/// and the documents. Its libc dependency is read from the binaries.
pub fn wrap_tool(binaries: &Path, output: &Path, maintainer: &str) -> Result<DebPackage> {
    use clap::CommandFactory;
    let stage = tempfile::tempdir().context("cannot create a scratch folder")?;
    let root = stage.path().join("root");
    let mut libraries = SharedLibraries::default();
    for binary in ["dynamos", "dynamos-build"] {
        let path = binaries.join(binary);
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        libraries
            .add(&bytes)
            .with_context(|| format!("{}", path.display()))?;
        write(&root, &format!("usr/bin/{binary}"), &bytes, 0o755)?;
    }
    let commands = [
        crate::cli::dynamos::Cli::command(),
        crate::cli::build::Args::command(),
    ];
    for command in &commands {
        for page in man_pages(command)? {
            write(
                &root,
                &format!("usr/share/man/man1/{}", page.0),
                &page.1,
                0o644,
            )?;
        }
        let name = command.get_name().to_string();
        for (shell, path) in [
            (
                clap_complete::Shell::Bash,
                format!("usr/share/bash-completion/completions/{name}"),
            ),
            (
                clap_complete::Shell::Zsh,
                format!("usr/share/zsh/vendor-completions/_{name}"),
            ),
            (
                clap_complete::Shell::Fish,
                format!("usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), &name, &mut script);
            write(&root, &path, &script, 0o644)?;
        }
    }
    for (name, text) in UNITS {
        write(
            &root,
            &format!("lib/systemd/system/{name}"),
            text.as_bytes(),
            0o644,
        )?;
    }
    for (name, text) in DOCS {
        write(
            &root,
            &format!("usr/share/doc/dynamos/{name}"),
            text.as_bytes(),
            0o644,
        )?;
    }
    write(
        &root,
        "usr/share/doc/dynamos/copyright",
        b"dynamos is licensed under the GNU General Public License, version 2 only.\n\
          On Debian systems its text is in /usr/share/common-licenses/GPL-2.\n",
        0o644,
    )?;
    let depends = libraries.depends()?;
    let recommends = build_recommends();
    let control = format!(
        "Package: dynamos\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {maintainer}\n\
         Depends: {depends}\n\
         Recommends: {recommends}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: live updates for the running Linux kernel\n \
         dynamos-build compiles a kernel fix into a signed update package;\n \
         dynamos applies it to the running kernel without a reboot, and with\n \
         dynamos install and dynamos.service at every boot of that kernel.\n",
        version = env!("CARGO_PKG_VERSION"),
        maintainer = maintainer.trim(),
    );
    write(&root, "DEBIAN/control", control.as_bytes(), 0o644)?;
    let units: Vec<&str> = UNITS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !name.ends_with("confirm.service"))
        .collect();
    let units = units.join(" ");
    // As debhelper's systemd handling: enabled on first install, an
    // administrator's disable kept across upgrades, the manager reloaded.
    let postinst = format!(
        "#!/bin/sh\n\
         # Generated by dynamos package-tool: the trusted-key folder, and\n\
         # the boot units enabled unless an administrator disabled them.\n\
         set -e\n\
         case \"$1\" in\n\
         configure|abort-upgrade|abort-deconfigure|abort-remove)\n\
         \x20   mkdir -p /etc/dynamos/trusted.d\n\
         \x20   if command -v deb-systemd-helper >/dev/null 2>&1; then\n\
         \x20       for unit in {units}; do\n\
         \x20           deb-systemd-helper unmask \"$unit\" >/dev/null || true\n\
         \x20           if deb-systemd-helper --quiet was-enabled \"$unit\"; then\n\
         \x20               deb-systemd-helper enable \"$unit\" >/dev/null || true\n\
         \x20           else\n\
         \x20               deb-systemd-helper update-state \"$unit\" >/dev/null || true\n\
         \x20           fi\n\
         \x20       done\n\
         \x20   fi\n\
         \x20   if [ -d /run/systemd/system ]; then\n\
         \x20       systemctl --system daemon-reload >/dev/null || true\n\
         \x20   fi\n\
         \x20   ;;\n\
         esac\n"
    );
    write(&root, "DEBIAN/postinst", postinst.as_bytes(), 0o755)?;
    let postrm = format!(
        "#!/bin/sh\n\
         # Generated by dynamos package-tool.\n\
         set -e\n\
         if [ -d /run/systemd/system ]; then\n\
         \x20   systemctl --system daemon-reload >/dev/null || true\n\
         fi\n\
         if command -v deb-systemd-helper >/dev/null 2>&1; then\n\
         \x20   case \"$1\" in\n\
         \x20   remove) deb-systemd-helper mask {units} >/dev/null || true ;;\n\
         \x20   purge) deb-systemd-helper purge {units} >/dev/null || true\n\
         \x20          deb-systemd-helper unmask {units} >/dev/null || true ;;\n\
         \x20   esac\n\
         fi\n"
    );
    write(&root, "DEBIAN/postrm", postrm.as_bytes(), 0o755)?;
    build_deb(&root, output)?;
    Ok(DebPackage {
        path: output.to_path_buf(),
        name: "dynamos".into(),
        depends,
    })
}

/// `NAME.1` and one `NAME-SUBCOMMAND.1` per visible subcommand.
fn man_pages(command: &clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    let name = command.get_name().to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .context("cannot render a man page")?;
    pages.push((format!("{name}.1"), page));
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = format!("{name}-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(full.clone()))
            .render(&mut page)
            .context("cannot render a man page")?;
        pages.push((format!("{full}.1"), page));
    }
    Ok(pages)
}

/// The shared libraries binaries need, from their ELF version needs.
#[derive(Default)]
struct SharedLibraries {
    /// Newest `GLIBC_x.y` any binary needs.
    glibc: Option<(u32, u32)>,
    libgcc: bool,
}

impl SharedLibraries {
    fn add(&mut self, binary: &[u8]) -> Result<()> {
        use object::read::elf::{ElfFile64, FileHeader};
        let file = ElfFile64::<object::Endianness>::parse(binary).context("not an ELF binary")?;
        let endian = file.endian();
        let sections = file.elf_header().sections(endian, binary)?;
        let Some((mut needs, link)) = sections.gnu_verneed(endian, binary)? else {
            return Ok(());
        };
        let strings = sections.strings(endian, binary, link)?;
        while let Some((need, mut auxes)) = needs.next()? {
            let library = String::from_utf8_lossy(need.file(endian, strings)?).into_owned();
            match library.as_str() {
                "libc.so.6"
                | "libm.so.6"
                | "libpthread.so.0"
                | "libdl.so.2"
                | "librt.so.1"
                | "ld-linux-x86-64.so.2" => {
                    while let Some(aux) = auxes.next()? {
                        let version =
                            String::from_utf8_lossy(aux.name(endian, strings)?).into_owned();
                        if let Some(v) = parse_glibc_version(&version) {
                            self.glibc = self.glibc.max(Some(v));
                        }
                    }
                }
                "libgcc_s.so.1" => self.libgcc = true,
                other => bail!("needs {other}, which the Debian package does not declare"),
            }
        }
        Ok(())
    }

    fn depends(&self) -> Result<String> {
        let Some((major, minor)) = self.glibc else {
            bail!("the binaries need no glibc version: they are not the dynamically linked build");
        };
        let mut depends = format!("libc6 (>= {major}.{minor})");
        if self.libgcc {
            depends.push_str(", libgcc-s1");
        }
        Ok(depends)
    }
}

/// `GLIBC_2.34` → (2, 34).
fn parse_glibc_version(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.strip_prefix("GLIBC_")?.split_once('.')?;
    let minor = minor.split('.').next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Run `dpkg-deb --build`, files owned by root whoever builds.
fn build_deb(root: &Path, output: &Path) -> Result<()> {
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(root)
        .arg(output)
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("dpkg-deb not found: install Debian's dpkg package")
        }
        Err(e) => Err(e).context("cannot run dpkg-deb"),
        Ok(out) if !out.status.success() => bail!(
            "dpkg-deb could not build {}: {}",
            output.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => Ok(()),
    }
}

/// The manifest's words that go into the control file and the maintainer
/// scripts: one line each, no characters that end a field or a version.
fn check_control_values(manifest: &Manifest) -> Result<()> {
    let plain = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
    };
    if !manifest
        .name
        .starts_with(|c: char| c.is_ascii_alphanumeric())
        || !plain(&manifest.name)
    {
        bail!(
            "package name {:?} cannot name a Debian package",
            manifest.name
        );
    }
    for (what, value) in [
        ("kernel release", Some(&manifest.target.release)),
        ("kernel version", manifest.target.debian_version.as_ref()),
        ("tool version", Some(&manifest.tool_version)),
    ] {
        if let Some(value) = value.filter(|v| !plain(v)) {
            bail!("the package's {what} {value:?} cannot go into a Debian control file");
        }
    }
    Ok(())
}

/// `dynamos-update-<name>-<release>`, in the characters Debian allows.
fn debian_name(manifest: &Manifest) -> Result<String> {
    let name = format!(
        "dynamos-update-{}-{}",
        manifest.name, manifest.target.release
    )
    .to_ascii_lowercase()
    .replace('_', "-");
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    {
        bail!("package name {name:?} has characters a Debian package name cannot hold");
    }
    Ok(name)
}

/// The exact kernel build (its Debian version when the package knows it)
/// and a dynamos that reads this package format.
fn depends(manifest: &Manifest) -> String {
    let kernel = format!("linux-image-{}", manifest.target.release);
    let kernel = match &manifest.target.debian_version {
        Some(version) => format!("{kernel} (= {version})"),
        None => kernel,
    };
    format!("dynamos (>= {}), {kernel}", env!("CARGO_PKG_VERSION"))
}

fn control(manifest: &Manifest, name: &str, depends: &str, opts: &DebOptions) -> String {
    // File names are free text: one line, nothing else.
    let patches: Vec<String> = manifest
        .patches
        .iter()
        .map(|p| p.file.chars().filter(|c| !c.is_control()).collect())
        .collect();
    let functions: usize = manifest.objects.iter().map(|o| o.replaced.len()).sum();
    format!(
        "Package: {name}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {maintainer}\n\
         Depends: {depends}\n\
         Section: kernel\n\
         Priority: optional\n\
         Description: live update {update} for Linux {release}\n \
         Built by dynamos {tool} from {patches}; replaces {functions} function(s).\n \
         Installing it keeps the update for every boot of that kernel\n \
         (dynamos install); dynamos apply makes it live at once.\n",
        version = opts.version,
        maintainer = opts.maintainer.trim(),
        update = manifest.name,
        release = manifest.target.release,
        tool = manifest.tool_version,
        patches = patches.join(", "),
    )
}

fn postinst(installed_as: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # Generated by dynamos deb: keep the update for every boot.\n\
         set -e\n\
         case \"$1\" in\n\
         configure|abort-upgrade|abort-deconfigure|abort-remove)\n\
         \x20   rc=0\n\
         \x20   dynamos install {installed_as} || rc=$?\n\
         \x20   # 3: this very package is installed already (a reinstall).\n\
         \x20   [ \"$rc\" -eq 0 ] || [ \"$rc\" -eq 3 ] || exit \"$rc\"\n\
         \x20   ;;\n\
         esac\n"
    )
}

fn prerm(manifest: &Manifest) -> String {
    format!(
        "#!/bin/sh\n\
         # Generated by dynamos deb: forget the update when the package is\n\
         # removed (a live one stays live until `dynamos revert {name}`).\n\
         # An upgrade keeps it: the new version's install takes its place\n\
         # and keeps any crash-guard hold.\n\
         set -e\n\
         case \"$1\" in\n\
         remove)\n\
         \x20   dynamos uninstall {name} --release {release} || true\n\
         \x20   ;;\n\
         esac\n",
        name = manifest.name,
        release = manifest.target.release,
    )
}

fn write(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<()> {
    let target = root.join(path.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(&target, data).with_context(|| format!("cannot write {}", target.display()))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", target.display()))
}

/// Debian policy 5.6.12, without an epoch: upstream version starting with
/// a digit.
fn is_debian_version(version: &str) -> bool {
    version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.~-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommends_every_build_dependency_and_no_comment() {
        let recommends = build_recommends();
        assert!(
            recommends.starts_with("build-essential, gcc-12, "),
            "{recommends}"
        );
        assert!(recommends.ends_with(", debootstrap"), "{recommends}");
        assert!(recommends.contains(", zstd, "), "{recommends}");
        assert!(!recommends.contains('#'), "{recommends}");
    }

    #[test]
    fn versions_and_names_follow_debian_policy() {
        for good in ["1", "2.0", "1.0~rc1", "1+deb12u1", "0-1"] {
            assert!(is_debian_version(good), "{good}");
        }
        for bad in ["", "v1", "1 2", "1:2", "1_2", "1\n"] {
            assert!(!is_debian_version(bad), "{bad:?}");
        }
        let mut m = crate::apply::resolve::tests::manifest();
        m.name = "Fix_Pipe".into();
        m.target.release = "6.12.117+deb13-amd64".into();
        m.target.debian_version = Some("6.12.117-1".into());
        assert_eq!(
            debian_name(&m).unwrap(),
            "dynamos-update-fix-pipe-6.12.117+deb13-amd64"
        );
        assert_eq!(
            depends(&m),
            format!(
                "dynamos (>= {}), linux-image-6.12.117+deb13-amd64 (= 6.12.117-1)",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(parse_glibc_version("GLIBC_2.34"), Some((2, 34)));
        assert_eq!(parse_glibc_version("GLIBC_2.2.5"), Some((2, 2)));
        assert_eq!(parse_glibc_version("GLIBC_PRIVATE"), None);
        m.name = "fix/../x".into();
        assert!(debian_name(&m).is_err());
    }
}
