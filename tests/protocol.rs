//! End-to-end tests of the real binary: Docker's volume plugin protocol spoken over a unix
//! socket exactly as dockerd speaks it, with real overlay mounts.
//!
//! Each test runs its own daemon in its own private mount namespace (see
//! `tests/common/daemon.rs`), so nothing is mounted on the host and tests can run in parallel.
//! The tests need root; anything privileged that fails makes the test fail.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime};

use common::daemon::{BIN, Conn, Env, Proc, comm, dockerd_body, names, request, tree, wait_until};
use serde_json::{Value, json};

/// A mount ID as dockerd makes them: 64 hex digits.
fn id(n: u32) -> String {
    format!("{:064x}", 0x5eed_0000_u64 + u64::from(n))
}

/// A base directory `DIR/name` holding `base.txt` and `other.txt`.
fn make_base(env: &Env, name: &str) -> PathBuf {
    let base = env.dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();
    std::fs::write(base.join("other.txt"), "other").unwrap();
    base
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether a `Volume` object carries no mountpoint (absent or empty).
fn has_no_mountpoint(volume: &Value) -> bool {
    match volume.get("Mountpoint") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Checks `text` is what Go's `time.Parse(time.RFC3339, ..)` accepts and lies near now.
fn assert_rfc3339_recent(text: &str) {
    let b = text.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    assert!(shape, "CreatedAt {text:?} is not RFC 3339");
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        assert!(n > 0, "CreatedAt {text:?}: empty fraction");
        rest = &frac[n..];
    }
    let offset_ok = rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && rest[1..3]
                .bytes()
                .chain(rest[4..6].bytes())
                .all(|c| c.is_ascii_digit()));
    assert!(offset_ok, "CreatedAt {text:?} has no valid zone");
    if rest == "Z" {
        let t = humantime::parse_rfc3339(text)
            .unwrap_or_else(|e| panic!("CreatedAt {text:?} does not parse: {e}"));
        let age = SystemTime::now()
            .duration_since(t)
            .unwrap_or_else(|e| e.duration());
        assert!(
            age < Duration::from_secs(300),
            "CreatedAt {text:?} is not now"
        );
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.to_lowercase().contains(&part.to_lowercase()),
            "error message {message:?} does not mention {part:?}"
        );
    }
}

// ----- 1. Activation and malformed requests ----------------------------------------------

#[test]
fn activate_capabilities_and_malformed_requests() {
    let mut env = Env::new();
    env.start(&[]);
    let empty = dockerd_body(None);

    let r = request(&env.socket, "POST", "/Plugin.Activate", Some(&empty));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "Implements": ["VolumeDriver"] }));
    let r = request(
        &env.socket,
        "POST",
        "/VolumeDriver.Capabilities",
        Some(&empty),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "Capabilities": { "Scope": "local" } }));
    assert_eq!(env.list(), Vec::<String>::new());

    // dockerd keeps its connection open between calls.
    let mut conn = Conn::open(&env.socket).unwrap();
    for endpoint in [
        "/Plugin.Activate",
        "/VolumeDriver.Capabilities",
        "/VolumeDriver.List",
    ] {
        let r = conn.request("POST", endpoint, Some(&empty));
        assert_eq!(r.status, 200, "{endpoint} on a kept-alive connection");
        r.outcome().unwrap();
    }

    let base = make_base(&env, "base");
    let create = json!({ "Name": "v", "Opts": { "base": s(&base) } }).to_string();
    // An array is not an object, even if its items are the fields in order.
    let create_array = json!(["v", { "base": s(&base) }]).to_string();
    // A key named twice: which one counts differs between parsers.
    let create_twice = format!(
        r#"{{"Name":"v","Name":"w","Opts":{{"base":{:?}}}}}"#,
        s(&base)
    );
    let base_twice = format!(
        r#"{{"Name":"v","Opts":{{"base":{:?},"base":{:?}}}}}"#,
        s(&base),
        s(&base)
    );
    let cases: Vec<(&str, &str, Option<&[u8]>)> = vec![
        ("POST", "/VolumeDriver.Frobnicate", Some(b"{}")),
        ("POST", "/", Some(b"")),
        ("POST", "/volumedriver.create", Some(create.as_bytes())),
        ("GET", "/Plugin.Activate", None),
        ("GET", "/VolumeDriver.List", None),
        ("PUT", "/VolumeDriver.Create", Some(create.as_bytes())),
        ("POST", "/Plugin.Activate", Some(b"{")),
        ("POST", "/VolumeDriver.Create", Some(b"{\"Name\":")),
        ("POST", "/VolumeDriver.Create", Some(b"not json")),
        ("POST", "/VolumeDriver.Create", Some(b"")),
        ("POST", "/VolumeDriver.Create", Some(b"{\"Opts\":{}}")),
        ("POST", "/VolumeDriver.Get", Some(b"{}")),
        ("POST", "/VolumeDriver.Remove", Some(b"")),
        ("POST", "/VolumeDriver.Mount", Some(b"{\"Name\":\"v\"}")),
        ("POST", "/VolumeDriver.Unmount", Some(b"{\"ID\":\"abc\"}")),
        ("POST", "/VolumeDriver.Get", Some(b"{\"Name\":5}")),
        ("POST", "/VolumeDriver.Path", Some(b"{\"Name\":null}")),
        ("POST", "/VolumeDriver.Remove", Some(b"[\"v\"]")),
        (
            "POST",
            "/VolumeDriver.Create",
            Some(create_array.as_bytes()),
        ),
        ("POST", "/VolumeDriver.Get", Some(b"[\"v\"]")),
        ("POST", "/VolumeDriver.Mount", Some(b"[\"v\", \"abc\"]")),
        (
            "POST",
            "/VolumeDriver.Create",
            Some(b"{\"Name\":\"v\",\"Opts\":{\"base\":1}}"),
        ),
        (
            "POST",
            "/VolumeDriver.Create",
            Some(b"{\"Name\":\"v\",\"Opts\":[\"base\"]}"),
        ),
        (
            "POST",
            "/VolumeDriver.Mount",
            Some(b"{\"Name\":\"v\",\"ID\":[]}"),
        ),
        ("POST", "/VolumeDriver.Path", Some(b"\xff\xfe")),
        (
            "POST",
            "/VolumeDriver.Create",
            Some(create_twice.as_bytes()),
        ),
        ("POST", "/VolumeDriver.Create", Some(base_twice.as_bytes())),
    ];
    let mut wrong = Vec::new();
    for (method, path, body) in cases {
        let r = request(&env.socket, method, path, body);
        let what = format!("{method} {path} {:?}", body.map(String::from_utf8_lossy));
        match r.outcome() {
            Ok(reply) => wrong.push(format!("{what} was accepted: {reply}")),
            Err(err) if !(400..500).contains(&r.status) => {
                wrong.push(format!("{what}: status {} ({err})", r.status))
            }
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "malformed requests not refused as such:\n{}",
        wrong.join("\n")
    );

    // A 2 MiB body: refused with a JSON error, nothing created.
    let big = json!({ "Name": "v", "Opts": { "base": format!("/{}", "a".repeat(2 << 20)) } });
    let big = dockerd_body(Some(&big));
    let r = request(&env.socket, "POST", "/VolumeDriver.Create", Some(&big));
    let err = r.outcome().expect_err("a 2 MiB body was accepted");
    assert_eq!(r.status, 413, "{err}");

    // Still serving, and none of this left anything behind.
    let r = request(&env.socket, "POST", "/Plugin.Activate", Some(&empty));
    assert_eq!(r.json(), json!({ "Implements": ["VolumeDriver"] }));
    assert_eq!(env.list(), Vec::<String>::new());
    let left = names(&env.root);
    assert_eq!(left, vec![".trash"]);
}

