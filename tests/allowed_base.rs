//! `--allowed-base DIR` (issue 7) through the real binary and Docker's plugin protocol: Create
//! refuses a base outside the configured directories with a clear `{"Err": ...}` and leaves
//! nothing behind; bases inside them work as before; a bad `--allowed-base` stops the daemon at
//! start. Root, a private mount namespace per test (`tests/common/daemon.rs`).

mod common;

use std::os::unix::fs::symlink;
use std::time::Duration;

use common::daemon::{Env, names};

#[test]
fn create_refuses_bases_outside_the_allowed_directories() {
    let mut env = Env::new();
    let d = env.dir.clone();
    for dir in [
        "srv/data/sub",
        "srv/database",
        "srv/other",
        "tools",
        "elsewhere",
    ] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    std::fs::write(d.join("srv/data/sub/f.txt"), "f").unwrap();
    symlink(d.join("elsewhere"), d.join("srv/data/escape")).unwrap();
    symlink(d.join("srv/data/sub"), d.join("inward")).unwrap();
    let allowed = d.join("srv/data");
    // Given through a symlink, and a second one: both count, canonicalised.
    symlink(d.join("tools"), d.join("tools-link")).unwrap();
    env.start(&[
        "--allowed-base",
        allowed.to_str().unwrap(),
        "--allowed-base",
        d.join("tools-link").to_str().unwrap(),
    ]);

    for (name, base) in [
        ("whole", allowed.clone()),
        ("sub", d.join("srv/data/sub")),
        ("via-link", d.join("inward")),
        ("tools", d.join("tools")),
    ] {
        env.create(name, &[("base", base.to_str().unwrap())])
            .unwrap_or_else(|e| panic!("{name} ({base:?}) refused: {e}\n{}", env.logs()));
    }
    let path = env.mount_ok("via-link", &format!("{:064x}", 1));
    assert_eq!(
        std::fs::read_to_string(env.anchor.path(&path.join("f.txt"))).unwrap(),
        "f"
    );
    env.unmount_ok("via-link", &format!("{:064x}", 1));

    for (name, base) in [
        ("prefix", d.join("srv/database")), // a string prefix only
        ("parent", d.join("srv")),
        ("sibling", d.join("srv/other")),
        ("escape", d.join("srv/data/escape")),
        ("dotdot", d.join("srv/data/sub/../../other")),
        ("usr", "/usr".into()),
    ] {
        let err = env
            .create(name, &[("base", base.to_str().unwrap())])
            .expect_err(&format!(
                "{name}: a base outside the allowed directories was accepted"
            ));
        assert!(
            err.contains("is outside the directories this plugin allows")
                && err.contains(&format!("allows ({}", allowed.display())),
            "{name}: unclear error {err:?}"
        );
        assert!(
            env.get(name).is_err(),
            "{name} exists after a refused Create"
        );
    }
    assert_eq!(
        names(&env.root),
        [".trash", "sub", "tools", "via-link", "whole"]
    );
    // Validation order is unchanged: a missing base is reported as missing.
    let err = env
        .create(
            "missing",
            &[("base", d.join("srv/data/none").to_str().unwrap())],
        )
        .unwrap_err();
    assert!(err.contains("cannot be used"), "{err}");
}

