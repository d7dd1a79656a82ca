//! The options of `docker volume create -o KEY=VALUE`, validated into [`VolumeOptions`].
//!
//! `base` must name an existing directory by an absolute path; it is canonicalised (symlinks
//! resolved) so that two spellings of one directory are one volume configuration, and it may
//! not be, contain, or lie inside the daemon's state root (an overlay whose lower holds its own
//! upper is undefined, and a volume must never expose the daemon's state). With
//! `--allowed-base`, it must also lie inside one of the configured directories
//! ([`AllowedBases`]).
//!
//! A base is checked again each time it is used ([`OpenedBase`]): a directory inside an allowed
//! one can be renamed away and replaced by a symlink to anywhere after Create. So a Mount, and
//! an admin command that reads or writes the base, open it by its stored (canonical) path
//! without following any symlink, check the opened directory's real path, and then use that
//! very directory through its file descriptor. A base that was a symlink when the volume was
//! created was resolved then: the volume is bound to the directory it led to, and a symlink
//! found on that path later is refused, never followed.
//!
//! Bases are host paths. A process that sees the host's `/` under a prefix (a managed plugin,
//! `--host-root`) looks them up through [`HostRoot`], which adds the prefix on the way in and
//! strips it on the way out, so that nothing downstream ever sees it.
//!
//! This module reads metadata of the base directory only; it must not create or change
//! anything.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The option keys this driver understands, for error messages.
pub const VALID_OPTIONS: &str = "base, volatile, size, fs, sparse";

/// Why a set of options was refused.
#[derive(Debug, Error)]
pub enum OptionsError {
    #[error("option \"base\" is required: the absolute path of the host directory to expose")]
    MissingBase,
    #[error("unknown option {key:?}; valid options are: {VALID_OPTIONS}")]
    Unknown { key: String },
    #[error("base {path:?} is not an absolute path")]
    RelativeBase { path: String },
    #[error("base {path:?} cannot be used")]
    BaseUnusable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("base {path:?} is not a directory")]
    BaseNotDirectory { path: PathBuf },
    #[error("base {path:?} overlaps the state directory {root:?}")]
    BaseOverlapsRoot { path: PathBuf, root: PathBuf },
    #[error(
        "base {path:?} has a symbolic link on its path now; a base is never reached through one (if it was moved on purpose, create the volume again with the directory's real path)"
    )]
    BaseSymlinked { path: PathBuf },
    #[error("volatile must be true, false, yes or no, not {value:?}")]
    BadVolatile { value: String },
    #[error(
        "size {value:?} is not a size: give bytes, or a number with K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), e.g. 100Mi"
    )]
    BadSize { value: String },
    #[error(
        "size {size} bytes is below the smallest {fs} file system this plugin makes ({min} bytes, {min_text})"
    )]
    SizeTooSmall {
        size: u64,
        fs: &'static str,
        min: u64,
        min_text: &'static str,
    },
    #[error("fs must be ext4 or xfs, not {value:?}")]
    BadFs { value: String },
    #[error("sparse must be true, false, yes or no, not {value:?}")]
    BadSparse { value: String },
    #[error(
        "option {key:?} only goes with size (it says how a sized volume's file system is made)"
    )]
    NeedsSize { key: &'static str },
    #[error(
        "base {path:?} is outside the directories this plugin allows ({allowed}); ask the host's administrator"
    )]
    BaseNotAllowed {
        path: PathBuf,
        /// The allowed directories, comma-separated (boxed: keeps the error small).
        allowed: Box<str>,
    },
}

/// Why an allowed base directory was refused at startup (the caller says where it was given:
/// `--allowed-base` or `DOCKER_ON_TOP_ALLOWED_BASES`).
#[derive(Debug, Error)]
pub enum AllowedBaseError {
    #[error("allowed base {path:?} is not an absolute path")]
    Relative { path: PathBuf },
    #[error("allowed base {path:?} cannot be used")]
    Unusable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("allowed base {path:?} is not a directory")]
    NotDirectory { path: PathBuf },
}

/// The directories under which bases may lie (`--allowed-base`), canonical. Empty: anywhere.
///
/// A base is allowed when it is one of them or lies below one, compared component by
/// component after both are canonicalised: `/srv/data` allows `/srv/data/x` but not
/// `/srv/database`, and a symlink inside `/srv/data` that leads elsewhere leads outside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedBases(Vec<PathBuf>);

impl AllowedBases {
    /// No restriction.
    pub fn anywhere() -> Self {
        Self(Vec::new())
    }

