//! Kernel tests: real overlay mounts through `sys::RealSys`, each test in a private mount
//! namespace of its own thread (or of its own process, where `/proc/self` is read) so nothing
//! reaches the host's mount table.

mod common;

use std::path::Path;

use docker_on_top::sys::{OverlaySpec, RealSys, Sys, SysError};

/// Held by every test here: they run one at a time. Run beside another test's overlay
/// unmounts, an unmount that dropped the last user sometimes did not see its superblock shut
/// down before it returned (6 in 100 runs of this binary, none in 60 run one test at a time;
/// the cause in the kernel is not known). It then says it cannot tell
/// (`Unmounted::no_copy_left` false), which is safe: the driver makes the full look at the
/// next Mount. What these tests check is the answer when nothing else unmounts meanwhile.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    mount_roundtrip(&RealSys::default(), "a b,c:d\\e");
}

#[test]
fn legacy_api_mounts_paths_with_separators() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    mount_roundtrip(&RealSys::new(true), "a b,c:d\\e");
}

#[test]
fn busy_unmount_is_reported_not_forced() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

    // This thread's unmounts share one inotify instance: a refused unmount (a file open in
    // the overlay) and the events of the ones before must not answer for the next ones.
    sys.mount_overlay(&spec).unwrap();
    let open = std::fs::File::open(&spec.target).unwrap();
    assert!(matches!(sys.unmount(&spec.target), Err(SysError::Busy)));
    drop(open);
    for _ in 0..3 {
        assert!(sys.unmount(&spec.target).unwrap().no_copy_left);
        sys.mount_overlay(&spec).unwrap();
    }
    assert!(sys.unmount(&spec.target).unwrap().no_copy_left);
}

/// An unmount on a thread that cannot make its inotify instance (every descriptor taken, or
/// the user's inotify instances all in use) cannot tell that no copy is left, and says so; the
/// thread's next unmount, with a descriptor free again, makes the instance and can tell again.
#[test]
fn unmount_watch_is_made_again_after_it_could_not_be() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A whole process: the descriptor limit is the process's.
    if !as_whole_process("unmount_watch_is_made_again_after_it_could_not_be") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = layout(tmp.path());
    let sys = RealSys::default();
    sys.mount_overlay(&spec).unwrap();
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // The lowest free descriptor as the limit: every descriptor below it is taken.
    let lowest_free = std::os::fd::AsRawFd::as_raw_fd(&std::fs::File::open("/dev/null").unwrap());
    let lowered = rustix::process::Rlimit {
        current: Some(lowest_free as u64),
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, lowered).unwrap();
    let without_watch = sys.unmount(&spec.target);
    setrlimit(Resource::Nofile, limit).unwrap();
    assert!(
        !without_watch.unwrap().no_copy_left,
        "with no inotify instance, the unmount claimed to know that no copy is left"
    );
    assert!(!sys.is_overlay_mounted(&spec.target).unwrap());

    sys.mount_overlay(&spec).unwrap();
    assert!(
        sys.unmount(&spec.target).unwrap().no_copy_left,
        "the thread did not make its inotify instance once it could"
    );
}

