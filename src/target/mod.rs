//! The kernel a package is built for: where its pristine source, its config
//! and its module-building headers come from, which compiler builds for it
//! (`toolchain`), what its special sections look like (`abi`, `probe`), and
//! where builds for it are cached. A Debian 12 or 13 build is fetched from
//! the Debian archive on first use; a user's own tree (`--src DIR --config
//! FILE`) is used in place and never written.

pub mod abi;
pub mod probe;
pub mod toolchain;

use crate::cache;
use crate::debian::{self, Archive, DebRef};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

/// Kernel release of the default target: Debian 12's current kernel.
pub const DEFAULT_RELEASE: &str = "6.1.0-57-amd64";

/// The kernel series of a Debian version: `6.1.176-1` → `6.1`.
fn source_series(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// Identity of a Debian kernel build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianBuild {
    /// ABI release as `uname -r` prints it, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// Debian version of the linux source and image packages, e.g. `6.1.192-3`.
    pub version: String,
}

impl DebianBuild {
    /// The Debian build of `release`, found through apt: the version of
    /// its linux-image package, which its linux-source package must also
    /// be served at. Remembered in the target's cache folder once found.
    pub fn by_release(release: &str) -> Result<DebianBuild> {
        let well_formed = release.ends_with("-amd64")
            && release.starts_with(|c: char| c.is_ascii_digit())
            && release
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '~'));
        if !well_formed {
            bail!("{release:?} is not a Debian amd64 kernel release (like {DEFAULT_RELEASE})");
        }
        let remembered = target_dir(release).join("debian-version");
        if let Ok(version) = fs::read_to_string(&remembered) {
            return Ok(DebianBuild {
                release: release.to_string(),
                version: version.trim().to_string(),
            });
        }
        let image = format!("linux-image-{release}");
        let mut served = debian::served_versions(&image)?;
        if served.is_empty() {
            // A release newer than the index: read the archive again.
            debian::update_kernel_index(Some(std::time::Duration::from_secs(3600)))?;
            served = debian::served_versions(&image)?;
        }
        let Some(version) = served.into_iter().next() else {
            let served: Vec<String> = debian::package_names("^linux-image-[0-9].*-amd64$")?
                .iter()
                .filter_map(|n| n.strip_prefix("linux-image-"))
                // `6.12-amd64` is a metapackage: a kernel names three version parts.
                .filter(|r| {
                    r.split('-')
                        .next()
                        .is_some_and(|v| v.matches('.').count() == 2)
                })
                .map(str::to_string)
                .collect();
            bail!(
                "unknown target {release}: apt serves no {image}; the kernels it serves are {}",
                if served.is_empty() {
                    "none".to_string()
                } else {
                    served.join(", ")
                }
            );
        };
        let source = format!("linux-source-{}", source_series(&version));
        let sources = debian::served_versions(&source)?;
        if !sources.contains(&version) {
            bail!(
                "target {release}: apt serves {image} {version} but not {source} {version} (it serves {}), so the fix cannot be compiled for it",
                if sources.is_empty() {
                    "no version".to_string()
                } else {
                    sources.join(", ")
                }
            );
        }
        let build = DebianBuild {
            release: release.to_string(),
            version,
        };
        // Best effort: apt answers the same question next time.
        let _ = cache::write_atomic(&remembered, format!("{}\n", build.version).as_bytes());
        Ok(build)
    }

    /// `linux-source-6.1`: the source package of this build's series.
    fn source_package(&self) -> String {
        format!("linux-source-{}", source_series(&self.version))
    }

    fn image_deb(&self) -> DebRef {
        DebRef::new(
            &format!("linux-image-{}", self.release),
            Some(&self.version),
        )
    }

    /// The linux-image package unpacked: `boot/` and `lib/modules/`
    /// (`usr/lib/modules/` since Debian 13 merged /usr).
    pub fn image_root(&self) -> Result<PathBuf> {
        let dir = target_dir(&self.release).join("image");
        debian::unpacked(&dir, &[self.image_deb()], Archive::Kernels)
    }

    pub fn vmlinuz(&self) -> Result<PathBuf> {
        Ok(self
            .image_root()?
            .join(format!("boot/vmlinuz-{}", self.release)))
    }

    pub fn modules_dir(&self) -> Result<PathBuf> {
        let root = self.image_root()?;
        let merged = root.join(format!("usr/lib/modules/{}", self.release));
        Ok(if merged.is_dir() {
            merged
        } else {
            root.join(format!("lib/modules/{}", self.release))
        })
    }

    fn config(&self) -> Result<PathBuf> {
        Ok(self
            .image_root()?
            .join(format!("boot/config-{}", self.release)))
    }

    /// Pristine source tree, shared by every target built from that version.
    fn source(&self) -> Result<PathBuf> {
        let dir = cache::cache_root()
            .join("sources")
            .join(format!("linux-{}", self.version));
        let package = self.source_package();
        let tree = dir.join(&package);
        cache::ensure_dir(&dir, |tmp| {
            let deb_dir = tmp.join(".debs");
            fs::create_dir_all(&deb_dir)?;
            let debs = debian::download(
                &[DebRef::new(&package, Some(&self.version))],
                &deb_dir,
                Archive::Kernels,
            )?;
            debian::extract(&debs[0], &deb_dir)?;
            let tarball = deb_dir.join(format!("usr/src/{package}.tar.xz"));
            let progress = crate::report::spinner(format!("unpacking {}", tarball.display()));
            let status = std::process::Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(tmp)
                .status()
                .context("cannot run tar")?;
            progress.finish_and_clear();
            if !status.success() {
                bail!("cannot unpack {}", tarball.display());
            }
            fs::remove_dir_all(&deb_dir)?;
            Ok(())
        })?;
        Ok(tree)
    }

    /// GNU build-id of the image's vmlinux, computed once and cached.
    pub fn build_id(&self) -> Result<String> {
        let cached = target_dir(&self.release).join("build-id");
        if let Ok(id) = fs::read_to_string(&cached) {
            return Ok(id.trim().to_string());
        }
        let id = crate::identity::vmlinuz_build_id(&self.vmlinuz()?)?;
        cache::write_atomic(&cached, format!("{id}\n").as_bytes())?;
        Ok(id)
    }

    /// Headers for building external modules, with the absolute paths of
    /// Debian's layout rewritten to point into the cache.
    fn headers(&self) -> Result<PathBuf> {
        let dir = target_dir(&self.release).join("headers");
        let kbuild_dir = format!("usr/src/linux-headers-{}", self.release);
        cache::ensure_dir(&dir, |tmp| {
            let deb_dir = tmp.join(".debs");
            fs::create_dir_all(&deb_dir)?;
            // The headers package, the common headers and the kbuild tools
            // it depends on (Debian 12 keeps only the newest kbuild-6.1).
            let headers = format!("linux-headers-{}", self.release);
            let mut wanted = vec![DebRef::new(&headers, Some(&self.version))];
            for prefix in ["linux-headers-", "linux-kbuild-"] {
                wanted.extend(debian::dependencies(&headers, &self.version, prefix)?);
            }
            let debs = debian::download(&wanted, &deb_dir, Archive::Kernels)?;
            for deb in &debs {
                debian::extract(deb, tmp)?;
            }
            fs::remove_dir_all(&deb_dir)?;
            // The arch Makefile includes the common one by absolute path.
            let makefile = tmp.join(&kbuild_dir).join("Makefile");
            let text = fs::read_to_string(&makefile)
                .with_context(|| format!("cannot read {}", makefile.display()))?;
            let final_root = dir.to_string_lossy();
            fs::write(
                &makefile,
                text.replace(
                    "include /usr/src/",
                    &format!("include {final_root}/usr/src/"),
                ),
            )?;
            Ok(())
        })?;
        Ok(dir.join(kbuild_dir))
    }
}

