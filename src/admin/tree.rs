//! What a volume changed: its upper directory read against its base, the way overlayfs merges
//! them.
//!
//! The upper holds every entry a container added or changed, under its full path, plus every
//! directory on the way to one. Two kinds of upper entries are overlay's bookkeeping rather
//! than data: a **whiteout** (a character device 0/0) stands for a base entry that was
//! deleted, and an **opaque** directory (xattr `trusted.overlay.opaque="y"`, or
//! `user.overlay.opaque`) replaced the base directory of that name, so that nothing of the
//! base shows below it: overlayfs never looks into the base under an opaque directory.
//!
//! [`Plan::read`] turns that into [`Item`]s, one per path that differs or leads to one, in
//! tree order (each directory before its contents, names sorted bytewise). The rules, which
//! `changes`, `recover`, `export` and `commit` all follow:
//!
//! - An upper entry whose path exists in the base (any type) is **changed** (`C`), otherwise
//!   **added** (`A`). A directory that exists in both and whose contents are merged is a
//!   change only if its own attributes (type and mode, owner, mtime, data xattrs) differ: it
//!   may just be the parent of changes, as `docker diff` has it. Overlayfs keeps the
//!   parents' times when it copies up an entry, so a changed file does not mark its parents.
//! - A whiteout is a **deletion** (`D`) of the base entry of that name. A whiteout of a path
//!   the base no longer has hides nothing and is ignored.
//! - An opaque directory over a base directory is changed, and below it the base is replaced,
//!   not merged: every base entry under it that the upper does not have again is deleted; one
//!   the upper has again is changed (it exists before and after; its contents are not
//!   compared), and a directory of those is replaced in turn. A deleted directory is reported
//!   once, not with everything below it.
//! - An upper directory over a base entry that is not a directory is changed, and everything
//!   below it is added: nothing of the base is merged there either.
//! - The volume's root directory itself is never reported.
//!
//! An upper written by a mount with `redirect_dir=on` or `metacopy=on` (docker-on-top always
//! turns both off; a Go-version mount on a kernel that enables them by default might not) has
//! entries whose data lives under another base path; such an upper is refused rather than
//! misread.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::PathError;
use super::dir::{Dir, Place, Stat};
use super::xattr;

/// How a path differs from the base, with `docker diff`'s letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ChangeKind {
    #[serde(rename = "A")]
    Added,
    #[serde(rename = "C")]
    Changed,
    #[serde(rename = "D")]
    Deleted,
}

impl ChangeKind {
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Added => 'A',
            ChangeKind::Changed => 'C',
            ChangeKind::Deleted => 'D',
        }
    }
}

/// One line of `docker-on-top changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Change {
    pub kind: ChangeKind,
    /// Absolute, as seen inside a container: `/dir/file`.
    #[serde(serialize_with = "super::lossy_path")]
    pub path: PathBuf,
}

/// What an [`Item`] is.
#[derive(Debug, Clone)]
pub enum What {
    /// A directory of the upper; `change` is `None` for a directory that only leads to
    /// changes. `opaque`: it replaced a base directory, whose contents are all hidden (the
    /// top of such a replacement only: below it everything is replaced too).
    Dir {
        meta: Stat,
        change: Option<ChangeKind>,
        opaque: bool,
    },
    /// A file, symlink or special file of the upper.
    Entry { meta: Stat, change: ChangeKind },
    /// A base entry that is gone: marked by a whiteout, or hidden by an opaque directory above.
    Deleted { whiteout: bool },
}

/// One path of the plan.
#[derive(Debug, Clone)]
pub struct Item {
    /// Relative to the volume's root; never empty.
    pub path: PathBuf,
    pub what: What,
}

impl Item {
    /// The last name of its path.
    pub fn name(&self) -> &OsStr {
        self.path.file_name().unwrap_or_default()
    }

    pub fn change(&self) -> Option<ChangeKind> {
        match &self.what {
            What::Dir { change, .. } => *change,
            What::Entry { change, .. } => Some(*change),
            What::Deleted { .. } => Some(ChangeKind::Deleted),
        }
    }
}

/// A volume's changes, read from its upper directory against its base.
#[derive(Debug, Clone)]
pub struct Plan {
    pub upper: PathBuf,
    /// The base directory, `None` when it is missing (everything then counts as added).
    pub base: Option<PathBuf>,
    /// In tree order: every directory before its contents, names sorted bytewise.
    pub items: Vec<Item>,
}

