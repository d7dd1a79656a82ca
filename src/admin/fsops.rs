//! Copies of upper entries made elsewhere, with their attributes: into a recovery directory
//! (`recover`) or into the base (`commit`).
//!
//! Attributes are applied in the one order that keeps them all: owner first (chown clears
//! set-user-ID bits and file capabilities), then mode, then data xattrs, then times (last,
//! since writing anything changes them; a directory's times are set after its contents).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Timespec, Timestamps};

use super::PathError;
use super::dir::{Dir, Place, Stat};
use super::xattr;

/// What became of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// Created with its contents and attributes (a regular file: that many bytes).
    Created { bytes: u64 },
    /// Made a hard link to an earlier copy of the same upper inode.
    Linked,
    /// Not copied; the reason.
    Skipped(&'static str),
}

/// Copies non-directory entries into one tree, keeping the hard links among them: upper
/// entries that are one inode become one inode again.
#[derive(Debug)]
pub struct Copier {
    /// The tree the copies go into.
    root: Dir,
    /// The first copy of each inode with more than one link, relative to `root`.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    /// Copies into the tree whose root is open as `root`.
    pub fn new(root: Dir) -> Self {
        Self {
            root,
            links: HashMap::new(),
        }
    }

    /// Creates at `at` (which must not exist) a copy of the upper file, symlink or special file
    /// `src` (`meta` is its lstat), with owner, mode, data xattrs and times. `final_rel` is
    /// where the copy will end up, relative to the root, once the caller renames it (the same
    /// place as `at` if it won't): later hard links to the same inode are made to it.
    pub fn copy_entry(
        &mut self,
        src: Place,
        meta: &Stat,
        at: Place,
        final_rel: &Path,
    ) -> Result<Made, PathError> {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1
            && let Some(first) = self.links.get(&key)
        {
            let name = first.file_name().unwrap_or_default();
            self.root
                .open_path(first.parent().unwrap_or(Path::new("")))
                .and_then(|dir| at.dir.hard_link(&dir, name, at.name))
                .map_err(|e| PathError::new("linking", at.path, e))?;
            return Ok(Made::Linked);
        }
        let create = |e| PathError::new("creating", at.path, e);
        let mut bytes = 0;
        match meta.kind() {
            FileType::RegularFile => {
                let mut from = (src.dir.open_file(src.name))
                    .map_err(|e| PathError::new("opening", src.path, e))?;
                let mut to = at.dir.create_file(at.name).map_err(create)?;
                bytes = io::copy(&mut from, &mut to)
                    .map_err(|e| PathError::new("copying", src.path, e))?;
            }
            FileType::Symlink => {
                let target = (src.dir.read_link(src.name))
                    .map_err(|e| PathError::new("reading", src.path, e))?;
                at.dir.symlink(&target, at.name).map_err(create)?;
            }
            kind @ FileType::Fifo => at.dir.mknod(at.name, kind, 0).map_err(create)?,
            kind @ (FileType::CharacterDevice | FileType::BlockDevice) => {
                at.dir.mknod(at.name, kind, meta.rdev()).map_err(create)?
            }
            _ => return Ok(Made::Skipped("a socket cannot be copied")),
        }
        set_attributes(src, meta, at, true)?;
        set_times(at, meta)?;
        if meta.nlink() > 1 {
            self.links.insert(key, final_rel.to_owned());
        }
        Ok(Made::Created { bytes })
    }
}

/// Creates the directory `at` (which must not exist) with the owner, mode and data xattrs of
/// the upper directory `src`. Its times are set by [`set_times`] once its contents are in.
pub fn make_dir(src: Place, meta: &Stat, at: Place) -> Result<(), PathError> {
    (at.dir.create_dir(at.name)).map_err(|e| PathError::new("creating", at.path, e))?;
    set_attributes(src, meta, at, true)
}

/// Gives `at` the owner, mode and data xattrs of the upper entry `src`. `fresh`: `at` was just
/// created and has no data xattrs of its own; otherwise those `src` lacks are removed.
pub fn set_attributes(src: Place, meta: &Stat, at: Place, fresh: bool) -> Result<(), PathError> {
    (at.dir.chown(at.name, meta.uid(), meta.gid()))
        .map_err(|e| PathError::new("setting the owner of", at.path, e))?;
    if meta.kind() != FileType::Symlink {
        (at.dir.chmod(at.name, meta.mode() & 0o7777))
            .map_err(|e| PathError::new("setting the mode of", at.path, e))?;
    }
    let wanted = xattr::data(&src.dir.proc_path(src.name))
        .map_err(|e| PathError::new("reading the xattrs of", src.path, e))?;
    let to = at.dir.proc_path(at.name);
    let result = if fresh {
        wanted
            .iter()
            .try_for_each(|(name, value)| xattr::set(&to, name, value))
    } else {
        xattr::sync(&to, &wanted)
    };
    result.map_err(|e| PathError::new("setting the xattrs of", at.path, e))
}

/// Gives `at` (a symlink itself, not its target) the access and modification times of `meta`.
pub fn set_times(at: Place, meta: &Stat) -> Result<(), PathError> {
    let timespec = |(tv_sec, tv_nsec): (i64, i64)| Timespec {
        tv_sec,
        tv_nsec: tv_nsec as _,
    };
    let times = Timestamps {
        last_access: timespec(meta.atime()),
        last_modification: timespec(meta.mtime()),
    };
    (at.dir.set_times(at.name, &times))
        .map_err(|e| PathError::new("setting the times of", at.path, e))
}

/// Removes whatever is at `at` (a directory with its contents); nothing there is fine.
pub fn remove_all(at: Place) -> Result<(), PathError> {
    (at.dir.remove_all(at.name)).map_err(|e| PathError::new("removing", at.path, e))
}
