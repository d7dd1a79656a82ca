//! The volume lifecycle: Create, Remove, and the queries (Get, Path, List).
//!
//! A volume directory exists only complete: Create builds it as `.new-NAME-NONCE`, makes it
//! durable, and renames it into place; Remove renames it into the trash. Queries never change
//! anything, and only a missing volume is an error for Get (dockerd forgets a volume on any
//! Get error).

use std::fs::File;

use super::plan;
use super::*;

impl<S: Sys> Driver<S> {
    pub fn create(
        &self,
        name: &VolumeName,
        options: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let opts = VolumeOptions::parse(
            options,
            self.root.path(),
            &self.allowed_bases,
            &self.host_root,
        )
        .map_err(|source| DriverError::Options {
            name: name.clone(),
            source,
        })?;
        let vol = self.root.volume(name);
        if vol.path.exists() {
            return self.check_same_options(name, &vol, &opts);
        }
        let meta = Metadata {
            base: opts.base.path().to_owned(),
            volatile: opts.volatile,
            created_at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
            size: opts.size,
        };
        // Refused as a Mount would refuse it (which checks again: a volume's overlay may come
        // there after this Create); the upper takes the owner and mode of that very directory.
        let base = self.open_lower(name, &meta)?;
        let base_meta =
            std::fs::metadata(base.fd_path()).map_err(|source| DriverError::BaseGone {
                name: name.clone(),
                base: opts.base.path().to_owned(),
                source,
            })?;
        drop(base);
        let staging = VolumeDir::new(self.root.staging_slot(name), opts.size.is_some());
        let mut image_err = None;
        let built = (|| -> io::Result<()> {
            std::fs::create_dir(&staging.path)?;
            failpoint!("create.staging-made");
            // Held until the rename, so the janitor never takes a staging directory in use.
            let staging_dir = File::open(&staging.path)?;
            staging_dir.lock()?;
            std::fs::create_dir(staging.mountpoint())?;
            std::fs::create_dir(staging.active_mounts())?;
            if let Some(cap) = opts.size {
                // The upper and work directories are made in the image's file system when
                // it is first attached (a Mount, an admin command).
                std::fs::create_dir(staging.changes())?;
                if let Err(e) =
                    self.sys
                        .format_image(&staging.image(), cap.bytes, cap.sparse, cap.fs)
                {
                    image_err = Some(e);
                    return Err(io::Error::other("the image"));
                }
            } else {
                std::fs::create_dir(staging.work())?;
                staging.make_first_upper(&base_meta)?;
            }
            failpoint!("create.upper-installed");
            // Written in place: nothing reads a staging directory.
            let json = serde_json::to_vec(&meta).map_err(io::Error::other)?;
            let mut meta_file = File::create_new(staging.metadata())?;
            io::Write::write_all(&mut meta_file, &json)?;
            failpoint!("create.metadata-written");
            // What the rename makes a volume must be on disk first: `metadata.json`, which is
            // what a volume is, and its name in the staging directory. The directories need
            // no fsync of their own: the first fsync commits the file system's journal with
            // them in it (ext4, xfs), and on any file system a Mount makes again, with the
            // base's owner and mode, whichever one a power cut took (each further fsync would
            // cost a disk cache flush, some 0.1 ms here). The staging directory is fsynced
            // only where the file's fsync may leave its name behind.
            meta_file.sync_all()?;
            if !self.root.fsync_keeps_new_names() {
                staging_dir.sync_all()?;
            }
            failpoint!("create.before-rename");
            std::fs::rename(&staging.path, &vol.path)?;
            failpoint!("create.renamed");
            File::open(self.root.path())?.sync_all()
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
                if let Some(source) = image_err {
                    return Err(DriverError::Image {
                        name: name.clone(),
                        source,
                    });
                }
                // Lost a race with a concurrent Create of the same name.
                let raced = matches!(e.raw_os_error(), Some(39 /* ENOTEMPTY */ | 17 /* EEXIST */));
                if raced && vol.path.exists() {
                    self.check_same_options(name, &vol, &opts)
                } else {
                    Err(Self::io_err(name, "creating the volume directory")(e))
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
        let stored = (self.host_root.canonicalize(&meta.base)).unwrap_or(meta.base.clone());
        if stored == opts.base.path() && meta.volatile == opts.volatile && meta.size == opts.size {
            Ok(())
        } else {
            Err(DriverError::Conflict {
                name: name.clone(),
                base: meta.base,
                volatile: meta.volatile,
                size: meta.size.map(|s| s.bytes),
            })
        }
    }

    pub fn remove(&self, name: &VolumeName) -> Result<(), DriverError> {
        let Some((vol, _lock)) = self.try_lock(name)? else {
            // No such volume (any more): nothing to do.
            return Ok(());
        };
        let mounted = self.is_mounted(name, &vol.mountpoint())?;
        let has_records = !self.read_records(name, &vol)?.is_empty();
        let steps = plan::plan_remove(mounted, has_records, look_due(&vol));
        if steps.look {
            self.refuse_if_held(name, &vol)?;
        }
        if steps.unmount {
            self.unmount_overlay(name, &vol)?;
            log::info!("unmounted leftover mount of volume {name}");
            failpoint!("remove.unmounted");
        }
        if vol.sized() && self.is_attached(name, &vol)? {
            self.detach(name, &vol)?;
            failpoint!("remove.detached");
        }
        std::fs::rename(&vol.path, self.root.trash_slot(name.as_str()))
            .map_err(Self::io_err(name, "removing the volume directory"))?;
        log::info!("removed volume {name}");
        failpoint!("remove.renamed");
        if self.root.mount_dir().is_some() {
            // Its mountpoint in the mount directory, empty (it was not mounted); busy if a
            // volume of the same name was created and mounted meanwhile, and then kept.
            let _ = std::fs::remove_dir(vol.mountpoint());
        }
        self.kick_janitor();
        Ok(())
    }

    /// The mountpoint while mounted, `None` while not; an error for an unknown volume.
    pub fn path(&self, name: &VolumeName) -> Result<Option<PathBuf>, DriverError> {
        let vol = self.existing(name)?;
        let mountpoint = vol.mountpoint();
        Ok(self.is_mounted(name, &mountpoint)?.then_some(mountpoint))
    }

    pub fn get(&self, name: &VolumeName) -> Result<VolumeInfo, DriverError> {
        // Only a missing directory is an error: dockerd forgets a volume on any Get error, so
        // every other failure is reported inside the answer.
        let vol = self.existing(name)?;
        let mountpoint = vol.mountpoint();
        let mut errors = Vec::new();
        let mounted = self.is_mounted(name, &mountpoint).unwrap_or_else(|e| {
            errors.push(crate::error_chain(&e));
            false
        });
        let meta = vol
            .read_metadata()
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
        let size = meta.as_ref().and_then(|m| m.size).map(|cap| {
            let usage = self
                .is_attached(name, &vol)
                .unwrap_or(false)
                .then(|| self.sys.fs_usage(&vol.changes()).ok())
                .flatten();
            SizeStatus {
                cap: cap.bytes,
                fs: cap.fs,
                used: usage.map(|(_, used)| used),
                fs_size: usage.map(|(size, _)| size),
            }
        });
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
            size,
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
}
