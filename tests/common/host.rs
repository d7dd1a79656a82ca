//! Helpers for the whole-system tests (`tests/docker.rs`, `tests/systemd.rs`, `tests/podman.rs`):
//! commands with a timeout, a private mount namespace that dies with the test, and a private
//! dockerd in it.
//!
//! Included with `#[path = "common/host.rs"] mod host;` (not through `common/mod.rs`, so the
//! other suites do not compile it).
//!
//! The isolation is the one of `tests/docker.rs`: an anchor process (`unshare --mount
//! --propagation private sleep infinity`) owns a mount namespace in which private tmpfs mounts
//! hide the host's `/run/docker/plugins`, `/etc/docker` and `/run/containerd`; dockerd (own
//! data root, exec root, socket, pidfile, config, cgroup parent) and anything else the test
//! starts run there through `nsenter`. [`Sandbox::destroy`] (also on drop) kills every process
//! of the cgroup parent and of the namespace, kills the anchor (its mounts vanish) and removes
//! the temporary directory. Every process started here carries `PR_SET_PDEATHSIG`.
//! [`Sandbox::with_network`] gives the namespace a private network namespace as well (only
//! `lo`), for engines that make bridges and listen on ports (a swarm).
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

pub type Res<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !($cond) {
            return Err(format!($($arg)+));
        }
    };
}
pub(crate) use ensure;

/// Adds context to an error.
pub trait Context<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Set once the test was interrupted (by a signal): nothing new is started from then on.
/// Never set unless a test calls [`set_interrupted`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the test as interrupted: [`run_cmd`] and [`spawn_logged`] refuse to start anything.
pub fn set_interrupted() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails once [`set_interrupted`] was called.
pub fn check_interrupted() -> Res {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Res<Output> {
    check_interrupted()?;
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().ctx(format!("cannot run {shown}"))?;
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(status) => Some(status.ctx(format!("waiting for {shown}"))?),
        Err(_) => {
            // Not reaped yet (the waiter is blocked in wait), so the pid is still ours.
            kill(pid, Signal::KILL);
            let _ = rx.recv();
            None
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(Output {
            code: status.code(),
            stdout,
            stderr,
        }),
        None => Err(format!(
            "{shown} timed out after {timeout:?}; stdout: {stdout:?}; stderr: {stderr:?}"
        )),
    }
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Res<String> {
    let out = run_cmd(cmd, timeout)?;
    ensure!(
        out.success(),
        "{cmd:?} failed ({:?}): {}{}",
        out.code,
        out.stderr.trim(),
        stdout_suffix(&out.stdout)
    );
    Ok(out.stdout)
}

/// `; stdout: STDOUT` for an error message, or nothing when `stdout` is blank.
pub fn stdout_suffix(stdout: &str) -> String {
    if stdout.trim().is_empty() {
        String::new()
    } else {
        format!("; stdout: {}", stdout.trim())
    }
}

pub fn kill(pid: u32, signal: Signal) -> bool {
    Pid::from_raw(pid as i32).is_some_and(|p| rustix::process::kill_process(p, signal).is_ok())
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_until_every(Duration::from_millis(50), timeout, cond)
}

/// Polls `cond` every `poll` until it holds or `timeout` passes.
pub fn wait_until_every(poll: Duration, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(poll);
    }
}

pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// What a suite that runs a private dockerd needs, with the Debian package of each.
pub const DOCKER_PROGRAMS: [(&str, &str); 7] = [
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("tar", "tar"),
];

/// Makes directory `dir` holding `files` (paths relative to it, and their content).
pub fn make_tree(dir: &Path, files: &[(&str, &str)]) -> Res<PathBuf> {
    fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
    for (file, content) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).ctx(format!("creating {}", parent.display()))?;
        }
        fs::write(&path, content).ctx(format!("writing {}", path.display()))?;
    }
    Ok(dir.to_owned())
}

/// Fails naming the Debian packages to install when a program is missing.
pub fn require_programs(programs: &[(&str, &str)]) -> Res {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(p, _)| !in_path(p))
        .map(|(p, pkg)| format!("{p} (Debian package {pkg})"))
        .collect();
    ensure!(
        missing.is_empty(),
        "missing programs: {}; scripts/test installs them",
        missing.join(", ")
    );
    Ok(())
}

pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Spawns `cmd` with stdout and stderr appended to `log`, in its own process group, killed
/// when this process dies.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Res<Child> {
    check_interrupted()?;
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ctx(format!("opening {}", log.display()))?;
    let file2 = file.try_clone().ctx("dup log")?;
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(io::Error::from)
        });
    }
    cmd.spawn().ctx(format!("cannot start {cmd:?}"))
}

/// The mount namespace (`mnt:[N]`) of this process, empty when unknown.
pub fn own_ns() -> String {
    fs::read_link("/proc/self/ns/mnt")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The mount namespace (`mnt:[N]`) of `pid`.
pub fn ns_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Pids of the processes (but this one) whose mount namespace is `ns`.
pub fn pids_in_ns(ns: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && ns_of(pid).as_deref() == Some(ns))
        .collect()
}

/// The cgroup directories named `parent` in every hierarchy and below, deepest first.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut hierarchies = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
        hierarchies.extend(rd.flatten().map(|e| e.path()));
    }
    let mut out = Vec::new();
    for h in hierarchies {
        let dir = h.join(parent);
        if dir.is_dir() {
            walk(&dir, &mut out);
        }
    }
    out
}

/// Kills every process in the cgroups named `parent` (containers live in child namespaces, but
/// in that cgroup), again every `pause` until none is left, `rounds` times at most.
pub fn kill_cgroup(parent: &str, rounds: usize, pause: Duration) {
    for _ in 0..rounds {
        let mut any = false;
        for dir in cgroup_dirs(parent) {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                any = true;
                kill(pid, Signal::KILL);
            }
        }
        if !any {
            break;
        }
        thread::sleep(pause);
    }
}

/// Kills every process in the mount namespace `ns`, again every `poll` until none is left
/// (10 s at most); returns a warning when some remain.
pub fn kill_ns(ns: &str, poll: Duration) -> Option<String> {
    let gone = wait_until_every(poll, Duration::from_secs(10), || {
        let pids = pids_in_ns(ns);
        for &pid in &pids {
            kill(pid, Signal::KILL);
        }
        pids.is_empty()
    });
    (!gone).then(|| {
        format!(
            "processes still in the test mount namespace: {:?}",
            pids_in_ns(ns)
        )
    })
}

/// Removes the (emptied) cgroup directories named `parent`, each retried every `poll` for
/// `timeout`; returns warnings.
pub fn remove_cgroups(parent: &str, timeout: Duration, poll: Duration) -> Vec<String> {
    let mut warnings = Vec::new();
    for dir in cgroup_dirs(parent) {
        let removed = wait_until_every(poll, timeout, || {
            fs::remove_dir(&dir).is_ok() || !dir.exists()
        });
        if !removed {
            warnings.push(format!("cannot remove the cgroup {}", dir.display()));
        }
    }
    warnings
}

/// Removes the empty directories `dirs` (made in that order), innermost first; returns warnings.
pub fn remove_dirs(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .rev()
        .filter_map(|dir| {
            fs::remove_dir(dir)
                .err()
                .map(|e| format!("cannot remove {}: {e}", dir.display()))
        })
        .collect()
}

/// How often [`Sandbox::destroy`] polls.
const POLL: Duration = Duration::from_millis(50);

/// Creates `dir` and its missing ancestors, outermost first, passing each one made to `made`
/// (to be removed again at the end).
pub fn create_missing_dirs(dir: &Path, mut made: impl FnMut(PathBuf)) -> Res {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    for d in missing {
        fs::create_dir(&d).ctx(format!("creating {}", d.display()))?;
        made(d);
    }
    Ok(())
}

/// The anchor: `unshare --mount --propagation private sleep infinity`, a process that owns a
/// private mount namespace for as long as it lives.
pub fn anchor_command() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sleep", "infinity"]);
    cmd
}

/// [`anchor_command`] with a private network namespace too: `unshare --mount --net ...`.
pub fn anchor_command_with_network() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--net",
        "--propagation",
        "private",
        "sleep",
        "infinity",
    ]);
    cmd
}

/// `nsenter -t ANCHOR -m -- program`: `program` in the mount namespace of `anchor_pid`.
pub fn nsenter(anchor_pid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    nsenter_namespaces(anchor_pid, false, program)
}

