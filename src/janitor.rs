//! Background deletion of the trash: discarded uppers of volatile volumes, removed volumes and
//! abandoned staging directories.
//!
//! Deleting an upper costs time proportional to its size (about 1 s per 100,000 files), so
//! requests only *rename* things into `ROOT/.trash` (constant time) and this thread deletes
//! them later. A deletion interrupted by a crash or a stop is simply finished by the next
//! process. This is the only work any request leaves for after its answer. This module must
//! never touch anything outside the trash, except that it moves an abandoned `.new-*` staging
//! directory (one whose creator no longer holds its lock) into it, and the `.spare/` directory
//! that docker-on-top 0.2.0 made, which nothing uses any more.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::store::{self, Root, STAGING_PREFIX};

/// Left in the state root by docker-on-top 0.2.0 (files made ahead to become mount records).
const OLD_SPARE_DIR: &str = ".spare";

/// Handle to the janitor thread; dropping it (and its clones) lets the thread finish its
/// current pass and end.
#[derive(Debug, Clone)]
pub struct Janitor {
    kick: mpsc::Sender<()>,
}

impl Janitor {
    /// Starts the thread; it makes one pass at once (finishing earlier processes' deletions).
    pub fn start(root: Root) -> std::io::Result<Self> {
        let (kick, wake) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("janitor".into())
            .spawn(move || {
                // Background work: the lowest CPU priority (nice 19, this thread only), so
                // that requests never wait for a CPU while it deletes a large upper.
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
                let old_spares = root.path().join(OLD_SPARE_DIR);
                if old_spares.exists() {
                    let _ = std::fs::rename(&old_spares, root.trash_slot("spare"));
                }
                sweep(&root);
                while wake.recv().is_ok() {
                    // Several kicks while we were busy need only one more pass.
                    while wake.try_recv().is_ok() {}
                    sweep(&root);
                }
            })?;
        Ok(Self { kick })
    }

    /// Asks for a pass over the trash.
    pub fn kick(&self) {
        let _ = self.kick.send(());
    }
}

/// One pass: moves abandoned staging directories to the trash, then empties the trash.
pub fn sweep(root: &Root) {
    if let Ok(entries) = std::fs::read_dir(root.path()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(STAGING_PREFIX) && is_abandoned(&entry.path()) {
                let slot = root.trash_slot("staging");
                if let Err(e) = std::fs::rename(entry.path(), &slot) {
                    log::warn!("cannot move abandoned {:?} to the trash: {e}", entry.path());
                }
                failpoint!("janitor.staging-moved");
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(root.trash()) else {
        return;
    };
    let items: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    for item in items {
        let started = std::time::Instant::now();
        match delete(&item) {
            Ok(()) => log::debug!("deleted {item:?} in {:?}", started.elapsed()),
            Err(e) => log::warn!("cannot delete {item:?} from the trash: {e}"),
        }
        failpoint!("janitor.deleted");
    }
}

/// Deletes one entry of the trash, a directory with everything in it. Another process may be
/// deleting the same entry (the daemon's janitor, an admin command): what it deleted first is
/// not an error.
pub fn delete(item: &Path) -> std::io::Result<()> {
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let result = if item.is_dir() && !item.is_symlink() {
        // A racing deleter makes entries vanish under remove_dir_all: try again.
        std::fs::remove_dir_all(item).or_else(|e| {
            if not_found(&e) && item.exists() {
                std::fs::remove_dir_all(item)
            } else {
                Err(e)
            }
        })
    } else {
        std::fs::remove_file(item)
    };
    match result {
        Err(e) if !not_found(&e) => Err(e),
        _ => Ok(()),
    }
}

/// A staging directory is abandoned when nobody holds its lock and its creator cannot be in
/// the moment between its mkdir and its lock: the creator, whose pid the name carries, is gone
/// (a reused pid only delays this), or a minute has passed.
fn is_abandoned(dir: &Path) -> bool {
    let Ok(f) = File::open(dir) else { return false };
    let creator_gone = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(store::staging_creator)
        .and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
        .is_some_and(|pid| rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH));
    let old = || {
        f.metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60))
    };
    if !creator_gone && !old() {
        return false;
    }
    match f.try_lock() {
        Ok(()) => true,
        Err(TryLockError::WouldBlock) => false,
        Err(TryLockError::Error(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_of_a_dead_creator_goes_at_once_a_live_or_locked_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(&tmp.path().join("root")).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let of_dead = root.path().join(format!(".new-v-{dead}-1-0"));
        let of_live = root
            .path()
            .join(format!(".new-v-{}-1-0", std::process::id()));
        let locked = root.path().join(format!(".new-w-{dead}-1-1"));
        for dir in [&of_dead, &of_live, &locked] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("metadata.json"), "{}").unwrap();
        }
        let lock = File::open(&locked).unwrap();
        lock.lock().unwrap();
        sweep(&root);
        assert!(
            !of_dead.exists(),
            "abandoned staging of a dead creator kept"
        );
        assert!(
            of_live.exists(),
            "staging taken in its creator's grace period"
        );
        assert!(locked.exists(), "locked staging taken");
        assert_eq!(std::fs::read_dir(root.trash()).unwrap().count(), 0);
    }
}
