//! The OS boundary: mounting and unmounting overlays and asking the kernel what is mounted.
//!
//! Everything here is a thin wrapper over a syscall or a `/proc` read, behind the [`Sys`] trait
//! so that the driver's state machine can be unit-tested with [`RecordingSys`]. This module
//! makes no decisions: whether to mount, and what a failure means for the volume, is the
//! driver's business. It keeps no state. Reading mount tables, and the rule for which copies of
//! an overlay go with our unmount, are in `mountinfo.rs`; loop devices and images in
//! `image.rs`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};
use thiserror::Error;

use crate::options::FsType;

mod image;
pub mod mountinfo;
pub use mountinfo::mountinfo_has_overlay_upper;

/// `statfs(2)` magic of overlayfs.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
/// The major number of loop devices (`/dev/loopN`), which hold sized volumes' images.
const LOOP_MAJOR: u32 = 7;

/// The overlay options every mount sets, whatever the distribution's defaults: with these off,
/// changing the base while the volume is unmounted is safe (see facts.md).
const FIXED_OPTIONS: [(&str, &str); 3] = [
    ("index", "off"),
    ("metacopy", "off"),
    ("redirect_dir", "off"),
];

/// Describes one overlay mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    /// Shown as the mount's source in `/proc/*/mountinfo`.
    pub source: String,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
}

/// What an unmount left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmounted {
    /// The kernel reported the overlay's superblock shut down (inotify's `IN_UNMOUNT` on its
    /// root): no copy of the overlay is left in any mount namespace, nor held by any open
    /// file. `false` when a copy lives on, or when the kernel could not be asked.
    pub no_copy_left: bool,
}

thread_local! {
    /// The inotify instance with which this thread's unmounts learn whether the overlay's
    /// superblock died. Kept for the thread's life, because closing an instance that had a
    /// watch waits for the kernel's fsnotify reaper (an SRCU grace period): with a new one
    /// per unmount, concurrent last Unmounts spent most of their time in that close. Made at
    /// the thread's first unmount, and at the next one again if it could not be (descriptors
    /// or the user's inotify instances ran out): until then unmounts cannot tell that no copy
    /// is left, and each next Mount looks for copies the slow way.
    static UNMOUNT_WATCH: std::cell::RefCell<Option<rustix::fd::OwnedFd>> =
        const { std::cell::RefCell::new(None) };
}

/// A process that still holds an overlay in another mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

