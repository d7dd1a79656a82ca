//! Crash at any step: the real daemon is killed (SIGKILL, from a failpoint compiled in with the
//! `failpoints` feature, see `src/failpoint.rs`) between every pair of durable steps of Create,
//! Mount, Unmount, Remove, the volatile discard, the janitor's deletions and the admin
//! commands `reset` and `commit`; then restarted on the same state root and socket.
//!
//! Each case checks:
//!
//! - the request's connection dropped and the process died of SIGKILL at that very failpoint
//!   (its log says so): a case whose failpoint never fires fails. Every step comes before the
//!   answer, so the interrupted request is never answered;
//! - at every point, at most one overlay is mounted on the volume's mountpoint (never stacked)
//!   and nothing else is mounted there;
//! - after the restart, the volume either works or refuses with an error; `Get` and `Path`
//!   say "mounted" exactly when the kernel has the overlay; the mount counts that count (the
//!   records while the overlay is mounted) are those of before or of after the interrupted
//!   operation, never anything else;
//! - a full cycle works: Create if the volume is gone, Mount two IDs, write through the
//!   mount, Unmount both (and the mounts still on record), Mount again: files written to a
//!   persistent volume before the crash are still there, a volatile volume starts empty again;
//! - once the janitor ran, the state root holds nothing but an empty `.trash` and complete
//!   volume directories (`metadata.json`, `upper`, `workdir`, `mountpoint`, `activemounts`):
//!   no staging `.new-*`, no `.*.tmp-*`, no `.upper-new`.
//!
//! `every_failpoint_in_the_sources_is_exercised` reads the sources and fails when a
//! `failpoint!` has no case here. The janitor is also killed from outside while it deletes a
//! large upper (`sigkill_from_outside_while_the_janitor_deletes_a_large_upper`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use common::daemon::{BIN, Env, Proc, Response, dockerd_body, names, wait_until};
use serde_json::{Value, json};

/// The variable `src/failpoint.rs` reads.
const FAILPOINT_ENV: &str = "DOCKER_ON_TOP_FAILPOINT";
/// The volume every case works on.
const VOL: &str = "v";
/// A file written through the mount before the crash.
const BEFORE: &str = "before.txt";
/// A file written through the mount in the cycle after the restart.
const CYCLE: &str = "cycle.txt";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A mount ID as dockerd makes them: 64 hex digits, from a short tag.
fn id(tag: &str) -> String {
    let mut n: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        n = (n ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{n:064x}")
}

// ----- A client that survives the server dying ------------------------------------------

/// What came back for a request.
#[derive(Debug)]
enum Reply {
    /// A complete HTTP reply: `Ok(body)` or `Err(message)` (checked to be `{"Err": ...}`).
    Answer(Result<Value, String>),
    /// The connection closed without a reply.
    Dropped,
}

/// A plugin call as dockerd makes it (`Connection: close`, so the reply ends at EOF). `Err`
/// when nothing listens on the socket.
fn send(socket: &Path, endpoint: &str, args: Option<&Value>) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = dockerd_body(args);
    let mut data = format!(
        "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n\
         Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    data.extend_from_slice(&body);
    match stream.write_all(&data) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
            return Ok(Reply::Dropped);
        }
        Err(e) => panic!("cannot send {endpoint}: {e}"),
    }
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("cannot read the reply to {endpoint}: {e}"),
    }
    if raw.is_empty() {
        return Ok(Reply::Dropped);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("truncated reply to {endpoint}: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let response = |body| Response {
        status,
        headers: headers.clone(),
        body,
    };
    if response(Vec::new())
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Reply::Answer(response(body).outcome()))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("bad chunk");
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .expect("bad chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// A call that must get an answer.
fn call(env: &Env, endpoint: &str, args: Value) -> Result<Value, String> {
    match send(&env.socket, endpoint, Some(&args)) {
        Ok(Reply::Answer(r)) => r,
        Ok(Reply::Dropped) => panic!("{endpoint} {args}: the connection dropped"),
        Err(e) => panic!("{endpoint} {args}: cannot connect: {e}"),
    }
}

// ----- Forks and open files ----------------------------------------------------------------

/// Taken for writing around every process start, for reading around every use of a file inside
/// an overlay. Between its fork and its exec a child holds copies of all the test process's
/// descriptors: one of a file inside a volume would make that volume's Unmount fail (EBUSY) at
/// random while the tests run in parallel.
static FORKS: RwLock<()> = RwLock::new(());

fn forking<T>(f: impl FnOnce() -> T) -> T {
    let _guard = FORKS.write().unwrap_or_else(PoisonError::into_inner);
    f()
}

fn inside_mount<T>(f: impl FnOnce() -> T) -> T {
    let _guard = FORKS.read().unwrap_or_else(PoisonError::into_inner);
    f()
}

// ----- Crashing ------------------------------------------------------------------------

/// The failpoint's name without its `@N`.
fn point(failpoint: &str) -> &str {
    failpoint.split('@').next().unwrap()
}

/// Starts the daemon with `failpoint` armed; returns once it answers or is already dead (a
/// janitor failpoint may fire before it answers). Returns its log file.
fn start_armed(env: &mut Env, failpoint: &str) -> PathBuf {
    assert!(env.daemon.is_none(), "a daemon is already running");
    let (mut cmd, log) = env.daemon_command(&[]);
    cmd.env(FAILPOINT_ENV, failpoint);
    let mut proc = forking(|| Proc::spawn(cmd, "the daemon (failpoint armed)"));
    let socket = env.socket.clone();
    wait_until(
        Duration::from_secs(15),
        "the armed daemon to answer or die",
        || {
            proc.try_status().is_some()
                || matches!(
                    send(&socket, "/VolumeDriver.Capabilities", None),
                    Ok(Reply::Answer(Ok(_)))
                )
        },
    );
    env.daemon = Some(proc);
    log
}

/// Asserts that `status`, the end of a process armed with `failpoint`, is a SIGKILL that
/// point fired (its output says so).
fn assert_fired(status: ExitStatus, failpoint: &str, output: &str) {
    assert_eq!(
        status.signal(),
        Some(rustix::process::Signal::KILL.as_raw()),
        "the process armed with {failpoint} ended with {status}, not SIGKILL: the failpoint did \
         not fire. Its output:\n{output}"
    );
    let line = format!("failpoint {} fired", point(failpoint));
    assert_eq!(
        output.matches(&line).count(),
        1,
        "the process died of SIGKILL but did not say {line:?}. Its output:\n{output}"
    );
}

/// Waits for the armed daemon to kill itself and checks it was that failpoint.
fn expect_killed(env: &mut Env, failpoint: &str, log: &Path) {
    let mut proc = env.daemon.take().expect("no daemon running");
    let status = proc
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the daemon armed with {failpoint} is still running: the failpoint never fired. \
             Logs:\n{}",
                env.logs()
            )
        });
    assert_fired(
        status,
        failpoint,
        &std::fs::read_to_string(log).unwrap_or_default(),
    );
}

