//! Unit tests of the driver with the recording test double ([`crate::sys::RecordingSys`]).

use super::mounting::holds_entries;
use super::*;
use crate::sys::RecordingSys;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

mod sized;

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    driver: Driver<RecordingSys>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("f"), "base").unwrap();
    let driver = Driver::with_sys(&tmp.path().join("root"), RecordingSys::default()).unwrap();
    Fixture {
        _tmp: tmp,
        base,
        driver,
    }
}

fn name(s: &str) -> VolumeName {
    VolumeName::parse(s).unwrap()
}
fn id(s: &str) -> MountId {
    MountId::parse(s).unwrap()
}

impl Fixture {
    fn create(&self, vol: &str, volatile: bool) {
        let mut o = BTreeMap::new();
        o.insert("base".to_string(), self.base.to_str().unwrap().to_string());
        o.insert("volatile".to_string(), volatile.to_string());
        self.driver.create(&name(vol), &o).unwrap();
    }
    fn unmount(&self, vol: &VolumeName, mount: &MountId) -> Result<(), DriverError> {
        self.driver.unmount(vol, mount)
    }
    /// The test double's state.
    fn sys(&self) -> std::sync::MutexGuard<'_, crate::sys::RecordingState> {
        self.driver.sys().state.lock().unwrap()
    }
    fn calls(&self) -> Vec<String> {
        let s = self.sys();
        s.calls
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_string())
            .collect()
    }
    /// Makes another mount namespace hold a copy of `vol`'s overlay.
    fn hold(&self, vol: &str) {
        let upper = self.vol(vol).upper();
        self.sys().held.insert(upper);
    }
    fn vol(&self, vol: &str) -> VolumeDir {
        self.driver.root().volume(&name(vol))
    }
    fn count(&self, vol: &str, mount: &str) -> Option<u64> {
        self.vol(vol)
            .read_records()
            .unwrap()
            .into_iter()
            .find(|(i, _)| i.as_str() == mount)
            .map(|(_, r)| r.usage_count)
    }
}

#[test]
fn create_is_idempotent_and_refuses_other_options() {
    let f = fixture();
    f.create("v", false);
    f.create("v", false);
    let mut o = BTreeMap::new();
    o.insert("base".into(), f.base.to_str().unwrap().into());
    o.insert("volatile".into(), "yes".into());
    let err = f.driver.create(&name("v"), &o).unwrap_err();
    assert!(matches!(err, DriverError::Conflict { .. }), "{err}");
    assert_eq!(f.driver.list().unwrap(), vec![name("v")]);
    let meta = f.vol("v").read_metadata().unwrap();
    assert_eq!(meta.base, std::fs::canonicalize(&f.base).unwrap());
    assert!(meta.created_at.is_some());
}

#[test]
fn bad_options_leave_nothing_on_disk() {
    let f = fixture();
    let mut o = BTreeMap::new();
    o.insert("base".into(), "relative".into());
    assert!(matches!(
        f.driver.create(&name("v"), &o),
        Err(DriverError::Options { .. })
    ));
    let entries: Vec<_> = std::fs::read_dir(f.driver.root().path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from(".trash")]);
}

#[test]
fn counts_per_id_and_mounts_once() {
    let f = fixture();
    f.create("v", false);
    let mp = f.driver.mount(&name("v"), &id("a"), None).unwrap();
    assert_eq!(mp, f.vol("v").mountpoint());
    f.driver.mount(&name("v"), &id("a"), None).unwrap(); // docker cp: same ID again
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    assert_eq!(f.count("v", "a"), Some(2));
    assert_eq!(f.calls(), vec!["mount"]);
    assert_eq!(f.driver.get(&name("v")).unwrap().active_mounts, 3);

    f.unmount(&name("v"), &id("a")).unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    assert_eq!(f.count("v", "a"), None);
    assert_eq!(f.calls(), vec!["mount"], "unmounted while b uses it");
    assert!(f.driver.path(&name("v")).unwrap().is_some());
    f.unmount(&name("v"), &id("b")).unwrap();
    assert_eq!(f.calls(), vec!["mount", "unmount"]);
    assert_eq!(f.driver.path(&name("v")).unwrap(), None);
    let err = f.unmount(&name("v"), &id("b")).unwrap_err();
    assert_eq!(err.to_string(), "volume v has no mount with ID b");
}