    /// Canonicalises `dirs`, each of which must be an existing directory given by an absolute
    /// path (of the host's, seen through `host`). An empty list allows any base.
    pub fn new(dirs: &[PathBuf], host: &HostRoot) -> Result<Self, AllowedBaseError> {
        let mut out = Vec::with_capacity(dirs.len());
        for dir in dirs {
            if !dir.is_absolute() {
                return Err(AllowedBaseError::Relative { path: dir.clone() });
            }
            let canonical =
                host.canonicalize(dir)
                    .map_err(|source| AllowedBaseError::Unusable {
                        path: dir.clone(),
                        source,
                    })?;
            if !host.local(&canonical).is_dir() {
                return Err(AllowedBaseError::NotDirectory { path: dir.clone() });
            }
            if !out.contains(&canonical) {
                out.push(canonical);
            }
        }
        Ok(Self(out))
    }

    /// Whether any base is refused.
    pub fn restricts(&self) -> bool {
        !self.0.is_empty()
    }

    /// The canonical directories; empty when any base is allowed.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.0
    }

    /// Whether the canonical `base` is allowed.
    pub fn permits(&self, base: &Path) -> bool {
        self.0.is_empty() || self.0.iter().any(|dir| base.starts_with(dir))
    }

    fn check(&self, base: &BaseDir) -> Result<(), OptionsError> {
        if self.permits(base.path()) {
            Ok(())
        } else {
            Err(OptionsError::BaseNotAllowed {
                path: base.path().to_owned(),
                allowed: (self.0.iter())
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into(),
            })
        }
    }
}

/// Where this process sees the host's file system. Bases are host paths, as users give them;
/// the service sees them where they are ([`HostRoot::default`]), a managed plugin sees the
/// host's `/` bound under a prefix (`--host-root /host`). The prefix is added here and
/// removed here: paths stored, compared and shown are the host's. Paths are resolved inside
/// the prefix as if it were `/` (`RESOLVE_IN_ROOT`), so a host symlink `/data -> /srv/data`
/// leads to the host's `/srv/data`, and no `..` or symlink leads out of the host's tree.
#[derive(Debug, Clone, Default)]
pub struct HostRoot {
    /// The prefix (canonical) and an open handle of it; `None`: the host's `/` is ours.
    prefix: Option<(PathBuf, std::sync::Arc<std::os::fd::OwnedFd>)>,
}

impl HostRoot {
    /// The host's `/` is at `prefix`, an existing directory.
    pub fn at(prefix: &Path) -> io::Result<Self> {
        let canonical = std::fs::canonicalize(prefix)?;
        if canonical == Path::new("/") {
            return Ok(Self::default());
        }
        use rustix::fs::OFlags;
        let fd = rustix::fs::open(
            &canonical,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Self {
            prefix: Some((canonical, fd.into())),
        })
    }

    /// The prefix, if the host's `/` is not ours.
    pub fn prefix(&self) -> Option<&Path> {
        self.prefix.as_ref().map(|(p, _)| p.as_path())
    }

    /// Where this process finds the host path `host` (already resolved).
    pub fn local(&self, host: &Path) -> PathBuf {
        match self.prefix() {
            None => host.to_owned(),
            Some(prefix) => prefix.join(host.strip_prefix("/").unwrap_or(host)),
        }
    }

    /// Opens the directory at the host path `path` (`O_PATH`), resolving with `resolve`
    /// added.
    pub fn open_dir(
        &self,
        path: &Path,
        resolve: rustix::fs::ResolveFlags,
    ) -> rustix::io::Result<std::os::fd::OwnedFd> {
        use rustix::fs::{OFlags, ResolveFlags};
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mode = rustix::fs::Mode::empty();
        match &self.prefix {
            None if resolve.is_empty() => rustix::fs::open(path, flags, mode),
            None => rustix::fs::openat2(rustix::fs::CWD, path, flags, mode, resolve),
            Some((_, root)) => rustix::fs::openat2(
                root.as_ref(),
                path,
                flags,
                mode,
                resolve | ResolveFlags::IN_ROOT,
            ),
        }
    }

    /// The host path of the open `dir`, as the kernel names it now.
    pub fn host_path_of(&self, dir: &impl std::os::fd::AsRawFd) -> io::Result<PathBuf> {
        let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
        match self.prefix() {
            None => Ok(real),
            Some(prefix) => match real.strip_prefix(prefix) {
                Ok(rest) => Ok(Path::new("/").join(rest)),
                // Opened inside the prefix, so it is inside unless the host's tree moved.
                Err(_) => Err(io::Error::other(format!(
                    "{} is outside the host's file system at {}",
                    real.display(),
                    prefix.display()
                ))),
            },
        }
    }

