//! `recover`: the added and changed entries of a volume, copied out into a directory.
//!
//! The copy mirrors the upper directory without overlay's bookkeeping: every directory that
//! leads to a change (so that each path keeps its place), every added or changed file, symlink,
//! FIFO and device node, with owner, mode, data xattrs and access and modification times.
//! Whiteouts and overlay's xattrs are never copied; deleted paths are only reported. Hard
//! links among the copied files are kept. Sockets are skipped (nothing could use a copy).

use std::path::{Path, PathBuf};

use super::PathError;
use super::fsops::{self, Copier, Made};
use super::tree::{Plan, What};

/// What `recover` did.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Directories, files, symlinks and special files created under the destination.
    pub entries: u64,
    /// Bytes of regular files copied.
    pub bytes: u64,
    /// The paths created (absolute, as in a container), in the order they were made.
    pub copied: Vec<PathBuf>,
    /// Deleted paths (absolute, as in a container), not copied.
    pub deleted: Vec<PathBuf>,
    /// Paths not copied, with the reason.
    pub skipped: Vec<(PathBuf, &'static str)>,
    /// Anything the user should know about how the changes were read.
    pub warnings: Vec<String>,
}

/// Copies the plan's added and changed entries under `dest`, an existing empty directory.
pub fn recover(plan: &Plan, dest: &Path) -> Result<Recovered, PathError> {
    let mut done = Recovered::default();
    let mut copier = Copier::default();
    let mut dirs = Vec::new();
    for item in &plan.items {
        let src = plan.upper.join(&item.path);
        let at = dest.join(&item.path);
        match &item.what {
            What::Dir { meta, .. } => {
                fsops::make_dir(&src, meta, &at)?;
                dirs.push((at, meta));
                done.entries += 1;
                done.copied.push(Path::new("/").join(&item.path));
            }
            What::Entry { meta, .. } => match copier.copy_entry(&src, meta, &at, &at)? {
                Made::Created { bytes } => {
                    done.entries += 1;
                    done.bytes += bytes;
                    done.copied.push(Path::new("/").join(&item.path));
                }
                Made::Linked => {
                    done.entries += 1;
                    done.copied.push(Path::new("/").join(&item.path));
                }
                Made::Skipped(why) => done.skipped.push((Path::new("/").join(&item.path), why)),
            },
            What::Deleted { .. } => done.deleted.push(Path::new("/").join(&item.path)),
        }
    }
    // Innermost first: creating entries in a directory changed its times.
    for (at, meta) in dirs.iter().rev() {
        fsops::set_times(at, meta)?;
    }
    Ok(done)
}
