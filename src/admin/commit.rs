//! `commit`: a volume's changes written into its base directory.
//!
//! Applied in tree order, so that every directory is in place before its contents:
//!
//! - a deleted path is removed from the base (a directory with everything in it);
//! - an added or changed directory is created, or replaces a base entry that is not a
//!   directory, or (when the base has a directory there) takes the upper's owner, mode and
//!   data xattrs; the base entries an opaque directory hid are deleted paths of their own;
//! - an added or changed file, symlink or special file is built beside its place under a
//!   temporary name and renamed over it, so that each base path holds either its old or its
//!   new version at any moment; hard links among the upper's files are kept;
//! - last, every directory of the upper gives its times to the base's (innermost first), as
//!   the merged view showed them.
//!
//! The caller holds the locks of every volume on this base, has checked that none is mounted,
//! and resets the volume once the base is synced.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::PathError;
use super::dir::{Cursor, Dir, Place};
use super::fsops::{self, Copier, Made};
use super::tree::{Plan, What};

/// Prefix of the temporaries `commit` writes beside base entries it replaces.
pub const TEMP_PREFIX: &str = ".docker-on-top-commit-";

/// What `commit` did to the base.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Entries written (created or replaced) and deleted.
    pub written: u64,
    pub deleted: u64,
    /// Paths not written, with the reason (the base keeps what it had there).
    pub skipped: Vec<(PathBuf, &'static str)>,
}

/// Writes the plan into `base`.
pub fn apply(plan: &Plan, base: &Path) -> Result<Applied, PathError> {
    let open = |path: &Path| Dir::open(path).map_err(|e| PathError::new("opening", path, e));
    let mut upper = Cursor::new(open(&plan.upper)?);
    let mut out = Cursor::new(open(base)?);
    let mut copier = Copier::new(open(base)?);
    let mut done = Applied::default();
    for item in &plan.items {
        let (src_path, at_path) = (plan.upper.join(&item.path), base.join(&item.path));
        let at = out.place(&item.path, &at_path)?;
        match &item.what {
            What::Deleted { .. } => {
                fsops::remove_all(at)?;
                done.deleted += 1;
            }
            What::Dir { change: None, .. } => {}
            What::Dir { meta, .. } => {
                let src = upper.place(&item.path, &src_path)?;
                match at.dir.lstat(at.name) {
                    Ok(Some(m)) if m.is_dir() => fsops::set_attributes(src, meta, at, false)?,
                    Ok(Some(_)) => {
                        fsops::remove_all(at)?;
                        fsops::make_dir(src, meta, at)?;
                    }
                    Ok(None) | Err(_) => fsops::make_dir(src, meta, at)?,
                }
                done.written += 1;
            }
            What::Entry { meta, .. } => {
                let src = upper.place(&item.path, &src_path)?;
                let tmp_name = temporary_name();
                let tmp_path = at_path.with_file_name(&tmp_name);
                let tmp = Place {
                    dir: at.dir,
                    name: &tmp_name,
                    path: &tmp_path,
                };
                let made = copier
                    .copy_entry(src, meta, tmp, &item.path)
                    .inspect_err(|_| {
                        let _ = at.dir.remove_file(&tmp_name);
                    })?;
                match made {
                    Made::Skipped(why) => {
                        done.skipped.push((Path::new("/").join(&item.path), why));
                        continue;
                    }
                    Made::Created { .. } | Made::Linked => {}
                }
                // rename(2) replaces anything but a directory.
                if matches!(at.dir.lstat(at.name), Ok(Some(m)) if m.is_dir()) {
                    fsops::remove_all(at)?;
                }
                if let Err(e) = at.dir.rename(&tmp_name, at.name) {
                    let _ = at.dir.remove_file(&tmp_name);
                    return Err(PathError::new("replacing", &at_path, e));
                }
                done.written += 1;
            }
        }
        failpoint!("commit.entry-applied");
    }
    for item in plan.items.iter().rev() {
        if let What::Dir { meta, .. } = &item.what {
            let at_path = base.join(&item.path);
            fsops::set_times(out.place(&item.path, &at_path)?, meta)?;
        }
    }
    Ok(done)
}

/// A fresh name for a temporary.
fn temporary_name() -> OsString {
    let mut name = OsString::from(TEMP_PREFIX);
    name.push(crate::store::nonce());
    debug_assert!(!name.as_bytes().contains(&b'/'));
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::tree::tests::{layers, opaque, whiteout};
    use crate::admin::xattr;

    #[test]
    fn applies_type_changes_without_following_base_symlinks() {
        let l = layers();
        std::fs::create_dir(l.base.join("f")).unwrap();
        std::fs::write(l.base.join("f/child"), "c").unwrap();
        std::os::unix::fs::symlink(&l.outside, l.base.join("link")).unwrap();
        std::fs::write(l.base.join("gone"), "g").unwrap();
        std::fs::create_dir_all(l.base.join("d/sub")).unwrap();
        std::fs::write(l.base.join("d/sub/x"), "x").unwrap();
        std::fs::write(l.base.join("d/keep"), "old").unwrap();

        std::fs::write(l.upper.join("f"), "now a file").unwrap();
        std::fs::create_dir(l.upper.join("link")).unwrap();
        std::fs::write(l.upper.join("link/x"), "mine").unwrap();
        whiteout(&l.upper.join("gone"));
        opaque(&l.upper.join("d"));
        std::fs::write(l.upper.join("d/keep"), "new").unwrap();

        let plan = Plan::read(&l.upper, Some(&l.base)).unwrap();
        let done = apply(&plan, &l.base).unwrap();
        assert_eq!((done.written, done.deleted), (5, 2));
        assert_eq!(
            std::fs::read_to_string(l.base.join("f")).unwrap(),
            "now a file"
        );
        assert!(
            std::fs::symlink_metadata(l.base.join("link"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(
            std::fs::read_to_string(l.base.join("link/x")).unwrap(),
            "mine"
        );
        assert_eq!(std::fs::read_dir(&l.outside).unwrap().count(), 0);
        assert!(!l.base.join("gone").exists());
        assert!(!l.base.join("d/sub").exists());
        assert_eq!(
            std::fs::read_to_string(l.base.join("d/keep")).unwrap(),
            "new"
        );
        assert!(!xattr::is_opaque(&l.base.join("d")).unwrap());
        // Applying it again changes nothing more.
        apply(&plan, &l.base).unwrap();
        assert_eq!(
            std::fs::read_to_string(l.base.join("d/keep")).unwrap(),
            "new"
        );
    }
}
