//! The admin subcommands against real overlay mounts: the kernel makes the whiteouts and opaque
//! directories (a base file deleted through the mount, a base directory `rm -rf`'d and made
//! again), then every command is run as the binary and its output and effect checked.
//!
//! Each test runs in a private mount namespace of its own thread; the binary, started from that
//! thread, shares it. Everything needs root: a test that cannot do its privileged part fails.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use docker_on_top::driver::{Driver, DriverConfig};
use docker_on_top::names::{MountId, VolumeName};
use docker_on_top::sys::{OverlaySpec, RealSys, Sys, SysError};

const NEW_MTIME: i64 = 1_600_000_000;

// ----- Helpers ------------------------------------------------------------------------------

struct Env {
    tmp: tempfile::TempDir,
    root: PathBuf,
    driver: Driver<RealSys>,
}

fn env() -> Env {
    common::private_mount_namespace();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let driver = Driver::with_sys(&root, RealSys::default()).unwrap();
    let root = driver.root().path().to_owned();
    Env { tmp, root, driver }
}

fn name(s: &str) -> VolumeName {
    VolumeName::parse(s).unwrap()
}

fn id(s: &str) -> MountId {
    MountId::parse(s).unwrap()
}

impl Env {
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn create(&self, vol: &str, base: &Path, volatile: bool) {
        let mut o = BTreeMap::new();
        o.insert("base".to_string(), base.to_str().unwrap().to_string());
        o.insert("volatile".to_string(), volatile.to_string());
        self.driver.create(&name(vol), &o).unwrap();
    }

    fn mount(&self, vol: &str, mount_id: &str) -> PathBuf {
        self.driver.mount(&name(vol), &id(mount_id), None).unwrap()
    }

    /// The last Unmount of `vol` (every test here unmounts each mount ID once).
    fn unmount(&self, vol: &str, mount_id: &str) {
        let vol = name(vol);
        if let Err(e) = self.driver.unmount(&vol, &id(mount_id)) {
            panic!("unmounting {vol}: {e}");
        }
        let info = self.driver.get(&vol).unwrap();
        assert_eq!(info.active_mounts, 0, "not the last Unmount of {vol}");
        if let Some(mountpoint) = info.mountpoint {
            // Busy: the record is gone, only the overlay is left to unmount.
            unmount_retrying(&mountpoint);
        }
    }

    fn upper(&self, vol: &str) -> PathBuf {
        self.driver.root().volume(&name(vol)).upper()
    }