/// A client that shuts its side of the connection down after its request (`nc -N`, socat)
/// gets the answer of the call it made.
#[test]
fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    use std::io::{Read, Write};
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let body = dockerd_body(Some(&json!({ "Name": "v", "ID": id(1) })));
    let mut c = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "POST /VolumeDriver.Mount HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    c.write_all(&body).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(reply.contains(s(&env.mountpoint("v"))), "{reply:?}");
    env.assert_mounted_once("v");
}

// ----- 2. Lifecycle ----------------------------------------------------------------------

#[test]
fn create_get_list_path_remove_lifecycle() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");

    env.create_ok("v1", &base, false);
    assert_eq!(env.list(), vec!["v1"]);
    let vol = env.get_ok("v1");
    assert_eq!(vol["Name"], "v1");
    assert_rfc3339_recent(vol["CreatedAt"].as_str().expect("CreatedAt missing"));
    assert!(has_no_mountpoint(&vol), "Mountpoint while unmounted: {vol}");
    let status = &vol["Status"];
    assert_eq!(status["Base"], s(&base), "{vol}");
    assert_eq!(status["Volatile"], false, "{vol}");
    assert_eq!(status["Mounted"], false, "{vol}");
    assert_eq!(status["ActiveMounts"], 0, "{vol}");
    assert_eq!(env.path("v1"), Ok(None));

    // Same options again, also spelled through a symlink: accepted. Others: refused.
    env.create_ok("v1", &base, false);
    let link = env.dir.join("link");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    env.create("v1", &[("base", s(&link))]).unwrap();
    let err = env
        .create("v1", &[("base", s(&base)), ("volatile", "true")])
        .expect_err("Create with other options accepted");
    assert_contains(&err, &["v1", "exists"]);
    let other = make_base(&env, "other");
    env.create("v1", &[("base", s(&other))])
        .expect_err("Create with another base accepted");
    let vol = env.get_ok("v1");
    assert_eq!(vol["Status"]["Base"], s(&base));
    assert_eq!(vol["Status"]["Volatile"], false);
    assert_eq!(env.list(), vec!["v1"]);

    // Mountpoint exactly while mounted.
    let mp = env.mount_ok("v1", &id(1));
    let vol = env.get_ok("v1");
    assert_eq!(vol["Mountpoint"], s(&mp), "{vol}");
    assert_eq!(vol["Status"]["Mounted"], true, "{vol}");
    assert_eq!(vol["Status"]["ActiveMounts"], 1, "{vol}");
    assert_eq!(env.path("v1"), Ok(Some(s(&mp).to_owned())));
    env.unmount_ok("v1", &id(1));
    let vol = env.get_ok("v1");
    assert!(has_no_mountpoint(&vol), "Mountpoint after Unmount: {vol}");
    assert_eq!(vol["Status"]["Mounted"], false, "{vol}");
    assert_eq!(vol["Status"]["ActiveMounts"], 0, "{vol}");
    assert_eq!(env.path("v1"), Ok(None));

    // Unknown volumes.
    let err = env.get("nope").expect_err("Get of an unknown volume");
    assert_contains(&err, &["nope", "does not exist"]);
    env.path("nope").expect_err("Path of an unknown volume");
    let err = env
        .mount("nope", &id(1))
        .expect_err("Mount of an unknown volume");
    assert_contains(&err, &["does not exist"]);
    env.unmount("nope", &id(1))
        .expect_err("Unmount of an unknown volume");
    env.remove("nope")
        .expect("Remove of an unknown volume must succeed");

    env.remove("v1").unwrap();
    assert_eq!(env.list(), Vec::<String>::new());
    assert_contains(&env.get("v1").unwrap_err(), &["does not exist"]);
    assert!(!env.volume_dir("v1").exists());
    env.remove("v1").unwrap();
    // The name is free again, with other options.
    env.create_ok("v1", &other, true);
    assert_eq!(env.get_ok("v1")["Status"]["Volatile"], true);
}

// ----- 3. Bad input ----------------------------------------------------------------------

#[test]
fn bad_names_ids_and_options_change_nothing() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    std::fs::write(env.dir.join("file"), "x").unwrap();
    env.create_ok("good", &base, false);

    let escape = format!("/tmp/dot-proto-escaped-{}", std::process::id());
    let tmp_x_existed = Path::new("/tmp/x").exists();
    let root_before = tree(&env.root);
    let dir_before = names(&env.dir);
    let check = |what: &str| {
        assert_eq!(
            tree(&env.root),
            root_before,
            "{what} changed the state root"
        );
        assert_eq!(
            names(&env.dir),
            dir_before,
            "{what} created something beside the root"
        );
        assert_eq!(
            Path::new("/tmp/x").exists(),
            tmp_x_existed,
            "{what} touched /tmp/x"
        );
        assert!(!Path::new(&escape).exists(), "{what} created {escape}");
        assert_eq!(env.list(), vec!["good"], "{what}");
        env.assert_not_mounted("good");
    };

    let long = "a".repeat(256);
    for name in [
        "../x",
        ".hidden",
        "a/b",
        "",
        &long,
        "..",
        ".",
        "/abs",
        "a b",
        "../../tmp/x",
    ] {
        let what = format!("volume name {name:?}");
        env.create(name, &[("base", s(&base))])
            .expect_err(&format!("Create with {what}"));
        check(&what);
        env.get(name).expect_err(&format!("Get with {what}"));
        env.path(name).expect_err(&format!("Path with {what}"));
        env.mount(name, &id(1))
            .expect_err(&format!("Mount with {what}"));
        env.unmount(name, &id(1))
            .expect_err(&format!("Unmount with {what}"));
        env.remove(name).expect_err(&format!("Remove with {what}"));
        check(&what);
    }

    let deep = format!("../../../../../../../../../..{escape}");
    for mount_id in [
        "../../tmp/x",
        "a/b",
        "../../../x",
        &deep,
        ".hidden",
        "",
        &long,
    ] {
        let what = format!("mount ID {mount_id:?}");
        env.mount("good", mount_id)
            .expect_err(&format!("Mount with {what}"));
        check(&what);
        env.unmount("good", mount_id)
            .expect_err(&format!("Unmount with {what}"));
        check(&what);
    }

    let root = env.root.clone();
    /// Options of a Create, and words its error must mention.
    type Case<'a> = (Vec<(&'a str, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (vec![], vec!["base"]),
        (vec![("volatile", "true".into())], vec!["base"]),
        (vec![("base", "relative/dir".into())], vec!["relative/dir"]),
        (
            vec![("base", s(&env.dir.join("nonexistent")).into())],
            vec!["nonexistent"],
        ),
        (
            vec![("base", s(&env.dir.join("file")).into())],
            vec!["not a directory"],
        ),
        (vec![("base", s(&root).into())], vec![]),
        (vec![("base", s(&root.join(".trash")).into())], vec![]),
        (vec![("base", s(&root.join("good/upper")).into())], vec![]),
        (vec![("base", s(&env.dir).into())], vec![]),
        (vec![("base", "/".into())], vec![]),
        (
            vec![("base", s(&base).into()), ("color", "red".into())],
            vec!["color", "base", "volatile", "size"],
        ),
        (
            vec![("base", s(&base).into()), ("size", "lots".into())],
            vec!["size", "lots", "100Mi"],
        ),
        (
            vec![("base", s(&base).into()), ("size", "1Mi".into())],
            vec!["below the smallest ext4", "8Mi"],
        ),
        (
            vec![("base", s(&base).into()), ("volatile", "maybe".into())],
            vec!["volatile", "maybe"],
        ),
    ];
    for (opts, mentions) in cases {
        let what = format!("options {opts:?}");
        let opts: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = env
            .create("fresh", &opts)
            .expect_err(&format!("Create with {what}"));
        assert_contains(&err, &mentions);
        assert_contains(&env.get("fresh").unwrap_err(), &["does not exist"]);
        check(&what);
    }
    // Other options for an existing volume do not touch it either.
    env.create("good", &[("base", s(&base)), ("volatile", "true")])
        .expect_err("Create with other options");
    check("a conflicting Create");
}

