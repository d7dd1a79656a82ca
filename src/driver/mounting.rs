//! Mount and Unmount: each observes the volume under its lock, asks `plan.rs` what to do,
//! and carries the steps out in order. The decisions are all in `plan.rs`; what is here is
//! the I/O of each step and the order that keeps every crash on a row of the state table.

use super::plan::{self, GoneClients, Look, MountPlan, Observed, Records, UnmountPlan};
use super::*;
use crate::options::OpenedBase;

impl<S: Sys> Driver<S> {
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

    /// [`Driver::mount`] for a client already identified with [`Driver::client`].
    pub fn mount_as(
        &self,
        name: &VolumeName,
        id: &MountId,
        client: Option<Client>,
    ) -> Result<PathBuf, DriverError> {
        let (vol, _lock) = self.lock(name)?;
        let meta = self.read_metadata(name, &vol)?;
        let mountpoint = vol.mountpoint();
        let mounted = self.is_mounted(name, &mountpoint)?;
        let records = vol
            .read_records_and_strays()
            .map_err(Self::io_err(name, "reading mount records"))?;
        let (mut records, strays) = records;
        // Asked once: a process can end while we look. The client asking now is alive: its
        // records (all of them, when dockerd is the only client) need no look in /proc.
        let gone: Vec<MountId> = (records.iter())
            .filter(|(_, r)| {
                r.client.is_some_and(|c| {
                    Some(c) != client && self.sys.process_start_time(c.pid) != Some(c.start_time)
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        let observed = Observed {
            mounted,
            records: self.classify(&records),
            gone_clients: match gone.len() {
                0 => GoneClients::None,
                n if n == records.len() => GoneClients::All,
                _ => GoneClients::Some,
            },
            look_due: !mounted && records.is_empty() && look_due(&vol),
            volatile: meta.volatile,
        };
        let look = plan::mount_look(&observed);
        let holder = match look {
            Look::No => None,
            _ => self.holders(name, &vol)?.into_iter().next(),
        };
        if let (Look::KeepGoneIfHeld, Some(holder)) = (look, &holder) {
            log::debug!("volume {name}: keeping mounts of gone clients, {holder} holds it");
        }
        let steps = plan::plan_mount(&observed, holder.is_some()).map_err(|_| {
            DriverError::HeldElsewhere {
                name: name.clone(),
                holder: holder
                    .clone()
                    .expect("refused only when a holder was found"),
            }
        })?;
        // Checked before any step: a refused base changes nothing.
        let base = steps
            .mount
            .then(|| self.open_lower(name, &meta))
            .transpose()?;
        let lower = base.as_ref().map(OpenedBase::fd_path);
        self.carry_out(name, &vol, &steps, &mut records, strays, &gone)?;
        let discarded = match lower {
            Some(lower) => self.mount_layers(name, &vol, &meta, &steps, lower)?,
            None => false,
        };
        drop(base);
        // Asked when this Mount mounted: dockerd 20.10 cuts a plugin off when it starts it
        // again, before the plugin has mounted anything.
        let cut_off = steps
            .mount
            .then(|| self.cut_off_from(name, &mountpoint, client));
        if let Some(pid) = cut_off.flatten() {
            match self.unmount_overlay(name, &vol) {
                Ok(_) => log::info!("unmounted volume {name} again: dockerd cannot see it"),
                Err(e) => log::warn!("{}", crate::error_chain(&e)),
            }
            if discarded {
                self.kick_janitor();
            }
            let err = DriverError::CutOff {
                name: name.clone(),
                pid,
            };
            log::error!("{err}");
            if let Some(hook) = self.cut_off.get() {
                hook();
            }
            return Err(err);
        }

        let previous = records.iter().find(|(rid, _)| rid == id).map(|(_, r)| r);
        let record = MountRecord {
            usage_count: previous.map_or(0, |r| r.usage_count) + 1,
            boot_id: Some(self.boot_id.clone()),
            client: client.or(previous.and_then(|r| r.client)),
        };
        let recorded = match previous {
            None => vol.create_record(id, &record),
            Some(_) => vol.write_record(id, &record),
        };
        if discarded {
            // The discarded changes are in the trash: the janitor deletes them, once this
            // Mount's own writes are done (a deletion of many files slows every write to the
            // file system's journal while it runs).
            self.kick_janitor();
        }
        if let Err(source) = recorded {
            // The state directory is full or read-only. dockerd gets the error and will never
            // send an Unmount: an overlay just mounted for this Mount goes again.
            if steps.mount {
                match self.unmount_overlay(name, &vol) {
                    Ok(_) => {
                        log::info!("unmounted volume {name} again: its mount is not recorded")
                    }
                    Err(e) => log::warn!("{}", crate::error_chain(&e)),
                }
            }
            return Err(Self::io_err(name, "recording the mount")(source));
        }
        failpoint!("mount.recorded");
        log::debug!(
            "volume {name}: mount ID {id} now used {} times",
            record.usage_count
        );
        if steps.mount {
            log::info!("mounted volume {name} at {mountpoint:?}");
        }
        Ok(mountpoint)
    }

    /// The client's pid when it cannot see the overlay at `mountpoint` (see
    /// [`Driver::on_cut_off`]); asked only with a mount directory that is a shared mount.
    /// When we cannot tell, the Mount goes on as it always has.
    fn cut_off_from(
        &self,
        name: &VolumeName,
        mountpoint: &Path,
        client: Option<Client>,
    ) -> Option<u32> {
        let client = client.filter(|_| self.mounts_reach_client)?;
        match self.sys.seen_by(client.pid, mountpoint) {
            Ok(true) => None,
            Ok(false) => Some(client.pid),
            Err(e) => {
                log::warn!(
                    "volume {name}: cannot tell whether dockerd (pid {}) sees the mount: {e}",
                    client.pid
                );
                None
            }
        }
    }

    /// Which row of the table the records put the volume in.
    fn classify(&self, records: &[(MountId, MountRecord)]) -> Records {
        let earlier_boot =
            |r: &MountRecord| r.boot_id.as_deref().is_some_and(|b| b != self.boot_id);
        if records.is_empty() {
            Records::None
        } else if records.iter().all(|(_, r)| earlier_boot(r)) {
            Records::AllFromEarlierBoot
        } else {
            Records::SomeOfThisBoot
        }
    }

    /// The steps of `plan` before the mount: `records` is left as what remains on record.
    fn carry_out(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        plan: &MountPlan,
        records: &mut Vec<(MountId, MountRecord)>,
        strays: bool,
        gone: &[MountId],
    ) -> Result<(), DriverError> {
        if plan.release_gone {
            for (id, record) in records.iter().filter(|(id, _)| gone.contains(id)) {
                vol.delete_record(id)
                    .map_err(Self::io_err(name, "releasing an orphaned mount"))?;
                let pid = record.client.map_or(0, |c| c.pid);
                log::info!(
                    "volume {name}: released mount ID {id}: its client (pid {pid}) is gone and no \
                     container holds the volume"
                );
            }
            records.retain(|(id, _)| !gone.contains(id));
        }
        // Also without records: a record write cut short by a crash leaves its temporary in
        // `activemounts/`, and nothing else would ever delete it.
        if plan.void_records || plan.mount && strays {
            if !records.is_empty() {
                log::info!(
                    "volume {name}: voiding {} stale mount record(s) of an overlay that is no \
                     longer mounted",
                    records.len()
                );
            }
            self.clear_records(name, vol)?;
            records.clear();
        }
        if plan.mount {
            failpoint!("mount.voided");
        }
        if plan.unmount_stale {
            self.unmount_overlay(name, vol)?;
            failpoint!("mount.stale-unmounted");
        }
        Ok(())
    }

    /// Mounts the overlay, `lower` leading to the base opened for it. Whether it discarded a
    /// volatile volume's changes into the trash.
    fn mount_layers(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
        plan: &MountPlan,
        lower: PathBuf,
    ) -> Result<bool, DriverError> {
        self.ensure_attached(name, vol, meta)?;
        // A volatile volume's upper is looked at first (its changes go now). Otherwise the
        // directories are made only when the mount misses one (a damaged or Go-made volume):
        // they are nearly always there.
        let mut discarded = false;
        if plan.discard {
            discarded = self.prepare_layers(name, vol, meta)?;
        }
        let spec = OverlaySpec {
            // An fsconfig string holds at most 255 bytes: a name that long is cut.
            source: format!("docker-on-top:{name}").chars().take(255).collect(),
            lower,
            upper: vol.upper(),
            work: vol.work(),
            target: vol.mountpoint(),
        };
        // A container given the bare directory wrote there: dockerd binds it when the overlay
        // was unmounted under it, as dockerd 20.10 can do to a managed plugin's at its restart
        // (docs/plugin.md). The overlay hides those files; the admin is told where they are.
        if std::fs::read_dir(&spec.target).is_ok_and(|mut entries| entries.next().is_some()) {
            log::warn!(
                "volume {name}: files were written into {:?} while no overlay was mounted on it; \
                 they stay there, hidden while the volume is mounted",
                spec.target
            );
        }
        let mounted = match self.sys.mount_overlay(&spec) {
            Err(e) if !plan.discard && e.is_not_found() => {
                self.prepare_layers(name, vol, meta)?;
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
        Ok(discarded)
    }

    /// Makes sure upper, work and mountpoint exist before a mount, discarding the upper of a
    /// volatile volume: then `true`, and the caller kicks the janitor.
    fn prepare_layers(
        &self,
        name: &VolumeName,
        vol: &VolumeDir,
        meta: &Metadata,
    ) -> Result<bool, DriverError> {
        let base = self.base_metadata(name, meta)?;
        let upper = vol.upper();
        let upper_exists = upper.exists();
        let mut discarded = false;
        if meta.volatile
            && upper_exists
            && holds_entries(&upper).map_err(Self::io_err(name, "reading the upper directory"))?
        {
            self.discard_upper(name, vol, meta, &base)?;
            log::info!("discarded the changes of volatile volume {name}");
            discarded = true;
        } else if !upper_exists {
            if !meta.volatile {
                log::warn!("volume {name} had no upper directory; starting with no changes");
            }
            vol.install_fresh_upper(&base)
                .map_err(Self::io_err(name, "creating the upper directory"))?;
        }
        for dir in [vol.work(), vol.mountpoint()] {
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(Self::io_err(name, "creating the work directories")(e));
                }
                _ => {}
            }
        }
        Ok(discarded)
    }

    /// Counts one use of mount ID `id` fewer; the last use of the last ID unmounts the overlay
    /// before the answer.
    pub fn unmount(&self, name: &VolumeName, id: &MountId) -> Result<(), DriverError> {
        let (vol, _lock) = self.lock(name)?;
        let records = self.read_records(name, &vol)?;
        let record = records.iter().find(|(rid, _)| rid == id).map(|(_, r)| r);
        let others = records.iter().any(|(rid, _)| rid != id);
        // Whether it is mounted matters only for the last record.
        let mounted = !others && record.is_some() && self.is_mounted(name, &vol.mountpoint())?;
        match plan::plan_unmount(record.map(|r| r.usage_count), others, mounted) {
            UnmountPlan::UnknownId => Err(DriverError::UnknownMountId {
                name: name.clone(),
                id: id.clone(),
            }),
            UnmountPlan::Decrement => {
                let record = record.expect("planned from a record");
                let left = record.usage_count - 1;
                let update = MountRecord {
                    usage_count: left,
                    client: record.client,
                    boot_id: Some(self.boot_id.clone()),
                };
                vol.write_record(id, &update)
                    .map_err(Self::io_err(name, "recording the unmount"))?;
                log::debug!("volume {name}: mount ID {id} now used {left} times");
                failpoint!("unmount.decremented");
                Ok(())
            }
            plan @ (UnmountPlan::Release | UnmountPlan::ReleaseAndUnmount) => {
                // Deleted, not renamed into the trash: the umount2 below syncs the upper's
                // file system, which would write out the data of a record still there
                // (BENCHMARKS.md, "The last record").
                let deleted = vol
                    .delete_record(id)
                    .map_err(Self::io_err(name, "deleting the mount record"));
                log::debug!("volume {name}: mount ID {id} released");
                failpoint!("unmount.released");
                if plan == UnmountPlan::ReleaseAndUnmount {
                    // Also when the record could not be deleted (a read-only state directory):
                    // dockerd never repeats an Unmount, and the next Mount finds it void.
                    match self.unmount_overlay(name, &vol) {
                        Ok(unmounted) => {
                            log::info!("unmounted volume {name}");
                            self.detach_if_volatile(name, &vol, unmounted);
                        }
                        // Unmount errors reach only dockerd's log: say it here too. The next
                        // Mount uses the overlay as it is (a volatile one once it is free).
                        Err(e @ DriverError::Busy { .. }) => {
                            log::warn!("volume {name} stays mounted after its last Unmount: {e}")
                        }
                        Err(e) => return Err(e),
                    }
                }
                deleted
            }
        }
    }

    /// After the last Unmount of a volatile sized volume: its image's file system is detached
    /// now, while the Unmount syncs anyway, so that the next Mount, which swaps in a fresh
    /// image, costs the same however much was written (unmounting a file system that cached a
    /// gigabyte takes tens of milliseconds). The changes stay in the image until then, for the
    /// admin commands, which attach it again. Not while a copy of the overlay lives on: it
    /// keeps the file system mounted through the loop device, and the mark that a look is due
    /// (overlayfs' `work/`) is on that file system, so the next Mount would neither see the
    /// mark nor know that attaching the image again mounts its file system twice. A failure is
    /// only logged: the Unmount's own work is done, and the next Mount's swap detaches it.
    fn detach_if_volatile(&self, name: &VolumeName, vol: &VolumeDir, unmounted: Unmounted) {
        if !vol.sized() || !unmounted.no_copy_left {
            return;
        }
        let detached = (|| {
            if self.read_metadata(name, vol)?.volatile && self.is_attached(name, vol)? {
                self.detach(name, vol)?;
            }
            Ok::<_, DriverError>(())
        })();
        if let Err(e) = detached {
            log::warn!(
                "volume {name} stays attached after its last Unmount: {}",
                crate::error_chain(&e)
            );
        }
    }
}

/// Whether the directory at `path` (an upper) has entries, read only when its stat cannot
/// tell. One with subdirectories has a link count above 2; one whose size grew beyond a block
/// held more than a few entries (ext4, xfs and tmpfs grow a directory's size with its entries;
/// ext4 never shrinks it, so an upper emptied by hand may be taken as holding some: then it is
/// discarded, which costs a Mount a rename and an empty directory, nothing else). Reading the
/// first entry of a large ext4 directory reads and sorts a block of its hashed entries, which
/// made a Mount that discarded a million files 2.5 times one that discarded ten.
pub(super) fn holds_entries(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.nlink() > 2 || meta.size() > meta.blksize() {
        return Ok(true);
    }
    let mut entries = std::fs::read_dir(path)?;
    Ok(entries.next().transpose()?.is_some())
}
