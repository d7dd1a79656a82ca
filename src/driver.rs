//! The volume driver: volume lifecycle, per-ID mount counts and the volatile discard.
//!
//! This is where every invariant of [`crate::store`] is kept. It is synchronous: the server
//! calls it from a request's handler and it returns once the state it reports is true. It
//! takes validated [`VolumeName`]s and [`MountId`]s and never sees the wire format; mounting
//! goes through the [`Sys`] trait. It is split by what each part does:
//!
//! - `plan.rs`: the state table below as pure functions (observed state in, steps out);
//! - `mounting.rs`: Mount and Unmount, which observe a volume, ask the plan, carry it out;
//! - `lifecycle.rs`: Create, Remove, Get, Path and List;
//! - `locked.rs`: the volume lock for the admin commands, and reset.
//!
//! # State machine of one volume
//!
//! The kernel says whether the overlay is mounted at `mountpoint/` in our mount namespace; the
//! records in `activemounts/` say who uses it. They combine as follows:
//!
//! | kernel    | records                    | meaning and what Mount does                         |
//! |-----------|----------------------------|-----------------------------------------------------|
//! | mounted   | some                       | in use: count one more (records of gone clients are released once no other namespace holds the overlay) |
//! | mounted   | none                       | left by a crash between the last Unmount's two steps, or by a busy mountpoint: reuse; a volatile volume is unmounted and discarded first (refused while a copy is held elsewhere) |
//! | unmounted | none                       | idle: discard if volatile, mount; refused while another mount namespace holds a copy of the overlay, looked for only when the mark below says so |
//! | unmounted | all from an earlier boot   | idle after a reboot: records are void               |
//! | unmounted | some from this boot (or Go)| unmounted here but perhaps still held in another mount namespace: refused while any process holds it, else the records are void |
//!
//! dockerd forgets its mounts when it restarts and never sends their Unmount. Each record
//! therefore names the process that asked for it (pid and start time, from the socket's peer
//! credentials); at a Mount, records whose process is gone are released when no other mount
//! namespace holds the overlay (with live-restore a running container still does, and keeps
//! them). Records with no known client are never released this way.
//!
//! Mount mounts *before* writing its record; the last Unmount deletes its record *before*
//! unmounting. A crash between the two steps of either leaves one of the rows above. A
//! volatile volume's changes are discarded at the first Mount after the last Unmount, never at
//! Unmount, so they can be recovered in between; the discard renames the upper into the trash
//! in constant time and the [`Janitor`] deletes it, the only work left for after an answer.
//!
//! # Copies of the overlay in other mount namespaces
//!
//! A process whose mount namespace was copied while the overlay was mounted (a container of
//! another engine, anything run under `unshare -m`) keeps its copy after the unmount here, and
//! that upper must never get a second overlay. Looking for copies means reading the mount
//! table of every mount namespace: milliseconds on a busy host. So the last Unmount asks the
//! kernel instead ([`crate::sys::Unmounted`]): when its umount2 shut the overlay's superblock
//! down, no copy exists anywhere, and the Unmount removes overlayfs' `workdir/work` (which
//! every mount makes) as the mark that none can. A Mount or Remove of an unmounted volume that
//! finds `workdir/work` (a copy survived, a crash, a busy mountpoint, a mount made by the Go
//! version) looks the slow way and refuses while a copy is held.
//!
//! The admin commands (`docker-on-top changes`, `reset`, `commit`, ...) take the same lock
//! through [`Driver::lock_volume`]. The one state change they make, a reset (the upper into
//! the trash, a fresh one in its place), needs [`Driver::lock_unmounted`]: refused in the two
//! "mounted" rows and while another mount namespace holds the overlay, it voids the records of
//! the other rows, as Mount does (see `driver/locked.rs`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use thiserror::Error;

use crate::janitor::Janitor;
use crate::names::{MountId, VolumeName};
use crate::options::{AllowedBases, HostRoot, OpenedBase, OptionsError, VolumeOptions};
use crate::store::{self, Client, Metadata, MountRecord, Root, VolumeDir};
use crate::sys::{Holder, OverlaySpec, RealSys, Sys, SysError, Unmounted};

mod lifecycle;
mod locked;
mod mounting;
pub mod plan;
pub use locked::{LockedVolume, UnmountedVolume};