    fn run(&self, args: &[&OsStr]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_docker-on-top"))
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the binary; it must succeed. Its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the binary; it must fail with exit code 1 and one line on stderr, which is returned.
    fn fails(&self, args: &[&str]) -> String {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.run(&args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        err
    }

    /// Runs the binary; it must fail with exit status 3 (no such volume) and one line on
    /// stderr, which is returned.
    fn missing(&self, args: &[&str]) -> String {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.run(&args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        err
    }

    /// Whether the trash holds nothing but what a last Unmount leaves there for the daemon's
    /// janitor (overlayfs' `work/`, renamed): no discarded changes.
    fn trash_is_empty(&self) -> bool {
        std::fs::read_dir(self.driver.root().trash())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .all(|n| n.starts_with("work-"))
    }
}

/// Unmounts `target`, waiting while it is busy. Tests run in parallel threads of one process,
/// and a process another test starts holds copies of all our file descriptors between its fork
/// and its exec: for that moment, a file we had open in the mount keeps it busy.
fn unmount_retrying(target: &Path) {
    for _ in 0..200 {
        match RealSys::default().unmount(target) {
            Ok(_) => return,
            Err(SysError::Busy) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("unmounting {target:?}: {e}"),
        }
    }
    panic!("{target:?} stayed busy");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn set_mtime(path: &Path, secs: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn user_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {path:?} {name}: {e}"),
    }
}

/// Every xattr name of `path`.
fn xattr_names(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).unwrap();
    buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The base every scenario starts from; its root belongs to uid 1000, as do some entries.
fn make_base(base: &Path) {
    std::fs::create_dir_all(base).unwrap();
    for d in ["dir/sub", "olddir", "stable", "deep/nested"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    for (f, text) in [
        ("keep.txt", "keep"),
        ("gone.txt", "gone"),
        ("edit.txt", "old"),
        ("owned.txt", "owned"),
        ("dir/a.txt", "a"),
        ("dir/c.txt", "c"),
        ("dir/sub/b.txt", "b"),
        ("olddir/x", "x"),
        ("stable/inner.txt", "inner"),
        ("deep/nested/file.txt", "deep"),
    ] {
        write(&base.join(f), text);
    }
    chown(&base.join("owned.txt"), 1000);
    chmod(&base.join("owned.txt"), 0o600);
    chown(base, 1000);
    chmod(base, 0o750);
    // Old times everywhere, so that any directory the volume touched shows it.
    for d in [
        "dir/sub",
        "dir",
        "olddir",
        "stable",
        "deep/nested",
        "deep",
        "",
    ] {
        set_mtime(&base.join(d), 1_000_000_000);
    }
}

/// Makes every kind of change through the mounted overlay at `mp`; the kernel writes the
/// upper.
fn change_through(mp: &Path) {
    std::fs::remove_file(mp.join("gone.txt")).unwrap(); // whiteout
    write(&mp.join("edit.txt"), "new content");
    std::fs::OpenOptions::new()
        .append(true)
        .open(mp.join("owned.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b" and more"))
        .unwrap();
    // A replaced directory: opaque in the upper.
    std::fs::remove_dir_all(mp.join("dir")).unwrap();
    std::fs::create_dir(mp.join("dir")).unwrap();
    write(&mp.join("dir/a.txt"), "a again");
    std::fs::create_dir(mp.join("dir/sub")).unwrap();
    write(&mp.join("dir/sub/new.txt"), "new in sub");
    // A deleted directory: one whiteout.
    std::fs::remove_dir_all(mp.join("olddir")).unwrap();
    // Added entries with owner, mode, time and a user xattr.
    let new = mp.join("new.txt");
    write(&new, "brand new");
    chown(&new, 1000);
    chmod(&new, 0o640);
    rustix::fs::setxattr(&new, "user.note", b"hello", rustix::fs::XattrFlags::empty()).unwrap();
    set_mtime(&new, NEW_MTIME);
    std::fs::create_dir(mp.join("newdir")).unwrap();
    write(&mp.join("newdir/f"), "linked");
    std::fs::hard_link(mp.join("newdir/f"), mp.join("newdir/hard")).unwrap();
    std::os::unix::fs::symlink("keep.txt", mp.join("link")).unwrap();
    // A file changed deep down: its parents are only copied up, not changed.
    write(&mp.join("deep/nested/file.txt"), "deeper");
    // A file added to an existing directory: that directory changed.
    write(&mp.join("stable/new.txt"), "added");
}

const EXPECTED: &str = "\
C /deep/nested/file.txt
C /dir
C /dir/a.txt
D /dir/c.txt
C /dir/sub
D /dir/sub/b.txt
A /dir/sub/new.txt
C /edit.txt
D /gone.txt
A /link
A /new.txt
A /newdir
A /newdir/f
A /newdir/hard
D /olddir
C /owned.txt
C /stable
A /stable/new.txt
";

/// A description of every entry under `dir` (not `dir` itself): type, owner, mode, contents
/// or target, inode sharing, data xattrs and, `with_times`, the modification time.
fn snapshot(dir: &Path, with_times: bool) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_owned();
            let mut desc = format!("uid={} gid={}", m.uid(), m.gid());
            let ft = m.file_type();
            if ft.is_dir() {
                desc += &format!(" dir mode={:o}", m.mode() & 0o7777);
                stack.push(p.clone());
            } else if ft.is_symlink() {
                desc += &format!(" link -> {:?}", std::fs::read_link(&p).unwrap());
            } else if ft.is_file() {
                desc += &format!(
                    " file mode={:o} {:?}",
                    m.mode() & 0o7777,
                    std::fs::read_to_string(&p).unwrap()
                );
                if m.nlink() > 1 {
                    let first = inodes.entry(m.ino()).or_insert(rel.clone());
                    desc += &format!(" same inode as {first:?}");
                }
            } else {
                desc += &format!(" special {:?}", ft);
            }
            if !ft.is_symlink() {
                desc += &format!(" user.note={:?}", user_xattr(&p, "user.note"));
            }
            if with_times {
                desc += &format!(" mtime={}.{}", m.mtime(), m.mtime_nsec());
            }
            out.insert(rel, desc);
        }
    }
    out
}

/// Every entry under `dir` that is a character device (a whiteout copied by mistake).
fn char_devices(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.file_type().is_char_device() {
                found.push(p);
            }
        }
    }
    found
}

/// A volume `v` on a fresh base with every kind of change made through a real mount, then
/// unmounted. Returns the merged view as the containers saw it.
fn scenario(e: &Env) -> (PathBuf, BTreeMap<PathBuf, String>) {
    let base = e.path("base");
    make_base(&base);
    e.create("v", &base, false);
    let mp = e.mount("v", "c1");
    change_through(&mp);
    let merged = snapshot(&mp, true);
    e.unmount("v", "c1");
    (base, merged)
}

// ----- Tests --------------------------------------------------------------------------------

#[test]
fn kernel_made_upper_is_what_the_tests_assume() {
    let e = env();
    let (_, _) = scenario(&e);
    let upper = e.upper("v");
    let gone = std::fs::symlink_metadata(upper.join("gone.txt")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "no whiteout"
    );
    assert!(
        xattr_names(&upper.join("dir")).contains(&"trusted.overlay.opaque".to_string()),
        "dir is not opaque"
    );
    assert!(
        !xattr_names(&upper.join("dir/sub")).contains(&"trusted.overlay.opaque".to_string()),
        "the kernel marked a directory inside an opaque one"
    );
    let olddir = std::fs::symlink_metadata(upper.join("olddir")).unwrap();
    assert!(olddir.file_type().is_char_device(), "olddir not a whiteout");
}

#[test]
fn changes_lists_what_differs_in_docker_diff_format() {
    let e = env();
    let (base, _) = scenario(&e);
    assert_eq!(e.ok(&["changes", "v"]), EXPECTED);

    let json: serde_json::Value = serde_json::from_str(&e.ok(&["changes", "v", "--json"])).unwrap();
    let lines: Vec<String> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["Kind"].as_str().unwrap(),
                c["Path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(lines.join("\n") + "\n", EXPECTED);

    // Readable while mounted too, and unchanged by a mount.
    e.mount("v", "c2");
    assert_eq!(e.ok(&["changes", "v"]), EXPECTED);
    e.unmount("v", "c2");

    // No changes: no output.
    let base2 = e.path("base2");
    make_base(&base2);
    e.create("empty", &base2, false);
    let mp = e.mount("empty", "c1");
    let _ = std::fs::read_to_string(mp.join("keep.txt")).unwrap();
    e.unmount("empty", "c1");
    assert_eq!(e.ok(&["changes", "empty"]), "");
    assert_eq!(e.ok(&["changes", "empty", "--json"]).trim(), "[]");
    assert!(base.join("gone.txt").exists(), "changes modified the base");
}

#[test]
fn ls_and_inspect_report_volumes() {
    let e = env();
    let (base, _) = scenario(&e);
    let base2 = e.path("base2");
    make_base(&base2);
    e.create("t-volatile", &base2, true);

    let table = e.ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(lines[1].starts_with("t-volatile "), "{table}");
    assert!(lines[1].contains(" yes "), "{table}");
    assert!(lines[2].starts_with("v "), "{table}");
    assert!(lines[2].contains(base.to_str().unwrap()), "{table}");

    let ls: serde_json::Value = serde_json::from_str(&e.ok(&["ls", "--json"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t-volatile", "v"]);

    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "v"])).unwrap();
    assert_eq!(v["Name"], "v");
    assert_eq!(v["Base"], base.to_str().unwrap());
    assert_eq!(v["Volatile"], false);
    assert_eq!(v["Mounted"], false);
    assert_eq!(v["Mountpoint"], serde_json::Value::Null);
    assert_eq!(v["ActiveMounts"], 0);
    assert_eq!(v["MountIDs"], serde_json::json!({}));
    assert_eq!(v["UpperDir"], e.upper("v").to_str().unwrap());
    assert!(v["CreatedAt"].as_str().unwrap().ends_with('Z'), "{v}");
    // Files in the upper, whiteouts not counted: edit, owned, dir/a, dir/sub/new, new.txt,
    // newdir/f, newdir/hard, link, deep/nested/file, stable/new.
    assert_eq!(v["ChangesSize"]["Files"], 10, "{v}");
    assert!(v["ChangesSize"]["Bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v.get("Error").is_none(), "{v}");

    let mp = e.mount("v", "c1");
    e.mount("v", "c1");
    e.mount("v", "c2");
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "v"])).unwrap();
    assert_eq!(v["Mounted"], true);
    assert_eq!(v["Mountpoint"], mp.to_str().unwrap());
    assert_eq!(v["ActiveMounts"], 3);
    assert_eq!(v["MountIDs"], serde_json::json!({"c1": 2, "c2": 1}));
    let table = e.ok(&["ls"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("v ") && l.contains(" yes ")),
        "{table}"
    );

    let err = e.missing(&["inspect", "nope"]);
    assert!(err.contains("volume nope does not exist"), "{err}");
    let err = e.fails(&["inspect", "../etc"]);
    assert!(err.contains("invalid volume name"), "{err}");
}

/// A managed plugin (`serve --mount-dir DIR`) mounts its volumes at `DIR/NAME`, which the
/// commands, run without that option, find in their mount namespace.
#[test]
fn ls_and_inspect_find_the_mounts_of_a_managed_plugin() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("v", &base, false);
    e.create("w", &base, false);
    let dir = e.path("propagated-mount");
    let plugin = Driver::open(DriverConfig {
        root: e.root.clone(),
        legacy_mount_api: false,
        allowed_bases: Default::default(),
        host_root: Default::default(),
        mount_dir: Some(dir.clone()),
    })
    .unwrap();
    let table = e.ok(&["ls"]);
    assert!(
        table.lines().all(|l| !l.contains(" yes ")),
        "mounted before any Mount: {table}"
    );
    let mp = plugin.mount(&name("v"), &id("c1"), None).unwrap();
    assert_eq!(mp, dir.join("v"));
    assert!(!e.root.join("v/mountpoint").join("keep.txt").exists());

