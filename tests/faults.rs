//! Environment faults (issue 5, item 6), against the real binary over its socket: the state
//! directory read-only or full, the base deleted or replaced by a file while the volume is
//! unmounted, an upper filesystem without extended attributes, and one the kernel refuses
//! as an upper. Each must reach the client as a JSON `Err` a person can act on, leave `Get`
//! and `List` working, and leave nothing half-done once the cause is gone.
//!
//! The state directory is its own filesystem, mounted in the test's private mount namespace
//! (tmpfs, ramfs or an overlay) before the daemon starts; the test process sees it through
//! `/proc/ANCHOR/root` ([`Env::seen`]).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Env, wait_until};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A base directory `DIR/name` holding `base.txt`.
fn make_base(env: &Env, name: &str) -> PathBuf {
    let base = env.dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();
    base
}

/// An environment whose state directory is a fresh filesystem of `fstype` (mounted with
/// `options`) in the test namespace; the daemon is started on it.
fn env_on(fstype: &str, options: &str) -> Env {
    let mut env = Env::new();
    std::fs::create_dir(&env.root).unwrap();
    env.anchor.run(&[
        "mount",
        "-t",
        fstype,
        "-o",
        options,
        &format!("dot-{fstype}"),
        s(&env.root),
    ]);
    env.start(&[]);
    env
}

fn assert_mentions(what: &str, message: &str, parts: &[&str]) {
    let lower = message.to_lowercase();
    for part in parts {
        assert!(
            lower.contains(&part.to_lowercase()),
            "{what}: the error does not mention {part:?}: {message}"
        );
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Checks what the state directory holds, as the daemon sees it: exactly `volumes` and the
/// trash (emptied by the janitor), each volume complete with no temporaries and no records,
/// and nothing mounted.
fn assert_clean_state(env: &Env, volumes: &[&str]) {
    let root = env.seen(&env.root);
    let mut expected = set(volumes);
    expected.insert(".trash".into());
    assert_eq!(names(&root), expected, "the state directory");
    let trash = root.join(".trash");
    wait_until(Duration::from_secs(10), "the trash to be emptied", || {
        names(&trash).is_empty()
    });
    for v in volumes {
        let dir = root.join(v);
        let entries = names(&dir);
        assert_eq!(
            entries,
            set(&[
                "metadata.json",
                "upper",
                "workdir",
                "mountpoint",
                "activemounts"
            ]),
            "volume {v}"
        );
        assert!(
            names(&dir.join("activemounts")).is_empty(),
            "volume {v}: mount records left: {:?}",
            names(&dir.join("activemounts"))
        );
        env.assert_not_mounted(v);
    }
}

fn get_status(env: &Env, name: &str) -> serde_json::Value {
    env.get_ok(name)["Status"].clone()
}

// ----- (a) Read-only state directory -------------------------------------------------------

#[test]
fn read_only_state_directory_refuses_changes_clearly_and_recovers() {
    let env = env_on("tmpfs", "size=64m,mode=0700");
    let base = make_base(&env, "base");
    env.create_ok("p", &base, false);
    env.create_ok("t", &base, true);
    env.create_ok("m", &base, false);
    // A volatile volume with changes the next Mount will discard.
    let mp = env.mount_ok("t", "a");
    std::fs::write(env.seen(&mp).join("scratch"), "x").unwrap();
    env.unmount_ok("t", "a");
    // Unmounted for real before the directory turns read-only.
    env.assert_not_mounted("t");
    // A volume in use while the directory turns read-only.
    let mp_m = env.mount_ok("m", "m1");
    std::fs::write(env.seen(&mp_m).join("kept"), "kept").unwrap();

    env.anchor
        .run(&["mount", "-o", "remount,bind,ro", s(&env.root)]);

    let err = env
        .create("new", &[("base", s(&base))])
        .expect_err("Create on a read-only state directory");
    println!("read-only: Create: {err}");
    assert_mentions("Create", &err, &["new", "state directory", "read-only"]);
    for (name, id) in [("p", "x"), ("t", "y"), ("m", "m2")] {
        let err = env
            .mount(name, id)
            .expect_err("Mount on a read-only state directory");
        println!("read-only: Mount {name}: {err}");
        assert_mentions(&format!("Mount {name}"), &err, &[name, "read-only"]);
    }
    // Reads still work.
    assert_eq!(env.list(), vec!["m", "p", "t"]);
    assert_eq!(get_status(&env, "p")["Mounted"], false);
    let m = get_status(&env, "m");
    assert_eq!(
        (&m["Mounted"], &m["ActiveMounts"]),
        (&true.into(), &1.into())
    );
    assert!(get_status(&env, "t")["Error"].is_null());
    // The volume in use keeps working; its last Unmount takes the overlay away but cannot
    // delete the record: an error, and a record the next Mount finds void.
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp_m).join("kept")).unwrap(),
        "kept"
    );
    let err = env.unmount("m", "m1").expect_err("Unmount, read-only");
    println!("read-only: Unmount m: {err}");
    assert_mentions("Unmount m", &err, &["m", "state directory", "read-only"]);
    // The overlay went before the answer, as at any last Unmount, though the record could not.
    env.assert_not_mounted("m");
    assert_eq!(get_status(&env, "m")["Mounted"], false);
    assert!(
        env.seen(&env.upper("t")).join("scratch").exists(),
        "the volatile volume lost its changes in a refused Mount"
    );

    env.anchor
        .run(&["mount", "-o", "remount,bind,rw", s(&env.root)]);
    // Nothing half-done: no staging directory of the refused Create, no temporaries.
    let root = env.seen(&env.root);
    assert_eq!(names(&root), set(&[".trash", "m", "p", "t"]));
    for v in ["m", "p", "t"] {
        let entries = names(&root.join(v));
        assert!(
            entries.iter().all(|e| !e.starts_with('.')),
            "volume {v} holds {entries:?}"
        );
    }
    // Everything works again.
    for (name, id) in [("p", "x"), ("t", "y"), ("m", "m2")] {
        let mp = env.mount_ok(name, id);
        env.assert_mounted_once(name);
        if name == "t" {
            assert!(
                !env.seen(&mp).join("scratch").exists(),
                "volatile changes not discarded"
            );
        }
        if name == "m" {
            assert_eq!(
                std::fs::read_to_string(env.seen(&mp).join("kept")).unwrap(),
                "kept"
            );
        }
        env.unmount_ok(name, id);
    }
    env.create_ok("new", &base, false);
    assert_clean_state(&env, &["m", "new", "p", "t"]);
}