/// Everything a request can fail with. Messages are one lower-case sentence; causes are
/// chained as `source`, never repeated in the message.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeName),
    #[error("invalid options for volume {name}")]
    Options {
        name: VolumeName,
        #[source]
        source: OptionsError,
    },
    #[error(
        "volume {name} already exists with other options (base {base:?}, volatile {volatile}{}); remove it first or use another name",
        .size.map(|b| format!(", size {b} bytes")).unwrap_or_default()
    )]
    Conflict {
        name: VolumeName,
        base: PathBuf,
        volatile: bool,
        size: Option<u64>,
    },
    #[error("volume {name} has no mount with ID {id}")]
    UnknownMountId { name: VolumeName, id: MountId },
    #[error(
        "volume {name} is still mounted by {holder} in another mount namespace; stop it before using or removing the volume"
    )]
    HeldElsewhere { name: VolumeName, holder: Holder },
    #[error(
        "the mountpoint of volume {name} is busy: a process still uses files under {mountpoint:?}"
    )]
    Busy {
        name: VolumeName,
        mountpoint: PathBuf,
    },
    /// An admin command that replaces the upper or changes the base met a mounted volume.
    #[error("{}", locked::mounted_message(.name, .mountpoint, *.mounts))]
    Mounted {
        name: VolumeName,
        mountpoint: PathBuf,
        /// Uses on record (0: mounted with no container on record).
        mounts: u64,
    },
    #[error("cannot mount volume {name}")]
    Mount {
        name: VolumeName,
        #[source]
        source: SysError,
    },
    #[error("cannot make or attach the file system of sized volume {name}")]
    Image {
        name: VolumeName,
        #[source]
        source: SysError,
    },
    #[error("cannot unmount volume {name}")]
    Unmount {
        name: VolumeName,
        #[source]
        source: SysError,
    },
    #[error("cannot inspect the mounts of volume {name}")]
    Inspect {
        name: VolumeName,
        #[source]
        source: SysError,
    },
    #[error("volume {name} cannot be used from its base directory")]
    BaseRefused {
        name: VolumeName,
        #[source]
        source: OptionsError,
    },
    #[error(
        "the base directory of volume {name}, {base:?}, is in a file system this plugin mounted \
         for a volume ({at:?}): a volume cannot be made of another one"
    )]
    BaseInVolume {
        name: VolumeName,
        base: PathBuf,
        /// The volume's upper (an overlay), or where its image's file system is mounted.
        at: PathBuf,
    },
    /// A managed plugin whose propagated mount dockerd cut off (see [`Driver::on_cut_off`]).
    #[error(
        "volume {name} was mounted where dockerd (pid {pid}) cannot see it: the plugin's mount \
         directory no longer reaches dockerd's mount namespace, and the plugin stops for dockerd \
         to start it again with one that does"
    )]
    CutOff { name: VolumeName, pid: u32 },
    #[error("the base directory of volume {name} is unusable: {base:?}")]
    BaseGone {
        name: VolumeName,
        base: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every such action is on the state directory: a full or read-only one is named so.
    #[error("{action} failed for volume {name}{}", state_dir_hint(.source))]
    Io {
        name: VolumeName,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot use the state directory {root:?}")]
    Root {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a write to the state directory failed, when the errno says more than itself.
fn state_dir_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(28 /* ENOSPC */ | 122 /* EDQUOT */) => {
            " (the filesystem of the state directory is full)"
        }
        Some(30 /* EROFS */) => " (the state directory is on a read-only filesystem)",
        _ => "",
    }
}

/// What `Get` reports about a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: VolumeName,
    /// Set only while the overlay is mounted.
    pub mountpoint: Option<PathBuf>,
    pub created_at: SystemTime,
    pub base: Option<PathBuf>,
    pub volatile: Option<bool>,
    pub mounted: bool,
    /// Sum of the usage counts of the mount IDs on record while mounted; 0 when unmounted.
    pub active_mounts: u64,
    pub upper: PathBuf,
    /// Sized volumes: the cap, and what its file system says while attached.
    pub size: Option<SizeStatus>,
    /// Set when the volume's directory exists but its metadata cannot be read: the volume is
    /// still reported (dockerd forgets a volume on any `Get` error).
    pub error: Option<String>,
}

