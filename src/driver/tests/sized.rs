//! Unit tests of sized volumes (`-o size=`): the image attached when first needed, swapped
//! for a fresh one on a volatile discard, and detached only when no copy of the overlay is left.

use super::*;

impl Fixture {
    fn create_sized(&self, vol: &str, volatile: bool, size: &str) -> Result<(), DriverError> {
        let mut o = BTreeMap::new();
        o.insert("base".to_string(), self.base.to_str().unwrap().to_string());
        o.insert("volatile".to_string(), volatile.to_string());
        o.insert("size".to_string(), size.to_string());
        self.driver.create(&name(vol), &o)
    }
    fn attached(&self, vol: &str) -> bool {
        let changes = self.vol(vol).changes();
        self.sys().attached.contains_key(&changes)
    }
}

#[test]
fn a_sized_volume_keeps_its_changes_in_an_image_attached_when_first_needed() {
    let f = fixture();
    f.create_sized("s", false, "64Mi").unwrap();
    let vol = f.vol("s");
    assert!(vol.sized());
    assert_eq!(std::fs::metadata(vol.image()).unwrap().len(), 64 << 20);
    assert!(!vol.path.join("upper").exists() && !vol.path.join("workdir").exists());
    let size = vol.read_metadata().unwrap().size.unwrap();
    assert_eq!((size.bytes, size.sparse), (64 << 20, true));
    assert!(!f.attached("s"), "attached at Create");
    let info = f.driver.get(&name("s")).unwrap();
    let status = info.size.unwrap();
    assert_eq!((status.cap, status.used), (64 << 20, None));
    assert_eq!(info.upper, vol.changes().join("upper"));

    f.driver.mount(&name("s"), &id("a"), None).unwrap();
    assert!(f.attached("s"));
    let spec = f.sys().mounted[0].clone();
    assert_eq!(spec.upper, vol.changes().join("upper"));
    assert_eq!(spec.work, vol.changes().join("work"));
    f.driver.mount(&name("s"), &id("b"), None).unwrap();
    f.unmount(&name("s"), &id("a")).unwrap();
    f.unmount(&name("s"), &id("b")).unwrap();
    assert!(f.attached("s"), "the last Unmount detached the image");
    assert!(
        f.driver
            .get(&name("s"))
            .unwrap()
            .size
            .unwrap()
            .used
            .is_some()
    );

    // A reboot detaches everything: the next Mount attaches again, with the changes.
    std::fs::write(vol.upper().join("kept"), "x").unwrap();
    f.driver.sys().unmount(&vol.changes()).unwrap();
    assert!(!vol.upper().exists(), "the upper is in the image");
    f.driver.mount(&name("s"), &id("c"), None).unwrap();
    assert!(vol.upper().join("kept").exists());
    f.unmount(&name("s"), &id("c")).unwrap();

    f.driver.remove(&name("s")).unwrap();
    assert!(!f.attached("s"), "Remove left the image attached");
    assert!(!vol.path.exists());
    assert_eq!(
        f.calls(),
        vec![
            "format", "attach", "mount", "unmount", "unmount", "attach", "mount", "unmount",
            "unmount"
        ]
    );
}

#[test]
fn a_volatile_sized_volume_swaps_in_a_fresh_image() {
    let f = fixture();
    f.create_sized("s", true, "16Mi").unwrap();
    let vol = f.vol("s");
    f.driver.mount(&name("s"), &id("a"), None).unwrap();
    std::fs::write(vol.upper().join("scratch"), "x").unwrap();
    f.unmount(&name("s"), &id("a")).unwrap();
    // Detached by the last Unmount; the changes are in the image until the next Mount, for
    // the admin commands, which attach it.
    assert!(!f.attached("s"), "a volatile image stays attached");
    let locked = f.driver.lock_volume(&name("s")).unwrap();
    assert!(
        vol.upper().join("scratch").exists(),
        "gone before the next Mount"
    );
    drop(locked);
    f.driver.mount(&name("s"), &id("b"), None).unwrap();
    assert!(!vol.upper().join("scratch").exists());
    assert!(vol.image().is_file());
    let trash: Vec<_> = std::fs::read_dir(f.driver.root().trash())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        trash.iter().any(|n| n.contains("s-image")),
        "the old image is not in the trash: {trash:?}"
    );
    assert_eq!(
        f.calls(),
        vec![
            "format", "attach", "mount", "unmount", "unmount", "attach", "unmount", "format",
            "attach", "mount"
        ]
    );
}

#[test]
fn a_volatile_sized_volume_held_elsewhere_stays_attached_until_nothing_holds_it() {
    let f = fixture();
    f.create_sized("s", true, "16Mi").unwrap();
    let vol = f.vol("s");
    f.driver.mount(&name("s"), &id("a"), None).unwrap();
    std::fs::write(vol.upper().join("in-use"), "x").unwrap();
    f.hold("s");
    f.unmount(&name("s"), &id("a")).unwrap();
    // Detaching it would hide the mark of a due look, which is on its file system; and the
    // next Mount would attach the image a second time, beside the copy's.
    assert!(f.attached("s"), "detached while a copy holds it");
    let err = f.driver.mount(&name("s"), &id("b"), None).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    let err = f.driver.remove(&name("s")).unwrap_err();
    assert!(matches!(err, DriverError::HeldElsewhere { .. }), "{err}");
    assert!(
        vol.upper().join("in-use").exists(),
        "held changes discarded"
    );

    f.sys().held.clear();
    f.driver.mount(&name("s"), &id("b"), None).unwrap();
    assert!(!vol.upper().join("in-use").exists(), "not discarded");
}

#[test]
fn a_busy_image_leaves_the_last_unmount_done() {
    let f = fixture();
    f.create_sized("s", true, "16Mi").unwrap();
    f.driver.mount(&name("s"), &id("a"), None).unwrap();
    // A process has a file open on the image's file system, not through the overlay.
    f.sys().busy.insert(f.vol("s").changes());
    f.unmount(&name("s"), &id("a")).unwrap();
    assert!(f.vol("s").read_records().unwrap().is_empty());
    assert!(
        !f.sys()
            .mounted
            .iter()
            .any(|m| m.target == f.vol("s").mountpoint())
    );
    assert!(f.attached("s"));
    f.sys().busy.clear();
    f.driver.mount(&name("s"), &id("b"), None).unwrap();
}

#[test]
fn sized_options_are_checked_and_a_repeat_with_another_size_conflicts() {
    let f = fixture();
    for (size, why) in [
        ("lots", "is not a size"),
        ("1Mi", "below the smallest ext4"),
        ("0", "is not a size"),
    ] {
        let err = f.create_sized("s", false, size).unwrap_err();
        assert!(crate::error_chain(&err).contains(why), "{size}: {err:?}");
    }
    assert!(
        f.driver.list().unwrap().is_empty(),
        "a refused Create left a volume"
    );
    f.create_sized("s", false, "16Mi").unwrap();
    f.create_sized("s", false, "16Mi").unwrap();
    let err = f.create_sized("s", false, "32Mi").unwrap_err();
    assert!(
        crate::error_chain(&err).contains("size 16777216 bytes"),
        "{err}"
    );
    let mut o = BTreeMap::new();
    o.insert("base".to_string(), f.base.to_str().unwrap().to_string());
    o.insert("fs".to_string(), "xfs".to_string());
    let err = f.driver.create(&name("t"), &o).unwrap_err();
    assert!(
        crate::error_chain(&err).contains("only goes with size"),
        "{err}"
    );
}