#[test]
fn a_mount_record_is_complete_when_mount_answers() {
    let f = fixture();
    f.create("v", false);
    // A live client, whose record is not released as an orphan's.
    f.sys().processes.insert(7, 9);
    let client = f.driver.client(Some(7));
    f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
    let records = f.vol("v").read_records().unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0].1;
    assert_eq!(record.usage_count, 1);
    assert_eq!(record.client, client);
    assert_eq!(record.boot_id.as_deref(), Some(&*f.driver.boot_id));
    // Nothing holds the volume once Mount has answered.
    std::fs::File::open(&f.vol("v").path)
        .unwrap()
        .try_lock()
        .unwrap();
    f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
    assert_eq!(f.count("v", "a"), Some(2));
}

#[test]
fn an_upper_holds_entries_as_its_stat_or_its_first_entry_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("upper");
    std::fs::create_dir(&dir).unwrap();
    assert!(!holds_entries(&dir).unwrap(), "empty");
    std::fs::write(dir.join("f"), "").unwrap();
    assert!(holds_entries(&dir).unwrap(), "a file (read)");
    std::fs::remove_file(dir.join("f")).unwrap();
    std::fs::create_dir(dir.join("d")).unwrap();
    assert!(holds_entries(&dir).unwrap(), "a subdirectory (link count)");
    std::fs::remove_dir(dir.join("d")).unwrap();
    for i in 0..500 {
        std::fs::write(dir.join(format!("file-with-a-longer-name-{i}")), "").unwrap();
    }
    assert!(holds_entries(&dir).unwrap(), "many files");
}

/// A base in a file system this root's volumes mounted (an overlay whose upper is in the root,
/// an image's file system mounted below it) is refused at Create and at Mount, with nothing
/// made or mounted. Anything else mounted elsewhere is a base like any other.
#[test]
fn a_base_in_a_file_system_of_our_volumes_is_refused() {
    use crate::sys::FsMount;
    let f = fixture();
    f.create("v", false);
    let root = f.driver.root().path().to_owned();
    let mount = |at: &str, upper: Option<PathBuf>| FsMount {
        mount_point: PathBuf::from(at),
        upper,
    };
    let mut o = BTreeMap::new();
    o.insert("base".to_string(), f.base.to_str().unwrap().to_string());
    let refused = [
        // An overlay of ours, wherever it is seen.
        vec![mount("/elsewhere", Some(f.vol("other").upper()))],
        // A sized volume's image, mounted in its directory (and bound elsewhere).
        vec![
            mount("/bound", None),
            mount(f.vol("other").changes().to_str().unwrap(), None),
        ],
    ];
    for mounts in refused {
        f.sys().base_mounts = mounts.clone();
        let err = f.driver.create(&name("w"), &o).unwrap_err();
        assert!(matches!(err, DriverError::BaseInVolume { .. }), "{err}");
        assert!(!f.vol("w").path.exists());
        let err = f.driver.mount(&name("v"), &id("a"), None).unwrap_err();
        assert!(matches!(err, DriverError::BaseInVolume { .. }), "{err}");
        assert!(f.calls().is_empty(), "{:?}", f.calls());
        assert_eq!(f.count("v", "a"), None);
    }
    // A foreign overlay; a loop device's file system mounted at the root itself (the host's
    // choice) or elsewhere.
    f.sys().base_mounts = vec![
        mount(
            "/srv/x",
            Some(PathBuf::from("/var/lib/docker/overlay2/x/diff")),
        ),
        mount(root.to_str().unwrap(), None),
        mount("/mnt/iso", None),
    ];
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    f.driver.create(&name("w"), &o).unwrap();
}