    let table = e.ok(&["ls"]);
    let row = |vol: &str| {
        (table.lines())
            .find(|l| l.starts_with(&format!("{vol} ")))
            .unwrap_or_else(|| panic!("no {vol}: {table}"))
            .to_owned()
    };
    assert!(row("v").contains(" yes "), "{table}");
    assert!(row("w").contains(" no "), "{table}");
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "v"])).unwrap();
    assert_eq!(v["Mounted"], true, "{v}");
    assert_eq!(v["Mountpoint"], mp.to_str().unwrap());
    assert_eq!(v["ActiveMounts"], 1);
    assert_eq!(v["MountIDs"], serde_json::json!({"c1": 1}));
    assert_eq!(v["UpperDir"], e.upper("v").to_str().unwrap());
    let w: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "w"])).unwrap();
    assert_eq!(w["Mounted"], false, "{w}");
    // Mounted there is mounted: what needs the volume unmounted is refused.
    let err = e.fails(&["reset", "v"]);
    assert!(err.contains("volume v is in use"), "{err}");
    assert!(err.contains(mp.to_str().unwrap()), "{err}");

    plugin.unmount(&name("v"), &id("c1")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "v"])).unwrap();
    assert_eq!(v["Mounted"], false, "{v}");
}

#[test]
fn recover_copies_added_and_changed_entries_with_their_attributes() {
    let e = env();
    let (base, merged) = scenario(&e);
    let dest = e.path("recovered");
    let out = e.ok(&["recover", "v", dest.to_str().unwrap()]);
    let summary = format!(
        "into {}; 4 deleted path(s) not recoverable (-v lists them)\n",
        dest.display()
    );
    assert!(
        out.starts_with("volume v: recovered ")
            && out.ends_with(&summary)
            && out.lines().count() == 1,
        "{out}"
    );
    // -v: a line per entry made, and the deleted paths, then the summary.
    let dest_v = e.path("recovered-v");
    let out = e.ok(&["recover", "v", dest_v.to_str().unwrap(), "-v"]);
    let lines: Vec<&str> = out.lines().collect();
    let copied: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("copied "))
        .collect();
    let deleted: Vec<&str> = (lines.iter())
        .filter_map(|l| l.strip_prefix("not copied, deleted in the volume: "))
        .collect();
    assert_eq!(
        deleted,
        ["/dir/c.txt", "/dir/sub/b.txt", "/gone.txt", "/olddir"],
        "{out}"
    );
    assert_eq!(copied.len() + deleted.len() + 1, lines.len(), "{out}");
    assert!(
        (lines.last().unwrap())
            .starts_with(&format!("volume v: recovered {} entries ", copied.len())),
        "{out}"
    );
    for path in &copied {
        let at = dest_v.join(path.trim_start_matches('/'));
        assert!(at.symlink_metadata().is_ok(), "{path} listed, not made");
    }
    assert!(
        copied.contains(&"/new.txt") && copied.contains(&"/deep/nested/file.txt"),
        "{out}"
    );

    // Exactly the added and changed entries and the directories leading to them.
    let got = snapshot(&dest, true);
    let changed: Vec<PathBuf> = EXPECTED
        .lines()
        .filter(|l| !l.starts_with("D "))
        .map(|l| PathBuf::from(&l[3..]))
        .collect();
    let want: BTreeMap<PathBuf, String> = merged
        .iter()
        .filter(|(p, _)| changed.iter().any(|c| c.starts_with(p)))
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect();
    assert_eq!(got, want);
    assert!(!dest.join("keep.txt").exists());
    assert!(!dest.join("gone.txt").exists());
    assert!(char_devices(&dest).is_empty(), "whiteouts copied");

    let new = std::fs::metadata(dest.join("new.txt")).unwrap();
    assert_eq!(
        (new.uid(), new.gid(), new.mode() & 0o7777),
        (1000, 1000, 0o640)
    );
    assert_eq!(new.mtime(), NEW_MTIME);
    assert_eq!(
        user_xattr(&dest.join("new.txt"), "user.note").unwrap(),
        b"hello"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("owned.txt")).unwrap(),
        "owned and more"
    );
    assert_eq!(
        std::fs::metadata(dest.join("owned.txt")).unwrap().uid(),
        1000
    );
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("keep.txt")
    );
    assert_eq!(
        std::fs::metadata(dest.join("newdir/f")).unwrap().ino(),
        std::fs::metadata(dest.join("newdir/hard")).unwrap().ino(),
        "hard link not kept"
    );
    for d in ["", "dir", "dir/sub", "deep"] {
        let names = xattr_names(&dest.join(d));
        assert!(
            names.iter().all(|n| !n.starts_with("trusted.overlay.")),
            "{d}: {names:?}"
        );
    }
    // A directory made by recover looks like the volume's root.
    let root = std::fs::metadata(&dest).unwrap();
    assert_eq!((root.uid(), root.mode() & 0o7777), (1000, 0o750));

    // DEST must be new or empty, and outside the state directory and the base.
    let err = e.fails(&["recover", "v", dest.to_str().unwrap()]);
    assert!(err.contains("not an empty directory"), "{err}");
    let err = e.fails(&["recover", "v", base.join("x").to_str().unwrap()]);
    assert!(err.contains("lies inside"), "{err}");
    assert!(!base.join("x").exists());
    let err = e.fails(&["recover", "v", e.root.join("x").to_str().unwrap()]);
    assert!(err.contains("lies inside"), "{err}");
    let empty = e.path("empty");
    std::fs::create_dir(&empty).unwrap();
    e.ok(&["recover", "v", empty.to_str().unwrap()]);
    assert_eq!(snapshot(&empty, true), got);
}