#[derive(Debug, Error)]
pub enum SysError {
    #[error("overlay mount failed: {reason}")]
    Mount {
        /// The kernel's own explanation where it gave one (read from the fs context).
        reason: String,
        #[source]
        source: io::Error,
    },
    #[error("mountpoint is busy")]
    Busy,
    #[error("unmount failed")]
    Unmount(#[source] io::Error),
    #[error("cannot inspect {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A sized volume's image could not be made, attached or mounted.
    #[error("{reason}")]
    Image {
        reason: String,
        #[source]
        source: io::Error,
    },
}

impl SysError {
    /// The mount failed because a directory it needs is missing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SysError::Mount { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// One mount of a file system ([`Sys::mounts_of_fs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMount {
    pub mount_point: PathBuf,
    /// An overlay's `upperdir=`, as its mounter gave it.
    pub upper: Option<PathBuf>,
}

/// The mount operations the driver needs.
pub trait Sys: Send + Sync + 'static {
    /// Mounts an overlay as described. The caller guarantees nothing is mounted on the target.
    fn mount_overlay(&self, spec: &OverlaySpec) -> Result<(), SysError>;
    /// Unmounts `target` (not lazily): [`SysError::Busy`] when something still uses it.
    fn unmount(&self, target: &Path) -> Result<Unmounted, SysError>;
    /// Whether an overlay is mounted exactly at `target` in this mount namespace.
    fn is_overlay_mounted(&self, target: &Path) -> Result<bool, SysError>;
    /// Processes in *other* mount namespaces that still have an overlay with this upper
    /// directory mounted (a container of another engine, a bind made by a process).
    fn overlay_holders(&self, upper: &Path) -> Result<Vec<Holder>, SysError>;
    /// [`Sys::overlay_holders`] of several uppers (in that order), for the price of one look.
    fn overlay_holders_of(&self, uppers: &[PathBuf]) -> Result<Vec<Vec<Holder>>, SysError> {
        uppers.iter().map(|u| self.overlay_holders(u)).collect()
    }
    /// When process `pid` started (clock ticks after boot), `None` if there is no such
    /// process. A pid with the same start time is the same process.
    fn process_start_time(&self, pid: u32) -> Option<u64>;
    /// This boot's id (`/proc/sys/kernel/random/boot_id`): mount records of another boot
    /// are void.
    fn boot_id(&self) -> io::Result<String>;
    /// Makes a sized volume's image at `image` (which must not exist): `size` bytes holding an
    /// empty `fs`, sparse or with its space reserved. Complete, or nothing is left.
    fn format_image(
        &self,
        image: &Path,
        size: u64,
        sparse: bool,
        fs: FsType,
    ) -> Result<(), SysError>;
    /// Attaches `image` to a loop device and mounts its `fs` at `target`; unmounting
    /// `target` ([`Sys::unmount`]) detaches the device again.
    fn attach_image(&self, image: &Path, fs: FsType, target: &Path) -> Result<(), SysError>;
    /// Whether some file system is mounted exactly at `target` in this mount namespace.
    fn is_mount_root(&self, target: &Path) -> Result<bool, SysError>;
    /// Size and bytes used of the file system at `target` (one statfs).
    fn fs_usage(&self, target: &Path) -> io::Result<(u64, u64)>;
    /// Where this mount namespace has the file system of the directory `dir` mounted, and an
    /// overlay's `upperdir=` as its mounter gave it; asked only of what this plugin mounts, an
    /// overlay or a loop device's file system (an `fstat` and an `fstatfs` tell), empty for
    /// anything else.
    fn mounts_of_fs(&self, dir: BorrowedFd<'_>) -> io::Result<Vec<FsMount>>;
    /// Whether process `pid` can see the file system mounted at `target`: its mount namespace
    /// is ours, or has a copy of that mount where a path lookup finds it (a managed plugin's
    /// mounts reach dockerd's namespace through the propagated mount). `true` for a process
    /// that is gone.
    fn seen_by(&self, pid: u32, target: &Path) -> io::Result<bool>;
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct RealSys {
    /// Skip the new mount API and use `mount(2)` with an escaped option string.
    pub legacy_only: bool,
}

impl RealSys {
    pub fn new(legacy_only: bool) -> Self {
        Self { legacy_only }
    }
}

impl Sys for RealSys {
    fn mount_overlay(&self, spec: &OverlaySpec) -> Result<(), SysError> {
        check_upper_xattrs(&spec.work)?;
        if !self.legacy_only {
            match mount_with_fd_api(spec) {
                Ok(()) => return Ok(()),
                Err(FdApiError::Unsupported(errno)) => {
                    log::debug!("new mount API unavailable ({errno}), using mount(2)")
                }
                Err(FdApiError::Failed(e)) => return Err(e),
            }
        }
        mount_legacy(spec)
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted, SysError> {
        // The superblock's shutdown, when this unmount drops its last user, runs before
        // umount2 returns (the final mntput is task work done on the way back to user
        // space), and it tells every inotify watch on its inodes IN_UNMOUNT. A watch holds
        // no reference that would keep the superblock alive.
        use rustix::fs::inotify;
        UNMOUNT_WATCH.with_borrow_mut(|watch| {
            if watch.is_none() {
                let flags = inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC;
                *watch = match inotify::init(flags) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        log::warn!(
                            "cannot watch the unmount of {target:?}, so the next mount there \
                             looks for copies of the overlay the slow way: {e}"
                        );
                        None
                    }
                };
            }
            let watch = watch.as_ref();
            let flags = inotify::WatchFlags::DELETE_SELF
                | inotify::WatchFlags::ONLYDIR
                | inotify::WatchFlags::DONT_FOLLOW;
            let wd = watch.and_then(|fd| inotify::add_watch(fd, target, flags).ok());
            let unmounted = rustix::mount::unmount(target, UnmountFlags::NOFOLLOW);
            let mut no_copy_left = false;
            if let (Some(fd), Some(wd)) = (watch, wd) {
                // Reads every queued event: older ones are the IN_IGNORED of watches
                // removed below, by earlier unmounts on this thread.
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
                let mut events = inotify::Reader::new(fd, &mut buf);
                while let Ok(event) = events.next() {
                    no_copy_left |= unmounted.is_ok()
                        && event.wd() == wd
                        && event.events().contains(inotify::ReadFlags::UNMOUNT);
                }
                if !no_copy_left {
                    // The overlay's root lives on (a copy, or EBUSY), and so would the watch.
                    let _ = inotify::remove_watch(fd, wd);
                }
            }
            match unmounted {
                Ok(()) => Ok(Unmounted { no_copy_left }),
                Err(rustix::io::Errno::BUSY) => Err(SysError::Busy),
                Err(e) => Err(SysError::Unmount(e.into())),
            }
        })
    }

    fn is_overlay_mounted(&self, target: &Path) -> Result<bool, SysError> {
        Ok(mount_root_type(target)? == Some(OVERLAYFS_SUPER_MAGIC))
    }

    fn overlay_holders(&self, upper: &Path) -> Result<Vec<Holder>, SysError> {
        let mut found = self.overlay_holders_of(&[upper.to_owned()])?;
        Ok(found.pop().unwrap_or_default())
    }

    fn overlay_holders_of(&self, uppers: &[PathBuf]) -> Result<Vec<Vec<Holder>>, SysError> {
        let inspect = |source: io::Error| SysError::Inspect {
            path: PathBuf::from("/proc"),
            source,
        };
        let own_ns = std::fs::metadata("/proc/self/ns/mnt")
            .map_err(inspect)?
            .ino();
        // A copy that our unmount takes away too is no holder (see `mountinfo::Reach`): a
        // managed plugin's mounts reach dockerd's namespace that way. Our own mount table is
        // read once some namespace has a copy, not for every look.
        let mut reach: Option<Vec<Vec<mountinfo::Reach>>> = None;
        let mut seen = HashSet::from([own_ns]);
        let mut holders = vec![Vec::new(); uppers.len()];
        for entry in std::fs::read_dir("/proc").map_err(inspect)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go while we look: a vanished one holds nothing.
            let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/mnt")) else {
                continue;
            };
            if !seen.insert(ns.ino()) {
                continue;
            }
            let Ok(info) = std::fs::read(format!("/proc/{pid}/mountinfo")) else {
                continue;
            };
            let mut command = None;
            let mut mounts = None;
            for (i, (upper, holders)) in uppers.iter().zip(&mut holders).enumerate() {
                // Most namespaces hold no copy: the whole table is parsed only for one that
                // has one, to tell whether our unmount reaches it.
                if !mountinfo_has_overlay_upper(&info, upper) {
                    continue;
                }
                let reach = match &reach {
                    Some(reach) => reach,
                    None => {
                        let own = std::fs::read("/proc/self/mountinfo").map_err(inspect)?;
                        let own = mountinfo::parse(&own);
                        let of = |upper: &PathBuf| mountinfo::Reach::of(&own, upper);
                        reach.insert(uppers.iter().map(of).collect())
                    }
                };
                let mounts = mounts.get_or_insert_with(|| mountinfo::parse(&info));
                if mountinfo::holds(mounts, upper, &reach[i]) {
                    let command = command.get_or_insert_with(|| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .map(|s| s.trim_end().to_owned())
                            .unwrap_or_default()
                    });
                    holders.push(Holder {
                        pid,
                        command: command.clone(),
                    });
                }
            }
        }
        Ok(holders)
    }

    fn boot_id(&self) -> io::Result<String> {
        Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_owned())
    }

    fn format_image(
        &self,
        image: &Path,
        size: u64,
        sparse: bool,
        fs: FsType,
    ) -> Result<(), SysError> {
        image::format(image, size, sparse, fs)
    }

    fn attach_image(&self, image: &Path, fs: FsType, target: &Path) -> Result<(), SysError> {
        image::attach(image, fs, target)
    }

    fn is_mount_root(&self, target: &Path) -> Result<bool, SysError> {
        mount_root_type(target).map(|found| found.is_some())
    }

    fn fs_usage(&self, target: &Path) -> io::Result<(u64, u64)> {
        image::usage(target)
    }

    fn mounts_of_fs(&self, dir: BorrowedFd<'_>) -> io::Result<Vec<FsMount>> {
        // An overlay reports its own device for its directories.
        let dev = rustix::fs::fstat(dir)?.st_dev;
        let dev = (rustix::fs::major(dev), rustix::fs::minor(dev));
        if dev.0 != LOOP_MAJOR && rustix::fs::fstatfs(dir)?.f_type != OVERLAYFS_SUPER_MAGIC {
            return Ok(Vec::new());
        }
        let mounts = mountinfo::parse(&std::fs::read("/proc/self/mountinfo")?);
        Ok(mountinfo::mounts_of_device(&mounts, dev)
            .map(|m| FsMount {
                mount_point: m.mount_point.clone(),
                upper: m
                    .upper
                    .as_deref()
                    .map(|u| PathBuf::from(OsStr::from_bytes(u))),
            })
            .collect())
    }

    fn seen_by(&self, pid: u32, target: &Path) -> io::Result<bool> {
        let gone = |e: &io::Error| {
            e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error())
        };
        let theirs = match std::fs::metadata(format!("/proc/{pid}/ns/mnt")) {
            Err(e) if gone(&e) => return Ok(true),
            found => found?.ino(),
        };
        if theirs == std::fs::metadata("/proc/self/ns/mnt")?.ino() {
            return Ok(true);
        }
        // An overlay reports its own device for its directories.
        let dev = rustix::fs::stat(target)?.st_dev;
        let dev = (rustix::fs::major(dev), rustix::fs::minor(dev));
        let info = match std::fs::read(format!("/proc/{pid}/mountinfo")) {
            Err(e) if gone(&e) => return Ok(true),
            found => found?,
        };
        Ok(mountinfo::shows_device(&mountinfo::parse(&info), dev))
    }

    fn process_start_time(&self, pid: u32) -> Option<u64> {
        // One read: the line is a few hundred bytes, and a growing buffer costs a read each.
        let path = format!("/proc/{pid}/stat");
        let file = rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        let mut buf = [0u8; 2048];
        let n = rustix::io::read(&file, &mut buf).ok()?;
        if n == buf.len() {
            return parse_start_time(&std::fs::read(path).ok()?);
        }
        parse_start_time(&buf[..n])
    }
}

