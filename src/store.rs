//! The on-disk state under the state root, and the primitives that keep it crash-safe.
//!
//! # Layout (compatible with docker-on-top v0.1.x)
//!
//! ```text
//! ROOT/
//!   .trash/               entries being deleted in the background (discarded uppers,
//!                         removed volumes); anything here is garbage
//!   .new-NAME-NONCE/      a volume being created; renamed to NAME when complete (NAME
//!                         cut to 100 bytes in it, as in trash entries and temporaries)
//!   NAME/                 one volume
//!     metadata.json       {"BaseDirPath": "/abs", "Volatile": false, "CreatedAt": "RFC 3339"}
//!     upper/              overlay upper layer: the volume's changes
//!     workdir/            overlay work directory; its `work/`, made by every mount, is
//!                         removed once nothing can hold a copy of the unmounted overlay
//!     mountpoint/         where the overlay is mounted (a managed plugin's is MOUNT-DIR/NAME
//!                         instead: `Root::with_mount_dir`)
//!     changes.img         sized volumes only (`-o size=`): the image of the file system that
//!                         holds their changes, attached through a loop device and mounted at
//!     changes/              ... this directory; then `changes/upper/` and `changes/work/`
//!                         take the place of `upper/` and `workdir/`
//!     activemounts/ID     {"UsageCount": n, "BootId": "...", "Client": {...}}: one file
//!                         per mount ID; empty or cut short: one use
//! ```
//!
//! # Invariants
//!
//! - A directory `NAME` exists only complete: it is built as `.new-*` and renamed into place,
//!   and leaves only by being renamed into `.trash`. Names starting with `.` are never valid
//!   volume names, so staging and trash entries can never be mistaken for volumes.
//! - `metadata.json` is written once, in the staging directory, and fsynced before the rename
//!   that makes the volume: it is what a volume is. The upper's root is replaced atomically
//!   (temporary + rename).
//! - Whether a volume is mounted is never stored: the kernel is asked. `activemounts/` holds
//!   reference counts per mount ID that are valid only while the overlay is mounted; records
//!   written in an earlier boot are void. Records are written without fsync: a reboot voids
//!   them anyway, and they survive a process crash as written. A new mount ID's record is
//!   created and written in place: a file that is empty or cut short reads as one use of
//!   unknown boot and client, which is what a crash while writing it leaves, and true. A
//!   known ID's record is replaced atomically (temporary + rename).
//! - Every change to a volume happens under an exclusive flock on its directory.
//! - What a crash leaves half-made is garbage, and found as such: a `.new-*` staging directory
//!   once nobody holds its lock and its creator (whose pid its name carries) is dead, or a
//!   minute has passed; a `.*.tmp-*` temporary in `activemounts/` together with the void
//!   records, at the next Mount of the unmounted overlay; a `.upper-new` at the next
//!   installation of a fresh upper (the only time one is made); a `changes.img.partial` at
//!   the next making of a sized volume's image (the image is made as that, then renamed).
//!
//! This module knows paths and file formats; it makes no decision about mounting.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::names::{MountId, VolumeName};

pub const TRASH_DIR: &str = ".trash";
pub const STAGING_PREFIX: &str = ".new-";

/// `metadata.json`. Field names are the Go version's; `CreatedAt` is new and optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(rename = "BaseDirPath")]
    pub base: PathBuf,
    #[serde(rename = "Volatile", default)]
    pub volatile: bool,
    #[serde(rename = "CreatedAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Sized volumes only: absent otherwise, so that an unsized volume's metadata is what the
    /// Go version writes and reads.
    #[serde(rename = "Size", default, skip_serializing_if = "Option::is_none")]
    pub size: Option<crate::options::SizeCap>,
}

/// `activemounts/ID`. `BootId` and `Client` are new: records from the Go version lack them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    #[serde(rename = "UsageCount")]
    pub usage_count: u64,
    #[serde(rename = "BootId", default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The process (dockerd, podman) that asked for the mount, as seen on the socket.
    #[serde(rename = "Client", default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Client>,
}

impl MountRecord {
    /// What an empty record file means: one use whose boot and client were not written (yet).
    pub const ONE_USE: MountRecord = MountRecord {
        usage_count: 1,
        boot_id: None,
        client: None,
    };

    /// A record file's contents; `None` when they are not a record. An empty file is
    /// [`MountRecord::ONE_USE`]: what a crash leaves of a new mount ID's record before its
    /// first byte is written.
    pub fn parse(bytes: &[u8]) -> Option<MountRecord> {
        if bytes.is_empty() {
            return Some(Self::ONE_USE);
        }
        serde_json::from_slice(bytes).ok()
    }
}