#[test]
fn unknown_volume_errors() {
    let f = fixture();
    for err in [
        f.driver.mount(&name("nope"), &id("a"), None).unwrap_err(),
        f.unmount(&name("nope"), &id("a")).unwrap_err(),
        f.driver.path(&name("nope")).unwrap_err(),
        f.driver.get(&name("nope")).unwrap_err(),
    ] {
        assert_eq!(err.to_string(), "volume nope does not exist");
    }
    f.driver.remove(&name("nope")).unwrap();
}

#[test]
fn volatile_changes_survive_unmount_and_go_at_next_mount() {
    let f = fixture();
    f.create("v", true);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    std::fs::write(f.vol("v").upper().join("scratch"), "x").unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    assert!(
        f.vol("v").upper().join("scratch").exists(),
        "discarded at unmount"
    );
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    assert!(
        !f.vol("v").upper().join("scratch").exists(),
        "not discarded"
    );
    // (Beside the last Unmount's record and overlayfs' `work/`, which went there too.)
    let trash: Vec<_> = std::fs::read_dir(f.driver.root().trash())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("v-upper")
        })
        .collect();
    assert_eq!(trash.len(), 1, "old upper moved to the trash");
    crate::janitor::sweep(f.driver.root());
    assert_eq!(
        std::fs::read_dir(f.driver.root().trash()).unwrap().count(),
        0
    );
}

#[test]
fn persistent_changes_stay() {
    let f = fixture();
    f.create("v", false);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    std::fs::write(f.vol("v").upper().join("kept"), "x").unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    assert!(f.vol("v").upper().join("kept").exists());
}

#[test]
fn upper_root_takes_the_base_owner_and_mode_also_after_discard() {
    let f = fixture();
    std::os::unix::fs::chown(&f.base, Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(&f.base, std::fs::Permissions::from_mode(0o2770)).unwrap();
    f.create("v", true);
    let check = || {
        let m = std::fs::metadata(f.vol("v").upper()).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o2770));
    };
    check();
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    std::fs::write(f.vol("v").upper().join("x"), "x").unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    check();
}

#[test]
fn records_of_an_earlier_boot_are_void() {
    let f = fixture();
    f.create("v", true);
    std::fs::write(f.vol("v").upper().join("old"), "x").unwrap();
    f.vol("v")
        .write_record(
            &id("old"),
            &MountRecord {
                usage_count: 1,
                boot_id: Some("other".into()),
                client: None,
            },
        )
        .unwrap();
    // Held elsewhere would refuse; an earlier boot's records need no look.
    f.hold("v");
    f.driver.mount(&name("v"), &id("new"), None).unwrap();
    assert_eq!(f.count("v", "old"), None);
    assert_eq!(f.count("v", "new"), Some(1));
    assert!(
        !f.vol("v").upper().join("old").exists(),
        "volatile not discarded"
    );
}

#[test]
fn records_of_this_boot_without_a_mount_are_checked_for_holders() {
    let f = fixture();
    f.create("v", false);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    // Someone unmounted it here while a container elsewhere still holds it.
    f.sys().mounted.clear();
    f.hold("v");
    let err = f.driver.mount(&name("v"), &id("b"), None).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert_eq!(f.calls(), vec!["mount"], "second overlay on one upper");
    let err = f.driver.remove(&name("v")).unwrap_err();
    assert!(err.to_string().contains("pid 4242"), "{err}");
    assert!(f.vol("v").path.exists());
    // Once the holder is gone, the records are void.
    f.sys().held.clear();
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    assert_eq!(f.count("v", "a"), None);
}

