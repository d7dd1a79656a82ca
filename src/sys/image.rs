//! File system images for sized volumes (`-o size=`): making one, attaching it through a loop
//! device and mounting its file system. Thin wrappers over the syscalls and `mkfs`, as the
//! rest of `sys`; what to do with an image is the driver's business.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};

use super::SysError;
use crate::options::FsType;

/// `LOOP_CTL_GET_FREE` (linux/loop.h): the number of a free loop device, made if need be.
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8+): the backing file, block size and flags in one call.
const LOOP_CONFIGURE: Opcode = 0x4C0A;
/// `LOOP_GET_STATUS64`: a bound device's `struct loop_info64`, its backing file's device and
/// inode among it.
const LOOP_GET_STATUS64: Opcode = 0x4C05;
/// Detach the device when its last user closes it: once the file system on it is unmounted,
/// or when a process that attached it dies before mounting it, so that no device is leaked.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Read and write the image with direct I/O: its pages are not cached twice, once for the
/// file system inside and once for the backing file.
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// `ioctl(LOOP_CTL_GET_FREE)`, whose answer is the ioctl's return value.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and returns the device number.
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| rustix::io::Errno::INVAL)
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> SysError {
    let reason = what.into();
    move |source| SysError::Image { reason, source }
}

const LOOP_CONTROL: &str = "/dev/loop-control";
/// Where it is missing: a managed plugin, a container.
const NO_LOOP_CONTROL: &str = "no loop devices are available (/dev/loop-control); sized volumes need docker-on-top running as a host service, not as a managed plugin";

/// Makes an image of `size` bytes at `image` (which must not exist) holding an empty `fs`:
/// sparse (a limit only), or with its space reserved now (`fallocate`). The image is left
/// complete or not at all: it is made beside it and renamed into place once synced, so that a
/// crash (mkfs takes a while) leaves no unformatted image that every later attach would fail
/// on, only the temporary, which the next try replaces.
pub fn format(image: &Path, size: u64, sparse: bool, fs: FsType) -> Result<(), SysError> {
    // An image that could never be attached is refused before anything is made.
    if let Err(e) = std::fs::metadata(LOOP_CONTROL) {
        return Err(failed(NO_LOOP_CONTROL)(e));
    }
    let mut partial = image.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(failed(format!("cannot remove {}", partial.display()))(e));
        }
        _ => {}
    }
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(failed(format!("cannot create {}", partial.display())))?;
    let made = (|| {
        if sparse {
            file.set_len(size)
        } else {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
                .map_err(io::Error::from)
        }
        .map_err(failed(format!(
            "cannot make {} {size} bytes long",
            image.display()
        )))?;
        failpoint!("image.created");
        make_fs(&partial, fs)?;
        // mkfs leaves what it wrote in the page cache: the image is durable before the
        // volume that holds it is.
        file.sync_all()
            .map_err(failed(format!("cannot sync {}", partial.display())))?;
        failpoint!("image.formatted");
        // Never over an image already there.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &partial,
            rustix::fs::CWD,
            image,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| failed(format!("cannot rename {} into place", partial.display()))(e.into()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made
}

/// Runs `mkfs` for `fs` on the image.
fn make_fs(image: &Path, fs: FsType) -> Result<(), SysError> {
    let mut cmd = Command::new(fs.mkfs());
    match fs {
        // No reserved blocks (the cap is the user's); the inode tables and the journal are
        // initialised lazily, by the kernel, so that making a large image costs what a small
        // one does.
        FsType::Ext4 => cmd.args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ]),
        FsType::Xfs => cmd.args(["-q", "-f", "-K"]),
    };
    let out = cmd.arg(image).output().map_err(|e| {
        let reason = if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} is not installed (Debian package {})",
                fs.mkfs(),
                fs.package()
            )
        } else {
            format!("cannot run {}", fs.mkfs())
        };
        SysError::Image { reason, source: e }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(SysError::Image {
        reason: format!("{} failed: {}", fs.mkfs(), said.trim()),
        source: io::Error::other(out.status.to_string()),
    })
}