/// Applies an OCI layer the way container engines do: whiteouts delete, an opaque marker
/// empties its directory, everything else is unpacked over what is there.
fn apply_layer(tar_path: &Path, target: &Path) {
    let mut ar = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_overwrite(true);
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let file = path.file_name().unwrap().as_bytes().to_vec();
        let at = target.join(&path);
        if file == b".wh..wh..opq" {
            for child in std::fs::read_dir(at.parent().unwrap()).unwrap() {
                let child = child.unwrap().path();
                if child.is_dir() && !child.is_symlink() {
                    std::fs::remove_dir_all(child).unwrap();
                } else {
                    std::fs::remove_file(child).unwrap();
                }
            }
            continue;
        }
        if let Some(victim) = file.strip_prefix(b".wh.") {
            let victim = at.with_file_name(OsStr::from_bytes(victim));
            let m = std::fs::symlink_metadata(&victim).unwrap();
            if m.is_dir() {
                std::fs::remove_dir_all(victim).unwrap();
            } else {
                std::fs::remove_file(victim).unwrap();
            }
            continue;
        }
        if let Ok(m) = std::fs::symlink_metadata(&at)
            && !(m.is_dir() && entry.header().entry_type().is_dir())
        {
            if m.is_dir() {
                std::fs::remove_dir_all(&at).unwrap();
            } else {
                std::fs::remove_file(&at).unwrap();
            }
        }
        let xattrs: Vec<(String, Vec<u8>)> = entry
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.map(|x| x.unwrap())
                    .filter_map(|x| {
                        let key = x.key().unwrap().strip_prefix("SCHILY.xattr.")?;
                        Some((key.to_owned(), x.value_bytes().to_vec()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(entry.unpack_in(target).unwrap(), "{path:?} escaped");
        for (name, value) in xattrs {
            rustix::fs::lsetxattr(&at, name.as_str(), &value, rustix::fs::XattrFlags::empty())
                .unwrap();
        }
    }
}

#[test]
fn export_writes_an_oci_layer() {
    let e = env();
    let (base, merged) = scenario(&e);
    let layer = e.path("layer.tar");
    assert_eq!(e.ok(&["export", "v", "-o", layer.to_str().unwrap()]), "");

    let mut ar = tar::Archive::new(std::fs::File::open(&layer).unwrap());
    let mut entries = BTreeMap::new();
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let h = entry.header().clone();
        let pax: Vec<(String, Vec<u8>)> = entry
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.map(|x| {
                    let x = x.unwrap();
                    (x.key().unwrap().to_owned(), x.value_bytes().to_vec())
                })
                .collect()
            })
            .unwrap_or_default();
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        entries.insert(path, (h, pax, link));
    }
    let names: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            ".wh.gone.txt",
            ".wh.olddir",
            "deep/",
            "deep/nested/",
            "deep/nested/file.txt",
            "dir/",
            "dir/.wh..wh..opq",
            "dir/a.txt",
            "dir/sub/",
            "dir/sub/new.txt",
            "edit.txt",
            "link",
            "new.txt",
            "newdir/",
            "newdir/f",
            "newdir/hard",
            "owned.txt",
            "stable/",
            "stable/new.txt",
        ]
    );
    let (new, pax, _) = &entries["new.txt"];
    assert_eq!(new.uid().unwrap(), 1000);
    assert_eq!(new.gid().unwrap(), 1000);
    assert_eq!(new.mode().unwrap(), 0o640);
    assert_eq!(new.mtime().unwrap(), NEW_MTIME as u64);
    assert_eq!(
        pax,
        &vec![("SCHILY.xattr.user.note".to_string(), b"hello".to_vec())]
    );
    let (hard, _, link) = &entries["newdir/hard"];
    assert_eq!(hard.entry_type(), tar::EntryType::Link);
    assert_eq!(link.as_deref(), Some("newdir/f"));
    let (sym, _, link) = &entries["link"];
    assert_eq!(sym.entry_type(), tar::EntryType::Symlink);
    assert_eq!(link.as_deref(), Some("keep.txt"));
    assert!(
        entries
            .values()
            .all(|(_, pax, _)| pax.iter().all(|(k, _)| !k.contains("overlay"))),
        "overlay's xattrs exported"
    );

    // GNU tar reads it.
    let gnu = Command::new("tar")
        .arg("-tvf")
        .arg(&layer)
        .output()
        .expect("GNU tar is needed by this test");
    assert!(
        gnu.status.success(),
        "{}",
        String::from_utf8_lossy(&gnu.stderr)
    );
    let listing = String::from_utf8(gnu.stdout).unwrap();
    assert!(listing.contains("dir/.wh..wh..opq"), "{listing}");
    assert!(
        listing.contains("newdir/hard link to newdir/f"),
        "{listing}"
    );

    // Applied to a copy of the base like an image layer, it gives what the containers saw.
    let copy = e.path("applied");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    apply_layer(&layer, &copy);
    assert_eq!(snapshot(&copy, false), strip_times(&merged));

    // To stdout by default, the same bytes.
    let stdout = e.run(&[OsStr::new("export"), OsStr::new("v")]);
    assert!(stdout.status.success());
    assert_eq!(stdout.stdout, std::fs::read(&layer).unwrap());
}

