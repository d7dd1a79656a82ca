//! Kernel tests: real overlay mounts through `sys::RealSys`, each test in a private mount
//! namespace of its own thread so nothing reaches the host's mount table.

mod common;

use std::path::Path;

use docker_on_top::sys::{OverlaySpec, RealSys, Sys};

fn layout(dir: &Path) -> OverlaySpec {
    for d in ["lower", "upper", "work", "mnt"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    OverlaySpec {
        source: "docker-on-top-test".into(),
        lower: dir.join("lower"),
        upper: dir.join("upper"),
        work: dir.join("work"),
        target: dir.join("mnt"),
    }
}

fn mount_roundtrip(sys: &RealSys, parent: &str) {
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(parent);
    let spec = layout(&dir);
    std::fs::write(spec.lower.join("base.txt"), "base").unwrap();
    assert!(!sys.is_overlay_mounted(&spec.target).unwrap());
    sys.mount_overlay(&spec).unwrap();
    assert!(sys.is_overlay_mounted(&spec.target).unwrap());
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains("docker-on-top-test"))
        .unwrap();
    eprintln!("{line}");
    assert!(
        docker_on_top::sys::mountinfo_has_overlay_upper(info.as_bytes(), &spec.upper),
        "{line}"
    );
    // The kernel lists only options that differ from its defaults, so only "on" can show.
    for opt in ["index=on", "metacopy=on", "redirect_dir=on"] {
        assert!(!line.contains(opt), "{opt} set: {line}");
    }
    assert_eq!(
        std::fs::read_to_string(spec.target.join("base.txt")).unwrap(),
        "base"
    );
    std::fs::write(spec.target.join("new.txt"), "new").unwrap();
    std::fs::remove_file(spec.target.join("base.txt")).unwrap();
    assert!(spec.lower.join("base.txt").exists(), "lower changed");
    assert!(spec.upper.join("new.txt").exists());
    let unmounted = sys.unmount(&spec.target).unwrap();
    assert!(unmounted.no_copy_left, "a lone overlay leaves no copy");
    assert!(!sys.is_overlay_mounted(&spec.target).unwrap());
}

#[test]
fn fd_api_mounts_paths_with_separators() {
    mount_roundtrip(&RealSys::default(), "a b,c:d\\e");
}

#[test]
fn legacy_api_mounts_paths_with_separators() {
    mount_roundtrip(&RealSys::new(true), "a b,c:d\\e");
}

#[test]
fn busy_unmount_is_reported_not_forced() {
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let spec = layout(tmp.path());
    let sys = RealSys::default();
    sys.mount_overlay(&spec).unwrap();
    let open = std::fs::File::create(spec.target.join("held")).unwrap();
    assert!(matches!(
        sys.unmount(&spec.target),
        Err(docker_on_top::sys::SysError::Busy)
    ));
    assert!(sys.is_overlay_mounted(&spec.target).unwrap());
    drop(open);
    sys.unmount(&spec.target).unwrap();
}

/// The unmount tells a copy of the overlay left in another mount namespace (a process that
/// unshared while it was mounted) from none: the driver's only way to know, short of reading
/// every namespace's mount table.
#[test]
fn unmount_tells_whether_a_copy_lives_on_elsewhere() {
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let spec = layout(tmp.path());
    let sys = RealSys::default();
    sys.mount_overlay(&spec).unwrap();
    // A child of this thread starts in its mount namespace and copies it, overlay included.
    let mut holder = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sleep", "60"])
        .spawn()
        .expect("cannot run unshare (util-linux)");
    let ns = |of: &str| std::fs::read_link(format!("/proc/{of}/ns/mnt")).ok();
    let own = ns("thread-self");
    // Once the child is in a namespace of its own, it holds a copy of ours.
    let copied = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        ns(&holder.id().to_string()).is_some_and(|theirs| Some(theirs) != own)
    });
    assert!(
        copied,
        "the holder never entered a mount namespace of its own"
    );
    let unmounted = sys.unmount(&spec.target).unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        !unmounted.no_copy_left,
        "the copy in the holder's namespace went unseen"
    );
    assert!(!sys.is_overlay_mounted(&spec.target).unwrap());

    // Mounted again with the holder gone: the unmount now drops the last user.
    sys.mount_overlay(&spec).unwrap();
    assert!(sys.unmount(&spec.target).unwrap().no_copy_left);
}
