//! A volume held under its lock, for the admin commands (`docker-on-top ls`, `changes`,
//! `reset`, `commit`, ...), and the one state change they make through the driver: reset.
//!
//! The admin commands run in their own process, beside a daemon that may be serving dockerd.
//! They take the same flock as Mount, Unmount and Remove, so while an admin command holds a
//! volume the daemon waits for it (and the other way round). Reading a volume's changes is
//! allowed while it is mounted; replacing its upper or changing its base is not: that needs an
//! [`UnmountedVolume`], which can only be had from [`Driver::lock_unmounted`].

use std::ops::Deref;

use super::*;

/// A volume whose lock this process holds. Mount, Unmount and Remove of it, in this process
/// or the daemon, wait until it is dropped.
#[derive(Debug)]
pub struct LockedVolume {
    name: VolumeName,
    dir: VolumeDir,
    _lock: store::VolumeLock,
}

impl LockedVolume {
    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    /// The paths of the volume's directory.
    pub fn dir(&self) -> &VolumeDir {
        &self.dir
    }

    /// `metadata.json`, read now (the Go version's format is accepted).
    pub fn metadata(&self) -> Result<Metadata, DriverError> {
        self.dir.read_metadata().map_err(|source| DriverError::Io {
            name: self.name.clone(),
            action: "reading metadata.json",
            source,
        })
    }
}

/// A locked volume that was found unmounted here and held by no other mount namespace, its
/// void mount records cleared: until it is dropped nothing can mount it, so its upper may be
/// replaced and its base changed.
#[derive(Debug)]
pub struct UnmountedVolume(LockedVolume);

impl Deref for UnmountedVolume {
    type Target = LockedVolume;
    fn deref(&self) -> &LockedVolume {
        &self.0
    }
}

/// The message of [`DriverError::Mounted`]: what to do depends on whether containers are on
/// record.
pub(super) fn mounted_message(name: &VolumeName, mountpoint: &Path, mounts: u64) -> String {
    if mounts > 0 {
        format!(
            "volume {name} is in use ({mounts} mount(s) at {mountpoint:?}); stop the containers \
             that use it (docker ps --filter volume={name}) and try again"
        )
    } else {
        format!(
            "volume {name} is still mounted at {mountpoint:?} although no container is on \
             record (a busy last unmount or a crash); once no process uses it, unmount it with \
             `umount {}` and try again",
            mountpoint.display()
        )
    }
}

impl<S: Sys> Driver<S> {
    /// Takes the lock of an existing volume; waits while the daemon works on it.
    /// Locks the volume; a sized one's file system is attached if it is not, so that its
    /// changes can be read.
    pub fn lock_volume(&self, name: &VolumeName) -> Result<LockedVolume, DriverError> {
        let (dir, lock) = self.lock(name)?;
        if dir.sized() {
            self.ensure_attached(name, &dir, &self.read_metadata(name, &dir)?)?;
        }
        Ok(LockedVolume {
            name: name.clone(),
            dir,
            _lock: lock,
        })
    }

    /// The mount IDs on record and their usage counts while the overlay is mounted here; empty
    /// while it is not (records of an unmounted overlay are void, see the state machine).
    pub fn live_mounts(&self, vol: &LockedVolume) -> Result<Vec<(MountId, u64)>, DriverError> {
        if !self.is_mounted(&vol.name, &vol.dir.mountpoint())? {
            return Ok(Vec::new());
        }
        Ok(self
            .read_records(&vol.name, &vol.dir)?
            .into_iter()
            .map(|(id, r)| (id, r.usage_count))
            .collect())
    }

    /// Takes the lock of a volume and makes sure nothing uses it: refused while the overlay is
    /// mounted here or still held in another mount namespace; otherwise the mount records,
    /// which are then void, are cleared.
    pub fn lock_unmounted(&self, name: &VolumeName) -> Result<UnmountedVolume, DriverError> {
        let vol = self.lock_volume(name)?;
        let mountpoint = vol.dir.mountpoint();
        if self.is_mounted(name, &mountpoint)? {
            let mounts = self
                .read_records(name, &vol.dir)?
                .iter()
                .map(|(_, r)| r.usage_count)
                .sum();
            return Err(DriverError::Mounted {
                name: name.clone(),
                mountpoint,
                mounts,
            });
        }
        // Always looked for, records or not: the caller is about to replace the upper or
        // change the base under any copy of the overlay that lives on.
        self.refuse_if_held(name, &vol.dir)?;
        self.clear_records(name, &vol.dir)?;
        Ok(UnmountedVolume(vol))
    }

    /// Discards the changes of an unmounted volume in constant time: the upper is renamed into
    /// the trash (returned, for the caller to delete or leave to the janitor) and a fresh,
    /// empty one with the base's owner, group and mode takes its place. A volume without an
    /// upper just gets a fresh one.
    pub fn reset_locked(&self, vol: &UnmountedVolume) -> Result<Option<PathBuf>, DriverError> {
        let meta = vol.metadata()?;
        let base = self.base_metadata(&vol.name, &meta)?;
        let trashed = self.discard_upper(&vol.name, &vol.dir, &meta, &base)?;
        if trashed.is_some() {
            self.kick_janitor();
        }
        log::info!("reset volume {}: its changes were discarded", vol.name);
        Ok(trashed)
    }