/// Whether the directory `dir` lies in a shared mount (one with a peer group) of this mount
/// namespace: what is mounted there reaches other namespaces, as a managed plugin's propagated
/// mount reaches dockerd's.
pub fn is_in_shared_mount(dir: &Path) -> io::Result<bool> {
    let mounts = mountinfo::parse(&std::fs::read("/proc/self/mountinfo")?);
    Ok(mountinfo::lookup(&mounts, dir).is_some_and(|m| m.shared.is_some()))
}

/// The file system type (`statfs` magic) of what is mounted exactly at `target`; `None` when
/// `target` is no mount root (or does not exist).
fn mount_root_type(target: &Path) -> Result<Option<i64>, SysError> {
    let inspect = |source: io::Error| SysError::Inspect {
        path: target.to_owned(),
        source,
    };
    let fs_type = || {
        rustix::fs::statfs(target)
            .map(|fs| Some(fs.f_type))
            .map_err(|e| inspect(e.into()))
    };
    // One statx says whether `target` is a mount root (Linux 5.8+); then the file system
    // type tells our overlay from anything else mounted there.
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    match rustix::fs::statx(
        rustix::fs::CWD,
        target,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::TYPE,
    ) {
        Ok(st) if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            if !st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT) {
                return Ok(None);
            }
            return fs_type();
        }
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        // Older kernels: a mount root has a different device from its parent directory.
        _ => {}
    }
    let here = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(inspect(e)),
    };
    let parent = target.parent().unwrap_or(Path::new("/"));
    let up = std::fs::symlink_metadata(parent).map_err(inspect)?;
    if here.dev() == up.dev() {
        return Ok(None);
    }
    fs_type()
}