#[test]
fn a_copy_held_elsewhere_after_the_last_unmount_refuses_mount_and_remove() {
    let f = fixture();
    f.create("v", true);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    std::fs::write(f.vol("v").upper().join("in-use"), "x").unwrap();
    // The last Unmount here leaves a copy of the overlay in another mount namespace (made
    // while it was mounted: once no namespace has it, none can copy it).
    f.hold("v");
    f.unmount(&name("v"), &id("a")).unwrap();
    let err = f.driver.mount(&name("v"), &id("b"), None).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    let err = f.driver.remove(&name("v")).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert_eq!(
        f.calls(),
        vec!["mount", "unmount"],
        "second overlay on one upper"
    );
    assert!(
        f.vol("v").upper().join("in-use").exists(),
        "held upper discarded"
    );

    // A volatile overlay left with no records is not discarded while held either.
    f.sys().held.clear();
    f.driver.mount(&name("v"), &id("c"), None).unwrap();
    f.vol("v").clear_records().unwrap();
    std::fs::write(f.vol("v").upper().join("in-use"), "x").unwrap();
    f.hold("v");
    let err = f.driver.mount(&name("v"), &id("d"), None).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert!(
        f.vol("v").upper().join("in-use").exists(),
        "held upper discarded"
    );
    assert_eq!(f.calls(), vec!["mount", "unmount", "mount"]);

    f.sys().held.clear();
    f.driver.remove(&name("v")).unwrap();
    assert!(!f.vol("v").path.exists());
}

#[test]
fn the_last_unmount_learns_from_the_kernel_whether_a_copy_is_left() {
    let f = fixture();
    f.create("v", false);
    let looks = || f.sys().looks;
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    assert!(f.vol("v").overlay_work().exists());
    f.unmount(&name("v"), &id("a")).unwrap();
    assert!(
        !f.vol("v").overlay_work().exists(),
        "mark left although no copy is"
    );
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    f.unmount(&name("v"), &id("b")).unwrap();
    f.driver.remove(&name("v")).unwrap();
    assert_eq!(looks(), 0, "a Mount or Remove read the mount tables");

    // A copy lives on: the mark stays, and the next Mount and Remove look.
    f.create("w", false);
    f.driver.mount(&name("w"), &id("a"), None).unwrap();
    f.hold("w");
    f.unmount(&name("w"), &id("a")).unwrap();
    assert!(f.vol("w").overlay_work().exists());
    let err = f.driver.mount(&name("w"), &id("a"), None).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    let err = f.driver.remove(&name("w")).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert_eq!(looks(), 2);
    f.sys().held.clear();
    f.driver.mount(&name("w"), &id("a"), None).unwrap();
    assert_eq!(
        f.calls(),
        vec![
            "mount", "unmount", "mount", "unmount", "mount", "unmount", "mount"
        ]
    );
}

#[test]
fn busy_last_unmount_keeps_the_overlay_and_the_next_mount_copes() {
    let f = fixture();
    f.create("p", false);
    f.create("t", true);
    for v in ["p", "t"] {
        f.driver.mount(&name(v), &id("a"), None).unwrap();
        let mp = f.vol(v).mountpoint();
        f.sys().busy.insert(mp);
        // The mount is released; the overlay stays, with a warning in the log.
        f.unmount(&name(v), &id("a")).unwrap();
        assert_eq!(f.count(v, "a"), None);
        assert!(f.driver.get(&name(v)).unwrap().mounted);
    }
    // Persistent: reuse the overlay as it is.
    f.driver.mount(&name("p"), &id("b"), None).unwrap();
    // Volatile: its changes cannot be discarded while busy.
    let err = f.driver.mount(&name("t"), &id("b"), None).unwrap_err();
    assert!(matches!(err, DriverError::Busy { .. }), "{err}");
    f.sys().busy.clear();
    f.driver.mount(&name("t"), &id("b"), None).unwrap();
    assert_eq!(
        f.calls(),
        vec![
            "mount", "unmount", "mount", "unmount", "unmount", "unmount", "mount"
        ]
    );
}

