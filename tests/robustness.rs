//! Hostile and broken input (issue 5, item 4), against the real binary over its real socket:
//!
//! - a property-based fuzz of the requests dockerd could send, and many it never would
//!   (endpoints, methods, path traversal in names and IDs, huge strings, invalid UTF-8, deep
//!   JSON nesting, wrong JSON types): every reply is JSON, every failure an `Err`, the daemon
//!   never dies, and nothing outside its state root is created or mounted; plus the same
//!   decoding and validation in-process with many more cases;
//! - malformed HTTP framing;
//! - slowloris: hundreds of connections trickling a header that never ends do not slow down
//!   real requests and are cut off after the read timeout;
//! - partial headers of hundreds of KiB on a thousand connections, oversized bodies (declared
//!   and chunked), bodies that never end;
//! - thousands of connections at once, idle or busy, with the daemon's descriptor limit at
//!   the systemd default (1024): requests are still answered promptly and memory stays small.
//!
//! Each test runs its own daemon in its own mount namespace (`tests/common/daemon.rs`); the
//! timing tests shorten the read timeout with the hidden `--read-timeout` flag. Figures
//! (latencies, RSS) are printed; run with `--nocapture` to see them. `DOT_FUZZ_CASES` sets the
//! number of fuzz cases over the socket (default 1500; the in-process fuzz runs 20 times as
//! many).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Conn, Env, MountEntry, Response, dockerd_body, request, wait_until};
use docker_on_top::names::{MountId, VolumeName};
use docker_on_top::wire::{self, Call};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// Appears in every hostile path the fuzz builds, so anything it might create outside the
/// state root can be searched for.
const BAIT: &str = "dot-fuzz-bait";

const MIB: u64 = 1024 * 1024;

/// The longest strings the fuzz puts in a request: near the body limit, so that they reach
/// the decoder.
const HUGE: usize = 60_000;

// ----- Helpers -------------------------------------------------------------------------------

/// Held by every test of this file: they measure latencies and memory, and must not compete
/// with each other for the machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read the daemon's status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list the daemon's descriptors: {e}"))
        .count()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Raises this process's soft descriptor limit to its hard limit: the tests open thousands
/// of connections.
fn raise_own_fd_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let new = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, new)
        .expect("cannot raise the test's own descriptor limit");
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    assert!(
        soft.is_none_or(|s| s >= 8192),
        "the test needs at least 8192 descriptors, the hard limit allows {soft:?}"
    );
}

/// Starts the daemon with a soft descriptor limit of 1024 (systemd's default for services)
/// and the hard limit `hard` (`None`: unchanged; systemd's default is 524288).
fn start_with_fd_limit(env: &mut Env, extra: &[&str], hard: Option<u64>) {
    env.start_adjusted(extra, move |cmd| {
        // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                let hard =
                    hard.or(rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum);
                rustix::process::setrlimit(
                    rustix::process::Resource::Nofile,
                    rustix::process::Rlimit {
                        current: Some(1024),
                        maximum: hard,
                    },
                )
                .map_err(std::io::Error::from)
            });
        }
    });
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A base directory `DIR/name` with one file.
fn make_base(env: &Env, name: &str) -> PathBuf {
    let base = env.dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();
    base
}

/// Whether `stream` has been closed by the daemon (EOF or reset), reading whatever reply
/// came first; waits at most `timeout`.
fn closed_by_peer(stream: &UnixStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match (&*stream).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Every path under `dir` whose name contains [`BAIT`], not descending into `skip`.
fn find_bait(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == skip {
            continue;
        }
        if entry.file_name().to_string_lossy().contains(BAIT) {
            out.push(path.clone());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_bait(&path, skip, out);
        }
    }
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ----- (a) Fuzz over the socket ----------------------------------------------------------------

/// Names, IDs and option values an attacker would try.
/// Names, IDs and option values; the longest are `huge` bytes.
fn hostile_string(huge: usize) -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,16}",
        1 => Just("..".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(String::new()),
        1 => Just(format!("../{BAIT}")),
        1 => Just(format!("../../{BAIT}")),
        1 => Just(format!("../../../../../../../../tmp/{BAIT}")),
        1 => Just(format!("/tmp/{BAIT}")),
        1 => Just(format!("/{BAIT}")),
        1 => Just(format!("{BAIT}/../../{BAIT}")),
        1 => Just(format!("{BAIT}\0x")),
        1 => Just(format!("{BAIT}/")),
        1 => Just(format!(" {BAIT}")),
        1 => Just(format!("{BAIT}\n")),
        1 => Just(format!("{BAIT}%2f..%2f{BAIT}")),
        1 => Just(".trash".to_owned()),
        1 => Just(format!(".new-{BAIT}")),
        1 => Just(format!(".{BAIT}")),
        1 => Just(format!("{BAIT}-{}", "x".repeat(255 - BAIT.len() - 1))),
        1 => Just("x".repeat(256)),
        1 => Just("é".repeat(130)),
        2 => "\\PC{0,40}",
        1 => (1usize..huge).prop_map(|n| "n".repeat(n)),
    ]
    .boxed()
}

