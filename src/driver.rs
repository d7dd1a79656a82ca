//! The volume driver: volume lifecycle, per-ID mount counts and the volatile discard.
//!
//! This is where every invariant of [`crate::store`] is kept. It is synchronous (the server
//! calls it on a thread that may block: a connection's own, or the blocking pool); it takes
//! validated [`VolumeName`]s and [`MountId`]s and never sees the wire format. Mounting goes
//! through the [`Sys`] trait.
//!
//! # State machine of one volume
//!
//! The kernel says whether the overlay is mounted at `mountpoint/` in our mount namespace; the
//! records in `activemounts/` say who uses it. They combine as follows:
//!
//! | kernel    | records                    | meaning and what Mount does                         |
//! |-----------|----------------------------|-----------------------------------------------------|
//! | mounted   | some                       | in use: count one more                              |
//! | mounted   | none                       | left by a crash after mount or before the unmount that follows the last Unmount, or a busy mountpoint: reuse; a volatile volume is unmounted and discarded first (refused while busy) |
//! | unmounted | none                       | idle: discard if volatile, mount; if the look for copies after the last unmount is still to be made (`workdir/work` is there, see below), refused while another mount namespace holds a copy of the overlay |
//! | unmounted | all from an earlier boot   | idle after a reboot: records are void               |
//! | unmounted | some from this boot (or Go)| unmounted here but perhaps still held in another mount namespace: refused while any process holds it, else the records are void |
//!
//! dockerd forgets its mounts when it restarts and never sends their Unmount. Each record
//! therefore names the process that asked for it (pid and start time, from the socket's peer
//! credentials); at a Mount, records whose process is gone are released when no other mount
//! namespace holds the overlay (with live-restore a running container still does, and keeps
//! them). Records with no known client are never released this way.
//!
//! Mount mounts *before* writing its record; the last Unmount deletes its record and leaves
//! the unmount for after its reply (below). A crash between the two steps of either always
//! leaves one of the rows above. A new mount ID's record is placed empty (one use) before the
//! reply, and its details (boot, client) are written after it, the volume locked until then
//! (`crate::after_answer`): a crash in between leaves a record that is true, only less
//! precise (a client not known is never released as gone). A volatile volume's changes are
//! discarded at the first Mount after the last Unmount, never at Unmount, so they can be
//! recovered in between; the discard renames the upper into the trash in constant time and
//! the [`Janitor`] deletes it.
//!
//! A copy of the overlay can outlive the last Unmount in another mount namespace, and that
//! upper must never get a second overlay. Looking for copies reads every mount namespace's
//! mount table, which costs more than the mount itself, so Mount does not: after the last
//! Unmount has replied, a background thread unmounts the overlay (which syncs the upper's file
//! system) and looks, with the volume still locked, and marks a volume found free by removing
//! overlayfs' `workdir/work` (see `driver/verify.rs`). A Mount or Remove of an unmounted
//! volume looks itself only while records or that mark say the look is still to be made.
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

use crate::after_answer;
use crate::janitor::Janitor;
use crate::names::{MountId, VolumeName};
use crate::options::{AllowedBases, OptionsError, VolumeOptions};
use crate::store::{self, Client, Metadata, MountRecord, Root, VolumeDir};
use crate::sys::{Holder, OverlaySpec, RealSys, Sys, SysError};

mod cache;
mod locked;
mod verify;
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
        "volume {name} already exists with other options (base {base:?}, volatile {volatile}); remove it first or use another name"
    )]
    Conflict {
        name: VolumeName,
        base: PathBuf,
        volatile: bool,
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
    /// Set when the volume's directory exists but its metadata cannot be read: the volume is
    /// still reported (dockerd forgets a volume on any `Get` error).
    pub error: Option<String>,
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
}

/// The driver. Cheap to open: it reads nothing per volume until asked about one.
pub struct Driver<S: Sys = RealSys> {
    root: Root,
    sys: Arc<S>,
    boot_id: String,
    janitor: OnceLock<Janitor>,
    /// Started at the first last Unmount; `None` if its thread could not be started.
    verifier: OnceLock<Option<verify::Verifier>>,
    /// Files made ahead of time to become mount records (refilled by the janitor).
    spares: Arc<store::Spares>,
    /// `metadata.json` of the volumes asked about, checked by one statx instead of read.
    metadata: cache::MetadataCache,
    /// Volumes whose `activemounts/` is known empty, checked by one statx instead of read.
    no_records: Arc<cache::NoRecords>,
    allowed_bases: AllowedBases,
}

impl Driver<RealSys> {
    /// Opens (creating if needed) the state root. Does no work proportional to the number of
    /// volumes: the service may be socket-activated for every request.
    pub fn open(config: DriverConfig) -> Result<Self, DriverError> {
        Ok(
            Self::with_sys(&config.root, RealSys::new(config.legacy_mount_api))?
                .with_allowed_bases(config.allowed_bases),
        )
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
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(root_err)?
            .trim()
            .to_owned();
        Ok(Self {
            root,
            sys: Arc::new(sys),
            boot_id,
            janitor: OnceLock::new(),
            verifier: OnceLock::new(),
            spares: Arc::default(),
            metadata: cache::MetadataCache::default(),
            no_records: Arc::default(),
            allowed_bases: AllowedBases::anywhere(),
        })
    }

    /// Restricts the bases Create accepts to `allowed` (see [`DriverConfig::allowed_bases`]).
    pub fn with_allowed_bases(mut self, allowed: AllowedBases) -> Self {
        self.allowed_bases = allowed;
        self
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
        match Janitor::start(self.root.clone(), self.spares.clone()) {
            Ok(j) => {
                let _ = self.janitor.set(j);
            }
            Err(e) => log::warn!("cannot start the trash deleter: {e}"),
        }
    }

    /// Asks the janitor for a pass, once the answer is out (`after_answer`): the wake-up of
    /// a thread on another CPU costs the waker tens of µs.
    fn kick_janitor(&self) {
        if let Some(j) = self.janitor.get() {
            let j = j.clone();
            after_answer::defer(move || j.kick());
        }
    }

    // ----- Create -----------------------------------------------------------------------