/// The longest name and mount ID the protocol takes (255 bytes, a file name's limit) work
/// end to end: the temporaries and trash entries named after them stay within the limit.
#[test]
fn names_and_ids_of_255_bytes_work_end_to_end() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    let name = "n".repeat(255);
    let mount = "m".repeat(255);
    env.create_ok(&name, &base, true);
    let mp = env.mount_ok(&name, &mount);
    std::fs::write(env.seen(&mp).join("new.txt"), "new").unwrap();
    // The same ID again (`docker cp`): its record is replaced through a temporary.
    env.mount_ok(&name, &mount);
    env.unmount_ok(&name, &mount);
    env.unmount_ok(&name, &mount);
    // Volatile: the next Mount moves the changes into the trash.
    let mp = env.mount_ok(&name, &mount);
    assert!(!env.seen(&mp).join("new.txt").exists());
    env.unmount_ok(&name, &mount);
    env.remove(&name).unwrap();
    assert_eq!(env.list(), Vec::<String>::new());
}

// ----- 4. Mounting -----------------------------------------------------------------------

#[test]
fn mount_writes_to_upper_and_counts_mount_ids() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    env.assert_not_mounted("v");

    let mp = env.mount_ok("v", &id(1));
    env.assert_mounted_once("v");
    let overlay = &env.overlays_at(&mp)[0];
    assert!(
        overlay.super_options.contains("upperdir="),
        "{}",
        overlay.line
    );
    let merged = env.seen(&mp);
    assert_eq!(names(&merged), vec!["base.txt", "other.txt"]);
    assert_eq!(
        std::fs::read_to_string(merged.join("base.txt")).unwrap(),
        "base"
    );

    // Writes land in upper; the base stays as it was.
    std::fs::write(merged.join("new.txt"), "new").unwrap();
    std::fs::write(merged.join("base.txt"), "changed").unwrap();
    std::fs::remove_file(merged.join("other.txt")).unwrap();
    let upper = env.upper("v");
    assert_eq!(
        std::fs::read_to_string(upper.join("new.txt")).unwrap(),
        "new"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("base.txt")).unwrap(),
        "changed"
    );
    let whiteout = std::fs::symlink_metadata(upper.join("other.txt")).unwrap();
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "deleting a base file left no whiteout (char 0/0) in upper: {whiteout:?}"
    );
    assert_eq!(names(&base), vec!["base.txt", "other.txt"]);
    assert_eq!(
        std::fs::read_to_string(base.join("base.txt")).unwrap(),
        "base"
    );
    assert_eq!(
        std::fs::read_to_string(base.join("other.txt")).unwrap(),
        "other"
    );
    assert_eq!(names(&merged), vec!["base.txt", "new.txt"]);

    // docker cp: the same ID again, then Unmount.
    env.mount_ok("v", &id(1));
    env.assert_mounted_once("v");
    assert_eq!(env.get_ok("v")["Status"]["ActiveMounts"], 2);
    env.unmount_ok("v", &id(1));
    env.assert_mounted_once("v");
    let vol = env.get_ok("v");
    assert_eq!(
        vol["Status"]["Mounted"], true,
        "unmounted while still in use: {vol}"
    );
    assert_eq!(vol["Status"]["ActiveMounts"], 1, "{vol}");
    env.unmount_ok("v", &id(1));
    // Unmounted when the last Unmount answers: the kernel first, then Get agrees.
    env.assert_not_mounted("v");
    assert_eq!(env.get_ok("v")["Status"]["Mounted"], false);
    assert_eq!(
        names(&env.volume_dir("v").join("activemounts")),
        Vec::<String>::new()
    );

    let err = env
        .unmount("v", &id(1))
        .expect_err("Unmount of a released ID");
    assert_contains(&err, &[&id(1)]);
    env.unmount("v", &id(2))
        .expect_err("Unmount of an unknown ID");
    env.assert_not_mounted("v");

    // A persistent volume keeps its changes.
    env.mount_ok("v", &id(3));
    env.assert_mounted_once("v");
    assert_eq!(names(&merged), vec!["base.txt", "new.txt"]);
    assert_eq!(
        std::fs::read_to_string(merged.join("base.txt")).unwrap(),
        "changed"
    );
    env.unmount_ok("v", &id(3));
    env.assert_not_mounted("v");
}

// ----- 5. Concurrency --------------------------------------------------------------------

#[test]
fn concurrent_mounts_share_one_overlay() {
    const N: u32 = 32;
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let mp = env.mountpoint("v");

    let barrier = Barrier::new(N as usize);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (env, barrier) = (&env, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    env.mount("v", &id(i))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.as_deref(), Ok(s(&mp)), "Mount {i}");
    }
    env.assert_mounted_once("v");
    assert_eq!(env.get_ok("v")["Status"]["ActiveMounts"], N);
    let active = env.volume_dir("v").join("activemounts");
    assert_eq!(names(&active).len(), N as usize);

    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (env, barrier) = (&env, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    env.unmount("v", &id(i))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r, &Ok(()), "Unmount {i}");
    }
    // The last Unmount has unmounted when it answers.
    env.assert_not_mounted("v");
    let vol = env.get_ok("v");
    assert_eq!(vol["Status"]["Mounted"], false, "{vol}");
    assert_eq!(names(&active), Vec::<String>::new());
}