/// Runs an admin command (`docker-on-top --root ROOT ARGS`) in the namespace, armed with
/// `failpoint` (if any); returns its exit status and output.
fn admin(env: &Env, failpoint: Option<&str>, args: &[&str]) -> (ExitStatus, String) {
    let mut all = vec![BIN, "--root", s(&env.root)];
    all.extend_from_slice(args);
    let mut cmd = env.anchor.command(&all);
    if let Some(fp) = failpoint {
        cmd.env(FAILPOINT_ENV, fp);
    }
    let out = forking(|| cmd.output()).unwrap_or_else(|e| panic!("cannot run {all:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

fn admin_killed(env: &Env, failpoint: &str, args: &[&str]) {
    let (status, out) = admin(env, Some(failpoint), args);
    assert_fired(status, failpoint, &out);
}

fn admin_ok(env: &Env, args: &[&str]) -> String {
    let (status, out) = admin(env, None, args);
    assert!(status.success(), "{args:?} failed with {status}: {out}");
    out
}

// ----- What the kernel and the disk say -------------------------------------------------

/// Number of overlays on the volume's mountpoint; panics if anything is stacked there or
/// mounted below it.
fn overlays(env: &Env, name: &str) -> usize {
    let mp = env.mountpoint(name);
    let all = env.mounts_under(&mp);
    let overlays = env.overlays_at(&mp);
    assert!(
        overlays.len() <= 1 && all.len() == overlays.len(),
        "stacked or foreign mounts on {mp:?}: {:#?}",
        all.iter().map(|m| &m.line).collect::<Vec<_>>()
    );
    overlays.len()
}

/// The mount records on disk: ID → UsageCount (temporaries skipped).
fn records(env: &Env, name: &str) -> BTreeMap<String, u64> {
    let dir = env.volume_dir(name).join("activemounts");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap();
            if bytes.is_empty() {
                // A new mount ID's record before its details are written: one use.
                return (e.file_name().to_string_lossy().into_owned(), 1);
            }
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|err| panic!("record {:?} is not JSON: {err}", e.path()));
            let n = v["UsageCount"]
                .as_u64()
                .unwrap_or_else(|| panic!("record {:?} without UsageCount: {v}", e.path()));
            (e.file_name().to_string_lossy().into_owned(), n)
        })
        .collect()
}

/// The counts that mean something: the records while the overlay is mounted, none while it
/// is not (records of an unmounted overlay are void).
fn effective(env: &Env, name: &str) -> BTreeMap<String, u64> {
    if overlays(env, name) == 1 {
        records(env, name)
    } else {
        BTreeMap::new()
    }
}

