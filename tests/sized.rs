//! Sized volumes (`-o size=`, issue 16) through the real binary and Docker's plugin protocol:
//! the faults a demanding user meets get a clear `{"Err": ...}` and leave nothing behind (mkfs
//! missing, no usable loop device, too little disk for a reserved image), and an xfs-formatted
//! volume works. Root, a private mount namespace per test (`tests/common/daemon.rs`); the
//! daemon's loop devices and mounts stay in that namespace and are counted after each test.

mod common;

use std::path::Path;

use common::daemon::{Env, names};

fn mount_id(n: u32) -> String {
    format!("{n:064x}")
}

fn base(env: &Env) -> String {
    let base = env.dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();
    base.to_str().unwrap().to_owned()
}

/// Nothing of a refused volume is left: no volume, no staging directory, no image.
/// The state root is read as the daemon sees it (it may be a mount of the test's namespace).
fn assert_nothing_left(env: &Env) {
    let root = env.seen(&env.root);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while names(&root) != [".trash"] || !names(&root.join(".trash")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left in the state root: {:?}, trash {:?}",
            names(&root),
            names(&root.join(".trash"))
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());
}

#[test]
fn a_missing_mkfs_is_named_with_its_debian_package() {
    let mut env = Env::new();
    // A PATH with nsenter (which starts the daemon) and nothing else.
    let bin = env.dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/usr/bin/nsenter", bin.join("nsenter")).unwrap();
    env.start_adjusted(&[], |cmd| {
        cmd.env("PATH", &bin);
    });
    let base = base(&env);
    for (fs, package) in [("ext4", "e2fsprogs"), ("xfs", "xfsprogs")] {
        let size = if fs == "xfs" { "300Mi" } else { "16Mi" };
        let err = env
            .create("s", &[("base", &base), ("size", size), ("fs", fs)])
            .expect_err("created a sized volume without mkfs");
        assert!(
            err.contains(&format!(
                "mkfs.{fs} is not installed (Debian package {package})"
            )),
            "unclear error {err:?}"
        );
        assert_nothing_left(&env);
    }
}

#[test]
fn without_a_usable_loop_device_mount_says_so_and_changes_nothing() {
    let mut env = Env::new();
    env.start(&[]);
    let base = base(&env);
    env.create("s", &[("base", &base), ("size", "16Mi")])
        .unwrap();
    // /dev/loop-control replaced, in the daemon's namespace only, by a file that is none.
    let fake = env.dir.join("not-loop-control");
    std::fs::write(&fake, "").unwrap();
    let status = env
        .anchor
        .command(&[
            "mount",
            "--bind",
            fake.to_str().unwrap(),
            "/dev/loop-control",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "cannot hide /dev/loop-control");
    let err = env
        .mount("s", &mount_id(1))
        .expect_err("mounted without a loop device");
    assert!(
        err.contains("no loop devices are available"),
        "unclear error {err:?}"
    );
    env.assert_not_mounted("s");
    assert!(names(&env.volume_dir("s").join("activemounts")).is_empty());
    assert!(env.loop_devices().is_empty());
    let status = env
        .anchor
        .command(&["umount", "/dev/loop-control"])
        .status()
        .unwrap();
    assert!(status.success());
    // With loop devices back, the volume works.
    let mp = env.mount_ok("s", &mount_id(1));
    assert!(env.seen(&mp.join("base.txt")).exists());
    env.unmount_ok("s", &mount_id(1));
    env.remove("s").unwrap();
    assert_nothing_left(&env);
}

#[test]
fn a_reserved_image_larger_than_the_free_space_is_refused_and_leaves_nothing() {
    let mut env = Env::new();
    // A failed fallocate keeps what it got until the file goes: on the host's disk this test
    // would fill it for a moment, and other tests (and the host) would see ENOSPC. The state
    // root is a small tmpfs of the test's own namespace instead.
    std::fs::create_dir(&env.root).unwrap();
    let root = env.root.to_str().unwrap().to_owned();
    env.anchor
        .run(&["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", &root]);
    env.start(&[]);
    let base = base(&env);
    let free = rustix::fs::statvfs(env.seen(&env.root)).unwrap();
    assert!(free.f_blocks * free.f_frsize <= 64 << 20, "not the tmpfs");
    let too_big = (free.f_bavail * free.f_frsize * 2).to_string();
    let err = env
        .create(
            "s",
            &[("base", &base), ("size", &too_big), ("sparse", "false")],
        )
        .expect_err("reserved more than the disk has");
    assert!(
        err.contains("No space left on device"),
        "unclear error {err:?}"
    );
    assert_nothing_left(&env);
    // The same size, sparse, is only a limit.
    env.create("s", &[("base", &base), ("size", &too_big)])
        .unwrap();
    env.remove("s").unwrap();
    assert_nothing_left(&env);
}

#[test]
fn an_xfs_sized_volume_works_and_reports_its_file_system() {
    assert!(
        Path::new("/usr/sbin/mkfs.xfs").exists() || Path::new("/sbin/mkfs.xfs").exists(),
        "mkfs.xfs is missing: scripts/test installs xfsprogs"
    );
    let mut env = Env::new();
    env.start(&[]);
    let base = base(&env);
    let err = env
        .create("s", &[("base", &base), ("size", "100M"), ("fs", "xfs")])
        .expect_err("an xfs below its minimum");
    assert!(err.contains("300Mi"), "{err}");
    env.create("s", &[("base", &base), ("size", "300Mi"), ("fs", "xfs")])
        .unwrap();
    let mp = env.mount_ok("s", &mount_id(1));
    std::fs::write(env.seen(&mp.join("new.txt")), "new").unwrap();
    let status = env.get_ok("s")["Status"].clone();
    assert_eq!(status["Fs"], "xfs", "{status}");
    assert_eq!(status["Size"], 300u64 << 20, "{status}");
    assert!(status["Used"].as_u64().is_some(), "{status}");
    env.unmount_ok("s", &mount_id(1));
    assert!(env.upper("s").join("new.txt").exists());
    env.remove("s").unwrap();
    assert_nothing_left(&env);
}

/// An image whose file system another mount namespace still has mounted (a copy made while it
/// was attached here) is never attached a second time: two loop devices on one image would
/// mount its file system twice, each with a journal of its own.
#[test]
fn an_image_still_mounted_elsewhere_is_not_attached_again() {
    use common::daemon::wait_until;
    let mut env = Env::new();
    env.start(&[]);
    let base = base(&env);
    env.create("s", &[("base", &base), ("size", "16Mi")])
        .unwrap();
    let mp = env.mount_ok("s", &mount_id(1));
    std::fs::write(env.seen(&mp.join("new.txt")), "new").unwrap();
    env.unmount_ok("s", &mount_id(1));
    // A copy of the namespace, the image's file system attached in it (the overlay not).
    let (mut holder, _) = env.holder_in_new_namespace("the holder");
    // Detached here only, as when the daemon runs again in a mount namespace of its own.
    let changes = env.volume_dir("s").join("changes");
    env.anchor.run(&["umount", changes.to_str().unwrap()]);
    let devices = env.loop_devices();
    assert_eq!(
        devices.len(),
        1,
        "the copy keeps the loop device: {devices:?}"
    );

    let err = env
        .mount("s", &mount_id(2))
        .expect_err("attached an image mounted elsewhere");
    let device = devices[0].split(' ').next().unwrap();
    assert!(
        err.contains(&format!("/dev/{device}")) && err.contains("another mount namespace"),
        "unclear error {err:?}"
    );
    assert_eq!(
        env.loop_devices(),
        devices,
        "a second loop device on the image"
    );
    env.assert_not_mounted("s");

    holder.kill();
    wait_until(
        std::time::Duration::from_secs(10),
        "the loop device to go",
        || env.loop_devices().is_empty(),
    );
    let mp = env.mount_ok("s", &mount_id(2));
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp.join("new.txt"))).unwrap(),
        "new"
    );
    env.unmount_ok("s", &mount_id(2));
    env.remove("s").unwrap();
    assert_nothing_left(&env);
}