/// An answer means what it says: when the last Unmount answers, the overlay is gone from the
/// mount table, and when a Mount answers, its record is complete (count, boot, client). Also
/// for a client that mounts one ID twice, as `docker cp` does.
#[test]
fn answers_are_true_when_they_arrive() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, true);
    let record = env.volume_dir("v").join("activemounts").join(id(1));
    for cycle in 0..100 {
        env.mount_ok("v", &id(1));
        let written: Value = serde_json::from_slice(&std::fs::read(&record).unwrap())
            .unwrap_or_else(|e| panic!("cycle {cycle}: the record is not complete: {e}"));
        assert_eq!(written["UsageCount"], 1, "cycle {cycle}: {written}");
        assert!(written["BootId"].is_string(), "cycle {cycle}: {written}");
        assert!(
            written["Client"]["Pid"].is_u64(),
            "cycle {cycle}: {written}"
        );
        if cycle % 2 == 1 {
            // `docker cp`: the same ID again, then its Unmount.
            env.mount_ok("v", &id(1));
            env.unmount_ok("v", &id(1));
        }
        env.unmount_ok("v", &id(1));
        env.assert_not_mounted("v");
        assert!(
            !record.exists(),
            "cycle {cycle}: the record outlived its Unmount"
        );
    }
}

// ----- 6. Volatile -----------------------------------------------------------------------

#[test]
fn volatile_changes_survive_unmount_and_go_at_next_mount() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("t", &base, true);
    assert_eq!(env.get_ok("t")["Status"]["Volatile"], true);

    let mp = env.mount_ok("t", &id(1));
    let merged = env.seen(&mp);
    std::fs::write(merged.join("scratch.txt"), "scratch").unwrap();
    std::fs::remove_file(merged.join("other.txt")).unwrap();
    env.unmount_ok("t", &id(1));
    env.assert_not_mounted("t");
    // Recoverable until the next Mount.
    let upper = env.upper("t");
    assert_eq!(
        std::fs::read_to_string(upper.join("scratch.txt")).unwrap(),
        "scratch",
        "volatile changes discarded at Unmount"
    );

    env.mount_ok("t", &id(2));
    env.assert_mounted_once("t");
    assert_eq!(names(&upper), Vec::<String>::new(), "changes not discarded");
    assert_eq!(names(&merged), names(&base));
    assert_eq!(names(&merged), vec!["base.txt", "other.txt"]);
    assert_eq!(names(&base), vec!["base.txt", "other.txt"]);

    let trash = env.root.join(".trash");
    wait_until(Duration::from_secs(5), "the trash to be emptied", || {
        names(&trash).is_empty()
    });
    assert!(
        !tree(&env.root).iter().any(|p| p.contains("scratch.txt")),
        "the discarded upper is still under the root: {:#?}",
        tree(&env.root)
    );
    env.unmount_ok("t", &id(2));
    env.assert_not_mounted("t");
}

// ----- 7. Ownership ----------------------------------------------------------------------

#[test]
fn merged_root_takes_the_base_owner_and_mode() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    std::os::unix::fs::chown(&base, Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o750)).unwrap();
    env.create_ok("p", &base, false);
    env.create_ok("t", &base, true);

    let check = |name: &str, when: &str| {
        let m = std::fs::metadata(env.seen(&env.mountpoint(name))).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1000, 1000, 0o750),
            "merged root of {name} {when}"
        );
    };
    for name in ["p", "t"] {
        let mp = env.mount_ok(name, &id(1));
        check(name, "at first mount");
        std::fs::write(env.seen(&mp).join("x"), "x").unwrap();
        env.unmount_ok(name, &id(1));
        let mp = env.mount_ok(name, &id(2));
        check(name, "at the second mount (after a volatile discard for t)");
        std::fs::write(env.seen(&mp).join("y"), "y").unwrap();
        env.unmount_ok(name, &id(2));
    }
    assert_eq!(names(&env.upper("p")), vec!["x", "y"]);
    assert_eq!(names(&env.upper("t")), vec!["y"]);
    env.mount_ok("t", &id(3));
    assert_eq!(names(&env.upper("t")), Vec::<String>::new());
    check("t", "after another discard");
}

// ----- 8. Separators in paths ------------------------------------------------------------

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Base and state root with a space, a comma and a colon: each must reach the kernel intact.
fn paths_with_separators(legacy: bool) {
    let mut env = Env::with_root("state dir, a:b");
    env.start(if legacy { &["--legacy-mount-api"] } else { &[] });
    let base = make_base(&env, "my data, v1:2");
    env.create_ok("v", &base, false);
    assert_eq!(env.get_ok("v")["Status"]["Base"], s(&base));

    let mp = env.mount_ok("v", &id(1));
    env.assert_mounted_once("v");
    // The kernel shows which API mounted: `lowerdir+=` for layers passed to fsconfig one at a
    // time, the escaped option string of mount(2) otherwise.
    let line = env.overlays_at(&mp)[0].line.clone();
    if legacy {
        assert!(
            line.contains(",lowerdir=") && !line.contains("lowerdir+="),
            "--legacy-mount-api did not use mount(2): {line}"
        );
    } else if kernel_at_least(6, 13) {
        assert!(
            line.contains("lowerdir+="),
            "the new mount API was not used: {line}"
        );
    }
    let merged = env.seen(&mp);
    assert_eq!(
        std::fs::read_to_string(merged.join("base.txt")).unwrap(),
        "base"
    );
    std::fs::write(merged.join("new.txt"), "new").unwrap();
    assert_eq!(
        std::fs::read_to_string(env.upper("v").join("new.txt")).unwrap(),
        "new"
    );
    assert_eq!(names(&base), vec!["base.txt", "other.txt"]);
    env.unmount_ok("v", &id(1));
    env.assert_not_mounted("v");
    env.remove("v").unwrap();
    assert!(!env.volume_dir("v").exists());
}

#[test]
fn paths_with_spaces_commas_and_colons_default_mount_api() {
    paths_with_separators(false);
}

#[test]
fn paths_with_spaces_commas_and_colons_legacy_mount_api() {
    paths_with_separators(true);
}

// ----- 9. Crashes and reboots ------------------------------------------------------------

#[test]
fn kill_9_and_restart_keeps_the_mount() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let mp = env.mount_ok("v", &id(1));
    env.mount_ok("v", &id(2));
    std::fs::write(env.seen(&mp).join("kept.txt"), "kept").unwrap();

    env.kill9();
    assert!(
        std::fs::symlink_metadata(&env.socket).is_ok_and(|m| m.file_type().is_socket()),
        "kill -9 should leave the socket file behind"
    );
    env.assert_mounted_once("v");
    env.start(&[]);

    let vol = env.get_ok("v");
    assert_eq!(vol["Status"]["Mounted"], true, "{vol}");
    assert_eq!(vol["Status"]["ActiveMounts"], 2, "{vol}");
    assert_eq!(vol["Mountpoint"], s(&mp), "{vol}");
    env.mount_ok("v", &id(3));
    env.assert_mounted_once("v");
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp).join("kept.txt")).unwrap(),
        "kept"
    );
    env.unmount_ok("v", &id(1));
    env.unmount_ok("v", &id(2));
    env.assert_mounted_once("v");
    env.unmount_ok("v", &id(3));
    assert_eq!(env.get_ok("v")["Status"]["Mounted"], false);
    env.assert_not_mounted("v");
}