    pub fn create(
        &self,
        name: &VolumeName,
        options: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let opts = VolumeOptions::parse(options, self.root.path(), &self.allowed_bases).map_err(
            |source| DriverError::Options {
                name: name.clone(),
                source,
            },
        )?;
        let vol = self.root.volume(name);
        let io_err = |action| {
            move |source| DriverError::Io {
                name: name.clone(),
                action,
                source,
            }
        };
        if vol.path.exists() {
            return self.check_same_options(name, &vol, &opts);
        }

        let base_meta =
            std::fs::metadata(opts.base.path()).map_err(|source| DriverError::BaseGone {
                name: name.clone(),
                base: opts.base.path().to_owned(),
                source,
            })?;
        let staging = VolumeDir::at(self.root.staging_slot(name));
        let built = (|| -> io::Result<()> {
            std::fs::create_dir(&staging.path)?;
            failpoint!("create.staging-made");
            // Held until the rename, so the janitor never takes a staging directory in use.
            let staging_lock = std::fs::File::open(&staging.path)?;
            staging_lock.lock()?;
            for dir in [
                staging.work(),
                staging.mountpoint(),
                staging.active_mounts(),
            ] {
                std::fs::create_dir(dir)?;
            }
            // Made just now: empty (the rename below keeps its stamp).
            let no_records = store::FileStamp::of(&staging.active_mounts())?;
            staging.install_fresh_upper(&base_meta)?;
            failpoint!("create.upper-installed");
            staging.write_metadata(&Metadata {
                base: opts.base.path().to_owned(),
                volatile: opts.volatile,
                created_at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
            })?;
            failpoint!("create.metadata-written");
            std::fs::File::open(&staging.path)?.sync_all()?;
            failpoint!("create.before-rename");
            std::fs::rename(&staging.path, &vol.path)?;
            failpoint!("create.renamed");
            // Still locked: a Mount cannot have added a record yet.
            if let Some(stamp) = no_records {
                self.no_records.note(name, stamp);
            }
            std::fs::File::open(self.root.path())?.sync_all()
        })();
        match built {
            Ok(()) => {
                log::info!(
                    "created volume {name} (base {:?}, volatile {})",
                    opts.base.path(),
                    opts.volatile
                );
                Ok(())
            }
            Err(e) => {
                if std::fs::rename(&staging.path, self.root.trash_slot("staging")).is_ok() {
                    self.kick_janitor();
                }
                // Lost a race with a concurrent Create of the same name.
                let raced = matches!(e.raw_os_error(), Some(39 /* ENOTEMPTY */ | 17 /* EEXIST */));
                if raced && vol.path.exists() {
                    self.check_same_options(name, &vol, &opts)
                } else {
                    Err(io_err("creating the volume directory")(e))
                }
            }
        }
    }

    fn check_same_options(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        opts: &VolumeOptions,
    ) -> Result<(), DriverError> {
        let meta = self.read_metadata(name, vol)?;
        // Go-created volumes store the base as given; compare canonical forms.
        let stored = std::fs::canonicalize(&meta.base).unwrap_or(meta.base.clone());
        if stored == opts.base.path() && meta.volatile == opts.volatile {
            Ok(())
        } else {
            Err(DriverError::Conflict {
                name: name.clone(),
                base: meta.base,
                volatile: meta.volatile,
            })
        }
    }

    /// `metadata.json`, from memory while it is unchanged (`driver/cache.rs`).
    fn read_metadata(&self, name: &VolumeName, vol: &VolumeDir) -> Result<Metadata, DriverError> {
        self.metadata
            .read(name, vol)
            .map_err(|source| DriverError::Io {
                name: name.clone(),
                action: "reading metadata.json",
                source,
            })
    }

    // ----- Mount ------------------------------------------------------------------------

    /// Mounts the volume for mount ID `id` (or counts one more use of it). `client_pid` is the
    /// pid of the process that asked, from the socket's peer credentials: dockerd forgets its
    /// mounts when it restarts, so mounts asked for by a process that is gone are released once
    /// no mount namespace holds the overlay any more.
    pub fn mount(
        &self,
        name: &VolumeName,
        id: &MountId,
        client_pid: Option<u32>,
    ) -> Result<PathBuf, DriverError> {
        self.mount_as(name, id, self.client(client_pid))
    }

    /// The process `pid` as a mount record names it (pid and start time); `None` when there is
    /// no such process (or no pid). The server asks once per connection.
    pub fn client(&self, pid: Option<u32>) -> Option<Client> {
        let pid = pid?;
        self.sys
            .process_start_time(pid)
            .map(|start_time| Client { pid, start_time })
    }

    /// [`Driver::mount`] for a client already identified with [`Driver::client`].
    pub fn mount_as(
        &self,
        name: &VolumeName,
        id: &MountId,
        client: Option<Client>,
    ) -> Result<PathBuf, DriverError> {
        let (vol, lock) = self.lock(name)?;
        let meta = self.read_metadata(name, &vol)?;
        let mountpoint = vol.mountpoint();
        let mut mounted = self.is_mounted(name, &mountpoint)?;
        let (mut records, strays) = if !mounted && self.no_records.still_empty(name, &vol) {
            (Vec::new(), false)
        } else {
            vol.read_records_and_strays()
                .map_err(|source| DriverError::Io {
                    name: name.clone(),
                    action: "reading mount records",
                    source,
                })?
        };

        if !mounted {
            // Also without records: the last Unmount here leaves any copy of the overlay in
            // another mount namespace alive, and that upper must not get a second overlay.
            self.void_records_unless_held(name, &vol, &records, strays)?;
            records.clear();
            failpoint!("mount.voided");
        }
        if mounted && !records.is_empty() {
            records = self.release_orphaned(name, &vol, records)?;
        }
        if mounted && records.is_empty() && meta.volatile {
            // An overlay nobody is on record for may carry a dead user's changes: start over,
            // unless a copy of it in another mount namespace still uses them.
            self.refuse_if_held(name, &vol)?;
            self.unmount_overlay(name, &mountpoint)?;
            mounted = false;
            failpoint!("mount.stale-unmounted");
        }
        let fresh = !mounted;
        let previous = records.iter().find(|(rid, _)| rid == id).map(|(_, r)| r);
        let new_id = previous.is_none();
        let uses = previous.map_or(0, |r| r.usage_count) + 1;
        let record = MountRecord {
            usage_count: uses,
            boot_id: Some(self.boot_id.clone()),
            client: client.or(previous.and_then(|r| r.client)),
        };
        let record_err = |source| DriverError::Io {
            name: name.clone(),
            action: "recording the mount",
            source,
        };
        // Whether changes went to the trash: the janitor starts on them once this Mount is
        // done, not while it runs (deleting a large upper competes for the disk's journal).
        let mut discarded = false;
        let recorded = if mounted {
            self.record_mount(name, &vol, &lock, id, &record, new_id)
                .map_err(record_err)
        } else {
            // A volatile volume's upper is looked at first (its changes go now). Otherwise
            // the directories are made only when the mount misses one (a damaged or Go-made
            // volume): they are nearly always there.
            if meta.volatile {
                discarded = self.prepare_layers(name, &vol, &meta)?;
            }
            let spec = self.overlay_spec(name, &vol, &meta, &lock);
            let mounted = match self.sys.mount_overlay(&spec) {
                Err(e) if !meta.volatile && e.is_not_found() => {
                    self.prepare_layers(name, &vol, &meta)?;
                    self.sys.mount_overlay(&spec)
                }
                result => result,
            };
            if let Err(source) = mounted {
                if discarded {
                    self.kick_janitor();
                }
                return Err(DriverError::Mount {
                    name: name.clone(),
                    source,
                });
            }
            failpoint!("mount.overlay-mounted");
            self.record_mount(name, &vol, &lock, id, &record, new_id)
                .map_err(record_err)
        };
        if let Err(err) = recorded {
            // The state directory is full or read-only. dockerd gets the error and will never
            // send an Unmount: an overlay just mounted for this Mount goes again.
            if fresh {
                match self.unmount_overlay(name, &mountpoint) {
                    Ok(()) => {
                        log::info!("unmounted volume {name} again: its mount is not recorded")
                    }
                    Err(e) => log::warn!("{}", crate::error_chain(&e)),
                }
            }
            return Err(err);
        }
        log::debug!("volume {name}: mount ID {id} now used {uses} times");
        failpoint!("mount.recorded");
        // Deferred work runs in this order: the unlock first, the wake-up and the line after.
        if new_id {
            // The record says one use already; which boot and client it is can wait for the
            // answer to be out, but not for the lock to be free.
            let (name, id) = (name.clone(), id.clone());
            after_answer::defer(move || {
                if let Err(e) = vol.write_record_details(&id, &record) {
                    log::warn!("volume {name}: cannot complete the record of mount ID {id}: {e}");
                }
                drop(lock);
            });
        }
        if discarded {
            self.kick_janitor();
        }
        if fresh {
            // Formatting a line costs a request some µs: done after the answer.
            let (vol_name, at) = (name.clone(), mountpoint.clone());
            after_answer::defer(move || log::info!("mounted volume {vol_name} at {at:?}"));
        }
        Ok(mountpoint)
    }

