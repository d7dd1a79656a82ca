//! The admin commands: `ls`, `inspect`, `changes`, `recover`, `export`, `reset`, `commit`.
//!
//! They run in their own process beside the daemon. Each takes the lock of the volume it works
//! on ([`Driver::lock_volume`]), the same lock as Mount, Unmount and Remove, so the daemon
//! waits for it (and it for the daemon). Reading (`changes`, `recover`, `export`) is allowed
//! while a volume is mounted, and sees the changes as they are at that moment; `reset` and
//! `commit` need the volume unmounted ([`Driver::lock_unmounted`]) and the driver does the
//! reset, keeping its invariants. Nothing here needs the daemon to run, or to have ever run:
//! volumes of the Go version, and a volatile volume between its last unmount and its next
//! mount, are read as they are on disk.
//!
//! How the upper directory is read against the base is in [`tree`]; `recover`, `export` and
//! `commit` each follow its plan ([`recover`], [`export`], [`commit`]).

pub mod commit;
mod dir;
pub mod export;
mod fsops;
pub mod recover;
pub mod tree;
pub mod xattr;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::driver::{Driver, DriverConfig, DriverError, LockedVolume};
use crate::names::VolumeName;
use crate::sys::{RealSys, Sys};
use dir::{Dir, Place};

pub use commit::Applied;
pub use export::Exported;
pub use recover::Recovered;
pub use tree::{Change, ChangeKind, Plan, Usage};

/// An I/O failure on one path, with what was being done. A very long path (a container may
/// nest directories past PATH_MAX) is shown with its middle left out, so that the message stays
/// a line one can read.
#[derive(Debug, Error)]
#[error("{action} {}", shortened(path))]
pub struct PathError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl PathError {
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `path` quoted as `{:?}` shows it, with all but its first and last [`SHOWN`] bytes replaced
/// by `…` when it is longer.
fn shortened(path: &Path) -> String {
    let quoted = format!("{path:?}");
    if quoted.len() <= 2 * SHOWN + 3 {
        return quoted;
    }
    let mut head = SHOWN;
    while !quoted.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = quoted.len() - SHOWN;
    while !quoted.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}…{}", &quoted[..head], &quoted[tail..])
}

/// How much of each end of a long path a message shows.
const SHOWN: usize = 100;

/// Why an admin command failed. Each message names the volume and, where it is not obvious,
/// what to do; the cause follows as `source`.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("the state directory {root:?} does not exist; pass --root for the right one")]
    NoRoot { root: PathBuf },
    #[error("cannot read the changes of volume {name}")]
    Read {
        name: VolumeName,
        #[source]
        source: PathError,
    },
    #[error(
        "cannot recover volume {name} into {dest:?}: it is not an empty directory; name a new or empty one"
    )]
    DestNotEmpty { name: VolumeName, dest: PathBuf },
    #[error(
        "cannot recover volume {name} into {dest:?}: it lies inside {inside:?}; choose a directory outside the state directory and the base"
    )]
    DestInside {
        name: VolumeName,
        dest: PathBuf,
        inside: PathBuf,
    },
    #[error("cannot recover volume {name} into {dest:?}")]
    Recover {
        name: VolumeName,
        dest: PathBuf,
        #[source]
        source: PathError,
    },
    #[error("cannot export volume {name}")]
    Export {
        name: VolumeName,
        #[source]
        source: PathError,
    },
    #[error("cannot write the export of volume {name}")]
    ExportWrite {
        name: VolumeName,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot commit volume {name}: volume {other} has the same or an overlapping base and the base must not change under it"
    )]
    BaseShared {
        name: VolumeName,
        other: VolumeName,
        #[source]
        source: Box<DriverError>,
    },
    #[error(
        "commit of volume {name} stopped; its base is partly updated and the volume keeps all its changes: fix the cause and run the commit again"
    )]
    Commit {
        name: VolumeName,
        #[source]
        source: PathError,
    },
}

/// `ls` and `inspect`: one volume.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeReport {
    pub name: String,
    #[serde(serialize_with = "lossy_path_opt")]
    pub base: Option<PathBuf>,
    pub volatile: Option<bool>,
    /// Whether the overlay is mounted (in this mount namespace).
    pub mounted: bool,
    #[serde(serialize_with = "lossy_path_opt")]
    pub mountpoint: Option<PathBuf>,
    /// Uses on record while mounted: the sum of the counts in `MountIDs`.
    pub active_mounts: u64,
    /// Mount IDs on record while mounted, with their use counts.
    #[serde(rename = "MountIDs")]
    pub mount_ids: BTreeMap<String, u64>,
    /// What the upper directory holds; `None` when it cannot be read (see `Error`).
    pub changes_size: Option<Usage>,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(serialize_with = "lossy_path")]
    pub upper_dir: PathBuf,
    /// Sized volumes (`-o size=`): the cap, the file system and the bytes it has in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<crate::driver::SizeStatus>,
    /// Whatever could not be read, when something could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `changes`: the list, and anything the user should know about how it was made.