/// `Get` and `Path` agree with the kernel; `None` when the volume does not exist.
fn check_reports(env: &Env, name: &str) -> Option<bool> {
    let get = call(env, "/VolumeDriver.Get", json!({ "Name": name }));
    let mounted = overlays(env, name) == 1;
    let volume = match get {
        Err(e) => {
            assert!(
                e.contains("does not exist"),
                "Get {name} failed with something else than a missing volume: {e}"
            );
            assert!(
                !env.volume_dir(name).exists(),
                "Get says {name} does not exist, but its directory does: {e}"
            );
            assert!(!mounted, "volume {name} is gone but its overlay is mounted");
            return None;
        }
        Ok(body) => body["Volume"].clone(),
    };
    assert_eq!(
        volume["Status"]["Mounted"],
        json!(mounted),
        "Get says Mounted {} while the kernel has {} overlay(s): {volume}",
        volume["Status"]["Mounted"],
        usize::from(mounted)
    );
    let mountpoint = volume["Mountpoint"].as_str().filter(|m| !m.is_empty());
    assert_eq!(
        mountpoint.is_some(),
        mounted,
        "Get's Mountpoint disagrees with the kernel: {volume}"
    );
    let path = call(env, "/VolumeDriver.Path", json!({ "Name": name }))
        .unwrap_or_else(|e| panic!("Path {name}: {e}"));
    let path = path["Mountpoint"].as_str().filter(|m| !m.is_empty());
    assert_eq!(
        path.is_some(),
        mounted,
        "Path's Mountpoint disagrees with the kernel"
    );
    if mounted {
        let active: u64 = records(env, name).values().sum();
        assert_eq!(volume["Status"]["ActiveMounts"], json!(active), "{volume}");
    }
    Some(mounted)
}

/// What is left in the state root that should not be: every entry that is not an empty
/// `.trash` or a complete volume directory, and anything else in a volume directory.
fn strays(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    for name in names(&env.root) {
        let path = env.root.join(&name);
        if name == ".trash" {
            out.extend(
                names(&path)
                    .into_iter()
                    .map(|n| format!(".trash/{n} (not deleted)")),
            );
            continue;
        }
        if name.starts_with('.') || !path.is_dir() {
            out.push(name);
            continue;
        }
        let entries = names(&path);
        let sized = entries.iter().any(|e| e == "changes");
        let layers: &[&str] = if sized {
            &["changes", "changes.img"]
        } else {
            &["upper", "workdir"]
        };
        for must in ["metadata.json", "mountpoint", "activemounts"]
            .iter()
            .chain(layers)
        {
            if !entries.iter().any(|e| e == must) {
                out.push(format!("{name}/{must} (missing)"));
            }
        }
        for e in entries {
            match e.as_str() {
                "metadata.json" => {}
                e if layers.contains(&e) => {}
                // Seen from outside the namespace: the directory under the overlay.
                "mountpoint" => out.extend(
                    names(&path.join(&e))
                        .into_iter()
                        .map(|n| format!("{name}/mountpoint/{n} (under the mountpoint)")),
                ),
                "activemounts" if overlays(env, &name) == 0 => out.extend(
                    names(&path.join(&e))
                        .into_iter()
                        .map(|n| format!("{name}/activemounts/{n} (while unmounted)")),
                ),
                "activemounts" => out.extend(
                    names(&path.join(&e))
                        .into_iter()
                        .filter(|n| n.starts_with('.'))
                        .map(|n| format!("{name}/activemounts/{n}")),
                ),
                _ => out.push(format!("{name}/{e}")),
            }
        }
    }
    out
}

/// Waits (the janitor works in the background) until the state root holds no strays.
fn assert_no_strays(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = strays(env);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stray files in the state root after the janitor ran: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `file` is visible through the volume's mount (which must be mounted).
fn visible(env: &Env, name: &str, file: &str) -> bool {
    env.seen(&env.mountpoint(name)).join(file).exists()
}

fn write_through(env: &Env, name: &str, file: &str) {
    assert_eq!(
        overlays(env, name),
        1,
        "writing through an unmounted volume"
    );
    let path = env.seen(&env.mountpoint(name)).join(file);
    inside_mount(|| std::fs::write(&path, file))
        .unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
}

// ----- The cases -----------------------------------------------------------------------

/// The volume's state before the crashing operation (reached with a daemon that has no
/// failpoint armed).
#[derive(Debug, Clone, Copy)]
enum Setup {
    /// No such volume.
    Absent,
    /// Created, mounted once to write `before.txt`, unmounted again.
    Idle,
    /// `Idle` (sized volumes), and the image's file system detached, as after a reboot.
    Detached,
    /// Created and mounted with these IDs and counts; `before.txt` written through it.
    Mounted(&'static [(&'static str, u64)]),
    /// Mounted with no mount on record (a last Unmount while the mountpoint was busy),
    /// `before.txt` written.
    StaleOverlay,
    /// `Idle`, and the trash holds two discarded uppers (two `reset`s killed before they
    /// deleted them), one of them `VOL`'s.
    TrashTwo,
    /// No volume, and an abandoned staging directory (a Create killed after its mkdir).
    AbandonedStaging,
}