#[test]
fn restart_after_a_reboot_voids_old_mount_records() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let mp = env.mount_ok("v", &id(1));
    env.mount_ok("v", &id(2));
    // A new mount ID's record is one use at once; its details (BootId) follow the answer.
    let active = env.volume_dir("v").join("activemounts");
    let detailed = || {
        names(&active)
            .iter()
            .all(|n| !std::fs::read(active.join(n)).unwrap().is_empty())
    };
    wait_until(Duration::from_secs(10), "the records' details", detailed);
    env.kill9();

    // The reboot: the overlay is gone and the records name another boot.
    env.anchor.run(&["umount", s(&mp)]);
    env.assert_not_mounted("v");
    for name in names(&active) {
        let path = active.join(&name);
        let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(
            record.get("BootId").is_some(),
            "record without BootId: {record}"
        );
        record["BootId"] = json!("00000000-0000-4000-8000-000000000000");
        std::fs::write(&path, record.to_string()).unwrap();
    }
    env.start(&[]);

    let vol = env.get_ok("v");
    assert_eq!(vol["Status"]["Mounted"], false, "{vol}");
    assert_eq!(vol["Status"]["ActiveMounts"], 0, "{vol}");
    assert!(has_no_mountpoint(&vol), "{vol}");
    assert_eq!(env.path("v"), Ok(None));
    env.mount_ok("v", &id(3));
    env.assert_mounted_once("v");
    assert_eq!(names(&active), vec![id(3)]);
    assert_eq!(env.get_ok("v")["Status"]["ActiveMounts"], 1);
    env.unmount("v", &id(1))
        .expect_err("Unmount of a mount ID from before the reboot");
    env.assert_mounted_once("v");
    env.unmount_ok("v", &id(3));
    env.assert_not_mounted("v");
}

// ----- 9b. dockerd restarts ---------------------------------------------------------------

/// Mounts from a short-lived client process (a dockerd that then dies) and returns its pid.
fn mount_from_a_client_that_exits(env: &Env, name: &str, mount_id: &str) -> u32 {
    const CLIENT: &str = r#"
import socket, sys
body = sys.argv[2].encode()
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"POST /VolumeDriver.Mount HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n"
          + b"Content-Length: %d\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
          % len(body) + b"Connection: close\r\n\r\n" + body)
reply = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    reply += data
sys.stdout.write(reply.decode())
"#;
    let body = json!({ "Name": name, "ID": mount_id }).to_string() + "\n";
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", CLIENT, s(&env.socket), &body]);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run python3 (needed as a short-lived client)");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("HTTP/1.1 200"),
        "Mount from the client failed: {}\n{text}",
        out.status
    );
    pid
}

#[test]
fn mounts_of_a_client_that_died_are_released_unless_held() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let active = env.volume_dir("v").join("activemounts");

    // dockerd mounts, then dies (or restarts) and never sends the Unmount.
    mount_from_a_client_that_exits(&env, "v", &id(1));
    env.assert_mounted_once("v");
    assert_eq!(env.get_ok("v")["Status"]["ActiveMounts"], 1);
    // The next dockerd's Mount releases the dead one's; its last Unmount unmounts.
    env.mount_ok("v", &id(2));
    env.assert_mounted_once("v");
    assert_eq!(
        names(&active),
        vec![id(2)],
        "the dead client's mount was kept"
    );
    env.unmount_ok("v", &id(2));
    env.assert_not_mounted("v");

    // With live-restore a container outlives dockerd: its copy of the overlay keeps them.
    let mp = env.mount_ok("v", &id(3));
    env.unmount_ok("v", &id(3));
    mount_from_a_client_that_exits(&env, "v", &id(4));
    let (mut holder, _) = env.holder_in_new_namespace("a container");
    env.mount_ok("v", &id(5));
    assert_eq!(
        names(&active),
        vec![id(4), id(5)],
        "a held mount was released"
    );
    env.unmount_ok("v", &id(5));
    env.assert_mounted_once("v");
    assert_eq!(env.path("v"), Ok(Some(s(&mp).to_owned())));
    holder.kill();
    env.mount_ok("v", &id(6));
    assert_eq!(names(&active), vec![id(6)]);
    env.unmount_ok("v", &id(6));
    env.assert_not_mounted("v");
}

// ----- 10. Held in another mount namespace -----------------------------------------------

#[test]
fn volume_held_in_another_namespace_is_neither_removed_nor_mounted_again() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let mp = env.mount_ok("v", &id(1));
    std::fs::write(env.seen(&mp).join("data.txt"), "data").unwrap();

    // A process in a new mount namespace copied from the daemon's: it holds a copy of the
    // overlay, as a container of another engine would.
    let (mut holder, hpid) = env.holder_in_new_namespace("the holder");
    let held = std::fs::read_to_string(format!("/proc/{hpid}/mountinfo")).unwrap();
    assert!(
        common::daemon::parse_mountinfo(held.as_bytes())
            .iter()
            .any(|m| m.mount_point == mp && m.fstype == "overlay"),
        "the holder has no copy of the overlay"
    );

    env.unmount_ok("v", &id(1));
    env.assert_not_mounted("v");

    let err = env
        .remove("v")
        .expect_err("Remove while another namespace holds the overlay");
    assert_contains(&err, &[&format!("pid {hpid}")]);
    assert!(
        env.volume_dir("v").join("metadata.json").exists(),
        "volume dir damaged"
    );
    assert_eq!(
        std::fs::read_to_string(env.upper("v").join("data.txt")).unwrap(),
        "data"
    );
    assert_eq!(env.list(), vec!["v"]);

    let err = env
        .mount("v", &id(2))
        .expect_err("Mount while another namespace holds the overlay");
    assert_contains(&err, &[&format!("pid {hpid}")]);
    env.assert_not_mounted("v");
    assert_eq!(env.get_ok("v")["Status"]["Mounted"], false);

    holder.kill();
    env.remove("v").unwrap();
    assert!(!env.volume_dir("v").exists());
    assert_eq!(env.list(), Vec::<String>::new());
}

/// A sized volatile volume keeps its image attached while a copy of its overlay lives on:
/// the mark that a look is due is on the image's file system, and a second loop device on the
/// image would mount that file system twice, beside the copy's.
#[test]
fn a_held_volatile_sized_volume_is_neither_mounted_again_nor_removed() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_sized_ok("v", &base, true, "16Mi");
    let mp = env.mount_ok("v", &id(1));
    std::fs::write(env.seen(&mp).join("data.txt"), "data").unwrap();
    let (mut holder, hpid) = env.holder_in_new_namespace("the holder");
    env.unmount_ok("v", &id(1));
    env.assert_not_mounted("v");
    let devices = env.loop_devices();
    assert_eq!(devices.len(), 1, "{devices:?}");

    for (what, refused) in [
        ("Mount", env.mount("v", &id(2)).map(|_| ())),
        ("Remove", env.remove("v")),
    ] {
        let err = refused.expect_err(&format!("{what} while a copy holds the volume"));
        assert_contains(&err, &[&format!("pid {hpid}")]);
        assert_eq!(
            env.loop_devices(),
            devices,
            "{what} attached the image again"
        );
    }
    env.assert_not_mounted("v");
    assert_eq!(
        std::fs::read_to_string(env.upper("v").join("data.txt")).unwrap(),
        "data",
        "held changes discarded"
    );

    holder.kill();
    let mp = env.mount_ok("v", &id(2));
    assert!(!env.seen(&mp).join("data.txt").exists(), "not discarded");
    env.unmount_ok("v", &id(2));
    env.remove("v").unwrap();
    wait_until(Duration::from_secs(10), "the loop device to go", || {
        env.loop_devices().is_empty()
    });
}

