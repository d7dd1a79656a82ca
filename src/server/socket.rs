//! The plugin socket: the one systemd passed (socket activation), or one this process creates
//! and removes again. Only acquires it; [`super::serve`] answers on it.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, info, warn};
use thiserror::Error;
use tokio::net::UnixListener;

/// The plugin socket, as [`listen`] acquired it.
#[derive(Debug)]
pub enum Listening {
    /// Passed by systemd (socket activation); systemd owns the path.
    Activated(UnixListener),
    /// Created by this process; `socket` removes the file when dropped.
    Created {
        listener: UnixListener,
        socket: SocketFile,
    },
}

impl Listening {
    /// The path clients connect to, for logs.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Listening::Activated(listener) => listener
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_pathname().map(Path::to_path_buf)),
            Listening::Created { socket, .. } => Some(socket.path().to_path_buf()),
        }
    }

    /// The listener, and the socket file to drop (removing it) once serving is over.
    pub fn into_parts(self) -> (UnixListener, Option<SocketFile>) {
        match self {
            Listening::Activated(listener) => (listener, None),
            Listening::Created { listener, socket } => (listener, Some(socket)),
        }
    }
}

/// A socket file this process created. Dropping it removes the file, unless something else
/// has replaced it at that path since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(err) = fs::remove_file(&self.path) {
                    warn!("cannot remove the socket {}: {err}", self.path.display());
                }
            }
            Ok(_) => debug!(
                "not removing {}: another process replaced it",
                self.path.display()
            ),
            Err(err) => debug!("not removing {}: {err}", self.path.display()),
        }
    }
}

