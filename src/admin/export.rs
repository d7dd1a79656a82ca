//! `export`: a volume's changes as a tar stream in the OCI image layer convention, so that
//! `tar`, `docker import`-style tools, containerd and the like can read or apply it.
//!
//! - every directory that leads to a change is an entry (applying a layer needs the parents);
//! - added and changed files, symlinks, FIFOs and device nodes are entries with their numeric
//!   owner, mode and modification time; hard links among them are hard-link entries;
//! - a deleted `dir/NAME` is an empty file `dir/.wh.NAME`;
//! - a directory that replaced a base directory (opaque) is followed by an empty file
//!   `dir/.wh..wh..opq`: every base entry below it is hidden, so the base entries it hid are
//!   not listed one by one;
//! - data xattrs travel in PAX headers as `SCHILY.xattr.NAME`, as GNU tar and the OCI tools
//!   write them; overlay's own xattrs never do;
//! - sockets are left out (tar cannot hold them), and so is any entry whose name starts with
//!   `.wh.` (with everything below it): whoever applies the layer would take it for a whiteout
//!   or an opaque marker and delete or hide files of the layers below.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::PathError;
use super::dir::{Cursor, Dir, Place, Stat};
use super::tree::{Plan, What};
use super::xattr::{self, Xattrs};

/// The OCI whiteout prefix: `.wh.NAME` in a layer deletes `NAME` of the layers below.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The OCI opaque marker: in a directory, hides everything the layers below have there.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What `export` wrote.
#[derive(Debug, Clone, Default)]
pub struct Exported {
    pub entries: u64,
    pub bytes: u64,
    /// Paths left out, with the reason.
    pub skipped: Vec<(PathBuf, &'static str)>,
    /// Anything the user should know about how the changes were read.
    pub warnings: Vec<String>,
}

/// Why an export stopped: reading the volume, or writing the stream.
#[derive(Debug)]
pub enum ExportError {
    Read(PathError),
    Write(io::Error),
}

impl From<PathError> for ExportError {
    fn from(e: PathError) -> Self {
        ExportError::Read(e)
    }
}

/// Writes the plan to `out` as a tar stream.
pub fn export<W: Write>(plan: &Plan, out: W) -> Result<Exported, ExportError> {
    let upper_path = &plan.upper;
    let mut upper =
        Cursor::new(Dir::open(upper_path).map_err(|e| PathError::new("opening", upper_path, e))?);
    let mut ar = Builder::new(out);
    let mut done = Exported::default();
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    let w = ExportError::Write;
    for item in &plan.items {
        if let Some(at) = (item.path.components()).position(|c| {
            c.as_os_str()
                .as_bytes()
                .starts_with(WHITEOUT_PREFIX.as_bytes())
        }) {
            // Said once, for the topmost such name.
            if at + 1 == item.path.components().count() {
                done.skipped.push((
                    Path::new("/").join(&item.path),
                    "a name starting with .wh. would read as a whiteout in a layer",
                ));
            }
            continue;
        }
        let src_path = plan.upper.join(&item.path);
        match &item.what {
            What::Dir { meta, opaque, .. } => {
                append_xattrs(&mut ar, upper.place(&item.path, &src_path)?)?;
                let mut h = header(meta, EntryType::Directory);
                let mut name = item.path.as_os_str().to_owned();
                name.push("/");
                ar.append_data(&mut h, Path::new(&name), io::empty())
                    .map_err(w)?;
                done.entries += 1;
                if *opaque {
                    let mut h = marker(meta);
                    ar.append_data(&mut h, item.path.join(OPAQUE_MARKER), io::empty())
                        .map_err(w)?;
                    done.entries += 1;
                }
            }
            What::Deleted { whiteout: true } => {
                let src = upper.place(&item.path, &src_path)?;
                let meta = src
                    .dir
                    .lstat(src.name)
                    .and_then(|m| m.ok_or_else(|| io::ErrorKind::NotFound.into()))
                    .map_err(|e| PathError::new("looking at", &src_path, e))?;
                let mut h = marker(&meta);
                ar.append_data(&mut h, whiteout_path(&item.path), io::empty())
                    .map_err(w)?;
                done.entries += 1;
            }
            // Hidden by the opaque marker of a directory above.
            What::Deleted { whiteout: false } => {}
            What::Entry { meta, .. } => {
                use rustix::fs::FileType;
                let kind = meta.kind();
                if kind == FileType::Socket {
                    done.skipped
                        .push((Path::new("/").join(&item.path), "tar cannot hold a socket"));
                    continue;
                }
                let src = upper.place(&item.path, &src_path)?;
                append_xattrs(&mut ar, src)?;
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1
                    && let Some(first) = links.get(&key)
                {
                    let mut h = header(meta, EntryType::Link);
                    ar.append_link(&mut h, &item.path, first).map_err(w)?;
                    done.entries += 1;
                    continue;
                }
                if meta.nlink() > 1 {
                    links.insert(key, item.path.clone());
                }
                if kind == FileType::RegularFile {
                    let file = (src.dir.open_file(src.name))
                        .map_err(|e| PathError::new("opening", &src_path, e))?;
                    let size = meta.len();
                    let mut h = header(meta, EntryType::Regular);
                    h.set_size(size);
                    let mut data = Exact::new(file, &src_path, size);
                    ar.append_data(&mut h, &item.path, &mut data)
                        .map_err(|e| data.error.take().map_or(w(e), ExportError::Read))?;
                    done.bytes += size;
                } else if kind == FileType::Symlink {
                    let target = (src.dir.read_link(src.name))
                        .map_err(|e| PathError::new("reading", &src_path, e))?;
                    let mut h = header(meta, EntryType::Symlink);
                    ar.append_link(&mut h, &item.path, target).map_err(w)?;
                } else {
                    let mut h = header(
                        meta,
                        match kind {
                            FileType::Fifo => EntryType::Fifo,
                            FileType::CharacterDevice => EntryType::Char,
                            _ => EntryType::Block,
                        },
                    );
                    if kind != FileType::Fifo {
                        let dev = meta.rdev();
                        h.set_device_major(rustix::fs::major(dev)).map_err(w)?;
                        h.set_device_minor(rustix::fs::minor(dev)).map_err(w)?;
                    }
                    ar.append_data(&mut h, &item.path, io::empty()).map_err(w)?;
                }
                done.entries += 1;
            }
        }
    }
    ar.into_inner().and_then(|mut out| out.flush()).map_err(w)?;
    Ok(done)
}

/// A header with the numeric owner, mode and modification time of `meta`.
fn header(meta: &Stat, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(meta.mtime().0.max(0) as u64);
    h.set_size(0);
    h
}

/// An empty marker file (whiteout or opaque marker), dated like the entry it stands for.
fn marker(meta: &Stat) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(meta.mtime().0.max(0) as u64);
    h.set_size(0);
    h
}