/// Names a container may give its files that a layer reads as whiteouts are left out, said
/// on stderr; the layer stays what applying it must give.
#[test]
fn export_leaves_out_names_that_a_layer_would_read_as_whiteouts() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("w", &base, false);
    let mp = e.mount("w", "c1");
    write(&mp.join(".wh.keep.txt"), "data");
    std::fs::create_dir(mp.join("sub2")).unwrap();
    write(&mp.join("sub2/.wh..wh..opq"), "d");
    write(&mp.join("sub2/kept.txt"), "kept");
    std::fs::create_dir(mp.join(".wh.dir")).unwrap();
    write(&mp.join(".wh.dir/inner.txt"), "inner");
    e.unmount("w", "c1");

    let layer = e.path("w.tar");
    let out = e.run(&[
        OsStr::new("export"),
        OsStr::new("w"),
        OsStr::new("-o"),
        layer.as_os_str(),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    for skipped in ["/.wh.keep.txt", "/sub2/.wh..wh..opq", "/.wh.dir"] {
        assert!(
            err.lines()
                .any(|l| l.contains(skipped) && l.contains("whiteout")),
            "{skipped} not said: {err}"
        );
    }
    assert!(
        !err.contains("inner.txt"),
        "said below a skipped directory: {err}"
    );
    let mut ar = tar::Archive::new(std::fs::File::open(&layer).unwrap());
    let names: Vec<String> = (ar.entries().unwrap())
        .map(|entry| {
            entry
                .unwrap()
                .path()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["sub2/", "sub2/kept.txt"]);
}

/// `-o FILE` is opened only once the volume is found, and a FILE that was there is never
/// removed: a mistyped name must not cost an existing file, or `/dev/null`.
#[test]
fn export_never_removes_a_file_that_was_there() {
    let e = env();
    scenario(&e);
    let kept = e.path("important");
    write(&kept, "important");
    let null = e.path("null");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &null,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    for file in [&kept, &null] {
        let err = e.missing(&["export", "ghost", "-o", file.to_str().unwrap()]);
        assert!(err.contains("ghost"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "important");
    assert!(
        std::fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device()
    );

    assert_eq!(e.ok(&["export", "v", "-o", null.to_str().unwrap()]), "");
    assert!(
        std::fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(e.ok(&["export", "v", "-o", kept.to_str().unwrap()]), "");
    let stdout = e.run(&[OsStr::new("export"), OsStr::new("v")]);
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        stdout.stdout,
        "not replaced by the layer"
    );
}

/// A container names its files as it likes: `changes --json` shows a name that is not UTF-8
/// with U+FFFD, as a whole document.
#[test]
fn changes_as_json_shows_names_that_are_not_utf8() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("n", &base, false);
    let mp = e.mount("n", "c1");
    write(&mp.join(OsStr::from_bytes(b"bad\xffbyte")), "x");
    e.unmount("n", "c1");
    let json: serde_json::Value = serde_json::from_str(&e.ok(&["changes", "n", "--json"])).unwrap();
    assert!(json.to_string().contains("/bad\u{fffd}byte"), "{json}");
    let text = e.run(&[OsStr::new("changes"), OsStr::new("n")]).stdout;
    assert!(
        text.windows(8).any(|w| w == b"bad\xffbyte"),
        "text output not as it is"
    );
}

fn strip_times(snap: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
    snap.iter()
        .map(|(p, d)| (p.clone(), d.split(" mtime=").next().unwrap().to_string()))
        .collect()
}

#[test]
fn commit_writes_the_changes_into_the_base_and_resets() {
    let e = env();
    let (base, merged) = scenario(&e);
    let before = snapshot(&base, true);

    // Refused while mounted, with what to do; the dry run shows and changes nothing.
    e.mount("v", "c1");
    let err = e.fails(&["commit", "v", "--yes"]);
    assert!(err.contains("volume v is in use"), "{err}");
    assert!(err.contains("docker ps --filter volume=v"), "{err}");
    let dry = e.run(&[OsStr::new("commit"), OsStr::new("v")]);
    assert!(dry.status.success());
    assert_eq!(String::from_utf8(dry.stdout).unwrap(), EXPECTED);
    assert!(String::from_utf8(dry.stderr).unwrap().contains("--yes"));
    assert_eq!(snapshot(&base, true), before, "base changed");
    e.unmount("v", "c1");

    let summary = format!(
        "volume v: 18 change(s) applied to {} (14 written, 4 deleted, 0 skipped); the volume now has no changes\n",
        std::fs::canonicalize(&base).unwrap().display()
    );
    assert_eq!(
        e.ok(&["commit", "v", "--yes", "-v"]),
        format!("{EXPECTED}{summary}")
    );
    // The base is now what the containers saw, times included.
    assert_eq!(snapshot(&base, true), merged);
    let root = std::fs::metadata(&base).unwrap();
    assert_eq!((root.uid(), root.mode() & 0o7777), (1000, 0o750));
    assert_eq!(
        std::fs::metadata(base.join("owned.txt")).unwrap().uid(),
        1000
    );
    assert!(char_devices(&base).is_empty());
    assert!(
        xattr_names(&base.join("dir"))
            .iter()
            .all(|n| !n.starts_with("trusted.overlay.")),
        "opaque marker committed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes().starts_with(b".docker-on-top"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // And the volume was reset: no changes, a fresh upper like the base, the old one deleted.
    assert_eq!(e.ok(&["changes", "v"]), "");
    let upper = std::fs::metadata(e.upper("v")).unwrap();
    assert_eq!((upper.uid(), upper.mode() & 0o7777), (1000, 0o750));
    assert!(e.trash_is_empty());
    let mp = e.mount("v", "c2");
    assert_eq!(snapshot(&mp, true), merged);
    e.unmount("v", "c2");
}

/// `commit` writes into the base: never through a symlink swapped in for it after Create
/// (issue 15), with or without `--allowed-base`.
#[test]
fn commit_is_refused_through_a_symlink_swapped_in_for_the_base() {
    let e = env();
    let (base, _) = scenario(&e);
    let outside = e.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let away = e.path("base-away");
    std::fs::rename(&base, &away).unwrap();
    std::os::unix::fs::symlink(&outside, &base).unwrap();
    let err = e.fails(&["commit", "v", "--yes"]);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside"
    );
    std::fs::remove_file(&base).unwrap();
    std::fs::rename(&away, &base).unwrap();
    e.ok(&["commit", "v", "--yes"]);
    assert!(!base.join("gone.txt").exists());
}

#[test]
fn commit_is_refused_while_another_volume_on_the_base_is_mounted() {
    let e = env();
    let (base, _) = scenario(&e);
    e.create("w", &base.join("stable"), false);
    e.mount("w", "c1");
    let err = e.fails(&["commit", "v", "--yes"]);
    assert!(
        err.contains("volume w has the same or an overlapping base"),
        "{err}"
    );
    assert!(err.contains("volume w is in use"), "{err}");
    assert!(base.join("gone.txt").exists(), "base changed");
    e.unmount("w", "c1");
    e.ok(&["commit", "v", "--yes"]);
    assert!(!base.join("gone.txt").exists());
}

#[test]
fn reset_discards_the_changes_of_an_unmounted_volume_only() {
    let e = env();
    let (base, _) = scenario(&e);
    let before = snapshot(&base, true);
    e.mount("v", "c1");
    let err = e.fails(&["reset", "v"]);
    assert!(
        err.starts_with("docker-on-top: volume v is in use"),
        "{err}"
    );
    assert_eq!(e.ok(&["changes", "v"]), EXPECTED);
    e.unmount("v", "c1");

    assert_eq!(e.ok(&["reset", "v"]), "volume v: changes discarded\n");
    // -v: what was done to the upper directory, a line each, then the summary.
    let upper = e.upper("v");
    let out = e.ok(&["reset", "v", "-v"]);
    let lines: Vec<&str> = out.lines().collect();
    let trashed = lines[0]
        .strip_prefix(&format!("moved {} to ", upper.display()))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        lines[1..],
        [
            format!("made anew, empty: {}", upper.display()),
            format!("deleted {trashed}"),
            "volume v: changes discarded".to_owned()
        ],
        "the steps in the order they were done"
    );
    assert_eq!(e.ok(&["changes", "v"]), "");
    assert_eq!(std::fs::read_dir(e.upper("v")).unwrap().count(), 0);
    let upper = std::fs::metadata(e.upper("v")).unwrap();
    assert_eq!((upper.uid(), upper.mode() & 0o7777), (1000, 0o750));
    assert!(e.trash_is_empty(), "discarded upper left in the trash");
    assert_eq!(snapshot(&base, true), before, "reset changed the base");
    let mp = e.mount("v", "c2");
    assert_eq!(
        std::fs::read_to_string(mp.join("gone.txt")).unwrap(),
        "gone"
    );
    e.unmount("v", "c2");

    let err = e.missing(&["reset", "nope"]);
    assert!(err.contains("volume nope does not exist"), "{err}");
}

#[test]
fn volatile_changes_are_recoverable_until_the_next_mount() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("scratch", &base, true);
    let mp = e.mount("scratch", "job1");
    std::fs::remove_file(mp.join("gone.txt")).unwrap();
    write(&mp.join("result.txt"), "precious");
    e.unmount("scratch", "job1");

    assert_eq!(
        e.ok(&["changes", "scratch"]),
        "D /gone.txt\nA /result.txt\n"
    );
    let dest = e.path("saved");
    assert_eq!(
        e.ok(&["recover", "scratch", dest.to_str().unwrap(), "--verbose"]),
        format!(
            "copied /result.txt\nnot copied, deleted in the volume: /gone.txt\nvolume scratch: recovered 1 entries (8 B) into {}; 1 deleted path(s) not recoverable\n",
            dest.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("result.txt")).unwrap(),
        "precious"
    );
    // The next mount discards them.
    e.mount("scratch", "job2");
    assert_eq!(e.ok(&["changes", "scratch"]), "");
    e.unmount("scratch", "job2");
}

/// A volume laid out by the Go version: metadata without `CreatedAt`, a base given through a
/// symlink, records without `BootId`; mounted here only by hand, as the Go daemon did.
#[test]
fn go_volumes_are_read_and_reset() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    let link = e.path("base-link");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let vol = e.root.join("legacy");
    for d in ["upper", "workdir", "mountpoint", "activemounts"] {
        std::fs::create_dir_all(vol.join(d)).unwrap();
    }
    write(
        &vol.join("metadata.json"),
        &format!(r#"{{"BaseDirPath":"{}","Volatile":false}}"#, link.display()),
    );
    let spec = OverlaySpec {
        source: "docker-on-top-go".into(),
        lower: link.clone(),
        upper: vol.join("upper"),
        work: vol.join("workdir"),
        target: vol.join("mountpoint"),
    };
    let sys = RealSys::default();
    sys.mount_overlay(&spec).unwrap();
    std::fs::remove_file(spec.target.join("gone.txt")).unwrap();
    std::fs::remove_dir_all(spec.target.join("olddir")).unwrap();
    write(&spec.target.join("edit.txt"), "go edit");
    write(&vol.join("activemounts/abc123"), r#"{"UsageCount":1}"#);

    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "legacy"])).unwrap();
    assert_eq!(v["Mounted"], true);
    assert_eq!(v["ActiveMounts"], 1);
    assert_eq!(v["MountIDs"], serde_json::json!({"abc123": 1}));
    assert!(!v["CreatedAt"].as_str().unwrap().is_empty());
    let err = e.fails(&["reset", "legacy"]);
    assert!(err.contains("volume legacy is in use"), "{err}");

    unmount_retrying(&spec.target);
    // The Go daemon died: its record stays, void now.
    assert_eq!(
        e.ok(&["changes", "legacy"]),
        "C /edit.txt\nD /gone.txt\nD /olddir\n"
    );
    let layer = e.path("legacy.tar");
    e.ok(&["export", "legacy", "-o", layer.to_str().unwrap()]);
    let listing = Command::new("tar").arg("-tf").arg(&layer).output().unwrap();
    assert_eq!(
        String::from_utf8(listing.stdout).unwrap(),
        "edit.txt\n.wh.gone.txt\n.wh.olddir\n"
    );
    e.ok(&["reset", "legacy"]);
    assert_eq!(e.ok(&["changes", "legacy"]), "");
    assert_eq!(
        std::fs::read_dir(vol.join("activemounts")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_to_string(base.join("edit.txt")).unwrap(),
        "old"
    );
}