/// Refuses an upper whose filesystem has no `trusted.*` extended attributes (ramfs, for one),
/// tried on the work directory (same filesystem). overlayfs mounts such an upper with only a
/// warning in the kernel log, but cannot then mark a directory opaque: deleting a directory
/// of the base fails inside the container with an I/O error. Any other failure of the probe
/// is left for the mount itself to report.
///
/// The probe reads an attribute nobody sets: a file system with `trusted.*` answers that it
/// has no such attribute, one without answers EOPNOTSUPP, as it would to a write, and a read
/// leaves nothing for the journal to commit. `Ok(true)` when the answer says the file system
/// has them, `Ok(false)` when the probe itself failed.
fn check_upper_xattrs(work: &Path) -> Result<bool, SysError> {
    const PROBE: &str = "trusted.docker-on-top.probe";
    match rustix::fs::getxattr(work, PROBE, &mut [0u8; 16]) {
        // There, absent, or longer than the buffer: all answers of a file system that has them.
        Ok(_) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::RANGE) => Ok(true),
        Err(errno @ rustix::io::Errno::NOTSUP) => {
            let dir = work.parent().unwrap_or(work);
            Err(SysError::Mount {
                reason: format!(
                    "the filesystem of {} does not support trusted.* extended attributes, which overlayfs needs in the upper layer; the state directory must be on a filesystem that has them (ext4, xfs, btrfs, tmpfs)",
                    dir.display()
                ),
                source: errno.into(),
            })
        }
        Err(_) => Ok(false),
    }
}