#[derive(Debug, Clone)]
pub struct Changes {
    pub base: PathBuf,
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
}

/// What `reset` did.
#[derive(Debug, Clone)]
pub struct ResetDone {
    /// Where the discarded upper went; already deleted unless a warning says otherwise.
    pub trashed: Option<PathBuf>,
    pub warnings: Vec<String>,
}

/// What `commit` did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub base: PathBuf,
    pub changes: Vec<Change>,
    pub applied: Applied,
    pub warnings: Vec<String>,
}

/// The admin commands over one state root.
pub struct Admin<S: Sys = RealSys> {
    driver: Driver<S>,
}

impl Admin<RealSys> {
    /// Opens an existing state root (an admin command never creates one).
    pub fn open(root: &Path) -> Result<Self, AdminError> {
        if !root.is_dir() {
            return Err(AdminError::NoRoot {
                root: root.to_owned(),
            });
        }
        let mount_dir = std::fs::canonicalize(root)
            .ok()
            .and_then(|root| plugin_mount_dir(&root));
        Ok(Self::new(Driver::open(DriverConfig {
            root: root.to_owned(),
            legacy_mount_api: false,
            allowed_bases: Default::default(),
            host_root: Default::default(),
            mount_dir,
        })?))
    }
}

/// Where a managed plugin mounts the volumes of `root`, as this mount namespace sees it: the
/// directory of a mount of some volume's overlay at `DIR/NAME` rather than at its
/// `NAME/mountpoint/` (dockerd's `plugins/ID/propagated-mount/`). `None` while the plugin has
/// none mounted, which is all the admin commands need to know then.
fn plugin_mount_dir(root: &Path) -> Option<PathBuf> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    plugin_mount_dir_in(&info, root)
}

/// [`plugin_mount_dir`] as the mountinfo text `info` tells it.
fn plugin_mount_dir_in(info: &[u8], root: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    crate::sys::mountinfo::parse(info)
        .into_iter()
        .find_map(|m| {
            let upper = Path::new(std::ffi::OsStr::from_bytes(m.upper.as_deref()?));
            let name = upper.strip_prefix(root).ok()?.components().next()?;
            let elsewhere = m.mount_point.file_name()? == name.as_os_str()
                && m.mount_point != root.join(name).join("mountpoint");
            elsewhere.then(|| m.mount_point.parent().map(Path::to_owned))?
        })
}

impl<S: Sys> Admin<S> {
    pub fn new(driver: Driver<S>) -> Self {
        Self { driver }
    }

    pub fn driver(&self) -> &Driver<S> {
        &self.driver
    }