    /// Records the mount `id` now used as `record` says: a new mount ID as an empty record
    /// (one use; the caller writes its details), a known one by replacing its record.
    fn record_mount(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        lock: &store::VolumeLock,
        id: &MountId,
        record: &MountRecord,
        new_id: bool,
    ) -> io::Result<()> {
        if !new_id {
            return self.write_record(name, vol, id, record);
        }
        self.no_records.forget(name);
        lock.ensure_space()?;
        let result = vol.place_empty_record(id, &self.spares);
        self.want_spares_if_low();
        result
    }

    /// Writes a mount record, from a spare file if one is ready (`store::Spares`); asks the
    /// janitor for more when they run low.
    fn write_record(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        id: &MountId,
        record: &MountRecord,
    ) -> io::Result<()> {
        self.no_records.forget(name);
        let result = vol.write_record_using(id, record, &self.spares);
        self.want_spares_if_low();
        result
    }

    /// Asks the janitor for spares (once the answer is out) when half of them are used.
    fn want_spares_if_low(&self) {
        if self.spares.ready() <= store::Spares::TARGET / 2
            && let Some(j) = self.janitor.get()
        {
            let j = j.clone();
            after_answer::defer(move || j.want_spares());
        }
    }

    /// Releases the records whose client process is gone, provided no other mount namespace
    /// holds the overlay (a container that outlived its dockerd, as with live-restore, keeps
    /// them all: holders cannot be told apart). Records with no known client are kept.
    /// Returns the records that remain.
    fn release_orphaned(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        records: Vec<(MountId, MountRecord)>,
    ) -> Result<Vec<(MountId, MountRecord)>, DriverError> {
        let gone = |r: &MountRecord| {
            r.client
                .is_some_and(|c| self.sys.process_start_time(c.pid) != Some(c.start_time))
        };
        if !records.iter().any(|(_, r)| gone(r)) {
            return Ok(records);
        }
        let holders =
            self.sys
                .overlay_holders(&vol.upper())
                .map_err(|source| DriverError::Inspect {
                    name: name.clone(),
                    source,
                })?;
        if let Some(holder) = holders.first() {
            log::debug!("volume {name}: keeping mounts of gone clients, {holder} holds it");
            return Ok(records);
        }
        let (orphaned, live): (Vec<_>, Vec<_>) = records.into_iter().partition(|(_, r)| gone(r));
        for (id, record) in &orphaned {
            vol.delete_record(id).map_err(|source| DriverError::Io {
                name: name.clone(),
                action: "releasing an orphaned mount",
                source,
            })?;
            let pid = record.client.map_or(0, |c| c.pid);
            log::info!(
                "volume {name}: released mount ID {id}: its client (pid {pid}) is gone and no container holds the volume"
            );
        }
        Ok(live)
    }

    /// Called when the overlay is not mounted here: refused while the overlay lives on in
    /// another mount namespace (which must never get a second overlay on the same upper), else
    /// the records, if any, are void (and cleared with any temporary beside them). Records all
    /// from an earlier boot need no look, and no records need none once the last Unmount's
    /// look found no copy (`driver/verify.rs`).
    fn void_records_unless_held(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        records: &[(MountId, MountRecord)],
        strays: bool,
    ) -> Result<(), DriverError> {
        let all_from_earlier_boot = !records.is_empty()
            && records
                .iter()
                .all(|(_, r)| r.boot_id.as_deref().is_some_and(|b| b != self.boot_id));
        let look = if records.is_empty() {
            look_still_to_be_made(vol)
        } else {
            !all_from_earlier_boot
        };
        if look {
            self.refuse_if_held(name, vol)?;
        }
        if !records.is_empty() {
            log::info!(
                "volume {name}: voiding {} stale mount record(s) of an overlay that is no longer mounted",
                records.len()
            );
        }
        if records.is_empty() && !strays {
            return Ok(());
        }
        // Also without records: a record write cut short by a crash leaves its temporary in
        // `activemounts/`, and nothing else would ever delete it.
        vol.clear_records().map_err(|source| DriverError::Io {
            name: name.clone(),
            action: "clearing stale mount records",
            source,
        })
    }

    fn refuse_if_held(&self, name: &VolumeName, vol: &VolumeDir) -> Result<(), DriverError> {
        let holders =
            self.sys
                .overlay_holders(&vol.upper())
                .map_err(|source| DriverError::Inspect {
                    name: name.clone(),
                    source,
                })?;
        match holders.into_iter().next() {
            Some(holder) => Err(DriverError::HeldElsewhere {
                name: name.clone(),
                holder,
            }),
            None => Ok(()),
        }
    }

