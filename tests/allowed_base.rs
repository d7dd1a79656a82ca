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
                && err.contains(&format!("--allowed-base {}", allowed.display())),
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

#[test]
fn a_bad_allowed_base_stops_the_daemon_at_start() {
    let mut env = Env::new();
    std::fs::write(env.dir.join("file"), "x").unwrap();
    for (arg, why) in [
        (env.dir.join("missing"), "cannot be used"),
        (env.dir.join("file"), "is not a directory"),
        ("relative/dir".into(), "is not an absolute path"),
    ] {
        let (mut cmd, log) = env.daemon_command(&["--allowed-base", arg.to_str().unwrap()]);
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon started with --allowed-base {arg:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(1), "{arg:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("--allowed-base") && text.contains(why),
            "{arg:?}: unclear message {text:?}"
        );
    }
}