#[test]
fn errors_are_one_line_and_name_what_to_do() {
    let e = env();
    let missing = e.path("no-such-root");
    let out = Command::new(env!("CARGO_BIN_EXE_docker-on-top"))
        .arg("--root")
        .arg(&missing)
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("does not exist; pass --root"), "{err}");
    assert!(!missing.exists(), "ls created the state directory");

    assert_eq!(
        e.ok(&["ls"]),
        "NAME  VOLATILE  MOUNTED  MOUNTS  CHANGES  BASE\n"
    );
    assert_eq!(e.ok(&["ls", "--json"]).trim(), "[]");
    for cmd in ["changes", "reset", "export", "inspect"] {
        let err = e.missing(&[cmd, "ghost"]);
        assert!(err.contains("volume ghost does not exist"), "{cmd}: {err}");
    }
    let err = e.missing(&["commit", "ghost", "--yes"]);
    assert!(err.contains("volume ghost does not exist"), "{err}");
    let err = e.missing(&["recover", "ghost", e.path("r").to_str().unwrap()]);
    assert!(err.contains("volume ghost does not exist"), "{err}");
    let err = e.missing(&["export", "ghost", "-o", e.path("x.tar").to_str().unwrap()]);
    assert!(err.contains("ghost"), "{err}");
    assert!(!e.path("x.tar").exists(), "failed export left its file");
}

