//! `dot-bench`: docker-on-top measured against the kernel's own cost (issues 6 and 14).
//!
//! ```sh
//! sudo cargo bench --bench dot-bench -- --write BENCHMARKS.md
//! ```
//!
//! Runs as root in a private mount namespace of its own (nothing it mounts reaches the host),
//! starts the real `docker-on-top` binary that cargo built for this bench (release settings) on
//! a temporary socket and state root, and measures in one run:
//!
//! - the floor: a bare overlay mount and `umount2` of a small volume, done here in the cheapest
//!   complete way (issue 14): the three layer directories opened `O_PATH`, fsopen, the layers
//!   by fd, index/metacopy/redirect_dir off, fsmount, move_mount; beside it what the plugin
//!   adds to that (the `trusted.*` xattr probe, `source`, the IN_UNMOUNT watch) and legacy
//!   `mount(2)`, each in rows of their own;
//! - a durable small-file write in the state root's directory (write, fsync, rename, fsync of
//!   the directory): the most Create may add to an empty request (issue 14);
//! - every plugin call over the socket, with dockerd's requests (POST, no Content-Type, an empty
//!   body for argument-less calls, one keep-alive connection as Go's HTTP client keeps it), and
//!   the plugin's own part: the call minus an empty round trip (`/Plugin.Activate`); and in how
//!   many cycles the overlay was still mounted when the last Unmount's answer arrived;
//! - the volatile discard: Mount after the last Unmount with 10 to 1,000,000 files in the upper;
//! - 10,000 volumes: process start to first answer, List, Get, Mount of one; cold start under
//!   socket activation (`systemd-socket-activate`);
//! - resident memory (VmRSS, and PSS/private from smaps_rollup) idle, with 10,000 volumes and
//!   under 64 clients; throughput with 1, 8 and 64 clients doing create/mount/unmount/remove;
//! - sized volumes (issue 16): Create, Mount (first), Unmount (last) and Remove of a volume
//!   with `-o size=1Gi` against an unsized one; the volatile remount of a sized volume (a
//!   fresh image swapped in) after 10 small files and after 1 GiB were written into it; a
//!   sequential write of 1 GiB in a sized volume against an unsized one;
//! - the targets of issues 6, 14 and 16, met or missed (issue 14's against the previous
//!   figures in [`PREVIOUS_P50_US`] and [`PREVIOUS_CYCLES_8`]).
//!
//! With `--write FILE` it replaces its own section of FILE (and nothing else). Without the
//! `--bench` flag that `cargo bench` passes it does nothing, so `cargo test --all-targets`
//! stays harmless. Options: `--quick` (a smoke run with small numbers; not with `--write`),
//! `--only requests,discard,throughput,scale,sized` (some phases; prints, never writes),
//! `--dir DIR` (where the temporary root goes; default the temp directory), `--keep`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use docker_on_top::sys::{OverlaySpec, legacy_options};
use rustix::fs::{Mode, OFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};

const BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");
const SECTION: &str = "## Against the kernel's own cost (issue 6)";
const COMMAND: &str = "sudo cargo bench --bench dot-bench -- --write BENCHMARKS.md";

/// The p50s (µs) that issue 14 asks every other request to stay within 10% of: the request
/// phase of this bench on the tree before issue 14, measured on 2026-12-06 at 50b363f on the
/// 2-core machine the issue was measured on (`/work/bench-base-50b363f.txt`).
const PREVIOUS_P50_US: [(&str, f64); 7] = [
    ("/Plugin.Activate (empty round trip)", 24.0),
    ("Get", 47.0),
    ("List (11 volumes)", 38.0),
    ("Path", 29.0),
    ("Mount (already mounted)", 89.0),
    ("Unmount (not last)", 93.0),
    ("Remove", 92.0),
];
/// Cycles/s with 8 clients in BENCHMARKS.md before issue 14 (its "Throughput" section: the
/// full run of 07e968b on 2026-12-01); issue 14 asks for at least 1.2× that.
const PREVIOUS_CYCLES_8: f64 = 578.0;

// ----- Options -----------------------------------------------------------------------------

struct Opts {
    write: Option<PathBuf>,
    dir: PathBuf,
    /// Samples per request kind (and per floor syscall).
    iterations: usize,
    /// Volumes for the scale test.
    volumes: usize,
    /// File counts for the volatile discard.
    files: Vec<usize>,
    /// Seconds per client count in the throughput test.
    seconds: f64,
    /// Process starts measured (plain and socket-activated).
    starts: usize,
    /// Cycles per request kind in the sized comparison (fewer if a cycle is slow).
    sized_iterations: usize,
    /// Samples per case of the volatile remount of a sized volume.
    sized_reps: usize,
    /// Samples per volume of the sequential write of 1 GiB.
    write_reps: usize,
    /// Only these phases (`requests`, `discard`, `throughput`, `scale`, `sized`); for working
    /// on the plugin, never written.
    only: Option<Vec<String>>,
    /// Leave the work directory (logs, state roots) behind.
    keep: bool,
}

fn parse_opts() -> Option<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("dot-bench: not run (no --bench); run it with `{COMMAND}`");
        return None;
    }
    let mut opts = Opts {
        write: None,
        dir: std::env::temp_dir(),
        iterations: 300,
        volumes: 10_000,
        files: vec![10, 10_000, 100_000, 1_000_000],
        seconds: 4.0,
        starts: 10,
        sized_iterations: 100,
        sized_reps: 5,
        write_reps: 5,
        only: None,
        keep: false,
    };
    let mut quick = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--write" => opts.write = Some(it.next().expect("--write FILE").into()),
            "--dir" => opts.dir = it.next().expect("--dir DIR").into(),
            "--quick" => quick = true,
            "--keep" => opts.keep = true,
            "--only" => {
                opts.only = Some(
                    it.next()
                        .expect("--only requests,discard")
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            }
            other => {
                panic!("unknown argument {other:?}; see the doc comment of benches/dot-bench.rs")
            }
        }
    }
    assert!(
        opts.write.is_none() || !quick && opts.only.is_none(),
        "--quick and --only figures are not worth writing down"
    );
    if quick {
        opts.iterations = 40;
        opts.volumes = 500;
        opts.files = vec![10, 10_000];
        opts.seconds = 1.0;
        opts.starts = 3;
        opts.sized_iterations = 10;
        opts.sized_reps = 2;
        opts.write_reps = 1;
    }
    Some(opts)
}

// ----- Statistics ----------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Stat {
    p50: Duration,
    p99: Duration,
    n: usize,
}

fn stat(samples: &[Duration]) -> Stat {
    assert!(!samples.is_empty());
    let mut v = samples.to_vec();
    v.sort();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stat {
        p50: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 100_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.0} ms", us / 1000.0)
    }
}

/// Signed difference in microseconds, for "own part" columns.
fn minus(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() * 1e6 - b.as_secs_f64() * 1e6
}

// ----- The machine ---------------------------------------------------------------------------

fn enter_private_mount_namespace() {
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: called first thing in main, while this is the only thread; CLONE_NEWNS only
    // gives this process its own mount namespace (and fs_struct).
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }.expect("unshare(CLONE_NEWNS): run as root");
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .expect("making / private in the new mount namespace");
}

fn fs_name(path: &Path) -> String {
    let f = rustix::fs::statfs(path).expect("statfs of the work directory");
    match f.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794c_7630 => "overlay".into(),
        other => format!("statfs type {other:#x}"),
    }
}

fn machine(dir: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let uname = rustix::system::uname();
    let kernel = uname.release().to_string_lossy().into_owned();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let (procs, namespaces) = process_census();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    format!(
        "nproc {nproc} ({cpu}), {mem_gib:.1} GiB RAM, Linux {kernel}; temporary root on {} ({}); \
         {procs} processes in {namespaces} mount namespaces; load average {load} at the start; \
         {}; {}.",
        fs_name(dir),
        dir.display(),
        git_state(),
        &date[..10]
    )
}

/// Processes and distinct mount namespaces: what a scan of `/proc/*/mountinfo` walks.
fn process_census() -> (usize, usize) {
    let mut procs = 0;
    let mut ns = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(|s| s.parse::<u32>().is_ok()) {
            procs += 1;
            if let Ok(m) = std::fs::metadata(e.path().join("ns/mnt")) {
                ns.insert(std::os::unix::fs::MetadataExt::ino(&m));
            }
        }
    }
    (procs, ns.len())
}

fn git_state() -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!(
                "tree at {head}{}",
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                }
            )
        }
        None => "tree not under git".into(),
    }
}

// ----- The floor: bare syscalls --------------------------------------------------------------

fn small_volume(dir: &Path, base: &Path) -> OverlaySpec {
    for d in ["upper", "workdir", "mountpoint"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    OverlaySpec {
        source: "dot-bench".into(),
        lower: base.to_owned(),
        upper: dir.join("upper"),
        work: dir.join("workdir"),
        target: dir.join("mountpoint"),
    }
}

/// The floor of issue 14, the cheapest complete way to make the mount: the three layer
/// directories opened `O_PATH`, fsopen, the layers by fd, index/metacopy/redirect_dir off,
/// fsmount, move_mount. No `source` (the kernel's "none"), no probe.
fn mount_floor(spec: &OverlaySpec) {
    mount_fd_api(spec, false);
}

/// What the plugin's `sys::RealSys::mount_overlay` does on this kernel, without its error
/// handling: the `trusted.*` xattr probe on the work directory, then the floor's syscalls
/// with `source` set too (`sys::mount_with_fd_api`).
fn mount_as_plugin(spec: &OverlaySpec) {
    match rustix::fs::getxattr(&spec.work, "trusted.docker-on-top.probe", &mut [0u8; 16]) {
        Ok(_) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::RANGE) => {}
        Err(e) => panic!("the trusted.* probe on {:?}: {e}", spec.work),
    }
    mount_fd_api(spec, true);
}