    /// Makes sure upper, work and mountpoint exist before a mount, discarding the upper of a
    /// volatile volume: then `true`, and the caller kicks the janitor.
    fn prepare_layers(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
    ) -> Result<bool, DriverError> {
        let io_err = |action| {
            move |source| DriverError::Io {
                name: name.clone(),
                action,
                source,
            }
        };
        let base = self.base_metadata(name, meta)?;
        let upper = vol.upper();
        let upper_exists = upper.exists();
        let mut discarded = false;
        if meta.volatile
            && upper_exists
            && holds_entries(&upper).map_err(io_err("reading the upper directory"))?
        {
            self.discard_upper(name, vol, &base)?;
            log::info!("discarded the changes of volatile volume {name}");
            discarded = true;
        } else if !upper_exists {
            if !meta.volatile {
                log::warn!("volume {name} had no upper directory; starting with no changes");
            }
            vol.install_fresh_upper(&base)
                .map_err(io_err("creating the upper directory"))?;
        }
        for dir in [vol.work(), vol.mountpoint()] {
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_err("creating the work directories")(e));
                }
                _ => {}
            }
        }
        Ok(discarded)
    }

    fn overlay_spec(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
        lock: &store::VolumeLock,
    ) -> OverlaySpec {
        OverlaySpec {
            source: format!("docker-on-top:{name}"),
            lower: meta.base.clone(),
            upper: vol.upper(),
            work: vol.work(),
            target: vol.mountpoint(),
            // Learnt by the lock's stat: the sys layer need not ask for it.
            work_dev: Some(lock.dev()),
        }
    }

    // ----- Unmount ----------------------------------------------------------------------

    pub fn unmount(&self, name: &VolumeName, id: &MountId) -> Result<(), DriverError> {
        let (vol, lock) = self.lock(name)?;
        let records = self.read_records(name, &vol)?;
        let Some((_, record)) = records.iter().find(|(rid, _)| rid == id) else {
            return Err(DriverError::UnknownMountId {
                name: name.clone(),
                id: id.clone(),
            });
        };
        let io_err = |action| {
            move |source| DriverError::Io {
                name: name.clone(),
                action,
                source,
            }
        };
        if record.usage_count > 1 {
            let left = record.usage_count - 1;
            self.write_record(
                name,
                &vol,
                id,
                &MountRecord {
                    usage_count: left,
                    client: record.client,
                    boot_id: Some(self.boot_id.clone()),
                },
            )
            .map_err(io_err("recording the unmount"))?;
            log::debug!("volume {name}: mount ID {id} now used {left} times");
            failpoint!("unmount.decremented");
            return Ok(());
        }
        // The last record goes first, then the overlay, after the reply (see
        // `driver/verify.rs`): dockerd does not wait for the unmount, which syncs the upper's
        // file system, and nothing can mount the volume before it is done.
        let mountpoint = vol.mountpoint();
        let last_here = records.len() == 1 && self.is_mounted(name, &mountpoint)?;
        if !last_here {
            vol.delete_record(id)
                .map_err(io_err("deleting the mount record"))?;
            log::debug!("volume {name}: mount ID {id} released");
            failpoint!("unmount.released");
            return Ok(());
        }
        // The last record is renamed into the trash, to be deleted after the reply: deleting
        // a file whose data is on disk costs some 0.1 ms on ext4, five times the rename.
        let slot = self.root.trash_slot("record");
        let (trashed, result) = match std::fs::rename(vol.record(id), &slot) {
            Ok(()) => (Some(slot), Ok(())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Ok(())),
            // A read-only or damaged state directory: the overlay goes all the same (dockerd
            // never repeats an Unmount), and the next Mount finds the record void.
            Err(e) => (None, Err(io_err("deleting the mount record")(e))),
        };
        log::debug!("volume {name}: mount ID {id} released");
        failpoint!("unmount.released");
        self.unmount_later(verify::Job {
            name: name.clone(),
            vol,
            lock,
            trashed,
            no_records: self.no_records.clone(),
        });
        result
    }

    /// Hands a volume whose last record is gone, still locked and mounted here, to the thread
    /// that unmounts it and looks for copies of its overlay elsewhere (`driver/verify.rs`);
    /// does that at once if the thread cannot run.
    fn unmount_later(&self, job: verify::Job) {
        let verifier = self.verifier.get_or_init(|| {
            verify::Verifier::start(self.sys.clone())
                .inspect_err(|e| log::warn!("cannot start the thread that unmounts: {e}"))
                .ok()
        });
        let job = match verifier {
            Some(v) => match v.submit(job) {
                Ok(()) => return,
                Err(job) => job,
            },
            None => job,
        };
        drop(verify::finish(&*self.sys, vec![job]));
    }

    /// Waits until the unmount a last Unmount left for after its reply is done for `name`
    /// (not the look for copies that follows it: a Mount or Remove waits for that, on the
    /// volume's lock). Queries call it so that they never report a volume as mounted that no
    /// container uses any more.
    pub fn settle(&self, name: &VolumeName) {
        if let Some(Some(v)) = self.verifier.get() {
            v.wait_unmounted(name);
        }
    }

    // ----- Remove -----------------------------------------------------------------------

    pub fn remove(&self, name: &VolumeName) -> Result<(), DriverError> {
        let Some((vol, _lock)) = self.try_lock(name)? else {
            // No such volume (any more): nothing of it is to be kept either.
            self.metadata.forget(name);
            self.no_records.forget(name);
            return Ok(());
        };
        let mountpoint = vol.mountpoint();
        let mounted = self.is_mounted(name, &mountpoint)?;
        // dockerd sends Remove only when none of its containers uses the volume, so records
        // are leftovers; but the overlay may live on elsewhere, also after the last Unmount
        // here (the janitor would delete the upper under it), unless that Unmount's look
        // found no copy.
        if mounted || look_still_to_be_made(&vol) || !self.read_records(name, &vol)?.is_empty() {
            self.refuse_if_held(name, &vol)?;
        }
        if mounted {
            self.unmount_overlay(name, &mountpoint)?;
            log::info!("unmounted leftover mount of volume {name}");
            failpoint!("remove.unmounted");
        }
        std::fs::rename(&vol.path, self.root.trash_slot(name.as_str())).map_err(|source| {
            DriverError::Io {
                name: name.clone(),
                action: "removing the volume directory",
                source,
            }
        })?;
        self.metadata.forget(name);
        self.no_records.forget(name);
        log::info!("removed volume {name}");
        failpoint!("remove.renamed");
        self.kick_janitor();
        Ok(())
    }

    // ----- Queries ----------------------------------------------------------------------

    /// The mountpoint while mounted, `None` while not; an error for an unknown volume.
    pub fn path(&self, name: &VolumeName) -> Result<Option<PathBuf>, DriverError> {
        self.settle(name);
        let vol = self.existing(name)?;
        let mountpoint = vol.mountpoint();
        Ok(self.is_mounted(name, &mountpoint)?.then_some(mountpoint))
    }

    pub fn get(&self, name: &VolumeName) -> Result<VolumeInfo, DriverError> {
        // Only a missing directory is an error: dockerd forgets a volume on any Get error, so
        // every other failure is reported inside the answer.
        self.settle(name);
        let vol = self.existing(name)?;
        let mountpoint = vol.mountpoint();
        let mut errors = Vec::new();
        let mounted = self.is_mounted(name, &mountpoint).unwrap_or_else(|e| {
            errors.push(crate::error_chain(&e));
            false
        });
        let meta = self
            .metadata
            .read(name, &vol)
            .map_err(|e| errors.push(format!("cannot read metadata.json: {e}")))
            .ok();
        let active_mounts = if mounted {
            match self.read_records(name, &vol) {
                Ok(records) => records.iter().map(|(_, r)| r.usage_count).sum(),
                Err(e) => {
                    errors.push(crate::error_chain(&e));
                    0
                }
            }
        } else {
            0
        };
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        let created_at = meta
            .as_ref()
            .and_then(|m| m.created_at.as_deref())
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
            .or_else(|| {
                std::fs::metadata(vol.metadata())
                    .and_then(|m| m.modified())
                    .ok()
            })
            .or_else(|| std::fs::metadata(&vol.path).and_then(|m| m.modified()).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(VolumeInfo {
            name: name.clone(),
            mountpoint: mounted.then_some(mountpoint),
            created_at,
            base: meta.as_ref().map(|m| m.base.clone()),
            volatile: meta.as_ref().map(|m| m.volatile),
            mounted,
            active_mounts,
            upper: vol.upper(),
            error,
        })
    }

    /// Names of all volumes, sorted. Reads only the root directory.
    pub fn list(&self) -> Result<Vec<VolumeName>, DriverError> {
        let root_err = |source| DriverError::Root {
            root: self.root.path().to_owned(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.root.path()).map_err(root_err)? {
            let entry = entry.map_err(root_err)?;
            if !entry.file_type().map_err(root_err)?.is_dir() {
                continue;
            }
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|s| VolumeName::parse(s).ok())
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    // ----- Helpers ----------------------------------------------------------------------

    fn existing(&self, name: &VolumeName) -> Result<VolumeDir, DriverError> {
        let vol = self.root.volume(name);
        match std::fs::symlink_metadata(&vol.path) {
            Ok(m) if m.is_dir() => Ok(vol),
            Ok(_) => Err(DriverError::NoSuchVolume(name.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DriverError::NoSuchVolume(name.clone()))
            }
            Err(source) => Err(DriverError::Io {
                name: name.clone(),
                action: "looking up the volume",
                source,
            }),
        }
    }

    fn try_lock(
        &self,
        name: &VolumeName,
    ) -> Result<Option<(VolumeDir, store::VolumeLock)>, DriverError> {
        let vol = self.root.volume(name);
        let lock = store::lock_volume(&vol.path).map_err(|source| DriverError::Io {
            name: name.clone(),
            action: "locking the volume",
            source,
        })?;
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
        vol.read_records().map_err(|source| DriverError::Io {
            name: name.clone(),
            action: "reading mount records",
            source,
        })
    }

    /// Unmounts the overlay at `mountpoint` (never lazily: a busy mountpoint stays mounted).
    fn unmount_overlay(&self, name: &VolumeName, mountpoint: &Path) -> Result<(), DriverError> {
        self.sys.unmount(mountpoint).map_err(|e| match e {
            SysError::Busy => DriverError::Busy {
                name: name.clone(),
                mountpoint: mountpoint.to_owned(),
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
}

/// Whether a look for copies of the (unmounted) overlay in other mount namespaces is still to
/// be made: overlayfs' `workdir/work` is there (see `driver/verify.rs`). When in doubt, yes.
fn look_still_to_be_made(vol: &VolumeDir) -> bool {
    !matches!(std::fs::symlink_metadata(vol.overlay_work()), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// Whether the directory at `path` (an upper) has entries, read only when its stat cannot
/// tell. One with subdirectories has a link count above 2; one whose size grew beyond a block
/// held more than a few entries (ext4, xfs and tmpfs grow a directory's size with its entries;
/// ext4 never shrinks it, so an upper emptied by hand may be taken as holding some: then it is
/// discarded, which costs a Mount a rename and an empty directory, nothing else). Reading the
/// first entry of a large ext4 directory reads and sorts a block of its hashed entries, and
/// what is not in memory after a large upper was made comes from the disk: in a Mount that
/// discarded a million files, 300 to 600 µs, most of its own time.
fn holds_entries(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.nlink() > 2 || meta.size() > meta.blksize() {
        return Ok(true);
    }
    is_empty_dir(path).map(|empty| !empty)
}

/// Whether the directory at `path` has no entries. Reads only its first few, with a small
/// buffer: an upper of a million files costs what an empty one does.
fn is_empty_dir(path: &Path) -> io::Result<bool> {
    use rustix::fs::{OFlags, RawDir};
    let dir = store::open_noatime(rustix::fs::CWD, path, OFlags::DIRECTORY)?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
    let mut entries = RawDir::new(&dir, &mut buf);
    while let Some(entry) = entries.next() {
        if !matches!(entry?.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::RecordingSys;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    struct Fixture {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        driver: Driver<RecordingSys>,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir(&base).unwrap();
        std::fs::write(base.join("f"), "base").unwrap();
        let driver = Driver::with_sys(&tmp.path().join("root"), RecordingSys::default()).unwrap();
        Fixture {
            _tmp: tmp,
            base,
            driver,
        }
    }

    fn name(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }
    fn id(s: &str) -> MountId {
        MountId::parse(s).unwrap()
    }

    impl Fixture {
        fn create(&self, vol: &str, volatile: bool) {
            let mut o = BTreeMap::new();
            o.insert("base".to_string(), self.base.to_str().unwrap().to_string());
            o.insert("volatile".to_string(), volatile.to_string());
            self.driver.create(&name(vol), &o).unwrap();
        }
        /// Unmount, and the work it leaves for after its reply (the unmount, then the look,
        /// which ends when the volume's lock is free).
        fn unmount(&self, vol: &VolumeName, mount: &MountId) -> Result<(), DriverError> {
            let result = self.driver.unmount(vol, mount);
            self.driver.settle(vol);
            drop(self.driver.lock_volume(vol));
            result
        }
        fn calls(&self) -> Vec<String> {
            let s = self.driver.sys().state.lock().unwrap();
            s.calls
                .iter()
                .map(|c| c.split(' ').next().unwrap().to_string())
                .collect()
        }
        /// Makes another mount namespace hold a copy of `vol`'s overlay.
        fn hold(&self, vol: &str) {
            let upper = self.vol(vol).upper();
            self.driver.sys().state.lock().unwrap().held.insert(upper);
        }
        fn vol(&self, vol: &str) -> VolumeDir {
            self.driver.root().volume(&name(vol))
        }
        fn count(&self, vol: &str, mount: &str) -> Option<u64> {
            self.vol(vol)
                .read_records()
                .unwrap()
                .into_iter()
                .find(|(i, _)| i.as_str() == mount)
                .map(|(_, r)| r.usage_count)
        }
    }

    #[test]
    fn create_is_idempotent_and_refuses_other_options() {
        let f = fixture();
        f.create("v", false);
        f.create("v", false);
        let mut o = BTreeMap::new();
        o.insert("base".into(), f.base.to_str().unwrap().into());
        o.insert("volatile".into(), "yes".into());
        let err = f.driver.create(&name("v"), &o).unwrap_err();
        assert!(matches!(err, DriverError::Conflict { .. }), "{err}");
        assert_eq!(f.driver.list().unwrap(), vec![name("v")]);
        let meta = f.vol("v").read_metadata().unwrap();
        assert_eq!(meta.base, std::fs::canonicalize(&f.base).unwrap());
        assert!(meta.created_at.is_some());
    }

    #[test]
    fn bad_options_leave_nothing_on_disk() {
        let f = fixture();
        let mut o = BTreeMap::new();
        o.insert("base".into(), "relative".into());
        assert!(matches!(
            f.driver.create(&name("v"), &o),
            Err(DriverError::Options { .. })
        ));
        let entries: Vec<_> = std::fs::read_dir(f.driver.root().path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from(".trash")]);
    }

    #[test]
    fn counts_per_id_and_mounts_once() {
        let f = fixture();
        f.create("v", false);
        let mp = f.driver.mount(&name("v"), &id("a"), None).unwrap();
        assert_eq!(mp, f.vol("v").mountpoint());
        f.driver.mount(&name("v"), &id("a"), None).unwrap(); // docker cp: same ID again
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        assert_eq!(f.count("v", "a"), Some(2));
        assert_eq!(f.calls(), vec!["mount"]);
        assert_eq!(f.driver.get(&name("v")).unwrap().active_mounts, 3);

        f.unmount(&name("v"), &id("a")).unwrap();
        f.unmount(&name("v"), &id("a")).unwrap();
        assert_eq!(f.count("v", "a"), None);
        assert_eq!(f.calls(), vec!["mount"], "unmounted while b uses it");
        assert!(f.driver.path(&name("v")).unwrap().is_some());
        f.unmount(&name("v"), &id("b")).unwrap();
        assert_eq!(f.calls(), vec!["mount", "unmount"]);
        assert_eq!(f.driver.path(&name("v")).unwrap(), None);
        let err = f.unmount(&name("v"), &id("b")).unwrap_err();
        assert_eq!(err.to_string(), "volume v has no mount with ID b");
    }

    #[test]
    fn a_new_mount_ids_details_follow_the_answer_under_the_lock() {
        let f = fixture();
        f.create("v", false);
        let deferral = crate::after_answer::Deferral::begin();
        // A live client, whose record is not released as an orphan's.
        f.driver.sys().state.lock().unwrap().processes.insert(7, 9);
        let client = f.driver.client(Some(7));
        f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
        assert!(deferral.end(), "nothing left for after the answer");
        let record = std::fs::read(f.vol("v").record(&id("a"))).unwrap();
        assert_eq!(record, b"", "details written before the answer");
        assert_eq!(f.count("v", "a"), Some(1), "an empty record is one use");
        let other = std::fs::File::open(f.vol("v").path.clone()).unwrap();
        assert!(
            other.try_lock().is_err(),
            "the volume was unlocked before the record was complete"
        );
        crate::after_answer::run_pending();
        other.try_lock().unwrap();
        drop(other);
        let records = f.vol("v").read_records().unwrap();
        assert_eq!(records[0].1.client, client);
        assert_eq!(records[0].1.boot_id.as_deref(), Some(&*f.driver.boot_id));

        // A known mount ID: its count is written before the answer.
        let deferral = crate::after_answer::Deferral::begin();
        f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
        deferral.end();
        assert_eq!(f.count("v", "a"), Some(2));
        crate::after_answer::run_pending();
    }

    #[test]
    fn records_are_read_unless_known_empty_and_unchanged() {
        let f = fixture();
        f.create("v", false);
        let v = name("v");
        assert!(f.driver.no_records.still_empty(&v, &f.vol("v")), "Create");
        // A record the overlay outlived (a daemon killed, the overlay unmounted by hand),
        // made by another process: the stamp changes, the Mount reads and voids it.
        let vol = f.vol("v");
        std::fs::write(vol.record(&id("stale")), r#"{"UsageCount":3}"#).unwrap();
        f.driver.mount(&v, &id("a"), None).unwrap();
        assert_eq!(f.count("v", "stale"), None, "a stale record was kept");
        assert_eq!(f.count("v", "a"), Some(1));
        assert!(!f.driver.no_records.still_empty(&v, &vol), "records now");
        // The last Unmount, once its look found no copy, notes the directory empty again.
        f.unmount(&v, &id("a")).unwrap();
        assert!(f.driver.no_records.still_empty(&v, &vol), "last Unmount");
        f.driver.remove(&v).unwrap();
        assert!(!f.driver.no_records.still_empty(&v, &vol), "Remove");
    }

    #[test]
    fn an_upper_holds_entries_as_its_stat_or_its_first_entry_says() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("upper");
        std::fs::create_dir(&dir).unwrap();
        assert!(!holds_entries(&dir).unwrap(), "empty");
        std::fs::write(dir.join("f"), "").unwrap();
        assert!(holds_entries(&dir).unwrap(), "a file (read)");
        std::fs::remove_file(dir.join("f")).unwrap();
        std::fs::create_dir(dir.join("d")).unwrap();
        assert!(holds_entries(&dir).unwrap(), "a subdirectory (link count)");
        std::fs::remove_dir(dir.join("d")).unwrap();
        for i in 0..500 {
            std::fs::write(dir.join(format!("file-with-a-longer-name-{i}")), "").unwrap();
        }
        assert!(holds_entries(&dir).unwrap(), "many files");
    }

    #[test]
    fn unknown_volume_errors() {
        let f = fixture();
        for err in [
            f.driver.mount(&name("nope"), &id("a"), None).unwrap_err(),
            f.unmount(&name("nope"), &id("a")).unwrap_err(),
            f.driver.path(&name("nope")).unwrap_err(),
            f.driver.get(&name("nope")).unwrap_err(),
        ] {
            assert_eq!(err.to_string(), "volume nope does not exist");
        }
        f.driver.remove(&name("nope")).unwrap();
    }

    #[test]
    fn volatile_changes_survive_unmount_and_go_at_next_mount() {
        let f = fixture();
        f.create("v", true);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        std::fs::write(f.vol("v").upper().join("scratch"), "x").unwrap();
        f.unmount(&name("v"), &id("a")).unwrap();
        assert!(
            f.vol("v").upper().join("scratch").exists(),
            "discarded at unmount"
        );
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        assert!(
            !f.vol("v").upper().join("scratch").exists(),
            "not discarded"
        );
        let trash: Vec<_> = std::fs::read_dir(f.driver.root().trash())
            .unwrap()
            .collect();
        assert_eq!(trash.len(), 1, "old upper moved to the trash");
        crate::janitor::sweep(f.driver.root());
        assert_eq!(
            std::fs::read_dir(f.driver.root().trash()).unwrap().count(),
            0
        );
    }

    #[test]
    fn persistent_changes_stay() {
        let f = fixture();
        f.create("v", false);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        std::fs::write(f.vol("v").upper().join("kept"), "x").unwrap();
        f.unmount(&name("v"), &id("a")).unwrap();
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        assert!(f.vol("v").upper().join("kept").exists());
    }

    #[test]
    fn upper_root_takes_the_base_owner_and_mode_also_after_discard() {
        let f = fixture();
        std::os::unix::fs::chown(&f.base, Some(1000), Some(1001)).unwrap();
        std::fs::set_permissions(&f.base, std::fs::Permissions::from_mode(0o2770)).unwrap();
        f.create("v", true);
        let check = || {
            let m = std::fs::metadata(f.vol("v").upper()).unwrap();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o2770));
        };
        check();
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        std::fs::write(f.vol("v").upper().join("x"), "x").unwrap();
        f.unmount(&name("v"), &id("a")).unwrap();
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        check();
    }

    #[test]
    fn records_of_an_earlier_boot_are_void() {
        let f = fixture();
        f.create("v", true);
        std::fs::write(f.vol("v").upper().join("old"), "x").unwrap();
        f.vol("v")
            .write_record(
                &id("old"),
                &MountRecord {
                    usage_count: 1,
                    boot_id: Some("other".into()),
                    client: None,
                },
            )
            .unwrap();
        // Held elsewhere would refuse; an earlier boot's records need no look.
        f.hold("v");
        f.driver.mount(&name("v"), &id("new"), None).unwrap();
        assert_eq!(f.count("v", "old"), None);
        assert_eq!(f.count("v", "new"), Some(1));
        assert!(
            !f.vol("v").upper().join("old").exists(),
            "volatile not discarded"
        );
    }

    #[test]
    fn records_of_this_boot_without_a_mount_are_checked_for_holders() {
        let f = fixture();
        f.create("v", false);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        // Someone unmounted it here while a container elsewhere still holds it.
        f.driver.sys().state.lock().unwrap().mounted.clear();
        f.hold("v");
        let err = f.driver.mount(&name("v"), &id("b"), None).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        assert_eq!(f.calls(), vec!["mount"], "second overlay on one upper");
        let err = f.driver.remove(&name("v")).unwrap_err();
        assert!(err.to_string().contains("pid 4242"), "{err}");
        assert!(f.vol("v").path.exists());
        // Once the holder is gone, the records are void.
        f.driver.sys().state.lock().unwrap().held.clear();
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        assert_eq!(f.count("v", "a"), None);
    }

    #[test]
    fn a_copy_held_elsewhere_after_the_last_unmount_refuses_mount_and_remove() {
        let f = fixture();
        f.create("v", true);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        std::fs::write(f.vol("v").upper().join("in-use"), "x").unwrap();
        // The last Unmount here leaves a copy of the overlay in another mount namespace (made
        // while it was mounted: once no namespace has it, none can copy it).
        f.hold("v");
        f.unmount(&name("v"), &id("a")).unwrap();
        let err = f.driver.mount(&name("v"), &id("b"), None).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        let err = f.driver.remove(&name("v")).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        assert_eq!(
            f.calls(),
            vec!["mount", "unmount"],
            "second overlay on one upper"
        );
        assert!(
            f.vol("v").upper().join("in-use").exists(),
            "held upper discarded"
        );

        // A volatile overlay left with no records is not discarded while held either.
        f.driver.sys().state.lock().unwrap().held.clear();
        f.driver.mount(&name("v"), &id("c"), None).unwrap();
        f.vol("v").clear_records().unwrap();
        std::fs::write(f.vol("v").upper().join("in-use"), "x").unwrap();
        f.hold("v");
        let err = f.driver.mount(&name("v"), &id("d"), None).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        assert!(
            f.vol("v").upper().join("in-use").exists(),
            "held upper discarded"
        );
        assert_eq!(f.calls(), vec!["mount", "unmount", "mount"]);

        f.driver.sys().state.lock().unwrap().held.clear();
        f.driver.remove(&name("v")).unwrap();
        assert!(!f.vol("v").path.exists());
    }

    #[test]
    fn the_last_unmount_looks_for_copies_so_that_mount_and_remove_need_not() {
        let f = fixture();
        f.create("v", false);
        let looks = || f.driver.sys().state.lock().unwrap().looks;
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        assert_eq!(looks(), 0, "the first Mount of a new volume looked");
        assert!(f.vol("v").overlay_work().exists());
        f.unmount(&name("v"), &id("a")).unwrap();
        // The look runs in the background, with the volume locked.
        drop(f.driver.lock_volume(&name("v")).unwrap());
        assert_eq!(looks(), 1);
        assert!(
            !f.vol("v").overlay_work().exists(),
            "mark left after a clean look"
        );
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        f.unmount(&name("v"), &id("b")).unwrap();
        f.driver.remove(&name("v")).unwrap();
        assert_eq!(looks(), 2, "Mount or Remove looked again");

        // The look never ran (a crash after the unmount): the next Mount looks itself.
        f.create("w", false);
        std::fs::create_dir(f.vol("w").overlay_work()).unwrap();
        f.hold("w");
        let err = f.driver.mount(&name("w"), &id("a"), None).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        let err = f.driver.remove(&name("w")).unwrap_err();
        assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
        f.driver.sys().state.lock().unwrap().held.clear();
        f.driver.mount(&name("w"), &id("a"), None).unwrap();
        assert_eq!(
            f.calls(),
            vec!["mount", "unmount", "mount", "unmount", "mount"]
        );
    }

    #[test]
    fn busy_last_unmount_keeps_the_overlay_and_the_next_mount_copes() {
        let f = fixture();
        f.create("p", false);
        f.create("t", true);
        for v in ["p", "t"] {
            f.driver.mount(&name(v), &id("a"), None).unwrap();
            let mp = f.vol(v).mountpoint();
            f.driver.sys().state.lock().unwrap().busy.insert(mp);
            // dockerd is not told: the unmount comes after the reply.
            f.unmount(&name(v), &id("a")).unwrap();
            assert_eq!(f.count(v, "a"), None);
            assert!(f.driver.get(&name(v)).unwrap().mounted);
        }
        // Persistent: reuse the overlay as it is.
        f.driver.mount(&name("p"), &id("b"), None).unwrap();
        // Volatile: its changes cannot be discarded while busy.
        let err = f.driver.mount(&name("t"), &id("b"), None).unwrap_err();
        assert!(matches!(err, DriverError::Busy { .. }), "{err}");
        f.driver.sys().state.lock().unwrap().busy.clear();
        f.driver.mount(&name("t"), &id("b"), None).unwrap();
        assert_eq!(
            f.calls(),
            vec![
                "mount", "unmount", "mount", "unmount", "unmount", "unmount", "mount"
            ]
        );
    }

    #[test]
    fn mounts_of_a_gone_client_are_released_once_nothing_holds_the_overlay() {
        let f = fixture();
        f.create("v", true);
        let upper = f.vol("v").upper();
        f.driver
            .sys()
            .state
            .lock()
            .unwrap()
            .processes
            .insert(100, 1);
        f.driver.mount(&name("v"), &id("a"), Some(100)).unwrap();
        std::fs::write(upper.join("scratch"), "x").unwrap();
        let rec = f.vol("v").read_records().unwrap()[0].1.clone();
        assert_eq!(
            rec.client,
            Some(Client {
                pid: 100,
                start_time: 1
            })
        );

        // dockerd (pid 100) dies and restarts as pid 200, with live-restore: the container
        // still holds the overlay, so its mount stays.
        {
            let mut s = f.driver.sys().state.lock().unwrap();
            s.processes.clear();
            s.processes.insert(200, 5);
            s.held.insert(upper.clone());
        }
        f.driver.mount(&name("v"), &id("b"), Some(200)).unwrap();
        assert_eq!(f.count("v", "a"), Some(1));
        assert!(upper.join("scratch").exists());
        f.unmount(&name("v"), &id("b")).unwrap();

        // The container is gone too: its mount is released, and the volatile volume starts
        // afresh instead of showing a dead container's scratch file.
        f.driver.sys().state.lock().unwrap().held.clear();
        f.driver.mount(&name("v"), &id("c"), Some(200)).unwrap();
        assert_eq!(f.count("v", "a"), None);
        assert!(
            !upper.join("scratch").exists(),
            "dead container's changes shown"
        );
        assert_eq!(f.calls(), vec!["mount", "unmount", "mount"]);
    }

    #[test]
    fn a_reused_pid_is_not_the_same_client() {
        let f = fixture();
        f.create("v", false);
        f.driver
            .sys()
            .state
            .lock()
            .unwrap()
            .processes
            .insert(100, 1);
        f.driver.mount(&name("v"), &id("a"), Some(100)).unwrap();
        // A live client keeps its mounts whatever holds the overlay.
        f.driver.mount(&name("v"), &id("b"), Some(100)).unwrap();
        assert_eq!(f.count("v", "a"), Some(1));
        // Same pid, another process.
        f.driver
            .sys()
            .state
            .lock()
            .unwrap()
            .processes
            .insert(100, 2);
        f.driver.mount(&name("v"), &id("c"), Some(100)).unwrap();
        assert_eq!((f.count("v", "a"), f.count("v", "b")), (None, None));
        assert_eq!(f.count("v", "c"), Some(1));
        // Records with no client (Go version, unknown peer) are never released this way.
        f.driver.mount(&name("v"), &id("d"), None).unwrap();
        f.driver.sys().state.lock().unwrap().processes.clear();
        f.driver.mount(&name("v"), &id("e"), None).unwrap();
        assert_eq!(f.count("v", "d"), Some(1));
        assert_eq!(f.count("v", "c"), None);
    }

    #[test]
    fn a_record_temporary_left_by_a_crash_goes_at_the_next_mount() {
        let f = fixture();
        f.create("v", false);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        // A crash in the middle of a record write (tests/crash.rs kills the daemon there).
        let tmp = f.vol("v").active_mounts().join(".a.tmp-1-2-3");
        std::fs::write(&tmp, "{").unwrap();
        f.unmount(&name("v"), &id("a")).unwrap();
        f.driver.mount(&name("v"), &id("b"), None).unwrap();
        assert!(!tmp.exists(), "temporary kept");
        assert_eq!(f.count("v", "b"), Some(1));
    }

    #[test]
    fn overlay_left_by_a_crash_after_mount_is_reused() {
        let f = fixture();
        f.create("v", false);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        f.vol("v").clear_records().unwrap(); // crash before the record was written
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        assert_eq!(f.calls(), vec!["mount"]);
        assert_eq!(f.count("v", "a"), Some(1));
    }

    #[test]
    fn remove_cleans_leftovers_and_refuses_busy() {
        let f = fixture();
        f.create("v", false);
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        let mp = f.vol("v").mountpoint();
        f.driver.sys().state.lock().unwrap().busy.insert(mp.clone());
        assert!(matches!(
            f.driver.remove(&name("v")),
            Err(DriverError::Busy { .. })
        ));
        assert!(f.vol("v").path.exists());
        f.driver.sys().state.lock().unwrap().busy.clear();
        f.driver.remove(&name("v")).unwrap();
        assert!(!f.vol("v").path.exists());
        assert!(f.driver.sys().state.lock().unwrap().mounted.is_empty());
        assert!(f.driver.list().unwrap().is_empty());
        assert!(matches!(
            f.driver.get(&name("v")),
            Err(DriverError::NoSuchVolume(_))
        ));
    }

    #[test]
    fn metadata_is_kept_until_the_volume_is_removed() {
        let f = fixture();
        f.create("v", false);
        f.driver.get(&name("v")).unwrap();
        assert!(f.driver.metadata.holds(&name("v")));
        f.driver.mount(&name("v"), &id("a"), None).unwrap();
        // The mount is told the device of the volume's file system, learnt by its lock.
        let dev = std::fs::metadata(&f.vol("v").path).unwrap().dev();
        let work_dev = f.driver.sys().state.lock().unwrap().mounted[0].work_dev;
        assert_eq!(work_dev, Some(dev));
        f.unmount(&name("v"), &id("a")).unwrap();
        f.driver.remove(&name("v")).unwrap();
        assert!(!f.driver.metadata.holds(&name("v")), "kept after Remove");
        // A volume made again under the name is read afresh.
        f.create("v", true);
        assert_eq!(f.driver.get(&name("v")).unwrap().volatile, Some(true));
        assert!(f.driver.metadata.holds(&name("v")));
        f.driver.remove(&name("v")).unwrap();
        assert!(!f.driver.metadata.holds(&name("v")));
    }

    #[test]
    fn get_reports_damaged_metadata_instead_of_failing() {
        let f = fixture();
        f.create("v", false);
        std::fs::write(f.vol("v").metadata(), "{oops").unwrap();
        let info = f.driver.get(&name("v")).unwrap();
        assert!(info.error.unwrap().contains("metadata.json"));
        assert!(f.driver.mount(&name("v"), &id("a"), None).is_err());
    }

    #[test]
    fn go_version_volumes_work() {
        let f = fixture();
        let vol = f.vol("legacy");
        std::fs::create_dir_all(vol.upper()).unwrap();
        std::fs::create_dir_all(vol.work()).unwrap();
        std::fs::create_dir_all(vol.mountpoint()).unwrap();
        std::fs::create_dir_all(vol.active_mounts()).unwrap();
        std::fs::write(vol.upper().join("kept"), "x").unwrap();
        std::fs::write(
            vol.metadata(),
            format!(
                r#"{{"BaseDirPath":"{}","Volatile":false}}"#,
                f.base.display()
            ),
        )
        .unwrap();
        let info = f.driver.get(&name("legacy")).unwrap();
        assert!(!info.mounted);
        f.driver.mount(&name("legacy"), &id("a"), None).unwrap();
        assert!(vol.upper().join("kept").exists());
        f.create("legacy", false); // same options: accepted
    }
}