#[test]
fn commands_wait_for_the_volume_lock() {
    let e = env();
    let (_, _) = scenario(&e);
    // What the daemon holds during a Mount or Unmount.
    let held = e.driver.lock_volume(&name("v")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_docker-on-top"))
        .arg("--root")
        .arg(&e.root)
        .args(["changes", "v"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "changes did not wait for the lock"
    );
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), EXPECTED);
}

#[test]
fn a_volume_with_damaged_metadata_is_listed_with_its_error() {
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("good", &base, false);
    e.create("broken", &base, false);
    write(&e.root.join("broken/metadata.json"), "{oops");
    let table = e.ok(&["ls"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("broken ") && l.contains("error: cannot read metadata.json")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("good ")), "{table}");
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "broken"])).unwrap();
    assert!(
        v["Error"].as_str().unwrap().contains("metadata.json"),
        "{v}"
    );
    let err = e.fails(&["changes", "broken"]);
    assert!(
        err.contains("reading metadata.json failed for volume broken"),
        "{err}"
    );
}

/// Every admin command on a sized volume (`-o size=`), with its image attached and detached
/// (as after a reboot): a command that needs the changes attaches it.
#[test]
fn admin_commands_work_on_a_sized_volume_attached_or_not() {
    let e = env();
    let base = e.path("base");
    std::fs::create_dir(&base).unwrap();
    write(&base.join("keep.txt"), "keep");
    write(&base.join("gone.txt"), "gone");
    let mut o = BTreeMap::new();
    o.insert("base".to_string(), base.to_str().unwrap().to_string());
    o.insert("size".to_string(), "16Mi".to_string());
    e.driver.create(&name("s"), &o).unwrap();
    let vol = e.driver.root().volume(&name("s"));
    let mp = e.mount("s", "a");
    write(&mp.join("new.txt"), "new");
    std::fs::remove_file(mp.join("gone.txt")).unwrap();
    e.unmount("s", "a");
    let detach = || {
        if RealSys::default().is_mount_root(&vol.changes()).unwrap() {
            RealSys::default().unmount(&vol.changes()).unwrap();
        }
    };
    for attached in [true, false] {
        if !attached {
            detach();
        }
        let changes = e.ok(&["changes", "s"]);
        assert!(
            changes.contains("A /new.txt") && changes.contains("D /gone.txt"),
            "attached {attached}: {changes}"
        );
        let inspect: serde_json::Value = serde_json::from_str(&e.ok(&["inspect", "s"])).unwrap();
        assert_eq!(inspect["Size"]["Cap"], 16u64 << 20, "{inspect}");
        assert_eq!(inspect["Size"]["Fs"], "ext4", "{inspect}");
        assert!(inspect["Size"]["Used"].as_u64().is_some(), "{inspect}");
        let ls = e.ok(&["ls"]);
        assert!(ls.contains("(cap 16.0 MiB ext4, "), "{ls}");
        let dest = e.path(&format!("recovered-{attached}"));
        e.ok(&["recover", "s", dest.to_str().unwrap()]);
        assert_eq!(
            std::fs::read_to_string(dest.join("new.txt")).unwrap(),
            "new"
        );
        let tar = e.path(&format!("layer-{attached}.tar"));
        e.ok(&["export", "s", "-o", tar.to_str().unwrap()]);
        assert!(std::fs::metadata(&tar).unwrap().len() > 0);
    }
    detach();
    e.ok(&["commit", "s", "--yes"]);
    assert_eq!(
        std::fs::read_to_string(base.join("new.txt")).unwrap(),
        "new"
    );
    assert!(!base.join("gone.txt").exists());
    assert_eq!(e.ok(&["changes", "s"]), "");

    let mp = e.mount("s", "b");
    write(&mp.join("scratch.txt"), "x");
    e.unmount("s", "b");
    detach();
    // -v names the image: it goes, with the changes in it, and a fresh one takes its place.
    let out = e.ok(&["reset", "s", "-v"]);
    let image = vol.image();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("moved {} to ", image.display())),
        "{out}"
    );
    assert_eq!(
        lines[1],
        format!("made a fresh image at {}", image.display())
    );
    assert!(lines[2].starts_with("deleted "), "{out}");
    assert_eq!(e.ok(&["changes", "s"]), "");
    assert!(e.trash_is_empty());
    e.driver.remove(&name("s")).unwrap();
    assert!(!vol.path.exists());
}

