//! `recover`: the added and changed entries of a volume, copied out into a directory.
//!
//! The copy mirrors the upper directory without overlay's bookkeeping: every directory that
//! leads to a change (so that each path keeps its place), every added or changed file, symlink,
//! FIFO and device node, with owner, mode, data xattrs and access and modification times.
//! Whiteouts and overlay's xattrs are never copied; deleted paths are only reported. Hard
//! links among the copied files are kept. Sockets are skipped (nothing could use a copy).

use std::path::{Path, PathBuf};

use super::PathError;
use super::dir::{Cursor, Dir};
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
    let open = |path: &Path| Dir::open(path).map_err(|e| PathError::new("opening", path, e));
    let mut upper = Cursor::new(open(&plan.upper)?);
    let mut out = Cursor::new(open(dest)?);
    let mut copier = Copier::new(open(dest)?);
    let mut done = Recovered::default();
    let mut dirs = Vec::new();
    for item in &plan.items {
        let shown = Path::new("/").join(&item.path);
        if let What::Deleted { .. } = item.what {
            done.deleted.push(shown);
            continue;
        }
        let (src_path, at_path) = (plan.upper.join(&item.path), dest.join(&item.path));
        let src = upper.place(&item.path, &src_path)?;
        let at = out.place(&item.path, &at_path)?;
        match &item.what {
            What::Dir { meta, .. } => {
                fsops::make_dir(src, meta, at)?;
                dirs.push((item, meta));
                done.entries += 1;
                done.copied.push(shown);
            }
            What::Entry { meta, .. } => match copier.copy_entry(src, meta, at, &item.path)? {
                Made::Created { bytes } => {
                    done.entries += 1;
                    done.bytes += bytes;
                    done.copied.push(shown);
                }
                Made::Linked => {
                    done.entries += 1;
                    done.copied.push(shown);
                }
                Made::Skipped(why) => done.skipped.push((shown, why)),
            },
            What::Deleted { .. } => unreachable!("listed above"),
        }
    }
    // Innermost first: creating entries in a directory changed its times.
    for (item, meta) in dirs.iter().rev() {
        let at_path = dest.join(&item.path);
        fsops::set_times(out.place(&item.path, &at_path)?, meta)?;
    }
    Ok(done)
}