/// The cap of a sized volume and its use.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SizeStatus {
    pub cap: u64,
    pub fs: crate::options::FsType,
    /// Bytes used in its file system (`statfs`); `None` while it is not attached.
    pub used: Option<u64>,
    /// The file system's own size (a little less than the cap: its metadata).
    pub fs_size: Option<u64>,
}

/// How the driver is set up; built by `main` from the command line.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The state root, `/var/lib/docker-on-top` by default. Created if missing.
    pub root: PathBuf,
    /// Use legacy `mount(2)` with escaped options even where the new mount API works.
    pub legacy_mount_api: bool,
    /// Where Create accepts bases (`--allowed-base`); anywhere when empty. Volumes that
    /// already exist are not affected.
    pub allowed_bases: AllowedBases,
    /// Where the host's file system is seen (`--host-root`; a managed plugin's).
    pub host_root: HostRoot,
    /// Where overlays are mounted, one directory per volume (`--mount-dir`; a managed
    /// plugin's propagated mount); `None`: in each volume's directory, as always.
    pub mount_dir: Option<PathBuf>,
}

/// The driver. Cheap to open: it reads nothing per volume until asked about one.
pub struct Driver<S: Sys = RealSys> {
    root: Root,
    sys: Arc<S>,
    boot_id: String,
    janitor: OnceLock<Janitor>,
    allowed_bases: AllowedBases,
    host_root: HostRoot,
    /// Whether each Mount asks if its client sees the overlay: the mount directory is a
    /// shared mount, whose mounts are meant to reach dockerd ([`Driver::on_cut_off`]).
    mounts_reach_client: bool,
    /// What to do once dockerd no longer sees our mounts ([`Driver::on_cut_off`]).
    cut_off: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Driver<RealSys> {
    /// Opens (creating if needed) the state root. Does no work proportional to the number of
    /// volumes: the service may be socket-activated for every request.
    pub fn open(config: DriverConfig) -> Result<Self, DriverError> {
        let mut driver = Self::with_sys(&config.root, RealSys::new(config.legacy_mount_api))?
            .with_allowed_bases(config.allowed_bases);
        driver.host_root = config.host_root;
        if let Some(dir) = &config.mount_dir {
            driver.root =
                (driver.root.with_mount_dir(dir)).map_err(|source| DriverError::Root {
                    root: dir.clone(),
                    source,
                })?;
            let dir = driver.root.mount_dir().expect("just set");
            driver.mounts_reach_client = crate::sys::is_in_shared_mount(dir).unwrap_or(false);
            if driver.mounts_reach_client {
                log::debug!("{dir:?} is a shared mount: each Mount checks that dockerd sees it");
            }
        }
        Ok(driver)
    }
}

impl<S: Sys> Driver<S> {
    /// Opens the state root at `root` with the given OS boundary.
    pub fn with_sys(root: &Path, sys: S) -> Result<Self, DriverError> {
        let root_err = |source| DriverError::Root {
            root: root.to_owned(),
            source,
        };
        let root = Root::open(root).map_err(root_err)?;
        let boot_id = sys.boot_id().map_err(root_err)?;
        Ok(Self {
            root,
            sys: Arc::new(sys),
            boot_id,
            janitor: OnceLock::new(),
            mounts_reach_client: false,
            cut_off: OnceLock::new(),
            allowed_bases: AllowedBases::anywhere(),
            host_root: HostRoot::default(),
        })
    }

    /// Restricts the bases Create accepts to `allowed` (see [`DriverConfig::allowed_bases`]).
    pub fn with_allowed_bases(mut self, allowed: AllowedBases) -> Self {
        self.allowed_bases = allowed;
        self
    }