/// A bad allowed base stops the daemon at start, with a message that names where it was
/// given: the option, or the environment variable a managed plugin's settings set.
#[test]
fn a_bad_allowed_base_stops_the_daemon_at_start() {
    let mut env = Env::new();
    std::fs::write(env.dir.join("file"), "x").unwrap();
    for (arg, why) in [
        (env.dir.join("missing"), "cannot be used"),
        (env.dir.join("file"), "is not a directory"),
        ("relative/dir".into(), "is not an absolute path"),
    ] {
        let arg = arg.to_str().unwrap();
        for (from, by_env) in [
            ("--allowed-base", false),
            ("DOCKER_ON_TOP_ALLOWED_BASES", true),
        ] {
            let extra: &[&str] = if by_env {
                &[]
            } else {
                &["--allowed-base", arg]
            };
            let (mut cmd, log) = env.daemon_command(extra);
            if by_env {
                cmd.env("DOCKER_ON_TOP_ALLOWED_BASES", arg);
            }
            let mut child = cmd.spawn().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the daemon started with {from} {arg:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert_eq!(status.code(), Some(1), "{from} {arg:?}");
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(
                text.contains(&format!("cannot use {from}: allowed base {arg:?} {why}")),
                "{from} {arg:?}: unclear message {text:?}"
            );
        }
    }
}

fn mount_id(n: u32) -> String {
    format!("{n:064x}")
}

/// The escape of issue 15: a base accepted at Create is renamed away and replaced by a symlink
/// to a directory outside the allowed ones. Mount refuses it, says why, and changes nothing;
/// with the directory back, the volume mounts again. A stored base with `..` that leads outside
/// (as the Go version could store) is refused too.
#[test]
fn a_symlink_swapped_in_for_an_allowed_base_is_refused_at_mount() {
    let mut env = Env::new();
    let d = env.dir.clone();
    for dir in ["allowed/data", "outside"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    std::fs::write(d.join("allowed/data/inside.txt"), "inside").unwrap();
    std::fs::write(d.join("outside/secret.txt"), "secret").unwrap();
    env.start(&["--allowed-base", d.join("allowed").to_str().unwrap()]);
    let data = d.join("allowed/data");
    env.create("v", &[("base", data.to_str().unwrap())])
        .unwrap();

    std::fs::rename(&data, d.join("allowed/data-away")).unwrap();
    symlink(d.join("outside"), &data).unwrap();
    let err = env
        .mount("v", &mount_id(1))
        .expect_err("mounted through a swapped symlink");
    assert!(
        err.contains("cannot be used from its base directory") && err.contains("symbolic link"),
        "unclear error {err:?}"
    );
    env.assert_not_mounted("v");
    assert!(names(&env.volume_dir("v").join("activemounts")).is_empty());
    // A symlink to a directory inside the allowed one is refused as well: never followed.
    std::fs::remove_file(&data).unwrap();
    symlink(d.join("allowed/data-away"), &data).unwrap();
    env.mount("v", &mount_id(1))
        .expect_err("mounted through a symlink");

    std::fs::remove_file(&data).unwrap();
    std::fs::rename(d.join("allowed/data-away"), &data).unwrap();
    let mp = env.mount_ok("v", &mount_id(1));
    assert_eq!(
        std::fs::read_to_string(env.anchor.path(&mp.join("inside.txt"))).unwrap(),
        "inside"
    );
    env.unmount_ok("v", &mount_id(1));

    // `..` in a stored base (written by hand or by the Go version) that leads outside.
    let meta = env.volume_dir("v").join("metadata.json");
    let dotdot = d.join("allowed/data/../../outside");
    std::fs::write(
        &meta,
        serde_json::json!({ "BaseDirPath": dotdot, "Volatile": false }).to_string(),
    )
    .unwrap();
    let err = env
        .mount("v", &mount_id(2))
        .expect_err("mounted a base outside via ..");
    assert!(
        err.contains("is outside the directories this plugin allows"),
        "unclear error {err:?}"
    );
    env.assert_not_mounted("v");
}

/// A swap that races the Mount: while one thread flips the base between the real directory
/// and a symlink to the outside one, every Mount either fails or shows the allowed directory;
/// never the outside one.
#[test]
fn a_swap_racing_mounts_never_exposes_the_outside_directory() {
    let mut env = Env::new();
    let d = env.dir.clone();
    for dir in ["allowed/data", "outside"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    std::fs::write(d.join("outside/secret.txt"), "secret").unwrap();
    env.start(&["--allowed-base", d.join("allowed").to_str().unwrap()]);
    let data = d.join("allowed/data");
    env.create("v", &[("base", data.to_str().unwrap())])
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut mounted, mut refused) = (0, 0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let (away, link) = (d.join("allowed/data-away"), d.join("allowed/link"));
            symlink(d.join("outside"), &link).unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // Swapped in and out by rename, each step atomic.
                std::fs::rename(&data, &away).unwrap();
                std::fs::rename(&link, &data).unwrap();
                std::thread::yield_now();
                std::fs::rename(&data, &link).unwrap();
                std::fs::rename(&away, &data).unwrap();
            }
        });
        for i in 0..200 {
            match env.mount("v", &mount_id(i)) {
                Ok(mp) => {
                    mounted += 1;
                    let secret = env
                        .anchor
                        .path(&std::path::Path::new(&mp).join("secret.txt"));
                    assert!(!secret.exists(), "Mount {i} exposed the outside directory");
                    env.unmount_ok("v", &mount_id(i));
                }
                Err(e) => {
                    refused += 1;
                    assert!(e.contains("base directory"), "Mount {i}: {e}");
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    println!("racing swaps: {mounted} mounted, {refused} refused");
    assert!(
        mounted > 0 && refused > 0,
        "the race was not exercised: {mounted} {refused}"
    );
    env.assert_not_mounted("v");
}

/// With no `--allowed-base`, a base is opened as before: through a symlink too.
#[test]
fn without_allowed_bases_a_symlinked_base_is_followed_as_before() {
    let mut env = Env::new();
    let d = env.dir.clone();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("other")).unwrap();
    std::fs::write(d.join("other/o.txt"), "o").unwrap();
    env.start(&[]);
    env.create("v", &[("base", d.join("data").to_str().unwrap())])
        .unwrap();
    std::fs::remove_dir(d.join("data")).unwrap();
    symlink(d.join("other"), d.join("data")).unwrap();
    let mp = env.mount_ok("v", &mount_id(1));
    assert!(env.anchor.path(&mp.join("o.txt")).exists());
    env.unmount_ok("v", &mount_id(1));
}