/// Attaches `image` to a free loop device (detached again when its file system is unmounted)
/// and mounts its `fs` at `target`. Refused while a loop device has the image already: its
/// file system is then still mounted, in another mount namespace (a copy made while it was
/// attached here), and a second device would mount the same file system twice, each with a
/// journal of its own.
pub fn attach(image: &Path, fs: FsType, target: &Path) -> Result<(), SysError> {
    let backing = File::options()
        .read(true)
        .write(true)
        .open(image)
        .map_err(failed(format!("cannot open {}", image.display())))?;
    if let Some(device) = device_with(&backing).map_err(failed(
        "cannot tell which loop devices have the image".to_string(),
    ))? {
        return Err(failed(format!(
            "{device} still has {}: its file system is mounted in another mount namespace \
             (a copy made while it was attached here); stop the processes that hold it \
             (grep -l {device} /proc/*/mountinfo)",
            image.display()
        ))(io::Error::from_raw_os_error(
            16, /* EBUSY */
        )));
    }
    let control = File::options()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(failed(NO_LOOP_CONTROL))?;
    let (device, path) = loop {
        // SAFETY: GetFree passes no pointer.
        let number = unsafe { rustix::ioctl::ioctl(control.as_fd(), GetFree) }.map_err(|e| {
            failed("no loop devices are available (no free one from /dev/loop-control)")(e.into())
        })?;
        let path = format!("/dev/loop{number}");
        // The kernel makes the device; its node appears only where /dev is a devtmpfs (in a
        // container with a /dev of its own it does not: then say so, never ask again forever).
        let device = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(failed(format!(
                "no loop devices are available (cannot open {path}, which the kernel made)"
            )))?;
        match configure(&device, &backing) {
            Ok(()) => break (device, path),
            // Another process configured it first.
            Err(rustix::io::Errno::BUSY) => continue,
            Err(e) => {
                return Err(failed(format!(
                    "cannot attach {} to {path}",
                    image.display()
                ))(e.into()));
            }
        }
    };
    failpoint!("image.attached");
    let mounted = mount_block(&path, fs, target);
    // The mount holds the device now (or nothing does, and closing it detaches it).
    drop(device);
    mounted?;
    failpoint!("image.mounted");
    Ok(())
}

/// The loop device whose backing file is `backing` (the same device and inode), if any.
/// Only bound devices have a `loop` directory in sysfs; one unbound meanwhile says ENXIO.
fn device_with(backing: &File) -> io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = backing.metadata()?;
    let wanted = (
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino(),
    );
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        if !Path::new("/sys/block").join(name).join("loop").exists() {
            continue;
        }
        let path = format!("/dev/{name}");
        let Ok(device) = File::open(&path) else {
            continue;
        };
        // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which LoopInfo64 is, and
        // any bit pattern is a valid LoopInfo64.
        let info = match unsafe {
            rustix::ioctl::ioctl(
                device.as_fd(),
                rustix::ioctl::Getter::<LOOP_GET_STATUS64, LoopInfo64>::new(),
            )
        } {
            Ok(info) => info,
            Err(rustix::io::Errno::NXIO) => continue,
            Err(e) => return Err(e.into()),
        };
        // `lo_device` is the kernel's encoding of a device number: (minor & 0xff) |
        // (major << 8) | ((minor & !0xff) << 12).
        let d = info.device;
        let shown = (
            ((d >> 8) & 0xfff) as u32,
            ((d & 0xff) | ((d >> 12) & 0xfff00)) as u32,
            info.inode,
        );
        if shown == wanted {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `LOOP_CONFIGURE` with direct I/O where the backing file system takes it, else without.
fn configure(device: &File, backing: &File) -> rustix::io::Result<()> {
    let config = |flags| LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    let set = |flags| {
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which LoopConfig is.
        unsafe {
            rustix::ioctl::ioctl(
                device.as_fd(),
                rustix::ioctl::Setter::<LOOP_CONFIGURE, LoopConfig>::new(config(flags)),
            )
        }
    };
    match set(LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO) {
        Err(rustix::io::Errno::INVAL) => set(LO_FLAGS_AUTOCLEAR),
        result => result,
    }
}

/// Mounts the file system on the block device `device` at `target`.
fn mount_block(device: &str, fs: FsType, target: &Path) -> Result<(), SysError> {
    let mount_err = |what: &str| {
        let reason = format!(
            "cannot mount {device} ({}) at {}: {what}",
            fs.name(),
            target.display()
        );
        move |e: rustix::io::Errno| SysError::Image {
            reason,
            source: e.into(),
        }
    };
    let ctx = rustix::mount::fsopen(fs.name(), FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(mount_err("fsopen"))?;
    rustix::mount::fsconfig_set_string(&ctx, "source", device).map_err(mount_err("source"))?;
    rustix::mount::fsconfig_create(&ctx).map_err(mount_err("create"))?;
    let mnt = rustix::mount::fsmount(&ctx, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(mount_err("fsmount"))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(mount_err("move_mount"))
}

/// Size and bytes used of the file system mounted at `target`, from one statfs.
pub fn usage(target: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statfs(target)?;
    let block = st.f_bsize as u64;
    let size = st.f_blocks * block;
    Ok((size, size - st.f_bfree * block))
}