/// What is done with the failpoint armed.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Mount(&'static str),
    Unmount(&'static str),
    Remove,
    /// Nothing: the janitor's pass at startup crashes.
    Start,
    /// `docker-on-top reset VOL`.
    Reset,
    /// `docker-on-top commit VOL --yes`.
    Commit,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    failpoint: &'static str,
    volatile: bool,
    setup: Setup,
    op: Op,
    /// A sized volume (`-o size=`), its changes in an image of their own.
    sized: bool,
}

const fn case(failpoint: &'static str, volatile: bool, setup: Setup, op: Op) -> Case {
    Case {
        failpoint,
        volatile,
        setup,
        op,
        sized: false,
    }
}

const fn sized(failpoint: &'static str, volatile: bool, setup: Setup, op: Op) -> Case {
    Case {
        sized: true,
        ..case(failpoint, volatile, setup, op)
    }
}

/// The cap of the sized cases' volumes.
const SIZE: &str = "16Mi";

/// Every case: a test each (below), named like the function.
fn case_named(test: &str) -> Case {
    use Op::*;
    use Setup::*;
    const TWO: &[(&str, u64)] = &[("a", 2)];
    const ONE: &[(&str, u64)] = &[("a", 1)];
    const BOTH: &[(&str, u64)] = &[("a", 1), ("b", 1)];
    match test {
        "create_staging_made" => case("create.staging-made", false, Absent, Create),
        "create_upper_installed" => case("create.upper-installed", false, Absent, Create),
        "create_metadata_written" => case("create.metadata-written", true, Absent, Create),
        "create_before_rename" => case("create.before-rename", false, Absent, Create),
        "create_renamed" => case("create.renamed", true, Absent, Create),
        "mount_voided" => case("mount.voided", false, Idle, Mount("a")),
        "mount_voided_volatile" => case("mount.voided", true, Idle, Mount("a")),
        "mount_stale_unmounted_volatile" => {
            case("mount.stale-unmounted", true, StaleOverlay, Mount("b"))
        }
        "mount_overlay_mounted" => case("mount.overlay-mounted", false, Idle, Mount("a")),
        "mount_overlay_mounted_volatile" => case("mount.overlay-mounted", true, Idle, Mount("a")),
        "mount_record_created" => case("store.record-created", false, Idle, Mount("a")),
        "mount_recorded" => case("mount.recorded", false, Idle, Mount("a")),
        "mount_recorded_again" => case("mount.recorded", false, Mounted(ONE), Mount("a")),
        "mount_recorded_volatile" => case("mount.recorded", true, Idle, Mount("a")),
        "discard_upper_trashed" => case("discard.upper-trashed", true, Idle, Mount("a")),
        "discard_upper_staged" => case("store.upper-staged", true, Idle, Mount("a")),
        "discard_fresh_upper" => case("discard.fresh-upper", true, Idle, Mount("a")),
        "unmount_decremented" => case("unmount.decremented", false, Mounted(TWO), Unmount("a")),
        "unmount_record_temp_written" => {
            case("store.temp-written", false, Mounted(TWO), Unmount("a"))
        }
        "unmount_unmounted" => case("unmount.unmounted", false, Mounted(ONE), Unmount("a")),
        "unmount_unmounted_volatile" => case("unmount.unmounted", true, Mounted(ONE), Unmount("a")),
        "unmount_released_last" => case("unmount.released", false, Mounted(ONE), Unmount("a")),
        "unmount_released_not_last" => case("unmount.released", false, Mounted(BOTH), Unmount("a")),
        "remove_unmounted" => case("remove.unmounted", false, Mounted(ONE), Remove),
        "remove_renamed" => case("remove.renamed", false, Idle, Remove),
        "remove_renamed_mounted" => case("remove.renamed", true, Mounted(ONE), Remove),
        "janitor_deleted_between_entries" => case("janitor.deleted@1", false, TrashTwo, Start),
        "janitor_staging_moved" => case("janitor.staging-moved", false, AbandonedStaging, Start),
        "reset_upper_trashed" => case("discard.upper-trashed", false, Idle, Reset),
        "reset_fresh_upper" => case("discard.fresh-upper", false, Idle, Reset),
        "reset_before_delete" => case("reset.before-delete", false, Idle, Reset),
        "commit_between_entries" => case("commit.entry-applied@2", false, Idle, Commit),
        "commit_synced" => case("commit.synced", false, Idle, Commit),
        "sized_create_image_created" => sized("image.created", false, Absent, Create),
        "sized_create_image_formatted" => sized("image.formatted", false, Absent, Create),
        "sized_mount_image_attached" => sized("image.attached", false, Detached, Mount("a")),
        "sized_mount_image_mounted" => sized("image.mounted", false, Detached, Mount("a")),
        "sized_mount_recorded" => sized("mount.recorded", false, Detached, Mount("a")),
        "sized_discard_image_detached" => sized("discard.image-detached", true, Idle, Mount("a")),
        "sized_discard_image_trashed" => sized("discard.upper-trashed", true, Idle, Mount("a")),
        "sized_discard_fresh_image" => sized("discard.fresh-upper", true, Idle, Mount("a")),
        // The fresh image of a swap is made in the volume's own directory: a crash while mkfs
        // runs must not leave an image that no attach can mount.
        "sized_discard_image_created" => sized("image.created", true, Idle, Mount("a")),
        "sized_discard_image_formatted" => sized("image.formatted", true, Idle, Mount("a")),
        "sized_remove_detached" => sized("remove.detached", false, Idle, Remove),
        "sized_remove_renamed" => sized("remove.renamed", false, Idle, Remove),
        "sized_reset_image_trashed" => sized("discard.upper-trashed", false, Idle, Reset),
        other => panic!("no crash case {other}"),
    }
}