#[test]
fn mounts_of_a_gone_client_are_released_once_nothing_holds_the_overlay() {
    let f = fixture();
    f.create("v", true);
    let upper = f.vol("v").upper();
    f.sys().processes.insert(100, 1);
    f.driver.mount(&name("v"), &id("a"), Some(100)).unwrap();
    std::fs::write(upper.join("scratch"), "x").unwrap();
    let rec = f.vol("v").read_records().unwrap()[0].1.clone();
    assert_eq!(
        rec.client,
        Some(Client {
            pid: 100,
            start_time: 1
        })
    );

    // dockerd (pid 100) dies and restarts as pid 200, with live-restore: the container
    // still holds the overlay, so its mount stays.
    {
        let mut s = f.sys();
        s.processes.clear();
        s.processes.insert(200, 5);
        s.held.insert(upper.clone());
    }
    f.driver.mount(&name("v"), &id("b"), Some(200)).unwrap();
    assert_eq!(f.count("v", "a"), Some(1));
    assert!(upper.join("scratch").exists());
    f.unmount(&name("v"), &id("b")).unwrap();

    // The container is gone too: its mount is released, and the volatile volume starts
    // afresh instead of showing a dead container's scratch file.
    f.sys().held.clear();
    f.driver.mount(&name("v"), &id("c"), Some(200)).unwrap();
    assert_eq!(f.count("v", "a"), None);
    assert!(
        !upper.join("scratch").exists(),
        "dead container's changes shown"
    );
    assert_eq!(f.calls(), vec!["mount", "unmount", "mount"]);
}

/// The client asking is taken as alive without a look in /proc (here, the test double knows no
/// such process): its own records are never released as a gone client's.
#[test]
fn the_asking_clients_records_are_not_looked_up() {
    let f = fixture();
    f.create("v", true);
    let client = Some(Client {
        pid: 300,
        start_time: 7,
    });
    f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
    f.driver.mount_as(&name("v"), &id("b"), client).unwrap();
    assert_eq!(f.count("v", "a"), Some(1));
    assert_eq!(f.count("v", "b"), Some(1));
    assert_eq!(f.calls(), vec!["mount"]);
}

#[test]
fn a_reused_pid_is_not_the_same_client() {
    let f = fixture();
    f.create("v", false);
    f.sys().processes.insert(100, 1);
    f.driver.mount(&name("v"), &id("a"), Some(100)).unwrap();
    // A live client keeps its mounts whatever holds the overlay.
    f.driver.mount(&name("v"), &id("b"), Some(100)).unwrap();
    assert_eq!(f.count("v", "a"), Some(1));
    // Same pid, another process.
    f.sys().processes.insert(100, 2);
    f.driver.mount(&name("v"), &id("c"), Some(100)).unwrap();
    assert_eq!((f.count("v", "a"), f.count("v", "b")), (None, None));
    assert_eq!(f.count("v", "c"), Some(1));
    // Records with no client (Go version, unknown peer) are never released this way.
    f.driver.mount(&name("v"), &id("d"), None).unwrap();
    f.sys().processes.clear();
    f.driver.mount(&name("v"), &id("e"), None).unwrap();
    assert_eq!(f.count("v", "d"), Some(1));
    assert_eq!(f.count("v", "c"), None);
}

#[test]
fn a_record_temporary_left_by_a_crash_goes_at_the_next_mount() {
    let f = fixture();
    f.create("v", false);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    // A crash in the middle of a record write (tests/crash.rs kills the daemon there).
    let tmp = f.vol("v").active_mounts().join(".a.tmp-1-2-3");
    std::fs::write(&tmp, "{").unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    f.driver.mount(&name("v"), &id("b"), None).unwrap();
    assert!(!tmp.exists(), "temporary kept");
    assert_eq!(f.count("v", "b"), Some(1));
}

#[test]
fn overlay_left_by_a_crash_after_mount_is_reused() {
    let f = fixture();
    f.create("v", false);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    f.vol("v").clear_records().unwrap(); // crash before the record was written
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    assert_eq!(f.calls(), vec!["mount"]);
    assert_eq!(f.count("v", "a"), Some(1));
}