/// A JSON value of any shape (for fields that should be strings or objects).
fn any_json(huge: usize) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_string(huge).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[A-Za-z]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Request bodies: dockerd-shaped objects with hostile fields, wrong types, raw bytes,
/// deep nesting, odd numbers.
/// Request bodies; the longest strings in them are `huge` bytes (the socket refuses bodies
/// over `MAX_BODY` before decoding them).
fn body_strategy(option_values: Vec<String>, huge: usize) -> BoxedStrategy<Vec<u8>> {
    let option_value = prop_oneof![
        3 => proptest::sample::select(option_values),
        1 => hostile_string(huge),
    ];
    let option_key = prop_oneof![
        4 => proptest::sample::select(vec!["base", "volatile", "o", "type", "device", BAIT])
            .prop_map(str::to_owned),
        1 => hostile_string(huge),
    ];
    let opts = prop::collection::btree_map(option_key, option_value, 0..4);
    let string_or_any = || {
        prop_oneof![
            5 => hostile_string(huge).prop_map(Value::from),
            1 => any_json(huge),
        ]
    };
    let huge_value = move || (huge / 2..huge).prop_map(|n| "h".repeat(n));
    let shaped = (
        string_or_any(),
        string_or_any(),
        prop_oneof![
            4 => opts.prop_map(|m| json!(m)),
            1 => any_json(huge),
            // A huge value where an object belongs, and huge option names and values: none
            // may come back whole in the error.
            1 => huge_value().prop_map(Value::from),
            1 => huge_value().prop_map(|k| json!({ k: "x" })),
            1 => huge_value().prop_map(|v| json!({ "base": v })),
            1 => huge_value().prop_map(|v| json!({ "base": "/", "volatile": v })),
            1 => huge_value().prop_map(|v| json!({ "base": format!("/{v}") })),
        ],
        any::<u8>(),
    )
        .prop_map(|(name, id, opts, fields)| {
            let mut body = serde_json::Map::new();
            if fields & 1 != 0 {
                body.insert("Name".into(), name);
            }
            if fields & 2 != 0 {
                body.insert("ID".into(), id);
            }
            if fields & 4 != 0 {
                body.insert("Opts".into(), opts);
            }
            if fields & 8 != 0 {
                body.insert(BAIT.into(), json!(["extra", 1]));
            }
            serde_json::to_vec(&Value::Object(body)).unwrap()
        });
    let nested = (1usize..huge / 2, 0u8..4).prop_map(|(depth, kind)| match kind {
        0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        1 => format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)),
        2 => format!(
            "{{\"Name\":{}\"v\"{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        _ => "[".repeat(depth),
    });
    prop_oneof![
        6 => shaped,
        1 => any_json(huge).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..600),
        1 => nested.prop_map(String::into_bytes),
        1 => proptest::sample::select(vec![
            &b"{\"Name\":\"\xff\xfe\"}"[..],
            b"{\"Name\":\"v\",\"Name\":\"w\"}",
            b"{\"Name\":\"\\ud800\"}",
            b"1e99999",
            b"-0",
            b"123456789012345678901234567890",
            b"\"just a string\"",
            b"[\"v\", \"id\"]",
            b"{\"Name\":\"v\"} trailing",
            b"\xef\xbb\xbf{\"Name\":\"v\"}",
            b"{\"Name\":\"v\",\"ID\":\"a\",\"Opts\":{\"base\":\"/\"}}",
            b"null",
            b"",
        ])
        .prop_map(<[u8]>::to_vec),
    ]
    .boxed()
}