/// `nsenter -t ANCHOR -m [-n] -- program`: with `network`, in the anchor's network namespace
/// as well.
pub fn nsenter_namespaces(
    anchor_pid: u32,
    network: bool,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("-t").arg(anchor_pid.to_string()).arg("-m");
    if network {
        cmd.arg("-n");
    }
    cmd.arg("--").arg(program);
    cmd
}

/// Adds to `cmd` (a dockerd) the flags of a private engine: data root, exec root, pidfile and
/// `daemon.json` in `dir`, the API on `sock`, no networking, containers under `cgroup_parent`.
pub fn private_dockerd_args<'a>(
    cmd: &'a mut Command,
    dir: &Path,
    sock: &Path,
    cgroup_parent: &str,
) -> &'a mut Command {
    cmd.arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("--config-file")
        .arg(dir.join("daemon.json"))
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
            "--cgroup-parent",
            cgroup_parent,
        ])
}

/// A temporary directory and a private mount namespace, destroyed on drop.
pub struct Sandbox {
    pub tmp: PathBuf,
    pub anchor_pid: u32,
    /// Cgroup parent for dockerd's containers: `dot-NAME-PID`.
    pub cgroup_parent: String,
    /// Whether the anchor has its own network namespace ([`Sandbox::with_network`]).
    pub network: bool,
    name: String,
    ns: Option<String>,
    anchor: Option<Child>,
    children: Vec<Child>,
    made_dirs: Vec<PathBuf>,
    destroyed: bool,
}

impl Sandbox {
    /// Creates `/tmp/dot-NAME-*` and the anchor; mounts a private tmpfs on each of
    /// `private_tmpfs` inside the namespace (creating missing mount points on the host, removed
    /// again at the end).
    pub fn new(name: &str, private_tmpfs: &[&str]) -> Res<Sandbox> {
        Self::create(name, private_tmpfs, false)
    }

    /// [`Sandbox::new`] with a private network namespace as well, holding only `lo` (up):
    /// bridges, veths and listening ports of what runs in it never reach the host's network,
    /// and vanish with it. Needs `ip` (iproute2).
    pub fn with_network(name: &str, private_tmpfs: &[&str]) -> Res<Sandbox> {
        let sandbox = Self::create(name, private_tmpfs, true)?;
        run_ok(
            sandbox.ns_command("ip").args(["link", "set", "lo", "up"]),
            Duration::from_secs(30),
        )
        .ctx("bringing up lo in the private network namespace")?;
        Ok(sandbox)
    }

