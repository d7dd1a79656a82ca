//! Open directories, and entries reached by name relative to them.
//!
//! A container can make a tree whose paths are longer than PATH_MAX (4096 bytes): the kernel
//! refuses any call given such a path whole (`ENAMETOOLONG`). So the admin commands never pass
//! one: they open each directory on the way down by its name in the one above ([`Dir`]), and
//! do everything else by a name relative to an open directory (the `*at` calls). Whole paths
//! are still kept, for messages and outputs only.
//!
//! Nothing here follows a symlink, except [`Dir::open`], which opens a tree's root by its
//! (short) path as the callers always did. What std has no `*at` form for goes through
//! [`Dir::proc_path`], a short path the kernel resolves through the open directory.
//!
//! [`Cursor`] keeps open the directories along one path, for visiting a tree's entries in
//! tree order, each through its parent.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};

use super::PathError;

/// An open directory.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An entry's attributes, as `lstat` gives them. (std's `Metadata` is had only from a path,
/// which may be too long, or from an open file, which costs an `open` per entry.)
#[derive(Debug, Clone, Copy)]
pub struct Stat(rustix::fs::Stat);

// The fields' types differ between architectures (`struct stat` is the kernel's).
#[allow(clippy::unnecessary_cast)]
impl Stat {
    /// `lstat` of `path`; `None` when nothing is there.
    pub fn of_path(path: &Path) -> io::Result<Option<Stat>> {
        match rustix::fs::lstat(path) {
            Ok(st) => Ok(Some(Stat(st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.0.st_mode as _)
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == FileType::Directory
    }
    /// A whiteout: the character device 0/0 overlayfs leaves for a deleted base entry.
    pub fn is_whiteout(&self) -> bool {
        self.kind() == FileType::CharacterDevice && self.rdev() == 0
    }
    /// Type and permission bits, as `st_mode`.
    pub fn mode(&self) -> u32 {
        self.0.st_mode as u32
    }
    pub fn uid(&self) -> u32 {
        self.0.st_uid as u32
    }
    pub fn gid(&self) -> u32 {
        self.0.st_gid as u32
    }
    pub fn dev(&self) -> u64 {
        self.0.st_dev as u64
    }
    pub fn ino(&self) -> u64 {
        self.0.st_ino as u64
    }
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink as u64
    }
    pub fn rdev(&self) -> u64 {
        self.0.st_rdev as u64
    }
    pub fn len(&self) -> u64 {
        self.0.st_size as u64
    }
    /// Access time: seconds and nanoseconds.
    pub fn atime(&self) -> (i64, i64) {
        (self.0.st_atime as i64, self.0.st_atime_nsec as i64)
    }
    /// Modification time: seconds and nanoseconds.
    pub fn mtime(&self) -> (i64, i64) {
        (self.0.st_mtime as i64, self.0.st_mtime_nsec as i64)
    }
}

/// Flags that open a directory and nothing else, never through a symlink.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens the directory at `path`, following symlinks (a tree's root, by the path the
    /// caller was given; `/proc/self/fd/N` works too).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(rustix::fs::CWD, path, flags, Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the directory `name` in this one; a symlink there is an error (`ENOTDIR`).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let fd = rustix::fs::openat(self, name, DIR_FLAGS, Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the directory `rel` below this one, one name at a time.
    pub fn open_path(&self, rel: &Path) -> io::Result<Dir> {
        let mut dir = self.open_dir(OsStr::new("."))?;
        for c in rel.components() {
            if let Component::Normal(name) = c {
                dir = dir.open_dir(name)?;
            }
        }
        Ok(dir)
    }

    /// The names in this directory, sorted bytewise (without `.` and `..`).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(self)? {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name));
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    /// `lstat` of `name` (one `fstatat`); `None` when nothing is there.
    pub fn lstat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(self, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat(st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `/proc/self/fd/N/NAME`: a short path to the entry `name` of this directory, for the
    /// calls that only take a path (the xattr ones, with their `l` forms that do not follow a
    /// symlink at `name`). The kernel goes from `/proc/self/fd/N` straight to this directory.
    pub fn proc_path(&self, name: &OsStr) -> PathBuf {
        Path::new(&format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name)
    }

    /// Opens the file `name` for reading; a symlink there is an error.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(self, name, flags, Mode::empty())?.into())
    }

    /// Creates the file `name`, which must not exist, for writing; mode 0600.
    pub fn create_file(&self, name: &OsStr) -> io::Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o600);
        Ok(rustix::fs::openat(self, name, flags, mode)?.into())
    }