fn target_dir(release: &str) -> PathBuf {
    cache::cache_root().join("targets").join(release)
}

/// How the user named the target on the command line.
#[derive(Debug, Clone, Default)]
pub struct TargetSpec {
    /// A Debian ABI release such as `6.1.0-57-amd64`.
    pub release: Option<String>,
    /// A kernel source tree of the user's, used read-only.
    pub src: Option<PathBuf>,
    /// The config for `src`.
    pub config: Option<PathBuf>,
    /// Module.symvers of the kernel built from `src`: the exported symbols'
    /// versions, needed when the config has CONFIG_MODVERSIONS.
    pub symvers: Option<PathBuf>,
}

/// Everything later stages need to know about the kernel being patched.
#[derive(Debug, Clone)]
pub struct Target {
    /// Kernel release string the package is for (`uname -r` on the target).
    pub release: String,
    /// The Debian build, when the target is one. Stages ask the methods
    /// below rather than this.
    debian: Option<DebianBuild>,
    /// Pristine source tree; never written to.
    pub source: PathBuf,
    /// Kernel config to build with.
    pub config: PathBuf,
    /// Kbuild folder for external modules; `None` means the tool prepares
    /// its own from the configured original build.
    pub headers: Option<PathBuf>,
    /// Cache folder for builds of this target.
    pub work: PathBuf,
    /// Module.symvers for building modules when there are no headers.
    pub symvers: Option<PathBuf>,
    /// GNU build-id of the target's vmlinux, when known.
    pub build_id: Option<String>,
    /// The compiler the kernel was built with, and where it runs.
    pub toolchain: toolchain::Toolchain,
}

