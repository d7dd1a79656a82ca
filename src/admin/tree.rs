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

use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::PathError;
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
        meta: Metadata,
        change: Option<ChangeKind>,
        opaque: bool,
    },
    /// A file, symlink or special file of the upper.
    Entry { meta: Metadata, change: ChangeKind },
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
    Merge(PathBuf),
    /// Replaced: the upper directory is (or lies inside) an opaque one; base entries only
    /// tell what was deleted and what is changed rather than added.
    Replace(PathBuf),
}

/// `lstat`, `None` when nothing is there.
fn lstat(path: &Path) -> Result<Option<Metadata>, PathError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError::new("looking at", path, e)),
    }
}

/// A whiteout: the character device 0/0 overlayfs leaves for a deleted base entry.
pub fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Names in a directory, sorted bytewise.
fn sorted_names(dir: &Path) -> Result<Vec<OsString>, PathError> {
    let read = |e| PathError::new("reading", dir, e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        names.push(entry.map_err(read)?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Whether a directory present in upper and base shows other attributes than the base's.
fn dir_differs(upper: &Path, um: &Metadata, base: &Path, bm: &Metadata) -> Result<bool, PathError> {
    if um.mode() != bm.mode()
        || um.uid() != bm.uid()
        || um.gid() != bm.gid()
        || um.mtime() != bm.mtime()
        || um.mtime_nsec() != bm.mtime_nsec()
    {
        return Ok(true);
    }
    let ux = xattr::data(upper).map_err(|e| PathError::new("reading the xattrs of", upper, e))?;
    let bx = xattr::data(base).map_err(|e| PathError::new("reading the xattrs of", base, e))?;
    Ok(ux != bx)
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
            let base = base.map_or(Base::Absent, |b| Base::Merge(b.to_owned()));
            plan.walk(Path::new(""), upper, &base)?;
        }
        Ok(plan)
    }

    fn walk(&mut self, rel: &Path, upper_dir: &Path, base: &Base) -> Result<(), PathError> {
        let upper_names = sorted_names(upper_dir)?;
        let mut children: Vec<(OsString, Option<Metadata>)> = Vec::new();
        let mut present = Vec::new(); // upper names that are not whiteouts
        for name in upper_names {
            let meta = lstat(&upper_dir.join(&name))?;
            // Gone while we read (the volume is mounted and in use): nothing to report.
            let Some(meta) = meta else { continue };
            if !is_whiteout(&meta) {
                present.push(name.clone());
            }
            children.push((name, Some(meta)));
        }
        if let Base::Replace(base_dir) = base {
            for name in sorted_names(base_dir)? {
                if present
                    .binary_search_by(|p| p.as_bytes().cmp(name.as_bytes()))
                    .is_err()
                {
                    children.push((name, None));
                }
            }
            children.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }

        for (name, meta) in children {
            let path = rel.join(&name);
            let upper_path = upper_dir.join(&name);
            let base_path = match base {
                Base::Absent => None,
                Base::Merge(b) | Base::Replace(b) => Some(b.join(&name)),
            };
            let Some(meta) = meta else {
                // A base entry the opaque directory above replaced without it.
                self.items.push(Item {
                    path,
                    what: What::Deleted { whiteout: false },
                });
                continue;
            };
            if is_whiteout(&meta) {
                if let (Base::Merge(_), Some(bp)) = (base, &base_path)
                    && lstat(bp)?.is_some()
                {
                    self.items.push(Item {
                        path,
                        what: What::Deleted { whiteout: true },
                    });
                }
                continue;
            }
            let foreign = xattr::foreign_feature(&upper_path)
                .map_err(|e| PathError::new("reading the xattrs of", &upper_path, e))?;
            if let Some(feature) = foreign {
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
            let base_meta = match &base_path {
                Some(bp) => lstat(bp)?,
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
                continue;
            }
            let (change, opaque, below) = match (base_meta, base_path) {
                (Some(bm), Some(bp)) if bm.is_dir() => match base {
                    Base::Replace(_) => (Some(ChangeKind::Changed), false, Base::Replace(bp)),
                    _ if xattr::is_opaque(&upper_path)
                        .map_err(|e| PathError::new("reading the xattrs of", &upper_path, e))? =>
                    {
                        (Some(ChangeKind::Changed), true, Base::Replace(bp))
                    }
                    _ => {
                        let differs = dir_differs(&upper_path, &meta, &bp, &bm)?;
                        (
                            differs.then_some(ChangeKind::Changed),
                            false,
                            Base::Merge(bp),
                        )
                    }
                },
                (Some(_), _) => (Some(ChangeKind::Changed), false, Base::Absent),
                (None, _) => (Some(ChangeKind::Added), false, Base::Absent),
            };
            self.items.push(Item {
                path: path.clone(),
                what: What::Dir {
                    meta,
                    change,
                    opaque,
                },
            });
            self.walk(&path, &upper_path, &below)?;
        }
        Ok(())
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
    /// Apparent size of its regular files.
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
    let mut stack = vec![upper.to_owned()];
    while let Some(dir) = stack.pop() {
        let read = |e| PathError::new("reading", &dir, e);
        for entry in std::fs::read_dir(&dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            let Some(meta) = lstat(&path)? else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if !is_whiteout(&meta) {
                total.files += 1;
                if meta.is_file() {
                    total.bytes += meta.len();
                }
            }
        }
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
        let t = |m: &Metadata| {
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