    /// The metadata of the directory at the host path `path` (symlinks followed); an error
    /// for anything but a directory.
    pub fn dir_metadata(&self, path: &Path) -> io::Result<std::fs::Metadata> {
        // Where the host's `/` is ours, one stat (as before there was a host root), not an
        // open, a stat and a close: every first Mount asks.
        let meta = match self.prefix {
            None => std::fs::metadata(path)?,
            Some(_) => {
                let dir = self.open_dir(path, rustix::fs::ResolveFlags::empty())?;
                std::fs::File::from(dir).metadata()?
            }
        };
        if !meta.is_dir() {
            return Err(io::Error::from(rustix::io::Errno::NOTDIR));
        }
        Ok(meta)
    }

    /// The host path `path` with every symlink resolved, for a directory (the one kind of
    /// path this is asked about).
    pub fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        if self.prefix.is_none() {
            return std::fs::canonicalize(path);
        }
        let dir = self.open_dir(path, rustix::fs::ResolveFlags::empty())?;
        self.host_path_of(&dir)
    }
}

/// A base directory: canonical, absolute, an existing directory outside the state root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDir(PathBuf);

impl BaseDir {
    /// Validates `raw` against the (canonical) state root `root`; `raw` is a path of the host's,
    /// seen through `host`.
    pub fn parse(raw: &str, root: &Path, host: &HostRoot) -> Result<Self, OptionsError> {
        if !raw.starts_with('/') {
            return Err(OptionsError::RelativeBase {
                path: raw.to_owned(),
            });
        }
        let canonical = match host.canonicalize(Path::new(raw)) {
            Ok(path) => path,
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(OptionsError::BaseNotDirectory { path: raw.into() });
            }
            Err(source) => {
                return Err(OptionsError::BaseUnusable {
                    path: raw.to_owned(),
                    source,
                });
            }
        };
        if !host.local(&canonical).is_dir() {
            return Err(OptionsError::BaseNotDirectory { path: canonical });
        }
        if canonical.starts_with(root) || root.starts_with(&canonical) {
            return Err(OptionsError::BaseOverlapsRoot {
                path: canonical,
                root: root.to_owned(),
            });
        }
        Ok(Self(canonical))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// A volume's base directory, opened for one use and checked: while this lives, [`Self::fd_path`]
/// leads to exactly the directory that was checked, whatever is renamed meanwhile.
#[derive(Debug)]
pub struct OpenedBase {
    dir: std::os::fd::OwnedFd,
    real: PathBuf,
}

impl OpenedBase {
    /// Opens the base stored as `stored`. With `strict` (set whenever `allowed` restricts
    /// anything, and for the admin commands), no symlink on the path is followed; without it
    /// (no `--allowed-base`: the behaviour of earlier versions) the path is opened as it is.
    /// Either way the opened directory's real path must be one that `allowed` permits.
    pub fn open(
        stored: &Path,
        allowed: &AllowedBases,
        strict: bool,
        host: &HostRoot,
    ) -> Result<Self, OptionsError> {
        use rustix::fs::ResolveFlags;
        let unusable = |source: rustix::io::Errno| OptionsError::BaseUnusable {
            path: stored.display().to_string(),
            source: source.into(),
        };
        let resolve = if strict {
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
        } else {
            ResolveFlags::empty()
        };
        let dir = match host.open_dir(stored, resolve) {
            Ok(dir) => dir,
            Err(rustix::io::Errno::LOOP) if strict => {
                return Err(OptionsError::BaseSymlinked {
                    path: stored.to_owned(),
                });
            }
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(OptionsError::BaseNotDirectory {
                    path: stored.to_owned(),
                });
            }
            Err(e) => return Err(unusable(e)),
        };
        let real = host
            .host_path_of(&dir)
            .map_err(|source| OptionsError::BaseUnusable {
                path: stored.display().to_string(),
                source,
            })?;
        allowed.check(&BaseDir(real.clone()))?;
        Ok(Self { dir, real })
    }

    /// `/proc/self/fd/N`: a path that leads to this very directory, for the calls that take
    /// a path (the kernel resolves it to the open file, not by name).
    pub fn fd_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }

    /// Where the directory is, as the kernel names it now (a path of the host's).
    pub fn real_path(&self) -> &Path {
        &self.real
    }

    /// The open directory itself.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.dir.as_fd()
    }
}