#[test]
fn remove_cleans_leftovers_and_refuses_busy() {
    let f = fixture();
    f.create("v", false);
    f.driver.mount(&name("v"), &id("a"), None).unwrap();
    let mp = f.vol("v").mountpoint();
    f.sys().busy.insert(mp.clone());
    assert!(matches!(
        f.driver.remove(&name("v")),
        Err(DriverError::Busy { .. })
    ));
    assert!(f.vol("v").path.exists());
    f.sys().busy.clear();
    f.driver.remove(&name("v")).unwrap();
    assert!(!f.vol("v").path.exists());
    assert!(f.sys().mounted.is_empty());
    assert!(f.driver.list().unwrap().is_empty());
    assert!(matches!(
        f.driver.get(&name("v")),
        Err(DriverError::NoSuchVolume(_))
    ));
}

#[test]
fn a_volume_made_again_under_a_name_is_read_afresh() {
    let f = fixture();
    f.create("v", false);
    assert_eq!(f.driver.get(&name("v")).unwrap().volatile, Some(false));
    f.driver.remove(&name("v")).unwrap();
    f.create("v", true);
    assert_eq!(f.driver.get(&name("v")).unwrap().volatile, Some(true));
}

#[test]
fn get_reports_damaged_metadata_instead_of_failing() {
    let f = fixture();
    f.create("v", false);
    std::fs::write(f.vol("v").metadata(), "{oops").unwrap();
    let info = f.driver.get(&name("v")).unwrap();
    assert!(info.error.unwrap().contains("metadata.json"));
    assert!(f.driver.mount(&name("v"), &id("a"), None).is_err());
}

#[test]
fn go_version_volumes_work() {
    let f = fixture();
    let vol = f.vol("legacy");
    std::fs::create_dir_all(vol.upper()).unwrap();
    std::fs::create_dir_all(vol.work()).unwrap();
    std::fs::create_dir_all(vol.mountpoint()).unwrap();
    std::fs::create_dir_all(vol.active_mounts()).unwrap();
    std::fs::write(vol.upper().join("kept"), "x").unwrap();
    std::fs::write(
        vol.metadata(),
        format!(
            r#"{{"BaseDirPath":"{}","Volatile":false}}"#,
            f.base.display()
        ),
    )
    .unwrap();
    let info = f.driver.get(&name("legacy")).unwrap();
    assert!(!info.mounted);
    f.driver.mount(&name("legacy"), &id("a"), None).unwrap();
    assert!(vol.upper().join("kept").exists());
    f.create("legacy", false); // same options: accepted
}