/// The Go version mounted with `upperdir=ROOT/NAME/upper/` (a trailing slash), as the mount
/// table still shows: its overlay left mounted with no record (a last Unmount that met a busy
/// mountpoint), and a copy of it held in another namespace, is found as ours are.
#[test]
fn a_go_made_overlay_held_in_another_namespace_is_found() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    for (name, volatile) in [("gv", true), ("gp", false)] {
        let dir = env.volume_dir(name);
        for sub in ["upper", "workdir", "mountpoint", "activemounts"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("metadata.json"),
            json!({ "BaseDirPath": base, "Volatile": volatile }).to_string(),
        )
        .unwrap();
        let options = format!(
            "lowerdir={},upperdir={}/upper/,workdir={}/workdir/",
            s(&base),
            s(&dir),
            s(&dir)
        );
        env.anchor.run(&[
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            &options,
            s(&dir.join("mountpoint")),
        ]);
        std::fs::write(env.seen(&dir.join("mountpoint")).join("work.txt"), "work").unwrap();
    }
    let (mut holder, hpid) = env.holder_in_new_namespace("the holder");

    let err = env
        .mount("gv", &id(1))
        .expect_err("Mount of a held volatile volume");
    assert_contains(&err, &[&format!("pid {hpid}")]);
    let err = env.remove("gp").expect_err("Remove of a held volume");
    assert_contains(&err, &[&format!("pid {hpid}")]);
    for name in ["gv", "gp"] {
        assert_eq!(
            std::fs::read_to_string(env.upper(name).join("work.txt")).unwrap(),
            "work",
            "{name}'s held changes are gone"
        );
    }

    holder.kill();
    env.mount_ok("gv", &id(1));
    assert!(!env.upper("gv").join("work.txt").exists(), "not discarded");
    env.unmount_ok("gv", &id(1));
    env.remove("gp").unwrap();
}

// ----- 11. Busy mountpoint ---------------------------------------------------------------

/// A process that sits in `dir` (its cwd) inside the namespace, keeping it busy.
fn busy_in(env: &Env, dir: &Path) -> Proc {
    let mut busy = env.spawn_in_ns(
        &["sh", "-c", "cd \"$1\" && exec sleep 1000", "sh", s(dir)],
        "a process inside the mountpoint",
    );
    let bpid = busy.pid();
    wait_until(Duration::from_secs(10), "the busy process", || {
        assert!(busy.try_status().is_none(), "the busy process exited");
        comm(bpid) == "sleep"
    });
    assert_eq!(
        std::fs::read_link(format!("/proc/{bpid}/cwd")).unwrap(),
        dir
    );
    busy
}

/// The mount ID (first field of mountinfo) of the one overlay on `name`'s mountpoint.
fn overlay_mount_id(env: &Env, name: &str) -> String {
    env.assert_mounted_once(name);
    let line = env.overlays_at(&env.mountpoint(name))[0].line.clone();
    line.split(' ').next().unwrap().to_owned()
}

/// Files written into a volume's bare mountpoint directory (by a container given it while no
/// overlay was mounted there) are not lost: the next Mount warns where they are, and they are
/// there again once the volume is unmounted.
#[test]
fn files_in_a_bare_mountpoint_are_reported_and_kept() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let mp = env.mount_ok("v", &id(1));
    env.unmount_ok("v", &id(1));
    env.assert_not_mounted("v");
    std::fs::write(env.seen(&mp).join("stray.txt"), "stray").unwrap();
    let warning = "volume v: files were written into";
    assert!(!env.logs().contains(warning), "warned too early");

    env.mount_ok("v", &id(2));
    assert!(
        !env.seen(&mp).join("stray.txt").exists(),
        "not under the overlay"
    );
    let logs = env.logs();
    assert!(
        logs.lines().any(|l| l.contains(warning)
            && l.contains(&format!("{:?}", env.mountpoint("v")))
            && l.contains("hidden while the volume is mounted")),
        "no warning about the stray file:\n{logs}"
    );
    env.unmount_ok("v", &id(2));
    assert_eq!(
        std::fs::read_to_string(env.seen(&mp).join("stray.txt")).unwrap(),
        "stray"
    );
}