/// Loop devices whose backing file is `image`.
fn loops_backed_by(image: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap() {
        let entry = entry.unwrap();
        let backing = entry.path().join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(&backing)
            && Path::new(file.trim()) == image
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A sized volume's image: made sparse, attached through a loop device, its file system
/// mounted; writing past its size fails with ENOSPC; unmounting it detaches the device.
#[test]
fn an_image_caps_what_is_written_and_its_loop_device_goes_with_its_unmount() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use docker_on_top::options::FsType;
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("changes.img");
    let target = tmp.path().join("changes");
    std::fs::create_dir(&target).unwrap();
    let sys = RealSys::default();
    sys.format_image(&image, 16 << 20, true, FsType::Ext4)
        .unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap());
    assert!(
        allocated * 512 < 8 << 20,
        "a sparse image took {allocated} blocks"
    );
    assert!(
        sys.format_image(&image, 16 << 20, true, FsType::Ext4)
            .is_err(),
        "made twice"
    );

    sys.attach_image(&image, FsType::Ext4, &target).unwrap();
    assert!(sys.is_mount_root(&target).unwrap());
    let loops = loops_backed_by(&image);
    assert_eq!(loops.len(), 1);
    let dio = std::fs::read_to_string(format!("/sys/block/{}/loop/dio", loops[0])).unwrap();
    let autoclear =
        std::fs::read_to_string(format!("/sys/block/{}/loop/autoclear", loops[0])).unwrap();
    println!(
        "loop device {}: dio {}, autoclear {}",
        loops[0],
        dio.trim(),
        autoclear.trim()
    );
    assert_eq!(autoclear.trim(), "1");
    assert_eq!(dio.trim(), "1", "no direct I/O on an ext4 backing file");
    let (size, used) = sys.fs_usage(&target).unwrap();
    assert!(
        size > 8 << 20 && size <= 16 << 20 && used < size,
        "{size} {used}"
    );
    let mut file = std::fs::File::create(target.join("big")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let err = (0..64)
        .find_map(|_| std::io::Write::write_all(&mut file, &chunk).err())
        .expect("wrote 64 MiB into a 16 MiB file system");
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    drop(file);

    // Another test of this process may be between a fork and an exec, holding a copy of the
    // file's descriptor for that moment: busy until then.
    for tries in 0.. {
        match sys.unmount(&target) {
            Err(docker_on_top::sys::SysError::Busy) if tries < 500 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            result => {
                result.unwrap();
                break;
            }
        }
    }
    assert!(!sys.is_mount_root(&target).unwrap());
    wait_for("the loop device to detach", || {
        loops_backed_by(&image).is_empty()
    });
    // Attached again (a reboot's first Mount): the data is still there.
    sys.attach_image(&image, FsType::Ext4, &target).unwrap();
    assert!(target.join("big").exists());
    sys.unmount(&target).unwrap();
    wait_for("the loop device to detach", || {
        loops_backed_by(&image).is_empty()
    });
}

/// A reserved image (`sparse=false`) takes its space at once; with too little free space it
/// fails with ENOSPC and leaves no image behind.
#[test]
fn a_reserved_image_takes_its_space_or_fails_leaving_nothing() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use docker_on_top::options::FsType;
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "dot-test"])
        .arg(&small)
        .status()
        .expect("cannot run mount");
    assert!(status.success());
    let sys = RealSys::default();
    let image = small.join("a.img");
    sys.format_image(&image, 16 << 20, false, FsType::Ext4)
        .unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap());
    // mkfs may punch out a few blocks it zeroes; nearly all of it stays reserved.
    assert!(
        allocated * 512 >= 15 << 20,
        "only {allocated} blocks reserved"
    );
    let too_big = small.join("b.img");
    let err = sys
        .format_image(&too_big, 64 << 20, false, FsType::Ext4)
        .unwrap_err();
    let text = docker_on_top::error_chain(&err);
    assert!(text.contains("No space left on device"), "{text}");
    assert!(!too_big.exists(), "a partial image was left");
}

/// Set in a copy of this test binary that runs one test as a process of its own.
const WHOLE_PROCESS: &str = "DOCKER_ON_TOP_KERNEL_TEST_WHOLE_PROCESS";

/// Runs the test `name` (the caller) in a private mount namespace as a whole process:
/// `true` in that process, which then does the test's work; `false` in the test thread that
/// started it, once it passed. `RealSys::overlay_holders` reads `/proc/self`, the namespace of
/// the process's main thread, which no unshare of a test thread moves.
fn as_whole_process(name: &str) -> bool {
    let ns = |of: &str| std::fs::read_link(format!("/proc/{of}/ns/mnt")).unwrap();
    if std::env::var_os(WHOLE_PROCESS).is_some() {
        assert_eq!(
            ns("self"),
            ns("thread-self"),
            "the process is not in one namespace"
        );
        return true;
    }
    common::private_mount_namespace();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(WHOLE_PROCESS, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    // A filter that matched nothing would pass too.
    assert!(stdout.contains("1 passed"), "{name} did not run: {stdout}");
    false
}

/// Processes started for a test, killed however it ends.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `unshare ARGS sleep 60` and waits until it sleeps in a mount namespace of its own,
/// its propagation set. Its pid.
fn in_new_namespace(children: &mut Children, args: &[&str]) -> u32 {
    let child = std::process::Command::new("unshare")
        .args(args)
        .args(["sleep", "60"])
        .spawn()
        .expect("cannot run unshare (util-linux)");
    let pid = child.id();
    children.0.push(child);
    let ns = |of: &str| std::fs::read_link(format!("/proc/{of}/ns/mnt")).ok();
    let own = ns("self");
    wait_for("the copy's namespace", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
            && ns(&pid.to_string()).is_some_and(|theirs| Some(theirs) != own)
    });
    pid
}

/// A shared tmpfs at `DIR/propagated` (as a managed plugin's propagated mount is) with an
/// overlay mounted on it at `propagated/v`.
fn overlay_on_a_shared_mount(dir: &Path) -> (std::path::PathBuf, OverlaySpec, RealSys) {
    let propagated = dir.join("propagated");
    std::fs::create_dir(&propagated).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "dot-propagated"])
        .arg(&propagated)
        .status()
        .expect("cannot run mount");
    assert!(status.success());
    rustix::mount::mount_change(&propagated, rustix::mount::MountPropagationFlags::SHARED).unwrap();
    let mut spec = layout(&dir.join("v"));
    spec.target = propagated.join("v");
    std::fs::create_dir(&spec.target).unwrap();
    let sys = RealSys::default();
    sys.mount_overlay(&spec).unwrap();
    (propagated, spec, sys)
}