fn mount_fd_api(spec: &OverlaySpec, source: bool) {
    let open = |dir: &Path| {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    };
    let layers = [
        ("lowerdir+", open(&spec.lower)),
        ("upperdir", open(&spec.upper)),
        ("workdir", open(&spec.work)),
    ];
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
    if source {
        rustix::mount::fsconfig_set_string(&fs, "source", spec.source.as_str()).unwrap();
    }
    for (key, fd) in &layers {
        rustix::mount::fsconfig_set_fd(&fs, *key, fd).unwrap();
    }
    for (key, value) in [
        ("index", "off"),
        ("metacopy", "off"),
        ("redirect_dir", "off"),
    ] {
        rustix::mount::fsconfig_set_string(&fs, key, value).unwrap();
    }
    rustix::mount::fsconfig_create(&fs).unwrap();
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .unwrap();
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        &spec.target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .unwrap();
}

fn mount_legacy(spec: &OverlaySpec, data: &std::ffi::CStr) {
    rustix::mount::mount(
        spec.source.as_str(),
        &spec.target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        data,
    )
    .unwrap();
}

fn umount(target: &Path) {
    rustix::mount::unmount(target, UnmountFlags::NOFOLLOW).unwrap();
}

/// What the plugin's `sys::RealSys::unmount` does: an inotify watch on the mountpoint, in the
/// instance the thread keeps, the umount2, and a read of the watch's events (IN_UNMOUNT: no
/// copy of the overlay is left).
fn umount_as_plugin(target: &Path) {
    use rustix::fs::inotify;
    thread_local! {
        static WATCH: rustix::fd::OwnedFd =
            inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    }
    WATCH.with(|fd| {
        let flags = inotify::WatchFlags::DELETE_SELF
            | inotify::WatchFlags::ONLYDIR
            | inotify::WatchFlags::DONT_FOLLOW;
        let wd = inotify::add_watch(fd, target, flags).unwrap();
        umount(target);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let mut events = inotify::Reader::new(fd, &mut buf);
        let mut unmounted = false;
        while let Ok(event) = events.next() {
            unmounted |= event.wd() == wd && event.events().contains(inotify::ReadFlags::UNMOUNT);
        }
        assert!(unmounted, "no IN_UNMOUNT after the umount2 of {target:?}");
    })
}

/// Whether `path` is the root of a mount (statx's `STATX_ATTR_MOUNT_ROOT`, Linux 5.8+).
fn is_mount_root(path: &Path) -> bool {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        StatxFlags::empty(),
    )
    .unwrap_or_else(|e| panic!("statx of {path:?}: {e}"));
    assert!(
        st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT),
        "this kernel's statx does not say whether {path:?} is a mount root"
    );
    st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