/// The last Unmount of a busy mountpoint answers OK (its mount is released, and dockerd would
/// never repeat it): the record goes, the overlay stays mounted, the log says
/// why. The next Mount of a persistent volume reuses that overlay; a volatile one's is refused
/// while busy and discards the changes once it is free.
#[test]
fn busy_last_unmount_leaves_the_overlay_mounted_and_recovers() {
    let mut env = Env::new();
    env.start(&[]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    env.create_ok("t", &base, true);
    let mp = env.mount_ok("v", &id(1));
    let mp_t = env.mount_ok("t", &id(1));
    std::fs::write(env.seen(&mp_t).join("scratch.txt"), "scratch").unwrap();
    let mut busy = busy_in(&env, &mp);
    let mut busy_t = busy_in(&env, &mp_t);

    let mounted_at = overlay_mount_id(&env, "v");
    for name in ["v", "t"] {
        env.unmount_ok(name, &id(1));
        // The unmount before the answer failed, busy: still mounted, nobody on record.
        let vol = env.get_ok(name);
        assert_eq!(vol["Status"]["Mounted"], true, "{vol}");
        assert_eq!(vol["Status"]["ActiveMounts"], 0, "{vol}");
        env.assert_mounted_once(name);
        assert_eq!(
            names(&env.volume_dir(name).join("activemounts")),
            Vec::<String>::new(),
            "the record of the last Unmount is left"
        );
        let logs = env.logs();
        assert!(
            logs.lines().any(|l| l.contains(&format!(
                "volume {name} stays mounted after its last Unmount"
            )) && l.contains("busy")),
            "no warning about the busy mountpoint of {name}:\n{logs}"
        );
    }

    // Persistent: the next Mount uses the overlay as it is, busy or not.
    assert_eq!(env.mount_ok("v", &id(2)), mp);
    assert_eq!(overlay_mount_id(&env, "v"), mounted_at, "mounted again");
    assert_eq!(env.get_ok("v")["Status"]["ActiveMounts"], 1);
    busy.kill();
    env.unmount_ok("v", &id(2));
    env.assert_not_mounted("v");

    // Volatile: refused while busy (its changes cannot be discarded), the changes kept.
    let err = env
        .mount("t", &id(2))
        .expect_err("Mount of a volatile volume left mounted and busy");
    assert_contains(&err, &["t", "busy"]);
    env.assert_mounted_once("t");
    assert!(env.upper("t").join("scratch.txt").exists());
    busy_t.kill();
    env.mount_ok("t", &id(2));
    env.assert_mounted_once("t");
    assert_eq!(names(&env.seen(&mp_t)), vec!["base.txt", "other.txt"]);
    env.unmount_ok("t", &id(2));
    env.assert_not_mounted("t");

    for name in ["v", "t"] {
        env.remove(name).unwrap();
        assert!(!env.volume_dir(name).exists());
    }
    assert!(
        env.mounts_under(&env.root).is_empty(),
        "mounts left under the root"
    );
}

// ----- 12. The process -------------------------------------------------------------------

#[test]
fn sigterm_exits_cleanly_and_a_second_daemon_is_refused() {
    let mut env = Env::new();
    env.start(&[]);
    let mode = std::fs::symlink_metadata(&env.socket).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o660, "socket mode {mode:o}");

    // A second daemon on the live socket fails and leaves the socket alone.
    let (cmd, log) = env.daemon_command(&[]);
    let mut second = Proc::spawn(cmd, "a second daemon");
    let status = second
        .wait_timeout(Duration::from_secs(15))
        .expect("a second daemon on a live socket kept running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success(),
        "a second daemon exited with success:\n{text}"
    );
    assert!(
        text.contains(s(&env.socket))
            && (text.contains("already") || text.to_lowercase().contains("in use")),
        "no clear message from the second daemon:\n{text}"
    );
    assert!(env.socket.exists(), "the second daemon removed the socket");
    assert_eq!(env.list(), Vec::<String>::new());

    // An idle kept-alive connection (dockerd's) must not hold up the exit.
    let mut conn = Conn::open(&env.socket).unwrap();
    conn.request("POST", "/Plugin.Activate", Some(b""))
        .outcome()
        .unwrap();
    let status = env.terminate(Duration::from_secs(8));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\n{}",
        env.logs()
    );
    assert!(
        !env.socket.exists(),
        "the socket file is still there after SIGTERM"
    );
    drop(conn);
}

/// Whether `/proc/locks` shows `pid` waiting for an flock on the file with inode `ino`.
fn waits_for_flock(pid: u32, ino: u64) -> bool {
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.contains("->"))
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.contains(&pid.to_string().as_str())
                && f.iter().any(|x| {
                    x.rsplit(':')
                        .next()
                        .and_then(|i| i.parse::<u64>().ok())
                        .is_some_and(|i| i == ino && x.contains(':'))
                })
        })
}

/// Starts a daemon with a volume `v` whose lock the test then holds, so that a Mount stays in
/// flight inside the daemon: the lock's file, its inode (for [`waits_for_flock`]) and the
/// daemon, taken out of `env`.
fn daemon_with_v_locked(env: &mut Env) -> (std::fs::File, u64, Proc) {
    env.start(&[]);
    let base = make_base(env, "base");
    env.create_ok("v", &base, false);
    let vol_dir = std::fs::File::open(env.volume_dir("v")).unwrap();
    vol_dir.lock().unwrap();
    let ino = vol_dir.metadata().unwrap().ino();
    (vol_dir, ino, env.daemon.take().unwrap())
}

