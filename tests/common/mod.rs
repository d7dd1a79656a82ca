//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// Moves the calling thread into a private mount namespace, so its mounts never reach the
/// host. Panics (the test fails loudly) when that is impossible, e.g. without root.
pub fn private_mount_namespace() {
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: CLONE_NEWNS only changes this thread's mount namespace (and gives it its own
    // fs_struct); no memory is shared differently afterwards.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .expect("unshare(CLONE_NEWNS) failed: these tests must run as root");
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .expect("making / private in the new mount namespace failed");
}

pub mod daemon;