fn copies_in(pid: &str, upper: &Path) -> Vec<Option<u64>> {
    let info = std::fs::read(format!("/proc/{pid}/mountinfo")).unwrap();
    (docker_on_top::sys::mountinfo::parse(&info).into_iter())
        .filter(|m| m.shows_upper(upper))
        .map(|m| m.shared)
        .collect()
}

/// A managed plugin mounts under its propagated mount, shared with dockerd's namespace: the
/// copy there is a peer of its mount, and goes with its unmount, so it holds nothing; so does
/// a slave copy. A copy in a namespace of its own (private) lives on after the unmount: a
/// holder.
#[test]
fn a_copy_in_our_peer_group_is_no_holder_and_a_private_one_is() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !as_whole_process("a_copy_in_our_peer_group_is_no_holder_and_a_private_one_is") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (propagated, spec, sys) = overlay_on_a_shared_mount(tmp.path());
    // Mounted under a shared mount, it is in a peer group of its own.
    let ours = copies_in("self", &spec.upper);
    assert!(matches!(ours[..], [Some(_)]), "{ours:?}");

    let mut children = Children(Vec::new());
    let peer = in_new_namespace(&mut children, &["-m", "--propagation", "unchanged"]);
    assert_eq!(
        copies_in(&peer.to_string(), &spec.upper),
        ours,
        "not a peer"
    );
    assert_eq!(sys.overlay_holders(&spec.upper).unwrap(), []);
    // A slave copy (what systemd's PrivateTmp= and ProtectSystem= make) goes too.
    let slave = in_new_namespace(&mut children, &["-m", "--propagation", "slave"]);
    assert_eq!(copies_in(&slave.to_string(), &spec.upper), [None]);
    assert_eq!(sys.overlay_holders(&spec.upper).unwrap(), []);

    let private = in_new_namespace(&mut children, &["-m"]);
    assert_eq!(copies_in(&private.to_string(), &spec.upper), [None]);
    let holders = sys.overlay_holders(&spec.upper).unwrap();
    let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    assert_eq!(pids, [private], "{holders:?}");
    assert_eq!(holders[0].command, "sleep");
    let of = sys.overlay_holders_of(std::slice::from_ref(&spec.upper));
    assert_eq!(of.unwrap(), std::slice::from_ref(&holders));

    // Why the peer is none: the unmount took its copy away, and left the private one's.
    let unmounted = sys.unmount(&spec.target).unwrap();
    assert!(!unmounted.no_copy_left, "the private copy went unseen");
    assert_eq!(copies_in(&peer.to_string(), &spec.upper), []);
    assert_eq!(copies_in(&slave.to_string(), &spec.upper), []);
    assert_eq!(copies_in(&private.to_string(), &spec.upper), [None]);
    assert_eq!(sys.overlay_holders(&spec.upper).unwrap(), holders);
    drop(children);
    assert_eq!(sys.overlay_holders(&spec.upper).unwrap(), []);
    rustix::mount::unmount(&propagated, rustix::mount::UnmountFlags::empty()).unwrap();
}

/// A bind of the volume made in the peer's namespace (say `mount --bind` of dockerd's
/// propagated mount's `v` elsewhere on the host) joins the peer group too, but no unmount of
/// ours reaches it: it holds the overlay.
#[test]
fn a_bind_of_a_peer_elsewhere_is_a_holder() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !as_whole_process("a_bind_of_a_peer_elsewhere_is_a_holder") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (propagated, spec, sys) = overlay_on_a_shared_mount(tmp.path());
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let mut children = Children(Vec::new());
    let peer = in_new_namespace(&mut children, &["-m", "--propagation", "unchanged"]);
    let status = std::process::Command::new("nsenter")
        .args(["-t", &peer.to_string(), "-m", "mount", "--bind"])
        .arg(&spec.target)
        .arg(&elsewhere)
        .status()
        .unwrap();
    assert!(status.success());
    // Both of the peer's mounts are in our mount's peer group...
    let ours = copies_in("self", &spec.upper);
    assert_eq!(
        copies_in(&peer.to_string(), &spec.upper),
        [ours[0], ours[0]]
    );
    // ... but only the one on the shared tmpfs goes with our unmount.
    let holders = sys.overlay_holders(&spec.upper).unwrap();
    assert_eq!(
        holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [peer],
        "{holders:?}"
    );
    let unmounted = sys.unmount(&spec.target).unwrap();
    assert!(!unmounted.no_copy_left, "the bind went unseen");
    assert_eq!(copies_in(&peer.to_string(), &spec.upper), [ours[0]]);
    drop(children);
    rustix::mount::unmount(&propagated, rustix::mount::UnmountFlags::empty()).unwrap();
}