/// The file system of a sized volume's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
    /// The program that makes it.
    pub fn mkfs(self) -> &'static str {
        match self {
            FsType::Ext4 => "mkfs.ext4",
            FsType::Xfs => "mkfs.xfs",
        }
    }
    /// The Debian package that has [`FsType::mkfs`].
    pub fn package(self) -> &'static str {
        match self {
            FsType::Ext4 => "e2fsprogs",
            FsType::Xfs => "xfsprogs",
        }
    }
    /// The smallest image made: ext4 needs room for its journal; mkfs.xfs refuses less than
    /// 300 MiB.
    pub fn min_size(self) -> (u64, &'static str) {
        match self {
            FsType::Ext4 => (8 << 20, "8Mi"),
            FsType::Xfs => (300 << 20, "300Mi"),
        }
    }
}

/// The cap on a volume's changes (`-o size=`): its upper and work directories live on a file
/// system of this size, in an image file of the volume's own. `metadata.json` keeps it as
/// `"Size": {"Bytes", "Fs", "Sparse"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeCap {
    #[serde(rename = "Bytes")]
    pub bytes: u64,
    #[serde(rename = "Fs")]
    pub fs: FsType,
    /// `false`: the image's space is reserved at Create (`fallocate`).
    #[serde(rename = "Sparse")]
    pub sparse: bool,
}

/// Reads a size as docker-volume-loopback does: bytes, or a number (with a fraction, say
/// `1.5G`) followed by K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024); a
/// trailing `B` is allowed (`100MiB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1000,
        "m" => 1000u64.pow(2),
        "g" => 1000u64.pow(3),
        "t" => 1000u64.pow(4),
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return None,
    };
    if number.is_empty() || number.starts_with('.') || number.matches('.').count() > 1 {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut bytes = whole.checked_mul(scale)?;
    if !fraction.is_empty() {
        if scale == 1 || fraction.len() > 9 {
            return None;
        }
        let digits: u64 = fraction.parse().ok()?;
        let part = (digits as u128 * scale as u128) / 10u128.pow(fraction.len() as u32);
        bytes = bytes.checked_add(part as u64)?;
    }
    (bytes > 0).then_some(bytes)
}

/// The validated options of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    pub base: BaseDir,
    pub volatile: bool,
    /// `None`: changes go to the state directory's file system, uncapped.
    pub size: Option<SizeCap>,
}

impl VolumeOptions {
    /// Validates the options of a Create request; `root` is the canonical state root, and the
    /// base (a host path, seen through `host`) must be one that `allowed` permits.
    pub fn parse(
        raw: &BTreeMap<String, String>,
        root: &Path,
        allowed: &AllowedBases,
        host: &HostRoot,
    ) -> Result<Self, OptionsError> {
        if let Some(key) = raw
            .keys()
            .find(|k| !matches!(k.as_str(), "base" | "volatile" | "size" | "fs" | "sparse"))
        {
            return Err(OptionsError::Unknown {
                key: key.chars().take(64).collect(),
            });
        }
        let volatile = match raw.get("volatile") {
            None => false,
            Some(v) => parse_bool(v).ok_or_else(|| OptionsError::BadVolatile {
                value: v.chars().take(64).collect(),
            })?,
        };
        let size = Self::parse_size_cap(raw)?;
        let base = raw.get("base").ok_or(OptionsError::MissingBase)?;
        let base = BaseDir::parse(base, root, host)?;
        allowed.check(&base)?;
        Ok(Self {
            base,
            volatile,
            size,
        })
    }

    fn parse_size_cap(raw: &BTreeMap<String, String>) -> Result<Option<SizeCap>, OptionsError> {
        let shown = |v: &str| v.chars().take(64).collect::<String>();
        let Some(text) = raw.get("size") else {
            for key in ["fs", "sparse"] {
                if raw.contains_key(key) {
                    return Err(OptionsError::NeedsSize { key });
                }
            }
            return Ok(None);
        };
        let bytes = parse_size(text).ok_or_else(|| OptionsError::BadSize { value: shown(text) })?;
        let fs = match raw.get("fs").map(|v| v.to_ascii_lowercase()) {
            None => FsType::Ext4,
            Some(v) if v == "ext4" => FsType::Ext4,
            Some(v) if v == "xfs" => FsType::Xfs,
            Some(v) => return Err(OptionsError::BadFs { value: shown(&v) }),
        };
        let sparse = match raw.get("sparse") {
            None => true,
            Some(v) => parse_bool(v).ok_or_else(|| OptionsError::BadSparse { value: shown(v) })?,
        };
        let (min, min_text) = fs.min_size();
        if bytes < min {
            return Err(OptionsError::SizeTooSmall {
                size: bytes,
                fs: fs.name(),
                min,
                min_text,
            });
        }
        Ok(Some(SizeCap { bytes, fs, sparse }))
    }
}

/// `true`/`false`/`yes`/`no` in any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" => Some(true),
        "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