/// How the base is consulted below a directory of the upper.
enum Base {
    /// Nothing of the base shows here: the base has no directory at this path.
    Absent,
    /// Merged: base entries show unless whited out.
    Merge(Dir),
    /// Replaced: the upper directory is (or lies inside) an opaque one; base entries only
    /// tell what was deleted and what is changed rather than added.
    Replace(Dir),
}

/// An upper directory being read: the entries left to visit, in order.
struct Frame {
    upper: Dir,
    base: Base,
    children: std::vec::IntoIter<(OsString, Option<Stat>)>,
}

/// `lstat`, `None` when nothing is there.
fn lstat(path: &Path) -> Result<Option<Stat>, PathError> {
    Stat::of_path(path).map_err(|e| PathError::new("looking at", path, e))
}

/// The names in the directory at `path`, sorted bytewise.
fn names(dir: &Dir, path: &Path) -> Result<Vec<OsString>, PathError> {
    dir.names().map_err(|e| PathError::new("reading", path, e))
}

/// `lstat` of an entry; `None` when nothing is there.
fn lstat_at(at: Place) -> Result<Option<Stat>, PathError> {
    (at.dir.lstat(at.name)).map_err(|e| PathError::new("looking at", at.path, e))
}

/// Opens the directory of an entry, to read it.
fn open_dir(at: Place) -> Result<Dir, PathError> {
    (at.dir.open_dir(at.name)).map_err(|e| PathError::new("reading", at.path, e))
}

/// Reads some xattr information of an entry.
fn xattrs<T>(at: Place, read: fn(&Path) -> io::Result<T>) -> Result<T, PathError> {
    read(&at.dir.proc_path(at.name))
        .map_err(|e| PathError::new("reading the xattrs of", at.path, e))
}

/// Whether a directory present in upper and base shows other attributes than the base's.
fn dir_differs(upper: Place, um: &Stat, base: Place, bm: &Stat) -> Result<bool, PathError> {
    if um.mode() != bm.mode()
        || um.uid() != bm.uid()
        || um.gid() != bm.gid()
        || um.mtime() != bm.mtime()
    {
        return Ok(true);
    }
    Ok(xattrs(upper, xattr::data)? != xattrs(base, xattr::data)?)
}

impl Plan {
    /// Reads the upper directory `upper` against the base directory `base` (canonical; `None`
    /// when missing). A missing upper has no changes.
    pub fn read(upper: &Path, base: Option<&Path>) -> Result<Plan, PathError> {
        let mut plan = Plan {
            upper: upper.to_owned(),
            base: base.map(Path::to_owned),
            items: Vec::new(),
        };
        if lstat(upper)?.is_some_and(|m| m.is_dir()) {
            let upper_dir = Dir::open(upper).map_err(|e| PathError::new("reading", upper, e))?;
            let base = match base {
                Some(b) => Base::Merge(Dir::open(b).map_err(|e| PathError::new("reading", b, e))?),
                None => Base::Absent,
            };
            // Depth first, without recursion (a container may nest directories very deep):
            // the directories being read, from the root down, and `rel`, the path of the
            // deepest.
            let mut rel = PathBuf::new();
            let mut open = vec![plan.frame(&rel, upper_dir, base)?];
            while let Some(frame) = open.last_mut() {
                let Some((name, meta)) = frame.children.next() else {
                    open.pop();
                    rel.pop();
                    continue;
                };
                if let Some((upper_dir, base)) =
                    plan.visit(&rel, &frame.upper, &frame.base, &name, meta)?
                {
                    rel.push(&name);
                    open.push(plan.frame(&rel, upper_dir, base)?);
                }
            }
        }
        Ok(plan)
    }