macro_rules! crash_tests {
    ($($test:ident)*) => {
        $(
            #[test]
            fn $test() {
                run(case_named(stringify!($test)));
            }
        )*
        const TESTS: &[&str] = &[$(stringify!($test)),*];
    };
}

crash_tests! {
    create_staging_made create_upper_installed
    create_metadata_written create_before_rename create_renamed
    mount_voided mount_voided_volatile mount_stale_unmounted_volatile mount_overlay_mounted
    mount_overlay_mounted_volatile mount_record_created mount_recorded mount_recorded_again
    mount_recorded_volatile
    discard_upper_trashed discard_upper_staged discard_fresh_upper
    unmount_decremented unmount_record_temp_written unmount_unmounted unmount_unmounted_volatile
    unmount_released_last unmount_released_not_last
    remove_unmounted remove_renamed remove_renamed_mounted
    janitor_deleted_between_entries janitor_staging_moved
    reset_upper_trashed reset_fresh_upper reset_before_delete
    commit_between_entries commit_synced
    sized_create_image_created sized_create_image_formatted sized_mount_image_attached
    sized_mount_image_mounted sized_mount_recorded sized_discard_image_detached
    sized_discard_image_trashed sized_discard_fresh_image sized_discard_image_created
    sized_discard_image_formatted sized_remove_detached
    sized_remove_renamed sized_reset_image_trashed
}

/// Files the commit cases have in the volume's changes.
const COMMITTED: [&str; 4] = [BEFORE, "c1.txt", "c2.txt", "c3.txt"];

/// Builds the state of `setup` with an unarmed daemon (left running).
fn set_up(env: &mut Env, case: &Case, base: &Path) {
    forking(|| env.start(&[]));
    let create = |env: &Env| {
        if case.sized {
            env.create_sized_ok(VOL, base, case.volatile, SIZE)
        } else {
            env.create_ok(VOL, base, case.volatile)
        }
    };
    match case.setup {
        Setup::Absent => {}
        Setup::Detached => {
            create(env);
            env.mount_ok(VOL, &id("setup"));
            write_through(env, VOL, BEFORE);
            env.unmount_ok(VOL, &id("setup"));
            // As after a reboot: the image's file system unmounted, its loop device gone.
            let changes = env.volume_dir(VOL).join("changes");
            let status = env
                .anchor
                .command(&["umount", s(&changes)])
                .status()
                .unwrap();
            assert!(status.success(), "cannot detach the image");
            wait_until(Duration::from_secs(10), "the loop device to detach", || {
                env.loop_devices().is_empty()
            });
        }
        Setup::Idle => {
            create(env);
            env.mount_ok(VOL, &id("setup"));
            write_through(env, VOL, BEFORE);
            if matches!(case.op, Op::Commit) {
                for f in &COMMITTED[1..] {
                    write_through(env, VOL, f);
                }
            }
            env.unmount_ok(VOL, &id("setup"));
            // Unmounted for real before the daemon is killed.
        }
        Setup::Mounted(ids) => {
            create(env);
            for (tag, n) in ids {
                for _ in 0..*n {
                    env.mount_ok(VOL, &id(tag));
                }
            }
            write_through(env, VOL, BEFORE);
        }
        Setup::StaleOverlay => {
            create(env);
            env.mount_ok(VOL, &id("a"));
            write_through(env, VOL, BEFORE);
            let mp = env.mountpoint(VOL);
            let mut busy = forking(|| {
                env.spawn_in_ns(
                    &["sh", "-c", &format!("cd '{}' && exec sleep 1000", s(&mp))],
                    "a process in the mountpoint",
                )
            });
            wait_until(Duration::from_secs(10), "the shell to enter", || {
                std::fs::read_link(format!("/proc/{}/cwd", busy.pid())).is_ok_and(|cwd| cwd == mp)
            });
            // Answered OK (the mount is released), but the unmount fails: busy.
            env.unmount_ok(VOL, &id("a"));
            let logs = env.logs();
            assert!(
                logs.lines()
                    .any(|l| l.contains("stays mounted after its last Unmount")
                        && l.contains("busy")),
                "no warning about the busy mountpoint:\n{logs}"
            );
            busy.kill();
            assert_eq!(overlays(env, VOL), 1);
            assert!(records(env, VOL).is_empty());
        }
        Setup::TrashTwo => {
            create(env);
            env.create_ok("w", base, false);
            for name in [VOL, "w"] {
                env.mount_ok(name, &id("setup"));
                write_through(env, name, BEFORE);
                env.unmount_ok(name, &id("setup"));
                // Unmounted for real before the daemon is killed.
                assert_eq!(overlays(env, name), 0);
            }
            // The last Unmount's record and overlayfs' work/ go through the trash.
            let trash = env.root.join(".trash");
            wait_until(Duration::from_secs(10), "the trash to be emptied", || {
                names(&trash).is_empty()
            });
            env.kill9();
            for name in [VOL, "w"] {
                admin_killed(env, "reset.before-delete", &["reset", name]);
            }
            assert_eq!(names(&env.root.join(".trash")).len(), 2);
        }
        Setup::AbandonedStaging => {
            env.kill9();
            let log = start_armed(env, "create.staging-made");
            let reply = send(
                &env.socket,
                "/VolumeDriver.Create",
                Some(&json!({ "Name": VOL, "Opts": { "base": s(base) } })),
            )
            .unwrap();
            assert!(matches!(reply, Reply::Dropped), "{reply:?}");
            expect_killed(env, "create.staging-made", &log);
            let staging: Vec<_> = names(&env.root)
                .into_iter()
                .filter(|n| n.starts_with(".new-"))
                .collect();
            assert_eq!(staging.len(), 1, "{:?}", names(&env.root));
        }
    }
}