impl Target {
    /// The distribution's unpacked modules folder (`lib/modules/<release>`),
    /// when the target is a distribution's build.
    pub fn shipped_modules(&self) -> Result<Option<PathBuf>> {
        self.debian
            .as_ref()
            .map(DebianBuild::modules_dir)
            .transpose()
    }

    /// The distribution's kernel image, when the target is its build.
    pub fn shipped_image(&self) -> Result<Option<PathBuf>> {
        self.debian.as_ref().map(DebianBuild::vmlinuz).transpose()
    }

    /// The kernel's System.map: the distribution's, or the one beside a
    /// user tree's `--symvers`.
    pub fn system_map(&self) -> Result<Option<PathBuf>> {
        Ok(match &self.debian {
            Some(debian) => Some(
                debian
                    .image_root()?
                    .join(format!("boot/System.map-{}", self.release)),
            ),
            None => self
                .symvers
                .as_ref()
                .and_then(|s| s.parent())
                .map(|dir| dir.join("System.map")),
        })
    }

    /// The hash the kernel's module signatures use (`CONFIG_MODULE_SIG_HASH`);
    /// an error when the kernel was built without module signatures.
    pub fn module_signature_hash(&self) -> Result<String> {
        let config = std::fs::read_to_string(&self.config)
            .with_context(|| format!("cannot read {}", self.config.display()))?;
        if toolchain::config_string(&config, "CONFIG_MODULE_SIG_FORMAT").as_deref() != Some("y") {
            anyhow::bail!(
                "the target kernel {} is built without module signatures (CONFIG_MODULE_SIG_FORMAT): it cannot check a signed module",
                self.release
            );
        }
        Ok(toolchain::config_string(&config, "CONFIG_MODULE_SIG_HASH")
            .unwrap_or_else(|| "sha256".to_string()))
    }

    /// The distribution's version of the kernel packages (`6.1.192-3`).
    pub fn distribution_version(&self) -> Option<String> {
        self.debian.as_ref().map(|d| d.version.clone())
    }

    /// The source is a released package that never changes, so an object
    /// built from it once stays valid.
    pub fn source_is_immutable(&self) -> bool {
        self.debian.is_some()
    }

    /// Resolve the spec into a ready-to-use target, fetching what is missing.
    pub fn resolve(spec: &TargetSpec) -> Result<Target> {
        let mut target = Self::resolve_kernel(spec)?;
        target.toolchain = target.toolchain.with_wrapper_from_environment()?;
        Ok(target)
    }

    fn resolve_kernel(spec: &TargetSpec) -> Result<Target> {
        match (&spec.src, &spec.config) {
            (Some(src), Some(config)) => Self::user_tree(
                src,
                config,
                spec.release.as_deref(),
                spec.symvers.as_deref(),
            ),
            (Some(_), None) | (None, Some(_)) => {
                bail!("--src and --config go together: give both, or neither for a Debian build")
            }
            (None, None) => {
                let release = spec.release.as_deref().unwrap_or(DEFAULT_RELEASE);
                Self::debian(DebianBuild::by_release(release)?)
            }
        }
    }