/// Request targets: the endpoints, near misses and traversal attempts, all valid in an HTTP
/// request line.
fn path_strategy() -> BoxedStrategy<String> {
    prop_oneof![
        8 => proptest::sample::select(wire::ENDPOINTS.to_vec()).prop_map(str::to_owned),
        1 => proptest::sample::select(vec![
            "/".to_owned(),
            "*".to_owned(),
            "//VolumeDriver.Get".to_owned(),
            "/volumedriver.get".to_owned(),
            "/VolumeDriver.Get/".to_owned(),
            "/VolumeDriver.Get?Name=x".to_owned(),
            "/VolumeDriver.Create/../VolumeDriver.Remove".to_owned(),
            format!("/../../../../tmp/{BAIT}"),
            format!("/VolumeDriver.Mount/%2e%2e/%2e%2e/{BAIT}"),
            "/%FF%FE".to_owned(),
            format!("/{}", "a".repeat(8000)),
        ]),
        1 => "/[A-Za-z0-9._~!$&'()*+,;=:@/%-]{0,60}",
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct FuzzRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn request_strategy(option_values: Vec<String>) -> impl Strategy<Value = FuzzRequest> {
    let method = prop_oneof![
        12 => Just("POST".to_owned()),
        1 => proptest::sample::select(vec!["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
            .prop_map(str::to_owned),
    ];
    (method, path_strategy(), body_strategy(option_values, HUGE))
        .prop_map(|(method, path, body)| FuzzRequest { method, path, body })
}

fn fuzz_cases() -> u32 {
    std::env::var("DOT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// Checks one reply: JSON, `Err` for failures, no error with status 200, and not enormous
/// (a hostile value is never echoed back whole).
fn check_reply(r: &Response) -> Result<(), String> {
    let body: Value = serde_json::from_slice(&r.body).map_err(|e| {
        format!(
            "status {}: reply is not JSON ({e}): {:?}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
        )
    })?;
    // The product cuts an error message to `MAX_ERROR_CHARS` characters (plus the marker of
    // the cut); JSON escaping makes a character at most 6 bytes (`\uXXXX`).
    let bound = (wire::Reply::MAX_ERROR_CHARS + 16) * 6;
    if r.body.len() > bound {
        return Err(format!(
            "status {}: a {}-byte reply",
            r.status,
            r.body.len()
        ));
    }
    match (r.status, body.get("Err")) {
        (200, None) => Ok(()),
        (200, Some(e)) => Err(format!("status 200 with an Err: {e}")),
        (_, Some(Value::String(e))) if !e.trim().is_empty() => Ok(()),
        (status, _) => Err(format!("status {status} without an Err message: {body}")),
    }
}

#[test]
fn fuzzed_requests_over_the_socket_get_json_and_touch_nothing_outside_the_root() {
    let _serial = serial();
    let mut env = Env::new();
    env.start(&[]);
    let pid = env.daemon().pid();
    let sentinel = make_base(&env, "sentinel");
    std::fs::create_dir(sentinel.join("sub")).unwrap();
    std::fs::write(sentinel.join("sub/keep"), "keep").unwrap();
    let sentinel_before = common::daemon::tree(&sentinel);
    // A volume that exists, so Mount, Path, Get, Unmount and Remove reach the driver.
    env.create_ok("fuzzvol", &sentinel, false);

    let root = env.root.to_str().unwrap().to_owned();
    let s = sentinel.to_str().unwrap().to_owned();
    let option_values = vec![
        s.clone(),
        format!("{s}/sub"),
        format!("{s}/../{BAIT}"),
        format!("{s}/sub/keep"),
        "/".into(),
        "/etc".into(),
        "/proc/self/root".into(),
        "/dev/null".into(),
        root.clone(),
        format!("{root}/fuzzvol"),
        format!("{root}/../{BAIT}"),
        format!("/tmp/{BAIT}"),
        format!("relative/{BAIT}"),
        String::new(),
        "true".into(),
        "yes".into(),
        "maybe".into(),
        format!("/{}", "d".repeat(5000)),
    ];
    let dir_before = names_in(&env.dir);
    let tmp_before = names_in(Path::new("/tmp"));
    let mounts_before: BTreeSet<PathBuf> = env
        .anchor
        .mountinfo()
        .into_iter()
        .map(|m| m.mount_point)
        .collect();

    let socket = env.socket.clone();
    let statuses = Mutex::new(BTreeMap::<u16, u32>::new());
    let mut runner = TestRunner::new(Config {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request_strategy(option_values), |req| {
        let reply = Conn::open(&socket)
            .map_err(|e| TestCaseError::fail(format!("cannot connect: {e}")))?
            .request(&req.method, &req.path, Some(&req.body));
        *statuses.lock().unwrap().entry(reply.status).or_default() += 1;
        check_reply(&reply).map_err(TestCaseError::fail)?;
        if !alive(pid) {
            return Err(TestCaseError::fail("the daemon died"));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", env.logs());
    }
    assert!(env.daemon().try_status().is_none(), "the daemon exited");
    println!(
        "{} fuzzed requests over the socket; replies by status: {:?}",
        fuzz_cases(),
        statuses.lock().unwrap()
    );

    // Nothing outside the state root: the sentinel base is unchanged, no bait anywhere the
    // traversals could reach, no new entries beside the root, no mounts outside it.
    assert_eq!(
        common::daemon::tree(&sentinel),
        sentinel_before,
        "the base changed"
    );
    let mut bait = Vec::new();
    for dir in [
        env.dir.clone(),
        env.dir.parent().unwrap().to_owned(),
        PathBuf::from("/"),
        PathBuf::from("/tmp"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().contains(BAIT) {
                bait.push(entry.path());
            }
        }
    }
    find_bait(&env.dir, &env.root, &mut bait);
    assert!(bait.is_empty(), "created outside the state root: {bait:?}");
    let new_beside: Vec<String> = names_in(&env.dir)
        .difference(&dir_before)
        .filter(|n| !n.starts_with("daemon-"))
        .cloned()
        .collect();
    assert!(
        new_beside.is_empty(),
        "created beside the state root: {new_beside:?}"
    );
    let new_tmp: Vec<String> = names_in(Path::new("/tmp"))
        .difference(&tmp_before)
        .filter(|n| n.contains(BAIT) || n.contains("fuzz"))
        .cloned()
        .collect();
    assert!(new_tmp.is_empty(), "created in /tmp: {new_tmp:?}");
    let outside: Vec<MountEntry> = env
        .anchor
        .mountinfo()
        .into_iter()
        .filter(|m| !mounts_before.contains(&m.mount_point) && !m.mount_point.starts_with(&root))
        .collect();
    assert!(
        outside.is_empty(),
        "mounted outside the state root: {:#?}",
        outside.iter().map(|m| &m.line).collect::<Vec<_>>()
    );
    // Still serving.
    let info = env.get_ok("fuzzvol");
    assert_eq!(info["Name"], "fuzzvol");
}

// ----- (a) The same decoding and validation in-process, many more cases -----------------------

/// Checks that a decoded call only carries names and IDs that are one safe path component.
fn check_component(what: &str, value: &str) -> Result<(), TestCaseError> {
    let root = Path::new("/state-root");
    let joined = root.join(value);
    let ok = !value.is_empty()
        && value.len() <= 255
        && !value.starts_with('.')
        && value != ".."
        && !value.contains(['/', '\0'])
        && joined.parent() == Some(root)
        && joined.file_name().is_some_and(|n| n == value);
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what} {value:?} was accepted but is not one safe path component"
        )))
    }
}

#[test]
fn fuzzed_decoding_in_process_never_panics_and_only_accepts_safe_names() {
    let _serial = serial();
    let cases = fuzz_cases() * 20;
    let root = tempfile::tempdir().unwrap();
    let option_values = vec![
        root.path().to_str().unwrap().to_owned(),
        "/".into(),
        "/etc".into(),
        format!("/tmp/{BAIT}"),
    ];
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (path_strategy(), body_strategy(option_values, HUGE));
    runner
        .run(&strategy, |(path, body)| {
            match wire::parse(&path, &body) {
                Ok(call) => {
                    prop_assert_eq!(call.endpoint(), path.as_str());
                    if let Some(name) = call.volume() {
                        check_component("volume name", name.as_str())?;
                        prop_assert!(VolumeName::parse(name.as_str()).is_ok());
                    }
                    if let Call::Mount { id, .. } | Call::Unmount { id, .. } = &call {
                        check_component("mount ID", id.as_str())?;
                        prop_assert!(MountId::parse(id.as_str()).is_ok());
                    }
                }
                Err(err) => {
                    let reply = err.reply();
                    prop_assert!(
                        (400..500).contains(&reply.status),
                        "status {} for {err}",
                        reply.status
                    );
                    let message = reply.error_message().unwrap_or_default();
                    prop_assert!(!message.trim().is_empty(), "empty error for {err:?}");
                    prop_assert!(
                        message.len() <= 4096,
                        "a {}-byte error message: {}...",
                        message.len(),
                        &message[..200]
                    );
                    serde_json::to_vec(&reply.body).unwrap();
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{cases} in-process cases of wire::parse");
}

/// Create with fuzzed options, in-process through the real driver: never panics, fails with
/// an options error for anything invalid, and creates nothing outside its root.
#[test]
fn fuzzed_create_options_in_process_stay_inside_the_root() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    let root = dir_path.join("root");
    let base = dir_path.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("f"), "f").unwrap();
    let driver =
        docker_on_top::driver::Driver::with_sys(&root, docker_on_top::sys::RealSys::default())
            .unwrap();
    let b = base.to_str().unwrap().to_owned();
    let r = root.to_str().unwrap().to_owned();
    let values = vec![
        b.clone(),
        format!("{b}/f"),
        format!("{b}/../{BAIT}"),
        format!("{b}/./"),
        r.clone(),
        format!("{r}/{BAIT}"),
        format!("{r}/.."),
        "/".into(),
        format!("/tmp/{BAIT}"),
        format!("{BAIT}"),
        String::new(),
    ];
    let value = prop_oneof![
        4 => proptest::sample::select(values),
        1 => hostile_string(HUGE),
    ];
    let key = prop_oneof![
        4 => proptest::sample::select(vec!["base", "volatile"]).prop_map(str::to_owned),
        1 => hostile_string(HUGE),
    ];
    let strategy = (
        "[a-z][a-z0-9]{0,6}",
        prop::collection::btree_map(key, value, 0..3),
    );
    let cases = fuzz_cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(name, opts)| {
            let name = VolumeName::parse(&name).unwrap();
            let _ = driver.create(&name, &opts);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let beside = names_in(&dir_path);
    assert_eq!(
        beside,
        BTreeSet::from(["base".to_owned(), "root".to_owned()]),
        "created beside the root"
    );
    let mut bait = Vec::new();
    find_bait(&dir_path, &root, &mut bait);
    find_bait(Path::new("/tmp"), &dir_path, &mut bait);
    assert!(bait.is_empty(), "created outside the root: {bait:?}");
    assert_eq!(names_in(&base), BTreeSet::from(["f".to_owned()]));
}

// ----- Malformed HTTP --------------------------------------------------------------------------

/// Sends raw bytes and reads until the daemon closes the connection or `timeout` passes.
fn raw_exchange(socket: &Path, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    let _ = (&stream).write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let _ = (&stream).read_to_end(&mut out);
    out
}

#[test]
fn malformed_http_is_refused_and_the_daemon_lives_on() {
    let _serial = serial();
    let mut env = Env::new();
    env.start(&["--read-timeout", "3s"]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02 hello\r\n\r\n".to_vec()),
        ("no version", b"POST /VolumeDriver.List\r\n\r\n".to_vec()),
        (
            "bad header",
            b"POST /VolumeDriver.List HTTP/1.1\r\nno colon\r\n\r\n".to_vec(),
        ),
        (
            "NUL in header",
            b"POST /VolumeDriver.List HTTP/1.1\r\nHost: a\x00b\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "two Content-Lengths",
            b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
        ),
        (
            "negative Content-Length",
            b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
        ),
        (
            "Content-Length beyond what hyper takes",
            b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"
                .to_vec(),
        ),
        (
            "overflowing Content-Length",
            b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 184467440737095516160\r\n\r\n"
                .to_vec(),
        ),
        (
            "bad chunk size",
            b"POST /VolumeDriver.List HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                .to_vec(),
        ),
        ("200 headers", {
            let mut r = b"POST /VolumeDriver.List HTTP/1.1\r\n".to_vec();
            for i in 0..200 {
                r.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r
        }),
        ("1 MiB header line", {
            let mut r = b"POST /VolumeDriver.List HTTP/1.1\r\nX-Big: ".to_vec();
            r.extend(std::iter::repeat_n(b'a', 1 << 20));
            r.extend_from_slice(b"\r\n\r\n");
            r
        }),
        ("1 MiB request target", {
            let mut r = b"POST /".to_vec();
            r.extend(std::iter::repeat_n(b'a', 1 << 20));
            r.extend_from_slice(b" HTTP/1.1\r\n\r\n");
            r
        }),
    ];
    let pid = env.daemon().pid();
    for (what, bytes) in &cases {
        let started = Instant::now();
        let reply = raw_exchange(&env.socket, bytes, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
        // hyper answers framing errors itself (no request exists to hand to the plugin), with
        // a 4xx status and an empty body, and closes; or just closes.
        assert!(
            reply.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{what}: {text:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert!(alive(pid), "{what}: the daemon died");
        println!(
            "{what}: {}",
            text.lines().next().unwrap_or("(closed without a reply)")
        );
    }
    assert_eq!(env.list(), Vec::<String>::new());
}

// ----- (b) Slowloris ---------------------------------------------------------------------------

const READ_TIMEOUT_SECS: u64 = 3;

#[test]
fn slowloris_neither_delays_real_requests_nor_lingers() {
    let _serial = serial();
    raise_own_fd_limit();
    let mut env = Env::new();
    env.start(&["--read-timeout", &format!("{READ_TIMEOUT_SECS}s")]);
    let pid = env.daemon().pid();
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let fds_before = fd_count(pid);

    // 500 connections, each with a header that never ends, one more byte every 200 ms.
    const STALLED: usize = 500;
    let opened = Instant::now();
    let stalled: Arc<Vec<UnixStream>> = Arc::new(
        (0..STALLED)
            .map(|i| {
                let s = UnixStream::connect(&env.socket)
                    .unwrap_or_else(|e| panic!("stalled connection {i}: {e}"));
                (&s).write_all(b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nX-Slow: ")
                    .unwrap();
                s
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (stalled, stop) = (stalled.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for s in stalled.iter() {
                    s.set_nonblocking(true).unwrap();
                    let _ = (&*s).write(b"a");
                }
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    wait_until(
        Duration::from_secs(10),
        "the stalled connections to be accepted",
        // (Less a few: the start-up probe's connection may still have been open before.)
        || fd_count(pid) + 5 >= fds_before + STALLED,
    );

    // Real requests meanwhile, each on a fresh connection as dockerd makes them: Get, and a
    // Mount/Unmount pair that does real work.
    let mut latencies = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        env.get_ok("v");
        latencies.push(t.elapsed());
        let id = format!("slow{i}");
        let t = Instant::now();
        env.mount_ok("v", &id);
        latencies.push(t.elapsed());
        let t = Instant::now();
        env.unmount_ok("v", &id);
        latencies.push(t.elapsed());
    }
    let in_time = opened.elapsed() < Duration::from_secs(READ_TIMEOUT_SECS);
    let (p50, p99, max) = (
        median(&mut latencies),
        percentile(&mut latencies, 0.99),
        *latencies.iter().max().unwrap(),
    );
    println!(
        "slowloris: with {STALLED} stalled connections open, {} requests: median {}, p99 {}, max {} (all within the read timeout: {in_time})",
        latencies.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
    assert!(
        max < Duration::from_millis(500),
        "a request took {} with {STALLED} stalled connections open",
        ms(max)
    );

    // The stalled connections are closed after the read timeout (and not long before).
    let deadline = opened + Duration::from_secs(READ_TIMEOUT_SECS + 5);
    let mut first_close = None;
    for (i, s) in stalled.iter().enumerate() {
        s.set_nonblocking(false).unwrap();
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_by_peer(s, left),
            "stalled connection {i} still open {:?} after it started (read timeout {READ_TIMEOUT_SECS} s)",
            opened.elapsed()
        );
        first_close.get_or_insert_with(|| opened.elapsed());
    }
    let all_closed = opened.elapsed();
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    println!(
        "slowloris: all {STALLED} stalled connections closed by the daemon {all_closed:.1?} after they opened (read timeout {READ_TIMEOUT_SECS} s)"
    );
    assert!(
        first_close.unwrap() >= Duration::from_secs(READ_TIMEOUT_SECS) - Duration::from_millis(500),
        "a stalled connection was closed after only {:?}",
        first_close.unwrap()
    );
    drop(stalled);
    wait_until(
        Duration::from_secs(5),
        "the daemon's descriptors to return to their number before",
        || fd_count(pid) <= fds_before,
    );
    assert!(alive(pid));
    assert_eq!(env.get_ok("v")["Status"]["Mounted"], false);
}

/// A thousand connections each sending 300 KiB of a header that never ends: what the daemon
/// buffers per connection is bounded, so its memory stays small.
#[test]
fn large_partial_headers_stay_bounded_in_memory() {
    let _serial = serial();
    raise_own_fd_limit();
    let mut env = Env::new();
    env.start(&["--read-timeout", "30s"]);
    let pid = env.daemon().pid();
    let rss_before = status_kib(pid, "VmRSS");
    const CONNS: usize = 1000;
    const HEADER: usize = 300 * 1024;
    let streams: Vec<UnixStream> = thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let socket = env.socket.clone();
                scope.spawn(move || {
                    let mut chunk =
                        b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nX-Big: ".to_vec();
                    chunk.extend(std::iter::repeat_n(b'a', HEADER));
                    (0..CONNS / 8)
                        .map(|_| {
                            let s = UnixStream::connect(&socket).unwrap();
                            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                            // The daemon may refuse the header (431) and close: fine.
                            let _ = (&s).write_all(&chunk);
                            s
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    thread::sleep(Duration::from_millis(500));
    let rss = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    println!(
        "large partial headers: {CONNS} connections x {} KiB: daemon RSS {} (before {}, peak {})",
        HEADER / 1024,
        mib(rss),
        mib(rss_before),
        mib(hwm)
    );
    let t = Instant::now();
    assert_eq!(env.list(), Vec::<String>::new());
    println!("large partial headers: a List took {}", ms(t.elapsed()));
    assert!(
        hwm < 64 * MIB / 1024,
        "the daemon's peak RSS reached {}",
        mib(hwm)
    );
    drop(streams);
    assert!(alive(pid));
}

// ----- (c) Oversized and unending bodies ------------------------------------------------------

#[test]
fn oversized_and_unending_bodies_are_refused_with_json() {
    let _serial = serial();
    let mut env = Env::new();
    env.start(&["--read-timeout", &format!("{READ_TIMEOUT_SECS}s")]);
    let pid = env.daemon().pid();
    let limit = docker_on_top::server::MAX_BODY;

    // Declared too large: refused at once, without waiting for a body that never comes.
    for declared in [limit as u64 + 1, 2 << 30, 1 << 62] {
        let mut conn = Conn::open(&env.socket).unwrap();
        let head = format!(
            "POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin\r\nContent-Length: {declared}\r\n\r\n{{"
        );
        let t = Instant::now();
        conn.send_raw(head.as_bytes());
        let r = conn.receive();
        let err = r.outcome().expect_err("an oversized body was accepted");
        assert_eq!(r.status, 413, "Content-Length {declared}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "Content-Length {declared}: answered after {:?}",
            t.elapsed()
        );
        assert!(err.contains("larger than"), "{err}");
    }

    // Chunked, growing past the limit.
    let mut conn = Conn::open(&env.socket).unwrap();
    conn.send_raw(
        b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent <= limit + chunk.len() {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        if !conn.try_send_raw(&c) {
            break;
        }
        sent += chunk.len();
    }
    let r = conn.receive();
    let err = r
        .outcome()
        .expect_err("an oversized chunked body was accepted");
    assert_eq!(r.status, 413, "{err}");

    // Exactly at the limit: read and decoded (whitespace around a valid body).
    let body = json!({ "Name": "atlimit" }).to_string();
    let mut padded = vec![b' '; limit - body.len()];
    padded.extend_from_slice(body.as_bytes());
    assert_eq!(padded.len(), limit);
    let r = request(&env.socket, "POST", "/VolumeDriver.Get", Some(&padded));
    assert_eq!(r.status, 404, "{:?}", r.outcome());

    // A body shorter than declared, and a chunked body that never ends: cut off with a JSON
    // 408 after the read timeout.
    let t = Instant::now();
    let mut conn = Conn::open(&env.socket).unwrap();
    conn.send_raw(
        b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: 100\r\n\r\n{\"Name\":",
    );
    let r = conn.receive();
    let err = r.outcome().expect_err("a truncated body was accepted");
    assert_eq!(r.status, 408, "{err}");
    let mut conn = Conn::open(&env.socket).unwrap();
    conn.send_raw(
        b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"Na\r\n",
    );
    let r = conn.receive();
    let err = r
        .outcome()
        .expect_err("an unending chunked body was accepted");
    assert_eq!(r.status, 408, "{err}");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2 * READ_TIMEOUT_SECS + 3),
        "cut off after {took:?}"
    );

    // A body trickled a byte at a time: it costs its size, not a read buffer per byte.
    let rss_before = status_kib(pid, "VmRSS");
    let stream = UnixStream::connect(&env.socket).unwrap();
    (&stream)
        .write_all(
            format!(
                "POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: {limit}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let t = Instant::now();
    let mut trickled = 0;
    while t.elapsed() < Duration::from_millis(READ_TIMEOUT_SECS * 1000 - 500)
        && trickled < limit - 1
    {
        if (&stream).write_all(b" ").is_err() {
            break;
        }
        trickled += 1;
        thread::sleep(Duration::from_micros(50));
    }
    let rss = status_kib(pid, "VmRSS");
    println!(
        "bodies: {trickled} bytes of a body sent one at a time: RSS {} (before {})",
        mib(rss),
        mib(rss_before)
    );
    assert!(
        rss < rss_before + 16 * 1024,
        "a {trickled}-byte body sent a byte at a time took the daemon from {} to {}",
        mib(rss_before),
        mib(rss)
    );
    drop(stream);

    // A thousand connections each stalled one byte short of a body at the limit: the daemon
    // holds at most MAX_BODY + MAX_HEAD per connection.
    raise_own_fd_limit();
    const STALLED: usize = 1000;
    let head = format!(
        "POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: {limit}\r\n\r\n"
    );
    let mut almost = head.into_bytes();
    almost.extend(std::iter::repeat_n(b' ', limit - 1));
    let t = Instant::now();
    let stalled: Vec<UnixStream> = thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (socket, almost) = (env.socket.clone(), &almost);
                scope.spawn(move || {
                    (0..STALLED / 8)
                        .map(|_| {
                            let s = UnixStream::connect(&socket).unwrap();
                            (&s).write_all(almost).unwrap();
                            s
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    thread::sleep(Duration::from_millis(300));
    let sent_in = t.elapsed();
    let rss = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    let bound_kib = (STALLED * (limit + docker_on_top::server::MAX_HEAD)) as u64 / 1024;
    println!(
        "bodies: {STALLED} connections stalled one byte short of a {} KiB body (sent in {sent_in:.1?}): RSS {}, peak {} (bound {STALLED} x (MAX_BODY + MAX_HEAD) = {})",
        limit / 1024,
        mib(rss),
        mib(hwm),
        mib(bound_kib)
    );
    assert!(
        sent_in < Duration::from_secs(READ_TIMEOUT_SECS),
        "too slow to measure within the read timeout"
    );
    assert!(
        hwm < bound_kib + 48 * 1024,
        "peak RSS {} with {STALLED} stalled bodies",
        mib(hwm)
    );
    // They are cut off with a 408 after the read timeout.
    for s in &stalled {
        assert!(
            closed_by_peer(s, Duration::from_secs(READ_TIMEOUT_SECS + 5)),
            "a stalled body was not cut off"
        );
    }
    drop(stalled);
    assert!(alive(pid));
    assert_eq!(env.list(), Vec::<String>::new());
}

// ----- (d) Thousands of connections -----------------------------------------------------------

/// systemd's default limits: the daemon raises its soft limit and serves 1024 connections.
#[test]
fn thousands_of_connections_neither_block_nor_bloat_the_daemon() {
    let _serial = serial();
    thousands_of_connections(None);
}

/// A hard limit of 1024: the daemon serves 512 connections and keeps the rest of its
/// descriptors for the driver.
#[test]
fn thousands_of_connections_with_a_hard_limit_of_1024_descriptors() {
    let _serial = serial();
    thousands_of_connections(Some(1024));
}

fn thousands_of_connections(hard_fd_limit: Option<u64>) {
    raise_own_fd_limit();
    let mut env = Env::new();
    // The default read timeout (30 s): the idle connections do not go away during the test.
    start_with_fd_limit(&mut env, &[], hard_fd_limit);
    let pid = env.daemon().pid();
    let base = make_base(&env, "base");
    env.create_ok("v", &base, false);
    let fds_before = fd_count(pid);
    let rss_before = status_kib(pid, "VmRSS");
    const CONNS: usize = 3000;

    // 3000 connections opened at once that send nothing.
    let t = Instant::now();
    let idle: Vec<UnixStream> = (0..CONNS)
        .map(|i| UnixStream::connect(&env.socket).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    println!(
        "connections: {CONNS} idle connections opened in {:.1?}",
        t.elapsed()
    );
    // A real request still gets through promptly, and the driver still has descriptors.
    let t = Instant::now();
    let info = env.get_ok("v");
    let get_latency = t.elapsed();
    assert_eq!(info["Name"], "v");
    let t = Instant::now();
    env.mount_ok("v", "during-idle");
    env.unmount_ok("v", "during-idle");
    let mount_latency = t.elapsed();
    println!(
        "connections (hard limit {hard_fd_limit:?}): with {CONNS} idle connections: Get {}, Mount+Unmount {}; daemon RSS {}, {} descriptors",
        ms(get_latency),
        ms(mount_latency),
        mib(status_kib(pid, "VmRSS")),
        fd_count(pid)
    );
    assert!(
        get_latency < Duration::from_secs(3) && mount_latency < Duration::from_secs(3),
        "requests took {} and {} with {CONNS} idle connections open",
        ms(get_latency),
        ms(mount_latency)
    );
    drop(idle);

    // 3000 connections at once, each with a real request: all answered.
    let t = Instant::now();
    let body = dockerd_body(Some(&json!({ "Name": "v" })));
    let statuses: Vec<u16> = thread::scope(|scope| {
        let workers: Vec<_> = (0..30)
            .map(|_| {
                let socket = env.socket.clone();
                let body = body.clone();
                scope.spawn(move || {
                    // Each sends its request as soon as it is connected, as dockerd does,
                    // and reads the reply only once all are sent.
                    let mut conns: Vec<Conn> = (0..CONNS / 30)
                        .map(|_| {
                            let mut c = Conn::open(&socket).unwrap();
                            c.send("POST", "/VolumeDriver.Get", Some(&body));
                            c
                        })
                        .collect();
                    conns
                        .iter_mut()
                        .map(|c| c.receive().status)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let busy_took = t.elapsed();
    assert_eq!(statuses.len(), CONNS);
    assert!(
        statuses.iter().all(|&s| s == 200),
        "statuses: {:?}",
        statuses
            .iter()
            .fold(BTreeMap::<u16, usize>::new(), |mut m, s| {
                *m.entry(*s).or_default() += 1;
                m
            })
    );
    let hwm = status_kib(pid, "VmHWM");
    println!(
        "connections (hard limit {hard_fd_limit:?}): {CONNS} concurrent Get requests answered in {busy_took:.1?}; daemon RSS before {}, peak {}",
        mib(rss_before),
        mib(hwm)
    );
    assert!(hwm < 64 * MIB / 1024, "peak RSS {}", mib(hwm));
    wait_until(
        Duration::from_secs(10),
        "the daemon's descriptors to return to their number before",
        || fd_count(pid) <= fds_before,
    );
    assert!(alive(pid));
}

/// A stop answers every request it accepted: under socket activation (the test holds the
/// listening socket, as systemd does) requests sent just before a SIGTERM are either answered
/// by the stopping daemon or wait in the socket for the next one. None is dropped unread.
#[test]
fn a_stop_answers_every_request_it_has_accepted() {
    let _serial = serial();
    raise_own_fd_limit();
    let mut env = Env::new();
    let listening = std::os::unix::net::UnixListener::bind(env.dir.join("held.sock")).unwrap();
    let socket = env.dir.join("held.sock");
    let root = env.root.to_str().unwrap().to_owned();
    let start = |env: &mut Env, round: usize| {
        let log = std::fs::File::create(env.dir.join(format!("stop-{round}.log"))).unwrap();
        let mut cmd = env.anchor.command(&[
            "sh",
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
            common::daemon::BIN,
            "--root",
            &root,
        ]);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listening);
        // SAFETY: dup2 is async-signal-safe; the listener outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                let held = std::os::fd::BorrowedFd::borrow_raw(fd);
                let mut three = std::os::fd::OwnedFd::from_raw_fd(3);
                rustix::io::dup2(held, &mut three).map_err(std::io::Error::from)?;
                // Also when the listener was fd 3 already (dup2 then changes nothing).
                rustix::io::fcntl_setfd(&three, rustix::io::FdFlags::empty())
                    .map_err(std::io::Error::from)?;
                std::mem::forget(three);
                Ok(())
            });
        }
        common::daemon::Proc::spawn(cmd, "the socket-activated daemon")
    };
    use std::os::fd::FromRawFd;
    const ROUNDS: usize = 15;
    const CLIENTS: usize = 300;
    let mut lost = Vec::new();
    let mut daemon = start(&mut env, 0);
    for round in 1..=ROUNDS {
        // Serving: one request answered.
        let mut first = Conn::open(&socket).unwrap();
        assert_eq!(
            first
                .request("POST", "/VolumeDriver.List", Some(&dockerd_body(None)))
                .status,
            200
        );
        let mut clients: Vec<UnixStream> = (0..CLIENTS)
            .map(|_| UnixStream::connect(&socket).unwrap())
            .collect();
        for c in &mut clients {
            c.write_all(
                b"POST /VolumeDriver.List HTTP/1.1\r\nHost: plugin\r\nContent-Length: 0\r\n\r\n",
            )
            .unwrap();
        }
        daemon.signal(rustix::process::Signal::TERM);
        let status = daemon
            .wait_timeout(Duration::from_secs(30))
            .expect("the daemon did not stop");
        assert!(status.success(), "round {round}: {status}");
        // The next start serves whatever still waits in the listening socket.
        daemon = start(&mut env, round);
        for (i, c) in clients.iter_mut().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            while !reply.windows(12).any(|w| w == b"{\"Volumes\":[") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                }
            }
            if !reply.starts_with(b"HTTP/1.1 200") {
                lost.push((round, i, String::from_utf8_lossy(&reply).into_owned()));
            }
        }
    }
    daemon.signal(rustix::process::Signal::TERM);
    daemon.wait_timeout(Duration::from_secs(30));
    assert!(
        lost.is_empty(),
        "{} of {} requests sent before a stop got no answer: {:?}",
        lost.len(),
        ROUNDS * CLIENTS,
        &lost[..lost.len().min(5)]
    );
}
