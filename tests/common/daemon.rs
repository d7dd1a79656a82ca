//! Runs the real `docker-on-top` binary inside a private mount namespace and talks to it
//! exactly as dockerd does.
//!
//! Every test gets an [`Env`]: a temporary directory (state root, socket, logs), an anchor
//! process (`unshare --mount --propagation private sleep infinity`) that owns a private mount
//! namespace, and daemons started in that namespace with `nsenter -t ANCHOR -m`. Overlays the
//! daemon mounts live in the anchor's namespace only, survive a `kill -9` of the daemon (the
//! anchor keeps the namespace alive) and disappear when the anchor dies; the anchor and every
//! process spawned here are killed on drop, also when a test panics, and carry a parent-death
//! signal in case the test binary itself dies.
//!
//! The client ([`request`], [`Env::call`]) writes HTTP/1.1 by hand over a unix socket with the
//! headers of Go's HTTP client as dockerd uses it: `POST`, `Host: plugin`, the plugin `Accept`
//! header, a `Content-Length`, no `Content-Type`, and an empty body for argument-less calls. Every
//! reply is checked to be JSON, and every error to be `{"Err": "non-empty message"}`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");

/// How long a daemon may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

// ----- Processes -------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    status: Option<ExitStatus>,
    pub what: String,
}

impl Proc {
    /// Spawns `cmd`; the child gets SIGKILL if the spawning thread dies first.
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Proc {
            child: Some(child),
            status: None,
            what: what.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process already reaped").id()
    }

    /// The exit status if the process has ended (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let child = self.child.as_mut()?;
            self.status = child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        }
        self.status
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid 0");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("cannot signal {} (pid {}): {e}", self.what, self.pid()));
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        let child = self.child.as_mut().unwrap();
        let _ = child.kill();
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        self.status = Some(status);
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && self.status.is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `ready` every 10 ms until it is true; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The inode of the mount namespace of `pid` (`self` for this process).
pub fn mount_ns(pid: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .unwrap_or_else(|e| panic!("cannot read the mount namespace of {pid}: {e}"))
        .ino()
}

pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

// ----- Mount namespace -------------------------------------------------------------------

/// A `sleep infinity` in a private mount namespace of its own; killed on drop, which takes
/// the namespace and every mount in it away (once no other process is in it).
pub struct Anchor {
    proc: Proc,
}

impl Anchor {
    pub fn new() -> Anchor {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null());
        let mut proc = Proc::spawn(cmd, "the namespace anchor (unshare)");
        let pid = proc.pid();
        let own = mount_ns("self");
        wait_until(
            Duration::from_secs(10),
            "unshare to enter its namespace",
            || {
                if let Some(status) = proc.try_status() {
                    panic!(
                        "`unshare --mount --propagation private sleep infinity` exited with {status}: \
                     these tests need root (CAP_SYS_ADMIN) and util-linux"
                    );
                }
                comm(pid) == "sleep" && mount_ns(&pid.to_string()) != own
            },
        );
        Anchor { proc }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn ns(&self) -> u64 {
        mount_ns(&self.pid().to_string())
    }

    /// `path` as seen inside the anchor's mount namespace.
    pub fn path(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").expect("absolute path");
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    /// The mount table of the namespace.
    pub fn mountinfo(&self) -> Vec<MountEntry> {
        let text = std::fs::read(format!("/proc/{}/mountinfo", self.pid()))
            .expect("cannot read the anchor's mountinfo");
        parse_mountinfo(&text)
    }

    /// A command that runs `args` inside the namespace (nsenter execs, so the command's pid is
    /// the pid of `args[0]`).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid().to_string())
            .arg("-m")
            .arg("--")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside the namespace to completion; panics unless it succeeds.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in the namespace: {e}"));
        assert!(
            out.status.success(),
            "{args:?} in the namespace failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

impl Default for Anchor {
    fn default() -> Self {
        Self::new()
    }
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
    pub line: String,
}

fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(
                b[i + 1..i + 4]
                    .iter()
                    .fold(0u8, |acc, c| acc * 8 + (c - b'0')),
            );
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_octal(fields.get(4)?)),
                fstype: fields.get(sep + 1)?.to_string(),
                source: unescape_octal(fields.get(sep + 2)?),
                super_options: fields.get(sep + 3).unwrap_or(&"").to_string(),
                line: line.to_owned(),
            })
        })
        .collect()
}