    /// Lists the upper directory `rel` (open as `upper_dir`): its entries, with the base
    /// entries it hides when it replaced a base directory.
    fn frame(&self, rel: &Path, upper_dir: Dir, base: Base) -> Result<Frame, PathError> {
        let upper_path = self.upper.join(rel);
        let mut children: Vec<(OsString, Option<Stat>)> = Vec::new();
        let mut present = Vec::new(); // upper names that are not whiteouts
        for name in names(&upper_dir, &upper_path)? {
            let path = upper_path.join(&name);
            let meta = lstat_at(Place {
                dir: &upper_dir,
                name: &name,
                path: &path,
            })?;
            // Gone while we read (the volume is mounted and in use): nothing to report.
            let Some(meta) = meta else { continue };
            if !meta.is_whiteout() {
                present.push(name.clone());
            }
            children.push((name, Some(meta)));
        }
        if let (Base::Replace(base_dir), Some(base_root)) = (&base, &self.base) {
            for name in names(base_dir, &base_root.join(rel))? {
                if present
                    .binary_search_by(|p| p.as_bytes().cmp(name.as_bytes()))
                    .is_err()
                {
                    children.push((name, None));
                }
            }
            children.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }
        Ok(Frame {
            upper: upper_dir,
            base,
            children: children.into_iter(),
        })
    }

    /// Adds the item for the entry `name` of the upper directory `rel` (`meta`: its lstat;
    /// `None` for a base entry that an opaque directory hides). A directory to read next is
    /// returned, open, with how the base is consulted below it.
    fn visit(
        &mut self,
        rel: &Path,
        upper_dir: &Dir,
        base: &Base,
        name: &OsStr,
        meta: Option<Stat>,
    ) -> Result<Option<(Dir, Base)>, PathError> {
        let path = rel.join(name);
        let upper_path = self.upper.join(&path);
        let upper_at = Place {
            dir: upper_dir,
            name,
            path: &upper_path,
        };
        let base_path = self
            .base
            .as_ref()
            .map(|b| b.join(&path))
            .unwrap_or_default();
        let base_at = match base {
            Base::Absent => None,
            Base::Merge(dir) | Base::Replace(dir) => Some(Place {
                dir,
                name,
                path: &base_path,
            }),
        };
        let Some(meta) = meta else {
            // A base entry the opaque directory above replaced without it.
            self.items.push(Item {
                path,
                what: What::Deleted { whiteout: false },
            });
            return Ok(None);
        };
        if meta.is_whiteout() {
            if let (Base::Merge(_), Some(at)) = (base, base_at)
                && lstat_at(at)?.is_some()
            {
                self.items.push(Item {
                    path,
                    what: What::Deleted { whiteout: true },
                });
            }
            return Ok(None);
        }
        if let Some(feature) = xattrs(upper_at, xattr::foreign_feature)? {
            return Err(PathError::new(
                "reading",
                &upper_path,
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "made by an overlay mount with {feature}=on (docker-on-top always \
                         turns it off), so part of its data lives elsewhere in the base; \
                         mount the volume and copy the files from the mountpoint instead"
                    ),
                ),
            ));
        }
        let base_meta = match base_at {
            Some(at) => lstat_at(at)?,
            None => None,
        };
        if !meta.is_dir() {
            let change = if base_meta.is_some() {
                ChangeKind::Changed
            } else {
                ChangeKind::Added
            };
            self.items.push(Item {
                path,
                what: What::Entry { meta, change },
            });
            return Ok(None);
        }
        let (change, opaque, below) = match (base_meta, base_at) {
            (Some(bm), Some(at)) if bm.is_dir() => match base {
                Base::Replace(_) => (
                    Some(ChangeKind::Changed),
                    false,
                    Base::Replace(open_dir(at)?),
                ),
                _ if xattrs(upper_at, xattr::is_opaque)? => (
                    Some(ChangeKind::Changed),
                    true,
                    Base::Replace(open_dir(at)?),
                ),
                _ => {
                    let differs = dir_differs(upper_at, &meta, at, &bm)?;
                    (
                        differs.then_some(ChangeKind::Changed),
                        false,
                        Base::Merge(open_dir(at)?),
                    )
                }
            },
            (Some(_), _) => (Some(ChangeKind::Changed), false, Base::Absent),
            (None, _) => (Some(ChangeKind::Added), false, Base::Absent),
        };
        let below_dir = open_dir(upper_at)?;
        self.items.push(Item {
            path,
            what: What::Dir {
                meta,
                change,
                opaque,
            },
        });
        Ok(Some((below_dir, below)))
    }

    /// The changes, in tree order.
    pub fn changes(&self) -> Vec<Change> {
        self.items
            .iter()
            .filter_map(|item| {
                item.change().map(|kind| Change {
                    kind,
                    path: Path::new("/").join(&item.path),
                })
            })
            .collect()
    }
}

/// How much an upper directory holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Usage {
    /// Apparent size of its regular files, each hard-linked file counted once.
    pub bytes: u64,
    /// Its files, symlinks and special files; not directories, not whiteouts.
    pub files: u64,
}