/// Mount counts before the operation and after it, had it completed.
fn counts(case: &Case) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let before: BTreeMap<String, u64> = match case.setup {
        Setup::Mounted(ids) => ids.iter().map(|(t, n)| (id(t), *n)).collect(),
        _ => BTreeMap::new(),
    };
    let mut after = before.clone();
    match case.op {
        Op::Mount(tag) => *after.entry(id(tag)).or_default() += 1,
        Op::Unmount(tag) => {
            let n = after.get_mut(&id(tag)).expect("unmount of an unmounted ID");
            *n -= 1;
            if *n == 0 {
                after.remove(&id(tag));
            }
        }
        Op::Remove => after.clear(),
        _ => {}
    }
    (before, after)
}

fn run(case: Case) {
    let mut env = forking(Env::new);
    let base = env.dir.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();
    set_up(&mut env, &case, &base);
    let (before, after) = counts(&case);
    let existed = env.volume_dir(VOL).exists();
    let files_before = existed && !matches!(case.setup, Setup::TrashTwo);
    if existed {
        assert_eq!(effective(&env, VOL), before, "setup");
    }

    // The crash.
    let daemon_op = !matches!(case.op, Op::Reset | Op::Commit);
    if daemon_op {
        if env.daemon.is_some() {
            env.kill9();
        }
        let log = start_armed(&mut env, case.failpoint);
        let request = match case.op {
            Op::Create => Some((
                "/VolumeDriver.Create",
                if case.sized {
                    json!({ "Name": VOL, "Opts": { "base": s(&base), "volatile": case.volatile.to_string(), "size": SIZE } })
                } else {
                    json!({ "Name": VOL, "Opts": { "base": s(&base), "volatile": case.volatile.to_string() } })
                },
            )),
            Op::Mount(tag) => Some(("/VolumeDriver.Mount", json!({ "Name": VOL, "ID": id(tag) }))),
            Op::Unmount(tag) => Some((
                "/VolumeDriver.Unmount",
                json!({ "Name": VOL, "ID": id(tag) }),
            )),
            Op::Remove => Some(("/VolumeDriver.Remove", json!({ "Name": VOL }))),
            Op::Start | Op::Reset | Op::Commit => None,
        };
        if let Some((endpoint, args)) = request {
            let reply = send(&env.socket, endpoint, Some(&args))
                .unwrap_or_else(|e| panic!("cannot reach the armed daemon: {e}"));
            // Every step is done before the answer: the kill always comes first.
            assert!(
                matches!(reply, Reply::Dropped),
                "{endpoint} with {} armed was answered: {reply:?}",
                case.failpoint
            );
        }
        expect_killed(&mut env, case.failpoint, &log);
    } else {
        let args: &[&str] = match case.op {
            Op::Reset => &["reset", VOL],
            _ => &["commit", VOL, "--yes"],
        };
        admin_killed(&env, case.failpoint, args);
        env.kill9();
    }
    overlays(&env, VOL);
    if matches!(case.setup, Setup::TrashTwo) {
        assert_eq!(
            names(&env.root.join(".trash")).len(),
            1,
            "the janitor was to be killed between its two deletions"
        );
    }

    // The restart.
    forking(|| env.start(&[]));
    let exists = check_reports(&env, VOL).is_some();
    match case.op {
        Op::Create => {}
        Op::Remove => {}
        _ => assert_eq!(exists, existed, "the volume appeared or vanished"),
    }
    if exists {
        let now = effective(&env, VOL);
        assert!(
            now == before || now == after,
            "mount counts after the crash are {now:?}: neither those before ({before:?}) nor \
             after ({after:?}) the operation"
        );
        // A sized volume's changes are in its image: seen here only while it is attached,
        // and by the cycle below (which attaches it) in any case.
        let seen = !case.sized
            || !env
                .mounts_under(&env.volume_dir(VOL).join("changes"))
                .is_empty();
        if seen && files_before && !case.volatile && !matches!(case.op, Op::Reset | Op::Commit) {
            assert!(
                env.upper(VOL).join(BEFORE).exists(),
                "{BEFORE}, written before the crash, is lost"
            );
        }
    }
    match case.op {
        // The volume keeps all its changes until the base has them all and is synced.
        Op::Commit => {
            for f in COMMITTED {
                assert!(
                    env.upper(VOL).join(f).exists(),
                    "{f} left the volume before the commit was done"
                );
            }
        }
        // Reset or not: all the changes, or none.
        Op::Reset => {
            let upper = env.upper(VOL);
            let left = if upper.exists() {
                names(&upper)
            } else {
                Vec::new()
            };
            assert!(
                left.is_empty() || left == [BEFORE],
                "a reset cut short left {left:?} of the changes"
            );
        }
        _ => {}
    }
    if matches!(case.op, Op::Commit) {
        // Run again, to the end: the base gets everything, the volume nothing is lost.
        admin_ok(&env, &["commit", VOL, "--yes"]);
        for f in COMMITTED {
            assert_eq!(
                std::fs::read_to_string(base.join(f)).ok().as_deref(),
                Some(f),
                "{f} not committed"
            );
        }
    }

    // The cycle.
    if !exists {
        if case.sized {
            env.create_sized_ok(VOL, &base, case.volatile, SIZE);
        } else {
            env.create_ok(VOL, &base, case.volatile);
        }
    }
    let leftovers = effective(&env, VOL);
    env.mount_ok(VOL, &id("c1"));
    assert_eq!(overlays(&env, VOL), 1);
    env.mount_ok(VOL, &id("c2"));
    assert_eq!(overlays(&env, VOL), 1);
    assert!(visible(&env, VOL, "base.txt"), "the base is not visible");
    let kept = exists && files_before && !case.volatile && !matches!(case.op, Op::Reset);
    if kept {
        assert!(
            visible(&env, VOL, BEFORE),
            "{BEFORE}, written before the crash, is not visible"
        );
    }
    write_through(&env, VOL, CYCLE);
    env.unmount_ok(VOL, &id("c1"));
    assert_eq!(overlays(&env, VOL), 1);
    env.unmount_ok(VOL, &id("c2"));
    assert_eq!(overlays(&env, VOL), usize::from(!leftovers.is_empty()));
    for (left, n) in &leftovers {
        for _ in 0..*n {
            assert_eq!(overlays(&env, VOL), 1);
            env.unmount_ok(VOL, left);
        }
    }
    assert_eq!(overlays(&env, VOL), 0, "mounted after every Unmount");
    check_reports(&env, VOL);
    env.mount_ok(VOL, &id("c3"));
    assert_eq!(overlays(&env, VOL), 1);
    for f in [BEFORE, CYCLE] {
        if case.volatile {
            assert!(
                !visible(&env, VOL, f),
                "{f} of volatile volume still there at the first mount after the last unmount"
            );
        }
    }
    if !case.volatile {
        assert!(visible(&env, VOL, CYCLE), "{CYCLE} is lost");
        if kept {
            assert!(visible(&env, VOL, BEFORE), "{BEFORE} is lost");
        }
    }
    check_reports(&env, VOL);
    env.unmount_ok(VOL, &id("c3"));
    assert_eq!(overlays(&env, VOL), 0);
    if matches!(case.setup, Setup::TrashTwo) {
        env.mount_ok("w", &id("c1"));
        env.unmount_ok("w", &id("c1"));
        assert_eq!(overlays(&env, "w"), 0);
    }
    assert_no_strays(&env);
    assert_eq!(
        env.list(),
        match case.setup {
            Setup::TrashTwo => vec![VOL.to_owned(), "w".to_owned()],
            _ => vec![VOL.to_owned()],
        }
    );
    // No loop device is leaked, whatever the crash: at most the volume's own, attached, and
    // none once it is removed.
    let attached = usize::from(
        !env.mounts_under(&env.volume_dir(VOL).join("changes"))
            .is_empty(),
    );
    assert_eq!(
        env.loop_devices().len(),
        attached,
        "{:?}",
        env.loop_devices()
    );
    if case.sized {
        env.remove(VOL).unwrap();
        wait_until(Duration::from_secs(10), "the loop device to detach", || {
            env.loop_devices().is_empty()
        });
    }
}

