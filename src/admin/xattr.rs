//! Extended attributes of upper and base entries, never following symlinks.
//!
//! Overlayfs keeps its bookkeeping in `trusted.overlay.*` (or `user.overlay.*` with
//! `userxattr`): opaque directories, origins, impure markers, the layer UUID. Those are never
//! data: they are not compared, copied or exported. The attributes that are data, and that
//! `recover`, `export` and `commit` carry along, are listed in [`is_data`].

use std::io;
use std::path::Path;

use rustix::fs::XattrFlags;

/// The xattrs that mark a directory of the upper as opaque (it replaced a base directory).
/// Only the value `y` means opaque (`x`, since Linux 6.7, marks a directory that may hold
/// xattr whiteouts of a data-only layer, which docker-on-top never uses).
const OPAQUE: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// Whether the attribute `name` is data: `user.*` (except overlay's `user.overlay.*`), file
/// capabilities and POSIX ACLs. Overlay's own attributes and security labels
/// (`security.selinux`, which the host's policy assigns) are not.
pub fn is_data(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Attribute names and values, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn unsupported(e: &rustix::io::Errno) -> bool {
    matches!(*e, rustix::io::Errno::NOTSUP | rustix::io::Errno::PERM)
}

/// The names of every attribute of `path` (a symlink itself, not its target). A file system
/// without xattrs has none.
fn names(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(e) if unsupported(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            // Grew between the two calls.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The value of one attribute, `None` when it is not set.
pub fn get(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    loop {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) if unsupported(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(Some(buf));
        }
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The data attributes of `path` (see [`is_data`]), sorted by name.
pub fn data(path: &Path) -> io::Result<Xattrs> {
    let mut out = Vec::new();
    for name in names(path)? {
        if !is_data(&name) {
            continue;
        }
        if let Some(value) = get(path, &name)? {
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a directory of the upper is opaque: it replaced the base directory of the same
/// name, whose contents are hidden.
pub fn is_opaque(path: &Path) -> io::Result<bool> {
    for name in OPAQUE {
        if get(path, name.as_bytes())?.as_deref() == Some(b"y") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The overlayfs feature whose bookkeeping `path` carries, if it is one docker-on-top never
/// turns on: a directory renamed with `redirect_dir=on` or a metadata-only copy-up with
/// `metacopy=on`. Such an entry's data is partly in the base, under another path: the upper
/// alone does not tell what the volume holds.
pub fn foreign_feature(path: &Path) -> io::Result<Option<&'static str>> {
    for name in names(path)? {
        let Some(rest) = name
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| name.strip_prefix(b"user.overlay."))
        else {
            continue;
        };
        match rest {
            b"redirect" => return Ok(Some("redirect_dir")),
            b"metacopy" => return Ok(Some("metacopy")),
            _ => {}
        }
    }
    Ok(None)
}

/// Sets one attribute on `path` (a symlink itself, not its target).
pub fn set(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).map_err(io::Error::from)
}

/// Makes the data attributes of `path` exactly `wanted`: sets those, removes other data
/// attributes it has. Overlay's and other non-data attributes are left alone.
pub fn sync(path: &Path, wanted: &Xattrs) -> io::Result<()> {
    for (name, _) in data(path)? {
        if !wanted.iter().any(|(n, _)| *n == name) {
            match rustix::fs::lremovexattr(path, &name[..]) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (name, value) in wanted {
        set(path, name, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_excludes_overlay_bookkeeping_and_labels() {
        for name in [
            "user.color",
            "user.mime_type",
            "security.capability",
            "system.posix_acl_access",
            "system.posix_acl_default",
        ] {
            assert!(is_data(name.as_bytes()), "{name}");
        }
        for name in [
            "trusted.overlay.opaque",
            "trusted.overlay.origin",
            "user.overlay.opaque",
            "user.overlay.redirect",
            "security.selinux",
            "trusted.other",
        ] {
            assert!(!is_data(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn reads_sets_and_syncs_user_attributes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(data(&f).unwrap().is_empty());
        set(&f, b"user.b", b"2").unwrap();
        set(&f, b"user.a", b"").unwrap();
        set(&f, b"trusted.overlay.opaque", b"y").unwrap();
        assert_eq!(
            data(&f).unwrap(),
            vec![
                (b"user.a".to_vec(), vec![]),
                (b"user.b".to_vec(), b"2".to_vec())
            ]
        );
        assert!(is_opaque(&f).unwrap());
        sync(&f, &vec![(b"user.c".to_vec(), b"3".to_vec())]).unwrap();
        assert_eq!(data(&f).unwrap(), vec![(b"user.c".to_vec(), b"3".to_vec())]);
        assert!(is_opaque(&f).unwrap(), "sync touched overlay's attribute");
        assert_eq!(get(&f, b"user.nope").unwrap(), None);
    }
}