// ----- (b) Full state directory ------------------------------------------------------------

/// Fills the file system of the state root with `ROOT/.filler` (again, if something was freed
/// since). The janitor deletes what was moved to the trash in the background, so this first
/// waits until it has deleted everything there: until its log says so, for an entry can
/// vanish from the listing while its unlink, which frees the space, is still under way (a
/// Create then found room once in 15 runs).
fn fill(env: &Env) -> PathBuf {
    let dir = env.seen(&env.root);
    let trash = dir.join(".trash");
    let pending: Vec<String> = (names(&trash).into_iter())
        .map(|n| format!("deleted {:?}", env.root.join(".trash").join(n)))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "the janitor to empty the trash",
        || {
            let logs = env.logs();
            names(&trash).is_empty() && pending.iter().all(|line| logs.contains(line))
        },
    );
    let filler = dir.join(".filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&filler)
        .unwrap();
    for chunk in [vec![0u8; 4096], vec![0u8; 1]] {
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {dir:?}: {e}"),
            }
        }
    }
    filler
}

#[test]
fn full_state_directory_refuses_changes_clearly_and_recovers() {
    let env = env_on("tmpfs", "size=1m,mode=0700");
    let base = make_base(&env, "base");
    env.create_ok("p", &base, false);
    // (Without changes: discarding them would free space, and the Mount might then work.)
    env.create_ok("t", &base, true);
    let mp_p = env.mount_ok("p", "a");
    std::fs::write(env.seen(&mp_p).join("kept"), "kept").unwrap();
    env.unmount_ok("p", "a");
    // Unmounted for real before the directory is filled.
    env.assert_not_mounted("p");

    let root = env.seen(&env.root);
    let filler = fill(&env);

    let err = env
        .create("new", &[("base", s(&base))])
        .expect_err("Create on a full state directory");
    println!("full: Create: {err}");
    assert_mentions("Create", &err, &["new", "state directory is full"]);
    for name in ["p", "t"] {
        fill(&env);
        let err = env
            .mount(name, "b")
            .expect_err("Mount on a full state directory");
        println!("full: Mount {name}: {err}");
        assert_mentions(
            &format!("Mount {name}"),
            &err,
            &[name, "state directory is full", "no space left"],
        );
        // A refused Mount leaves the volume unmounted, with no record.
        env.assert_not_mounted(name);
        assert!(names(&root.join(name).join("activemounts")).is_empty());
        let status = get_status(&env, name);
        assert_eq!(
            (&status["Mounted"], &status["ActiveMounts"]),
            (&false.into(), &0.into())
        );
    }
    assert_eq!(env.list(), vec!["p", "t"]);
    assert_eq!(
        std::fs::read_to_string(root.join("p/upper/kept")).unwrap(),
        "kept"
    );

    std::fs::remove_file(&filler).unwrap();
    for name in ["p", "t"] {
        let mp = env.mount_ok(name, "c");
        env.assert_mounted_once(name);
        let seen = env.seen(&mp);
        assert_eq!(
            std::fs::read_to_string(seen.join("base.txt")).unwrap(),
            "base"
        );
        if name == "p" {
            assert_eq!(std::fs::read_to_string(seen.join("kept")).unwrap(), "kept");
        }
        env.unmount_ok(name, "c");
    }
    env.create_ok("new", &base, false);
    assert_clean_state(&env, &["new", "p", "t"]);
}