/// Why the plugin socket cannot be had. Wrapped in an `io::Error`, which keeps the chain.
#[derive(Debug, Error)]
enum ListenError {
    #[error("cannot read the sockets passed by systemd")]
    ListenFds(#[source] io::Error),
    #[error("systemd passed {0} sockets, expected one")]
    FdCount(usize),
    #[error("the systemd socket was already taken")]
    AlreadyTaken,
    #[error("the socket passed by systemd is not a listening unix stream socket")]
    NotUnixListener,
    #[error("cannot inspect the socket passed by systemd")]
    Inspect(#[source] io::Error),
    #[error("cannot create the directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    #[error("cannot lock the directory {0}")]
    Lock(PathBuf, #[source] io::Error),
    #[error("cannot inspect {0}")]
    Stat(PathBuf, #[source] io::Error),
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    #[error("cannot check whether {0} is in use")]
    Probe(PathBuf, #[source] io::Error),
    #[error("cannot remove the stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("cannot bind {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("cannot set the permissions of {0}")]
    Chmod(PathBuf, #[source] io::Error),
    #[error("cannot register the socket with the runtime")]
    Register(#[source] io::Error),
}

impl From<rustix::io::Errno> for ListenError {
    /// Only the checks of the systemd socket fail with a bare errno.
    fn from(errno: rustix::io::Errno) -> Self {
        ListenError::Inspect(errno.into())
    }
}

impl ListenError {
    fn into_io(self) -> io::Error {
        use std::error::Error as _;
        let kind = match &self {
            ListenError::InUse(_) => io::ErrorKind::AddrInUse,
            ListenError::NotSocket(_) | ListenError::NotUnixListener | ListenError::FdCount(_) => {
                io::ErrorKind::InvalidInput
            }
            _ => self
                .source()
                .and_then(|s| s.downcast_ref::<io::Error>())
                .map_or(io::ErrorKind::Other, io::Error::kind),
        };
        io::Error::new(kind, self)
    }
}

static ACTIVATION_TAKEN: AtomicBool = AtomicBool::new(false);

/// Acquires the plugin socket: the one systemd passed (socket activation; `socket` is then
/// ignored and the path is left alone), or a new one bound at `socket`, mode 0660. A stale
/// socket file left by a dead process is replaced; a live one, or any other file, is an
/// error. Must be called inside a tokio runtime.
pub fn listen(socket: &Path) -> io::Result<Listening> {
    match activated().map_err(ListenError::into_io)? {
        Some(listener) => Ok(Listening::Activated(listener)),
        None => create(socket).map_err(ListenError::into_io),
    }
}

fn activated() -> Result<Option<UnixListener>, ListenError> {
    use rustix::net::{AddressFamily, SocketType, sockopt};

    // Sockets passed to another process (a wrapper that forked instead of exec-ing, so that
    // LISTEN_PID names it): not ours. Said, since the socket bound instead then finds the
    // path taken by systemd's.
    if let (Some(fds), Ok(pid)) = (std::env::var_os("LISTEN_FDS"), std::env::var("LISTEN_PID"))
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| pid != std::process::id())
    {
        warn!(
            "ignoring the {} socket(s) passed to process {pid}: this is process {} \
             (a wrapper must exec the plugin)",
            fds.to_string_lossy(),
            std::process::id()
        );
    }
    let mut fds = sd_notify::listen_fds().map_err(ListenError::ListenFds)?;
    let fd = match (fds.len(), fds.next()) {
        (1, Some(fd)) => fd,
        (0, _) => return Ok(None),
        (n, _) => return Err(ListenError::FdCount(n)),
    };
    if ACTIVATION_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ListenError::AlreadyTaken);
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched) for it to
    // own, and ACTIVATION_TAKEN ensures it is wrapped only once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_unix_listener = sockopt::socket_domain(&fd)? == AddressFamily::UNIX
        && sockopt::socket_type(&fd)? == SocketType::STREAM
        && sockopt::socket_acceptconn(&fd)?;
    if !is_unix_listener {
        return Err(ListenError::NotUnixListener);
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(ListenError::Register)?;
    UnixListener::from_std(listener)
        .map(Some)
        .map_err(ListenError::Register)
}

fn create(path: &Path) -> Result<Listening, ListenError> {
    use rustix::fs::{FlockOperation, Mode, OFlags, flock, open};

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|e| ListenError::CreateDir(dir.into(), e))?;
    // Held while checking, replacing and binding, so that two processes starting at once
    // cannot both decide the socket is stale.
    let lock = open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .and_then(|dir_fd| flock(&dir_fd, FlockOperation::LockExclusive).map(|()| dir_fd))
    .map_err(|e| ListenError::Lock(dir.into(), e.into()))?;

    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if is_live(path).map_err(|e| ListenError::Probe(path.into(), e))? {
                return Err(ListenError::InUse(path.into()));
            }
            info!("removing the stale socket {}", path.display());
            fs::remove_file(path).map_err(|e| ListenError::RemoveStale(path.into(), e))?;
        }
        Ok(_) => return Err(ListenError::NotSocket(path.into())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(ListenError::Stat(path.into(), err)),
    }

    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| ListenError::Bind(path.into(), e))?;
    let meta = fs::symlink_metadata(path).map_err(|e| ListenError::Stat(path.into(), e))?;
    let socket = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    drop(lock);
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .map_err(|e| ListenError::Chmod(path.into(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(ListenError::Register)?;
    let listener = UnixListener::from_std(listener).map_err(ListenError::Register)?;
    Ok(Listening::Created { listener, socket })
}

/// Whether something accepts connections on the socket at `path`. A non-blocking connect, so
/// that a live server with a full queue counts as live instead of blocking us.
fn is_live(path: &Path) -> io::Result<bool> {
    use rustix::io::Errno;
    use rustix::net::{
        AddressFamily, SocketAddrUnix, SocketFlags, SocketType, connect, socket_with,
    };

    let probe = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match connect(&probe, &SocketAddrUnix::new(path)?) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => Ok(true),
        Err(Errno::CONNREFUSED) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_socket_replaces_stale_refuses_live_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/p.sock");

        let first = create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let err = create(&path).unwrap_err();
        assert!(matches!(err, ListenError::InUse(_)), "{err:?}");
        assert_eq!(err.into_io().kind(), io::ErrorKind::AddrInUse);

        // A socket file nobody listens on any more is stale.
        let (listener, socket) = first.into_parts();
        drop(listener);
        std::mem::forget(socket);
        assert!(path.exists());
        let second = create(&path).unwrap();
        assert!(matches!(second, Listening::Created { .. }));
        drop(second);
        assert!(!path.exists(), "the socket is removed on drop");

        fs::write(&path, "not a socket").unwrap();
        assert!(matches!(create(&path), Err(ListenError::NotSocket(_))));
    }

    #[tokio::test]
    async fn socket_file_drop_leaves_a_replaced_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let (listener, socket) = create(&path).unwrap().into_parts();
        // Replaced while this process still listens, so the inode cannot be reused.
        fs::remove_file(&path).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(listener);
        drop(socket);
        assert!(path.exists());
    }
}