// ----- HTTP client -----------------------------------------------------------------------

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply (status {}) is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Checks the reply is JSON and that an error is `{"Err": "non-empty"}`: `Err(message)`
    /// for an error reply, `Ok(body)` otherwise.
    pub fn outcome(&self) -> Result<Value, String> {
        let body = self.json();
        let err = body.get("Err");
        if self.status != 200 {
            let msg = err.and_then(Value::as_str).unwrap_or_else(|| {
                panic!(
                    "error reply (status {}) without a string \"Err\": {body}",
                    self.status
                )
            });
            assert!(
                !msg.trim().is_empty(),
                "error reply (status {}) with an empty message: {body}",
                self.status
            );
            return Err(msg.to_owned());
        }
        assert!(
            body.is_object(),
            "success reply is not a JSON object: {body}"
        );
        match err {
            None | Some(Value::Null) => Ok(body),
            Some(Value::String(s)) if s.is_empty() => Ok(body),
            Some(e) => panic!("status 200 with an error (dockerd would fail the call): {e}"),
        }
    }
}

/// One client connection, reusable for several requests (keep-alive, like Go's client).
pub struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    pub fn open(socket: &Path) -> std::io::Result<Conn> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request the way dockerd does. `body` `None` sends no `Content-Length` at
    /// all (only used for methods other than POST).
    pub fn send(&mut self, method: &str, path: &str, body: Option<&[u8]>) {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n"
        );
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("Accept: application/vnd.docker.plugins.v1.2+json\r\n\r\n");
        let stream = self.reader.get_mut();
        let mut data = head.into_bytes();
        data.extend_from_slice(body.unwrap_or_default());
        // A server may answer (413) and close before reading a large body: the reply is still
        // there to be read.
        match stream.write_all(&data) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::BrokenPipe
                        | ErrorKind::ConnectionReset
                        | ErrorKind::WouldBlock
                        | ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("cannot send {method} {path}: {e}"),
        }
    }

    /// Writes `bytes` as they are (a hand-made request, or part of one).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        assert!(self.try_send_raw(bytes), "cannot send a raw request");
    }

    /// Writes `bytes`; false when the server has closed the connection (or stopped reading).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> bool {
        self.reader.get_mut().write_all(bytes).is_ok()
    }

    /// Reads one response (Content-Length, chunked, or up to EOF).
    pub fn receive(&mut self) -> Response {
        let r = &mut self.reader;
        let line = read_line(r).expect("no HTTP response (connection closed)");
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        assert!(
            version.starts_with("HTTP/1."),
            "not an HTTP/1.x status line: {line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = read_line(r).expect("connection closed inside the headers");
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let size_line = read_line(r).expect("connection closed inside a chunked body");
                let size_text = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_text, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                if size == 0 {
                    // Trailers, then the empty line.
                    while !read_line(r)
                        .expect("connection closed in trailers")
                        .is_empty()
                    {}
                    break;
                }
                let mut chunk = vec![0; size];
                r.read_exact(&mut chunk).expect("truncated chunk");
                response.body.extend_from_slice(&chunk);
                assert_eq!(
                    read_line(r).as_deref(),
                    Some(""),
                    "chunk not followed by CRLF"
                );
            }
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .parse()
                .unwrap_or_else(|_| panic!("bad Content-Length {len:?}"));
            response.body = vec![0; len];
            r.read_exact(&mut response.body)
                .expect("response body shorter than its Content-Length");
        } else {
            r.read_to_end(&mut response.body)
                .expect("cannot read the response body");
        }
        response
    }

    pub fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.send(method, path, body);
        self.receive()
    }
}