// ----- (c) Base deleted or replaced by a file --------------------------------------------

#[test]
fn base_deleted_or_replaced_by_a_file_while_unmounted() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    let vbase = make_base(&env, "vbase");
    env.create_ok("p", &base, false);
    env.create_ok("t", &vbase, true);
    let mp = env.mount_ok("p", "a");
    std::fs::write(env.seen(&mp).join("kept"), "kept").unwrap();
    env.unmount_ok("p", "a");
    let mp = env.mount_ok("t", "a");
    std::fs::write(env.seen(&mp).join("scratch"), "x").unwrap();
    env.unmount_ok("t", "a");

    let moved = env.dir.join("base.moved");
    std::fs::rename(&base, &moved).unwrap();
    let err = env.mount("p", "b").expect_err("Mount with the base gone");
    println!("base deleted: {err}");
    assert_mentions("base deleted", &err, &["p", s(&base), "no such file"]);
    env.assert_not_mounted("p");
    let status = get_status(&env, "p");
    assert_eq!(status["Base"], s(&base));
    assert_eq!(status["Mounted"], false);
    assert!(status["Error"].is_null(), "{status}");
    assert_eq!(env.path("p").unwrap(), None);

    std::fs::write(&base, "a file now").unwrap();
    let err = env.mount("p", "b").expect_err("Mount with the base a file");
    println!("base replaced by a file: {err}");
    assert_mentions("base a file", &err, &["p", s(&base), "not a directory"]);
    env.assert_not_mounted("p");
    assert_eq!(get_status(&env, "p")["Base"], s(&base));

    // A volatile volume whose base is gone keeps its changes: nothing is discarded for a
    // Mount that cannot happen.
    std::fs::remove_dir_all(&vbase).unwrap();
    let err = env.mount("t", "b").expect_err("Mount with the base gone");
    assert_mentions("volatile, base deleted", &err, &["t", s(&vbase)]);
    assert!(env.seen(&env.upper("t")).join("scratch").exists());

    std::fs::remove_file(&base).unwrap();
    std::fs::rename(&moved, &base).unwrap();
    make_base(&env, "vbase");
    let mp = env.mount_ok("p", "b");
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp).join("kept")).unwrap(),
        "kept"
    );
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp).join("base.txt")).unwrap(),
        "base"
    );
    env.unmount_ok("p", "b");
    let mp = env.mount_ok("t", "b");
    assert!(!env.seen(&mp).join("scratch").exists());
    env.unmount_ok("t", "b");
    assert_clean_state(&env, &["p", "t"]);
}

// ----- (d) An upper the overlay cannot use -------------------------------------------------

/// ramfs has no extended attributes: overlayfs would mount on it (warning only in the kernel
/// log) and then fail deleting base directories inside the container. The plugin refuses.
#[test]
fn upper_filesystem_without_xattrs_is_refused_clearly() {
    let env = env_on("ramfs", "mode=0700");
    let base = make_base(&env, "base");
    std::fs::create_dir(base.join("dir")).unwrap();
    std::fs::write(base.join("dir/f"), "f").unwrap();
    env.create_ok("v", &base, false);
    let err = env.mount("v", "a").expect_err("Mount on ramfs");
    println!("no xattrs: {err}");
    assert_mentions(
        "no xattrs",
        &err,
        &["v", "extended attributes", s(&env.root), "not supported"],
    );
    env.assert_not_mounted("v");
    let status = get_status(&env, "v");
    assert_eq!(
        (&status["Mounted"], &status["ActiveMounts"]),
        (&false.into(), &0.into())
    );
    assert_eq!(env.list(), vec!["v"]);
    assert!(names(&env.seen(&env.root).join("v/activemounts")).is_empty());
    env.remove("v").unwrap();
    assert_eq!(env.list(), Vec::<String>::new());
}

/// The state directory on an overlay: the kernel refuses it as an upper, and says why in
/// the fs context of the new mount API; the reply carries that reason.
#[test]
fn upper_the_kernel_refuses_gives_the_kernels_reason() {
    let mut env = Env::new();
    let layers = env.dir.join("root-layers");
    for d in ["lower", "upper", "work"] {
        std::fs::create_dir_all(layers.join(d)).unwrap();
    }
    std::fs::create_dir(&env.root).unwrap();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&layers.join("lower")),
        s(&layers.join("upper")),
        s(&layers.join("work"))
    );
    env.anchor.run(&[
        "mount",
        "-t",
        "overlay",
        "-o",
        &options,
        "dot-root",
        s(&env.root),
    ]);
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let err = env
        .mount("v", "a")
        .expect_err("Mount with the upper on an overlay");
    println!("upper on an overlay: {err}");
    assert_mentions(
        "upper on an overlay",
        &err,
        &["cannot mount volume v", "upperdir", "not supported"],
    );
    env.assert_not_mounted("v");
    assert_eq!(get_status(&env, "v")["Mounted"], false);
    assert!(names(&env.seen(&env.root).join("v/activemounts")).is_empty());
}