    fn create(name: &str, private_tmpfs: &[&str], network: bool) -> Res<Sandbox> {
        ensure!(
            rustix::process::geteuid().is_root(),
            "the {name} tests must run as root: sudo ./scripts/test"
        );
        let tmp = tempfile::Builder::new()
            .prefix(&format!("dot-{name}-"))
            .tempdir()
            .ctx("creating the temporary directory")?
            .keep();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).ctx("chmod tmp")?;
        let mut sandbox = Sandbox {
            tmp,
            anchor_pid: 0,
            cgroup_parent: format!("dot-{name}-{}", std::process::id()),
            network,
            name: name.to_owned(),
            ns: None,
            anchor: None,
            children: Vec::new(),
            made_dirs: Vec::new(),
            destroyed: false,
        };
        for dir in private_tmpfs {
            create_missing_dirs(Path::new(dir), |d| sandbox.made_dirs.push(d))?;
        }
        let mut anchor = if network {
            anchor_command_with_network()
        } else {
            anchor_command()
        };
        let child = spawn_logged(&mut anchor, &sandbox.tmp.join("anchor.log"))?;
        sandbox.anchor_pid = child.id();
        sandbox.anchor = Some(child);
        let own = ns_of(std::process::id());
        let pid = sandbox.anchor_pid;
        ensure!(
            wait_until(Duration::from_secs(10), || ns_of(pid)
                .is_some_and(|ns| Some(&ns) != own.as_ref())),
            "the anchor process did not enter a new mount namespace"
        );
        sandbox.ns = ns_of(pid);
        for target in private_tmpfs {
            run_ok(
                sandbox.ns_command("mount").args([
                    "-t",
                    "tmpfs",
                    "-o",
                    "mode=0755,size=1m",
                    "dot-test",
                    target,
                ]),
                Duration::from_secs(30),
            )
            .ctx(format!("mounting a private tmpfs on {target}"))?;
        }
        Ok(sandbox)
    }

    /// Bind-mounts `source` on `target` inside the namespace (creating a missing `target` on
    /// the host, removed again at the end): the namespace sees `source` there, the host does
    /// not.
    pub fn bind(&mut self, source: &Path, target: &str) -> Res {
        create_missing_dirs(Path::new(target), |d| self.made_dirs.push(d))?;
        run_ok(
            self.ns_command("mount")
                .arg("--bind")
                .arg(source)
                .arg(target),
            Duration::from_secs(30),
        )
        .ctx(format!("bind-mounting {} on {target}", source.display()))?;
        Ok(())
    }

    /// `nsenter -t ANCHOR -m [-n] -- program`.
    pub fn ns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        nsenter_namespaces(self.anchor_pid, self.network, program)
    }

    /// `path` inside the namespace, as seen from outside: `/proc/ANCHOR/root/PATH`.
    pub fn ns_path(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        Path::new(&format!("/proc/{}/root", self.anchor_pid))
            .join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Starts `cmd` (logging to `log`), to be killed at the end.
    pub fn spawn(&mut self, cmd: &mut Command, log: &Path) -> Res<u32> {
        let child = spawn_logged(cmd, log)?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Whether the process `pid` started by [`Sandbox::spawn`] has exited (reaping it).
    pub fn exited(&mut self, pid: u32) -> Option<std::process::ExitStatus> {
        let child = self.children.iter_mut().find(|c| c.id() == pid)?;
        child.try_wait().ok().flatten()
    }

    /// Stops the process `pid` started by [`Sandbox::spawn`] with SIGTERM (as `systemctl stop`
    /// does) and reaps it; SIGKILL and an error when it is still there after `timeout`, or an
    /// error when it had exited before.
    pub fn terminate(&mut self, pid: u32, timeout: Duration) -> Res {
        if let Some(status) = self.exited(pid) {
            return Err(format!("process {pid} had already exited ({status})"));
        }
        kill(pid, Signal::TERM);
        if wait_until(timeout, || self.exited(pid).is_some()) {
            return Ok(());
        }
        kill(pid, Signal::KILL);
        wait_until(Duration::from_secs(10), || self.exited(pid).is_some());
        Err(format!(
            "process {pid} did not exit within {timeout:?} of SIGTERM; killed"
        ))
    }

    /// Starts `bin --root ROOT EXTRA...` (the plugin) in the namespace with [`plugin_env`],
    /// logging to `log`, and waits until it accepts connections on [`PLUGIN_SOCKET`], where
    /// dockerd discovers it. Returns its pid.
    pub fn start_plugin(&mut self, bin: &str, root: &Path, extra: &[&str], log: &Path) -> Res<u32> {
        let mut cmd = self.ns_command(bin);
        cmd.arg("--root").arg(root).args(extra);
        plugin_env(&mut cmd);
        let pid = self.spawn(&mut cmd, log)?;
        let socket = self.ns_path(PLUGIN_SOCKET);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.exited(pid) {
                return Err(format!(
                    "the plugin exited at start ({status}): {}",
                    tail(log, 20)
                ));
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(pid);
            }
            ensure!(
                Instant::now() < deadline,
                "the plugin did not serve on {PLUGIN_SOCKET} within 20 s: {}",
                tail(log, 20)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a private dockerd in the namespace and waits until it answers.
    pub fn start_dockerd(&mut self) -> Res<Dockerd> {
        self.start_dockerd_env(&[])
    }

    /// [`Sandbox::start_dockerd`] with `env` set for dockerd.
    pub fn start_dockerd_env(&mut self, env: &[(&str, &str)]) -> Res<Dockerd> {
        self.start_dockerd_with(env, &[])
    }

    /// [`Sandbox::start_dockerd`] with `env` set for dockerd and `extra` flags (e.g.
    /// `--live-restore`).
    pub fn start_dockerd_with(&mut self, env: &[(&str, &str)], extra: &[&str]) -> Res<Dockerd> {
        let t = self.tmp.clone();
        fs::write(t.join("daemon.json"), "{}\n").ctx("writing daemon.json")?;
        let mut dockerd = Dockerd {
            pid: 0,
            sock: t.join("docker.sock"),
            config: t.join("docker-config"),
            log: t.join("dockerd.log"),
        };
        fs::create_dir_all(&dockerd.config).ctx("creating the docker CLI config")?;
        let mut cmd = self.ns_command("dockerd");
        private_dockerd_args(&mut cmd, &t, &dockerd.sock, &self.cgroup_parent).args(extra);
        cmd.envs(env.iter().copied());
        let pid = self.spawn(&mut cmd, &dockerd.log)?;
        dockerd.pid = pid;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.exited(pid) {
                return Err(format!(
                    "dockerd exited at start ({status}): {}",
                    tail(&dockerd.log, 20)
                ));
            }
            if dockerd.sock.exists()
                && run_cmd(
                    dockerd
                        .cmd()
                        .args(["version", "--format", "{{.Server.Version}}"]),
                    Duration::from_secs(10),
                )
                .is_ok_and(|o| o.success())
            {
                return Ok(dockerd);
            }
            ensure!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s: {}",
                tail(&dockerd.log, 20)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills everything and removes what was made. Idempotent; returns warnings.
    pub fn destroy(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.destroyed {
            return warnings;
        }
        self.destroyed = true;
        // Containers: in child namespaces, but in our cgroup.
        kill_cgroup(&self.cgroup_parent, 100, POLL);
        if let Some(ns) = &self.ns {
            warnings.extend(kill_ns(ns, POLL));
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut anchor) = self.anchor.take() {
            let _ = anchor.kill();
            let _ = anchor.wait();
        }
        warnings.extend(remove_cgroups(
            &self.cgroup_parent,
            Duration::from_secs(5),
            POLL,
        ));
        warnings.extend(remove_dirs(&self.made_dirs));
        if std::env::var_os("DOT_KEEP_TMP").is_some() {
            eprintln!("{}: kept {} (DOT_KEEP_TMP)", self.name, self.tmp.display());
        } else if let Err(e) = fs::remove_dir_all(&self.tmp) {
            warnings.push(format!("cannot remove {}: {e}", self.tmp.display()));
        }
        warnings
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for w in self.destroy() {
            eprintln!("{}: teardown: {w}", self.name);
        }
    }
}

/// A private dockerd started by [`Sandbox::start_dockerd`].
pub struct Dockerd {
    /// Its pid ([`Sandbox::terminate`] stops it).
    pub pid: u32,
    pub sock: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Dockerd {
    /// `docker -H unix://SOCK` with a private CLI config and none of the caller's DOCKER_*.
    pub fn cmd(&self) -> Command {
        docker_command(&self.sock, &self.config)
    }

    /// `docker ARGS`, which must succeed within `timeout`; returns its stdout.
    pub fn ok(&self, args: &[&str], timeout: Duration) -> Res<String> {
        run_ok(self.cmd().args(args), timeout)
    }

    /// Imports `image`, a root file system holding `busybox` and its applets, built in `dir`
    /// (no registry is reachable), and checks that it runs.
    pub fn import_busybox(&self, busybox: &Path, dir: &Path, image: &str) -> Res {
        let rootfs = dir.join("image");
        busybox_rootfs(busybox, &rootfs)?;
        let tar = dir.join("image.tar");
        tar_dir(&rootfs, &tar)?;
        let timeout = Duration::from_secs(120);
        self.ok(&["import", &tar.to_string_lossy(), image], timeout)?;
        let hello = self.ok(
            &["run", "--rm", "--network", "none", image, "echo", "hello"],
            timeout,
        )?;
        ensure!(
            hello == "hello\n",
            "the test image does not work: {hello:?}"
        );
        Ok(())
    }
}

/// `docker -H unix://SOCK` with the CLI config `config` and none of the caller's DOCKER_*.
pub fn docker_command(sock: &Path, config: &Path) -> Command {
    let mut cmd = Command::new("docker");
    cmd.arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .env("DOCKER_CONFIG", config)
        .env("DOCKER_CLI_HINTS", "false");
    for var in [
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "DOCKER_API_VERSION",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Where dockerd discovers the plugin: the socket it serves on by default (in a test, on the
/// namespace's private tmpfs).
pub const PLUGIN_SOCKET: &str = "/run/docker/plugins/docker-on-top.sock";

/// The plugin's environment in a test: debug logging, and none of the variables that would make
/// it think systemd started it (socket activation, sd_notify, journald).
pub fn plugin_env(cmd: &mut Command) -> &mut Command {
    cmd.env("RUST_LOG", "info,docker_on_top=debug");
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The static busybox that the test images are made of.
pub fn find_busybox() -> Res<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no /bin/busybox: install Debian's busybox-static (scripts/test does)".to_owned()
        })
}

/// A minimal root filesystem in `rootfs`: `bin/busybox` with a link for each of its applets,
/// and a world-writable `tmp/`.
pub fn busybox_rootfs(busybox: &Path, rootfs: &Path) -> Res {
    let bin = rootfs.join("bin");
    for dir in [&bin, &rootfs.join("tmp")] {
        fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
        .ctx("chmod rootfs/tmp")?;
    fs::copy(busybox, bin.join("busybox")).ctx("copying busybox")?;
    let list = run_ok(Command::new(busybox).arg("--list"), Duration::from_secs(10))?;
    for applet in list.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .ctx(format!("linking applet {applet}"))?;
    }
    Ok(())
}

/// The mount records of the volume whose directory is `volume_dir`: mount ID to use count (a
/// record cut short counts one use, as the plugin reads it); none when it has no
/// `activemounts/`.
pub fn mount_records(volume_dir: &Path) -> Res<std::collections::BTreeMap<String, u64>> {
    let dir = volume_dir.join("activemounts");
    let mut out = std::collections::BTreeMap::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(&dir).ctx(format!("listing {}", dir.display()))? {
        let entry = entry.ctx("listing activemounts")?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let text = fs::read_to_string(entry.path()).ctx("reading a mount record")?;
        let count = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["UsageCount"].as_u64())
            .unwrap_or(1);
        out.insert(name, count);
    }
    Ok(out)
}

/// `tar --numeric-owner -C DIR -cf TAR .` (for `docker import`).
pub fn tar_dir(dir: &Path, tar: &Path) -> Res {
    run_ok(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(tar)
            .arg("."),
        Duration::from_secs(120),
    )
    .map(drop)
}

/// A small stable hash (FNV-1a, 64 bit) for cache keys.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Results of the steps of a whole-system test, printed as PASS/FAIL lines and a closing
/// `N passed, N failed` line.
pub struct Report {
    name: &'static str,
    started: Instant,
    results: Vec<(String, Res, Duration)>,
}

impl Report {
    pub fn new(name: &'static str) -> Report {
        Report {
            name,
            started: Instant::now(),
            results: Vec::new(),
        }
    }

    /// Runs `step` unless an earlier one failed (then it fails as not run). Returns whether
    /// it passed.
    pub fn step(&mut self, name: &str, step: impl FnOnce() -> Res) -> bool {
        let t = Instant::now();
        let result = if self.results.iter().any(|r| r.1.is_err()) {
            Err("not run: an earlier step failed".to_owned())
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).unwrap_or_else(|p| {
                Err(format!(
                    "panicked: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                ))
            })
        };
        let took = t.elapsed();
        match &result {
            Ok(()) => println!("{}: PASS  {name} ({took:.1?})", self.name),
            Err(e) => println!("{}: FAIL  {name} ({took:.1?}): {e}", self.name),
        }
        let ok = result.is_ok();
        self.results.push((name.to_owned(), result, took));
        ok
    }

    /// Whether a step failed so far.
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.1.is_err())
    }

    /// Prints the summary; returns whether everything passed.
    pub fn finish(self, warnings: &[String]) -> bool {
        let failed = self.results.iter().filter(|r| r.1.is_err()).count();
        let passed = self.results.len() - failed;
        println!(
            "\n===== {} report ({:.1?}) =====",
            self.name,
            self.started.elapsed()
        );
        for (name, result, took) in &self.results {
            match result {
                Ok(()) => println!("PASS  {name} ({took:.1?})"),
                Err(e) => println!("FAIL  {name} ({took:.1?}): {e}"),
            }
        }
        for w in warnings {
            println!("teardown warning: {w}");
        }
        println!("\n{passed} passed, {failed} failed");
        failed == 0 && warnings.is_empty()
    }
}
