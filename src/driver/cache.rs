//! Volumes' metadata, kept in memory between requests.
//!
//! Every Mount (and Get, and a Create of a name that exists) needs the volume's
//! `metadata.json`. It is written once, at Create, and after that only ever replaced whole
//! (`store::write_atomic`: a new inode, renamed into place), so reading it each time (open, a
//! read or two, close) mostly reads what was read before. One statx of it says whether it did:
//! a copy kept here is used only while the file's [`FileStamp`] (device, inode, size,
//! modification and change times with nanoseconds) is the one it was read under.
//!
//! The stamp is taken *before* the read. A change made between the two gives the file another
//! stamp than the one kept, so the next request reads it again: what a racing change left is
//! never taken for the current contents. Concurrent readers of one volume may overwrite each
//! other's entry with an older stamp; that costs a read, never a stale answer.
//!
//! Where stamps fall short: since Linux 6.13 (multigrain timestamps, on ext4, xfs, btrfs and
//! tmpfs) a change after a statx that asked for the change time gets a distinct one, so every
//! change is seen. On older kernels a file's times advance with the clock tick, and an edit in
//! place of the same size within the tick of the write before it would go unseen. The plugin
//! never edits the file in place; an admin editing it by hand, twice within milliseconds and
//! keeping its size, is not a case worth a read on every request.
//!
//! Only metadata that was read and parsed goes in, so the entries are of volumes that exist
//! or existed: a client cannot fill the cache with names. Remove drops its volume's entry;
//! one that lingers (a volume removed by another process, or while a Get of it was in flight)
//! is dropped when it is next asked for and no longer found. As a bound all the same, the
//! cache is emptied when it reaches [`MAX_ENTRIES`].

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::names::VolumeName;
use crate::store::{FileStamp, Metadata, VolumeDir};

/// Entries at which a map starts again from empty: far more volumes than a host has.
const MAX_ENTRIES: usize = 65536;

/// What is known of each volume, emptied when it reaches [`MAX_ENTRIES`].
#[derive(Debug)]
struct PerVolume<V>(Mutex<HashMap<VolumeName, V>>);

impl<V> Default for PerVolume<V> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<V> PerVolume<V> {
    /// Held only to look up or store, never across file I/O. A panic while it was held (which
    /// nothing here can cause) leaves a map that is still consistent.
    fn lock(&self) -> MutexGuard<'_, HashMap<VolumeName, V>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, name: &VolumeName, value: V) {
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(name) {
            entries.clear();
        }
        entries.insert(name.clone(), value);
    }

    fn remove(&self, name: &VolumeName) {
        self.lock().remove(name);
    }
}

#[derive(Debug, Default)]
pub(super) struct MetadataCache {
    entries: PerVolume<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The file's stamp taken before the read that gave `metadata`.
    stamp: FileStamp,
    metadata: Metadata,
}

impl MetadataCache {
    fn entries(&self) -> MutexGuard<'_, HashMap<VolumeName, Entry>> {
        self.entries.lock()
    }

    /// The metadata of volume `name` at `vol`: from memory when `metadata.json` has not changed
    /// since it was read, else read now (and kept). Errors are those of the statx or the read.
    pub(super) fn read(&self, name: &VolumeName, vol: &VolumeDir) -> io::Result<Metadata> {
        let stamp = match FileStamp::of(&vol.metadata()) {
            Ok(Some(stamp)) => stamp,
            // A file system whose stamps tell nothing: read every time.
            Ok(None) => {
                self.forget(name);
                return vol.read_metadata();
            }
            Err(e) => {
                self.forget(name);
                return Err(e);
            }
        };
        if let Some(entry) = self.entries().get(name)
            && entry.stamp == stamp
        {
            return Ok(entry.metadata.clone());
        }
        let read = vol.read_metadata_sized(Some(stamp.size));
        match &read {
            Ok(metadata) => self.entries.insert(
                name,
                Entry {
                    stamp,
                    metadata: metadata.clone(),
                },
            ),
            Err(_) => self.forget(name),
        }
        read
    }

    /// Drops what is kept of `name` (it was removed).
    pub(super) fn forget(&self, name: &VolumeName) {
        self.entries.remove(name);
    }

    #[cfg(test)]
    pub(super) fn holds(&self, name: &VolumeName) -> bool {
        self.entries().contains_key(name)
    }
}

/// Volumes whose `activemounts/` is known to hold nothing, with the stamp it had then.
///
/// A Mount of an unmounted volume voids whatever records are left in `activemounts/`, so it
/// must know whether there are any: reading the directory costs four calls (open, two
/// getdents, close), checking a stamp one statx. Entries are made only under the volume's
/// lock, where the directory is known to be empty: by Create (the directory is new) and by the
/// thread that finishes a last Unmount (the stamp taken before the read that found it empty).
/// Records are added only by a Mount, which drops the entry under the same lock before it
/// adds one; anything another process adds gives the directory another stamp (multigrain
/// timestamps, see above; on older kernels an addition by a second daemon on the same state
/// directory within a clock tick would go unseen: the records of an unmounted overlay it
/// left would then be voided only at a later Mount, which reads them).
#[derive(Debug, Default)]
pub(super) struct NoRecords {
    entries: PerVolume<FileStamp>,
}