/// A managed plugin's driver (`--mount-dir`): overlays go to `DIR/NAME`, the one place whose
/// mounts dockerd sees, while everything else stays in the volume's directory.
#[test]
fn a_mount_dir_holds_the_overlays_and_the_volume_directory_the_rest() {
    let mut f = fixture();
    let dir = f._tmp.path().join("propagated/volumes");
    // As `Driver::open` does with `DriverConfig::mount_dir`.
    f.driver.root = f.driver.root.clone().with_mount_dir(&dir).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(f.driver.root().mount_dir(), Some(dir.as_path()));
    let root = f.driver.root().path().to_owned();
    f.create("v", false);
    f.create("w", true);
    assert_eq!(f.vol("v").mountpoint(), dir.join("v"));
    assert_eq!(f.driver.path(&name("v")).unwrap(), None);
    assert!(!dir.join("v").exists(), "made before the first Mount");

    let mp = f.driver.mount(&name("v"), &id("a"), None).unwrap();
    assert_eq!(mp, dir.join("v"));
    assert!(mp.is_dir());
    {
        let s = f.sys();
        assert_eq!(s.mounted.len(), 1);
        let spec = &s.mounted[0];
        assert_eq!(spec.target, dir.join("v"));
        assert_eq!(spec.upper, root.join("v/upper"));
        assert!(spec.work.starts_with(root.join("v")), "{spec:?}");
    }
    assert_eq!(f.driver.path(&name("v")).unwrap(), Some(dir.join("v")));
    let info = f.driver.get(&name("v")).unwrap();
    assert_eq!(info.mountpoint, Some(dir.join("v")));
    assert!(info.mounted);
    assert_eq!(info.active_mounts, 1);
    assert_eq!(info.upper, root.join("v/upper"));
    for kept in ["metadata.json", "upper", "workdir", "activemounts"] {
        assert!(
            root.join("v").join(kept).exists(),
            "{kept} is not in ROOT/v"
        );
    }
    assert_eq!(f.count("v", "a"), Some(1));
    assert!(
        std::fs::read_dir(root.join("v/activemounts"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "a"),
        "the record is not in ROOT/v/activemounts"
    );
    // Nothing but the volumes' mountpoints in the mount directory.
    let entries: Vec<_> = (std::fs::read_dir(&dir).unwrap())
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["v"]);

    f.unmount(&name("v"), &id("a")).unwrap();
    assert_eq!(f.driver.path(&name("v")).unwrap(), None);
    assert_eq!(f.driver.get(&name("v")).unwrap().mountpoint, None);
    f.driver.remove(&name("v")).unwrap();
    assert!(!dir.join("v").exists(), "Remove left DIR/v");
    assert!(!root.join("v").exists());

    // A leftover mount (a crash before the last Unmount's reply) is unmounted at DIR/NAME,
    // and its mountpoint goes too.
    f.driver.mount(&name("w"), &id("b"), None).unwrap();
    f.vol("w").clear_records().unwrap();
    f.driver.remove(&name("w")).unwrap();
    let (mounted, calls) = {
        let s = f.sys();
        (s.mounted.len(), s.calls.clone())
    };
    assert_eq!(mounted, 0);
    let unmounted = format!("unmount {}", dir.join("w").display());
    assert!(calls.contains(&unmounted), "{calls:?}");
    assert!(!dir.join("w").exists(), "Remove left DIR/w");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert!(f.driver.list().unwrap().is_empty());
}