    /// [`Driver::lock_unmounted`], then [`Driver::reset_locked`].
    pub fn reset(&self, name: &VolumeName) -> Result<Option<PathBuf>, DriverError> {
        let vol = self.lock_unmounted(name)?;
        self.reset_locked(&vol)
    }

    /// The base directory's metadata (symlinks followed); an error unless it is a directory.
    pub(super) fn base_metadata(
        &self,
        name: &VolumeName,
        meta: &Metadata,
    ) -> Result<std::fs::Metadata, DriverError> {
        let gone = |source| DriverError::BaseGone {
            name: name.clone(),
            base: meta.base.clone(),
            source,
        };
        self.host_root.dir_metadata(&meta.base).map_err(gone)
    }

    /// Moves the upper (if any) into the trash and installs a fresh one whose root has the
    /// base's owner, group and mode. The caller holds the lock and knows the volume is not
    /// mounted. Returns where the old upper went; the caller kicks the janitor once its own
    /// work is done (deleting a large upper competes with it for the disk).
    pub(super) fn discard_upper(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
        base: &std::fs::Metadata,
    ) -> Result<Option<PathBuf>, DriverError> {
        let io_err = |action| {
            move |source| DriverError::Io {
                name: name.clone(),
                action,
                source,
            }
        };
        if vol.sized() {
            return self.swap_image(name, vol, meta);
        }
        let upper = vol.upper();
        let trashed = match std::fs::symlink_metadata(&upper) {
            Ok(_) => {
                let slot = self.root.trash_slot(&format!("{name}-upper"));
                std::fs::rename(&upper, &slot)
                    .map_err(io_err("moving the upper directory to the trash"))?;
                failpoint!("discard.upper-trashed");
                Some(slot)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("looking at the upper directory")(e)),
        };
        vol.install_fresh_upper(base)
            .map_err(io_err("creating a fresh upper directory"))?;
        failpoint!("discard.fresh-upper");
        Ok(trashed)
    }

    /// [`Driver::discard_upper`] of a sized volume: its whole image goes into the trash (in
    /// constant time, however much was written, and the host gets the space back once the
    /// janitor deletes it) and a fresh one takes its place, attached.
    fn swap_image(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
    ) -> Result<Option<PathBuf>, DriverError> {
        if self.is_attached(name, vol)? {
            self.detach(name, vol)?;
        }
        failpoint!("discard.image-detached");
        let slot = self.root.trash_slot(&format!("{name}-image"));
        let trashed = match std::fs::rename(vol.image(), &slot) {
            Ok(()) => Some(slot),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Self::io_err(name, "moving the image to the trash")(e)),
        };
        failpoint!("discard.upper-trashed");
        self.ensure_attached(name, vol, meta)?;
        failpoint!("discard.fresh-upper");
        Ok(trashed)
    }

    /// Whether a sized volume's image is attached (its file system mounted).
    pub(super) fn is_attached(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
    ) -> Result<bool, DriverError> {
        self.sys
            .is_mount_root(&vol.changes())
            .map_err(|source| DriverError::Inspect {
                name: name.clone(),
                source,
            })
    }

    /// Unmounts a sized volume's file system; the loop device goes with it.
    pub(super) fn detach(&self, name: &VolumeName, vol: &VolumeDir) -> Result<(), DriverError> {
        self.unmount_at(name, &vol.changes())?;
        log::info!("detached the file system of volume {name}");
        Ok(())
    }

    /// A sized volume's file system attached, if it is not (after a reboot, say), with its
    /// upper and work directories in place; an image lost in a swap cut short is made anew.
    /// Nothing for an unsized volume.
    pub(crate) fn ensure_attached(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
    ) -> Result<(), DriverError> {
        if !vol.sized() || self.is_attached(name, vol)? {
            return Ok(());
        }
        let Some(size) = meta.size else {
            return Err(Self::io_err(name, "reading metadata.json")(io::Error::new(
                io::ErrorKind::InvalidData,
                "a sized volume's metadata has no Size",
            )));
        };
        let image_err = |source| DriverError::Image {
            name: name.clone(),
            source,
        };
        if !vol.image().exists() {
            self.sys
                .format_image(&vol.image(), size.bytes, size.sparse, size.fs)
                .map_err(image_err)?;
        }
        self.sys
            .attach_image(&vol.image(), size.fs, &vol.changes())
            .map_err(image_err)?;
        log::info!("attached the file system of volume {name}");
        if !vol.upper().exists() {
            let base = self.base_metadata(name, meta)?;
            vol.install_fresh_upper(&base)
                .map_err(Self::io_err(name, "creating the upper directory"))?;
        }
        match std::fs::create_dir(vol.work()) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                Err(Self::io_err(name, "creating the work directory")(e))
            }
            _ => Ok(()),
        }
    }
}