/// `dir/NAME` → `dir/.wh.NAME`.
fn whiteout_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(WHITEOUT_PREFIX);
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

/// A PAX extended header carrying the data xattrs of `src`, if it has any.
fn append_xattrs<W: Write>(ar: &mut Builder<W>, src: Place) -> Result<(), ExportError> {
    let xattrs: Xattrs = xattr::data(&src.dir.proc_path(src.name))
        .map_err(|e| PathError::new("reading the xattrs of", src.path, e))?;
    if xattrs.is_empty() {
        return Ok(());
    }
    let mut data = Vec::new();
    for (name, value) in &xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        pax_record(&mut data, &key, value);
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    ar.append_data(&mut h, "PaxHeader", &data[..])
        .map_err(ExportError::Write)
}

/// Appends one PAX record, `"LEN KEY=VALUE\n"`, where LEN counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while rest + len.to_string().len() != len {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Exactly `left` bytes of a file, even if it changes while it is read (a mounted volume in
/// use): cut when it grew, padded with zeros when it shrank, as the header promised. A read
/// error is kept with the file's path, to be reported as reading the volume rather than as
/// writing the stream.
struct Exact {
    file: File,
    path: PathBuf,
    left: u64,
    eof: bool,
    error: Option<PathError>,
}

impl Exact {
    fn new(file: File, path: &Path, size: u64) -> Self {
        Self {
            file,
            path: path.to_owned(),
            left: size,
            eof: false,
            error: None,
        }
    }
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let got = if self.eof {
            0
        } else {
            match self.file.read(&mut buf[..n]) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    let kind = e.kind();
                    self.error = Some(PathError::new("reading", &self.path, e));
                    return Err(io::Error::new(kind, "reading a file of the volume failed"));
                }
            }
        };
        let got = if got == 0 {
            self.eof = true;
            buf[..n].fill(0);
            n
        } else {
            got
        };
        self.left -= got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        let mut out = Vec::new();
        pax_record(&mut out, b"SCHILY.xattr.user.a", b"b");
        assert_eq!(out, b"25 SCHILY.xattr.user.a=b\n");
        assert_eq!(out.len(), 25);
        // Where the length itself gains a digit.
        let mut out = Vec::new();
        let value = vec![b'x'; 89];
        pax_record(&mut out, b"k", &value);
        let len: usize = std::str::from_utf8(out.split(|&b| b == b' ').next().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, out.len());
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(whiteout_path(Path::new("a/b")), Path::new("a/.wh.b"));
        assert_eq!(whiteout_path(Path::new("top")), Path::new(".wh.top"));
    }

    #[test]
    fn exact_reads_cut_and_pad() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        std::fs::write(&p, "abcdef").unwrap();
        let mut out = Vec::new();
        Exact::new(File::open(&p).unwrap(), &p, 3)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc");
        let mut out = Vec::new();
        Exact::new(File::open(&p).unwrap(), &p, 8)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcdef\0\0");
    }
}