/// Field 22 of `/proc/PID/stat`. The command (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")" come field 3 (state) onwards: field 22 is the 20th of them.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Why the new mount API did not mount.
enum FdApiError {
    /// This kernel lacks fsopen (ENOSYS) or `lowerdir+` by file descriptor (EINVAL, < 6.13).
    Unsupported(rustix::io::Errno),
    Failed(SysError),
}

impl From<SysError> for FdApiError {
    fn from(e: SysError) -> Self {
        FdApiError::Failed(e)
    }
}

/// Reads the kernel's messages about a failed fsconfig from the fs context.
fn context_messages(fs: &rustix::fd::OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        // Each message is "e overlayfs: ...", "w ..." or "i ...".
        let msg = String::from_utf8_lossy(&buf[..n]);
        out.push(msg.get(2..).unwrap_or(&msg).trim().to_owned());
    }
    out.join("; ")
}

/// fsopen/fsconfig/fsmount/move_mount, each layer passed as a file descriptor: no escaping and
/// no length limit (Linux 6.13+).
fn mount_with_fd_api(spec: &OverlaySpec) -> Result<(), FdApiError> {
    let fail = |fs: Option<&rustix::fd::OwnedFd>, what: &str, e: rustix::io::Errno| {
        let kernel = fs.map(context_messages).unwrap_or_default();
        SysError::Mount {
            reason: if kernel.is_empty() {
                what.to_owned()
            } else {
                format!("{what}: {kernel}")
            },
            source: e.into(),
        }
    };
    let fs = match rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fs) => fs,
        Err(e @ rustix::io::Errno::NOSYS) => return Err(FdApiError::Unsupported(e)),
        Err(e) => return Err(fail(None, "fsopen", e).into()),
    };
    let open_dir = |p: &Path| {
        rustix::fs::open(
            p,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| SysError::Mount {
            reason: format!("cannot open {}", p.display()),
            source: e.into(),
        })
    };
    rustix::mount::fsconfig_set_string(&fs, "source", spec.source.as_str())
        .map_err(|e| fail(Some(&fs), "source", e))?;
    for (key, dir) in [
        ("lowerdir+", &spec.lower),
        ("upperdir", &spec.upper),
        ("workdir", &spec.work),
    ] {
        let fd = open_dir(dir)?;
        match rustix::mount::fsconfig_set_fd(&fs, key, &fd) {
            Ok(()) => {}
            Err(e @ rustix::io::Errno::INVAL) if key == "lowerdir+" => {
                return Err(FdApiError::Unsupported(e));
            }
            Err(e) => return Err(fail(Some(&fs), key, e).into()),
        }
    }
    for (key, value) in FIXED_OPTIONS {
        rustix::mount::fsconfig_set_string(&fs, key, value).map_err(|e| fail(Some(&fs), key, e))?;
    }
    rustix::mount::fsconfig_create(&fs).map_err(|e| fail(Some(&fs), "create", e))?;
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(|e| fail(Some(&fs), "fsmount", e))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        &spec.target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| fail(None, "move_mount", e).into())
}