/// The command line's conventions (issue 15): the daemon's options belong to `serve` (and to
/// no command at all), `--root` to every command, usage errors exit with 2, `--version` works
/// and `inspect` takes `--json`.
#[test]
fn usage_errors_exit_2_and_serve_options_belong_to_serve() {
    let e = env();
    let (_, _) = scenario(&e);
    let bin = || Command::new(env!("CARGO_BIN_EXE_docker-on-top"));
    for args in [
        &["ls", "--socket", "/x"][..],
        &["--socket", "/x", "ls"],
        &["--idle-timeout", "5s", "reset", "v"],
        &["changes", "v", "--allowed-base", "/"],
        &["no-such-command"],
        &["inspect"],
        &["serve", "--idle-timeout", "0s"],
        &["serve", "--idle-timeout", "584000000000years"],
        &["serve", "--read-timeout", "584000000000years"],
    ] {
        // Never the default state directory or socket, should one of them parse after all.
        let out = bin()
            .arg("--root")
            .arg(e.path("never"))
            .args(args)
            .arg("--socket")
            .arg(e.path("never.sock"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A serve option before a command is named as it is spelt.
    let out = bin()
        .args(["--allowed-base", "/", "--root"])
        .arg(e.path("never"))
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "--allowed-base goes after `serve` (`docker-on-top serve --allowed-base ...`)"
        ),
        "{err}"
    );
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("docker-on-top {}\n", env!("CARGO_PKG_VERSION"))
    );
    let help = |args: &[&str]| {
        let out = bin().args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let serve = help(&["serve"]);
    for opt in [
        "--socket",
        "--idle-timeout",
        "--allowed-base",
        "--legacy-mount-api",
        "--root",
    ] {
        assert!(serve.contains(opt), "serve --help lacks {opt}: {serve}");
    }
    assert!(serve.contains("3  no such volume"), "{serve}");
    for cmd in [
        "ls", "inspect", "changes", "recover", "export", "reset", "commit",
    ] {
        let text = help(&[cmd]);
        assert!(text.contains("--root"), "{cmd} --help lacks --root: {text}");
        assert!(
            !text.contains("--socket"),
            "{cmd} --help shows --socket: {text}"
        );
    }
    let top = help(&[]);
    assert!(!top.contains("--socket") && top.contains("serve"), "{top}");
    // The same JSON with or without --json; --root after the command too.
    let root = e.root.to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = bin().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        json(&["--root", root, "inspect", "v"]),
        json(&["inspect", "v", "--json", "--root", root])
    );
}

// ----- Trees deeper than PATH_MAX -------------------------------------------------------------

/// Levels of `dd/`: 9000 bytes of path, more than the 4096 of PATH_MAX that any call given a
/// whole path allows, so the tree is made and checked one directory at a time.
const DEPTH: usize = 3000;

/// `dd/` `DEPTH` times, without the last `/`.
fn deep_rel() -> String {
    vec!["dd"; DEPTH].join("/")
}

/// Opens `top`, then `DEPTH` levels of `dd` below it, each by its name in the one above
/// (`make`: creating each first). The deepest, open.
fn descend(top: &Path, make: bool) -> rustix::fd::OwnedFd {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(top, flags, Mode::empty()).unwrap();
    for _ in 0..DEPTH {
        if make {
            rustix::fs::mkdirat(&dir, "dd", Mode::from_raw_mode(0o755)).unwrap();
        }
        dir = rustix::fs::openat(&dir, "dd", flags, Mode::empty()).unwrap();
    }
    dir
}

/// The contents of the file `name` in the open directory `dir`.
fn read_at(dir: &rustix::fd::OwnedFd, name: &str) -> String {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())
        .unwrap_or_else(|e| panic!("{name} is not at the bottom: {e}"));
    std::io::read_to_string(std::fs::File::from(fd)).unwrap()
}

#[test]
fn commands_work_on_trees_deeper_than_path_max() {
    use rustix::fs::{Mode, OFlags};
    let e = env();
    let base = e.path("base");
    make_base(&base);
    e.create("v", &base, false);
    let mp = e.mount("v", "c1");
    std::fs::remove_file(mp.join("gone.txt")).unwrap();
    {
        let bottom = descend(&mp, true);
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fd =
            rustix::fs::openat(&bottom, "bottom.txt", flags, Mode::from_raw_mode(0o644)).unwrap();
        std::io::Write::write_all(&mut std::fs::File::from(fd), b"deep down").unwrap();
    }
    e.unmount("v", "c1");
    let deep_file = format!("{}/bottom.txt", deep_rel());
    assert!(
        std::fs::symlink_metadata(e.upper("v").join(&deep_file)).is_err(),
        "a whole path reaches the bottom: the tree is not deep enough to test anything"
    );

    // Every path whole: one `A` per level, the file, the deleted base file.
    let mut expected = String::new();
    let mut path = String::new();
    for _ in 0..DEPTH {
        path.push_str("/dd");
        expected += &format!("A {path}\n");
    }
    expected += &format!("A {path}/bottom.txt\nD /gone.txt\n");
    assert_eq!(e.ok(&["changes", "v"]), expected);

    // ls measures it.
    let table = e.ok(&["ls"]);
    let row = table.lines().find(|l| l.starts_with("v ")).unwrap();
    assert!(row.contains(" 1 files, 9 B "), "{table}");

    // recover: the file arrives at the bottom of DEST.
    let dest = e.path("dest");
    e.ok(&["recover", "v", dest.to_str().unwrap()]);
    assert_eq!(read_at(&descend(&dest, false), "bottom.txt"), "deep down");

    // export: the tar holds the deep file under its whole name, and the whiteout.
    let layer = e.path("layer.tar");
    e.ok(&["export", "v", "-o", layer.to_str().unwrap()]);
    let mut ar = tar::Archive::new(std::fs::File::open(&layer).unwrap());
    let mut files = BTreeMap::new();
    let mut dirs = 0;
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if entry.header().entry_type().is_dir() {
            dirs += 1;
        } else {
            files.insert(name, std::io::read_to_string(&mut entry).unwrap());
        }
    }
    assert_eq!(dirs, DEPTH);
    assert_eq!(
        files,
        BTreeMap::from([
            (deep_file.clone(), "deep down".to_string()),
            (".wh.gone.txt".to_string(), String::new()),
        ])
    );

    // commit: the base gets the deep file and loses the deleted one.
    e.ok(&["commit", "v", "--yes"]);
    assert_eq!(read_at(&descend(&base, false), "bottom.txt"), "deep down");
    assert!(!base.join("gone.txt").exists());
    assert_eq!(e.ok(&["changes", "v"]), "");
    assert!(e.trash_is_empty());

    // An error deep down is one short line: its path is shown without its middle.
    let base2 = e.path("base2");
    std::fs::create_dir(&base2).unwrap();
    e.create("w", &base2, false);
    let mp = e.mount("w", "c1");
    drop(descend(&mp, true));
    e.unmount("w", "c1");
    rustix::fs::fsetxattr(
        descend(&e.upper("w"), false),
        "trusted.overlay.redirect",
        b"/elsewhere",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let err = e.fails(&["changes", "w"]);
    assert!(err.contains("redirect_dir=on"), "{err}");
    assert!(
        err.contains("/w/upper/dd/dd/") && err.contains('…'),
        "{err}"
    );
    assert!(err.len() < 600, "{} bytes: {err}", err.len());
}