    fn debian(build: DebianBuild) -> Result<Target> {
        let source = build.source()?;
        let config = build.config()?;
        let config_text = fs::read_to_string(&config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        let toolchain = toolchain::Toolchain::for_debian_kernel(
            &config_text,
            debian::codename_of(&build.release)?,
        )?;
        let headers = Some(build.headers()?);
        Ok(Target {
            toolchain,
            release: build.release.clone(),
            work: target_dir(&build.release).join("work"),
            source,
            config,
            headers,
            build_id: Some(build.build_id()?),
            debian: Some(build),
            symvers: None,
        })
    }

    fn user_tree(
        src: &Path,
        config: &Path,
        release: Option<&str>,
        symvers: Option<&Path>,
    ) -> Result<Target> {
        let source = src
            .canonicalize()
            .with_context(|| format!("kernel source {} not found", src.display()))?;
        if !source.join("Makefile").is_file() || !source.join("Kbuild").is_file() {
            bail!(
                "{} is not a kernel source tree (no Makefile/Kbuild)",
                source.display()
            );
        }
        if source.join(".config").exists() {
            bail!(
                "{} has been configured in place; the tool builds out of tree and needs a clean tree (run `make mrproper` there)",
                source.display()
            );
        }
        let config = config
            .canonicalize()
            .with_context(|| format!("kernel config {} not found", config.display()))?;
        let config_text = fs::read_to_string(&config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        let symvers = match symvers {
            Some(path) => Some(path.canonicalize().with_context(|| {
                format!("Module.symvers {} not found", path.display())
            })?),
            None if config_text.lines().any(|l| l == "CONFIG_MODVERSIONS=y") => bail!(
                "{} enables CONFIG_MODVERSIONS: pass --symvers with the Module.symvers of the kernel built from this tree (its build folder or headers package has it)",
                config.display()
            ),
            None => None,
        };
        let mut hasher = Sha256::new();
        hasher.update(source.to_string_lossy().as_bytes());
        hasher.update(fs::read(&config)?);
        let key = hex::encode(&hasher.finalize()[..8]);
        let release = match release {
            Some(r) => r.to_string(),
            None => kernel_version(&source)?,
        };
        // A Debian kernel's config: its compiler as for a Debian target, in
        // a root of the release --target names, else of the one whose
        // compiler the config names (a tree's own version names no Debian
        // release). Otherwise the config's compiler when the host has it,
        // else the host's gcc.
        let version_text =
            toolchain::config_string(&config_text, "CONFIG_CC_VERSION_TEXT").unwrap_or_default();
        let compiler = version_text.split_whitespace().next().unwrap_or("");
        let codename = if release.contains("+deb") {
            debian::codename_of(&release).ok()
        } else {
            debian::codename_of_compiler(compiler)
        };
        let toolchain = match codename {
            Some(codename) if version_text.contains("(Debian ") => {
                let mut toolchain =
                    toolchain::Toolchain::for_debian_kernel(&config_text, codename)?
                        .with_bind(&source);
                for file in [Some(&config), symvers.as_ref()].into_iter().flatten() {
                    if let Some(folder) = file.parent() {
                        toolchain = toolchain.with_bind(folder);
                    }
                }
                toolchain
            }
            _ => {
                toolchain::Toolchain::host(Some(compiler).filter(|cc| on_path(cc)).unwrap_or("gcc"))
            }
        };
        Ok(Target {
            toolchain,
            release,
            debian: None,
            work: cache::cache_root().join("trees").join(key),
            source,
            config,
            headers: None,
            symvers,
            build_id: None,
        })
    }
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` of a kernel tree, read from its Makefile.
pub fn kernel_version(source: &Path) -> Result<String> {
    let text = std::fs::read_to_string(source.join("Makefile"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim().strip_prefix('='))
            })
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Ok(format!(
        "{}.{}.{}{}",
        field("VERSION"),
        field("PATCHLEVEL"),
        field("SUBLEVEL"),
        field("EXTRAVERSION")
    ))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The modules of an unpacked `lib/modules/<release>` folder: module name
/// (as `modprobe` takes it, `-` read as `_`) → path relative to the folder,
/// from `modules.order`.
pub fn module_files(modules_dir: &Path) -> Result<std::collections::HashMap<String, String>> {
    let order = modules_dir.join("modules.order");
    let text = std::fs::read_to_string(&order)
        .with_context(|| format!("cannot read {}", order.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with(".ko"))
        .map(|l| (module_name(l), l.to_string()))
        .collect())
}

/// The module at `path` as modules.order names it, or its compressed file
/// (`.ko.xz`, `.ko.zst`: Debian 13) decompressed.
pub fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.is_file() {
        return fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    for extension in ["xz", "zst"] {
        let mut compressed = path.as_os_str().to_owned();
        compressed.push(format!(".{extension}"));
        let compressed = PathBuf::from(compressed);
        if compressed.is_file() {
            let data = fs::read(&compressed)
                .with_context(|| format!("cannot read {}", compressed.display()))?;
            return crate::identity::decompressed(data, &compressed);
        }
    }
    bail!("cannot read {}: no such module file", path.display())
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; `nls-utf8` → `nls_utf8`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.strip_suffix(".ko").unwrap_or(file).replace('-', "_")
}