/// `mount(2)` with one option string: `\`, `,` and `:` in paths are escaped with a backslash.
fn mount_legacy(spec: &OverlaySpec) -> Result<(), SysError> {
    let data = legacy_options(spec);
    if data.len() >= 4096 {
        return Err(SysError::Mount {
            reason: format!(
                "the option string is {} bytes, over the kernel's one-page limit",
                data.len()
            ),
            source: rustix::io::Errno::INVAL.into(),
        });
    }
    let data = std::ffi::CString::new(data).map_err(|_| SysError::Mount {
        reason: "a path contains a NUL byte".into(),
        source: rustix::io::Errno::INVAL.into(),
    })?;
    rustix::mount::mount(
        spec.source.as_str(),
        &spec.target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    )
    .map_err(|e| SysError::Mount {
        reason: "mount(2)".into(),
        source: e.into(),
    })
}

/// The legacy option string for `spec`.
pub fn legacy_options(spec: &OverlaySpec) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, dir) in [
        ("lowerdir", &spec.lower),
        ("upperdir", &spec.upper),
        ("workdir", &spec.work),
    ] {
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(&escape_option_path(dir.as_os_str()));
        data.push(b',');
    }
    let fixed: Vec<String> = FIXED_OPTIONS
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    data.extend_from_slice(fixed.join(",").as_bytes());
    data
}

/// Escapes a path for overlay's legacy option string.
pub fn escape_option_path(path: &OsStr) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path.as_bytes() {
        if matches!(b, b'\\' | b',' | b':') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// A test double that keeps a mount table in memory and records every call.
#[derive(Debug, Default)]
pub struct RecordingSys {
    pub state: Mutex<RecordingState>,
}

#[derive(Debug, Default)]
pub struct RecordingState {
    /// Currently mounted specs, by target.
    pub mounted: Vec<OverlaySpec>,
    /// Every call, in order, as text: "mount TARGET", "unmount TARGET".
    pub calls: Vec<String>,
    /// Targets whose unmount answers Busy.
    pub busy: HashSet<PathBuf>,
    /// Uppers held by some other mount namespace.
    pub held: HashSet<PathBuf>,
    /// Live processes: pid to start time.
    pub processes: std::collections::HashMap<u32, u64>,
    /// How many times holders were looked for (`overlay_holders`, per upper).
    pub looks: usize,
    /// What [`Sys::boot_id`] answers.
    pub boot_id: String,
    /// Where an image is attached ([`Sys::attach_image`]), and which.
    pub attached: std::collections::HashMap<PathBuf, PathBuf>,
    /// What [`Sys::mounts_of_fs`] answers for every base.
    pub base_mounts: Vec<FsMount>,
    /// Processes that see none of our mounts ([`Sys::seen_by`]).
    pub blind: HashSet<u32>,
}

impl Sys for RecordingSys {
    fn mount_overlay(&self, spec: &OverlaySpec) -> Result<(), SysError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("mount {}", spec.target.display()));
        for dir in [&spec.lower, &spec.upper, &spec.work, &spec.target] {
            if !dir.is_dir() {
                return Err(SysError::Mount {
                    reason: format!("cannot open {}", dir.display()),
                    source: io::ErrorKind::NotFound.into(),
                });
            }
        }
        // As overlayfs does at every mount.
        let _ = std::fs::create_dir(spec.work.join("work"));
        assert!(
            !s.mounted
                .iter()
                .any(|m| m.target == spec.target || m.upper == spec.upper),
            "double mount of {spec:?}"
        );
        s.mounted.push(spec.clone());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted, SysError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("unmount {}", target.display()));
        if s.busy.contains(target) {
            return Err(SysError::Busy);
        }
        if let Some(image) = s.attached.remove(target) {
            move_entries(target, &image_contents(&image));
            return Ok(Unmounted { no_copy_left: true });
        }
        let Some(at) = s.mounted.iter().position(|m| m.target == target) else {
            return Err(SysError::Unmount(rustix::io::Errno::INVAL.into()));
        };
        let spec = s.mounted.remove(at);
        Ok(Unmounted {
            no_copy_left: !s.held.contains(&spec.upper),
        })
    }

    fn is_overlay_mounted(&self, target: &Path) -> Result<bool, SysError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .mounted
            .iter()
            .any(|m| m.target == target))
    }

    fn overlay_holders(&self, upper: &Path) -> Result<Vec<Holder>, SysError> {
        let mut s = self.state.lock().unwrap();
        s.looks += 1;
        Ok(if s.held.contains(upper) {
            vec![Holder {
                pid: 4242,
                command: "holder".into(),
            }]
        } else {
            vec![]
        })
    }

    fn process_start_time(&self, pid: u32) -> Option<u64> {
        self.state.lock().unwrap().processes.get(&pid).copied()
    }

    fn boot_id(&self) -> io::Result<String> {
        Ok(self.state.lock().unwrap().boot_id.clone())
    }

    fn format_image(
        &self,
        image: &Path,
        size: u64,
        _sparse: bool,
        _fs: FsType,
    ) -> Result<(), SysError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("format {}", image.display()));
        let image_err = |source| SysError::Image {
            reason: "cannot make the image".into(),
            source,
        };
        let file = std::fs::File::create_new(image).map_err(image_err)?;
        file.set_len(size).map_err(image_err)?;
        // A new file system is empty.
        let _ = std::fs::remove_dir_all(image_contents(image));
        Ok(())
    }

    /// Stands for the image's file system with the directory itself: what it holds while
    /// attached is kept beside the image while it is not ([`image_contents`]).
    fn attach_image(&self, image: &Path, _fs: FsType, target: &Path) -> Result<(), SysError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("attach {}", target.display()));
        assert!(image.is_file(), "attach of a missing image {image:?}");
        assert!(
            s.attached
                .insert(target.to_owned(), image.to_owned())
                .is_none(),
            "double attach of {target:?}"
        );
        move_entries(&image_contents(image), target);
        Ok(())
    }

    fn is_mount_root(&self, target: &Path) -> Result<bool, SysError> {
        let s = self.state.lock().unwrap();
        Ok(s.attached.contains_key(target) || s.mounted.iter().any(|m| m.target == target))
    }

    fn fs_usage(&self, _target: &Path) -> io::Result<(u64, u64)> {
        Ok((1 << 30, 4096))
    }

    fn mounts_of_fs(&self, _dir: BorrowedFd<'_>) -> io::Result<Vec<FsMount>> {
        Ok(self.state.lock().unwrap().base_mounts.clone())
    }

    fn seen_by(&self, pid: u32, _target: &Path) -> io::Result<bool> {
        Ok(!self.state.lock().unwrap().blind.contains(&pid))
    }
}