/// A process, identified across pid reuse by its start time (clock ticks after boot, field 22
/// of `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    #[serde(rename = "Pid")]
    pub pid: u32,
    #[serde(rename = "StartTime")]
    pub start_time: u64,
}

/// A name that nothing else in this process or any other process uses at the same moment:
/// `PID-NANOS-COUNTER`. The janitor reads the pid back ([`staging_creator`]).
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // getpid is a syscall each time; the pid does not change.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!(
        "{}-{}-{}",
        PID.get_or_init(std::process::id),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// At most the first 100 bytes of `name`, for the names of temporaries and trash entries,
/// which add a nonce to it: a volume name or mount ID may be 255 bytes, a file name no longer.
fn short(name: &str) -> &str {
    let mut end = name.len().min(100);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The pid of the process that made the staging directory `file_name`
/// (`.new-NAME-PID-NANOS-COUNTER`, see [`Root::staging_slot`]); `None` for any other name.
pub fn staging_creator(file_name: &str) -> Option<u32> {
    let mut fields = file_name.strip_prefix(STAGING_PREFIX)?.rsplitn(4, '-');
    let (_counter, _nanos, pid) = (fields.next()?, fields.next()?, fields.next()?);
    fields.next()?; // the volume name
    pid.parse().ok()
}

/// Writes `contents` to `path` atomically: a temporary beside it, then rename. Nothing is
/// fsynced: the atomicity is against a crash of the process (what mount records need).
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{}.tmp-{}", short(&file_name), nonce()));
    let result = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(contents)?;
        failpoint!("store.temp-written");
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` (relative to `dir`) for reading without updating its access time: with
/// `relatime`, the first read after a change dirties the inode, and the next unmount's sync
/// of the upper's file system then commits that too. Falls back to a plain open where
/// `O_NOATIME` is not allowed (not the owner, no CAP_FOWNER).
pub fn open_noatime<Fd: std::os::fd::AsFd>(
    dir: Fd,
    path: &Path,
    flags: rustix::fs::OFlags,
) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let flags = flags | OFlags::RDONLY | OFlags::CLOEXEC;
    match rustix::fs::openat(&dir, path, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(&dir, path, flags, Mode::empty()),
        result => result,
    }
    .map_err(Into::into)
}

/// A small file's contents, read without updating its access time.
fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    read_small_at(rustix::fs::CWD, path)
}

/// Reads until a read comes back short: a regular file gives less than asked only at its end.
/// (`read_to_end` would also stat the file and seek in it, on every request.)
fn read_small_at<Fd: std::os::fd::AsFd>(dir: Fd, path: &Path) -> io::Result<Vec<u8>> {
    let file = open_noatime(dir, path, rustix::fs::OFlags::empty())?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(&file, &mut buf) {
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if n < buf.len() {
                    return Ok(bytes);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The state root.
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
    /// Where overlays are mounted (`MOUNTS/NAME`) instead of `NAME/mountpoint/`: a managed
    /// plugin's propagated mount, the one place whose mounts dockerd sees.
    mount_dir: Option<PathBuf>,
    /// Whether the root's file system makes a new file's name durable with the file's own
    /// fsync (see `fsync_keeps_new_names`).
    fsync_keeps_new_names: bool,
}

/// `statfs(2)` magics of the file systems whose fsync of a newly created file also makes its
/// name in its directory durable: ext4 (with a journal the name is in the transaction the
/// fsync commits; without one ext4 syncs the new file's parent itself; the ext4 driver also
/// mounts ext2 and ext3), xfs (the log force takes the create, name included) and btrfs
/// (its log tree takes a new file's names).
const FSYNC_KEEPS_NEW_NAMES: [i64; 3] = [0xEF53, 0x5846_5342, 0x9123_683E];

impl Root {
    /// Opens the root, creating it (mode 0700) and its trash directory if missing.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let path = std::fs::canonicalize(path)?;
        let trash = path.join(TRASH_DIR);
        match std::fs::create_dir(&trash) {
            Ok(()) => std::fs::set_permissions(&trash, std::fs::Permissions::from_mode(0o700))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fs_type = rustix::fs::statfs(&path).map(|st| st.f_type);
        Ok(Self {
            fsync_keeps_new_names: fs_type.is_ok_and(|t| FSYNC_KEEPS_NEW_NAMES.contains(&t)),
            path,
            mount_dir: None,
        })
    }

    /// Whether an fsync of a file made in this root also makes its name durable, so that
    /// its directory needs no fsync of its own (POSIX asks for one; a disk cache flush each).
    pub fn fsync_keeps_new_names(&self) -> bool {
        self.fsync_keeps_new_names
    }

    /// Mounts overlays at `dir/NAME` (created if missing) instead of `NAME/mountpoint/`.
    pub fn with_mount_dir(self, dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        Ok(Self {
            mount_dir: Some(dir),
            ..self
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a mount point is one of those this root's volumes use: below the root (an
    /// image's file system, an overlay), or below the mount directory. The root itself may be
    /// a mount point of the host's.
    pub fn holds_mount_point(&self, path: &Path) -> bool {
        let below = |dir: &Path| path != dir && path.starts_with(dir);
        below(&self.path) || self.mount_dir.as_deref().is_some_and(below)
    }

    /// Where overlays are mounted, if not in the volumes' own directories.
    pub fn mount_dir(&self) -> Option<&Path> {
        self.mount_dir.as_deref()
    }

    pub fn trash(&self) -> PathBuf {
        self.path.join(TRASH_DIR)
    }

    /// The volume `name`'s directory.
    pub fn volume(&self, name: &VolumeName) -> VolumeDir {
        let mut vol = VolumeDir::at(self.path.join(name));
        vol.mountpoint = self.mount_dir.as_ref().map(|dir| dir.join(name));
        vol
    }

    /// A fresh path in the trash for something that used to be `what`.
    pub fn trash_slot(&self, what: &str) -> PathBuf {
        self.trash().join(format!("{}-{}", short(what), nonce()))
    }

    pub fn staging_slot(&self, name: &VolumeName) -> PathBuf {
        self.path.join(format!(
            "{STAGING_PREFIX}{}-{}",
            short(name.as_str()),
            nonce()
        ))
    }
}

/// Paths of one volume's directory.
#[derive(Debug, Clone)]
pub struct VolumeDir {
    pub path: PathBuf,
    /// Whether its changes live in an image of their own: known from `metadata.json` once it
    /// is read (Create writes its `Size` and `changes/` together), else looked at when first
    /// asked (a query such as Path never needs it).
    sized: std::cell::OnceCell<bool>,
    /// Where its overlay is mounted when not at `mountpoint/` (see [`Root::with_mount_dir`]).
    mountpoint: Option<PathBuf>,
}

/// The image file of a sized volume, in its directory.
pub const IMAGE: &str = "changes.img";
/// Where a sized volume's image is mounted.
pub const CHANGES: &str = "changes";

impl VolumeDir {
    /// The volume directory at `path`, sized if its metadata says so or, before that is read,
    /// if it has the directory its image is mounted on (made at Create and never removed: the
    /// image itself is missing for a moment when a volatile volume's is swapped for a fresh
    /// one).
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            sized: std::cell::OnceCell::new(),
            mountpoint: None,
        }
    }
    /// The directory at `path` (being built), of the kind given.
    pub fn new(path: PathBuf, sized: bool) -> Self {
        Self {
            path,
            sized: sized.into(),
            mountpoint: None,
        }
    }
    /// Whether its changes live in an image of their own ([`VolumeDir::image`]).
    pub fn sized(&self) -> bool {
        *self
            .sized
            .get_or_init(|| std::fs::symlink_metadata(self.changes()).is_ok())
    }
    /// A sized volume's image file.
    pub fn image(&self) -> PathBuf {
        self.path.join(IMAGE)
    }
    /// Where a sized volume's image is mounted.
    pub fn changes(&self) -> PathBuf {
        self.path.join(CHANGES)
    }
    /// The directory the layers live in: the volume's own, or its image's file system.
    fn layers(&self) -> PathBuf {
        if self.sized() {
            self.changes()
        } else {
            self.path.clone()
        }
    }
    pub fn metadata(&self) -> PathBuf {
        self.path.join("metadata.json")
    }
    pub fn upper(&self) -> PathBuf {
        self.layers().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        if self.sized() {
            self.changes().join("work")
        } else {
            self.path.join("workdir")
        }
    }
    /// `workdir/work`, which overlayfs creates at every mount. The driver removes it once an
    /// unmount left no copy of the overlay anywhere (see `driver.rs`): while it is there, a
    /// look for copies in other mount namespaces is due.
    pub fn overlay_work(&self) -> PathBuf {
        self.work().join("work")
    }
    pub fn mountpoint(&self) -> PathBuf {
        match &self.mountpoint {
            Some(path) => path.clone(),
            None => self.path.join("mountpoint"),
        }
    }
    pub fn active_mounts(&self) -> PathBuf {
        self.path.join("activemounts")
    }
    pub fn record(&self, id: &MountId) -> PathBuf {
        self.active_mounts().join(id)
    }

    pub fn read_metadata(&self) -> io::Result<Metadata> {
        let bytes = read_small(&self.metadata())?;
        let meta: Metadata = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let _ = self.sized.set(meta.size.is_some());
        Ok(meta)
    }

    /// All mount records. Files whose names are not valid mount IDs (temporaries of an
    /// interrupted write) are skipped; an unreadable record counts as one use, so that a
    /// damaged file can never make a volume unmount under a container.
    pub fn read_records(&self) -> io::Result<Vec<(MountId, MountRecord)>> {
        self.read_records_and_strays().map(|(records, _)| records)
    }

    /// [`VolumeDir::read_records`], and whether `activemounts/` holds anything else (the
    /// temporary of a write cut short), which only [`VolumeDir::clear_records`] deletes.
    pub fn read_records_and_strays(&self) -> io::Result<(Vec<(MountId, MountRecord)>, bool)> {
        let mut out = Vec::new();
        let mut strays = false;
        let dir = self.active_mounts();
        let fd = match open_noatime(rustix::fs::CWD, &dir, rustix::fs::OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((out, strays)),
            Err(e) => return Err(e),
        };
        let mut entries = rustix::fs::Dir::new(fd)?;
        while let Some(entry) = entries.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if matches!(name, b"." | b"..") {
                continue;
            }
            let Some(id) = std::str::from_utf8(name)
                .ok()
                .and_then(|s| MountId::parse(s).ok())
            else {
                strays = true;
                continue;
            };
            let record = read_small_at(entries.fd()?, Path::new(id.as_str()))
                .ok()
                .and_then(|b| MountRecord::parse(&b))
                .unwrap_or_else(|| {
                    log::warn!(
                        "mount record {:?} is unreadable; counting it as one use",
                        dir.join(&id)
                    );
                    MountRecord::ONE_USE
                });
            out.push((id, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((out, strays))
    }

    pub fn write_record(&self, id: &MountId, record: &MountRecord) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        match write_atomic(&self.record(id), &json) {
            // `activemounts/` is missing (a damaged volume): made only then, not looked for
            // at every write.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(self.active_mounts())?;
                write_atomic(&self.record(id), &json)
            }
            result => result,
        }
    }

    /// Records the first use of the new mount ID `id`: the file is created and written in
    /// place, since until the write is whole it reads as one use, which `record` is too.
    pub fn create_record(&self, id: &MountId, record: &MountRecord) -> io::Result<()> {
        debug_assert_eq!(record.usage_count, 1, "a new mount ID is used once");
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        let create = || {
            let mut file = File::options()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(self.record(id))?;
            failpoint!("store.record-created");
            file.write_all(&json).inspect_err(|_| {
                // A full state directory: the Mount is refused, and leaves no record.
                let _ = std::fs::remove_file(self.record(id));
            })
        };
        match create() {
            // `activemounts/` is missing (a damaged volume): made only then.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(self.active_mounts())?;
                create()
            }
            result => result,
        }
    }

    pub fn delete_record(&self, id: &MountId) -> io::Result<()> {
        match std::fs::remove_file(self.record(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every record (they were found void) and any temporaries left beside them.
    pub fn clear_records(&self) -> io::Result<()> {
        match std::fs::read_dir(self.active_mounts()) {
            Ok(entries) => {
                for entry in entries {
                    std::fs::remove_file(entry?.path())?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts a fresh, empty upper in place whose root has `base`'s owner, group and mode
    /// (overlayfs shows the upper root's, not the lower's). Built beside and renamed, so
    /// `upper/` never exists with the wrong owner. The old upper, if any, must be gone.
    pub fn install_fresh_upper(&self, base: &std::fs::Metadata) -> io::Result<()> {
        let staging = self.layers().join(".upper-new");
        match std::fs::remove_dir(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        make_upper_root(&staging, base)?;
        failpoint!("store.upper-staged");
        std::fs::rename(&staging, self.upper())
    }

    /// [`VolumeDir::install_fresh_upper`] in a volume being built: made in place, since
    /// nothing sees a staging directory before its rename.
    pub fn make_first_upper(&self, base: &std::fs::Metadata) -> io::Result<()> {
        make_upper_root(&self.upper(), base)
    }
}

/// A new, empty directory at `path` with `base`'s owner, group and mode.
fn make_upper_root(path: &Path, base: &std::fs::Metadata) -> io::Result<()> {
    std::fs::create_dir(path)?;
    std::os::unix::fs::chown(path, Some(base.uid()), Some(base.gid()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(base.mode() & 0o7777))
}

/// An exclusive flock on a volume's directory, released on drop. Serialises mount, unmount,
/// remove and every admin command on that volume, across threads and processes.
#[derive(Debug)]
pub struct VolumeLock {
    _dir: File,
}

/// Locks the volume directory at `dir`. `Ok(None)` when there is no such volume. Retries
/// when the directory was replaced while we waited (removed and created again).
pub fn lock_volume(dir: &Path) -> io::Result<Option<VolumeLock>> {
    loop {
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        file.lock()?;
        // While we waited, the holder may have moved the directory to the trash.
        let locked = file.metadata()?;
        match std::fs::symlink_metadata(dir) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                return Ok(Some(VolumeLock { _dir: file }));
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_reads_go_format() {
        let m: Metadata =
            serde_json::from_str(r#"{"BaseDirPath":"/data","Volatile":true}"#).unwrap();
        assert_eq!(m.base, PathBuf::from("/data"));
        assert!(m.volatile);
        assert_eq!(m.created_at, None);
        let r: MountRecord = serde_json::from_str(r#"{"UsageCount":2}"#).unwrap();
        assert_eq!(r.usage_count, 2);
        assert_eq!(
            serde_json::to_string(&MountRecord {
                usage_count: 1,
                boot_id: Some("b".into()),
                client: Some(Client {
                    pid: 7,
                    start_time: 9
                }),
            })
            .unwrap(),
            r#"{"UsageCount":1,"BootId":"b","Client":{"Pid":7,"StartTime":9}}"#
        );
    }

    #[test]
    fn a_volumes_kind_is_its_metadatas_once_read() {
        let sized = r#"{"BaseDirPath":"/b","Volatile":false,"Size":{"Bytes":1048576,"Fs":"ext4","Sparse":true}}"#;
        for (json, has_changes_dir, expected) in [
            (sized, false, true),
            (r#"{"BaseDirPath":"/b","Volatile":false}"#, true, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("metadata.json"), json).unwrap();
            if has_changes_dir {
                std::fs::create_dir(dir.path().join(CHANGES)).unwrap();
            }
            let vol = VolumeDir::at(dir.path().to_owned());
            vol.read_metadata().unwrap();
            // No look at `changes/` any more: its metadata decided.
            assert_eq!(vol.sized(), expected, "{json}");
            // Before it is read, `changes/` decides.
            assert_eq!(
                VolumeDir::at(dir.path().to_owned()).sized(),
                has_changes_dir
            );
        }
    }

    #[test]
    fn a_root_on_tmpfs_fsyncs_the_directory_of_a_new_file() {
        // tmpfs is in no list of file systems whose file fsync makes the name durable.
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        assert!(!Root::open(tmp.path()).unwrap().fsync_keeps_new_names());
    }

    #[test]
    fn staging_names_carry_their_creator() {
        let root = Root {
            path: PathBuf::from("/r"),
            mount_dir: None,
            fsync_keeps_new_names: false,
        };
        let slot = root.staging_slot(&VolumeName::parse("a-b.c").unwrap());
        let name = slot.file_name().unwrap().to_str().unwrap();
        assert_eq!(staging_creator(name), Some(std::process::id()));
        assert_eq!(staging_creator(".new-7-1-2"), None);
        assert_eq!(staging_creator(".new-v-x-1-2"), None);
        assert_eq!(staging_creator("v-7-1-2"), None);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn records_skip_temporaries_and_count_damaged_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = VolumeDir::at(tmp.path().to_owned());
        let id = MountId::parse("abc").unwrap();
        vol.write_record(
            &id,
            &MountRecord {
                usage_count: 3,
                boot_id: None,
                client: None,
            },
        )
        .unwrap();
        std::fs::write(vol.active_mounts().join(".abc.tmp-1"), "x").unwrap();
        std::fs::write(vol.active_mounts().join("bad"), "{not json").unwrap();
        let recs = vol.read_records().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].1.usage_count, 3);
        assert_eq!(recs[1].0.as_str(), "bad");
        assert_eq!(recs[1].1.usage_count, 1);
        vol.clear_records().unwrap();
        assert!(vol.read_records().unwrap().is_empty());
    }

    #[test]
    fn lock_sees_a_directory_replaced_while_waiting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        std::fs::create_dir(&dir).unwrap();
        let held = lock_volume(&dir).unwrap().unwrap();
        let dir2 = dir.clone();
        let waiter = std::thread::spawn(move || lock_volume(&dir2).unwrap().is_some());
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::rename(&dir, tmp.path().join("gone")).unwrap();
        drop(held);
        assert!(!waiter.join().unwrap(), "lock taken on a moved directory");
        assert!(lock_volume(&dir).unwrap().is_none());
    }
}