impl NoRecords {
    /// Whether `vol`'s `activemounts/` is as it was when it was found empty (one statx; none
    /// when nothing is known). Called with the volume locked.
    pub(super) fn still_empty(&self, name: &VolumeName, vol: &VolumeDir) -> bool {
        let Some(kept) = self.entries.lock().get(name).copied() else {
            return false;
        };
        let same = matches!(FileStamp::of(&vol.active_mounts()), Ok(Some(now)) if now == kept);
        if !same {
            self.forget(name);
        }
        same
    }

    /// Notes that `activemounts/` had stamp `stamp` while it held nothing. Called with the
    /// volume locked.
    pub(super) fn note(&self, name: &VolumeName, stamp: FileStamp) {
        self.entries.insert(name, stamp);
    }

    /// Reads `vol`'s `activemounts/` and notes it if it holds nothing (a stamp taken before
    /// the read: what changes during it gives another). Called with the volume locked.
    pub(super) fn look(&self, name: &VolumeName, vol: &VolumeDir) {
        if let Ok(Some(stamp)) = FileStamp::of(&vol.active_mounts())
            && let Ok((records, false)) = vol.read_records_and_strays()
            && records.is_empty()
        {
            self.note(name, stamp);
        }
    }

    /// Drops what is known of `name`: a record is about to be added, or the volume is gone.
    pub(super) fn forget(&self, name: &VolumeName) {
        self.entries.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn name(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }

    fn meta(base: &str) -> Metadata {
        Metadata {
            base: PathBuf::from(base),
            volatile: false,
            created_at: None,
        }
    }

    /// A volume directory holding `metadata.json` for base `base`.
    fn volume(tmp: &tempfile::TempDir, base: &str) -> VolumeDir {
        let vol = VolumeDir::at(tmp.path().join("v"));
        std::fs::create_dir(&vol.path).unwrap();
        vol.write_metadata(&meta(base)).unwrap();
        vol
    }

    /// Swaps the kept metadata for `fake`, keeping its stamp: what a read returns after that
    /// comes from memory.
    fn plant(cache: &MetadataCache, name: &VolumeName, fake: Metadata) {
        cache.entries().get_mut(name).unwrap().metadata = fake;
    }

    #[test]
    fn an_unchanged_file_is_not_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(&tmp, "/a");
        let cache = MetadataCache::default();
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/a"));
        assert!(cache.holds(&name("v")));
        plant(&cache, &name("v"), meta("/from-memory"));
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/from-memory"));
    }

    #[test]
    fn a_replaced_file_is_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(&tmp, "/a");
        let cache = MetadataCache::default();
        cache.read(&name("v"), &vol).unwrap();
        plant(&cache, &name("v"), meta("/stale"));
        // As the admin commands change it: a new file renamed over the old, same size.
        vol.write_metadata(&meta("/b")).unwrap();
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/b"));
    }

    #[test]
    fn a_file_edited_in_place_is_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(&tmp, "/a");
        let cache = MetadataCache::default();
        let json = |base: &str| serde_json::to_vec(&meta(base)).unwrap();

        // Another size.
        cache.read(&name("v"), &vol).unwrap();
        plant(&cache, &name("v"), meta("/stale"));
        std::fs::write(vol.metadata(), json("/longer")).unwrap();
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/longer"));

        // The same size: only the times differ. Kernels before multigrain timestamps can give
        // two writes within one clock tick the same times, so the test sets them apart.
        plant(&cache, &name("v"), meta("/stale"));
        let file = std::fs::File::options()
            .write(true)
            .truncate(true)
            .open(vol.metadata())
            .unwrap();
        std::io::Write::write_all(&mut &file, &json("/other!")).unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        drop(file);
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/other!"));
    }

    #[test]
    fn only_what_parses_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(&tmp, "/a");
        let cache = MetadataCache::default();
        cache.read(&name("v"), &vol).unwrap();
        std::fs::write(vol.metadata(), "{oops").unwrap();
        let err = cache.read(&name("v"), &vol).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(!cache.holds(&name("v")), "damaged metadata kept");

        let missing = VolumeDir::at(tmp.path().join("nope"));
        let err = cache.read(&name("nope"), &missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            !cache.holds(&name("nope")),
            "a name that never existed kept"
        );

        // A volume gone since it was read is dropped at the next ask.
        std::fs::write(vol.metadata(), serde_json::to_vec(&meta("/a")).unwrap()).unwrap();
        cache.read(&name("v"), &vol).unwrap();
        std::fs::remove_dir_all(&vol.path).unwrap();
        assert!(cache.read(&name("v"), &vol).is_err());
        assert!(!cache.holds(&name("v")));
    }

    #[test]
    fn the_cache_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(&tmp, "/a");
        let cache = MetadataCache::default();
        cache.read(&name("v"), &vol).unwrap();
        let stamp = cache.entries()[&name("v")].stamp;
        for i in 1..MAX_ENTRIES {
            cache.entries().insert(
                name(&format!("f{i}")),
                Entry {
                    stamp,
                    metadata: meta("/f"),
                },
            );
        }
        // Full: a kept volume's entry is replaced in place...
        vol.write_metadata(&meta("/b")).unwrap();
        assert_eq!(cache.read(&name("v"), &vol).unwrap(), meta("/b"));
        assert_eq!(cache.entries().len(), MAX_ENTRIES);
        // ... and a new one starts the cache again.
        std::fs::rename(&vol.path, tmp.path().join("w")).unwrap();
        let w = VolumeDir::at(tmp.path().join("w"));
        cache.read(&name("w"), &w).unwrap();
        assert_eq!(cache.entries().len(), 1);
        assert!(cache.holds(&name("w")));
    }
}