/// Where [`RecordingSys`] keeps what an image's file system holds while it is detached.
fn image_contents(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".contents");
    PathBuf::from(name)
}

/// Moves every entry of `from` (if it exists) into `to`.
fn move_entries(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    std::fs::create_dir_all(to).unwrap();
    for entry in entries {
        let entry = entry.unwrap();
        std::fs::rename(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_separators() {
        assert_eq!(
            escape_option_path(OsStr::new("/a b,c:d\\e")),
            b"/a b\\,c\\:d\\\\e".to_vec()
        );
        let spec = OverlaySpec {
            source: "s".into(),
            lower: "/l,1".into(),
            upper: "/u:2".into(),
            work: "/w".into(),
            target: "/t".into(),
        };
        assert_eq!(
            String::from_utf8(legacy_options(&spec)).unwrap(),
            "lowerdir=/l\\,1,upperdir=/u\\:2,workdir=/w,index=off,metacopy=off,redirect_dir=off"
        );
    }

    #[test]
    fn start_time_of_odd_command_names() {
        let stat = b"1234 (my) odd (cmd)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 0";
        assert_eq!(parse_start_time(stat), Some(987654));
        let me = std::fs::read("/proc/self/stat").unwrap();
        assert!(parse_start_time(&me).is_some_and(|t| t > 0));
        assert_eq!(parse_start_time(b"garbage"), None);
    }

    #[test]
    fn finds_upper_in_mountinfo() {
        let info = b"22 1 8:1 / / rw - ext4 /dev/root rw\n\
            99 22 0:77 / /m rw,relatime - overlay dot rw,lowerdir=/b,upperdir=/var/x\\040y\\054z/upper,workdir=/w\n";
        assert!(mountinfo_has_overlay_upper(
            info,
            Path::new("/var/x y,z/upper")
        ));
        assert!(!mountinfo_has_overlay_upper(
            info,
            Path::new("/var/x y,z/upper2")
        ));
        assert!(!mountinfo_has_overlay_upper(info, Path::new("/b")));
    }
}