/// One CRLF (or LF) terminated line without its terminator; `None` at EOF.
fn read_line(r: &mut BufReader<UnixStream>) -> Option<String> {
    let mut buf = Vec::new();
    let n = r
        .read_until(b'\n', &mut buf)
        .unwrap_or_else(|e| panic!("cannot read the response: {e}"));
    if n == 0 {
        return None;
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// One request on a fresh connection.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    Conn::open(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {socket:?}: {e}"))
        .request(method, path, body)
}

/// The body dockerd sends for `args`: Go's `json.NewEncoder(..).Encode` output (with its
/// trailing newline), or nothing at all for argument-less calls.
pub fn dockerd_body(args: Option<&Value>) -> Vec<u8> {
    match args {
        None => Vec::new(),
        Some(v) => {
            let mut b = serde_json::to_vec(v).unwrap();
            b.push(b'\n');
            b
        }
    }
}

/// A plugin call as dockerd makes it.
pub fn call(socket: &Path, endpoint: &str, args: Option<&Value>) -> Result<Value, String> {
    let body = dockerd_body(args);
    request(socket, "POST", endpoint, Some(&body)).outcome()
}

// ----- Files -----------------------------------------------------------------------------

/// Every path under `dir` (relative), with a letter for its type; does not follow symlinks.
pub fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => panic!("cannot list {dir:?}: {e}"),
        };
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            let ft = entry.file_type().unwrap();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_file() {
                'f'
            } else {
                '?'
            };
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(format!("{kind} {rel}"));
            if ft.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Names directly in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ----- The test environment --------------------------------------------------------------