/// A managed plugin's Mount that its client (dockerd) cannot see: refused, the overlay it
/// made unmounted again, nothing recorded, and the hook (`main` stops the daemon) called once
/// per such Mount. Without a mount directory that is a shared mount, the client's view is not
/// asked.
#[test]
fn a_mount_its_client_cannot_see_is_refused_and_undone() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut f = fixture();
    f.create("v", false);
    {
        let mut s = f.sys();
        s.processes.insert(7, 9);
        s.blind.insert(7);
    }
    let client = f.driver.client(Some(7));
    // The service: dockerd shares our mount namespace, nothing is asked.
    f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();

    let dir = f._tmp.path().join("propagated/volumes");
    f.driver.root = f.driver.root.clone().with_mount_dir(&dir).unwrap();
    // A mount directory that is no shared mount reaches nobody: nothing is asked.
    f.driver.mount_as(&name("v"), &id("a"), client).unwrap();
    f.unmount(&name("v"), &id("a")).unwrap();
    // As `Driver::open` finds a shared one.
    f.driver.mounts_reach_client = true;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    f.driver.on_cut_off(move || {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    f.sys().calls.clear();
    let err = f.driver.mount_as(&name("v"), &id("b"), client).unwrap_err();
    assert!(matches!(err, DriverError::CutOff { pid: 7, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "volume v was mounted where dockerd (pid 7) cannot see it: the plugin's mount directory \
         no longer reaches dockerd's mount namespace, and the plugin stops for dockerd to start \
         it again with one that does"
    );
    // (The first mount in a new mount directory misses its mountpoint and is made again.)
    assert!(
        f.calls().ends_with(&["mount".into(), "unmount".into()]),
        "{:?}",
        f.calls()
    );
    assert!(f.sys().mounted.is_empty());
    assert!(f.vol("v").read_records().unwrap().is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Asked only by a Mount that mounts (dockerd cuts a plugin off as it starts it again,
    // before anything is mounted): one more use of a mounted overlay is counted.
    f.sys().processes.insert(8, 3);
    let seeing = f.driver.client(Some(8));
    f.driver.mount_as(&name("v"), &id("c"), seeing).unwrap();
    f.driver.mount_as(&name("v"), &id("d"), client).unwrap();
    assert_eq!(f.sys().mounted.len(), 1);
    assert_eq!((f.count("v", "c"), f.count("v", "d")), (Some(1), Some(1)));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// The admin commands' locks and reset (`locked.rs`).

#[test]
fn reset_moves_the_upper_to_the_trash_and_keeps_the_base_owner() {
    let f = fixture();
    std::os::unix::fs::chown(&f.base, Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(&f.base, std::fs::Permissions::from_mode(0o750)).unwrap();
    f.create("v", false);
    std::fs::write(f.vol("v").upper().join("change"), "x").unwrap();
    let trashed = f.driver.reset(&name("v")).unwrap().unwrap();
    assert!(trashed.starts_with(f.driver.root().trash()));
    assert!(trashed.join("change").exists());
    let upper = std::fs::metadata(f.vol("v").upper()).unwrap();
    assert_eq!(
        (upper.uid(), upper.gid(), upper.mode() & 0o7777),
        (1000, 1001, 0o750)
    );
    assert_eq!(std::fs::read_dir(f.vol("v").upper()).unwrap().count(), 0);
    // No upper at all (a damaged or Go volume): a fresh one is installed.
    std::fs::remove_dir(f.vol("v").upper()).unwrap();
    assert_eq!(f.driver.reset(&name("v")).unwrap(), None);
    assert!(f.vol("v").upper().is_dir());
    assert!(f.base.is_dir());
}

#[test]
fn reset_is_refused_while_mounted_or_held_and_voids_stale_records() {
    let f = fixture();
    f.create("v", false);
    std::fs::write(f.vol("v").upper().join("change"), "x").unwrap();
    f.driver
        .mount(&name("v"), &MountId::parse("a").unwrap(), None)
        .unwrap();
    let err = f.driver.reset(&name("v")).unwrap_err();
    assert!(
        matches!(err, DriverError::Mounted { mounts: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("docker ps --filter volume=v"),
        "{err}"
    );

    // Mounted with no record: the message tells how to unmount.
    f.vol("v").clear_records().unwrap();
    let err = f.driver.reset(&name("v")).unwrap_err();
    assert!(err.to_string().contains("umount "), "{err}");

    // Unmounted here, but a copy lives on elsewhere, with or without records.
    f.sys().mounted.clear();
    f.vol("v")
        .write_record(
            &MountId::parse("old").unwrap(),
            &MountRecord {
                usage_count: 1,
                client: None,
                boot_id: None,
            },
        )
        .unwrap();
    f.hold("v");
    let err = f.driver.reset(&name("v")).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert!(f.vol("v").upper().join("change").exists());

    f.sys().held.clear();
    f.driver.reset(&name("v")).unwrap();
    assert!(
        f.vol("v").read_records().unwrap().is_empty(),
        "void records kept"
    );
    assert!(!f.vol("v").upper().join("change").exists());
}

#[test]
fn live_mounts_only_while_mounted() {
    let f = fixture();
    f.create("v", false);
    let id = MountId::parse("a").unwrap();
    f.driver.mount(&name("v"), &id, None).unwrap();
    f.driver.mount(&name("v"), &id, None).unwrap();
    let vol = f.driver.lock_volume(&name("v")).unwrap();
    assert_eq!(f.driver.live_mounts(&vol).unwrap(), vec![(id.clone(), 2)]);
    drop(vol);
    f.driver.unmount(&name("v"), &id).unwrap();
    f.driver.unmount(&name("v"), &id).unwrap();
    let vol = f.driver.lock_volume(&name("v")).unwrap();
    assert!(f.driver.live_mounts(&vol).unwrap().is_empty());
    assert!(matches!(
        f.driver.lock_volume(&name("nope")),
        Err(DriverError::NoSuchVolume(_))
    ));
}