    /// Sets what to do when a Mount finds that its client does not see the overlay mounted for
    /// it (called once per such Mount, after the overlay is gone again and before the error is
    /// answered): `main` stops the daemon. Only with a mount directory (`--mount-dir`) that is
    /// a shared mount, as the managed plugin's propagated mount is. dockerd 20.10, restarted
    /// while the plugin runs, stops the plugin and starts it again, and now and then leaves the
    /// new one with mounts that do not reach where dockerd binds volumes from (likely its
    /// `HandleExitEvent`, which unmounts everything under the plugin's directory meanwhile).
    /// Every later Mount would give containers the bare directory; a plugin that stops is
    /// started again with a propagated mount that works. The first call wins.
    pub fn on_cut_off(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.cut_off.set(Box::new(hook));
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn sys(&self) -> &S {
        &self.sys
    }

    /// Starts the background thread that deletes discarded uppers and removed volumes,
    /// finishing deletions a previous process was interrupted in. Call once, after the
    /// service has told systemd it is ready.
    pub fn start_janitor(&self) {
        if self.janitor.get().is_some() {
            return;
        }
        match Janitor::start(self.root.clone()) {
            Ok(j) => {
                let _ = self.janitor.set(j);
            }
            Err(e) => log::warn!("cannot start the trash deleter: {e}"),
        }
    }

    /// Asks the janitor to empty the trash.
    fn kick_janitor(&self) {
        if let Some(j) = self.janitor.get() {
            j.kick();
        }
    }

    /// The process `pid` as a mount record names it (pid and start time); `None` when there is
    /// no such process (or no pid). The server asks once per connection.
    pub fn client(&self, pid: Option<u32>) -> Option<Client> {
        let pid = pid?;
        self.sys
            .process_start_time(pid)
            .map(|start_time| Client { pid, start_time })
    }

    // ----- Helpers shared by the parts ------------------------------------------------------

    fn io_err(name: &VolumeName, action: &'static str) -> impl FnOnce(io::Error) -> DriverError {
        let name = name.clone();
        move |source| DriverError::Io {
            name,
            action,
            source,
        }
    }

    fn read_metadata(&self, name: &VolumeName, vol: &VolumeDir) -> Result<Metadata, DriverError> {
        vol.read_metadata()
            .map_err(Self::io_err(name, "reading metadata.json"))
    }

    fn existing(&self, name: &VolumeName) -> Result<VolumeDir, DriverError> {
        let vol = self.root.volume(name);
        match std::fs::symlink_metadata(&vol.path) {
            Ok(m) if m.is_dir() => Ok(vol),
            Ok(_) => Err(DriverError::NoSuchVolume(name.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DriverError::NoSuchVolume(name.clone()))
            }
            Err(source) => Err(Self::io_err(name, "looking up the volume")(source)),
        }
    }

    fn try_lock(
        &self,
        name: &VolumeName,
    ) -> Result<Option<(VolumeDir, store::VolumeLock)>, DriverError> {
        let vol = self.root.volume(name);
        let lock =
            store::lock_volume(&vol.path).map_err(Self::io_err(name, "locking the volume"))?;
        Ok(lock.map(|l| (vol, l)))
    }

    fn lock(&self, name: &VolumeName) -> Result<(VolumeDir, store::VolumeLock), DriverError> {
        self.try_lock(name)?
            .ok_or_else(|| DriverError::NoSuchVolume(name.clone()))
    }

    fn read_records(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
    ) -> Result<Vec<(MountId, MountRecord)>, DriverError> {
        vol.read_records()
            .map_err(Self::io_err(name, "reading mount records"))
    }

    /// Deletes every record (they were found void) and any temporaries left beside them.
    fn clear_records(&self, name: &VolumeName, vol: &VolumeDir) -> Result<(), DriverError> {
        vol.clear_records()
            .map_err(Self::io_err(name, "clearing stale mount records"))
    }

    /// Unmounts the overlay at `mountpoint` (never lazily: a busy mountpoint stays mounted),
    /// and marks it as leaving no copy when the kernel says none is left (see the module doc).
    fn unmount_overlay(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
    ) -> Result<Unmounted, DriverError> {
        let unmounted = self.unmount_at(name, &vol.mountpoint())?;
        failpoint!("unmount.unmounted");
        if unmounted.no_copy_left {
            // Into the trash, for the janitor to delete: a rename costs a request a fraction
            // of what rmdir does. (A sized volume's is on its image's file system: removed.)
            let work = vol.overlay_work();
            let moved = match std::fs::rename(&work, self.root.trash_slot("work")) {
                Err(e) if e.raw_os_error() == Some(18 /* EXDEV */) => std::fs::remove_dir(&work),
                result => result,
            };
            match moved {
                Ok(()) => self.kick_janitor(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Left by a mount cut short, say: the next Mount looks itself.
                Err(e) => log::debug!("volume {name}: keeping {work:?}: {e}"),
            }
        } else {
            log::info!(
                "volume {name}: a copy of its overlay lives on elsewhere (another mount \
                 namespace, or an open file); the next Mount looks for it"
            );
        }
        Ok(unmounted)
    }

    /// Unmounts whatever is mounted at `target` (never lazily): [`DriverError::Busy`] while a
    /// process uses files under it.
    fn unmount_at(
        &self,
        name: &VolumeName,
        target: &Path,
    ) -> Result<crate::sys::Unmounted, DriverError> {
        self.sys.unmount(target).map_err(|e| match e {
            SysError::Busy => DriverError::Busy {
                name: name.clone(),
                mountpoint: target.to_owned(),
            },
            source => DriverError::Unmount {
                name: name.clone(),
                source,
            },
        })
    }

    fn is_mounted(&self, name: &VolumeName, mountpoint: &Path) -> Result<bool, DriverError> {
        self.sys
            .is_overlay_mounted(mountpoint)
            .map_err(|source| DriverError::Inspect {
                name: name.clone(),
                source,
            })
    }

    /// The volume's base, opened and checked against `--allowed-base` for one use (see
    /// [`OpenedBase`]); `strict`: never through a symlink, also with no `--allowed-base` (the
    /// admin commands that write into the base).
    pub fn open_base(
        &self,
        name: &VolumeName,
        meta: &Metadata,
        strict: bool,
    ) -> Result<OpenedBase, DriverError> {
        let allowed = &self.allowed_bases;
        let strict = strict || allowed.restricts();
        OpenedBase::open(&meta.base, allowed, strict, &self.host_root).map_err(|e| match e {
            OptionsError::BaseUnusable { source, .. } => DriverError::BaseGone {
                name: name.clone(),
                base: meta.base.clone(),
                source,
            },
            source => DriverError::BaseRefused {
                name: name.clone(),
                source,
            },
        })
    }

    /// Opens the base for a Mount or a Create: [`Driver::open_base`], and refused when it lies
    /// in a file system mounted for one of this root's volumes: its overlay (reached through
    /// `--mount-dir`, or a bind of a mountpoint), or a sized volume's image (a bind of its
    /// `upper/`). The overlay made of it would hold that file system as its lower layer, out
    /// of every mount table: the volume's next last Unmount would leave its overlay alive, the
    /// next Mount would mount a second one on the same upper (or fail to attach the image),
    /// and Remove would delete the upper from under the first.
    pub(crate) fn open_lower(
        &self,
        name: &VolumeName,
        meta: &Metadata,
    ) -> Result<OpenedBase, DriverError> {
        let base = self.open_base(name, meta, false)?;
        let mounts =
            (self.sys.mounts_of_fs(base.fd())).map_err(|source| DriverError::BaseGone {
                name: name.clone(),
                base: meta.base.clone(),
                source,
            })?;
        // An overlay of ours shows its upper; an image's file system, where we mounted it.
        let ours = mounts.into_iter().find_map(|m| match m.upper {
            Some(upper) => {
                crate::sys::mountinfo::upper_is_in(&upper, self.root.path()).then_some(upper)
            }
            None => self
                .root
                .holds_mount_point(&m.mount_point)
                .then_some(m.mount_point),
        });
        match ours {
            Some(at) => Err(DriverError::BaseInVolume {
                name: name.clone(),
                base: base.real_path().to_owned(),
                at,
            }),
            None => Ok(base),
        }
    }

    /// Processes of other mount namespaces that hold a copy of the volume's overlay.
    fn holders(&self, name: &VolumeName, vol: &VolumeDir) -> Result<Vec<Holder>, DriverError> {
        self.sys
            .overlay_holders(&vol.upper())
            .map_err(|source| DriverError::Inspect {
                name: name.clone(),
                source,
            })
    }

    fn refuse_if_held(&self, name: &VolumeName, vol: &VolumeDir) -> Result<(), DriverError> {
        match self.holders(name, vol)?.into_iter().next() {
            Some(holder) => Err(DriverError::HeldElsewhere {
                name: name.clone(),
                holder,
            }),
            None => Ok(()),
        }
    }
}

/// Whether a look for copies of the (unmounted) overlay in other mount namespaces is due:
/// overlayfs' `workdir/work` is there (see the module doc). When in doubt, yes.
fn look_due(vol: &VolumeDir) -> bool {
    !matches!(std::fs::symlink_metadata(vol.overlay_work()), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests;