    /// Creates the directory `name`; mode 0700 (its caller sets the one it wants).
    pub fn create_dir(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::mkdirat(self, name, Mode::from_raw_mode(0o700))?)
    }

    /// Creates a FIFO or device node `name`; mode 0600.
    pub fn mknod(&self, name: &OsStr, kind: FileType, dev: u64) -> io::Result<()> {
        Ok(rustix::fs::mknodat(
            self,
            name,
            kind,
            Mode::from_raw_mode(0o600),
            dev,
        )?)
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<PathBuf> {
        let target = rustix::fs::readlinkat(self, name, Vec::new())?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// Creates the symlink `name` pointing to `target`.
    pub fn symlink(&self, target: &Path, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, self, name)?)
    }

    /// Makes `name` here a hard link to `from_name` of `from` (a symlink itself, not its
    /// target).
    pub fn hard_link(&self, from: &Dir, from_name: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::linkat(
            from,
            from_name,
            self,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Sets the owner of `name` (a symlink itself, not its target).
    pub fn chown(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        // A file's owner is never -1, the number that means "leave it".
        let (uid, gid) = (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        );
        Ok(rustix::fs::chownat(
            self,
            name,
            Some(uid),
            Some(gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Sets the mode of `name`, which must not be a symlink (Linux cannot set a symlink's
    /// mode, and `chmod` would change its target's).
    pub fn chmod(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let mode = Mode::from_raw_mode(mode);
        Ok(rustix::fs::chmodat(self, name, mode, AtFlags::empty())?)
    }

    /// Sets the times of `name` (a symlink itself, not its target).
    pub fn set_times(&self, name: &OsStr, times: &Timestamps) -> io::Result<()> {
        Ok(rustix::fs::utimensat(
            self,
            name,
            times,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Renames `from` to `to`, both in this directory; `to` is replaced unless it is a
    /// directory.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::renameat(self, from, self, to)?)
    }

    /// Removes the file, symlink or special file `name`.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(self, name, AtFlags::empty())?)
    }

    /// Removes whatever is at `name`, a directory with everything in it (never following a
    /// symlink); nothing there is fine.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        let gone_is_fine = |result: rustix::io::Result<()>| match result {
            Err(rustix::io::Errno::NOENT) => Ok(()),
            other => Ok(other?),
        };
        match self.lstat(name)? {
            None => return Ok(()),
            Some(meta) if !meta.is_dir() => {
                return gone_is_fine(rustix::fs::unlinkat(self, name, AtFlags::empty()));
            }
            Some(_) => {}
        }
        // Depth first, without recursion: the directories being emptied, from `name` down,
        // each with its name and the names it has left.
        let top = self.open_dir(name)?;
        let mut open = vec![(name.to_os_string(), top.names()?.into_iter(), top)];
        while let Some((_, names_left, dir)) = open.last_mut() {
            let Some(child) = names_left.next() else {
                let (name, _, dir) = open.pop().expect("not empty");
                drop(dir);
                let parent = open.last().map_or(self, |(_, _, dir)| dir);
                gone_is_fine(rustix::fs::unlinkat(parent, &name, AtFlags::REMOVEDIR))?;
                continue;
            };
            match dir.lstat(&child)? {
                Some(meta) if meta.is_dir() => {
                    let below = dir.open_dir(&child)?;
                    open.push((child, below.names()?.into_iter(), below));
                }
                Some(_) => gone_is_fine(rustix::fs::unlinkat(&*dir, &child, AtFlags::empty()))?,
                None => {}
            }
        }
        Ok(())
    }
}

/// An entry reached through its open parent directory: `name` in `dir`. `path` is its whole
/// path, only for messages.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub dir: &'a Dir,
    pub name: &'a OsStr,
    pub path: &'a Path,
}

impl<'a> Place<'a> {
    /// The open directory `dir`, at `path`, itself: its entry `.`.
    pub fn itself(dir: &'a Dir, path: &'a Path) -> Self {
        Place {
            dir,
            name: OsStr::new("."),
            path,
        }
    }
}

/// The directories along one path of a tree, kept open: [`Cursor::dir_of`] gives the open
/// parent directory of a path relative to the root, opening and closing directories as the
/// path moves. Visiting paths in tree order opens each directory about once.
#[derive(Debug)]
pub struct Cursor {
    root: Dir,
    /// The names from the root down, each with its open directory.
    open: Vec<(OsString, Dir)>,
}

impl Cursor {
    pub fn new(root: Dir) -> Self {
        Self {
            root,
            open: Vec::new(),
        }
    }

    /// The open directory that holds `rel` (relative to the root, not empty), opened one name
    /// at a time, never through a symlink.
    pub fn dir_of(&mut self, rel: &Path) -> io::Result<&Dir> {
        let parents: Vec<&OsStr> = rel
            .parent()
            .unwrap_or(Path::new(""))
            .components()
            .filter_map(|c| match c {
                Component::Normal(name) => Some(name),
                _ => None,
            })
            .collect();
        let same = (self.open.iter())
            .zip(&parents)
            .take_while(|((open, _), name)| open == *name)
            .count();
        self.open.truncate(same);
        for name in &parents[same..] {
            let dir = self.top().open_dir(name)?;
            self.open.push((name.to_os_string(), dir));
        }
        Ok(self.top())
    }

    /// The entry `rel` (relative to the root, not empty) as a [`Place`], through its open
    /// parent directory; `path`, its whole path, is what messages show.
    pub fn place<'a>(&'a mut self, rel: &'a Path, path: &'a Path) -> Result<Place<'a>, PathError> {
        let dir =
            (self.dir_of(rel)).map_err(|e| PathError::new("opening the directory of", path, e))?;
        Ok(Place {
            dir,
            name: rel.file_name().unwrap_or_default(),
            path,
        })
    }

    fn top(&self) -> &Dir {
        self.open.last().map_or(&self.root, |(_, dir)| dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn works_below_path_max_and_never_follows_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open(tmp.path()).unwrap();
        // 3000 levels of "dd/": 9000 bytes, more than any whole path may be.
        let name = OsStr::new("dd");
        let mut dir = root.open_dir(OsStr::new(".")).unwrap();
        let mut rel = PathBuf::new();
        for _ in 0..3000 {
            dir.create_dir(name).unwrap();
            dir = dir.open_dir(name).unwrap();
            rel.push(name);
        }
        dir.create_file(OsStr::new("f")).unwrap();
        let deep = rel.join("f");
        assert!(std::fs::symlink_metadata(tmp.path().join(&deep)).is_err());
        let mut cursor = Cursor::new(Dir::open(tmp.path()).unwrap());
        let parent = cursor.dir_of(&deep).unwrap();
        assert!(parent.lstat(OsStr::new("f")).unwrap().unwrap().kind() == FileType::RegularFile);
        assert_eq!(parent.names().unwrap(), ["f"]);
        // Back up to the root, and down again.
        assert_eq!(
            cursor.dir_of(Path::new("dd")).unwrap().names().unwrap(),
            ["dd"]
        );
        assert!(cursor.dir_of(&deep).is_ok());

        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("link")).unwrap();
        let err = root.open_dir(OsStr::new("link")).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOTDIR.raw_os_error())
        );
        assert!(root.lstat(OsStr::new("link")).unwrap().unwrap().kind() == FileType::Symlink);
        assert!(root.lstat(OsStr::new("none")).unwrap().is_none());
        root.remove_all(OsStr::new("link")).unwrap();
        assert!(tmp.path().join("dd").exists(), "the symlink was followed");
        root.remove_all(OsStr::new("dd")).unwrap();
        assert_eq!(root.names().unwrap(), Vec::<OsString>::new());
    }
}
