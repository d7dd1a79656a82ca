//! Copies of upper entries made elsewhere, with their attributes: into a recovery directory
//! (`recover`) or into the base (`commit`).
//!
//! Attributes are applied in the one order that keeps them all: owner first (chown clears
//! set-user-ID bits and file capabilities), then mode, then data xattrs, then times (last,
//! since writing anything changes them; a directory's times are set after its contents).

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps};

use super::PathError;
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

/// Copies non-directory entries, keeping the hard links among them: upper entries that are
/// one inode become one inode again.
#[derive(Debug, Default)]
pub struct Copier {
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    /// Creates at `at` (which must not exist) a copy of the upper file, symlink or special file
    /// `src` (`meta` is its lstat), with owner, mode, data xattrs and times. `final_path` is
    /// where the copy will end up once the caller renames it (the same as `at` if it won't):
    /// later hard links to the same inode are made to it.
    pub fn copy_entry(
        &mut self,
        src: &Path,
        meta: &Metadata,
        at: &Path,
        final_path: &Path,
    ) -> Result<Made, PathError> {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1
            && let Some(first) = self.links.get(&key)
        {
            std::fs::hard_link(first, at).map_err(|e| PathError::new("linking", at, e))?;
            return Ok(Made::Linked);
        }
        let ft = meta.file_type();
        let create = |e| PathError::new("creating", at, e);
        let mut bytes = 0;
        if ft.is_file() {
            let mut from = File::options()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(src)
                .map_err(|e| PathError::new("opening", src, e))?;
            let mut to = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(at)
                .map_err(create)?;
            bytes = io::copy(&mut from, &mut to).map_err(|e| PathError::new("copying", src, e))?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(src).map_err(|e| PathError::new("reading", src, e))?;
            std::os::unix::fs::symlink(target, at).map_err(create)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            let (kind, dev) = if ft.is_fifo() {
                (FileType::Fifo, 0)
            } else if ft.is_char_device() {
                (FileType::CharacterDevice, meta.rdev())
            } else {
                (FileType::BlockDevice, meta.rdev())
            };
            rustix::fs::mknodat(rustix::fs::CWD, at, kind, Mode::from_raw_mode(0o600), dev)
                .map_err(|e| create(e.into()))?;
        } else {
            return Ok(Made::Skipped("a socket cannot be copied"));
        }
        set_attributes(src, meta, at, true)?;
        set_times(at, meta)?;
        if meta.nlink() > 1 {
            self.links.insert(key, final_path.to_owned());
        }
        Ok(Made::Created { bytes })
    }
}

/// Creates the directory `at` (which must not exist) with the owner, mode and data xattrs of
/// the upper directory `src`. Its times are set by [`set_times`] once its contents are in.
pub fn make_dir(src: &Path, meta: &Metadata, at: &Path) -> Result<(), PathError> {
    std::fs::create_dir(at).map_err(|e| PathError::new("creating", at, e))?;
    set_attributes(src, meta, at, true)
}

/// Gives `at` the owner, mode and data xattrs of the upper entry `src`. `fresh`: `at` was just
/// created and has no data xattrs of its own; otherwise those `src` lacks are removed.
pub fn set_attributes(
    src: &Path,
    meta: &Metadata,
    at: &Path,
    fresh: bool,
) -> Result<(), PathError> {
    std::os::unix::fs::lchown(at, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| PathError::new("setting the owner of", at, e))?;
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| PathError::new("setting the mode of", at, e))?;
    }
    let wanted = xattr::data(src).map_err(|e| PathError::new("reading the xattrs of", src, e))?;
    let result = if fresh {
        wanted
            .iter()
            .try_for_each(|(name, value)| xattr::set(at, name, value))
    } else {
        xattr::sync(at, &wanted)
    };
    result.map_err(|e| PathError::new("setting the xattrs of", at, e))
}

/// Gives `at` (a symlink itself, not its target) the access and modification times of `meta`.
pub fn set_times(at: &Path, meta: &Metadata) -> Result<(), PathError> {
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, at, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| PathError::new("setting the times of", at, e.into()))
}

/// Removes whatever is at `path` (a directory with its contents); nothing there is fine.
pub fn remove_all(path: &Path) -> Result<(), PathError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PathError::new("removing", path, e)),
        _ => Ok(()),
    }
}