/// The durable small-file write of issue 14: a 100-byte file written as a temporary in `dir`
/// (an open directory), fsynced, renamed into place, and the directory fsynced.
fn durable_write(dir: &rustix::fd::OwnedFd) {
    const DATA: [u8; 100] = [b'd'; 100];
    let tmp = rustix::fs::openat(
        dir,
        DURABLE_TMP,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    assert_eq!(rustix::io::write(&tmp, &DATA).unwrap(), DATA.len());
    rustix::fs::fsync(&tmp).unwrap();
    drop(tmp);
    rustix::fs::renameat(dir, DURABLE_TMP, dir, DURABLE_NAME).unwrap();
    rustix::fs::fsync(dir).unwrap();
}
/// Names no volume can have (a volume name starts with a letter or digit); List skips files.
const DURABLE_TMP: &str = ".dot-bench-durable.tmp";
const DURABLE_NAME: &str = ".dot-bench-durable";

// ----- Client: dockerd's requests ----------------------------------------------------------

/// One keep-alive connection, sending what Go's HTTP client sends for dockerd.
struct Client {
    r: BufReader<UnixStream>,
    line: String,
}

impl Client {
    fn connect(socket: &Path) -> io::Result<Client> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(150)))?;
        Ok(Client {
            r: BufReader::new(s),
            line: String::new(),
        })
    }

    /// One call; `Ok((status, body))`.
    fn call(&mut self, endpoint: &str, body: &str) -> io::Result<(u16, Vec<u8>)> {
        let req = format!(
            "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\
             Accept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes())?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        self.line.clear();
        if self.r.read_line(&mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let mut len = None;
        loop {
            self.line.clear();
            if self.r.read_line(&mut self.line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let mut out = vec![0; len.ok_or_else(|| bad("no Content-Length"))?];
        self.r.read_exact(&mut out)?;
        Ok((status, out))
    }

    /// A call that must succeed; returns its duration.
    fn ok(&mut self, endpoint: &str, body: &str) -> Duration {
        self.ok_reply(endpoint, body).0
    }

    /// A call that must succeed; returns its duration and the reply's body.
    fn ok_reply(&mut self, endpoint: &str, body: &str) -> (Duration, Vec<u8>) {
        let t = Instant::now();
        let (status, reply) = self
            .call(endpoint, body)
            .unwrap_or_else(|e| panic!("{endpoint} {body}: {e}"));
        let d = t.elapsed();
        let text = String::from_utf8_lossy(&reply);
        assert!(
            status == 200 && !text.contains("\"Err\":\"") || text.contains("\"Err\":\"\""),
            "{endpoint} {body} answered {status}: {text}"
        );
        (d, reply)
    }
}

/// Go's `json.Encoder` output: compact, with a newline.
fn name_body(name: &str) -> String {
    format!("{{\"Name\":\"{name}\"}}\n")
}
fn mount_body(name: &str, id: &str) -> String {
    format!("{{\"Name\":\"{name}\",\"ID\":\"{id}\"}}\n")
}
fn create_body(name: &str, base: &Path, volatile: bool) -> String {
    format!(
        "{{\"Name\":\"{name}\",\"Opts\":{{\"base\":\"{}\",\"volatile\":\"{volatile}\"}}}}\n",
        base.display()
    )
}
/// A mount ID as dockerd makes them: 64 hex digits.
fn mount_id(n: u64) -> String {
    format!("{n:064x}")
}

// ----- The daemon ------------------------------------------------------------------------------

struct Daemon {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    /// Process start (spawn) to the first answer.
    first_answer: Duration,
}

#[derive(Clone, Copy, Default)]
struct Memory {
    rss: u64,
    hwm: u64,
    pss: u64,
    private: u64,
    threads: u64,
}

fn memory(pid: u32) -> Memory {
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Memory {
        rss: field(&status, "VmRSS:"),
        hwm: field(&status, "VmHWM:"),
        threads: field(&status, "Threads:"),
        pss: field(&rollup, "Pss:"),
        private: field(&rollup, "Private_Clean:") + field(&rollup, "Private_Dirty:"),
    }
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

/// Polls until `/Plugin.Activate` answers on `socket`; returns the client that got it.
fn first_answer(socket: &Path, deadline: Duration, child: &mut Child) -> Client {
    let t = Instant::now();
    loop {
        if let Ok(mut c) = Client::connect(socket)
            && c.call("/Plugin.Activate", "").is_ok_and(|(s, _)| s == 200)
        {
            return c;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited with {status} before answering");
        }
        assert!(t.elapsed() < deadline, "no answer on {socket:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Daemon {
    fn start(work: &Path, label: &str, root: &Path) -> Daemon {
        let socket = work.join(format!("{label}.sock"));
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(work.join(format!("{label}.log")))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(root)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut cmd);
        let t = Instant::now();
        let mut child = cmd.spawn().expect("cannot start docker-on-top");
        drop(first_answer(&socket, Duration::from_secs(20), &mut child));
        let first_answer = t.elapsed();
        Daemon {
            child,
            socket,
            root: root.to_owned(),
            first_answer,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn memory(&self) -> Memory {
        memory(self.pid())
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// Waits until the trash is empty (the janitor is done) and the daemon is quiet.
    fn settle(&self) {
        let trash = self.root.join(".trash");
        let t = Instant::now();
        while std::fs::read_dir(&trash).map_or(0, |d| d.count()) > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "trash never emptied"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    fn stop(mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for Daemon {
    /// A run that fails half-way leaves no plugin behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child gets SIGKILL if this process dies first.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(io::Error::from)
        });
    }
}

fn terminate(child: &mut Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let t = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ----- Requests over the socket, and the floor beside them ---------------------------------

const KINDS: [&str; 11] = [
    "/Plugin.Activate (empty round trip)",
    "Create",
    "Get",
    "List (11 volumes)",
    "Path",
    "Mount (first: mounts)",
    "Mount (already mounted)",
    "Unmount (not last)",
    "Unmount (last: unmounts)",
    "Unmount (last), file system synced before it",
    "Remove",
];
const FLOOR: [&str; 8] = [
    "floor mount",
    "floor umount",
    "plugin mount",
    "plugin umount",
    "legacy mount",
    "legacy umount",
    "floor umount synced",
    "durable write",
];

fn syncfs(path: &Path) {
    let fd = rustix::fs::open(path, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    rustix::fs::syncfs(&fd).unwrap();
}

/// What the request phase measured.
#[derive(Default)]
struct Requests {
    /// Per request kind ([`KINDS`]).
    lat: Stats,
    /// Per floor measure ([`FLOOR`]).
    floor: Stats,
    /// Cycles in which the overlay was still mounted when the last Unmount's answer arrived:
    /// the timed one, and the one after a sync.
    still_mounted: usize,
    still_mounted_synced: usize,
}

/// Each iteration runs every request kind once and, beside them, the bare syscalls on a
/// volume of their own and a durable small-file write in the state root, so all see the same
/// machine (other load). The file system is synced before each mount, plugin's or bare, so
/// that each umount2 commits only what came after (the mount's own writes; for the plugin also
/// its mount records), and in a second round also between mount and umount2 ("synced before
/// it"), as after a container that ran longer than the journal's commit interval; and before
/// each durable write. Every timed request follows an untimed empty one, so that it finds the
/// plugin awake, as the empty round trip it is compared with does. Right after each last
/// Unmount's answer, a statx of the mountpoint (the one Path answered) says whether the
/// overlay is still mounted: the unmount is part of that answer (issue 14). The floor's
/// `workdir/work` is removed (untimed) before each mount: overlayfs then creates it without
/// first deleting an old one, its cheapest case, which is also the plugin's case for a volume
/// whose last unmount was looked after.
fn requests(d: &Daemon, work: &Path, base: &Path, n: usize) -> Requests {
    let mut c = d.client();
    for k in 0..10 {
        c.ok(
            "/VolumeDriver.Create",
            &create_body(&format!("resident{k}"), base, false),
        );
    }
    let spec = small_volume(&work.join("floor"), base);
    let data = std::ffi::CString::new(legacy_options(&spec)).unwrap();
    let fresh_work = || {
        let _ = std::fs::remove_dir(spec.work.join("work"));
    };
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    // The durable write goes into the state root's own directory, as a volume's record does
    // into a directory on that file system.
    let root_dir = rustix::fs::open(
        &d.root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let mut samples: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let mut floor: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let (mut still_mounted, mut still_mounted_synced) = (0, 0);
    let warm = n / 10;
    for i in 0..warm + n {
        let v = format!("lat{i}");
        let (a, b) = (mount_id(2 * i as u64 + 1), mount_id(2 * i as u64 + 2));
        let hot = |c: &mut Client, endpoint: &str, body: &str| {
            c.ok("/Plugin.Activate", "");
            c.ok(endpoint, body)
        };
        let mut t = vec![
            hot(&mut c, "/Plugin.Activate", ""),
            hot(
                &mut c,
                "/VolumeDriver.Create",
                &create_body(&v, base, false),
            ),
            hot(&mut c, "/VolumeDriver.Get", &name_body(&v)),
            hot(&mut c, "/VolumeDriver.List", ""),
        ];
        syncfs(work);
        let mount = hot(&mut c, "/VolumeDriver.Mount", &mount_body(&v, &a));
        c.ok("/Plugin.Activate", "");
        let (path, reply) = c.ok_reply("/VolumeDriver.Path", &name_body(&v));
        let mountpoint = serde_json::from_slice::<serde_json::Value>(&reply)
            .ok()
            .and_then(|r| r["Mountpoint"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| panic!("no Mountpoint in Path's reply {reply:?}"));
        assert!(
            is_mount_root(&mountpoint),
            "{mountpoint:?} is not a mount after Mount answered"
        );
        t.push(path);
        t.push(mount);
        t.push(hot(&mut c, "/VolumeDriver.Mount", &mount_body(&v, &b)));
        t.push(hot(&mut c, "/VolumeDriver.Unmount", &mount_body(&v, &b)));
        t.push(hot(&mut c, "/VolumeDriver.Unmount", &mount_body(&v, &a)));
        let left_mounted = is_mount_root(&mountpoint);
        // Containers run for a while: whatever the last Unmount left behind (in the page
        // cache, the journal) is not the next request's cost.
        std::thread::sleep(Duration::from_millis(5));
        c.ok("/VolumeDriver.Mount", &mount_body(&v, &a));
        syncfs(work);
        t.push(hot(&mut c, "/VolumeDriver.Unmount", &mount_body(&v, &a)));
        let left_mounted_synced = is_mount_root(&mountpoint);
        std::thread::sleep(Duration::from_millis(5));
        t.push(hot(&mut c, "/VolumeDriver.Remove", &name_body(&v)));
        // The janitor deletes the removed volume: not while the floor is measured.
        let trash = d.root.join(".trash");
        while std::fs::read_dir(&trash).map_or(0, |e| e.count()) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }

        fresh_work();
        syncfs(work);
        let floor_mount = timed(&mut || mount_floor(&spec));
        let floor_umount = timed(&mut || umount(&spec.target));
        fresh_work();
        syncfs(work);
        let plugin_mount = timed(&mut || mount_as_plugin(&spec));
        let plugin_umount = timed(&mut || umount_as_plugin(&spec.target));
        fresh_work();
        syncfs(work);
        let legacy_mount = timed(&mut || mount_legacy(&spec, &data));
        let legacy_umount = timed(&mut || umount(&spec.target));
        fresh_work();
        mount_floor(&spec);
        syncfs(work);
        let synced = timed(&mut || umount(&spec.target));
        let _ = rustix::fs::unlinkat(&root_dir, DURABLE_NAME, rustix::fs::AtFlags::empty());
        syncfs(&d.root);
        let durable = timed(&mut || durable_write(&root_dir));
        if i >= warm {
            for (k, x) in KINDS.iter().zip(t) {
                samples.entry(k).or_default().push(x);
            }
            let measured = [
                floor_mount,
                floor_umount,
                plugin_mount,
                plugin_umount,
                legacy_mount,
                legacy_umount,
                synced,
                durable,
            ];
            for (k, x) in FLOOR.iter().zip(measured) {
                floor.entry(k).or_default().push(x);
            }
            still_mounted += usize::from(left_mounted);
            still_mounted_synced += usize::from(left_mounted_synced);
        }
    }
    let _ = rustix::fs::unlinkat(&root_dir, DURABLE_NAME, rustix::fs::AtFlags::empty());
    let stats = |m: BTreeMap<&'static str, Vec<Duration>>| {
        m.into_iter().map(|(k, v)| (k, stat(&v))).collect()
    };
    Requests {
        lat: stats(samples),
        floor: stats(floor),
        still_mounted,
        still_mounted_synced,
    }
}

// ----- Volatile discard ----------------------------------------------------------------------

/// `n` empty files directly in `upper` (while the volume is unmounted), 1,000 per directory.
fn fill(upper: &Path, n: usize) {
    let per_dir = 1000;
    let mut left = n;
    let mut d = 0;
    while left > 0 {
        let dir = upper.join(format!("d{d:04}"));
        std::fs::create_dir(&dir).unwrap();
        let fd =
            rustix::fs::open(&dir, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        for f in 0..per_dir.min(left) {
            drop(
                rustix::fs::openat(
                    &fd,
                    format!("f{f:04}"),
                    OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap(),
            );
        }
        left -= per_dir.min(left);
        d += 1;
    }
}

/// One row of the volatile discard: `files` in the upper, the Mounts that discarded them,
/// and the 10-file Mounts measured right before each of those (the machine's state drifts
/// over the minutes a million files take, so each size is compared with its own baseline).
struct Discard {
    files: usize,
    mount: Stat,
    baseline: Stat,
    filling: Duration,
}

fn discard(d: &Daemon, base: &Path, counts: &[usize]) -> Vec<Discard> {
    let mut c = d.client();
    let v = "scratch-volatile";
    c.ok("/VolumeDriver.Create", &create_body(v, base, true));
    let id = mount_id(0xd15c);
    c.ok("/VolumeDriver.Mount", &mount_body(v, &id));
    c.ok("/VolumeDriver.Unmount", &mount_body(v, &id));
    let upper = d.root.join(v).join("upper");
    // Fills the upper with `n` files and times the Mount that discards them.
    let mut one = |n: usize, filling: &mut Duration| {
        d.settle();
        let t = Instant::now();
        fill(&upper, n);
        *filling += t.elapsed();
        syncfs(&upper);
        std::thread::sleep(Duration::from_millis(50));
        // A fresh connection (the plugin closes one idle for 30 s, as making a million files
        // takes), found awake, as in the other measurements.
        c = d.client();
        c.ok("/Plugin.Activate", "");
        let took = c.ok("/VolumeDriver.Mount", &mount_body(v, &id));
        assert_eq!(
            std::fs::read_dir(&upper).unwrap().count(),
            0,
            "the Mount did not discard the volatile volume's changes"
        );
        c.ok("/VolumeDriver.Unmount", &mount_body(v, &id));
        took
    };
    let mut out = Vec::new();
    for &n in counts {
        let reps = match n {
            0..=10_000 => 9,
            _ => 3,
        };
        let (mut samples, mut baseline) = (Vec::new(), Vec::new());
        let (mut filling, mut unused) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..reps {
            baseline.push(one(10, &mut unused));
            samples.push(one(n, &mut filling));
        }
        let (mount, baseline) = (stat(&samples), stat(&baseline));
        eprintln!(
            "dot-bench: discard of {n} files: {} (10 files just before: {})",
            fmt_d(mount.p50),
            fmt_d(baseline.p50)
        );
        out.push(Discard {
            files: n,
            mount,
            baseline,
            filling: filling / reps as u32,
        });
    }
    d.settle();
    c.ok("/VolumeDriver.Remove", &name_body(v));
    out
}

// ----- Throughput ------------------------------------------------------------------------------

struct Throughput {
    clients: usize,
    cycles: u64,
    failures: u64,
    elapsed: Duration,
    cycle: Stat,
    first_failure: Option<String>,
}

fn throughput(d: &Daemon, base: &Path, clients: usize, seconds: f64) -> Throughput {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let first_failure = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let (socket, base) = (d.socket.clone(), base.to_owned());
            let (stop, failures, first_failure) =
                (stop.clone(), failures.clone(), first_failure.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let mut lat = Vec::new();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = format!("tp{clients}-{t}-{k}");
                    let id = mount_id(k);
                    let t0 = Instant::now();
                    let mut ok = true;
                    for (ep, body) in [
                        ("/VolumeDriver.Create", create_body(&v, &base, false)),
                        ("/VolumeDriver.Mount", mount_body(&v, &id)),
                        ("/VolumeDriver.Unmount", mount_body(&v, &id)),
                        ("/VolumeDriver.Remove", name_body(&v)),
                    ] {
                        let failed = match c.call(ep, &body) {
                            Ok((200, _)) => None,
                            Ok((status, reply)) => Some(format!(
                                "{ep} {status}: {}",
                                String::from_utf8_lossy(&reply)
                            )),
                            Err(e) => {
                                c = Client::connect(&socket).unwrap();
                                Some(format!("{ep}: {e}"))
                            }
                        };
                        if let Some(why) = failed {
                            ok = false;
                            failures.fetch_add(1, Ordering::Relaxed);
                            first_failure.lock().unwrap().get_or_insert(why);
                        }
                    }
                    if ok {
                        lat.push(t0.elapsed());
                    }
                    k += 1;
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = start.elapsed();
    let first_failure = first_failure.lock().unwrap().take();
    Throughput {
        clients,
        cycles: lat.len() as u64,
        failures: failures.load(Ordering::Relaxed),
        elapsed,
        cycle: stat(&lat),
        first_failure,
    }
}

/// Samples the daemon's memory every 20 ms until `stop`; returns the largest of each figure.
fn sample_memory(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Memory> {
    std::thread::spawn(move || {
        let mut max = Memory::default();
        while !stop.load(Ordering::Relaxed) {
            let m = memory(pid);
            max.rss = max.rss.max(m.rss);
            max.pss = max.pss.max(m.pss);
            max.private = max.private.max(m.private);
            max.threads = max.threads.max(m.threads);
            std::thread::sleep(Duration::from_millis(20));
        }
        max.hwm = memory(pid).hwm;
        max
    })
}

// ----- Scale -----------------------------------------------------------------------------------

struct Scale {
    volumes: usize,
    create_elapsed: Duration,
    starts: Vec<Duration>,
    list: Stat,
    get: Stat,
    mount: Stat,
    unmount: Stat,
    activated: Vec<Duration>,
    mem_after_create: Memory,
    mem_restarted: Memory,
    mem_activated: Memory,
}

fn scale(work: &Path, base: &Path, opts: &Opts) -> Scale {
    let root = work.join("root-scale");
    let d = Daemon::start(work, "scale", &root);
    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let volumes = opts.volumes;
    let creators: Vec<_> = (0..8)
        .map(|_| {
            let (socket, base, next) = (d.socket.clone(), base.to_owned(), next.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= volumes {
                        break;
                    }
                    c.ok(
                        "/VolumeDriver.Create",
                        &create_body(&format!("vol{i:05}"), &base, false),
                    );
                }
            })
        })
        .collect();
    for c in creators {
        c.join().unwrap();
    }
    let create_elapsed = t.elapsed();
    let mut c = d.client();
    c.ok("/VolumeDriver.List", "");
    let mem_after_create = d.memory();
    drop(c);
    d.settle();
    d.stop();
    // What creating them left for the disk is written now, not by the first unmount below
    // (an unmount syncs the upper's file system).
    syncfs(&root);

    let mut starts = Vec::new();
    let (mut list, mut get, mut mount, mut unmount) = (vec![], vec![], vec![], vec![]);
    let mut mem_restarted = Memory::default();
    for run in 0..opts.starts {
        let d = Daemon::start(work, "scale", &root);
        starts.push(d.first_answer);
        if run == 0 {
            let mut c = d.client();
            for _ in 0..20 {
                let t = Instant::now();
                let (status, body) = c.call("/VolumeDriver.List", "").unwrap();
                list.push(t.elapsed());
                assert_eq!(status, 200);
                assert!(
                    body.len() > volumes * 10,
                    "List is short: {} bytes",
                    body.len()
                );
            }
            for i in 0..100 {
                get.push(c.ok(
                    "/VolumeDriver.Get",
                    &name_body(&format!("vol{:05}", i * 97 % volumes)),
                ));
            }
            for i in 0..30 {
                let v = format!("vol{:05}", (i * 331 + 7) % volumes);
                let id = mount_id(i as u64);
                mount.push(c.ok("/VolumeDriver.Mount", &mount_body(&v, &id)));
                unmount.push(c.ok("/VolumeDriver.Unmount", &mount_body(&v, &id)));
                std::thread::sleep(Duration::from_millis(5));
            }
            mem_restarted = d.memory();
        }
        d.settle();
        d.stop();
    }

    // Socket activation: systemd-socket-activate listens, and execs the plugin (same pid) with
    // the socket as fd 3 when the first connection arrives.
    let socket = work.join("activated.sock");
    let mut activated = Vec::new();
    let mut mem_activated = Memory::default();
    for run in 0..opts.starts {
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(work.join("activated.log")).unwrap();
        let mut activate = Command::new("systemd-socket-activate");
        die_with_parent(&mut activate);
        let mut child = activate
            .arg("-l")
            .arg(&socket)
            .arg(BIN)
            .arg("--root")
            .arg(&root)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot run systemd-socket-activate (package systemd)");
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no socket from systemd-socket-activate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let mut c = Client::connect(&socket).unwrap();
        c.ok("/Plugin.Activate", "");
        activated.push(t.elapsed());
        if run == 0 {
            std::thread::sleep(Duration::from_millis(300));
            mem_activated = memory(child.id());
        }
        drop(c);
        std::thread::sleep(Duration::from_millis(20));
        terminate(&mut child);
    }
    Scale {
        volumes,
        create_elapsed,
        starts,
        list: stat(&list),
        get: stat(&get),
        mount: stat(&mount),
        unmount: stat(&unmount),
        activated,
        mem_after_create,
        mem_restarted,
        mem_activated,
    }
}

// ----- Sized volumes (issue 16) ----------------------------------------------------------------

const GIB: u64 = 1 << 30;
const MIB: usize = 1 << 20;
/// The requests compared between an unsized and a sized volume.
const SIZED_KINDS: [&str; 4] = [
    "Create",
    "Mount (first: mounts)",
    "Unmount (last: unmounts)",
    "Remove",
];
/// The cap of the volumes that the request comparison makes.
const SIZED_CAP: &str = "1Gi";
/// The cap of the volumes that 1 GiB is written into (an ext4 file system of 1 GiB holds less
/// than 1 GiB of data: its journal and metadata take some of it).
const SIZED_CAP_WRITE: &str = "2Gi";

/// What the sized phase measured.
struct Sized {
    /// Per [`SIZED_KINDS`]: the unsized volume's, then the sized one's.
    ops: Vec<(&'static str, Stat, Stat)>,
    /// The volatile remount with 10 small files in the upper, and with 1 GiB.
    remount_small: Stat,
    remount_big: Stat,
    /// Writing the 1 GiB into the volatile volume (p50).
    remount_big_write: Stat,
    /// Sequential write of 1 GiB: the unsized volume's durations, and the sized one's.
    write_unsized: Vec<Duration>,
    write_sized: Vec<Duration>,
}

/// A timed call that finds the plugin awake (an untimed empty round trip first).
fn hot(c: &mut Client, endpoint: &str, body: &str) -> Duration {
    c.ok("/Plugin.Activate", "");
    c.ok(endpoint, body)
}

fn sized_create_body(name: &str, base: &Path, volatile: bool, size: &str) -> String {
    format!(
        "{{\"Name\":\"{name}\",\"Opts\":{{\"base\":\"{}\",\"size\":\"{size}\",\"sparse\":\"true\",\
         \"volatile\":\"{volatile}\"}}}}\n",
        base.display()
    )
}

/// The mountpoint that Path answers for a mounted volume.
fn path_of(c: &mut Client, name: &str) -> PathBuf {
    let (_, reply) = c.ok_reply("/VolumeDriver.Path", &name_body(name));
    serde_json::from_slice::<serde_json::Value>(&reply)
        .ok()
        .and_then(|r| r["Mountpoint"].as_str().map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| panic!("no Mountpoint in Path's reply {reply:?}"))
}

/// `bytes` written to a new file at `path` in 1 MiB writes, then fsync: the whole timed.
fn write_sequential(path: &Path, bytes: u64) -> Duration {
    let buf: Vec<u8> = (0..MIB).map(|i| (i * 131 + 7) as u8).collect();
    let t = Instant::now();
    let mut f = std::fs::File::create_new(path).unwrap();
    for _ in 0..bytes / MIB as u64 {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    t.elapsed()
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Loop devices whose backing file is under `dir` (or was, and is deleted now).
fn loops_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let f = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                    f.contains(&dir)
                        .then(|| format!("{}: {}", e.file_name().to_string_lossy(), f.trim()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Mounts (in this mount namespace, which the plugin shares) at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// Whether `dir` holds nothing.
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .next()
        .is_none()
}

/// Waits until no loop device is backed by a file under `dir` and nothing is mounted under
/// it; panics (naming them) if some are left after 10 s.
fn assert_nothing_left(dir: &Path) {
    let t = Instant::now();
    loop {
        let (loops, mounts) = (loops_under(dir), mounts_under(dir));
        if loops.is_empty() && mounts.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left behind under {dir:?}: loop devices {loops:?}, mounts {mounts:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Create, Mount (first), Unmount (last) and Remove of an unsized volume and of a sized one
/// (`size=1Gi`, sparse), in turn: `n` cycles of each after a warm-up, fewer if a sized cycle
/// is slow (Create runs mkfs) so that the cycles take about two minutes at most.
fn sized_ops(d: &Daemon, work: &Path, base: &Path, n: usize) -> Vec<(&'static str, Stat, Stat)> {
    let mut c = d.client();
    let cycle = |c: &mut Client, i: usize, sized: bool| -> [Duration; 4] {
        let v = format!("{}{i}", if sized { "sized" } else { "plain" });
        let id = mount_id(i as u64 + 1);
        let body = if sized {
            sized_create_body(&v, base, false, SIZED_CAP)
        } else {
            create_body(&v, base, false)
        };
        syncfs(work);
        let create = hot(c, "/VolumeDriver.Create", &body);
        let dir = d.root.join(&v);
        assert_eq!(
            dir.join("changes.img").exists(),
            sized,
            "{v}: changes.img after Create"
        );
        syncfs(work);
        let mount = hot(c, "/VolumeDriver.Mount", &mount_body(&v, &id));
        let mountpoint = path_of(c, &v);
        assert!(is_mount_root(&mountpoint), "{mountpoint:?} is not a mount");
        if sized {
            assert!(
                is_mount_root(&dir.join("changes")) && dir.join("changes/upper").is_dir(),
                "{v}: its image is not mounted at changes/ with an upper in it"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
        let unmount = hot(c, "/VolumeDriver.Unmount", &mount_body(&v, &id));
        assert!(
            !is_mount_root(&mountpoint),
            "{mountpoint:?} is still mounted"
        );
        std::thread::sleep(Duration::from_millis(5));
        syncfs(work);
        let remove = hot(c, "/VolumeDriver.Remove", &name_body(&v));
        assert!(!dir.exists(), "{v} is still there after Remove");
        d.settle();
        [create, mount, unmount, remove]
    };
    let warm = 3;
    let t = Instant::now();
    for i in 0..warm {
        cycle(&mut c, i, false);
        cycle(&mut c, i, true);
    }
    let per_cycle = t.elapsed() / warm as u32;
    let n = n.min((Duration::from_secs(120).as_secs_f64() / per_cycle.as_secs_f64()) as usize);
    let n = n.max(10);
    eprintln!(
        "dot-bench: sized: {n} cycles of each ({} per pair in the warm-up)",
        fmt_d(per_cycle)
    );
    let mut samples: [[Vec<Duration>; 4]; 2] = Default::default();
    for i in warm..warm + n {
        for sized in [false, true] {
            let got = cycle(&mut c, i, sized);
            for (s, x) in samples[usize::from(sized)].iter_mut().zip(got) {
                s.push(x);
            }
        }
    }
    SIZED_KINDS
        .iter()
        .enumerate()
        .map(|(k, &kind)| (kind, stat(&samples[0][k]), stat(&samples[1][k])))
        .collect()
}

/// The volatile remount of a sized volume (`size=2Gi`): the Mount after the last Unmount,
/// which swaps in a fresh image, when 10 small files were written through the mountpoint and
/// when 1 GiB was, `reps` times each, in turn. Returns the Mounts (10 files, 1 GiB) and the
/// writes of 1 GiB.
fn sized_remount(d: &Daemon, work: &Path, base: &Path, reps: usize) -> (Stat, Stat, Stat) {
    let v = "sized-volatile";
    let id = mount_id(0x16);
    let mut c = d.client();
    c.ok(
        "/VolumeDriver.Create",
        &sized_create_body(v, base, true, SIZED_CAP_WRITE),
    );
    c.ok("/VolumeDriver.Mount", &mount_body(v, &id));
    let mountpoint = path_of(&mut c, v);
    let dir = d.root.join(v);
    let upper = dir.join("changes/upper");
    let image_ino = || {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join("changes.img")).unwrap())
    };
    let (mut small, mut big, mut big_write) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        for large in [false, true] {
            // Mounted, the upper empty: the changes are written through the mountpoint.
            d.settle();
            assert!(
                is_empty_dir(&upper),
                "the upper is not empty before writing"
            );
            if large {
                big_write.push(write_sequential(&mountpoint.join("big.bin"), GIB));
            } else {
                for f in 0..10 {
                    std::fs::write(mountpoint.join(format!("small{f}")), [b's'; 4096]).unwrap();
                }
                syncfs(&mountpoint);
            }
            assert!(!is_empty_dir(&upper), "the writes did not reach the upper");
            let before = image_ino();
            // A fresh connection: writing 1 GiB may take longer than the plugin keeps an idle
            // one open.
            c = d.client();
            c.ok("/VolumeDriver.Unmount", &mount_body(v, &id));
            d.settle();
            syncfs(work);
            std::thread::sleep(Duration::from_millis(50));
            let took = hot(&mut c, "/VolumeDriver.Mount", &mount_body(v, &id));
            assert!(
                is_empty_dir(&upper),
                "the Mount did not discard the volatile sized volume's changes"
            );
            assert_ne!(
                before,
                image_ino(),
                "the Mount did not swap in a fresh image"
            );
            assert!(!mountpoint.join("big.bin").exists() && !mountpoint.join("small0").exists());
            if large { &mut big } else { &mut small }.push(took);
        }
    }
    c.ok("/VolumeDriver.Unmount", &mount_body(v, &id));
    d.settle();
    c.ok("/VolumeDriver.Remove", &name_body(v));
    d.settle();
    let (small, big) = (stat(&small), stat(&big));
    eprintln!(
        "dot-bench: sized volatile remount: {} after 1 GiB, {} after 10 files",
        fmt_d(big.p50),
        fmt_d(small.p50)
    );
    (small, big, stat(&big_write))
}

/// Sequential writes of 1 GiB in a mounted unsized volume and a mounted sized one
/// (`size=2Gi`), `reps` times each, in turn, after an untimed one in each; the file is
/// deleted and everything synced between them. Returns the durations (unsized, sized).
fn sized_write(
    d: &Daemon,
    work: &Path,
    base: &Path,
    reps: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut c = d.client();
    let vols = ["write-plain", "write-sized"];
    let id = mount_id(0x16_0001);
    c.ok("/VolumeDriver.Create", &create_body(vols[0], base, false));
    c.ok(
        "/VolumeDriver.Create",
        &sized_create_body(vols[1], base, false, SIZED_CAP_WRITE),
    );
    let mut mountpoints = Vec::new();
    for v in vols {
        c.ok("/VolumeDriver.Mount", &mount_body(v, &id));
        mountpoints.push(path_of(&mut c, v));
    }
    // One file written, deleted and synced in the mountpoint `mp`; how long the write took.
    let once = |mp: &Path| {
        rustix::fs::sync();
        std::thread::sleep(Duration::from_millis(200));
        let file = mp.join("seq.bin");
        let took = write_sequential(&file, GIB);
        std::fs::remove_file(&file).unwrap();
        syncfs(mp);
        syncfs(work);
        took
    };
    // A warm-up write in each, untimed. On a virtual disk some writes of a gigabyte are three
    // to four times slower than the others, whatever the volume (a bare `dd` shows it too):
    // the table gives the fastest beside the p50.
    for (v, mp) in vols.iter().zip(&mountpoints) {
        let took = once(mp);
        eprintln!(
            "dot-bench: sequential write of 1 GiB in {v} (warm-up): {:.0} MB/s",
            mb_per_s(GIB, took)
        );
    }
    let mut took = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (k, mp) in mountpoints.iter().enumerate() {
            took[k].push(once(mp));
            eprintln!(
                "dot-bench: sequential write of 1 GiB in {}: {:.0} MB/s",
                vols[k],
                mb_per_s(GIB, *took[k].last().unwrap())
            );
        }
    }
    c = d.client();
    for v in vols {
        c.ok("/VolumeDriver.Unmount", &mount_body(v, &id));
        c.ok("/VolumeDriver.Remove", &name_body(v));
    }
    d.settle();
    let [plain, sized] = took;
    eprintln!(
        "dot-bench: sequential write of 1 GiB: {:.0} MB/s unsized, {:.0} MB/s sized",
        mb_per_s(GIB, stat(&plain).p50),
        mb_per_s(GIB, stat(&sized).p50)
    );
    (plain, sized)
}

fn sized(work: &Path, base: &Path, opts: &Opts) -> Sized {
    let root = work.join("root-sized");
    let d = Daemon::start(work, "sized", &root);
    std::thread::sleep(Duration::from_millis(200));
    let ops = sized_ops(&d, work, base, opts.sized_iterations);
    let (remount_small, remount_big, remount_big_write) =
        sized_remount(&d, work, base, opts.sized_reps);
    let (write_unsized, write_sized) = sized_write(&d, work, base, opts.write_reps);
    d.settle();
    d.stop();
    assert_nothing_left(&root);
    eprintln!(
        "dot-bench: sized: no loop device backed by a file under {} and no mount under it left",
        root.display()
    );
    Sized {
        ops,
        remount_small,
        remount_big,
        remount_big_write,
        write_unsized,
        write_sized,
    }
}

// ----- Main ------------------------------------------------------------------------------------

fn main() {
    let Some(opts) = parse_opts() else { return };
    assert!(
        rustix::process::geteuid().is_root(),
        "dot-bench mounts overlays: run it as root ({COMMAND})"
    );
    enter_private_mount_namespace();
    let tmp = tempfile::Builder::new()
        .prefix("dot-bench-")
        .tempdir_in(&opts.dir)
        .expect("cannot create the work directory");
    let work = tmp.path().to_owned();
    let tmp = if opts.keep {
        eprintln!("dot-bench: keeping {}", tmp.keep().display());
        None
    } else {
        Some(tmp)
    };
    let machine = machine(&work);
    eprintln!("dot-bench: {machine}");
    let base = work.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("data.txt"), "base data\n").unwrap();

    let on = |phase: &str| {
        opts.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == phase))
    };
    // `cargo bench` has usually just built the binaries: hundreds of MB that the kernel would
    // otherwise write back during the first measurements (the requests), slowing the plugin's
    // many small file-system calls more than the one bare mount they are compared with.
    rustix::fs::sync();
    std::thread::sleep(Duration::from_secs(2));
    let d = Daemon::start(&work, "main", &work.join("root-main"));
    eprintln!("dot-bench: daemon pid {}", d.pid());
    std::thread::sleep(Duration::from_millis(300));
    let mem_idle = d.memory();
    let mut req = Requests::default();
    if on("requests") {
        eprintln!("dot-bench: requests and the floor");
        req = requests(&d, &work, &base, opts.iterations);
        eprintln!(
            "dot-bench: the overlay was still mounted when the last Unmount answered in {} of {} \
             cycles ({} of {} after a sync)",
            req.still_mounted, opts.iterations, req.still_mounted_synced, opts.iterations
        );
    }
    let mut discard = Vec::new();
    if on("discard") {
        eprintln!("dot-bench: volatile discard");
        discard = self::discard(&d, &base, &opts.files);
    }
    d.settle();
    d.stop();

    let mut tp = Vec::new();
    let mut mem_load = Memory::default();
    if on("throughput") {
        eprintln!("dot-bench: throughput");
        let d = Daemon::start(&work, "load", &work.join("root-load"));
        std::thread::sleep(Duration::from_millis(200));
        throughput(&d, &base, 4, 0.5); // warm-up
        d.settle();
        for clients in [1, 8, 64] {
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = (clients == 64).then(|| sample_memory(d.pid(), stop.clone()));
            tp.push(throughput(&d, &base, clients, opts.seconds));
            stop.store(true, Ordering::Relaxed);
            if let Some(s) = sampler {
                mem_load = s.join().unwrap();
            }
            d.settle();
        }
        d.stop();
    }

    let scale = on("scale").then(|| {
        eprintln!("dot-bench: {} volumes", opts.volumes);
        scale(&work, &base, &opts)
    });
    // Last: it writes gigabytes, whose writeback and deletion the other phases need not see.
    let sized = on("sized").then(|| {
        eprintln!("dot-bench: sized volumes");
        self::sized(&work, &base, &opts)
    });
    if opts.only.is_some() {
        println!("{}", report_requests(&req, &discard));
        println!("idle: {}", fmt_memory(mem_idle));
        if !tp.is_empty() {
            println!("{}", report_throughput(&opts, &tp));
            println!("under 64 clients: {}", fmt_memory(mem_load));
        }
        println!("{}", report_targets_14(&req, &tp, mem_idle));
        if let Some(sized) = &sized {
            println!("{}", report_sized(sized));
        }
        println!("{}", report_targets_16(sized.as_ref()));
        if let Some(scale) = &scale {
            println!("{}", report_scale(scale));
            for (what, m) in [
                ("after create", scale.mem_after_create),
                ("restarted", scale.mem_restarted),
                ("activated", scale.mem_activated),
            ] {
                println!("{what}: {}", fmt_memory(m));
            }
        }
        return;
    }
    let scale = scale.expect("not --only");
    let sized = sized.expect("not --only");

    let report = report(
        &opts, &machine, &req, &discard, &tp, &scale, &sized, mem_idle, mem_load,
    );
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let report = report.replacen(
        " at the start;",
        &format!(" at the start, {load} at the end;"),
        1,
    );
    println!("{report}");
    if let Some(path) = &opts.write {
        write_section(path, &report);
        eprintln!(
            "dot-bench: wrote the section {SECTION:?} of {}",
            path.display()
        );
    }
    // The janitor may still be deleting; the trash is ours to remove now.
    drop(tmp);
}

/// Replaces the section starting with [`SECTION`] up to the next `## ` heading (or appends it).
fn write_section(path: &Path, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match old.find(&format!("\n{SECTION}\n")) {
        Some(start) => {
            let start = start + 1;
            let after = &old[start + SECTION.len()..];
            let end = after
                .find("\n## ")
                .map_or(old.len(), |e| start + SECTION.len() + e + 1);
            format!("{}{}\n{}", &old[..start], section.trim_end(), &old[end..])
        }
        None => format!("{}\n{}\n", old.trim_end(), section.trim_end()),
    };
    std::fs::write(path, new.trim_end().to_owned() + "\n").unwrap();
}

type Stats = BTreeMap<&'static str, Stat>;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The plugin's own part of `kind` in µs: its p50 minus an empty round trip's.
fn own(lat: &Stats, kind: &str) -> f64 {
    minus(lat[kind].p50, lat[KINDS[0]].p50)
}

/// The plugin's own part of `kind` over the floor's p50 of `bare`.
fn own_ratio(r: &Requests, kind: &str, bare: &str) -> f64 {
    own(&r.lat, kind) / us(r.floor[bare].p50)
}

/// The floor, the requests and the volatile discard.
fn report_requests(r: &Requests, discard: &[Discard]) -> String {
    let (lat, floor) = (&r.lat, &r.floor);
    let mut out = String::new();
    let w = &mut out;
    if !lat.is_empty() {
        let n = lat[KINDS[0]].n;
        let _ = writeln!(
            w,
            "### The floor: bare overlay syscalls, and a durable write\n"
        );
        let _ = writeln!(
            w,
            "A small volume (one file in the lower, empty upper) mounted and unmounted {n} times \
             with bare syscalls, done directly, each time right after the requests below (so \
             both see the same machine). The floor is issue 14's: the cheapest complete way to \
             make that mount, and its umount2; the plugin's own sequence, which adds a little, \
             and legacy mount(2) are beside it. Each umount2 also syncs the upper's file system, \
             which holds what the mount just wrote in `workdir/`. The durable small-file write \
             is made {n} times in the plugin's state root directory, on the same file system, \
             after a sync.\n"
        );
        let _ = writeln!(w, "| syscalls | p50 | p99 |\n|---|---|---|");
        for (what, k) in [
            (
                "**the floor**: open ×3 (O_PATH), fsopen, fsconfig ×7 (the layers by fd; index, \
                 metacopy, redirect_dir off; create), fsmount, move_mount",
                "floor mount",
            ),
            ("**the floor**: umount2 of it", "floor umount"),
            (
                "umount2 of it, the file system synced before it",
                "floor umount synced",
            ),
            (
                "the mount as the plugin makes it on this kernel: the floor, the `trusted.*` \
                 xattr probe (getxattr) and fsconfig `source`",
                "plugin mount",
            ),
            (
                "the umount2 as the plugin makes it: with an inotify watch for IN_UNMOUNT \
                 (inotify_add_watch in the thread's instance, umount2, read)",
                "plugin umount",
            ),
            (
                "legacy mount(2) with the escaped option string (`--legacy-mount-api`)",
                "legacy mount",
            ),
            ("umount2 of it", "legacy umount"),
            (
                "**durable small-file write** in the state root: open (O_CREAT|O_EXCL), write \
                 100 bytes, fsync, close, rename, fsync of the directory",
                "durable write",
            ),
        ] {
            let s = floor[k];
            let _ = writeln!(w, "| {what} | {} | {} |", fmt_d(s.p50), fmt_d(s.p99));
        }

        let rt = lat[KINDS[0]].p50;
        let _ = writeln!(w, "\n### Requests over the socket\n");
        let _ = writeln!(
            w,
            "{n} of each, on one keep-alive connection, with dockerd's requests. The plugin's own \
             part is the p50 minus the p50 of an empty round trip (`/Plugin.Activate`, {}); the \
             last column compares it with the floor's p50 (Create's with the durable write's). \
             Each Remove comes 5 ms after its volume's last Unmount. Right after each last \
             Unmount's answer a statx of the mountpoint says whether the overlay is still \
             mounted.\n",
            fmt_d(rt)
        );
        let _ = writeln!(
            w,
            "| request | p50 | p99 | plugin's own part | against the floor |\n\
             |---|---|---|---|---|"
        );
        for k in KINDS {
            let s = lat[k];
            let ratio = match k {
                "Create" => format!(
                    "own part − durable write ({}): {:+.0} µs",
                    fmt_d(floor["durable write"].p50),
                    own(lat, k) - us(floor["durable write"].p50)
                ),
                "Mount (first: mounts)" => {
                    format!("{:.2}× the floor mount", own_ratio(r, k, "floor mount"))
                }
                "Unmount (last: unmounts)" => {
                    format!("{:.2}× the floor umount2", own_ratio(r, k, "floor umount"))
                }
                "Unmount (last), file system synced before it" => format!(
                    "{:.2}× the floor umount2 (synced before it)",
                    own_ratio(r, k, "floor umount synced")
                ),
                _ => String::new(),
            };
            let own = if k == KINDS[0] {
                "—".into()
            } else {
                format!("{:.0} µs", own(lat, k))
            };
            let _ = writeln!(
                w,
                "| {k} | {} | {} | {own} | {ratio} |",
                fmt_d(s.p50),
                fmt_d(s.p99)
            );
            if k == "Unmount (last: unmounts)" {
                let _ = writeln!(
                    w,
                    "| Unmount (last): cycles in which the overlay was still mounted when the \
                     answer arrived | {} of {n} | | — | after a sync: {} of {n} |",
                    r.still_mounted, r.still_mounted_synced
                );
            }
        }
    }
    if !discard.is_empty() {
        let _ = writeln!(w, "\n### Volatile discard: Mount after the last Unmount\n");
        let _ = writeln!(
            w,
            "The files are made directly in `upper/` while the volume is unmounted (1,000 per \
             directory), then synced; the Mount discards them (checked: the upper is empty after \
             it). Each Mount starts once the janitor has emptied the trash of the one before, \
             and each is paired with a Mount discarding 10 files just before it, the baseline \
             the ratio divides by.\n"
        );
        let _ = writeln!(
            w,
            "| files in the upper | Mount p50 | samples | 10 files just before (p50) | ratio | \
             (making them took) |\n|---|---|---|---|---|---|"
        );
        for d in discard {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.2}× | {} |",
                d.files,
                fmt_d(d.mount.p50),
                d.mount.n,
                fmt_d(d.baseline.p50),
                d.mount.p50.as_secs_f64() / d.baseline.p50.as_secs_f64(),
                fmt_d(d.filling)
            );
        }
    }
    out
}

/// Cycles per second with `clients` clients, if that was measured.
fn rate(tp: &[Throughput], clients: usize) -> Option<f64> {
    tp.iter()
        .find(|t| t.clients == clients)
        .map(|t| t.cycles as f64 / t.elapsed.as_secs_f64())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// The targets of issue 14: `| target | bar | measured | met |`. A phase not run (`--only`)
/// is "not measured".
fn report_targets_14(r: &Requests, tp: &[Throughput], mem_idle: Memory) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "\n### Targets of issue 14\n");
    let _ = writeln!(
        w,
        "Every request finishes its work before it answers. The plugin's own part is a p50 \
         minus the empty round trip's p50; \"before\" is the request phase of this bench on the \
         tree before issue 14 (50b363f, measured on 2026-12-06 on this 2-core machine), and \
         for throughput the previous BENCHMARKS.md ({PREVIOUS_CYCLES_8:.0} cycles/s with 8 \
         clients).\n"
    );
    let _ = writeln!(w, "| target | bar | measured | |\n|---|---|---|---|");
    let mut row = |what: String, bar: String, got: Option<(String, bool)>| {
        let (got, ok) = got.map_or(("not measured (`--only`)".to_owned(), "—"), |(g, ok)| {
            (g, met(ok))
        });
        let _ = writeln!(w, "| {what} | {bar} | {got} | {ok} |");
    };
    let lat = &r.lat;
    let measured = !lat.is_empty();
    let ratio_row = |kind: &str, bare: &str| {
        measured.then(|| {
            let x = own_ratio(r, kind, bare);
            (
                format!(
                    "{x:.2}× ({:.0} µs own part, {} floor)",
                    own(lat, kind),
                    fmt_d(r.floor[bare].p50)
                ),
                x <= 1.5,
            )
        })
    };
    row(
        "Mount (first): the plugin's own part against the floor mount".into(),
        "≤ 1.50×".into(),
        ratio_row("Mount (first: mounts)", "floor mount"),
    );
    row(
        "Unmount (last), the umount inside the answer: the plugin's own part against the \
         floor umount2"
            .into(),
        "≤ 1.50×".into(),
        ratio_row("Unmount (last: unmounts)", "floor umount"),
    );
    let n = lat.get(KINDS[0]).map_or(0, |s| s.n);
    row(
        "the overlay is unmounted when the last Unmount answers".into(),
        format!("still mounted in 0 of {n} cycles"),
        measured.then(|| {
            (
                format!(
                    "{} of {n} ({} of {n} after a sync)",
                    r.still_mounted, r.still_mounted_synced
                ),
                r.still_mounted == 0 && r.still_mounted_synced == 0,
            )
        }),
    );
    row(
        "Create: the plugin's own part − a durable small-file write".into(),
        if measured {
            format!(
                "≤ 0 µs (own part ≤ {}, the durable write's p50)",
                fmt_d(r.floor["durable write"].p50)
            )
        } else {
            "≤ 0 µs".into()
        },
        measured.then(|| {
            let over = own(lat, "Create") - us(r.floor["durable write"].p50);
            (
                format!("{over:+.0} µs ({:.0} µs own part)", own(lat, "Create")),
                over <= 0.0,
            )
        }),
    );
    for (kind, before) in PREVIOUS_P50_US {
        row(
            format!("{kind}: p50 within 10% of before"),
            format!("≤ {:.1} µs (before: {before:.0} µs)", before * 1.1),
            measured.then(|| {
                let p50 = us(lat[kind].p50);
                // Rounded first, so that -0.3% reads "+0%", not "-0%".
                let change = ((p50 / before - 1.0) * 100.0).round() + 0.0;
                (format!("{p50:.1} µs ({change:+.0}%)"), p50 <= before * 1.1)
            }),
        );
    }
    row(
        "throughput with 8 clients ≥ 1.2× before".into(),
        format!(
            "≥ {:.0} cycles/s (1.2 × {PREVIOUS_CYCLES_8:.0})",
            PREVIOUS_CYCLES_8 * 1.2
        ),
        rate(tp, 8).map(|x| {
            (
                format!("{x:.0} cycles/s ({:.2}×)", x / PREVIOUS_CYCLES_8),
                x >= PREVIOUS_CYCLES_8 * 1.2,
            )
        }),
    );
    let idle = mem_idle.rss as f64 / 1024.0;
    row(
        "idle resident memory".into(),
        "< 4 MiB VmRSS".into(),
        Some((format!("{idle:.2} MiB VmRSS"), idle < 4.0)),
    );
    out
}

#[allow(clippy::too_many_arguments)]
fn report(
    opts: &Opts,
    machine: &str,
    req: &Requests,
    discard: &[Discard],
    tp: &[Throughput],
    scale: &Scale,
    sized: &Sized,
    mem_idle: Memory,
    mem_load: Memory,
) -> String {
    let mut r = String::new();
    let w = &mut r;
    let _ = writeln!(w, "{SECTION}\n");
    let _ = writeln!(
        w,
        "Written by `benches/dot-bench.rs`, all in one run of `{COMMAND}` (as root, in a \
         private mount namespace; the plugin is the release binary cargo builds for the bench, \
         on a temporary socket and state root, logging at its default level to a file). The \
         changes made to meet these figures, with before and after, are in the next section.\n"
    );
    let _ = writeln!(w, "Machine: {machine}\n");
    w.push_str(&report_requests(req, discard));

    w.push_str(&report_scale(scale));
    let st = stat(&scale.starts);
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();

    let _ = writeln!(w, "\n### Resident memory of the plugin process\n");
    let _ = writeln!(
        w,
        "| state | VmRSS | VmHWM (peak) | PSS | private | threads |\n|---|---|---|---|---|---|"
    );
    for (what, m) in [
        ("idle, after the first answer", mem_idle),
        (
            "socket-activated, idle after the first answer",
            scale.mem_activated,
        ),
        (
            "after creating the 10,000 volumes and listing them",
            scale.mem_after_create,
        ),
        (
            "restarted on 10,000 volumes, after List, Get, Mount",
            scale.mem_restarted,
        ),
        (
            "under 64 clients (largest of samples every 20 ms)",
            mem_load,
        ),
    ] {
        let _ = writeln!(
            w,
            "| {what} | {} | {} | {} | {} | {} |",
            fmt_kib(m.rss),
            fmt_kib(m.hwm),
            fmt_kib(m.pss),
            fmt_kib(m.private),
            m.threads
        );
    }
    w.push_str(&report_throughput(opts, tp));

    let own_mount = own_ratio(req, "Mount (first: mounts)", "floor mount");
    let own_umount = own_ratio(req, "Unmount (last: unmounts)", "floor umount");
    let own_synced = own_ratio(
        req,
        "Unmount (last), file system synced before it",
        "floor umount synced",
    );
    let flat = discard.last().map_or(0.0, |d| {
        d.mount.p50.as_secs_f64() / d.baseline.p50.as_secs_f64()
    });
    let rate = |c: usize| rate(tp, c).unwrap_or(0.0);
    let fails64 = tp
        .iter()
        .find(|t| t.clients == 64)
        .map_or(0, |t| t.failures);
    let mib = |k: u64| k as f64 / 1024.0;
    let peak_load = mib(mem_load.rss.max(mem_load.hwm));
    let _ = writeln!(w, "\n### Targets of issue 6\n");
    let _ = writeln!(w, "| target | measured | |\n|---|---|---|");
    let rows = [
        (
            "plugin's own part of Mount ≤ 1.3× the bare mount (issue 14's floor)".to_owned(),
            format!("{own_mount:.2}×"),
            own_mount <= 1.3,
        ),
        (
            "plugin's own part of Unmount ≤ 1.3× the bare umount2".to_owned(),
            format!(
                "{own_umount:.2}× ({own_synced:.2}× with the file system synced before both); \
                 the umount is inside the answer"
            ),
            own_umount <= 1.3,
        ),
        (
            "volatile discard flat: 1,000,000 files ≤ 2× 10 files".to_owned(),
            format!(
                "{flat:.2}× ({} files against 10 just before)",
                discard.last().map_or(0, |d| d.files)
            ),
            flat <= 2.0,
        ),
        (
            format!(
                "first answer ≤ 10 ms after start with {} volumes",
                scale.volumes
            ),
            format!("{} p50, {} max", fmt_d(st.p50), fmt_d(max(&scale.starts))),
            st.p50 <= Duration::from_millis(10),
        ),
        (
            format!("List of {} ≤ 20 ms", scale.volumes),
            format!("{} p50", fmt_d(scale.list.p50)),
            scale.list.p50 <= Duration::from_millis(20),
        ),
        (
            "idle resident memory < 3 MiB".to_owned(),
            format!("{:.2} MiB VmRSS", mib(mem_idle.rss)),
            mib(mem_idle.rss) < 3.0,
        ),
        (
            "under 64 clients < 10 MiB".to_owned(),
            format!("{peak_load:.2} MiB peak VmRSS"),
            peak_load < 10.0,
        ),
        (
            "no request fails under 64 clients".to_owned(),
            format!("{fails64} failed"),
            fails64 == 0,
        ),
        (
            "throughput grows from 1 to 8 clients".to_owned(),
            format!("{:.0} → {:.0} cycles/s", rate(1), rate(8)),
            rate(8) > rate(1),
        ),
    ];
    for (what, got, ok) in rows {
        let _ = writeln!(w, "| {what} | {got} | {} |", met(ok));
    }
    w.push_str(&report_targets_14(req, tp, mem_idle));
    w.push_str(&report_sized(sized));
    w.push_str(&report_targets_16(Some(sized)));
    r
}

fn report_scale(scale: &Scale) -> String {
    let mut r = String::new();
    let w = &mut r;
    let st = stat(&scale.starts);
    let act = stat(&scale.activated);
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    let _ = writeln!(w, "\n### {} volumes\n", scale.volumes);
    let _ = writeln!(
        w,
        "Created through the plugin by 8 clients in {:.1} s. Then the plugin is started {} \
         times on that root (spawn to the first answer, for a client polling every 0.1 ms); \
         List, Get and Mount (of volumes never mounted before) go to the first of those \
         processes.\n",
        scale.create_elapsed.as_secs_f64(),
        scale.starts.len()
    );
    let _ = writeln!(w, "| measure | p50 | max or p99 |\n|---|---|---|");
    let _ = writeln!(
        w,
        "| process start → first answer | {} | {} (max) |",
        fmt_d(st.p50),
        fmt_d(max(&scale.starts))
    );
    let _ = writeln!(
        w,
        "| socket activation (`systemd-socket-activate`): connect → first answer, exec \
         included | {} | {} (max) |",
        fmt_d(act.p50),
        fmt_d(max(&scale.activated))
    );
    for (what, s) in [
        (format!("List of {}", scale.volumes), scale.list),
        ("Get of one".into(), scale.get),
        ("Mount of one (first)".into(), scale.mount),
        ("Unmount of it (last)".into(), scale.unmount),
    ] {
        let _ = writeln!(w, "| {what} | {} | {} |", fmt_d(s.p50), fmt_d(s.p99));
    }

    r
}

fn report_throughput(opts: &Opts, tp: &[Throughput]) -> String {
    let mut r = String::new();
    let w = &mut r;
    let _ = writeln!(w, "\n### Throughput: create, mount, unmount, remove\n");
    let _ = writeln!(
        w,
        "Each client, on its own keep-alive connection, runs Create → Mount → Unmount → Remove \
         of volumes of its own for {} s.\n",
        opts.seconds
    );
    let _ = writeln!(
        w,
        "| clients | cycles/s | requests/s | cycle p50 | cycle p99 | failed requests |\n\
         |---|---|---|---|---|---|"
    );
    for t in tp {
        let rate = t.cycles as f64 / t.elapsed.as_secs_f64();
        let _ = writeln!(
            w,
            "| {} | {rate:.0} | {:.0} | {} | {} | {}{} |",
            t.clients,
            rate * 4.0,
            fmt_d(t.cycle.p50),
            fmt_d(t.cycle.p99),
            t.failures,
            t.first_failure
                .as_deref()
                .map(|f| format!(" (first: {f})"))
                .unwrap_or_default()
        );
    }

    r
}

fn fmt_memory(m: Memory) -> String {
    format!(
        "VmRSS {}, VmHWM {}, PSS {}, private {}, {} threads",
        fmt_kib(m.rss),
        fmt_kib(m.hwm),
        fmt_kib(m.pss),
        fmt_kib(m.private),
        m.threads
    )
}

/// The sized phase's tables (issue 16).
fn report_sized(s: &Sized) -> String {
    let mut r = String::new();
    let w = &mut r;
    let n = s.ops.first().map_or(0, |(_, plain, _)| plain.n);
    let _ = writeln!(w, "\n### Sized volumes (issue 16): requests\n");
    let _ = writeln!(
        w,
        "An unsized volume and a sized one (`-o size={SIZED_CAP}`, sparse, ext4: Create runs \
         mkfs.ext4 on the image, the first Mount attaches it through a loop device with direct \
         I/O and mounts it at `changes/`, Remove unmounts it, which detaches the loop device) \
         are made, mounted, unmounted and removed in turn, {n} cycles of each after a warm-up, \
         each timed request after an untimed empty one; the state root's file system is synced \
         before each Create, Mount and Remove, and the janitor has emptied the trash before \
         each cycle. The ratio is sized ÷ unsized, of the p50s.\n"
    );
    let _ = writeln!(
        w,
        "| request | unsized p50 | unsized p99 | sized p50 | sized p99 | ratio |\n\
         |---|---|---|---|---|---|"
    );
    for (kind, plain, sized) in &s.ops {
        let _ = writeln!(
            w,
            "| {kind} | {} | {} | {} | {} | {:.2}× |",
            fmt_d(plain.p50),
            fmt_d(plain.p99),
            fmt_d(sized.p50),
            fmt_d(sized.p99),
            sized.p50.as_secs_f64() / plain.p50.as_secs_f64()
        );
    }
    let _ = writeln!(w, "\n### Sized volumes (issue 16): volatile remount\n");
    let _ = writeln!(
        w,
        "A volatile sized volume (`-o size={SIZED_CAP_WRITE}`: 1 GiB does not fit in an ext4 \
         file system of 1 GiB) is mounted; 10 small files (4 KiB each, then syncfs) or one \
         file of 1 GiB (1 MiB writes, then fsync) are written through its mountpoint, then \
         the last Unmount, and the Mount after it is timed: it swaps in a fresh image (the old \
         one goes to the trash; checked after each: the upper is empty and `changes.img` is \
         another file). The janitor has emptied the trash before each write and each Mount; \
         the two cases alternate. The ratio divides by the 10-file Mount.\n"
    );
    let _ = writeln!(
        w,
        "| written into the upper before the last Unmount | Mount p50 | Mount p99 | samples | \
         ratio | (writing it took, p50) |\n|---|---|---|---|---|---|"
    );
    let base = s.remount_small.p50.as_secs_f64();
    for (what, st, wrote) in [
        ("10 small files", s.remount_small, "—".to_owned()),
        (
            "1 GiB (one file)",
            s.remount_big,
            format!(
                "{} ({:.0} MB/s)",
                fmt_d(s.remount_big_write.p50),
                mb_per_s(GIB, s.remount_big_write.p50)
            ),
        ),
    ] {
        let _ = writeln!(
            w,
            "| {what} | {} | {} | {} | {:.2}× | {wrote} |",
            fmt_d(st.p50),
            fmt_d(st.p99),
            st.n,
            st.p50.as_secs_f64() / base
        );
    }
    let _ = writeln!(
        w,
        "\n### Sized volumes (issue 16): sequential write of 1 GiB\n"
    );
    let _ = writeln!(
        w,
        "One file of 1 GiB written through the mountpoint of a mounted volume in 1 MiB writes, \
         then fsync, the whole timed (open to fsync), after an untimed such write in each; the \
         volumes alternate, and the file is deleted and everything synced between samples. \
         The unsized volume's upper is on the state root's file system; the sized one's \
         (`-o size={SIZED_CAP_WRITE}`) in its image, a sparse file on that same file system. \
         MB/s are 10⁶ bytes per second, of the p50 duration; the ratios are sized ÷ unsized, \
         of the p50s and of the fastest samples (on a virtual disk some samples of either \
         volume are several times slower than the others).\n"
    );
    let _ = writeln!(
        w,
        "| volume | MB/s (p50) | samples | slowest – fastest | ratio | ratio of the fastest |\n\
         |---|---|---|---|---|---|"
    );
    let plain = mb_per_s(GIB, stat(&s.write_unsized).p50);
    let fastest = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let plain_fastest = mb_per_s(GIB, fastest(&s.write_unsized));
    for (what, v) in [
        ("unsized", &s.write_unsized),
        ("sized (`size=2Gi`)", &s.write_sized),
    ] {
        let st = stat(v);
        let slow = v.iter().max().copied().unwrap_or_default();
        let (x, fast) = (mb_per_s(GIB, st.p50), mb_per_s(GIB, fastest(v)));
        let _ = writeln!(
            w,
            "| {what} | {x:.0} | {} | {:.0} – {fast:.0} | {:.2}× | {:.2}× |",
            st.n,
            mb_per_s(GIB, slow),
            x / plain,
            fast / plain_fastest
        );
    }
    r
}

/// The volatile remount ratio (1 GiB ÷ 10 files) and the write throughput ratio (sized ÷
/// unsized).
fn sized_ratios(s: &Sized) -> (f64, f64) {
    let flat = s.remount_big.p50.as_secs_f64() / s.remount_small.p50.as_secs_f64();
    let write = stat(&s.write_unsized).p50.as_secs_f64() / stat(&s.write_sized).p50.as_secs_f64();
    (flat, write)
}

/// Sized ÷ unsized throughput of the fastest samples of the sequential write.
fn fastest_ratio(s: &Sized) -> f64 {
    let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64();
    min(&s.write_unsized) / min(&s.write_sized)
}

/// The targets of issue 16: `| target | bar | measured | met |`; "not measured" without the
/// sized phase (`--only`).
fn report_targets_16(s: Option<&Sized>) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "\n### Targets of issue 16\n");
    let _ = writeln!(w, "| target | bar | measured | |\n|---|---|---|---|");
    let mut row = |what: &str, bar: &str, got: Option<(String, bool)>| {
        let (got, ok) = got.map_or(("not measured (`--only`)".to_owned(), "—"), |(g, ok)| {
            (g, met(ok))
        });
        let _ = writeln!(w, "| {what} | {bar} | {got} | {ok} |");
    };
    let ratios = s.map(|s| (s, sized_ratios(s)));
    row(
        "volatile remount of a sized volume flat: the Mount after 1 GiB was written against \
         the one after 10 small files",
        "≤ 2×",
        ratios.map(|(s, (flat, _))| {
            (
                format!(
                    "{flat:.2}× ({} against {})",
                    fmt_d(s.remount_big.p50),
                    fmt_d(s.remount_small.p50)
                ),
                flat <= 2.0,
            )
        }),
    );
    row(
        "sequential write of 1 GiB in a sized volume against an unsized one",
        "≥ 0.80×",
        ratios.map(|(s, (_, write))| {
            (
                format!(
                    "{write:.2}× of the p50s ({:.0} MB/s against {:.0} MB/s); {:.2}× of the \
                     fastest samples",
                    mb_per_s(GIB, stat(&s.write_sized).p50),
                    mb_per_s(GIB, stat(&s.write_unsized).p50),
                    fastest_ratio(s)
                ),
                write >= 0.8,
            )
        }),
    );
    out
}