/// A temporary directory, a private mount namespace and (at most) one daemon.
pub struct Env {
    pub daemon: Option<Proc>,
    pub anchor: Anchor,
    /// Canonical path of the temporary directory.
    pub dir: PathBuf,
    pub root: PathBuf,
    pub socket: PathBuf,
    logs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env::with_root("state")
    }

    /// An environment whose state root is `DIR/root_name`.
    pub fn with_root(root_name: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("dot-proto-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let anchor = Anchor::new();
        Env {
            daemon: None,
            anchor,
            root: dir.join(root_name),
            socket: dir.join("plugin.sock"),
            dir,
            logs: Vec::new(),
            _tmp: tmp,
        }
    }

    fn log_path(&mut self) -> PathBuf {
        let path = self.dir.join(format!("daemon-{}.log", self.logs.len()));
        self.logs.push(path.clone());
        path
    }

    /// A command running the daemon in the namespace with `--socket` and `--root` set;
    /// stderr and stdout go to a new log file (returned).
    pub fn daemon_command(&mut self, extra: &[&str]) -> (Command, PathBuf) {
        let log = self.log_path();
        let socket = self.socket.to_str().unwrap().to_owned();
        let root = self.root.to_str().unwrap().to_owned();
        let mut args = vec![BIN, "--socket", &socket, "--root", &root];
        args.extend_from_slice(extra);
        let mut cmd = self.anchor.command(&args);
        let file = File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "debug")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        (cmd, log)
    }

    /// Starts the daemon and waits until it answers.
    pub fn start(&mut self, extra: &[&str]) {
        self.start_adjusted(extra, |_| {});
    }

    /// [`Env::start`], with `adjust` applied to the command first (e.g. resource limits).
    pub fn start_adjusted(&mut self, extra: &[&str], adjust: impl FnOnce(&mut Command)) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let (mut cmd, log) = self.daemon_command(extra);
        adjust(&mut cmd);
        let mut proc = Proc::spawn(cmd, "the daemon");
        let socket = self.socket.clone();
        wait_until(START_TIMEOUT, "the daemon to answer", || {
            if let Some(status) = proc.try_status() {
                panic!(
                    "the daemon exited with {status} before answering:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            match Conn::open(&socket) {
                Ok(mut conn) => {
                    let body = dockerd_body(None);
                    conn.request("POST", "/VolumeDriver.Capabilities", Some(&body))
                        .status
                        == 200
                }
                Err(_) => false,
            }
        });
        // nsenter execs: the child is the daemon itself, in the anchor's namespace.
        let exe = std::fs::read_link(format!("/proc/{}/exe", proc.pid())).unwrap();
        assert_eq!(
            exe,
            std::fs::canonicalize(BIN).unwrap(),
            "the spawned process is not the daemon"
        );
        assert_eq!(
            mount_ns(&proc.pid().to_string()),
            self.anchor.ns(),
            "the daemon is not in the anchor's mount namespace"
        );
        self.daemon = Some(proc);
    }

    pub fn daemon(&mut self) -> &mut Proc {
        self.daemon.as_mut().expect("no daemon running")
    }

    /// `kill -9` the daemon.
    pub fn kill9(&mut self) {
        let mut proc = self.daemon.take().expect("no daemon running");
        proc.kill();
    }

    /// SIGTERM, then waits (up to `timeout`) for the daemon's exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut proc = self.daemon.take().expect("no daemon running");
        proc.signal(rustix::process::Signal::TERM);
        proc.wait_timeout(timeout)
            .unwrap_or_else(|| panic!("the daemon did not exit within {timeout:?} of SIGTERM"))
    }

    /// Everything the daemons of this environment logged.
    pub fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    // ----- Protocol calls ----------------------------------------------------------------

    pub fn call(&self, endpoint: &str, args: Option<Value>) -> Result<Value, String> {
        call(&self.socket, endpoint, args.as_ref())
    }

    pub fn create(&self, name: &str, opts: &[(&str, &str)]) -> Result<(), String> {
        let opts: serde_json::Map<String, Value> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        self.call(
            "/VolumeDriver.Create",
            Some(json!({ "Name": name, "Opts": opts })),
        )
        .map(drop)
    }

    pub fn create_ok(&self, name: &str, base: &Path, volatile: bool) {
        let volatile = if volatile { "true" } else { "false" };
        self.create(
            name,
            &[("base", base.to_str().unwrap()), ("volatile", volatile)],
        )
        .unwrap_or_else(|e| panic!("Create {name}: {e}"));
    }

    pub fn mount(&self, name: &str, id: &str) -> Result<String, String> {
        let body = self.call(
            "/VolumeDriver.Mount",
            Some(json!({ "Name": name, "ID": id })),
        )?;
        Ok(body["Mountpoint"]
            .as_str()
            .unwrap_or_else(|| panic!("Mount reply without a Mountpoint: {body}"))
            .to_owned())
    }

    pub fn mount_ok(&self, name: &str, id: &str) -> PathBuf {
        let mp = self
            .mount(name, id)
            .unwrap_or_else(|e| panic!("Mount {name} {id}: {e}"));
        assert_eq!(PathBuf::from(&mp), self.mountpoint(name));
        PathBuf::from(mp)
    }

    /// An Unmount. The last one of a volume has unmounted its overlay when it answers.
    pub fn unmount(&self, name: &str, id: &str) -> Result<(), String> {
        self.call(
            "/VolumeDriver.Unmount",
            Some(json!({ "Name": name, "ID": id })),
        )
        .map(drop)
    }

    pub fn unmount_ok(&self, name: &str, id: &str) {
        self.unmount(name, id)
            .unwrap_or_else(|e| panic!("Unmount {name} {id}: {e}"));
    }

    pub fn remove(&self, name: &str) -> Result<(), String> {
        self.call("/VolumeDriver.Remove", Some(json!({ "Name": name })))
            .map(drop)
    }

    /// The `Volume` object of a Get reply.
    pub fn get(&self, name: &str) -> Result<Value, String> {
        let body = self.call("/VolumeDriver.Get", Some(json!({ "Name": name })))?;
        let volume = body
            .get("Volume")
            .unwrap_or_else(|| panic!("Get reply without Volume: {body}"))
            .clone();
        assert!(volume.is_object(), "Volume is not an object: {body}");
        Ok(volume)
    }

    pub fn get_ok(&self, name: &str) -> Value {
        self.get(name).unwrap_or_else(|e| panic!("Get {name}: {e}"))
    }

    /// The Mountpoint of a Path reply; `None` when absent or empty.
    pub fn path(&self, name: &str) -> Result<Option<String>, String> {
        let body = self.call("/VolumeDriver.Path", Some(json!({ "Name": name })))?;
        Ok(match body.get("Mountpoint") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => panic!("Path reply with a non-string Mountpoint: {other}"),
        })
    }

    /// Names in a List reply, sorted.
    pub fn list(&self) -> Vec<String> {
        let body = self
            .call("/VolumeDriver.List", None)
            .unwrap_or_else(|e| panic!("List: {e}"));
        let mut names: Vec<String> = body["Volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("List reply without a Volumes array: {body}"))
            .iter()
            .map(|v| {
                v["Name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("List entry without a Name: {v}"))
                    .to_owned()
            })
            .collect();
        names.sort();
        names
    }

    // ----- State -------------------------------------------------------------------------

    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join(name).join("mountpoint")
    }

    /// The upper directory, as the daemon sees it: a sized volume's is in its image's file
    /// system, mounted in the daemon's namespace only.
    pub fn upper(&self, name: &str) -> PathBuf {
        let changes = self.root.join(name).join("changes");
        if changes.is_dir() {
            self.seen(&changes.join("upper"))
        } else {
            self.root.join(name).join("upper")
        }
    }

    /// Creates a sized volume (`-o size=`).
    pub fn create_sized_ok(&self, name: &str, base: &Path, volatile: bool, size: &str) {
        let volatile = if volatile { "true" } else { "false" };
        self.create(
            name,
            &[
                ("base", base.to_str().unwrap()),
                ("volatile", volatile),
                ("size", size),
            ],
        )
        .unwrap_or_else(|e| panic!("Create {name}: {e}"));
    }

    /// Loop devices whose backing file is under the state root.
    pub fn loop_devices(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/sys/block").unwrap() {
            let entry = entry.unwrap();
            let backing = entry.path().join("loop/backing_file");
            if let Ok(file) = std::fs::read_to_string(&backing)
                && Path::new(file.trim()).starts_with(&self.root)
            {
                found.push(format!(
                    "{} ({})",
                    entry.file_name().to_string_lossy(),
                    file.trim()
                ));
            }
        }
        found
    }

    /// Overlays mounted exactly at `target` in the namespace.
    pub fn overlays_at(&self, target: &Path) -> Vec<MountEntry> {
        self.anchor
            .mountinfo()
            .into_iter()
            .filter(|m| m.mount_point == target && m.fstype == "overlay")
            .collect()
    }

    /// Every mount (of any type) at or under `target` in the namespace.
    pub fn mounts_under(&self, target: &Path) -> Vec<MountEntry> {
        self.anchor
            .mountinfo()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(target))
            .collect()
    }

    /// Panics unless exactly one overlay is mounted on `name`'s mountpoint (and nothing else
    /// is mounted there or below).
    pub fn assert_mounted_once(&self, name: &str) {
        let mp = self.mountpoint(name);
        let all = self.mounts_under(&mp);
        let overlays = self.overlays_at(&mp);
        assert!(
            overlays.len() == 1 && all.len() == 1,
            "expected exactly one overlay on {mp:?}, found: {:#?}",
            all.iter().map(|m| &m.line).collect::<Vec<_>>()
        );
    }

    pub fn assert_not_mounted(&self, name: &str) {
        let all = self.mounts_under(&self.mountpoint(name));
        assert!(
            all.is_empty(),
            "expected nothing mounted on volume {name}, found: {:#?}",
            all.iter().map(|m| &m.line).collect::<Vec<_>>()
        );
    }

    /// `path` as the daemon sees it (through its mounts).
    pub fn seen(&self, path: &Path) -> PathBuf {
        self.anchor.path(path)
    }

    /// A process in the namespace, e.g. a shell holding a directory busy.
    pub fn spawn_in_ns(&self, args: &[&str], what: &str) -> Proc {
        let mut cmd = self.anchor.command(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        Proc::spawn(cmd, what)
    }

    /// A process in a new mount namespace copied from the daemon's (`unshare -m sleep`), once
    /// it runs there: it holds a copy of every mount of the namespace now, as a container of
    /// another engine would. With its pid.
    pub fn holder_in_new_namespace(&self, what: &str) -> (Proc, u32) {
        let args = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sleep",
            "1000",
        ];
        let mut holder = self.spawn_in_ns(&args, what);
        let hpid = holder.pid();
        let anchor_ns = self.anchor.ns();
        wait_until(
            Duration::from_secs(10),
            &format!("{what}'s namespace"),
            || {
                assert!(holder.try_status().is_none(), "{what} exited");
                comm(hpid) == "sleep" && mount_ns(&hpid.to_string()) != anchor_ns
            },
        );
        (holder, hpid)
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        self.anchor.kill();
        if std::thread::panicking() {
            eprintln!("daemon logs of the failed test:\n{}", self.logs());
        }
    }
}