/// Adds up what the upper directory `upper` holds (a missing upper holds nothing).
pub fn usage(upper: &Path) -> Result<Usage, PathError> {
    let mut total = Usage::default();
    if !lstat(upper)?.is_some_and(|m| m.is_dir()) {
        return Ok(total);
    }
    // Files of more than one name, seen once already: their bytes are on the disk once.
    let mut linked = std::collections::HashSet::new();
    let root = Dir::open(upper).map_err(|e| PathError::new("reading", upper, e))?;
    // Depth first, without recursion: the directories being read, from the root down, each
    // with the names it has left; `path` is the deepest's.
    let mut path = upper.to_owned();
    let mut open = vec![(names(&root, &path)?.into_iter(), root)];
    while let Some((names_left, dir)) = open.last_mut() {
        let Some(name) = names_left.next() else {
            open.pop();
            path.pop();
            continue;
        };
        path.push(&name);
        let at = Place {
            dir,
            name: &name,
            path: &path,
        };
        match lstat_at(at)? {
            Some(st) if st.is_dir() => {
                let below = open_dir(at)?;
                open.push((names(&below, &path)?.into_iter(), below));
                continue; // `path` stays that of the directory now read
            }
            Some(st) if st.is_whiteout() => {}
            Some(st) => {
                total.files += 1;
                if st.kind() == rustix::fs::FileType::RegularFile
                    && (st.nlink() == 1 || linked.insert((st.dev(), st.ino())))
                {
                    total.bytes += st.len();
                }
            }
            None => {} // gone while we read
        }
        path.pop();
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An upper and a base made by hand (what the kernel would make, and what it would not).
    pub(crate) struct Layers {
        _tmp: tempfile::TempDir,
        pub upper: PathBuf,
        pub base: PathBuf,
        pub outside: PathBuf,
    }

    pub(crate) fn layers() -> Layers {
        let tmp = tempfile::tempdir().unwrap();
        let (upper, base, outside) = (
            tmp.path().join("upper"),
            tmp.path().join("base"),
            tmp.path().join("outside"),
        );
        for d in [&upper, &base, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        Layers {
            _tmp: tmp,
            upper,
            base,
            outside,
        }
    }

    pub(crate) fn whiteout(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0),
            0,
        )
        .unwrap();
    }

    pub(crate) fn opaque(path: &Path) {
        std::fs::create_dir(path).unwrap();
        xattr::set(path, b"trusted.overlay.opaque", b"y").unwrap();
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.changes()
            .iter()
            .map(|c| format!("{} {}", c.kind.letter(), c.path.display()))
            .collect()
    }

    #[test]
    fn type_changes_and_stale_whiteouts() {
        let l = layers();
        // Base: a directory f/, a symlink to a directory outside, a file plain.
        std::fs::create_dir(l.base.join("f")).unwrap();
        std::fs::write(l.base.join("f/child"), "c").unwrap();
        std::os::unix::fs::symlink(&l.outside, l.base.join("link")).unwrap();
        std::fs::write(l.outside.join("x"), "outside").unwrap();
        std::fs::write(l.base.join("plain"), "p").unwrap();
        // Upper: a file over the directory, a directory over the symlink, a directory over
        // the file, a whiteout of nothing.
        std::fs::write(l.upper.join("f"), "now a file").unwrap();
        std::fs::create_dir(l.upper.join("link")).unwrap();
        std::fs::write(l.upper.join("link/x"), "mine").unwrap();
        std::fs::create_dir(l.upper.join("plain")).unwrap();
        std::fs::write(l.upper.join("plain/y"), "y").unwrap();
        whiteout(&l.upper.join("never-was"));
        let plan = Plan::read(&l.upper, Some(&l.base)).unwrap();
        assert_eq!(
            lines(&plan),
            ["C /f", "C /link", "A /link/x", "C /plain", "A /plain/y"],
            "the symlink in the base must not be followed: link/x is new"
        );
    }

    #[test]
    fn opaque_directories_replace_the_base_recursively() {
        let l = layers();
        for d in ["d/keep/inner", "d/gone"] {
            std::fs::create_dir_all(l.base.join(d)).unwrap();
        }
        for f in ["d/file", "d/keep/inner/deep", "d/keep/k2", "d/old"] {
            std::fs::write(l.base.join(f), "b").unwrap();
        }
        opaque(&l.upper.join("d"));
        std::fs::create_dir(l.upper.join("d/keep")).unwrap(); // again, implicitly opaque
        std::fs::write(l.upper.join("d/keep/k2"), "again").unwrap();
        std::fs::write(l.upper.join("d/file"), "again").unwrap();
        std::fs::write(l.upper.join("d/new"), "n").unwrap();
        whiteout(&l.upper.join("d/old")); // redundant under an opaque directory
        opaque(&l.upper.join("nobase")); // opaque over nothing: just added
        let plan = Plan::read(&l.upper, Some(&l.base)).unwrap();
        assert_eq!(
            lines(&plan),
            [
                "C /d",
                "C /d/file",
                "D /d/gone",
                "C /d/keep",
                "D /d/keep/inner",
                "C /d/keep/k2",
                "A /d/new",
                "D /d/old",
                "A /nobase",
            ]
        );
        let opaque_tops: Vec<_> = plan
            .items
            .iter()
            .filter(|i| matches!(i.what, What::Dir { opaque: true, .. }))
            .map(|i| i.path.clone())
            .collect();
        assert_eq!(opaque_tops, [PathBuf::from("d")]);
    }

    #[test]
    fn a_missing_base_makes_everything_added_and_a_missing_upper_nothing() {
        let l = layers();
        std::fs::create_dir(l.upper.join("d")).unwrap();
        std::fs::write(l.upper.join("d/f"), "x").unwrap();
        whiteout(&l.upper.join("w"));
        let plan = Plan::read(&l.upper, None).unwrap();
        assert_eq!(lines(&plan), ["A /d", "A /d/f"]);
        assert_eq!(
            usage(&l.upper).unwrap(),
            Usage { bytes: 1, files: 1 },
            "whiteouts and directories are not files"
        );
        let plan = Plan::read(&l.upper.join("none"), Some(&l.base)).unwrap();
        assert!(plan.items.is_empty());
        assert_eq!(usage(&l.upper.join("none")).unwrap(), Usage::default());
        std::fs::hard_link(l.upper.join("d/f"), l.upper.join("g")).unwrap();
        assert_eq!(
            usage(&l.upper).unwrap(),
            Usage { bytes: 1, files: 2 },
            "a file of two names holds its bytes once"
        );
    }

    #[test]
    fn entries_of_redirect_dir_or_metacopy_are_refused() {
        for (name, kind) in [
            ("trusted.overlay.redirect", "redirect_dir"),
            ("trusted.overlay.metacopy", "metacopy"),
        ] {
            let l = layers();
            std::fs::create_dir(l.upper.join("moved")).unwrap();
            xattr::set(&l.upper.join("moved"), name.as_bytes(), b"/old").unwrap();
            let err = Plan::read(&l.upper, Some(&l.base)).unwrap_err();
            let text = crate::error_chain(&err);
            assert!(text.contains(&format!("{kind}=on")), "{text}");
            assert!(text.contains("moved"), "{text}");
        }
    }

    #[test]
    fn parents_count_only_when_their_attributes_differ() {
        let l = layers();
        std::fs::create_dir(l.base.join("d")).unwrap();
        std::fs::write(l.base.join("d/f"), "old").unwrap();
        // Copied up with the same attributes, as overlayfs does.
        std::fs::create_dir(l.upper.join("d")).unwrap();
        std::fs::write(l.upper.join("d/f"), "new").unwrap();
        let same = std::fs::metadata(l.base.join("d")).unwrap();
        let t = |m: &std::fs::Metadata| {
            std::fs::FileTimes::new()
                .set_accessed(m.accessed().unwrap())
                .set_modified(m.modified().unwrap())
        };
        std::fs::File::open(l.upper.join("d"))
            .unwrap()
            .set_times(t(&same))
            .unwrap();
        xattr::set(&l.upper.join("d"), b"trusted.overlay.origin", b"x").unwrap();
        let plan = Plan::read(&l.upper, Some(&l.base)).unwrap();
        assert_eq!(
            lines(&plan),
            ["C /d/f"],
            "overlay's xattrs are not a change"
        );
        xattr::set(&l.upper.join("d"), b"user.tag", b"t").unwrap();
        let plan = Plan::read(&l.upper, Some(&l.base)).unwrap();
        assert_eq!(lines(&plan), ["C /d", "C /d/f"], "a user xattr is");
    }
}
