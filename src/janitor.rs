//! Background deletion of the trash: discarded uppers of volatile volumes, removed volumes and
//! abandoned staging directories.
//!
//! Deleting an upper costs time proportional to its size (about 1 s per 100,000 files), so
//! requests only *rename* things into `ROOT/.trash` (constant time) and this thread deletes
//! them later. A deletion interrupted by a crash or a stop is simply finished by the next
//! process. This module must never touch anything outside the trash, except that it moves an
//! abandoned `.new-*` staging directory (one whose creator no longer holds its lock) into it.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::store::{Root, STAGING_PREFIX};

/// Handle to the janitor thread; dropping it lets the thread finish its current pass and end.
#[derive(Debug)]
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
                sweep(&root);
                while wake.recv().is_ok() {
                    // Several kicks while we were busy need only one more pass.
                    while wake.try_recv().is_ok() {}
                    sweep(&root);
                }
            })?;
        Ok(Self { kick })
    }

    /// Asks for a pass soon.
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

/// A staging directory is abandoned when nobody holds its lock (its creator died). A minute's
/// grace covers the moment between its creator's mkdir and lock.
fn is_abandoned(dir: &Path) -> bool {
    let Ok(f) = File::open(dir) else { return false };
    let old = f
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > std::time::Duration::from_secs(60));
    if !old {
        return false;
    }
    match f.try_lock() {
        Ok(()) => true,
        Err(TryLockError::WouldBlock) => false,
        Err(TryLockError::Error(_)) => false,
    }
}