/// A base in a sized volume's image file system, reached through a bind mount of its `upper/`
/// (no overlay, and no trace of the source in the path), is refused at Create and at Mount:
/// the overlay made of it would keep the image's file system mounted out of every mount table,
/// and the volume could not attach its image again.
#[test]
fn a_bind_of_a_sized_volumes_changes_is_no_base() {
    let mut env = Env::new();
    env.start(&[]);
    let base = base(&env);
    env.create("s", &[("base", &base), ("size", "16Mi")])
        .unwrap();
    env.mount_ok("s", &mount_id(1));
    let bound = env.dir.join("bound");
    std::fs::create_dir(&bound).unwrap();
    let upper = env.volume_dir("s").join("changes/upper");
    env.anchor.run(&[
        "mount",
        "--bind",
        upper.to_str().unwrap(),
        bound.to_str().unwrap(),
    ]);
    let refused = |err: String| {
        assert!(
            err.contains("is in a file system this plugin mounted for a volume")
                && err.contains(&format!("{:?}", env.volume_dir("s").join("changes"))),
            "unclear error {err:?}"
        );
    };
    refused(
        env.create("d", &[("base", bound.to_str().unwrap())])
            .expect_err("made a volume of a sized volume's changes"),
    );
    assert!(!env.root.join("d").exists());
    // Made before the bind, refused at Mount once it is there.
    env.anchor.run(&["umount", bound.to_str().unwrap()]);
    env.create("d", &[("base", bound.to_str().unwrap())])
        .unwrap();
    env.anchor.run(&[
        "mount",
        "--bind",
        upper.to_str().unwrap(),
        bound.to_str().unwrap(),
    ]);
    refused(env.mount("d", &mount_id(2)).expect_err("mounted it"));
    env.anchor.run(&["umount", bound.to_str().unwrap()]);
    env.unmount_ok("s", &mount_id(1));
    let mp = env.mount_ok("d", &mount_id(2));
    env.unmount_ok("d", &mount_id(2));
    drop(mp);
    for name in ["d", "s"] {
        env.remove(name).unwrap();
    }
    assert_nothing_left(&env);
}