// ----- Coverage ------------------------------------------------------------------------

/// Every `failpoint!("...")` in the sources.
fn failpoints_in_sources() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "failpoint.rs")
            {
                let text = std::fs::read_to_string(&path).unwrap();
                let mut rest = text.as_str();
                while let Some(at) = rest.find("failpoint!(\"") {
                    rest = &rest[at + "failpoint!(\"".len()..];
                    let end = rest.find('"').unwrap();
                    out.insert(rest[..end].to_owned());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

#[test]
fn every_failpoint_in_the_sources_is_exercised() {
    let in_sources = failpoints_in_sources();
    assert!(in_sources.len() >= 20, "found only {in_sources:?} in src/");
    let tested: BTreeSet<String> = TESTS
        .iter()
        .map(|t| point(case_named(t).failpoint).to_owned())
        .collect();
    let untested: Vec<_> = in_sources.difference(&tested).collect();
    assert!(
        untested.is_empty(),
        "failpoints without a crash case: {untested:?}"
    );
    let unknown: Vec<_> = tested.difference(&in_sources).collect();
    assert!(
        unknown.is_empty(),
        "crash cases for failpoints that do not exist: {unknown:?}"
    );
}

// ----- The janitor killed from outside --------------------------------------------------

#[test]
fn sigkill_from_outside_while_the_janitor_deletes_a_large_upper() {
    let mut env = forking(Env::new);
    let base = env.dir.join("base");
    std::fs::create_dir(&base).unwrap();
    forking(|| env.start(&[]));
    env.create_ok(VOL, &base, true);
    env.mount_ok(VOL, &id("a"));
    write_through(&env, VOL, BEFORE);
    env.unmount_ok(VOL, &id("a"));
    // Unmounted for real before the upper is written to directly.
    assert_eq!(overlays(&env, VOL), 0);
    // A large volatile upper (what a container left), written directly while unmounted: 50,000
    // hard links of one file (a new inode each would take minutes on a slow disk; deleting a
    // link costs what deleting a file does).
    const DIRS: usize = 200;
    const LINKS: usize = 250;
    let upper = env.upper(VOL);
    let one = upper.join("one");
    std::fs::write(&one, "x").unwrap();
    for d in 0..DIRS {
        let dir = upper.join(format!("d{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..LINKS {
            std::fs::hard_link(&one, dir.join(format!("f{f:03}"))).unwrap();
        }
    }
    // The next Mount discards it: the upper goes into the trash and the janitor deletes it.
    env.mount_ok(VOL, &id("b"));
    let trash = env.root.join(".trash");
    let item = names(&trash)
        .into_iter()
        .next()
        .map(|n| trash.join(n))
        .expect("the discarded upper is not in the trash");
    // Each deleted d* directory lowers the link count of the item by one. Once a few are
    // gone, the daemon is stopped where it is (SIGSTOP, so that the check below sees the
    // deletion half-done whatever the scheduler does), then killed.
    let full = 2 + DIRS as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nlink = std::fs::metadata(&item)
            .unwrap_or_else(|e| panic!("the janitor deleted the upper before the kill: {e}"))
            .nlink();
        if nlink < full - 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the janitor does not delete");
        std::thread::sleep(Duration::from_millis(1));
    }
    env.daemon().signal(rustix::process::Signal::STOP);
    let left = std::fs::metadata(&item)
        .expect("the janitor finished before it was stopped: make the upper larger")
        .nlink();
    assert!(
        left > 2,
        "the janitor was almost done: make the upper larger"
    );
    let status = env.daemon().kill();
    env.daemon = None;
    assert_eq!(status.signal(), Some(9));
    assert_eq!(
        std::fs::metadata(&item).unwrap().nlink(),
        left,
        "deleting after SIGSTOP"
    );
    assert_eq!(overlays(&env, VOL), 1);

    forking(|| env.start(&[]));
    check_reports(&env, VOL);
    assert!(
        !visible(&env, VOL, BEFORE),
        "volatile changes not discarded"
    );
    wait_until(
        Duration::from_secs(30),
        "the restarted janitor to finish the deletion",
        || !item.exists(),
    );
    env.unmount_ok(VOL, &id("b"));
    assert_eq!(overlays(&env, VOL), 0);
    assert_no_strays(&env);
}