/// Once the daemon's Mount waits for the lock of [`daemon_with_v_locked`], a SIGTERM, and
/// 300 ms for the daemon to take it.
fn term_once_the_mount_waits(daemon: &Proc, ino: u64) {
    wait_until(
        Duration::from_secs(10),
        "the Mount to wait for the lock",
        || waits_for_flock(daemon.pid(), ino),
    );
    daemon.signal(rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn sigterm_finishes_the_request_in_flight() {
    let mut env = Env::new();
    let (vol_dir, ino, mut daemon) = daemon_with_v_locked(&mut env);
    let (mount, status) = std::thread::scope(|scope| {
        let mount = scope.spawn(|| env.mount("v", &id(1)));
        term_once_the_mount_waits(&daemon, ino);
        assert!(
            daemon.try_status().is_none(),
            "the daemon exited with a request in flight"
        );
        drop(vol_dir);
        let status = daemon.wait_timeout(Duration::from_secs(10));
        (mount.join().unwrap(), status)
    });
    assert_eq!(
        mount.as_deref(),
        Ok(s(&env.mountpoint("v"))),
        "the Mount in flight at SIGTERM"
    );
    let status = status.expect("the daemon did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!env.socket.exists(), "the socket file is still there");
    // Stopping the plugin never pulls a volume from under its users.
    env.assert_mounted_once("v");
}

/// A stop waits for a client still sending its request (up to the body timeout), but a second
/// signal ends the wait: Ctrl-C twice, or `systemctl kill` after a stop, needs no SIGKILL.
#[test]
fn a_second_signal_stops_without_waiting_for_slow_clients() {
    use std::io::Write;
    let mut env = Env::new();
    env.start(&[]);
    let mut slow = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    slow.write_all(
        b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: 100\r\n\r\n{\"Na",
    )
    .unwrap();
    let mut daemon = env.daemon.take().unwrap();
    // The body has begun: the request is the daemon's once its head is read.
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.try_status().is_none(),
        "the first signal did not wait for the request being sent"
    );
    let second = Instant::now();
    daemon.signal(rustix::process::Signal::INT);
    let status = daemon
        .wait_timeout(Duration::from_secs(5))
        .expect("the daemon did not exit after a second signal");
    assert!(second.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status}");
    let logs = env.logs();
    assert!(
        logs.contains("signalled again: stopping without waiting for 1 open connection\n"),
        "{logs}"
    );
    assert!(!env.socket.exists(), "the socket file is still there");
}

/// After a second signal, a call still running on the driver (a Mount waiting for the volume's
/// lock) gets 10 s and is then cut short, as a crash would cut it, and said so; the next start
/// serves the volume as usual.
#[test]
fn a_second_signal_cuts_driver_calls_short_after_10_s() {
    let mut env = Env::new();
    let (vol_dir, ino, mut daemon) = daemon_with_v_locked(&mut env);
    let (mount, status, after_second) = std::thread::scope(|scope| {
        // Raw: the answer never comes, the connection just closes.
        let mount = scope.spawn(|| {
            use std::io::{Read, Write};
            let body = dockerd_body(Some(&json!({ "Name": "v", "ID": id(1) })));
            let mut c = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
            write!(
                c,
                "POST /VolumeDriver.Mount HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .unwrap();
            c.write_all(&body).unwrap();
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer);
            answer
        });
        term_once_the_mount_waits(&daemon, ino);
        let second = Instant::now();
        daemon.signal(rustix::process::Signal::TERM);
        let status = daemon.wait_timeout(Duration::from_secs(20));
        (mount.join().unwrap(), status, second.elapsed())
    });
    let status = status.expect("the daemon did not exit after a second signal");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(after_second >= Duration::from_secs(9), "{after_second:?}");
    assert_eq!(mount, "", "the cut Mount answered");
    let logs = env.logs();
    assert!(
        logs.contains("calls on the driver still running after 10s were cut short"),
        "{logs}"
    );
    drop(vol_dir);
    env.start(&[]);
    env.mount_ok("v", &id(2));
    env.unmount_ok("v", &id(2));
    env.assert_not_mounted("v");
}

#[test]
fn idle_timeout_exits_by_itself() {
    let mut env = Env::new();
    env.start(&["--idle-timeout", "1s"]);
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let last = Instant::now();
    let status = env
        .daemon()
        .wait_timeout(Duration::from_secs(15))
        .expect("the daemon did not exit after being idle");
    assert!(
        last.elapsed() >= Duration::from_millis(800),
        "exited {:?} after the last request",
        last.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{status}\n{}", env.logs());
    env.daemon = None;
    assert!(
        !env.socket.exists(),
        "the socket file is still there after the idle exit"
    );
}

#[test]
fn socket_activation_serves_fd_3_and_leaves_the_socket() {
    let env = Env::new();
    let socket = env.dir.join("activated.sock");
    let ignored = env.dir.join("ignored.sock");
    let log = env.dir.join("activated.log");
    let root = s(&env.root).to_owned();
    let mut cmd = env.anchor.command(&[
        "systemd-socket-activate",
        "-l",
        s(&socket),
        "-E",
        "RUST_LOG=debug",
        BIN,
        "--root",
        &root,
        "--socket",
        s(&ignored),
        "--idle-timeout",
        "1s",
    ]);
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    let mut daemon = Proc::spawn(cmd, "systemd-socket-activate");
    let pid = daemon.pid();
    // The socket's file appears at its bind, before it listens: until then a connection is
    // refused.
    let mut first = None;
    wait_until(Duration::from_secs(10), "the activation socket", || {
        assert!(
            daemon.try_status().is_none(),
            "systemd-socket-activate exited"
        );
        first = Conn::open(&socket).ok();
        first.is_some()
    });
    let empty = dockerd_body(None);
    // The first connection starts the daemon; its request waits in the queue.
    let r = first
        .unwrap()
        .request("POST", "/Plugin.Activate", Some(&empty));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(r.status, 200, "{}", text());
    assert_eq!(r.json(), json!({ "Implements": ["VolumeDriver"] }));
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        std::fs::canonicalize(BIN).unwrap()
    );
    let base = make_base(&env, "base");
    let call = |endpoint: &str, args: Value| common::daemon::call(&socket, endpoint, Some(&args));
    call(
        "/VolumeDriver.Create",
        json!({ "Name": "v", "Opts": { "base": s(&base) } }),
    )
    .unwrap();
    let mounted = call("/VolumeDriver.Mount", json!({ "Name": "v", "ID": id(1) })).unwrap();
    assert_eq!(mounted["Mountpoint"], s(&env.mountpoint("v")));
    env.assert_mounted_once("v");
    call("/VolumeDriver.Unmount", json!({ "Name": "v", "ID": id(1) })).unwrap();
    // Unmounted when the last Unmount answers: the kernel first, then Get agrees.
    env.assert_not_mounted("v");
    let vol = call("/VolumeDriver.Get", json!({ "Name": "v" })).unwrap();
    assert_eq!(vol["Volume"]["Status"]["Mounted"], false, "{vol}");

    let status = daemon
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the activated daemon did not exit when idle:\n{}", text()));
    assert_eq!(status.code(), Some(0), "{status}\n{}", text());
    assert!(
        std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
        "the activated daemon removed systemd's socket:\n{}",
        text()
    );
    assert!(
        !ignored.exists(),
        "--socket was created despite socket activation"
    );
}

/// Sockets passed to another process (LISTEN_PID names a wrapper that forked the plugin
/// instead of exec-ing it) are not the plugin's: it says so, and binds `--socket` itself.
#[test]
fn sockets_passed_to_another_process_are_named_and_left_alone() {
    let mut env = Env::new();
    env.start_adjusted(&[], |cmd| {
        cmd.env("LISTEN_PID", "1").env("LISTEN_FDS", "1");
    });
    let r = request(
        &env.socket,
        "POST",
        "/Plugin.Activate",
        Some(&dockerd_body(None)),
    );
    assert_eq!(r.status, 200);
    let logs = env.logs();
    assert!(
        logs.contains("ignoring the 1 socket(s) passed to process 1")
            && logs.contains("a wrapper must exec the plugin"),
        "{logs}"
    );
}

/// A base inside the overlay of one of the plugin's own volumes (reached through
/// `--mount-dir`, as a managed plugin's propagated mount is reached through `/host`) is refused
/// at Create and again at Mount: the overlay made of it would keep the other volume's overlay
/// alive as its lower layer, out of every mount table, and that volume's next Mount would put a
/// second overlay on the same upper.
#[test]
fn a_base_inside_a_volumes_overlay_is_refused_at_create_and_at_mount() {
    let mut env = Env::new();
    let mounts = env.dir.join("mounts");
    env.start(&["--mount-dir", s(&mounts)]);
    let base = make_base(&env, "base");
    env.create_ok("a", &base, false);
    let call =
        |endpoint: &str, args: Value| common::daemon::call(&env.socket, endpoint, Some(&args));
    let mount =
        |name: &str, n: u32| call("/VolumeDriver.Mount", json!({ "Name": name, "ID": id(n) }));
    let unmount = |name: &str, n: u32| {
        call(
            "/VolumeDriver.Unmount",
            json!({ "Name": name, "ID": id(n) }),
        )
        .unwrap();
    };
    let a_mp = mounts.join("a");
    assert_eq!(mount("a", 1).unwrap()["Mountpoint"], s(&a_mp));
    let inside = a_mp.join("sub");
    std::fs::create_dir(env.seen(&inside)).unwrap();
    let upper = env.volume_dir("a").join("upper");
    let refused = |err: String| {
        assert!(
            err.contains("is in a file system this plugin mounted for a volume")
                && err.contains(&format!("{upper:?}")),
            "unclear error {err:?}"
        );
    };
    for dir in [&a_mp, &inside] {
        refused(
            env.create("b", &[("base", s(dir))])
                .expect_err("made a volume of another one"),
        );
        assert!(!env.root.join("b").exists(), "a refused Create left b");
    }

    // Made while a is not mounted (its mountpoint an empty directory), refused once it is.
    unmount("a", 1);
    env.create("b", &[("base", s(&a_mp))]).unwrap();
    mount("a", 2).unwrap();
    refused(mount("b", 3).expect_err("mounted a volume on another one"));
    assert!(
        env.overlays_at(&mounts.join("b")).is_empty(),
        "b is mounted"
    );
    assert!(
        names(&env.root.join("b/activemounts")).is_empty(),
        "a refused Mount left a record"
    );
    unmount("a", 2);
    let b = mount("b", 3).unwrap();
    assert_eq!(b["Mountpoint"], s(&mounts.join("b")));
    unmount("b", 3);
    for name in ["b", "a"] {
        env.remove(name).unwrap();
    }
}