    /// `ls`: every volume, sorted by name.
    pub fn list(&self) -> Result<Vec<VolumeReport>, AdminError> {
        let mut out = Vec::new();
        for name in self.driver.list()? {
            match self.inspect(&name) {
                Ok(report) => out.push(report),
                // Removed since it was listed.
                Err(AdminError::Driver(DriverError::NoSuchVolume(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `inspect NAME`.
    pub fn inspect(&self, name: &VolumeName) -> Result<VolumeReport, AdminError> {
        let vol = self.driver.lock_volume(name)?;
        let info = self.driver.get(name)?;
        let mut errors: Vec<String> = info.error.into_iter().collect();
        let mount_ids = match self.driver.live_mounts(&vol) {
            Ok(ids) => ids.into_iter().map(|(id, n)| (id.to_string(), n)).collect(),
            Err(e) => {
                errors.push(crate::error_chain(&e));
                BTreeMap::new()
            }
        };
        let changes_size = match tree::usage(&vol.dir().upper()) {
            Ok(u) => Some(u),
            Err(e) => {
                errors.push(format!(
                    "cannot measure the changes: {}",
                    crate::error_chain(&e)
                ));
                None
            }
        };
        Ok(VolumeReport {
            name: name.to_string(),
            base: info.base,
            volatile: info.volatile,
            mounted: info.mounted,
            mountpoint: info.mountpoint,
            active_mounts: info.active_mounts,
            mount_ids,
            changes_size,
            created_at: humantime::format_rfc3339_seconds(info.created_at).to_string(),
            upper_dir: info.upper,
            size: info.size,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        })
    }

    /// Reads the plan of a locked volume. The base is taken as it is now, symlinks resolved;
    /// a missing base makes everything count as added, with a warning.
    fn plan(&self, vol: &LockedVolume) -> Result<(Plan, PathBuf, Vec<String>), AdminError> {
        let meta = vol.metadata()?;
        let mut warnings = Vec::new();
        let base = match std::fs::canonicalize(&meta.base) {
            Ok(b) if b.is_dir() => Some(b),
            _ => {
                warnings.push(format!(
                    "the base directory {:?} of volume {} is missing or not a directory: \
                     everything in the volume counts as added and deletions are not shown",
                    meta.base,
                    vol.name()
                ));
                None
            }
        };
        let plan =
            Plan::read(&vol.dir().upper(), base.as_deref()).map_err(|source| AdminError::Read {
                name: vol.name().clone(),
                source,
            })?;
        Ok((plan, meta.base, warnings))
    }

    /// `changes NAME`.
    pub fn changes(&self, name: &VolumeName) -> Result<Changes, AdminError> {
        let vol = self.driver.lock_volume(name)?;
        let (plan, base, warnings) = self.plan(&vol)?;
        Ok(Changes {
            base,
            changes: plan.changes(),
            warnings,
        })
    }

    /// `recover NAME DEST`: DEST must be missing (it is created; its parent must exist) or an
    /// empty directory, outside the state directory and the base.
    pub fn recover(&self, name: &VolumeName, dest: &Path) -> Result<Recovered, AdminError> {
        let vol = self.driver.lock_volume(name)?;
        let (plan, _, warnings) = self.plan(&vol)?;
        let recover_err = |source| AdminError::Recover {
            name: name.clone(),
            dest: dest.to_owned(),
            source,
        };
        // Where DEST really is, before anything is created there.
        let exists = std::fs::symlink_metadata(dest).is_ok();
        let resolved = if exists {
            std::fs::canonicalize(dest)
        } else {
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            std::fs::canonicalize(parent).map(|p| p.join(dest.file_name().unwrap_or_default()))
        }
        .map_err(|e| recover_err(PathError::new("looking at", dest, e)))?;
        for inside in [Some(self.driver.root().path()), plan.base.as_deref()]
            .into_iter()
            .flatten()
        {
            if resolved.starts_with(inside) {
                return Err(AdminError::DestInside {
                    name: name.clone(),
                    dest: dest.to_owned(),
                    inside: inside.to_owned(),
                });
            }
        }
        if exists {
            let empty = std::fs::read_dir(&resolved)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(AdminError::DestNotEmpty {
                    name: name.clone(),
                    dest: dest.to_owned(),
                });
            }
        } else {
            std::fs::create_dir(&resolved)
                .map_err(|e| recover_err(PathError::new("creating", dest, e)))?;
            // A directory made here looks like the volume's root.
            if let Ok(Some(meta)) = dir::Stat::of_path(&plan.upper) {
                let open = |path: &Path| {
                    Dir::open(path).map_err(|e| recover_err(PathError::new("opening", path, e)))
                };
                let (upper, made) = (open(&plan.upper)?, open(&resolved)?);
                let (src, at) = (
                    Place::itself(&upper, &plan.upper),
                    Place::itself(&made, &resolved),
                );
                fsops::set_attributes(src, &meta, at, true).map_err(recover_err)?;
            }
        }
        let mut done = recover::recover(&plan, &resolved).map_err(recover_err)?;
        done.warnings = warnings;
        Ok(done)
    }

    /// `export NAME`: the tar stream goes to `out`.
    pub fn export<W: Write>(&self, name: &VolumeName, out: W) -> Result<Exported, AdminError> {
        let vol = self.driver.lock_volume(name)?;
        let (plan, _, warnings) = self.plan(&vol)?;
        let mut done = export::export(&plan, out).map_err(|e| match e {
            export::ExportError::Read(source) => AdminError::Export {
                name: name.clone(),
                source,
            },
            export::ExportError::Write(source) => AdminError::ExportWrite {
                name: name.clone(),
                source,
            },
        })?;
        done.warnings = warnings;
        Ok(done)
    }

    /// `reset NAME`: refused while the volume is mounted. The old upper is renamed into the
    /// trash under the lock (constant time), then deleted here with the lock released.
    pub fn reset(&self, name: &VolumeName) -> Result<ResetDone, AdminError> {
        let trashed = self.driver.reset(name)?;
        failpoint!("reset.before-delete");
        Ok(ResetDone {
            warnings: self.empty_trash_item(trashed.as_deref()),
            trashed,
        })
    }

    /// `commit NAME --yes`: writes the changes into the base, then resets the volume. Refused
    /// while this volume, or any other volume whose base is, contains or lies inside this
    /// one's, is mounted: overlayfs must not see its base change.
    pub fn commit(&self, name: &VolumeName) -> Result<Committed, AdminError> {
        let base = {
            let vol = self.driver.lock_volume(name)?;
            let meta = vol.metadata()?;
            self.driver
                .open_base(name, &meta, true)?
                .real_path()
                .to_owned()
        };
        // Every volume on an overlapping base, locked in name order (as every commit does;
        // the daemon holds one lock at a time), so that none can be mounted meanwhile.
        let mut names = vec![name.clone()];
        for other in self.driver.list()? {
            if other == *name {
                continue;
            }
            let Ok(meta) = self.driver.root().volume(&other).read_metadata() else {
                continue;
            };
            let Ok(b) = std::fs::canonicalize(&meta.base) else {
                continue;
            };
            if b.starts_with(&base) || base.starts_with(&b) {
                names.push(other);
            }
        }
        names.sort();
        let mut locks = Vec::new();
        for n in &names {
            match self.driver.lock_unmounted(n) {
                Ok(l) => locks.push(l),
                Err(DriverError::NoSuchVolume(_)) if n != name => {}
                Err(source) if n != name => {
                    return Err(AdminError::BaseShared {
                        name: name.clone(),
                        other: n.clone(),
                        source: Box::new(source),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let vol = locks
            .iter()
            .find(|l| l.name() == name)
            .expect("the volume's own lock is taken or the commit refused");
        // Opened again now that nothing can mount it: written through this very directory,
        // never through a symlink swapped in since (see `OpenedBase`).
        let opened = self.driver.open_base(name, &vol.metadata()?, true)?;
        if opened.real_path() != base {
            return Err(DriverError::BaseRefused {
                name: name.clone(),
                source: crate::options::OptionsError::BaseSymlinked { path: base },
            }
            .into());
        }
        let dir = opened.fd_path();
        let plan =
            Plan::read(&vol.dir().upper(), Some(&dir)).map_err(|source| AdminError::Read {
                name: name.clone(),
                source,
            })?;
        let commit_err = |source| AdminError::Commit {
            name: name.clone(),
            source,
        };
        let applied = commit::apply(&plan, &dir).map_err(commit_err)?;
        // Durable before the changes are thrown away.
        std::fs::File::open(&dir)
            .and_then(|f| rustix::fs::syncfs(&f).map_err(io::Error::from))
            .map_err(|e| commit_err(PathError::new("syncing", &base, e)))?;
        failpoint!("commit.synced");
        let trashed = self.driver.reset_locked(vol)?;
        drop(locks);
        Ok(Committed {
            base,
            changes: plan.changes(),
            applied,
            warnings: self.empty_trash_item(trashed.as_deref()),
        })
    }

    /// Deletes one discarded upper from the trash; a failure is a warning (the daemon's
    /// janitor deletes whatever is left in the trash when it next starts).
    fn empty_trash_item(&self, item: Option<&Path>) -> Vec<String> {
        let Some(item) = item else { return Vec::new() };
        match crate::janitor::delete(item) {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!(
                "the discarded changes in {item:?} could not be deleted ({e}); the daemon \
                 deletes them when it next starts"
            )],
        }
    }
}

// ----- Output -------------------------------------------------------------------------------

/// `changes` as text: `A /path`, `C /path`, `D /path`, one per line, paths as they are.
pub fn write_changes(out: &mut dyn Write, changes: &[Change]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for c in changes {
        write!(out, "{} ", c.kind.letter())?;
        out.write_all(c.path.as_os_str().as_bytes())?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Any value as indented JSON and a newline, whole or not at all.
pub fn write_json<T: Serialize + ?Sized>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    out.write_all(&text)
}

/// A path in JSON, which holds only UTF-8: bytes that are not (a container names its files as
/// it likes) become U+FFFD.
pub(crate) fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

fn lossy_path_opt<S: serde::Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => lossy_path(path, s),
        None => s.serialize_none(),
    }
}

/// `ls` as a table.
pub fn write_table(out: &mut dyn Write, volumes: &[VolumeReport]) -> io::Result<()> {
    let rows: Vec<[String; 6]> = volumes
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                match v.volatile {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "?".into(),
                },
                if v.mounted { "yes" } else { "no" }.into(),
                v.active_mounts.to_string(),
                {
                    let changes = v.changes_size.map_or("?".into(), |u| {
                        format!("{} files, {}", u.files, human_bytes(u.bytes))
                    });
                    // A sized volume: its cap, file system, and what that holds in all.
                    match &v.size {
                        Some(cap) => format!(
                            "{changes} (cap {} {}{})",
                            human_bytes(cap.cap),
                            cap.fs.name(),
                            cap.used
                                .map(|u| format!(", {} used", human_bytes(u)))
                                .unwrap_or_default()
                        ),
                        None => changes,
                    }
                },
                match (&v.base, &v.error) {
                    (Some(b), None) => b.display().to_string(),
                    (Some(b), Some(e)) => format!("{} (error: {e})", b.display()),
                    (None, e) => format!("? (error: {})", e.as_deref().unwrap_or("unknown")),
                },
            ]
        })
        .collect();
    let head = ["NAME", "VOLATILE", "MOUNTED", "MOUNTS", "CHANGES", "BASE"];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 6]| -> io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, head)?;
    for row in &rows {
        line(out, row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_shown_without_their_middle() {
        let err = |path: &str| {
            PathError::new("reading", Path::new(path), io::ErrorKind::NotFound.into()).to_string()
        };
        assert_eq!(err("/short/é"), "reading \"/short/é\"");
        let long = format!("/top/{}/end", "é".repeat(3000));
        let text = err(&long);
        assert!(text.len() < 2 * SHOWN + 20, "{text}");
        assert!(text.starts_with("reading \"/top/éé"), "{text}");
        assert!(text.ends_with("éé/end\""), "{text}");
        assert_eq!(text.matches('…').count(), 1, "{text}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn changes_print_like_docker_diff() {
        let changes = vec![
            Change {
                kind: ChangeKind::Changed,
                path: "/etc".into(),
            },
            Change {
                kind: ChangeKind::Added,
                path: "/etc/new file".into(),
            },
            Change {
                kind: ChangeKind::Deleted,
                path: "/old".into(),
            },
        ];
        let mut out = Vec::new();
        write_changes(&mut out, &changes).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "C /etc\nA /etc/new file\nD /old\n"
        );
        let mut out = Vec::new();
        write_json(&mut out, &changes[..1]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!([{"Kind": "C", "Path": "/etc"}]));
    }

    #[test]
    fn the_plugin_mount_dir_is_where_a_volume_is_mounted_by_its_name() {
        let line = |point: &str, upper: &str| {
            format!(
                "99 22 0:77 / {point} rw,relatime shared:41 - overlay docker-on-top:v \
                 rw,lowerdir=/proc/self/fd/9,upperdir={upper},workdir=/w\n"
            )
        };
        let root = Path::new("/var/lib/docker-on-top");
        let found = |lines: &[String]| plugin_mount_dir_in(lines.concat().as_bytes(), root);
        let plugin = line(
            "/var/lib/docker/plugins/abc/propagated-mount/v",
            "/var/lib/docker-on-top/v/upper",
        );
        assert_eq!(
            found(std::slice::from_ref(&plugin)),
            Some(PathBuf::from(
                "/var/lib/docker/plugins/abc/propagated-mount"
            ))
        );
        // A sized volume's upper is deeper in its directory.
        assert_eq!(
            found(&[line("/m/s", "/var/lib/docker-on-top/s/changes/upper")]),
            Some(PathBuf::from("/m"))
        );
        // Found past the mounts that say nothing of it.
        let service = line(
            "/var/lib/docker-on-top/w/mountpoint",
            "/var/lib/docker-on-top/w/upper",
        );
        assert_eq!(
            found(&[service.clone(), plugin]),
            Some(PathBuf::from(
                "/var/lib/docker/plugins/abc/propagated-mount"
            ))
        );
        for nothing in [
            // The service's own place.
            service,
            // Not named after the volume whose upper it has: a bind someone made.
            line("/srv/x", "/var/lib/docker-on-top/v/upper"),
            // Another root's volume, one whose name shares a prefix with ours.
            line("/m/v", "/var/lib/other/v/upper"),
            line("/m/v", "/var/lib/docker-on-top-2/v/upper"),
        ] {
            assert_eq!(found(std::slice::from_ref(&nothing)), None, "{nothing}");
        }
        assert_eq!(found(&[]), None);
    }
}
